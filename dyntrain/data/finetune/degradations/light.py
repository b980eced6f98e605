"""Low light: a gamma curve on [0, 1]."""
from __future__ import annotations

import torch

from dyntrain.data.finetune.degradations.common import per_sample, to_uint8


def lowlight(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``I = 255 (J / 255) ** gamma``: In-Dis gamma U(1, 3), Out-Dis U(3, 4)."""
    return to_uint8(255.0 * (x / 255.0).pow(per_sample(p["gamma"], x)))
