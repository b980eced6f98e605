"""Depth maps for haze: stored beside the clean image under the same name, as ``.npy`` (any float
or integer (H, W) array) or as a 16-bit grey PNG. Without one, haze uses ``weather.depth_proxy``.

A 16-bit PNG that shares its stem with another image of the folder is that image's depth map, not
a clean image (``clean_images`` leaves it out).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from dyntrain.data.finetune.degradations.registry import DegradationError
from dyntrain.images import list_images


def _is_depth_png(path: Path) -> bool:
    if path.suffix.lower() != ".png":
        return False
    with Image.open(path) as img:
        return img.mode in ("I;16", "I;16B", "I;16L", "I")


def clean_images(folder: str | Path) -> list[tuple[Path, Optional[Path]]]:
    """(image, depth map or None) for every clean image under ``folder``, sorted by path."""
    images = list_images(folder)
    by_stem: dict[Path, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.with_suffix(""), []).append(path)
    out = []
    for stem, paths in sorted(by_stem.items()):
        depth_pngs = [p for p in paths if len(paths) > 1 and _is_depth_png(p)]
        npy = stem.with_suffix(".npy")
        depth = npy if npy.is_file() else (depth_pngs[0] if depth_pngs else None)
        out += [(p, depth) for p in paths if p not in depth_pngs]
    return out


def load_depth(path: str | Path, height: int, width: int) -> np.ndarray:
    """The depth map at ``path`` as float32 (H, W) divided by its maximum (d in [0, 1]); raises
    naming the file when it does not decode or its size is not the image's ``height`` x ``width``."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path).astype(np.float32)
        else:
            with Image.open(path) as img:
                depth = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise DegradationError(f"depth map {path}: cannot read it ({exc})") from exc
    if depth.ndim != 2 or depth.shape != (height, width):
        raise DegradationError(f"depth map {path}: shape {depth.shape} does not match its image "
                               f"({height}x{width})")
    peak = float(depth.max())
    if not np.isfinite(depth).all() or peak <= 0:
        raise DegradationError(f"depth map {path}: needs finite values with a positive maximum")
    return depth / peak
