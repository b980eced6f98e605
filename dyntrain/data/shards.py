"""Shard builder: folders of high-resolution photographs -> WebDataset shards of 512x512 patches.

    python launch/make_shards.py --src DIR [--src DIR ...] --out DIR_OR_S3_URL \
        [--patch-size 512] [--shard-samples N] [--format jpg|png] [--workers N] ...

Per image (in a process pool, results consumed in source order so the output does not depend on
the number of workers):
  1. decode fully with PIL (EXIF orientation applied, converted to 8-bit RGB); an unreadable or
     corrupt file is skipped, counted and named in the manifest; an image smaller than one patch is
     skipped and counted;
  2. cut into non-overlapping ``patch_size`` squares on a grid centred in the image;
  3. drop a patch whose flat fraction exceeds ``max_flat_frac`` (``dyntrain.data.quality``);
  4. optional quality filter (thresholds on named no-reference scores; built-in sharpness and
     noise, plus a user hook);
  5. encode as JPEG (4:4:4, quality 95 by default) or PNG, and decode the encoded bytes once more so
     that nothing undecodable reaches a shard.

Output (``OUT`` is a folder or ``s3://bucket/prefix``):
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

import argparse
import concurrent.futures as cf
import datetime
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image, ImageOps

from . import s3
from .quality import QualityFilter, flat_fraction
from .s3 import DataSourceError, is_s3, join_url

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MANIFEST = "manifest.json"
PATCH_LIST = "patches.jsonl"
INDEX_VERSION = "v1.2"
BUILDER_VERSION = 1


@dataclass
class ShardBuildConfig:
    """Args:
    patch_size: side of the square, non-overlapping patches.
    shard_samples: samples per shard (the last shard holds the rest).
    image_format: "jpg" (high-quality JPEG) or "png" (lossless).
    jpeg_quality: JPEG quality when image_format is "jpg" (chroma kept at full resolution, 4:4:4).
    flat_block / flat_threshold / max_flat_frac: the flat-region detector (see quality.py): a
        patch is dropped when more than max_flat_frac of its flat_block cells have an RMS luminance
        gradient below flat_threshold.
    quality_min / quality_max: score name -> bound for the quality filter ("sharpness", "noise", or
        any score the hook returns); empty = no quality filter.
    quality_hook: "module:function" returning extra scores for a patch (e.g. NIQE/BRISQUE/NIMA).
    workers: processes decoding and cutting images (0 = all CPUs).
    prefix: shard file prefix.
    max_image_pixels: PIL's decompression-bomb limit (very large photographs are legitimate).
    """
    patch_size: int = 512
    shard_samples: int = 1000
    image_format: str = "jpg"
    jpeg_quality: int = 95
    flat_block: int = 16
    flat_threshold: float = 4.0
    max_flat_frac: float = 0.5
    quality_min: dict[str, float] = field(default_factory=dict)
    quality_max: dict[str, float] = field(default_factory=dict)
    quality_hook: Optional[str] = None
    workers: int = 0
    prefix: str = "shard"
    max_image_pixels: int = 2_000_000_000

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be >= 8, got {self.patch_size}")
        if self.shard_samples < 1:
            raise ValueError(f"shard_samples must be >= 1, got {self.shard_samples}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.max_flat_frac <= 1.0:
            raise ValueError(f"max_flat_frac must lie in [0, 1], got {self.max_flat_frac}")
        if self.flat_block < 2 or self.flat_block > self.patch_size:
            raise ValueError(f"flat_block must lie in 2..patch_size, got {self.flat_block}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ValueError(f"prefix may hold letters, digits, '_' and '-' only, got {self.prefix!r}")

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("workers")
        return d


# ------------------------------------------------------------------------------ sources & keys
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
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        else:
            raise DataSourceError(f"source folder not found: {src}")
        for f in found:
            key = str(f.resolve())
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def sample_key(image_index: int, row: int, col: int) -> str:
    return f"{image_index:07d}_{row:03d}_{col:03d}"


def patch_grid(height: int, width: int, patch: int) -> list[tuple[int, int, int, int]]:
    """(row, col, y, x) of the non-overlapping patches of a grid centred in the image."""
    rows, cols = height // patch, width // patch
    oy, ox = (height - rows * patch) // 2, (width - cols * patch) // 2
    return [(r, c, oy + r * patch, ox + c * patch) for r in range(rows) for c in range(cols)]


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode a whole image to (H, W, 3) uint8 RGB; raises on any decoding problem."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / 257.0 if arr.max() > 255 else arr
            im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def encode(patch: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(patch)
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, "PNG", compress_level=3)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:  # never write what cannot be decoded again
        check.load()
    return data


# ------------------------------------------------------------------------------------ workers
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: ShardBuildConfig) -> None:
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    _WORKER["cfg"] = cfg
    _WORKER["quality"] = QualityFilter(minimum=cfg.quality_min, maximum=cfg.quality_max,
                                       hook_spec=cfg.quality_hook)


def process_image(task: tuple[int, str]) -> dict[str, Any]:
    """Cut one image into kept patches. Never raises for a bad image: reports it instead."""
    index, path = task
    cfg: ShardBuildConfig = _WORKER["cfg"]
    qf: QualityFilter = _WORKER["quality"]
    result: dict[str, Any] = {"index": index, "path": path, "patches": [], "dropped": {}}
    try:
        rgb = load_rgb(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt"
        result.update(status="corrupt", error=f"{type(exc).__name__}: {exc}")
        return result
    h, w = rgb.shape[:2]
    result["size"] = [w, h]
    grid = patch_grid(h, w, cfg.patch_size)
    if not grid:
        result["status"] = "too_small"
        return result
    result["status"] = "ok"
    result["total"] = len(grid)
    p = cfg.patch_size
    check_quality = bool(cfg.quality_min or cfg.quality_max or cfg.quality_hook)
    for row, col, y, x in grid:
        patch = np.ascontiguousarray(rgb[y:y + p, x:x + p])
        flat = flat_fraction(patch, cfg.flat_block, cfg.flat_threshold)
        if flat > cfg.max_flat_frac:
            result["dropped"]["flat"] = result["dropped"].get("flat", 0) + 1
            continue
        scores = qf.scores(patch)
        if check_quality:
            failed = qf.check(scores)
            if failed is not None:
                reason = f"quality:{failed}"
                result["dropped"][reason] = result["dropped"].get(reason, 0) + 1
                continue
        key = sample_key(index, row, col)
        meta = {"key": key, "source": path, "x": x, "y": y, "row": row, "col": col,
                "patch_size": p, "image_width": w, "image_height": h,
                "flat_frac": round(flat, 4), "scores": scores, "format": cfg.image_format}
        result["patches"].append((key, encode(patch, cfg.image_format, cfg.jpeg_quality), meta))
    return result


# ------------------------------------------------------------------------------- tar & index
def write_tar(path: Path, samples: list[tuple[str, bytes, dict]], image_ext: str) -> None:
    """A deterministic WebDataset tar: ``key.<image_ext>`` then ``key.json`` per sample."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, data, meta in samples:
            for name, payload in ((f"{key}.{image_ext}", data),
                                  (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(payload))


def make_index(tar_path: str | Path) -> str:
    """The DALI webdataset index (v1.2) of a tar: one line per sample, components in tar order."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name[m.name.rfind("/") + 1:]
            dot = base.find(".")
            if dot <= 0:
                continue
            stem = m.name[: m.name.rfind("/") + 1 + dot]
            ext = base[dot + 1:]
            if stem != last:
                samples.append([])
                last = stem
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    if not samples:
        raise ValueError(f"{tar_path}: empty shard")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) for comps in samples]
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Index text -> {sample key: {ext: (offset, size)}}."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError("not a DALI webdataset index (v1.x header missing)")
    step = 4 if lines[0].startswith("v1.2") else 3  # v1.2 names every component
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for ordinal, line in enumerate(lines[1:]):
        tok = line.split()
        if not tok:
            continue
        comps: dict[str, tuple[int, int]] = {}
        key = str(ordinal)
        for i in range(0, len(tok) - step + 1, step):
            comps[tok[i]] = (int(tok[i + 1]), int(tok[i + 2]))
            if step == 4:
                name = tok[i + 3]
                key = name[name.rfind("/") + 1:].split(".", 1)[0]
        out[key] = comps
    return out


# ---------------------------------------------------------------------------------- output
class ShardOutput:
    """A local folder or an s3:// prefix; files are published atomically."""

    def __init__(self, out: str) -> None:
        self.url = out.rstrip("/") if is_s3(out) else str(Path(out))
        self.remote = is_s3(out)
        if self.remote:
            s3.check_bucket(self.url)
            self.tmp = Path(tempfile.mkdtemp(prefix="make_shards-"))
        else:
            Path(self.url).mkdir(parents=True, exist_ok=True)
            self.tmp = Path(self.url)

    def remove_leftovers(self, prefix: str) -> None:
        """Delete the staging files of a run that was killed (local output only)."""
        if self.remote:
            return
        ours = re.compile(rf"^\.({re.escape(prefix)}-\d{{6}}\.(tar|idx)|{MANIFEST}|{PATCH_LIST})"
                          rf"\.tmp-\d+$")
        for stale in Path(self.url).iterdir():
            if ours.match(stale.name):
                stale.unlink(missing_ok=True)

    def url_of(self, name: str) -> str:
        return join_url(self.url, name)

    def staging(self, name: str) -> Path:
        return self.tmp / f".{name}.tmp-{os.getpid()}"

    def publish(self, staged: Path, name: str) -> None:
        if self.remote:
            s3.upload_file(staged, self.url_of(name))
            staged.unlink(missing_ok=True)
        else:
            os.replace(staged, Path(self.url) / name)

    def write_text(self, name: str, text: str) -> None:
        staged = self.staging(name)
        staged.write_text(text)
        self.publish(staged, name)

    def read_text(self, name: str) -> Optional[str]:
        url = self.url_of(name)
        if not s3.exists(url):
            return None
        return s3.read_bytes(url).decode()

    def list_names(self) -> list[str]:
        if self.remote:
            prefix = self.url + "/"
            return [u[len(prefix):] for u, _ in s3.list_objects(prefix) if "/" not in u[len(prefix):]]
        return [p.name for p in Path(self.url).iterdir() if p.is_file()]

    def remove(self, name: str) -> None:
        if self.remote:
            s3.delete(self.url_of(name))
        else:
            (Path(self.url) / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _Progress:
    def __init__(self, total: int, enabled: bool, every: float = 2.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, kept: int, dropped: int, shards: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        print(f"[make_shards] images {done}/{self.total} ({rate:.1f}/s, ETA {eta_s}) | patches kept "
              f"{kept} dropped {dropped} | shards {shards}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ builder
def _fingerprint(cfg: ShardBuildConfig, sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "cfg": cfg.fingerprint_dict()},
                        sort_keys=True).encode())
    for p in sources:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_shards(srcs: list[str | Path], out: str, cfg: Optional[ShardBuildConfig] = None,
                 force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build the shards of ``srcs`` into ``out`` (folder or s3:// prefix). Returns the manifest."""
    cfg = cfg or ShardBuildConfig()
    QualityFilter(minimum=cfg.quality_min, maximum=cfg.quality_max,
                  hook_spec=cfg.quality_hook)  # a bad hook fails here, not in every worker
    sources = list_sources(srcs)
    fingerprint = _fingerprint(cfg, sources)
    output = ShardOutput(str(out))
    try:
        output.remove_leftovers(cfg.prefix)
        if not force:
            old = output.read_text(MANIFEST)
            if old is not None:
                try:
                    manifest = json.loads(old)
                except json.JSONDecodeError:
                    manifest = {}
                names = set(output.list_names())
                if manifest.get("fingerprint") == fingerprint and all(
                        s["name"] in names and s["index"] in names for s in manifest.get("shards", [])):
                    if progress:
                        print(f"[make_shards] {output.url} is up to date "
                              f"({manifest['num_samples']} samples in {manifest['num_shards']} shards)",
                              file=sys.stderr)
                    manifest["up_to_date"] = True
                    return manifest
        return _build(sources, output, cfg, fingerprint, progress)
    finally:
        output.close()


def _build(sources: list[Path], output: ShardOutput, cfg: ShardBuildConfig, fingerprint: str,
           progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(sources))) if sources else 1
    counts: dict[str, Any] = {"images_found": len(sources), "images_used": 0,
                              "images_too_small": 0, "images_corrupt": 0,
                              "patches_total": 0, "patches_kept": 0, "patches_dropped": {}}
    corrupt: list[dict[str, str]] = []
    too_small: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    pending: list[tuple[str, bytes, dict]] = []
    patch_lines: list[str] = []
    uploads: list[cf.Future] = []
    pool_io = cf.ThreadPoolExecutor(max_workers=2)
    bar = _Progress(len(sources), progress)

    def flush() -> None:
        if not pending:
            return
        n = len(shards)
        name, index_name = f"{cfg.prefix}-{n:06d}.tar", f"{cfg.prefix}-{n:06d}.idx"
        staged = output.staging(name)
        write_tar(staged, pending, cfg.image_format)
        index_text = make_index(staged)
        staged_idx = output.staging(index_name)
        staged_idx.write_text(index_text)
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()
        shards.append({"name": name, "index": index_name, "samples": len(pending),
                       "bytes": staged.stat().st_size, "sha256": digest,
                       "first_key": pending[0][0], "last_key": pending[-1][0]})
        for key, _data, meta in pending:
            patch_lines.append(json.dumps({"shard": name, **meta}, sort_keys=True))

        def publish(staged=staged, name=name, staged_idx=staged_idx, index_name=index_name):
            output.publish(staged, name)
            output.publish(staged_idx, index_name)
        uploads.append(pool_io.submit(publish))
        pending.clear()

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    tasks = [(i, str(p)) for i, p in enumerate(sources)]
    pool = None
    try:
        if workers == 1:
            _init_worker(cfg)
            results: Iterable[dict] = map(process_image, tasks)
        else:
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,))
            results = pool.imap(process_image, tasks, chunksize=1)
        for done, res in enumerate(results, 1):
            status = res["status"]
            if status == "corrupt":
                counts["images_corrupt"] += 1
                corrupt.append({"path": res["path"], "error": res["error"]})
            elif status == "too_small":
                counts["images_too_small"] += 1
                too_small.append({"path": res["path"], "size": res["size"]})
            else:
                counts["images_used"] += 1
                counts["patches_total"] += res["total"]
                for reason, n in res["dropped"].items():
                    counts["patches_dropped"][reason] = counts["patches_dropped"].get(reason, 0) + n
                for item in res["patches"]:
                    pending.append(item)
                    counts["patches_kept"] += 1
                    if len(pending) >= cfg.shard_samples:
                        flush()
            for f in [u for u in uploads if u.done()]:
                f.result()  # surface an upload error now
            bar.update(done, counts["patches_kept"], sum(counts["patches_dropped"].values()),
                       len(shards))
        flush()
        if pool is not None:
            pool.close()
            pool.join()
        for f in uploads:
            f.result()
    finally:
        pool_io.shutdown(wait=True)
        if pool is not None:
            pool.terminate()
    bar.update(len(sources), counts["patches_kept"], sum(counts["patches_dropped"].values()),
               len(shards), force=True)

    output.write_text(PATCH_LIST, "\n".join(patch_lines) + ("\n" if patch_lines else ""))
    manifest = {
        "format": "dyntrain-shards", "builder_version": BUILDER_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "sources": [str(s) for s in sources],
        "settings": asdict(cfg),
        "counts": counts,
        "skipped_images": {"corrupt": corrupt, "too_small": too_small},
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "patch_list": PATCH_LIST,
        "index_format": f"DALI webdataset index {INDEX_VERSION}, <shard stem>.idx beside each shard",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    output.write_text(MANIFEST, json.dumps(manifest, indent=1))
    # shards of an earlier build that this manifest does not list
    keep = {s["name"] for s in shards} | {s["index"] for s in shards}
    pattern = re.compile(rf"^{re.escape(cfg.prefix)}-\d{{6}}\.(tar|idx)$")
    removed = [n for n in output.list_names() if pattern.match(n) and n not in keep]
    for name in removed:
        output.remove(name)
    manifest["removed_stale"] = removed
    if progress:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(counts["patches_dropped"].items())) or "none"
        print(f"[make_shards] wrote {manifest['num_samples']} samples in {len(shards)} shards to "
              f"{output.url} in {manifest['seconds']:.1f}s | images used {counts['images_used']}, "
              f"too small {counts['images_too_small']}, corrupt {counts['images_corrupt']} | "
              f"patches dropped: {dropped}", file=sys.stderr)
    return manifest


# --------------------------------------------------------------------------------------- CLI
def _threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Cut photographs into patches, filter flat/low-quality ones, write WebDataset "
                    "shards with DALI indices and a manifest to a folder or s3://bucket/prefix.")
    p.add_argument("--src", action="append", required=True, metavar="DIR",
                   help="image folder (recursive); repeat for several")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_URL")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--shard-samples", type=int, default=1000, metavar="N")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg",
                   help="jpg = high-quality JPEG (4:4:4), png = lossless")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--flat-block", type=int, default=16, help="cell side of the flat detector")
    p.add_argument("--flat-threshold", type=float, default=4.0,
                   help="RMS luminance gradient (8-bit levels/pixel) below which a cell is flat")
    p.add_argument("--max-flat-frac", type=float, default=0.5,
                   help="drop a patch whose flat fraction exceeds this")
    p.add_argument("--min-sharpness", type=float, default=None,
                   help="drop patches whose Laplacian variance is below this")
    p.add_argument("--max-noise", type=float, default=None,
                   help="drop patches whose estimated noise sigma (8-bit levels) exceeds this")
    p.add_argument("--quality-hook", default=None, metavar="MODULE:FUNCTION",
                   help="callable(rgb uint8 HxWx3) -> {score: value} adding quality scores")
    p.add_argument("--quality-min", type=_threshold, action="append", default=[], metavar="NAME=V")
    p.add_argument("--quality-max", type=_threshold, action="append", default=[], metavar="NAME=V")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all CPUs)")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    qmin, qmax = dict(args.quality_min), dict(args.quality_max)
    if args.min_sharpness is not None:
        qmin["sharpness"] = args.min_sharpness
    if args.max_noise is not None:
        qmax["noise"] = args.max_noise
    try:
        cfg = ShardBuildConfig(patch_size=args.patch_size, shard_samples=args.shard_samples,
                               image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                               flat_block=args.flat_block, flat_threshold=args.flat_threshold,
                               max_flat_frac=args.max_flat_frac, quality_min=qmin,
                               quality_max=qmax, quality_hook=args.quality_hook,
                               workers=args.workers, prefix=args.prefix)
        manifest = build_shards(args.src, args.out, cfg, force=args.force, progress=not args.quiet)
    except (DataSourceError, ValueError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "num_shards": manifest["num_shards"],
                      "num_samples": manifest["num_samples"], "counts": manifest["counts"]}))
    return 0
