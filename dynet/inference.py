"""Inference helpers: padding to a multiple, overlapping tiled restoration, Gray-World balance."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int,
                    mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom/right of (..., H, W) so both sides are multiples of `multiple`.

    Returns the padded tensor and the original (H, W), so ``y[..., :H, :W]`` crops back. Reflect
    padding needs the pad to be smaller than the side; for tinier images it falls back to replicate.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        if mode == "reflect" and (pad_h >= height or pad_w >= width):
            mode = "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo pad_to_multiple: keep the top-left (H, W)."""
    return x[..., : size[0], : size[1]]


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size), the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1D blending weights: rise linearly over `overlap` pixels at each end, 1 in the middle."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i)  # distance to the nearer end, 1 at the border
    return (edge / (overlap + 1)).clamp(max=1.0)


@torch.no_grad()
def restore_image(model: Callable[..., torch.Tensor], x: torch.Tensor,
                  reuse: Sequence[int] | None = None, variant: str | None = None,
                  tile: int | None = None, overlap: int = 32, multiple: int = 8) -> torch.Tensor:
    """Restore a (B, C, H, W) image, whole or in overlapping tiles (put the model in eval mode).

    Args:
        model: a DyNet (or any callable taking ``(x, reuse=, variant=)``).
        x: input image batch; any H, W (padded to a multiple of `multiple`, cropped back).
        reuse, variant: which member of the family runs (see ``DyNet.resolve_reuse``).
        tile: tile side (a multiple of `multiple`); None runs the whole image at once.
        overlap: pixels shared by neighbouring tiles, blended with linear ramps.
        multiple: the model's size granularity.

    Tiles run one at a time, so peak activation memory is bounded by the tile, not the image;
    the blended result is accumulated in float32 on x's device. DyNet is not a local operator
    (its prompts are mixed from a global average and stretched over the whole input, and channel
    attention pools over all pixels), so tiled output is close to, not equal to, untiled output.
    """
    if tile is None:
        return model(x, reuse=reuse, variant=variant)
    if tile <= 0 or tile % multiple:
        raise ValueError(f"tile must be a positive multiple of {multiple}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    # pad once, as the untiled model would, so border tiles see the same reflected content
    padded, (height, width) = pad_to_multiple(x, multiple)
    pad_h, pad_w = padded.shape[-2:]
    tile_h, tile_w = min(tile, pad_h), min(tile, pad_w)
    stride = tile - overlap
    window = (_ramp(tile_h, overlap, x.device)[:, None]
              * _ramp(tile_w, overlap, x.device)[None, :])  # (tile_h, tile_w)

    out: torch.Tensor | None = None
    weight = torch.zeros(pad_h, pad_w, device=x.device, dtype=torch.float32)
    out_dtype = x.dtype
    for top in _tile_starts(pad_h, tile_h, stride):
        for left in _tile_starts(pad_w, tile_w, stride):
            patch = padded[..., top:top + tile_h, left:left + tile_w]
            restored = model(patch, reuse=reuse, variant=variant)  # (B, C_out, tile_h, tile_w)
            if out is None:
                out_dtype = restored.dtype
                out = torch.zeros(*restored.shape[:-2], pad_h, pad_w, device=x.device,
                                  dtype=torch.float32)
            out[..., top:top + tile_h, left:left + tile_w] += restored.float() * window
            weight[top:top + tile_h, left:left + tile_w] += window
    assert out is not None
    return crop_to(out / weight, (height, width)).to(out_dtype)


def gray_world(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gray-World colour balance of (B, 3, H, W) images in [0, 1].

    Each channel is scaled so its mean equals the mean of the three channel means; the result is
    clamped to [0, 1] (clipping can move the means of nearly saturated images slightly).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"gray_world expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    means = x.mean(dim=(-2, -1), keepdim=True)  # (B, 3, 1, 1)
    gray = means.mean(dim=1, keepdim=True)  # (B, 1, 1, 1)
    return (x * (gray / means.clamp_min(eps))).clamp(0.0, 1.0)
