"""Noise: additive white Gaussian noise."""
from __future__ import annotations

import torch

from dyntrain.data.finetune.degradations.common import per_sample, to_uint8


def sample_normal(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, each sample from its own generator (seeded by the
    sample's drawn ``seed``), so a sample's noise does not depend on the rest of its batch."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i, seed in enumerate(seeds.tolist()):
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))
        out[i] = torch.randn(x.shape[1:], generator=gen, device=x.device)
    return out


def noise(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``I = J + sigma n``, n ~ N(0, 1) i.i.d. per pixel and channel, sigma in 8-bit units:
    In-Dis U(15, 50), Out-Dis U(50, 70)."""
    return to_uint8(x + per_sample(p["sigma"], x) * sample_normal(x, p["seed"]))
