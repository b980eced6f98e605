"""Blur: an isotropic Gaussian kernel per sample."""
from __future__ import annotations

import torch

from dyntrain.data.finetune.degradations.common import conv_per_sample, gaussian_kernels, to_uint8


def blur(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``I = J * G_sigma`` where G_sigma is an isotropic Gaussian ``exp(-(u^2 + v^2) / (2 sigma^2))``
    truncated to an odd ``ksize`` x ``ksize`` window (ksize drawn from 7..23) and normalised to sum 1;
    reflect padding at the border. sigma: In-Dis U(1, 3), Out-Dis U(3, 5)."""
    k = int(p["ksize"].max())
    return to_uint8(conv_per_sample(x, gaussian_kernels(p["sigma"], p["ksize"], k, x.device)))
