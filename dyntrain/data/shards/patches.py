"""The shard builder's per-image work: cut a photograph into patches, filter them, encode them.

Per image (run in the builder's process pool):
  1. decode fully (``dyntrain.images.decode_rgb``: EXIF orientation applied, 8-bit RGB); an
     unreadable or corrupt file is reported, not raised; an image smaller than one patch likewise,
     and one larger than ``max_decoded_pixels`` (checked on the header, before decoding);
  2. cut into non-overlapping ``patch_size`` squares on a grid centred in the image (Pillow crops);
  3. drop a patch whose flat fraction exceeds ``max_flat_frac`` (``dyntrain.data.shards.quality``,
     on the patch's 8-bit luma);
  4. optional quality filter (thresholds on named no-reference scores; built-in sharpness and
     noise, plus a user hook);
  5. encode as JPEG (4:4:4, quality 95 by default) or PNG and check the bytes: a JPEG's structure
     always (``check_jpeg_structure``), a decode of the first kept patch of each image and of every
     PNG (``check_decodes``); why that is as safe as decoding every patch: docs/data.md.
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from dyntrain.data.shards.quality import PatchLuma, QualityFilter, flat_fraction
from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3
from dyntrain.images import decode_rgb, open_image


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


def encode(patch: Image.Image | np.ndarray, image_format: str, quality: int,
           full_check: bool = True) -> bytes:
    """A patch (a Pillow image or an (H, W, 3) uint8 array) as JPEG (4:4:4) or PNG bytes, checked:
    a JPEG's structure always (``check_jpeg_structure``) and, with ``full_check``, a decode
    (``check_decodes``); a PNG is always decoded."""
    img = patch if isinstance(patch, Image.Image) else Image.fromarray(patch)
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, "PNG", compress_level=3)
    data = buf.getvalue()
    if image_format == "jpg":
        check_jpeg_structure(data, img.width, img.height)
    if full_check or image_format != "jpg":
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


_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman: what Pillow's encoder writes


def check_jpeg_structure(data: bytes, width: int, height: int) -> None:
    """Raise OSError unless ``data`` is one whole sequential JPEG of ``width`` x ``height`` with 3
    components: SOI first, a chain of marker segments whose lengths land on the next marker, a
    frame header of that size, one scan, EOI last, and in the scan every 0xFF byte stuffed (0xFF00)
    or a restart marker where the header declared a restart interval. A truncated, cut or
    overwritten stream, a stray marker or a frame of another size fails; the Huffman codes
    themselves are only checked by a decode (``check_decodes``)."""
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        raise OSError(f"JPEG of {n} bytes: no SOI at the start or no EOI at the end")
    pos, frame, restart = 2, None, False
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            raise OSError(f"JPEG: no marker segment at byte {pos} of {n}")
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n - 2:
            raise OSError(f"JPEG: marker 0x{marker:02x} at byte {pos} runs past the end")
        if marker in _SOF and length >= 8:
            frame = (int.from_bytes(data[pos + 5:pos + 7], "big"),
                     int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9])
        elif marker == 0xDD:  # DRI: a restart interval
            restart = int.from_bytes(data[pos + 4:pos + 6], "big") > 0
        elif marker == 0xDA:  # SOS: the scan runs from the end of its header to EOI
            break
        elif not (0xE0 <= marker <= 0xEF or marker in (0xDB, 0xC4, 0xFE)):
            raise OSError(f"JPEG: unexpected marker 0x{marker:02x} at byte {pos}")
        pos = end
    if frame != (height, width, 3):
        raise OSError(f"JPEG: frame {frame} (height, width, components), expected {(height, width, 3)}")
    scan = np.frombuffer(data, np.uint8, n - 2 - end, end)
    at = np.flatnonzero(scan == 0xFF)
    if at.size:
        after = scan[np.minimum(at + 1, scan.size - 1)]
        bad = (after != 0) | (at + 1 == scan.size)   # a 0xFF ending the scan is not stuffed
        if restart:
            bad &= ~((after >= 0xD0) & (after <= 0xD7))
        if bad.any():
            raise OSError(f"JPEG: an unstuffed 0xFF in the scan at byte {end + int(at[bad.argmax()])}")


# ------------------------------------------------------------------------------------ workers
_WORKER: dict[str, Any] = {}


def init_worker(cfg: ShardBuildConfig) -> None:
    """Per worker process: PIL's pixel limit, the settings and the quality filter."""
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    _WORKER["cfg"] = cfg
    _WORKER["quality"] = cfg.quality_filter()


def decode_capped(path: str, cap: int) -> tuple[Optional[Image.Image], list[int]]:
    """(RGB image, [width, height]) of a local file or s3:// object; the image is None (not decoded)
    when the header says it has more than ``cap`` pixels."""
    src: Any = io.BytesIO(s3.read_bytes(path)) if is_s3(path) else path
    with open_image(src) as im:
        w, h = im.size
    if w * h > cap:
        return None, [w, h]
    if not isinstance(src, str):
        src.seek(0)
    return decode_rgb(src), [w, h]


def process_image(task: tuple[int, str, dict]) -> dict[str, Any]:
    """Cut one image into kept patches. Never raises for a bad image: reports it instead.
    ``task``: (image index, local path or s3:// URL, provenance fields for the patches' JSON)."""
    index, path, prov = task
    cfg: ShardBuildConfig = _WORKER["cfg"]
    qf: QualityFilter = _WORKER["quality"]
    result: dict[str, Any] = {"index": index, "path": path, "patches": [], "dropped": {}}
    try:
        img, result["size"] = decode_capped(path, cfg.max_decoded_pixels)
    except DataSourceError:
        raise  # an unreachable object is I/O, not a corrupt image
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt"
        result.update(status="corrupt", error=f"{type(exc).__name__}: {exc}")
        return result
    if img is None:
        result["status"] = "too_large"
        return result
    img.info = {}  # the source's metadata (a JPEG comment above all) stays out of the patches
    w, h = img.size
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
        tile = img.crop((x, y, x + p, y + p))
        patch_luma = PatchLuma(np.asarray(tile.convert("L")))  # quality.luma8, by Pillow
        flat = flat_fraction(patch_luma, cfg.flat_block, cfg.flat_threshold)
        if flat > cfg.max_flat_frac:
            result["dropped"]["flat"] = result["dropped"].get("flat", 0) + 1
            continue
        scores = qf.scores(np.array(tile) if qf.hook is not None else None, patch_luma)
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
        # every JPEG's structure is checked; the first kept patch of each image is also decoded
        data = encode(tile, cfg.image_format, cfg.jpeg_quality, full_check=not result["patches"])
        result["patches"].append((key, data, meta))
    return result
