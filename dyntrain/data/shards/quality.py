"""Patch filters for the shard builder: the flat-region detector and no-reference quality scores.

Flat regions. A patch is cut into ``block x block`` cells (16 px by default; a remainder at the
right/bottom edge is ignored). A cell is *flat* when the RMS of its luminance gradient, measured
with forward differences that stay inside the cell, is below ``threshold`` (8-bit levels per pixel):

    rms = sqrt(mean(dx^2) + mean(dy^2))

Why this definition: a restoration model learns nothing from a cell without structure, and such a
cell is exactly one whose local gradients are small. Pure sensor noise of standard deviation s has
rms = 2 s, so the default threshold 4 calls "flat" anything whose only variation is noise up to
s ~ 2 levels; a smooth illumination ramp of slope g levels/pixel has rms = g, so skies and walls
count as flat even when their brightness drifts across the patch (a cell's standard deviation would
not); textures (foliage, fabric, text) sit well above 10. Keeping the differences inside each cell
makes the measure local: an edge on a cell border does not leak into the flat neighbour, so a patch
whose left k of n cell columns are flat measures exactly k/n.
The builder drops a patch when its flat fraction exceeds ``max_flat_frac`` (0.5 by default).

Quality. Two cheap no-reference measures need no downloaded weights:
  * ``sharpness`` - variance of the 4-neighbour Laplacian of the luminance (higher = sharper; a
    classic focus measure, Pech-Pacheco et al. 2000);
  * ``noise`` - Immerkaer's (1996) fast noise estimate: sigma in 8-bit levels from the mean absolute
    response to a Laplacian-difference mask that cancels locally linear structure.
A hook ``callable(rgb_uint8_HxWx3) -> dict[str, float]`` can add further scores (the paper's
NIQE/BRISQUE/NIMA consensus, e.g. via pyiqa); :class:`QualityFilter` applies min/max thresholds to any
score by name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


ScoreHook = Callable[[np.ndarray], dict]


_W601 = np.array([0.299, 0.587, 0.114], np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32 luma (BT.601 weights), 0..255; a 2-D array is taken as the
    luma already (the builder computes it once per patch for every measure)."""
    if rgb.ndim == 2:
        return rgb
    if rgb.dtype == np.uint8:  # each channel cast inside its product: no (H, W, 3) float copy
        y = np.multiply(rgb[..., 0], _W601[0], dtype=np.float32)
        y += np.multiply(rgb[..., 1], _W601[1], dtype=np.float32)
        y += np.multiply(rgb[..., 2], _W601[2], dtype=np.float32)
        return y  # the same float32 roundings, in the same order, as the general form below
    x = rgb.astype(np.float32)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def block_gradient_rms(lum: np.ndarray, block: int) -> np.ndarray:
    """(H, W) luma -> (H // block, W // block) RMS gradient per cell (differences inside cells)."""
    nh, nw = lum.shape[0] // block, lum.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(f"patch {lum.shape} is smaller than one {block}x{block} cell")
    cells = lum[: nh * block, : nw * block].reshape(nh, block, nw, block)  # (nh, b, nw, b)
    dx = np.diff(cells, axis=3)  # new contiguous arrays: squared in place, no further copies
    dy = np.diff(cells, axis=1)
    ms = np.multiply(dx, dx, out=dx).mean(axis=(1, 3))
    ms += np.multiply(dy, dy, out=dy).mean(axis=(1, 3))
    return np.sqrt(ms, out=ms)


def flat_fraction(rgb: np.ndarray, block: int = 16, threshold: float = 4.0) -> float:
    """Fraction of a patch's cells that are flat (see the module docstring)."""
    rms = block_gradient_rms(luminance(rgb), block)
    return float((rms < threshold).mean())


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (8-bit units squared)."""
    y = luminance(rgb)
    lap = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]) - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def noise_sigma(rgb: np.ndarray) -> float:
    """Immerkaer's noise standard deviation estimate (8-bit levels)."""
    if rgb.dtype == np.uint8:
        return noise_sigma_8bit(luminance(rgb))
    y = luminance(rgb).astype(np.float64)
    h, w = y.shape
    # mask [[1,-2,1],[-2,4,-2],[1,-2,1]]
    r = (y[:-2, :-2] - 2 * y[:-2, 1:-1] + y[:-2, 2:]
         - 2 * y[1:-1, :-2] + 4 * y[1:-1, 1:-1] - 2 * y[1:-1, 2:]
         + y[2:, :-2] - 2 * y[2:, 1:-1] + y[2:, 2:])
    return float(np.sqrt(np.pi / 2.0) * np.abs(r).sum() / (6.0 * (w - 2) * (h - 2)))


def noise_sigma_8bit(luma: np.ndarray) -> float:
    """``noise_sigma`` of an 8-bit image from its ``luminance`` (a view is fine), bit for bit, at
    about half the cost: the mask is separable (second differences along x, then along y: four
    passes of first differences instead of nine shifted, scaled terms). Exact, not approximately
    equal: ``luminance`` of 8-bit values gives float32 multiples of 2^-27 below 256, so every
    partial sum of the mask (|sum| < 16 * 256) needs at most 40 of float64's 53 bits and any order
    of evaluation gives the same residual; the final sum runs over the same contiguous
    (H-2, W-2) array as the nine-term form, so it adds in the same order."""
    y = luma.astype(np.float64)
    h, w = y.shape
    e = y[:, :-1] - y[:, 1:]
    e = e[:, :-1] - e[:, 1:]      # [1, -2, 1] along x
    e = e[:-1] - e[1:]
    r = e[:-1] - e[1:]            # then along y: the mask [[1,-2,1],[-2,4,-2],[1,-2,1]]
    return float(np.sqrt(np.pi / 2.0) * np.abs(r, out=r).sum() / (6.0 * (w - 2) * (h - 2)))


BUILTIN_SCORES: dict[str, Callable[[np.ndarray], float]] = {
    "sharpness": sharpness,
    "noise": noise_sigma,
}


def load_hook(spec: str) -> ScoreHook:
    """``"package.module:function"`` -> the callable (for ``--quality-hook``)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"quality hook {spec!r}: expected 'module:function'")
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if not callable(fn):
        raise ValueError(f"quality hook {spec!r}: {fn_name} is not a callable in {mod_name}")
    return fn


@dataclass
class QualityFilter:
    """Thresholds on named scores. ``minimum``/``maximum``: score name -> bound; a patch whose score
    falls outside is dropped with reason ``quality:<name>``. Built-in scores (sharpness, noise)
    are always computed and recorded; ``hook`` adds more."""
    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    hook: Optional[ScoreHook] = None
    hook_spec: Optional[str] = None

    def __post_init__(self) -> None:
        if self.hook is None and self.hook_spec:
            self.hook = load_hook(self.hook_spec)

    def scores(self, rgb: np.ndarray, luma: Optional[np.ndarray] = None) -> dict[str, float]:
        """Built-in scores (from ``luma`` = ``luminance(rgb)`` when given) and the hook's (from
        ``rgb``, made contiguous)."""
        y = luminance(rgb) if luma is None else luma
        fns = dict(BUILTIN_SCORES)
        if rgb.dtype == np.uint8:  # the same number, the faster way (see noise_sigma_8bit)
            fns["noise"] = noise_sigma_8bit
        out = {name: round(fn(y), 4) for name, fn in fns.items()}
        if self.hook is not None:
            extra = self.hook(np.ascontiguousarray(rgb))
            out.update({str(k): float(v) for k, v in dict(extra).items()})
        return out

    def check(self, scores: dict[str, float]) -> Optional[str]:
        """None when the patch passes, else the name of the first failing score."""
        for name, lo in self.minimum.items():
            if name not in scores:
                raise KeyError(f"quality threshold on unknown score {name!r} (have {sorted(scores)})")
            if scores[name] < lo:
                return name
        for name, hi in self.maximum.items():
            if name not in scores:
                raise KeyError(f"quality threshold on unknown score {name!r} (have {sorted(scores)})")
            if scores[name] > hi:
                return name
        return None

    def to_dict(self) -> dict:
        return {"minimum": dict(self.minimum), "maximum": dict(self.maximum),
                "hook": self.hook_spec}
