"""DyNet: a Restormer/PromptIR-style U-Net whose levels each own ONE transformer block, applied
f times in series. The reuse tuple (f1, f2, f3, f4) is an argument of forward(), so DyNet-S and
DyNet-L are one module with one state_dict.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import Downsample, PromptBlock, TransformerBlock, Upsample, conv1x1, conv3x3
from .config import DyNetConfig, Reuse, validate_reuse
from .inference import pad_to_multiple


class DyNet(nn.Module):
    """The weight-shared DyNet family.

    Args:
        config: architecture; defaults to ``DyNetConfig()`` (the paper's model).

    Call ``model(x, variant="S")`` or ``model(x, reuse=(2, 3, 3, 4))``; with neither the
    config's default variant ("L") runs. Input (B, C, H, W), any H and W; output same shape.
    """

    def __init__(self, config: DyNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else DyNetConfig()
        self._blocks_compiled = False  # set by compile_blocks
        self.channels_last = False  # set by use_channels_last
        w1, w2, w3, w4 = cfg.widths
        h1, h2, h3, h4 = cfg.heads
        gamma = cfg.ffn_expansion

        def prompt_block(c_in: int, level: int, c_out: int) -> PromptBlock:
            return PromptBlock(c_in, cfg.prompt_dims[level], cfg.prompt_sizes[level], c_out,
                               cfg.prompt_len, cfg.prompt_heads, gamma)

        self.patch_embed = conv3x3(cfg.in_channels, w1)
        # encoder: one shared block per level
        self.enc1 = TransformerBlock(w1, h1, gamma)
        self.down1 = Downsample(w1)
        self.enc2 = TransformerBlock(w2, h2, gamma)
        self.down2 = Downsample(w2)
        self.enc3 = TransformerBlock(w3, h3, gamma)
        self.down3 = Downsample(w3)
        self.latent = TransformerBlock(w4, h4, gamma)
        # decoder: prompts on the latent and on the e3 / e2 skips
        self.prompt_latent = prompt_block(w4, 2, w3)
        self.up_latent = Upsample(w3)
        self.prompt3 = prompt_block(w3, 1, w3)
        self.reduce3 = conv1x1(w2 + w3, w3)
        self.dec3 = TransformerBlock(w3, h3, gamma)
        self.up3 = Upsample(w3)
        self.prompt2 = prompt_block(w2, 0, w2)
        self.reduce2 = conv1x1(w2 + w2, w2)
        self.dec2 = TransformerBlock(w2, h2, gamma)
        self.up2 = Upsample(w2)
        self.dec1 = TransformerBlock(2 * w1, h1, gamma)
        # refinement: distinct blocks, applied once each
        self.refinement = nn.Sequential(
            *[TransformerBlock(2 * w1, h1, gamma) for _ in range(cfg.num_refinement)])
        self.output = conv3x3(2 * w1, cfg.out_channels)

    @property
    def variants(self) -> dict[str, Reuse]:
        """Named reuse tuples, e.g. {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}."""
        return self.config.variants

    def resolve_reuse(self, reuse: Sequence[int] | None = None,
                      variant: str | None = None) -> Reuse:
        """The reuse tuple (f1, f2, f3, f4) for an explicit tuple, a variant name, or neither."""
        if reuse is not None and variant is not None:
            raise ValueError(f"pass reuse or variant, not both (got reuse={reuse!r}, "
                             f"variant={variant!r})")
        if reuse is not None:
            return validate_reuse(reuse)
        name = self.config.default_variant if variant is None else variant
        if name not in self.variants:
            raise ValueError(f"unknown DyNet variant {name!r}; known variants: "
                             f"{sorted(self.variants)} (or pass reuse=(f1, f2, f3, f4))")
        return self.variants[name]

    def use_channels_last(self, enabled: bool = True) -> "DyNet":
        """Run the activations channels-last (NHWC memory): the input is converted once at the
        top of forward and every convolution, norm and elementwise op keeps that layout.
        Returns ``self``.

        Only the activations change: the weights keep their default layout (convolutions adapt
        them per call; most are 1x1 or depthwise, whose layouts coincide), so engines that view
        parameters as flat buffers (DeepSpeed's broadcast and ZeRO partitions) work unchanged.
        """
        self.channels_last = bool(enabled)
        return self

    def compile_blocks(self, **compile_kwargs: Any) -> "DyNet":
        """``torch.compile`` every TransformerBlock in place; returns ``self``.

        A block's forward is identical for each of its f applications and for every reuse tuple,
        so the compiled graphs depend on the block's input shape only: DyNet-S, DyNet-L and any
        other tuple share them, and a variant switch never recompiles. The Python loop over f
        stays outside the graphs. Blocks of equal shape share one graph (dynamo lifts the weights
        to graph inputs). Compiling in place (``nn.Module.compile``) keeps the state_dict keys,
        so checkpoints stay interchangeable with the uncompiled model.

        Args:
            compile_kwargs: passed to ``torch.compile``; default ``dynamic=False`` (one static
                graph per block shape, the fastest kernels for fixed-size training crops).

        In eval mode the blocks run eagerly (``torch.compiler.set_stance("force_eager")``):
        evaluation on full images of ever-new sizes would otherwise compile graphs per size.
        """
        compile_kwargs.setdefault("dynamic", False)
        self._blocks_compiled = True
        blocks = [m for m in self.modules() if isinstance(m, TransformerBlock)]
        # all blocks run one code object (TransformerBlock.forward), whose graph cache needs
        # room for each distinct shape under train/eval, grad/no-grad and autocast on/off
        _raise_recompile_limit(8 * len(blocks))
        for block in blocks:
            block.compile(**compile_kwargs)
        return self

    def _repeat(self, block: nn.Module, x: torch.Tensor, times: int) -> torch.Tensor:
        """Apply one shared block `times` times in series; gradients accumulate in its weights."""
        use_ckpt = self.config.checkpoint_blocks and torch.is_grad_enabled()
        for _ in range(times):
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x

    def forward(self, x: torch.Tensor, reuse: Sequence[int] | None = None,
                variant: str | None = None) -> torch.Tensor:
        if self._blocks_compiled and not self.training and not torch.compiler.is_compiling():
            with torch.compiler.set_stance("force_eager"):  # see compile_blocks
                return self._forward(x, reuse, variant)
        return self._forward(x, reuse, variant)

    def _forward(self, x: torch.Tensor, reuse: Sequence[int] | None,
                 variant: str | None) -> torch.Tensor:
        f1, f2, f3, f4 = self.resolve_reuse(reuse, variant)
        inp, (height, width) = pad_to_multiple(x, 8)  # (B, 3, H, W), H and W multiples of 8
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)

        # encoder
        e1 = self._repeat(self.enc1, self.patch_embed(inp), f1)  # (B, C1, H, W)
        e2 = self._repeat(self.enc2, self.down1(e1), f2)  # (B, C2, H/2, W/2)
        e3 = self._repeat(self.enc3, self.down2(e2), f3)  # (B, C3, H/4, W/4)
        latent = self._repeat(self.latent, self.down3(e3), f4)  # (B, C4, H/8, W/8)

        # decoder level 3
        d3 = self.up_latent(self.prompt_latent(latent))  # (B, C2, H/4, W/4)
        d3 = self.reduce3(torch.cat([d3, self.prompt3(e3)], dim=1))  # (B, C3, H/4, W/4)
        d3 = self._repeat(self.dec3, d3, f3)

        # decoder level 2
        d2 = self.up3(d3)  # (B, C2, H/2, W/2)
        d2 = self.reduce2(torch.cat([d2, self.prompt2(e2)], dim=1))  # (B, C2, H/2, W/2)
        d2 = self._repeat(self.dec2, d2, f2)

        # decoder level 1 and refinement
        d1 = torch.cat([self.up2(d2), e1], dim=1)  # (B, 2*C1, H, W)
        d1 = self._repeat(self.dec1, d1, f1)
        d1 = self.refinement(d1)

        out = self.output(d1) + inp  # global residual; not clamped
        return out[..., :height, :width]


def _raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep at least `limit` graphs per code object (the default 8 can be too few)."""
    import torch._dynamo  # lazy: dynamo is loaded only by compile_blocks, never for eager use

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
