"""``make_shards merge --out OUT``: join the parts of a multi-node build into one build.

Checks that the part manifests ``part-IIII-of-NNNN.json`` of ``OUT`` are all there (a part without
its manifest is missing or unfinished: its journal says how far it got), that they were built from
the same source list and settings, and that every shard they list is present; then writes
``patches.jsonl`` (the parts' patch lists in part order) and ``manifest.json`` (summed counts and
drops, per-source counts, the shard list in part order, all sources and skipped images, the parts'
fingerprints). Anything wrong is one error naming the part. Shards of an earlier build that the
merged manifest does not list are removed after it is written; a re-run of a finished merge does
nothing. The merged output reads exactly as a single-machine build (its shards sort in source order).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from dyntrain.data.shards.builder import BUILDER_VERSION, empty_message
from dyntrain.data.shards.writer import MANIFEST, PATCH_LIST, part_names, up_to_date
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.logs import get_logger


log = get_logger(__name__)

_PART = re.compile(r"^part-(\d{4})-of-(\d{4})\.json$")
# what every part carries alike and the merged manifest keeps
_SHARED = ("format", "settings", "split", "holdout", "dedup", "index_format")


def _add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    for k, v in counts.items():
        if isinstance(v, dict):
            sub = total.setdefault(k, {})
            if k == "per_source":
                for name, c in v.items():
                    _add_counts(sub.setdefault(name, {}), c)
            else:
                _add_counts(sub, v)
        else:
            total[k] = total.get(k, 0) + v


def _parts(output: ShardOutput, expected: int = 0) -> list[dict[str, Any]]:
    """The part manifests of ``output`` in part order; raises naming a missing or odd part."""
    found: dict[int, int] = {}
    for name in output.list_names():
        m = _PART.match(name)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    totals = sorted(set(found.values()))
    if not found and not expected:
        raise DataSourceError(f"merge: no part manifest (part-IIII-of-NNNN.json) in {output.url}")
    if len(totals) > 1:
        raise DataSourceError(f"merge: {output.url} holds parts of builds with {totals} parts; "
                              "remove the other build's part-*.json")
    n = expected or totals[0]
    if totals and totals[0] != n:
        raise DataSourceError(f"merge: expected {n} parts, {output.url} holds parts of {totals[0]}")
    manifests = []
    for i in range(n):
        name = part_names((i, n), "")[1]
        text = output.read_text(name) if i in found else None
        if text is None:
            journal = re.compile(rf"^journal-[A-Za-z0-9_-]+-p{i:04d}-\d{{6}}\.json$")
            done = sum(1 for x in output.list_names() if journal.match(x))
            state = f"unfinished ({done} shard(s) in its journal)" if done else "missing"
            raise DataSourceError(f"merge: part {i} of {n} is {state}: no {output.url_of(name)}")
        manifests.append(json.loads(text))
    return manifests


def _check(output: ShardOutput, parts: list[dict[str, Any]]) -> None:
    ref = parts[0]["part"]
    names = set(output.list_names())
    for m in parts:
        p = m["part"]
        if m.get("builder_version") != parts[0].get("builder_version"):  # other measures: rebuild
            raise DataSourceError(f"merge: part {p['index']} of {p['parts']} was built by builder version "
                                  f"{m.get('builder_version')}, part 0 by {parts[0].get('builder_version')}: "
                                  f"build the older part(s) again with this version")
        for what, key in (("source list", "sources_digest"), ("settings", "settings")):
            if p[key] != ref[key]:
                raise DataSourceError(f"merge: part {p['index']} of {p['parts']} was built from another "
                                      f"{what} than part 0 ({output.url_of(part_names((p['index'], p['parts']), '')[1])})")
        for s in m["shards"]:
            if s["name"] not in names or s["index"] not in names:
                raise DataSourceError(f"merge: part {p['index']} of {p['parts']}: shard "
                                      f"{output.url_of(s['name'])} (or its index) is missing")


def merge_parts(out: str, expected: int = 0, progress: bool = True) -> dict[str, Any]:
    """Merge the parts in ``out`` (``expected``: the number of parts, 0 = as the manifests say)."""
    output = ShardOutput(str(out))
    try:
        parts = _parts(output, expected)
        _check(output, parts)
        fingerprint = hashlib.sha256("\n".join(m["fingerprint"] for m in parts).encode()).hexdigest()
        done = up_to_date(output, fingerprint)
        if done is not None:
            done["up_to_date"] = (f"{output.url_of(MANIFEST)} already merges these {len(parts)} parts "
                                  "and all its shards are present")
            if progress:
                log.info("up to date, nothing to do: %s", done["up_to_date"])
            return done
        counts: dict[str, Any] = {}
        skipped: dict[str, list] = {}
        for m in parts:
            _add_counts(counts, m["counts"])
            for reason, items in m["skipped_images"].items():
                skipped.setdefault(reason, []).extend(items)
        shards = [s for m in parts for s in m["shards"]]
        if not shards:
            raise DataSourceError(empty_message([output.url], counts, parts[0]["settings"]["patch_size"],
                                                output.url))
        staged = output.staging(PATCH_LIST)
        with open(staged, "w") as f:
            for m in parts:
                f.write(output.read_text(m["patch_list"]) or "")
        output.publish(staged, PATCH_LIST)
        manifest = {k: parts[0][k] for k in _SHARED if k in parts[0]}
        manifest.update({
            "builder_version": BUILDER_VERSION, "created": parts[-1]["created"],
            "fingerprint": fingerprint, "sources": [s for m in parts for s in m["sources"]],
            "counts": counts, "skipped_images": skipped, "num_shards": len(shards),
            "num_samples": sum(s["samples"] for s in shards), "shards": shards,
            "patch_list": PATCH_LIST,
            "seconds": round(sum(m["seconds"] for m in parts), 2),
            "parts": [{"part": m["part"]["index"], "fingerprint": m["fingerprint"],
                       "num_shards": m["num_shards"], "num_samples": m["num_samples"],
                       "seconds": m["seconds"]} for m in parts],
        })
        output.write_text(MANIFEST, json.dumps(manifest, indent=1))
        keep = {s["name"] for s in shards} | {s["index"] for s in shards}
        prefix = re.escape(parts[0]["settings"]["prefix"])
        stale = re.compile(rf"^{prefix}(-p\d{{4}})?-\d{{6}}\.(tar|idx)$")
        manifest["removed_stale"] = [n for n in output.list_names() if stale.match(n) and n not in keep]
        for name in manifest["removed_stale"]:
            output.remove(name)
        if progress:
            log.info("merged %d parts: %d samples in %d shards -> %s", len(parts),
                     manifest["num_samples"], len(shards), output.url_of(MANIFEST))
        return manifest
    finally:
        output.close()
