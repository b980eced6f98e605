"""Building blocks of DyNet, in reading order. All convolutions are bias-free."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


def conv3x3(c_in: int, c_out: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, groups=groups, bias=False)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map, with weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: a (C/h x C/h) attention map across channels.

    Args:
        dim: channel width C.
        heads: number of heads h (must divide C).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))  # learnable tau per head
        self.qkv = conv1x1(dim, 3 * dim)
        self.qkv_dw = conv3x3(3 * dim, 3 * dim, groups=3 * dim)
        self.proj = conv1x1(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)  # 3 x (B, C, H, W)
        q, k, v = (rearrange(t, "b (h c) y x -> b h c (y x)", h=self.heads) for t in (q, k, v))
        # (B, heads, C/heads, HW); unit length over HW so q k^T is a cosine similarity
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, C/heads, C/heads)
        attn = attn.softmax(dim=-1)
        out = attn @ v  # (B, heads, C/heads, HW)
        out = rearrange(out, "b h c (y x) -> b (h c) y x", y=height)  # (B, C, H, W)
        return self.proj(out)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network: gelu(x1) * x2 with a depthwise 3x3 before the gate.

    Args:
        dim: channel width C.
        expansion: gamma; the hidden width is int(C * gamma).
    """

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = conv1x1(dim, 2 * hidden)
        self.dwconv = conv3x3(2 * hidden, 2 * hidden, groups=2 * hidden)
        self.project_out = conv1x1(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)  # 2 x (B, hidden, H, W)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: x + MDTA(LN(x)), then x + GDFN(LN(x)). Shape preserving."""

    def __init__(self, dim: int, heads: int, expansion: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = MDTA(dim, heads)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GDFN(dim, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Sequential):
    """(B, C, H, W) -> (B, 2C, H/2, W/2): 3x3 conv to C/2, then PixelUnshuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(conv3x3(dim, dim // 2), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """(B, C, H, W) -> (B, C/2, 2H, 2W): 3x3 conv to 2C, then PixelShuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(conv3x3(dim, 2 * dim), nn.PixelShuffle(2))


class PromptGen(nn.Module):
    """Input-conditioned prompt: a softmax-weighted mix of L learnable (D, S, S) prompts.

    Args:
        prompt_dim: prompt width D.
        prompt_len: number of prompt components L.
        prompt_size: spatial size S of the stored prompts (resized to the feature's H x W).
        in_dim: width C_in of the feature that conditions the mixing weights.
    """

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, in_dim: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.rand(prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear = nn.Linear(in_dim, prompt_len)  # with bias
        self.conv = conv3x3(prompt_dim, prompt_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        weights = self.linear(x.mean(dim=(-2, -1))).softmax(dim=-1)  # (B, L)
        prompt = einsum(weights, self.prompt, "b l, l d s t -> b d s t")
        prompt = F.interpolate(prompt, size=(height, width), mode="bilinear",
                               align_corners=False)  # (B, D, H, W)
        return self.conv(prompt)


class PromptBlock(nn.Module):
    """Concatenate a generated prompt to x, mix with one transformer block, project to C_out.

    Args:
        in_dim: width C_in of the feature.
        prompt_dim: prompt width D.
        prompt_size: stored prompt size S.
        out_dim: output width C_out.
        prompt_len: number of prompt components L.
        heads: heads of the inner transformer block (width C_in + D).
        expansion: GDFN gamma of the inner transformer block.
    """

    def __init__(self, in_dim: int, prompt_dim: int, prompt_size: int, out_dim: int,
                 prompt_len: int, heads: int, expansion: float) -> None:
        super().__init__()
        self.gen = PromptGen(prompt_dim, prompt_len, prompt_size, in_dim)
        self.block = TransformerBlock(in_dim + prompt_dim, heads, expansion)
        self.proj = conv1x1(in_dim + prompt_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, self.gen(x)], dim=1)  # (B, C_in + D, H, W)
        return self.proj(self.block(x))  # (B, C_out, H, W)
