"""Synthetic "photographs" for tests and the quickstart: smooth illumination, band-limited texture,
sharp-edged shapes, oriented gratings and some flat regions - deterministic by seed, fast (numpy +
PIL; a 1024x768 image takes a few tens of milliseconds).

The flat regions are real: a constant-colour rectangle covering roughly 10-35% of the image, so the
shard builder's flat filter has something to drop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Smoothly upsample a small (gh, gw) float grid to (h, w) (bicubic via PIL, per channel)."""
    out = [np.asarray(Image.fromarray(grid[..., c].astype(np.float32), mode="F")
                      .resize((w, h), Image.BICUBIC)) for c in range(grid.shape[-1])]
    return np.stack(out, axis=-1)


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One (height, width, 3) uint8 synthetic photograph."""
    h, w = height, width
    yy = np.arange(h, dtype=np.float32)[:, None]  # (H, 1)
    xx = np.arange(w, dtype=np.float32)[None, :]  # (1, W)
    # smooth illumination: a linear ramp per channel plus low-frequency blobs
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] \
        * rng.uniform(-50, 50, size=3).astype(np.float32)
    img = base + ramp + _upsample(rng.normal(0, 25, size=(4, 5, 3)), h, w)
    # band-limited texture at three scales (the finest gives local gradients well above "flat")
    for cell, amp in ((16, 20.0), (4, 14.0), (2, 14.0)):
        gh, gw = max(2, h // cell), max(2, w // cell)
        img += _upsample(rng.normal(0, amp, size=(gh, gw, 3)), h, w)
    # an oriented grating in a random window
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    y1, x1 = y0 + int(rng.integers(h // 4, h // 2)), x0 + int(rng.integers(w // 4, w // 2))
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    wave = 30 * np.sin((2 * np.pi / period) * (np.cos(theta) * xx[:, x0:x1] + np.sin(theta) * yy[y0:y1]))
    img[y0:y1, x0:x1] += wave[..., None]
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 2.0
    img = np.clip(img, 0, 255, out=img).astype(np.uint8)
    # sharp-edged shapes
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(6, 14))):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        rx, ry = rng.integers(8, max(9, w // 8)), rng.integers(8, max(9, h // 8))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = [int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    img = np.array(pil)
    # a flat region (sky, wall): one constant colour
    fh, fw = int(h * rng.uniform(0.3, 0.6)), int(w * rng.uniform(0.3, 0.6))
    fy, fx = int(rng.integers(0, h - fh + 1)), int(rng.integers(0, w - fw + 1))
    img[fy:fy + fh, fx:fx + fw] = rng.integers(0, 256, size=3).astype(np.uint8)
    return img


def write_synthetic_images(folder: str | Path, n: int, size: Sequence[int] = (768, 1024),
                           seed: int = 0, fmt: str = "jpg", quality: int = 95) -> list[Path]:
    """Write ``n`` synthetic photographs of ``size = (H, W)`` to ``folder`` as ``img_00000.<fmt>``
    (jpg at ``quality``, or png); image i depends only on (seed, i). Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = int(size[0]), int(size[1])
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img = Image.fromarray(synthetic_image(rng, height, width))
        path = folder / f"img_{i:05d}.{fmt}"
        if fmt in ("jpg", "jpeg"):
            img.save(path, "JPEG", quality=quality, subsampling=0)
        else:
            img.save(path)
        paths.append(path)
    return paths
