"""Helpers shared by the degradation families: rounding, per-sample kernels, grouped convolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round and clip to 8-bit values (the tensor stays float)."""
    return x.round().clamp_(0, 255)


def per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) parameter as a (B, 1, 1, 1) float tensor on ``x``'s device."""
    return value.to(x.device, torch.float32).view(-1, 1, 1, 1)


def conv_per_sample(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of ``x`` (B, C, H, W) with its own 2-D kernel (B, k, k) (k odd), every
    channel alike, reflect-padded so the output has the input's size."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    xp = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    return F.conv2d(xp, weight, groups=b * c).view(b, c, h, w)


def gaussian_kernels(sigma: torch.Tensor, size: torch.Tensor, k: int, device) -> torch.Tensor:
    """(B, k, k) isotropic Gaussian kernels of per-sample ``sigma``, each truncated to its own odd
    ``size`` (zero outside) inside a common k x k support, normalised to sum 1."""
    r = torch.arange(k, device=device, dtype=torch.float32) - k // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    s = sigma.to(device, torch.float32).view(-1, 1, 1)
    half = (size.to(device, torch.float32).view(-1, 1, 1) - 1) / 2
    g = torch.exp(-(xx ** 2 + yy ** 2) / (2 * s ** 2))
    g = g * ((xx.abs() <= half) & (yy.abs() <= half))
    return g / g.sum(dim=(1, 2), keepdim=True)
