"""Weather: rain streaks and haze (atmospheric scattering)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from dyntrain.data.finetune.degradations.common import conv_per_sample, per_sample, to_uint8


RAIN_SUPPORT = 41  # kernel side: holds a 40 px streak at any angle


def streak_kernels(length: torch.Tensor, angle_deg: torch.Tensor, width: torch.Tensor,
                   device) -> torch.Tensor:
    """(B, K, K) streak kernels: a line of ``length`` px through the centre at ``angle_deg`` from the
    vertical, widened across its direction by a Gaussian whose +-2 sigma span is ``width`` px."""
    r = torch.arange(RAIN_SUPPORT, device=device, dtype=torch.float32) - RAIN_SUPPORT // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    theta = angle_deg.to(device, torch.float32).view(-1, 1, 1) * (math.pi / 180.0)
    along = xx * torch.sin(theta) + yy * torch.cos(theta)
    across = xx * torch.cos(theta) - yy * torch.sin(theta)
    sigma = width.to(device, torch.float32).view(-1, 1, 1) / 4.0
    inside = along.abs() <= length.to(device, torch.float32).view(-1, 1, 1) / 2
    return inside * torch.exp(-across ** 2 / (2 * sigma ** 2))


def rain(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rain streaks (MiOIR's model): streak seeds s(u, v) ~ Bernoulli(density / 10^4) per pixel
    (density: In-Dis U(50, 100), Out-Dis U(100, 150)), each smeared by a streak kernel (a line of
    ``length`` U(20, 40) px at ``angle`` U(-45, 45) deg from the vertical, widened by a Gaussian of
    ``width`` U(3, 11) px): R = s * k, rescaled to 0..255 (R / max R), then ``I = clip(J + R)``
    (the same streaks on every channel)."""
    b, _, h, w = x.shape
    seeds = torch.empty((b, 1, h, w), device=x.device)
    for i, seed in enumerate(p["seed"].tolist()):
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))
        seeds[i] = torch.rand((1, h, w), generator=gen, device=x.device)
    drops = (seeds < per_sample(p["density"], x) / 1e4).float()
    streaks = conv_per_sample(drops, streak_kernels(p["length"], p["angle"], p["width"], x.device))
    peak = streaks.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return to_uint8(x + 255.0 * streaks / peak)


def depth_proxy(b: int, h: int, w: int, device) -> torch.Tensor:
    """The depth used when no depth map is given: the row's height in the frame,
    ``d(y) = (H - y) / H`` (top row 1 = far, bottom row 1/H = near), the usual layout of an outdoor
    photograph. A deviation from MiOIR (which uses a monocular depth network); counted by callers."""
    rows = (h - torch.arange(h, device=device, dtype=torch.float32)) / h
    return rows.view(1, 1, h, 1).expand(b, 1, h, w)


def haze(x: torch.Tensor, p: dict[str, torch.Tensor], depth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Atmospheric scattering on [0, 1]: ``I = J t + A (1 - t)``, ``t = exp(-beta d)``, with d the
    depth divided by the image's maximum depth ((B, 1, H, W) in [0, 1]; NaN where a sample has no
    depth map, which then takes ``depth_proxy``). A: U(0.8, 1) in both presets; beta: In-Dis
    U(0.5, 2.5), Out-Dis U(2.5, 3)."""
    b, _, h, w = x.shape
    proxy = depth_proxy(b, h, w, x.device)
    d = proxy if depth is None else torch.where(torch.isnan(depth), proxy, depth.to(x.device))
    t = torch.exp(-per_sample(p["beta"], x) * d)
    return to_uint8(x * t + 255.0 * per_sample(p["A"], x) * (1 - t))
