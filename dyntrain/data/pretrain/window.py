"""A start-up that does not grow with the shard count: the shard list from the build's manifest and
a window of real shards that grows ahead of the reader.

DALI's webdataset reader opens every shard it is given when the pipeline is built: one HEAD per
``s3://`` tar and one GET per index, one after the other, on every rank (measured: about 6 ms per
shard for the HEAD alone on a loopback S3 server, 15 ms with the index). And the shard list itself
came from a listing of the shard folder (0.7 ms per object on the same server). At 8,000 shards
that was minutes per rank at every start and resume. When the shards are many
(``MIN_SHARDS`` or more, all under one ``s3://`` or local / shared-filesystem folder that holds
the builder's ``manifest.json``), the loader instead

1. reads the manifest once (one GET) for the shard list and every shard's sample count: no listing;
2. gives DALI only the shards of this rank's window, as one reader (``shard_id=0, num_shards=1``):
   the share (DALI's split of the whole list, ``total * rank // world_size``, computed here from
   the manifest's counts) from its start to ``covered`` samples in, the first and last index cut
   to the share. Until the reader reaches the window's end it reads exactly the samples, in the
   same order, that the reader of the whole list reads: DALI's shuffle depends only on the samples
   read, the seed and where its epoch ends, and the window ends before the share only while the
   reader is more than ``ahead`` samples from its end. While it does, a one-sample placeholder
   follows the window: a reader running past it meets an image that does not decode (an internal
   error, raised, never data) instead of wrapping to the share's start;
3. fetches (in parallel, into a local folder) only the indices of the window's shards, and doubles
   the window, rebuilding the pipeline from its checkpoint, before the reader can reach its end.

What a rank holds is therefore per shard for the whole data set (the list and counts of the
manifest) and per sample only for its window. DALI restores a checkpoint by replaying its epoch
from the start of the share (skipping, not reading, the samples that left the shuffle buffer), so
the window starts at the share's start and grows with the position in the epoch: at most the
share (125k samples, ~35 MB, for Million-IRD on 64 data ranks). Shards the reader has passed leave
the window at the next epoch start: a window of ``SHRINK_ABOVE`` samples or more, over twice what
the new epoch needs, shrinks back (one rebuild).

The order of the samples is unchanged, and a checkpoint is the same DALI checkpoint as before (the
reader's RNG at its epoch start, the epoch and the samples since), so old checkpoints resume in
either mode. A rank reads only the indices of its own shards, and only as far as it has got.
"""
from __future__ import annotations

import bisect
import fnmatch
import json
import os
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
SHRINK_ABOVE = 100_000  # samples: a larger window than needed shrinks back at an epoch start
MANIFEST = "manifest.json"
FETCH_THREADS = 16


class ShardWindowError(DyntrainError):
    """The reader reached a placeholder shard (a bug in the window's read-ahead bound)."""


def manifest_shards(entries: Sequence[str] | str) -> Optional[tuple[list[str], list[int]]]:
    """(shard URLs in listing order, sample counts) from the manifest of the one folder ``entries``
    names (``s3://b/p/``, ``s3://b/p/<glob>.tar``, or the same for a local or shared-filesystem
    folder), or None when that form or the manifest is not there (the caller lists the folder as
    before)."""
    if isinstance(entries, str):
        entries = [entries]
    if len(entries) != 1 or "{" in str(entries[0]):
        return None
    entry = str(entries[0])
    remote = is_s3(entry)
    if not remote and os.path.isdir(entry):
        entry = entry.rstrip("/") + "/"
    folder, pattern = posixpath.split(entry)
    if not pattern:
        pattern = "*.tar"
    if remote and "/" not in folder[len("s3://"):]:
        return None
    if not folder or any(c in folder for c in "*?["):
        return None
    if not any(c in pattern for c in "*?["):
        return None  # one named shard
    url = folder + "/" + MANIFEST
    if not (s3.head(url) is not None if remote else os.path.isfile(url)):
        return None
    try:
        manifest = json.loads(s3.read_bytes(url))
        listed = [(str(s["name"]), int(s["samples"])) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(f"{url}: not a shard manifest ({type(exc).__name__}: {exc})") from None
    chosen = sorted((folder + "/" + n, c) for n, c in listed
                    if "/" not in n and fnmatch.fnmatchcase(n, pattern))
    if not chosen:
        return None
    return [u for u, _ in chosen], [c for _, c in chosen]


class ShardWindow:
    """The DALI paths of one rank's reader: the shards of its share from the share's start to
    ``covered`` samples into it, their indices cut to the share (see the module docstring)."""

    def __init__(self, shards: list[str], counts: list[int], rank: int, world_size: int,
                 ahead: int, batch: int = 1) -> None:
        self.shards, self.counts, self.ahead, self.batch = shards, counts, int(ahead), int(batch)
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        total = self.starts[-1]
        self.total = total
        self.first = total * rank // world_size                 # DALI's split of the samples
        self.share = total * (rank + 1) // world_size - self.first
        self.covered = 0
        self.span: list[int] = []                              # the window's shards, in order
        self.real: set[int] = set()                            # shards whose index is here
        self.fetched = 0                                       # index files read from the store
        self.rebuilds = 0
        self.shrinks = 0
        self.dir = Path(tempfile.mkdtemp(prefix="dyntrain-window-"))
        self.placeholder = str(self.dir / "placeholder.tar")
        Path(self.placeholder).write_bytes(bytes(1024))
        self._sentinel_index = str(self.dir / "placeholder.idx")
        ext = IMAGE_COMPONENTS[0]
        Path(self._sentinel_index).write_text(f"v1.2 1\n{ext} 0 0 _0.{ext} json 0 0 _0.json\n")

    def reach(self, consumed: int) -> bool:
        """Make the window cover what the reader needs once ``consumed`` samples have been handed
        out (the DALI checkpoint to rebuild from lies one batch before): from the start of that
        checkpoint's epoch to ``consumed + ahead`` samples (capped at the share), growing it to at
        least twice its size and ``ahead`` past that; at the start of an epoch a window much larger
        than needed (``SHRINK_ABOVE`` samples or more, twice what it needs) shrinks back. True when it changed (the
        pipeline must then be rebuilt)."""
        if self.share < 1:
            return False  # the loader names the empty share
        consumed = int(consumed)
        epoch_start = max(0, consumed - self.batch) // self.share * self.share
        need = min(self.share, consumed - epoch_start + self.ahead)
        if need <= self.covered:
            target = min(self.share, need + self.ahead)
            if self.covered < SHRINK_ABOVE or 2 * target > self.covered:
                return False
            self.shrinks += 1                                  # a new epoch: passed shards leave
            self._cover(target)
            return True
        self.rebuilds += self.covered > 0
        self._cover(min(self.share, max(need + self.ahead, 2 * self.covered)))  # slack >= ahead
        return True

    def _cover(self, samples: int) -> None:
        lo, hi = self.first, self.first + samples              # global sample range [lo, hi)
        first = bisect.bisect_right(self.starts, lo) - 1
        last = bisect.bisect_left(self.starts, hi) - 1
        hi = min(self.first + self.share, self.starts[last + 1])  # whole shards, within the share
        self.covered = hi - lo
        self.span = [i for i in range(first, last + 1) if self.counts[i] > 0]
        new = [i for i in self.span if i not in self.real]
        with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(new)))) as pool:
            list(pool.map(self._fetch_index, new))
        self.real = set(self.span)                             # shards outside the window leave
        self.fetched += len(new)

    def _fetch_index(self, i: int) -> None:
        url = index_url(self.shards[i])
        text = s3.read_bytes(url).decode()
        head = text.split("\n", 1)[0].split()
        if len(head) < 2 or not head[0].startswith("v1.") or int(head[1]) != self.counts[i]:
            raise DataSourceError(f"{url}: index header {' '.join(head)!r} does not match the "
                                  f"{self.counts[i]} samples the manifest lists for "
                                  f"{self.shards[i]} (a stale manifest or index?)")
        (self.dir / f"{i}.idx").write_text(text)

    def _index_for(self, i: int) -> str:
        """The local index of shard ``i`` as DALI reads it: the lines of this share only."""
        path = self.dir / f"{i}.idx"
        a = max(self.first, self.starts[i]) - self.starts[i]
        b = min(self.first + self.share, self.starts[i + 1]) - self.starts[i]
        if a == 0 and b == self.counts[i]:
            return str(path)
        cut = self.dir / f"{i}-{a}-{b}.idx"
        if not cut.exists():
            head, *lines = path.read_text().splitlines()
            version = head.split()[0]
            cut.write_text(f"{version} {b - a}\n" + "".join(f"{ln}\n" for ln in lines[a:b]))
        return str(cut)

    def reader_paths(self) -> tuple[list[str], list[str]]:
        """(shard paths, index paths) for ``fn.readers.webdataset`` (one reader, ``num_shards=1``):
        the window's shards, and after them, while the window ends before the share does, a
        one-sample placeholder, so that a reader running past the window meets an image that
        cannot decode (``check`` raises) instead of wrapping to the share's start."""
        paths = [self.shards[i] for i in self.span]
        indices = [self._index_for(i) for i in self.span]
        if self.covered < self.share:
            paths.append(self.placeholder)
            indices.append(self._sentinel_index)
        return paths, indices

    def reader_args(self) -> dict:
        """The arguments of ``fn.readers.webdataset`` that say what it reads: the window as one reader."""
        paths, indices = self.reader_paths()
        return {"paths": paths, "index_paths": indices, "shard_id": 0, "num_shards": 1}

    def dali_paths(self) -> tuple[list[str], list[str]]:
        """The whole shard list as DALI's split sees it, by shard: the real shard (and its local
        index) for those of the window, the placeholder elsewhere (for checks and logs)."""
        paths, indices = [], []
        for i, url in enumerate(self.shards):
            if i in self.real:
                paths.append(url)
                indices.append(str(self.dir / f"{i}.idx"))
            else:
                paths.append(self.placeholder)
                indices.append(self._sentinel_index)
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


def resolve_shards(urls: Sequence[str] | str, rank: int, world_size: int, ahead: int,
                   batch: int = 1) -> tuple[Optional[ShardWindow], list[str], Optional[list[str]]]:
    """(window, shard URLs, their index URLs) for a loader: a ``ShardWindow`` (already covering
    the first ``ahead`` samples) when the shards are many and described by a manifest; else no
    window, the expanded ``urls`` and their indices, or None for the indices (with a warning: DALI
    then scans every shard) when some are missing."""
    found = manifest_shards(urls)
    if found is not None and len(found[0]) >= MIN_SHARDS:
        window = ShardWindow(found[0], found[1], rank, world_size, ahead, batch)
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
