"""Patch filters for the shard builder: the flat-region detector and no-reference quality scores.

Every measure is taken on the 8-bit luma ``Y = (19595 R + 38470 G + 7471 B + 32768) >> 16`` (BT.601
weights rounded to 16 bits, rounded to the nearest level: Pillow's ``convert("L")``, the grey image
that focus and noise measures are classically run on) and is computed exactly: every sum is a sum
of integers, so a measure is the same number on any CPU, numpy build and summation order (parts of
one build run on different nodes and must keep the same patches), and the fast forms below can be
checked against the term-by-term formulas with ``==``.

Flat regions. A patch is cut into ``block x block`` cells (16 px by default; a remainder at the
right/bottom edge is ignored). A cell is *flat* when the RMS of its luma gradient, measured with
forward differences that stay inside the cell, is below ``threshold`` (8-bit levels per pixel):

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
  * ``sharpness`` - variance of the 4-neighbour Laplacian of the luma (higher = sharper; a classic
    focus measure, Pech-Pacheco et al. 2000);
  * ``noise`` - Immerkaer's (1996) fast noise estimate: sigma in 8-bit levels from the mean absolute
    response to a Laplacian-difference mask that cancels locally linear structure.
A hook ``callable(rgb_uint8_HxWx3) -> dict[str, float]`` can add further scores (the paper's
NIQE/BRISQUE/NIMA consensus, e.g. via pyiqa); :class:`QualityFilter` applies min/max thresholds to any
score by name.

Speed (the builder measures every patch of ~2M photographs): a patch's luma is laid out as one
int16 vector, so every difference is one subtraction of two shifted slices (contiguous, 16 lanes per
vector; the luma's differences, its second differences, the Laplacian and Immerkaer's response all
fit in int16), each computed once and shared (:class:`PatchLuma`). Sums run over blocks of rows short
enough that no block sum can overflow its type (int16 for the Laplacian and the absolute responses,
uint32 for the cells' squared gradients, int32 for the squared Laplacian) before the few block sums
are added in int64: exact, whatever the order. About 1 ms per 512x512 patch on one core, against
about 4 for the float32 forms this replaced (``bench/shard_build.py``).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import numpy as np


ScoreHook = Callable[[np.ndarray], dict]


def luma8(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma (Pillow's ``convert("L")``, see the module
    docstring); a 2-D uint8 array is taken as the luma already (the builder has Pillow compute it
    from each patch)."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise TypeError(f"expected an 8-bit (H, W, 3) RGB image or (H, W) luma, got {img.dtype} "
                        f"{img.shape}")
    if img.ndim == 2:
        return img
    y = img[..., 0].astype(np.uint32) * 19595
    y += img[..., 1].astype(np.uint32) * 38470
    y += img[..., 2].astype(np.uint32) * 7471
    y += 32768
    return (y >> 16).astype(np.uint8)


class PatchLuma:
    """A patch's luma as int16, row after row in one contiguous vector with zeros after it, and its
    differences, each computed once and shared by the measures. Every difference is one
    subtraction of two shifted slices of such a vector (an entry whose stencil runs past the end of
    its row is computed and never read), and every result reshapes to rows without a copy.

    ``luma``: a 2-D uint8 array (a view into an image's luma is fine) or 8-bit RGB."""

    __slots__ = ("h", "w", "vec", "_dx", "_dy", "_dxx")

    def __init__(self, luma: np.ndarray) -> None:
        luma = luma8(luma)
        self.h, self.w = h, w = luma.shape
        self.vec = np.empty(h * w + 3 * w + 3, np.int16)
        self.vec[h * w:] = 0                          # room for the shifts
        np.copyto(self.vec[: h * w].reshape(h, w), luma)
        self._dx = self._dy = self._dxx = None

    def rows(self, vec: np.ndarray, n_rows: int) -> np.ndarray:
        """The first ``n_rows`` rows of a vector laid out like the luma, as a 2-D view."""
        return vec[: n_rows * self.w].reshape(n_rows, self.w)

    @property
    def dx(self) -> np.ndarray:
        """Forward differences along rows: at k, pixel k + 1 minus pixel k (|.| <= 255)."""
        if self._dx is None:
            self._dx = self.vec[1:] - self.vec[:-1]
        return self._dx

    @property
    def dy(self) -> np.ndarray:
        """Forward differences down columns: at k, pixel k + W minus pixel k (|.| <= 255)."""
        if self._dy is None:
            self._dy = self.vec[self.w:] - self.vec[:-self.w]
        return self._dy

    @property
    def dxx(self) -> np.ndarray:
        """Second differences along rows: at k, centred on pixel k + 1 (|.| <= 510)."""
        if self._dxx is None:
            if self.h < 3 or self.w < 3:
                raise ValueError(f"patch ({self.h}, {self.w}) is too small for a 3x3 measure")
            self._dxx = self.dx[1:] - self.dx[:-1]
        return self._dxx


def _patch(luma: np.ndarray | PatchLuma) -> PatchLuma:
    return luma if isinstance(luma, PatchLuma) else PatchLuma(luma)


def _sum_int16(view: np.ndarray, max_abs: int) -> int:
    """Exact sum of a 2-D int16 view whose entries are at most ``max_abs`` in magnitude: blocks of
    rows are summed in int16 (no block sum can leave its range), the block sums in int64."""
    per = max(1, 32767 // max_abs)
    n = view.shape[0] // per * per
    total = int(view[:n].reshape(-1, per, view.shape[1]).sum(axis=1, dtype=np.int16)
                .sum(axis=0, dtype=np.int32).sum(dtype=np.int64)) if n else 0
    return total + int(view[n:].sum(dtype=np.int64))


def _cell_sums(sq: np.ndarray, nh: int, nw: int, b: int, w: int, along_rows: bool) -> np.ndarray:
    """Per cell, the sum of the squared differences (uint16, rows of ``w``) that stay inside it."""
    blocks = sq.reshape(nh, b, w)
    if not along_rows:  # a cell's last row differs with the next cell's first: left out
        blocks = blocks[:, : b - 1]
    per_col = blocks.sum(axis=1, dtype=np.uint32)[:, : nw * b].reshape(nh, nw, b)
    if along_rows:  # likewise a cell's last column
        per_col = per_col[:, :, : b - 1]
    return per_col.sum(axis=2, dtype=np.int64)


def cell_gradient_energy(luma: np.ndarray | PatchLuma, block: int) -> np.ndarray:
    """(H, W) luma -> (H // block, W // block) int64: per cell, the sum of its squared in-cell
    forward differences along x and along y (the cell's rms is the square root of this over
    block * (block - 1))."""
    p, b = _patch(luma), block
    h, w = p.h, p.w
    nh, nw = h // b, w // b
    if nh == 0 or nw == 0:
        raise ValueError(f"patch ({h}, {w}) is smaller than one {b}x{b} cell")
    m = nh * b * w                                    # the cells' rows
    total = None
    for diff, along_rows in ((p.dx, True), (p.dy, False)):
        # d^2 <= 65025 fits uint16, and int16 products wrap modulo 2^16: read as uint16, the
        # int16 square of d is d^2 exactly (one pass, no abs)
        sq = np.multiply(diff[:m], diff[:m]).view(np.uint16)
        cells = _cell_sums(sq, nh, nw, b, w, along_rows)
        total = cells if total is None else total + cells
    return total


@functools.lru_cache(maxsize=None)
def flat_energy_bound(block: int, threshold: float) -> int:
    """The least integer energy that is not flat: rms < threshold <=> energy < this bound, exactly
    (energy / (block (block - 1)) < threshold^2 in rationals; ``threshold`` is a binary fraction)."""
    return max(0, math.ceil(Fraction(threshold) ** 2 * (block * (block - 1))))


def flat_cells(luma: np.ndarray | PatchLuma, block: int = 16, threshold: float = 4.0) -> np.ndarray:
    """(H // block, W // block) bool: which cells are flat (rms < threshold), decided exactly on the
    integer energies (``flat_energy_bound``)."""
    return cell_gradient_energy(luma, block) < flat_energy_bound(block, threshold)


def flat_fraction(img: np.ndarray | PatchLuma, block: int = 16, threshold: float = 4.0) -> float:
    """Fraction of a patch's cells that are flat (see the module docstring); ``img`` is 8-bit RGB,
    its luma or a :class:`PatchLuma`."""
    return float(flat_cells(img, block, threshold).mean())


def laplacian_sums(luma: np.ndarray | PatchLuma) -> tuple[int, int, int]:
    """(n, sum, sum of squares) of the 4-neighbour Laplacian over the interior of the luma
    (n = (H - 2) (W - 2)), exact."""
    p = _patch(luma)
    h, w, hw, dy = p.h, p.w, p.h * p.w, p.dy
    lap = p.dxx[w:w + hw] + dy[w + 1:w + 1 + hw]
    lap -= dy[1:1 + hw]         # centred on pixel k + W + 1: dxx + dyy there, |.| <= 1020
    view = p.rows(lap, h - 2)[:, : w - 2]
    # the sum telescopes: along each interior row the second differences add up to its last
    # first difference minus its first one, and likewise down each interior column
    dxr, dyr = p.rows(p.dx, h - 1), p.rows(dy, h - 1)
    s1 = int(dxr[1:, w - 2].sum(dtype=np.int64) - dxr[1:, 0].sum(dtype=np.int64)
             + dyr[h - 2, 1:w - 1].sum(dtype=np.int64) - dyr[0, 1:w - 1].sum(dtype=np.int64))
    sq = view.astype(np.int32)
    np.multiply(sq, sq, out=sq)                       # lap^2 <= 1,040,400
    # a column of up to 2064 rows sums within int32 (2064 * 1020^2 < 2^31)
    per = np.iinfo(np.int32).max // (1020 * 1020)
    s2 = sum(int(sq[i:i + per].sum(axis=0, dtype=np.int32).sum(dtype=np.int64))
             for i in range(0, sq.shape[0], per))
    return (h - 2) * (w - 2), s1, s2


def immerkaer_sum(luma: np.ndarray | PatchLuma) -> tuple[int, int]:
    """(n, sum of |response|) of Immerkaer's mask [[1,-2,1],[-2,4,-2],[1,-2,1]] over the interior of
    the luma, exact. The mask is the second difference down columns of the second difference along
    rows, so it is two more passes of differences."""
    p = _patch(luma)
    h, w, dxx = p.h, p.w, p.dxx
    e = dxx[w:] - dxx[:-w]
    r = e[w:w + h * w] - e[: h * w]   # |.| <= 2040, centred on pixel k + W + 1
    np.abs(r, out=r)
    return (h - 2) * (w - 2), _sum_int16(p.rows(r, h - 2)[:, : w - 2], 8 * 255)


def sharpness(img: np.ndarray | PatchLuma) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (8-bit units squared)."""
    n, s1, s2 = laplacian_sums(img)
    return (n * s2 - s1 * s1) / (n * n)               # exact integers, one rounding


def noise_sigma(img: np.ndarray | PatchLuma) -> float:
    """Immerkaer's noise standard deviation estimate (8-bit levels)."""
    n, total = immerkaer_sum(img)
    return math.sqrt(math.pi / 2.0) * total / (6.0 * n)


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

    def scores(self, rgb: Optional[np.ndarray], luma: Optional[np.ndarray] = None) -> dict[str, float]:
        """Built-in scores (from ``luma`` = ``luma8(rgb)`` when given) and the hook's (from
        ``rgb``, made contiguous; ``rgb`` may be None without a hook)."""
        y = _patch(luma8(rgb) if luma is None else luma)  # the differences shared by the scores
        out = {name: round(fn(y), 4) for name, fn in BUILTIN_SCORES.items()}
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
