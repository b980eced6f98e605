"""Image files: the one list of extensions, folder listing, reading to 8-bit RGB, and the one
conversion of such an image to a model input (``to_tensor``).

Used by the shard builder, the fine-tuning data, evaluation and inference, so every part of the
system accepts the same files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


# file suffixes (lower case) that count as images everywhere in dyntrain
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# the Pillow decoders of those files (JPEG's also opens a camera's MPO); no other decoder ever runs
# (an EPS file named .png would otherwise start Ghostscript where it is installed)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def is_image(path: str | Path) -> bool:
    """Whether ``path`` names an image file by its suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTS


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image(p))


def open_image(src) -> Image.Image:
    """``Image.open`` of a path or file object with only the ``IMAGE_FORMATS`` decoders."""
    return Image.open(src, formats=IMAGE_FORMATS)


def decode_rgb(src) -> Image.Image:
    """Decode a whole image (a path or file object) to an 8-bit RGB Pillow image, EXIF orientation
    applied; 16-bit and float grey images are scaled to 8 bits. Raises OSError (or ValueError) when
    the file does not decode. (The shard builder cuts and encodes its patches from this image.)"""
    with open_image(src) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # (not in place it copies an upright image)
        if img.mode in _HIGH_DEPTH_MODES:
            arr = np.asarray(img, dtype=np.float32)
            arr = arr / 257.0 if arr.max() > 255 else arr
            img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
        if img.mode != "RGB":  # convert("RGB") of an RGB image is a copy
            img = img.convert("RGB")
        return img  # decoded: closing the file keeps the pixels


def read_image(path: str | Path) -> np.ndarray:
    """``decode_rgb`` as an (H, W, 3) uint8 array."""
    return np.ascontiguousarray(np.asarray(decode_rgb(path)))


def to_tensor(img: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1] on ``device`` (a copy: ``img`` is untouched)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(device).float().div_(255.0)
