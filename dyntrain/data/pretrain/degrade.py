"""Pre-training corruption: degrade part of each clean crop, mask another part.

Per sample (defaults from the paper, all configurable through ``data.*``):
  * the crop is tiled into ``region_block`` x ``region_block`` blocks; a random ``degrade_frac`` of
    the blocks (0.5) form the *degraded* region and a disjoint random ``mask_frac`` (0.3) the
    *masked* region, so ~80% of the input is altered;
  * one degradation kind per sample, drawn uniformly from ``degradations``, at a random level:
      - "jpeg":     JPEG compression at quality ~ U{jpeg_quality};
      - "gaussian": additive Gaussian noise, sigma ~ U[gaussian_sigma] in 8-bit levels;
      - "random":   salt-and-pepper noise: a fraction ~ U[random_noise] of the pixels set to black
                    or white (all channels of a pixel together);
    the degraded region shows the degraded crop, the rest the clean crop;
  * masked pixels are set to 0 (black) in every channel;
  * ``mask`` (B, 1, H, W) is 1 where the input was altered (degraded or masked region).

Split of the work. The whole-crop degradation runs inside the DALI pipeline, per sample in DALI's
worker threads and overlapped with training by its prefetching (``fn.jpeg_compression_distortion``,
``fn.noise.gaussian``, ``fn.noise.salt_and_pepper`` in a conditional on the sample's kind): on a
CPU-only machine the main process is the bottleneck, and doing the noise there in torch halved the
loader's throughput. The regions and the blend are cheap vectorised torch ops on the training
device (:func:`compose`), in uint8 until the final conversion to float.

Randomness. :func:`batch_params` - the kind and the levels of every sample, and the seed of the
regions' torch.Generator - is a pure function of (seed, rank, batch index); the noise drawn by DALI
is part of DALI's checkpoint. A resumed loader therefore reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dyntrain.seeds import seed_sequence


KINDS = ("jpeg", "gaussian", "random")
_SALT = 0xD16A  # appended to every seed of this module


@dataclass(frozen=True)
class DegradeSpec:
    crop_size: int = 128
    degrade_frac: float = 0.5
    mask_frac: float = 0.3
    kinds: tuple[str, ...] = KINDS
    region_block: int = 16
    jpeg_quality: tuple[int, int] = (10, 60)
    gaussian_sigma: tuple[float, float] = (5.0, 50.0)
    random_noise: tuple[float, float] = (0.02, 0.2)

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("degradations: at least one kind is needed")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"degradations: unknown kinds {sorted(unknown)}")
        if self.degrade_frac + self.mask_frac > 1.0 + 1e-9:
            raise ValueError("degrade_frac + mask_frac must not exceed 1 (the regions are disjoint)")
        if not 1 <= self.region_block <= self.crop_size:
            raise ValueError(f"region_block must lie in 1..crop_size, got {self.region_block}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= low <= high <= 100, got {self.jpeg_quality}")

    @classmethod
    def from_config(cls, data) -> "DegradeSpec":
        """From a ``DataConfig`` (``cfg.data``)."""
        return cls(crop_size=data.crop_size, degrade_frac=data.degrade_frac,
                   mask_frac=data.mask_frac, kinds=tuple(data.degradations),
                   region_block=data.region_block,
                   jpeg_quality=(int(data.jpeg_quality[0]), int(data.jpeg_quality[1])),
                   gaussian_sigma=(float(data.gaussian_sigma[0]), float(data.gaussian_sigma[1])),
                   random_noise=(float(data.random_noise[0]), float(data.random_noise[1])))

    @property
    def blocks_per_side(self) -> int:
        return math.ceil(self.crop_size / self.region_block)

    @property
    def block_counts(self) -> tuple[int, int]:
        """(degraded blocks, masked blocks) per sample."""
        n = self.blocks_per_side ** 2
        n_deg = int(round(self.degrade_frac * n))
        n_mask = min(int(round(self.mask_frac * n)), n - n_deg)
        return n_deg, n_mask

    @property
    def altered_frac(self) -> float:
        """The fraction of a crop's blocks that are altered (degraded + masked)."""
        n_deg, n_mask = self.block_counts
        return (n_deg + n_mask) / self.blocks_per_side ** 2


def _seed(*parts: int) -> np.random.SeedSequence:
    return seed_sequence(*parts, _SALT)


def batch_params(spec: DegradeSpec, seed: int, rank: int, batch_index: int,
                 batch_size: int) -> dict[str, np.ndarray | int]:
    """The per-sample draws of batch ``batch_index`` on ``rank`` (a pure function).

    Returns kind (index into spec.kinds), is_jpeg / is_gaussian / is_random (bool), jpeg_quality
    (int32), sigma (float32, 8-bit levels), sp_frac (float32) and region_seed (int)."""
    rng = np.random.default_rng(_seed(seed, rank, batch_index, batch_index >> 32))
    kind = rng.integers(0, len(spec.kinds), size=batch_size)
    quality = rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1, size=batch_size)
    sigma = rng.uniform(*spec.gaussian_sigma, size=batch_size)
    sp = rng.uniform(*spec.random_noise, size=batch_size)
    names = np.array(spec.kinds)[kind]
    return {"kind": kind, "is_jpeg": names == "jpeg", "is_gaussian": names == "gaussian",
            "is_random": names == "random", "jpeg_quality": quality.astype(np.int32),
            "sigma": sigma.astype(np.float32), "sp_frac": sp.astype(np.float32),
            "region_seed": int(rng.integers(0, 2**62))}


def region_masks(spec: DegradeSpec, batch_size: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(degraded, masked) boolean (B, 1, S, S) regions: disjoint random sets of blocks."""
    nb = spec.blocks_per_side
    n_deg, n_mask = spec.block_counts
    scores = torch.rand(batch_size, nb * nb, generator=generator, device=device)
    order = scores.argsort(dim=1).argsort(dim=1)  # each block's rank in a random permutation
    deg = (order < n_deg).view(batch_size, 1, nb, nb)
    msk = ((order >= n_deg) & (order < n_deg + n_mask)).view(batch_size, 1, nb, nb)
    b, s = spec.region_block, spec.crop_size

    def to_pixels(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)[..., :s, :s]
    return to_pixels(deg), to_pixels(msk)


def compose(clean: torch.Tensor, degraded: torch.Tensor, region_seed: int,
            spec: DegradeSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend degraded crops into clean ones and mask, on clean's device.

    clean, degraded: (B, 3, S, S) uint8 (degraded = the whole crop after its sample's
    degradation). Returns (input, target, mask): float32 in [0, 1], mask (B, 1, S, S)."""
    gen = torch.Generator(device=clean.device)
    gen.manual_seed(int(region_seed))
    deg, msk = region_masks(spec, clean.shape[0], gen, clean.device)
    inp = torch.where(deg, degraded, clean).masked_fill_(msk, 0)  # uint8
    scale = 1.0 / 255.0
    return torch.mul(inp, scale), torch.mul(clean, scale), (deg | msk).to(torch.float32)


def degrade_reference(clean: np.ndarray, params: dict, i: int) -> np.ndarray:
    """NumPy/PIL version of the whole-crop degradation of sample ``i`` (HxWx3 uint8 -> uint8),
    for tests and for the plain baseline pipeline."""


    rng = np.random.default_rng(_seed(params["region_seed"], i))
    if params["is_jpeg"][i]:
        buf = io.BytesIO()
        Image.fromarray(clean).save(buf, "JPEG", quality=int(params["jpeg_quality"][i]))
        return np.asarray(Image.open(buf).convert("RGB"))
    if params["is_gaussian"][i]:
        noisy = clean + rng.standard_normal(clean.shape, dtype=np.float32) * params["sigma"][i]
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    hit = rng.random(clean.shape[:2]) < params["sp_frac"][i]
    salt = rng.random(clean.shape[:2]) < 0.5
    out = clean.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out

