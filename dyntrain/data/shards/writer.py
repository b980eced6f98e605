"""Shard builder: folders of high-resolution photographs -> WebDataset shards of 512x512 patches.

    python launch/make_shards.py --src DIR [--src DIR ...] --out DIR_OR_S3_URL \
        [--patch-size 512] [--shard-samples N] [--format jpg|png] [--workers N] ...

Images are processed in a process pool (``dyntrain.data.shards.patches``: decode, cut, filter, encode);
results are consumed in source order, so the output does not depend on the number of workers.

Output (``OUT`` is a folder or ``s3://bucket/prefix``, see ``dyntrain.data.storage.output``):
  ``shard-000000.tar``  WebDataset shard: ``<key>.jpg|png`` + ``<key>.json`` per sample. Keys have no
                        dots: ``<image index:07d>_<row:03d>_<col:03d>``. The JSON holds the source
                        path, the patch position (x, y, row, col), the patch and image resolution,
                        the flat fraction and the quality scores.
  ``shard-000000.idx``  the DALI index of that shard (format v1.2, as ``wds2idx`` writes it).
  ``patches.jsonl``     one line per kept patch (key, shard, source, position, scores).
  ``manifest.json``     written last: build settings, counts kept/dropped per reason, skipped images
                        with the reason, shard list with sample counts, bytes and SHA-256.

Re-running is safe: shards are written under a temporary name and renamed (local) or uploaded whole
(S3 objects appear atomically), the manifest is written last, shard names and contents are
deterministic, and shards of an earlier build that the new manifest does not list are removed after
the manifest is written. A re-run whose sources and settings match the existing manifest does
nothing (``--force`` rebuilds).
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from dyntrain.data.shards.patches import ShardBuildConfig, init_worker, process_image
from dyntrain.data.shards.wds import INDEX_VERSION, make_index, write_tar
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.images import list_images
from dyntrain.logs import get_logger
from dyntrain.progress import progress_bar


log = get_logger(__name__)

MANIFEST = "manifest.json"
PATCH_LIST = "patches.jsonl"
BUILDER_VERSION = 1


def list_sources(srcs: Iterable[str | Path]) -> list[Path]:
    """Every image file under the given folders (recursively; files given directly are taken as
    they are), sorted within each folder, folders in the order given, duplicates dropped."""
    out: list[Path] = []
    seen: set[str] = set()
    for src in srcs:
        p = Path(src)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = list_images(p)
        else:
            raise DataSourceError(f"source folder not found: {src}")
        for f in found:
            key = str(f.resolve())
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _fingerprint(cfg: ShardBuildConfig, sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "cfg": cfg.fingerprint_dict()},
                        sort_keys=True).encode())
    for p in sources:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(output: ShardOutput, fingerprint: str) -> Optional[dict[str, Any]]:
    """The existing manifest when it was built from the same sources and settings and every shard
    it lists is present; None otherwise."""
    old = output.read_text(MANIFEST)
    if old is None:
        return None
    try:
        manifest = json.loads(old)
    except json.JSONDecodeError:
        return None
    names = set(output.list_names())
    if manifest.get("fingerprint") == fingerprint and all(
            s["name"] in names and s["index"] in names for s in manifest.get("shards", [])):
        return manifest
    return None


def split_holdout(sources: list[Path], frac: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(training images, held-out images): ``round(frac * n)`` whole source images (at least one,
    at most n - 1) drawn with ``seed``; both lists keep the source order."""

    if not 0.0 < frac < 1.0:
        raise ValueError(f"--holdout: a fraction in (0, 1) is needed, got {frac}")
    n = len(sources)
    if n < 2:
        raise ValueError(f"--holdout: needs at least 2 source images, found {n}")
    k = min(n - 1, max(1, round(frac * n)))
    held = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    return ([p for i, p in enumerate(sources) if i not in held],
            [p for i, p in enumerate(sources) if i in held])


def build_with_holdout(srcs: list[str | Path], out: str, val_out: str, frac: float,
                       cfg: Optional[ShardBuildConfig] = None, seed: int = 0, force: bool = False,
                       progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every patch of a held-out image goes to ``val_out``, never to ``out``; both manifests record
    the split (``split`` and ``holdout``: fraction, seed, both outputs and the held-out images)."""
    if str(val_out).rstrip("/") == str(out).rstrip("/"):
        raise ValueError("--val-out must differ from --out (validation shards live apart)")
    train, held = split_holdout(list_sources(srcs), frac, seed)
    record = {"frac": frac, "seed": seed, "train_out": str(out), "val_out": str(val_out),
              "val_images": [str(p) for p in held]}
    manifests = []
    for split, sources, dest in (("train", train, out), ("val", held, val_out)):
        manifests.append(build_shards([], dest, cfg, force, progress, sources=sources,
                                      extra={"split": split, "holdout": record}))
    return manifests[0], manifests[1]


def build_shards(srcs: list[str | Path], out: str, cfg: Optional[ShardBuildConfig] = None,
                 force: bool = False, progress: bool = True, *, sources: Optional[list[Path]] = None,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Build the shards of ``srcs`` (or of the image list ``sources``) into ``out`` (folder or s3://
    prefix); ``extra`` is added to the manifest. Returns the manifest."""
    cfg = cfg or ShardBuildConfig()
    cfg.quality_filter()  # a bad hook fails here, not in every worker
    sources = list_sources(srcs) if sources is None else sources
    fingerprint = _fingerprint(cfg, sources)
    output = ShardOutput(str(out))
    try:
        output.remove_leftovers(cfg.prefix, (MANIFEST, PATCH_LIST))
        manifest = None if force else _up_to_date(output, fingerprint)
        if manifest is not None:
            if progress:
                log.info("%s is up to date (%s samples in %s shards)", output.url,
                         manifest["num_samples"], manifest["num_shards"])
            manifest["up_to_date"] = True
            return manifest
        return _Builder(sources, output, cfg, progress, [str(s) for s in srcs], extra).run(fingerprint)
    finally:
        output.close()


def empty_build_message(srcs: list[str], counts: dict[str, Any], patch_size: int, out: str) -> str:
    """What a build that kept no patch says: the source folders and every count."""
    c = counts
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["patches_dropped"].items())) or "none"
    return (f"no usable image in {', '.join(srcs)}: {c['images_found']} image(s) found, "
            f"{c['images_used']} used, {c['images_too_small']} smaller than the patch size {patch_size}, "
            f"{c['images_corrupt']} unreadable; patches {c['patches_total']} cut, {c['patches_kept']} kept "
            f"(dropped: {dropped}); no shard in {out}")


class _Builder:
    """One build: consumes the per-image results in source order, cuts shards, publishes them."""

    def __init__(self, sources: list[Path], output: ShardOutput, cfg: ShardBuildConfig,
                 progress: bool, src_names: list[str], extra: Optional[dict[str, Any]] = None) -> None:
        self.sources, self.output, self.cfg, self.progress = sources, output, cfg, progress
        self.src_names = src_names
        self.extra = extra or {}
        self.counts: dict[str, Any] = {"images_found": len(sources), "images_used": 0,
                                       "images_too_small": 0, "images_corrupt": 0,
                                       "patches_total": 0, "patches_kept": 0, "patches_dropped": {}}
        self.corrupt: list[dict[str, str]] = []
        self.too_small: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.pending: list[tuple[str, bytes, dict]] = []
        self.patch_lines: list[str] = []
        self.uploads: list[cf.Future] = []
        self.pool_io = cf.ThreadPoolExecutor(max_workers=2)

    def _results(self, pool) -> Iterable[dict[str, Any]]:
        tasks = [(i, str(p)) for i, p in enumerate(self.sources)]
        if pool is None:
            init_worker(self.cfg)
            return map(process_image, tasks)
        return pool.imap(process_image, tasks, chunksize=1)

    def run(self, fingerprint: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        workers = self.cfg.workers or os.cpu_count() or 1
        workers = max(1, min(workers, len(self.sources))) if self.sources else 1
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with progress_bar(len(self.sources), "[make_shards] images", "img", self.progress) as bar:
            pool = None
            try:
                if workers > 1:
                    pool = ctx.Pool(workers, initializer=init_worker, initargs=(self.cfg,))
                for res in self._results(pool):
                    self._take(res)
                    for f in [u for u in self.uploads if u.done()]:
                        f.result()  # surface an upload error now
                    bar.update(1)
                    bar.set_postfix(kept=self.counts["patches_kept"], dropped=self._dropped(),
                                    shards=len(self.shards), refresh=False)
                self._flush()
                if pool is not None:
                    pool.close()
                    pool.join()
                for f in self.uploads:
                    f.result()
            finally:
                self.pool_io.shutdown(wait=True)
                if pool is not None:
                    pool.terminate()
        seconds = time.perf_counter() - t0
        if self.progress:
            n = len(self.sources)
            log.info("[make_shards] images %d/%d (%.1f/s) | patches kept %d dropped %d | shards %d",
                     n, n, n / max(seconds, 1e-9), self.counts["patches_kept"], self._dropped(),
                     len(self.shards))
        self._refuse_empty()
        return self._finish(fingerprint, t0)

    def _refuse_empty(self) -> None:
        """No usable image (none found, all too small or unreadable): fail before anything is written."""
        if self.counts["images_used"] == 0:
            raise DataSourceError(empty_build_message(self.src_names, self.counts, self.cfg.patch_size,
                                                      self.output.url))

    def _dropped(self) -> int:
        return sum(self.counts["patches_dropped"].values())

    def _take(self, res: dict[str, Any]) -> None:
        counts = self.counts
        if res["status"] == "corrupt":
            counts["images_corrupt"] += 1
            self.corrupt.append({"path": res["path"], "error": res["error"]})
        elif res["status"] == "too_small":
            counts["images_too_small"] += 1
            self.too_small.append({"path": res["path"], "size": res["size"]})
        else:
            counts["images_used"] += 1
            counts["patches_total"] += res["total"]
            for reason, n in res["dropped"].items():
                counts["patches_dropped"][reason] = counts["patches_dropped"].get(reason, 0) + n
            for item in res["patches"]:
                self.pending.append(item)
                counts["patches_kept"] += 1
                if len(self.pending) >= self.cfg.shard_samples:
                    self._flush()

    def _flush(self) -> None:
        """Write the pending samples as the next shard + index; publish both in the background."""
        pending, output = self.pending, self.output
        if not pending:
            return
        n = len(self.shards)
        name, index_name = f"{self.cfg.prefix}-{n:06d}.tar", f"{self.cfg.prefix}-{n:06d}.idx"
        staged = output.staging(name)
        ext = self.cfg.image_format
        write_tar(staged, [(key, ((ext, data), ("json", json.dumps(meta, sort_keys=True).encode())))
                           for key, data, meta in pending])
        staged_idx = output.staging(index_name)
        staged_idx.write_text(make_index(staged))
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()
        self.shards.append({"name": name, "index": index_name, "samples": len(pending),
                            "bytes": staged.stat().st_size, "sha256": digest,
                            "first_key": pending[0][0], "last_key": pending[-1][0]})
        for _key, _data, meta in pending:
            self.patch_lines.append(json.dumps({"shard": name, **meta}, sort_keys=True))

        def publish() -> None:
            output.publish(staged, name)
            output.publish(staged_idx, index_name)
        self.uploads.append(self.pool_io.submit(publish))
        self.pending = []

    def _finish(self, fingerprint: str, t0: float) -> dict[str, Any]:
        """patches.jsonl, then the manifest, then the removal of stale shards; logs the summary."""
        output, counts, shards = self.output, self.counts, self.shards
        lines = self.patch_lines
        output.write_text(PATCH_LIST, "\n".join(lines) + ("\n" if lines else ""))
        manifest = {
            "format": "dyntrain-shards", "builder_version": BUILDER_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": fingerprint,
            "sources": [str(s) for s in self.sources],
            "settings": asdict(self.cfg),
            "counts": counts,
            "skipped_images": {"corrupt": self.corrupt, "too_small": self.too_small},
            "num_shards": len(shards),
            "num_samples": sum(s["samples"] for s in shards),
            "shards": shards,
            "patch_list": PATCH_LIST,
            "index_format": f"DALI webdataset index {INDEX_VERSION}, <shard stem>.idx beside each shard",
            "seconds": round(time.perf_counter() - t0, 2),
            **self.extra,
        }
        output.write_text(MANIFEST, json.dumps(manifest, indent=1))
        # shards of an earlier build that this manifest does not list
        keep = {s["name"] for s in shards} | {s["index"] for s in shards}
        pattern = re.compile(rf"^{re.escape(self.cfg.prefix)}-\d{{6}}\.(tar|idx)$")
        removed = [n for n in output.list_names() if pattern.match(n) and n not in keep]
        for name in removed:
            output.remove(name)
        manifest["removed_stale"] = removed
        if self.progress:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(counts["patches_dropped"].items()))
            log.info("wrote %s samples in %d shards to %s in %.1fs | images used %d, too small %d, "
                     "corrupt %d | patches dropped: %s", manifest["num_samples"], len(shards),
                     output.url, manifest["seconds"], counts["images_used"],
                     counts["images_too_small"], counts["images_corrupt"], dropped or "none")
        return manifest
