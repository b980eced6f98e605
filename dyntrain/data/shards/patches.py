"""The shard builder's per-image work: cut a photograph into patches, filter them, encode them.

Per image (run in the builder's process pool):
  1. decode fully (``dyntrain.images.read_image``: EXIF orientation applied, 8-bit RGB); an
     unreadable or corrupt file is reported, not raised; an image smaller than one patch likewise,
     and one larger than ``max_decoded_pixels`` (checked on the header, before decoding);
  2. cut into non-overlapping ``patch_size`` squares on a grid centred in the image;
  3. drop a patch whose flat fraction exceeds ``max_flat_frac`` (``dyntrain.data.shards.quality``);
  4. optional quality filter (thresholds on named no-reference scores; built-in sharpness and
     noise, plus a user hook);
  5. encode as JPEG (4:4:4, quality 95 by default) or PNG, and decode the encoded bytes once more so
     that nothing undecodable reaches a shard (a JPEG at 1/8 scale: ``check_decodes``).
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from dyntrain.data.shards.quality import QualityFilter, flat_fraction, luminance
from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3
from dyntrain.images import open_image, read_image


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
    max_decoded_pixels: images with more pixels (width x height, read from the header before
        decoding) are skipped with the reason ``too_large``. Decoding costs up to ~12 bytes a pixel
        at its peak (the decoded RGB, the orientation and colour conversions), so the default
        200 MP keeps a worker under ~2.4 GB: a node's memory / 2.4 GB workers fit.
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
    max_decoded_pixels: int = 200_000_000

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
        if self.max_decoded_pixels < self.patch_size ** 2:
            raise ValueError(f"max_decoded_pixels must be >= patch_size^2, got {self.max_decoded_pixels}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ValueError(f"prefix may hold letters, digits, '_' and '-' only, got {self.prefix!r}")

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("workers")
        return d

    def quality_filter(self) -> QualityFilter:
        """The quality filter of these settings (loads the hook: a bad hook fails here)."""
        return QualityFilter(minimum=self.quality_min, maximum=self.quality_max,
                             hook_spec=self.quality_hook)


def sample_key(image_index: int, row: int, col: int) -> str:
    return f"{image_index:07d}_{row:03d}_{col:03d}"


def patch_grid(height: int, width: int, patch: int) -> list[tuple[int, int, int, int]]:
    """(row, col, y, x) of the non-overlapping patches of a grid centred in the image."""
    rows, cols = height // patch, width // patch
    oy, ox = (height - rows * patch) // 2, (width - cols * patch) // 2
    return [(r, c, oy + r * patch, ox + c * patch) for r in range(rows) for c in range(cols)]


def encode(patch: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(patch)
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, "PNG", compress_level=3)
    data = buf.getvalue()
    check_decodes(data)
    return data


def check_decodes(data: bytes) -> None:
    """Raise (OSError and the like) unless ``data`` decodes: never write what cannot be decoded
    again. A JPEG is decoded at 1/8 scale (``Image.draft``): libjpeg still parses every marker and
    entropy-decodes every coefficient of every block, the two stages that can fail, and skips the
    full inverse DCT, the upsampling and the colour conversion, which cannot fail (the same
    verdict at about two thirds of the cost). PNG is decoded whole."""
    with Image.open(io.BytesIO(data)) as check:
        if check.format == "JPEG":
            check.draft(check.mode, (max(1, check.width // 8), max(1, check.height // 8)))
        check.load()


# ------------------------------------------------------------------------------------ workers
_WORKER: dict[str, Any] = {}


def init_worker(cfg: ShardBuildConfig) -> None:
    """Per worker process: PIL's pixel limit, the settings and the quality filter."""
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    _WORKER["cfg"] = cfg
    _WORKER["quality"] = cfg.quality_filter()


def decode_capped(path: str, cap: int) -> tuple[Optional[np.ndarray], list[int]]:
    """(RGB image, [width, height]) of a local file or s3:// object; the image is None (not decoded)
    when the header says it has more than ``cap`` pixels."""
    src: Any = io.BytesIO(s3.read_bytes(path)) if is_s3(path) else path
    with open_image(src) as im:
        w, h = im.size
    if w * h > cap:
        return None, [w, h]
    if not isinstance(src, str):
        src.seek(0)
    return read_image(src), [w, h]


def process_image(task: tuple[int, str, dict]) -> dict[str, Any]:
    """Cut one image into kept patches. Never raises for a bad image: reports it instead.
    ``task``: (image index, local path or s3:// URL, provenance fields for the patches' JSON)."""
    index, path, prov = task
    cfg: ShardBuildConfig = _WORKER["cfg"]
    qf: QualityFilter = _WORKER["quality"]
    result: dict[str, Any] = {"index": index, "path": path, "patches": [], "dropped": {}}
    try:
        rgb, result["size"] = decode_capped(path, cfg.max_decoded_pixels)
    except DataSourceError:
        raise  # an unreachable object is I/O, not a corrupt image
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt"
        result.update(status="corrupt", error=f"{type(exc).__name__}: {exc}")
        return result
    if rgb is None:
        result["status"] = "too_large"
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
        patch = rgb[y:y + p, x:x + p]  # a view: copied only when kept (for the encoder)
        luma = luminance(patch)  # once, for the flat detector and the built-in scores
        flat = flat_fraction(luma, cfg.flat_block, cfg.flat_threshold)
        if flat > cfg.max_flat_frac:
            result["dropped"]["flat"] = result["dropped"].get("flat", 0) + 1
            continue
        scores = qf.scores(patch, luma)
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
        if prov:
            meta["provenance"] = prov
        result["patches"].append((key, encode(np.ascontiguousarray(patch), cfg.image_format,
                                              cfg.jpeg_quality), meta))
    return result
