"""A start-up that does not grow with the shard count: the shard list from the build's manifest and
a window of real shards that grows ahead of the reader.

DALI's webdataset reader opens every shard it is given when the pipeline is built: one HEAD per
``s3://`` tar and one GET per index, one after the other, on every rank (measured: about 6 ms per
shard for the HEAD alone on a loopback S3 server, 15 ms with the index). And the shard list itself
came from a listing of the shard folder (0.7 ms per object on the same server). At 8,000 shards
that was minutes per rank at every start and resume. When the shards are many
(``MIN_SHARDS`` or more, all under one ``s3://`` folder that holds the builder's
``manifest.json``), the loader instead

1. reads the manifest once (one GET) for the shard list and every shard's sample count: no listing;
2. gives DALI the full shard list in today's order, but a shard this rank will not read soon is a
   *placeholder*: a small local file with a local index of the right sample count, so that DALI
   computes exactly the same split and sample positions without touching the store;
3. makes real (its index fetched, in parallel, into a local folder; its URL given to DALI) only
   the shards of this rank's share from the share's start to ``ahead`` samples past what the
   reader may have consumed, and doubles that window, rebuilding the pipeline from its checkpoint,
   before the reader can reach its end.

The order of the samples is unchanged: DALI sees the same shards, counts and seeds, and reads only
real shards (a sample from a placeholder is an internal error, raised, never handed out). A
checkpoint is the same DALI checkpoint as before, so old checkpoints resume in either mode. A rank
reads only the indices of its own shards, and only as far as it has got. DALI restores a checkpoint
by replaying its epoch from the start of the share, which the window always covers.
"""
from __future__ import annotations

import bisect
import fnmatch
import json
import posixpath
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from dyntrain.data.shards.samples import IMAGE_COMPONENTS
from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3
from dyntrain.data.storage.urls import expand_urls, index_url, missing_indices
from dyntrain.errors import DyntrainError


MIN_SHARDS = 128      # fewer shards: DALI opens them all, as before (a few seconds at most)
MANIFEST = "manifest.json"
FETCH_THREADS = 16


class ShardWindowError(DyntrainError):
    """The reader reached a placeholder shard (a bug in the window's read-ahead bound)."""


def manifest_shards(entries: Sequence[str] | str) -> Optional[tuple[list[str], list[int]]]:
    """(shard URLs in listing order, sample counts) from the manifest of the one ``s3://`` folder
    ``entries`` names (``s3://b/p/`` or ``s3://b/p/<glob>.tar``), or None when that form or the
    manifest is not there (the caller lists the folder as before)."""
    if isinstance(entries, str):
        entries = [entries]
    if len(entries) != 1 or not is_s3(str(entries[0])) or "{" in str(entries[0]):
        return None
    entry = str(entries[0])
    folder, pattern = posixpath.split(entry)
    if not pattern:
        pattern = "*.tar"
    if "/" not in folder[len("s3://"):] or any(c in folder for c in "*?["):
        return None
    if not any(c in pattern for c in "*?["):
        return None  # one named shard
    url = folder + "/" + MANIFEST
    if s3.head(url) is None:
        return None
    try:
        manifest = json.loads(s3.get_bytes(url))
        listed = [(str(s["name"]), int(s["samples"])) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(f"{url}: not a shard manifest ({type(exc).__name__}: {exc})") from None
    chosen = sorted((folder + "/" + n, c) for n, c in listed
                    if "/" not in n and fnmatch.fnmatchcase(n, pattern))
    if not chosen:
        return None
    return [u for u, _ in chosen], [c for _, c in chosen]


class ShardWindow:
    """The DALI paths of one rank's reader: real shards from the start of its share to ``covered``
    samples into it, placeholders elsewhere (see the module docstring)."""

    def __init__(self, shards: list[str], counts: list[int], rank: int, world_size: int,
                 ahead: int) -> None:
        self.shards, self.counts, self.ahead = shards, counts, int(ahead)
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        total = self.starts[-1]
        self.first = total * rank // world_size                 # DALI's split of the samples
        self.share = total * (rank + 1) // world_size - self.first
        self.covered = 0
        self.real: set[int] = set()
        self.fetched = 0                                       # index files read from the store
        self.rebuilds = 0
        self.dir = Path(tempfile.mkdtemp(prefix="dyntrain-window-"))
        self.placeholder = str(self.dir / "placeholder.tar")
        Path(self.placeholder).write_bytes(bytes(1024))
        self._dummy_index: dict[int, str] = {}

    def reach(self, consumed: int) -> bool:
        """Make the window cover the share up to ``consumed + ahead`` samples (capped at the
        share), growing it to at least twice its size and ``ahead`` past that; True when it grew
        (the pipeline must then be rebuilt)."""
        need = min(self.share, int(consumed) + self.ahead)
        if need <= self.covered:
            return False
        self.rebuilds += self.covered > 0
        self.covered = min(self.share, max(need + self.ahead, 2 * self.covered))  # slack >= ahead
        lo = self.first
        hi = self.first + self.covered                         # global sample range [lo, hi)
        first = bisect.bisect_right(self.starts, lo) - 1
        last = bisect.bisect_left(self.starts, hi) - 1
        new = [i for i in range(first, last + 1) if i not in self.real and self.counts[i] > 0]
        with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(new)))) as pool:
            list(pool.map(self._fetch_index, new))
        self.real.update(new)
        self.fetched += len(new)
        return True

    def _fetch_index(self, i: int) -> None:
        url = index_url(self.shards[i])
        text = s3.read_bytes(url).decode()
        head = text.split("\n", 1)[0].split()
        if len(head) < 2 or not head[0].startswith("v1.") or int(head[1]) != self.counts[i]:
            raise DataSourceError(f"{url}: index header {' '.join(head)!r} does not match the "
                                  f"{self.counts[i]} samples the manifest lists for "
                                  f"{self.shards[i]} (a stale manifest or index?)")
        (self.dir / f"{i}.idx").write_text(text)

    def _placeholder_index(self, count: int) -> str:
        path = self._dummy_index.get(count)
        if path is None:
            ext = IMAGE_COMPONENTS[0]
            path = str(self.dir / f"placeholder-{count}.idx")
            lines = "".join(f"{ext} 0 0 _{j}.{ext} json 0 0 _{j}.json\n" for j in range(count))
            Path(path).write_text(f"v1.2 {count}\n{lines}")
            self._dummy_index[count] = path
        return path

    def dali_paths(self) -> tuple[list[str], list[str]]:
        """(shard paths, index paths) for ``fn.readers.webdataset``."""
        paths, indices = [], []
        for i, url in enumerate(self.shards):
            if i in self.real:
                paths.append(url)
                indices.append(str(self.dir / f"{i}.idx"))
            else:
                paths.append(self.placeholder)
                indices.append(self._placeholder_index(self.counts[i]))
        return paths, indices

    def check(self, url: str) -> None:
        """A sample of shard ``url`` failed to decode: a placeholder's (empty) image is a bug here,
        never a corrupt sample to skip nor a storage error to retry."""
        if url == self.placeholder:
            raise ShardWindowError(f"internal error: the reader ran past its shard window "
                                  f"({self.covered} of {self.share} samples loaded); "
                                  f"please report it")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_ahead(shuffle_buffer: int, prefetch: int, batch_size: int) -> int:
    """More samples than DALI's reader can have taken beyond those of the batches handed out (the
    shuffle buffer, the prefetched batches, the reader's own queue), with a margin."""
    return 2 * max(1, shuffle_buffer) + (prefetch + 8) * batch_size


def resolve_shards(urls: Sequence[str] | str, rank: int, world_size: int, ahead: int
                   ) -> tuple[Optional[ShardWindow], list[str], Optional[list[str]]]:
    """(window, shard URLs, their index URLs) for a loader: a ``ShardWindow`` (already covering
    the first ``ahead`` samples) when the shards are many and described by a manifest; else no
    window, the expanded ``urls`` and their indices, or None for the indices (with a warning: DALI
    then scans every shard) when some are missing."""
    found = manifest_shards(urls)
    if found is not None and len(found[0]) >= MIN_SHARDS:
        window = ShardWindow(found[0], found[1], rank, world_size, ahead)
        window.reach(0)
        return window, window.shards, [index_url(u) for u in window.shards]
    shards = expand_urls(urls)
    indices = [index_url(u) for u in shards]
    missing = missing_indices(indices)
    if not missing:
        return None, shards, indices
    warnings.warn(f"{len(missing)} shard index file(s) missing (first: {missing[0]}); DALI "
                  f"will scan every shard to index it, which is slow for large or remote "
                  f"data - rebuild the indices with make_shards or wds2idx")
    return None, shards, None
