"""Synthetic "photographs" for tests and the quickstart: smooth illumination, band-limited texture,
sharp-edged shapes, oriented gratings and some flat regions - deterministic by seed, fast (numpy +
PIL; a 1024x768 image takes a few tens of milliseconds). Also the fine-tuning demo data
(``make_demo_data``: rain streaks and haze over synthetic photographs, in every folder layout;
``python -m dyntrain.data.finetune.paired demo``).

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


# ------------------------------------------------------------------------------ demo data
def synthetic_rain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bright slanted streaks (3-8 pixels long) over a clean uint8 image."""
    height, width = clean.shape[:2]
    n = max(4, height * width // 60)
    y, x = rng.integers(0, height, n)[:, None], rng.integers(0, width, n)[:, None]
    length = rng.integers(3, 9, n)[:, None]
    t = np.arange(8)[None, :]
    yy, xx = y + t, x + t // 3  # (n, 8) streak pixels
    keep = (t < length) & (yy < height) & (xx < width)
    streaks = np.zeros((height, width), np.float32)
    streaks[yy[keep], xx[keep]] = 0.5
    out = clean.astype(np.float32) / 255 + streaks[..., None]
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def synthetic_haze(clean: np.ndarray, airlight: float, beta: float) -> np.ndarray:
    """Atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d), depth growing upwards."""
    height, width = clean.shape[:2]
    depth = np.linspace(3.0, 0.5, height, dtype=np.float32)[:, None, None] * np.ones((1, width, 1), np.float32)
    t = np.exp(-beta * depth)
    out = clean.astype(np.float32) / 255 * t + airlight * (1 - t)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(img).save(path)


def make_demo_data(out: str | Path, train_images: int = 6, test_images: int = 3, height: int = 48,
                   width: int = 40, seed: int = 0) -> dict[str, str]:
    """Write small synthetic data in every layout: ``out/train`` (Denoise/, Derain/, Dehaze/ as
    ``data.root``) and ``out/test/{bsd68,rain100l,sots}`` (as ``eval.sets``). Returns the eval.sets map.
    Only for trying the pipeline end to end; it says nothing about real restoration quality."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    train, test = out / "train", out / "test"
    for i in range(train_images):
        n = f"{i + 1:04d}"
        _save(synthetic_image(rng, height, width), train / "Denoise" / f"{n}.png")
        clean = synthetic_image(rng, height, width)
        _save(clean, train / "Derain" / "gt" / f"norain-{i + 1}.png")
        _save(synthetic_rain(clean, rng), train / "Derain" / "rainy" / f"rain-{i + 1}.png")
        clean = synthetic_image(rng, height, width)
        _save(clean, train / "Dehaze" / "original" / f"{n}.jpg")
        for airlight, beta in ((0.8, 0.2), (0.9, 0.6)):
            _save(synthetic_haze(clean, airlight, beta), train / "Dehaze" / "synthetic" / "part1" / f"{n}_{airlight}_{beta}.jpg")
    for i in range(test_images):
        n = f"{i + 1:04d}"
        _save(synthetic_image(rng, height + 8, width + 8), test / "bsd68" / f"test{i + 1:03d}.png")
        clean = synthetic_image(rng, height + 8, width + 8)
        _save(clean, test / "rain100l" / "target" / f"{n}.png")
        _save(synthetic_rain(clean, rng), test / "rain100l" / "input" / f"{n}.png")
        clean = synthetic_image(rng, height + 8, width + 8)
        _save(clean, test / "sots" / "outdoor" / "gt" / f"{n}.png")
        _save(synthetic_haze(clean, 0.8, 0.4), test / "sots" / "outdoor" / "hazy" / f"{n}_0.8_0.4.jpg")
    return {name: str(test / name) for name in ("bsd68", "rain100l", "sots")}
