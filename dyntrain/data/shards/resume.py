"""The shard builder's resume journal: a killed build continues after its last complete shard.

After shard ``n`` and its index are published, the builder publishes ``journal-<prefix>-n.json`` into
the output (a folder or an s3:// prefix; no sub-folder, which parts running at the same time would
have to share and remove): the build's fingerprint, the shard's manifest
entry, its patch-list lines, the counts and skip lists as they stood when the shard was cut, and
the resume point: the position of the image whose patch closed the shard and that patch's key.

A re-run with the same fingerprint takes the longest run of entries 0, 1, ... whose shard and index
are present, restores the state, and starts again at the resume point, skipping that image's patches
up to the key: since images are consumed in source order and the shards are cut by count, the
shards it writes next are byte-identical to those of an uninterrupted run, and no patch is written
twice or lost. The journal is removed once the build's manifest is written.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from dyntrain.data.storage.output import ShardOutput


class Journal:
    """The journal entries of the shards ``<prefix>-NNNNNN`` of one output."""

    def __init__(self, output: ShardOutput, prefix: str) -> None:
        self.output, self.prefix = output, prefix

    def name(self, n: int) -> str:
        return f"journal-{self.prefix}-{n:06d}.json"

    def names(self) -> list[str]:
        """This prefix's entries and staging leftovers in the output."""
        ours = re.compile(rf"^\.?journal-{re.escape(self.prefix)}-\d{{6}}\.json(\.tmp-\d+)?$")
        return [n for n in self.output.list_names() if ours.match(n)]

    def load(self, fingerprint: str, published: set[str]) -> list[dict[str, Any]]:
        """The entries a re-run can resume from (see the module docstring)."""
        names = set(self.names())
        entries: list[dict[str, Any]] = []
        while self.name(len(entries)) in names:
            text = self.output.read_text(self.name(len(entries)))
            try:
                entry = json.loads(text or "")
            except json.JSONDecodeError:
                break
            shard = entry.get("shard", {})
            if entry.get("fingerprint") != fingerprint or shard.get("name") not in published \
                    or shard.get("index") not in published:
                break
            entries.append(entry)
        return entries

    def record(self, n: int, text: str) -> None:
        self.output.write_text(self.name(n), text)

    def clear(self, keep: int = 0) -> None:
        """Remove this prefix's entries from ``keep`` on (all by default) and staging leftovers."""
        keep_names = {self.name(n) for n in range(keep)}
        for name in self.names():
            if name not in keep_names:
                self.output.remove(name)


def entry_text(fingerprint: str, shard: dict[str, Any], lines: list[str], counts: dict[str, Any],
               skipped: dict[str, Any], pos: int, last_key: Optional[str]) -> str:
    """One journal entry (state taken now, published after the shard)."""
    return json.dumps({"fingerprint": fingerprint, "shard": shard, "patch_lines": lines,
                       "counts": counts, "skipped_images": skipped, "pos": pos,
                       "last_key": last_key})
