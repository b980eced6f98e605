"""Resolution: bicubic down-sampling then bicubic up-sampling to the original size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dyntrain.data.finetune.degradations.common import to_uint8


def sr(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Super-resolution input: ``I = up_s(down_s(J))`` with bicubic (anti-aliased) resampling by the
    factor ``scale`` (In-Dis x4; Out-Dis x6, our choice: the paper's value is not recoverable).
    The low-resolution image (size round(H / s) x round(W / s)) is rounded to uint8 as a saved
    file would be, then up-sampled. One factor per batch (the factor is fixed per preset)."""
    scale = float(p["scale"][0])
    if not bool((p["scale"] == p["scale"][0]).all()):
        raise ValueError("sr: one scale per batch (the scale is fixed per preset)")
    h, w = x.shape[-2:]
    small = (max(1, round(h / scale)), max(1, round(w / scale)))
    low = to_uint8(F.interpolate(x, size=small, mode="bicubic", antialias=True, align_corners=False))
    return to_uint8(F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False))
