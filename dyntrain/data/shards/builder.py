"""One shard build (a whole build or one part): consumes the per-image results in source order, cuts
shards by count, publishes them with their DALI index and a resume-journal entry, and writes the
patch list and the manifest last (the format is described in ``dyntrain.data.shards.writer``)."""
from __future__ import annotations

import concurrent.futures as cf
import datetime
import json
import os
import re
import time
from dataclasses import asdict
from typing import Any, Optional

from dyntrain.data.shards.patches import ShardBuildConfig, init_worker, process_image
from dyntrain.data.shards.pool import ordered_map
from dyntrain.data.shards.resume import Journal, entry_text
from dyntrain.data.shards.wds import INDEX_VERSION, write_tar
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.logs import get_logger
from dyntrain.progress import progress_bar


log = get_logger(__name__)

BUILDER_VERSION = 3  # 3: measures on the 8-bit luma, exact (quality.py); older builds are rebuilt

Task = tuple[int, str, dict]  # (image index, source, provenance)
DECODE_BYTES_PER_PIXEL = 12   # peak of read_image: decoded RGB + orientation and colour copies


def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def new_counts(images: int) -> dict[str, Any]:
    return {"images_found": images, "images_used": 0, "images_too_small": 0, "images_too_large": 0,
            "images_corrupt": 0, "patches_total": 0, "patches_kept": 0, "patches_dropped": {},
            "per_source": {}}


def empty_message(srcs: list[str], counts: dict[str, Any], patch_size: int, out: str) -> str:
    """What a build that kept no patch says: the source folders and every count."""
    c = counts
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["patches_dropped"].items())) or "none"
    return (f"no usable image in {', '.join(srcs)}: {c['images_found']} image(s) found, "
            f"{c['images_used']} used, {c['images_too_small']} smaller than the patch size {patch_size}, "
            f"{c.get('images_too_large', 0)} over the decoded-pixel cap, "
            f"{c['images_corrupt']} unreadable; patches {c['patches_total']} cut, {c['patches_kept']} kept "
            f"(dropped: {dropped}); no shard in {out}")


class Builder:
    """Args: tasks (the images of this build, in order), output, settings, progress (log and bar),
    src_names (for messages), extra (added to the manifest; ``extra["part"]`` marks a part),
    names (shard prefix, manifest name, patch list name), journal (the resume journal)."""

    def __init__(self, tasks: list[Task], output: ShardOutput, cfg: ShardBuildConfig, progress: bool,
                 src_names: list[str], extra: dict[str, Any], names: tuple[str, str, str],
                 journal: Journal) -> None:
        self.tasks, self.output, self.cfg, self.progress = tasks, output, cfg, progress
        self.src_names, self.extra, self.journal = src_names, extra, journal
        self.prefix, self.manifest_name, self.patch_list = names
        self.counts = new_counts(len(tasks))
        self.skipped: dict[str, list[dict[str, Any]]] = {"corrupt": [], "too_small": [], "too_large": []}
        self.shards: list[dict[str, Any]] = []
        self.pending: list[tuple[str, bytes, dict]] = []
        self.patch_lines: list[str] = []
        self.uploads: list[cf.Future] = []
        self.pool_io = cf.ThreadPoolExecutor(max_workers=2)
        self.pos = 0  # position in tasks of the image being taken
        self.resume_pos, self.resume_key = -1, None  # the image resumed in, the last key written
        self.fingerprint = ""

    def _resume(self, force: bool) -> int:
        """Restore the state of the journal's last complete shard; the position to start from."""
        entries = [] if force else self.journal.load(self.fingerprint, set(self.output.list_names()))
        self.journal.clear(keep=len(entries))
        if not entries:
            return 0
        last = entries[-1]
        self.shards = [e["shard"] for e in entries]
        self.patch_lines = [ln for e in entries for ln in e["patch_lines"]]
        self.counts, self.skipped = last["counts"], last["skipped_images"]
        self.resume_key, self.resume_pos = last["last_key"], last["pos"]
        if self.progress:
            log.info("resuming %s after shard %s (%d shards, %d patches done)", self.output.url,
                     last["shard"]["name"], len(entries), len(self.patch_lines))
        return last["pos"]

    def run(self, fingerprint: str, force: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.fingerprint = fingerprint
        start = self._resume(force)
        workers = self.cfg.workers or os.cpu_count() or 1
        workers = max(1, min(workers, len(self.tasks) - start))
        self._check_memory(workers)
        with progress_bar(len(self.tasks), "[make_shards] images", "img", self.progress) as bar:
            bar.update(start)
            results = ordered_map(process_image, self.tasks[start:], workers, self.cfg.max_image_pixels,
                                  path_of=lambda task: task[1], initializer=init_worker, initargs=(self.cfg,))
            try:
                for self.pos, res in enumerate(results, start):
                    self._take(res)
                    for f in [u for u in self.uploads if u.done()]:
                        f.result()  # surface an upload error now
                    bar.update(1)
                    bar.set_postfix(kept=self.counts["patches_kept"], dropped=self._dropped(),
                                    shards=len(self.shards), refresh=False)
                self._flush()
                for f in self.uploads:
                    f.result()
            finally:
                results.close()  # stops the workers when the build fails
                self.pool_io.shutdown(wait=True)
        seconds = time.perf_counter() - t0
        if self.progress:
            n = len(self.tasks)
            log.info("[make_shards] images %d/%d (%.1f/s) | patches kept %d dropped %d | shards %d",
                     n, n, (n - start) / max(seconds, 1e-9), self.counts["patches_kept"],
                     self._dropped(), len(self.shards))
        if "part" not in self.extra and self.counts["images_used"] == 0:
            # no usable image: fail before anything is written (a part may be empty; merge checks)
            raise DataSourceError(empty_message(self.src_names, self.counts, self.cfg.patch_size,
                                                self.output.url))
        return self._finish(t0)

    def _check_memory(self, workers: int) -> None:
        """Warn when the workers' peak decode (~12 bytes a pixel at the cap) exceeds the free memory."""
        need = workers * self.cfg.max_decoded_pixels * DECODE_BYTES_PER_PIXEL
        avail = available_memory()
        if avail is not None and need > avail:
            log.warning("%d workers decoding images of up to %.0f MP may need %.1f GB, more than the "
                        "%.1f GB available: lower --workers or --max-decoded-pixels", workers,
                        self.cfg.max_decoded_pixels / 1e6, need / 1e9, avail / 1e9)

    def _dropped(self) -> int:
        return sum(self.counts["patches_dropped"].values())

    def _take(self, res: dict[str, Any]) -> None:
        counts = self.counts
        resumed = self.resume_key is not None and self.pos == self.resume_pos
        name = self.tasks[self.pos][2].get("source") or "-"
        per = counts["per_source"].setdefault(name, {"images": 0, "patches": 0})
        if resumed:  # the image whose patch closed the journal's last shard: counted already
            pass
        elif res["status"] in ("corrupt", "too_small", "too_large"):
            counts[f"images_{res['status']}"] += 1
            self.skipped[res["status"]].append(
                {"path": res["path"], **({"error": res["error"]} if "error" in res else {"size": res["size"]})})
        else:
            counts["images_used"] += 1
            per["images"] += 1
            counts["patches_total"] += res["total"]
            for reason, n in res["dropped"].items():
                counts["patches_dropped"][reason] = counts["patches_dropped"].get(reason, 0) + n
        for item in res["patches"]:
            if resumed and item[0] <= self.resume_key:
                continue
            self.pending.append(item)
            counts["patches_kept"] += 1
            per["patches"] += 1
            if len(self.pending) >= self.cfg.shard_samples:
                self._flush()

    def _flush(self) -> None:
        """Write the pending samples as the next shard + index; publish both, then the journal
        entry, in the background."""
        pending, output = self.pending, self.output
        if not pending:
            return
        n = len(self.shards)
        name, index_name = f"{self.prefix}-{n:06d}.tar", f"{self.prefix}-{n:06d}.idx"
        staged = output.staging(name)
        ext = self.cfg.image_format
        written = write_tar(staged, [(key, ((ext, data), ("json", json.dumps(meta, sort_keys=True)
                                                             .encode()))) for key, data, meta in pending])
        staged_idx = output.staging(index_name)
        staged_idx.write_text(written.index)
        shard = {"name": name, "index": index_name, "samples": len(pending),
                 "bytes": written.size, "sha256": written.sha256,
                 "first_key": pending[0][0], "last_key": pending[-1][0]}
        self.shards.append(shard)
        lines = [json.dumps({"shard": name, **meta}, sort_keys=True) for _key, _data, meta in pending]
        self.patch_lines.extend(lines)
        entry = entry_text(self.fingerprint, shard, lines, self.counts, self.skipped, self.pos,
                           pending[-1][0])

        def publish() -> None:
            output.publish(staged, name)
            output.publish(staged_idx, index_name)
            self.journal.record(n, entry)
        self.uploads.append(self.pool_io.submit(publish))
        self.pending = []

    def _finish(self, t0: float) -> dict[str, Any]:
        """The patch list, then the manifest, then the removal of stale shards and of the journal."""
        output, counts, shards = self.output, self.counts, self.shards
        lines = self.patch_lines
        output.write_text(self.patch_list, "\n".join(lines) + ("\n" if lines else ""))
        manifest = {
            "format": "dyntrain-shards", "builder_version": BUILDER_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": self.fingerprint,
            "sources": [t[1] for t in self.tasks],
            "settings": asdict(self.cfg),
            "counts": counts,
            "skipped_images": self.skipped,
            "num_shards": len(shards),
            "num_samples": sum(s["samples"] for s in shards),
            "shards": shards,
            "patch_list": self.patch_list,
            "index_format": f"DALI webdataset index {INDEX_VERSION}, <shard stem>.idx beside each shard",
            "seconds": round(time.perf_counter() - t0, 2),
            **self.extra,
        }
        output.write_text(self.manifest_name, json.dumps(manifest, indent=1))
        self.journal.clear()
        # shards of an earlier build that this manifest does not list (a whole build also removes
        # the shards of an earlier parted build; a part only its own)
        keep = {s["name"] for s in shards} | {s["index"] for s in shards}
        parted = "" if "part" in self.extra else r"(-p\d{4})?"
        pattern = re.compile(rf"^{re.escape(self.prefix)}{parted}-\d{{6}}\.(tar|idx)$")
        removed = [n for n in output.list_names() if pattern.match(n) and n not in keep]
        for name in removed:
            output.remove(name)
        manifest["removed_stale"] = removed
        if self.progress:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(counts["patches_dropped"].items()))
            log.info("wrote %s samples in %d shards to %s in %.1fs | images used %d, too small %d, "
                     "too large %d, corrupt %d | patches dropped: %s", manifest["num_samples"],
                     len(shards), output.url_of(self.manifest_name), manifest["seconds"],
                     counts["images_used"], counts["images_too_small"], counts["images_too_large"],
                     counts["images_corrupt"], dropped or "none")
        return manifest
