"""Per-image variant routing: a small degradation-aware network that predicts, for every variant of
one DyNet family, the PSNR (dB) that variant loses against the largest variant on this image.

The router looks at a downscaled copy of the input (at least 4x smaller per side, at most
``RouterConfig.side`` pixels on the longer side) together with the same downscaling of its
high-frequency residual |x - blur3x3(x)|, taken at full resolution so that noise and rain streaks
survive the downscaling. Three strided convolutions, global average pooling and a two-layer head
follow. Its conv + linear FLOPs (``count_router_flops``) are a few hundred per input pixel at most and
constant above ``4 * side`` pixels per side: far below 1% of DyNet-S at any input size.

Policy (``choose_variant``): the cheapest variant whose predicted loss is within the tolerance; the
largest variant when none is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Reuse, validate_reuse

DEFAULT_TOLERANCE_DB = 0.05


@dataclass
class RouterConfig:
    """Architecture of a variant router.

    Args:
        variants: the family it routes over, name -> reuse tuple, cheapest first.
        width: channels of the first convolution (then 2x and 4x).
        side: longest side of the downscaled copy the convolutions see.
        min_factor: the copy is at least this many times smaller per side than the input.
    """

    variants: dict[str, Reuse] = field(default_factory=dict)
    width: int = 16
    side: int = 64
    min_factor: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.variants, Mapping) or len(self.variants) < 2:
            raise ValueError(f"RouterConfig.variants needs at least two variants, got {self.variants!r}")
        self.variants = {str(k): validate_reuse(v, f"RouterConfig.variants[{k!r}]")
                         for k, v in self.variants.items()}
        for name in ("width", "side", "min_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RouterConfig.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"variants": {k: list(v) for k, v in self.variants.items()}, "width": self.width,
                "side": self.side, "min_factor": self.min_factor}


def downscaled_size(height: int, width: int, side: int, min_factor: int) -> tuple[int, int]:
    """(h, w) of the router's copy of a height x width input."""
    factor = max(float(min_factor), max(height, width) / side)
    return max(1, round(height / factor)), max(1, round(width / factor))


class VariantRouter(nn.Module):
    """Predicts the PSNR loss (dB) of every variant against the largest one: (B, 3, H, W) -> (B, V)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Conv2d(6, w, 3, stride=2, padding=1)  # image + high-pass residual
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.hidden = nn.Linear(8 * w, 4 * w)  # mean and max pooled features
        self.head = nn.Linear(4 * w, len(config.variants))

    @property
    def variant_names(self) -> list[str]:
        return list(self.config.variants)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 6-channel downscaled input: (B, 3, H, W) -> (B, 6, h, w)."""
        size = downscaled_size(x.shape[-2], x.shape[-1], self.config.side, self.config.min_factor)
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        high = (x - blur).abs() * 4.0  # residual energy, scaled to roughly the image's range
        return F.adaptive_avg_pool2d(torch.cat([x, high], dim=1), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x.float())  # (B, 6, h, w)
        f = F.gelu(self.stem(f))  # (B, w, h/2, w/2)
        f = F.gelu(self.conv2(f))  # (B, 2w, h/4, w/4)
        f = F.gelu(self.conv3(f))  # (B, 4w, h/8, w/8)
        pooled = torch.cat([f.mean(dim=(-2, -1)), f.amax(dim=(-2, -1))], dim=1)  # (B, 8w)
        return self.head(F.gelu(self.hidden(pooled)))  # (B, V) predicted dB lost against the largest


def choose_variant(predicted_loss: Sequence[float] | torch.Tensor, names: Sequence[str],
                   costs: Mapping[str, float], tolerance_db: float = DEFAULT_TOLERANCE_DB) -> str:
    """The cheapest variant whose predicted loss is <= ``tolerance_db``, else the most expensive one.

    Args:
        predicted_loss: one figure per name (dB lost against the largest variant).
        names: the variants, in the order of ``predicted_loss``.
        costs: FLOPs (or any cost) per variant name; ties go to the earlier name.
    """
    losses = [float(v) for v in (predicted_loss.tolist() if torch.is_tensor(predicted_loss)
                                 else predicted_loss)]
    if len(losses) != len(names):
        raise ValueError(f"{len(losses)} predictions for {len(names)} variants {list(names)}")
    by_cost = sorted(range(len(names)), key=lambda i: (costs[names[i]], i))
    for i in by_cost:
        if math.isfinite(losses[i]) and losses[i] <= tolerance_db:
            return names[i]
    return names[by_cost[-1]]


def oracle_variant(psnrs: Mapping[str, float], costs: Mapping[str, float],
                   tolerance_db: float = DEFAULT_TOLERANCE_DB) -> str:
    """Per image, with every variant's PSNR known: the cheapest within ``tolerance_db`` of the best."""
    best = max(psnrs.values())
    names = list(psnrs)
    return choose_variant([best - psnrs[n] for n in names], names, costs, tolerance_db)
