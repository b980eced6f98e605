"""The project's own FLOP and parameter counter (FLOPs = 2 x multiply-accumulates).

``conv_linear`` follows the paper's convention (Table 5): every nn.Conv2d and nn.Linear call of a
real forward pass, counted by forward hooks. ``attention`` adds what that convention leaves out:
the two channel-attention matrix products of each MDTA call (q k^T and attn v), 4 C^2 HW / h FLOPs
per call. Norms, softmax, the bilinear prompt resize and elementwise ops are not counted, except
that ``gelu`` reports one FLOP per GELU element (GDFN hidden width x pixels): the paper's Table 5
figures (242.35 / 166.38 GFLOPs for L / S at 224x224) equal ``conv_linear + gelu`` to the printed
digits, so its counting tool evidently scored each GELU output as one FLOP.
The forward runs on the meta device: no memory for activations, no arithmetic, exact shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .blocks import GDFN, MDTA


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass, split by what the paper counts and what it leaves out."""

    conv_linear: int  # convolutions + linear layers (the paper's convention)
    attention: int  # channel-attention matrix products q k^T and attn v
    gelu: int = 0  # one per GELU output element (included in the paper's figures)

    @property
    def paper(self) -> int:
        """The figure the paper's Table 5 reports: conv + linear + one FLOP per GELU element."""
        return self.conv_linear + self.gelu

    @property
    def total(self) -> int:
        """Conv + linear + attention products: the matmul-class work, for FLOP utilisation."""
        return self.conv_linear + self.attention

    def __str__(self) -> str:
        return (f"{self.conv_linear / 1e9:.2f} GFLOPs (conv+linear), "
                f"{self.total / 1e9:.2f} GFLOPs (with attention)")


def count_parameters(model: nn.Module, module_type: type[nn.Module] | None = None) -> int:
    """Number of distinct parameters in `model`, or only in its submodules of `module_type`."""
    if module_type is None:
        params = {id(p): p for p in model.parameters()}
    else:
        params = {id(p): p for m in model.modules() if isinstance(m, module_type)
                  for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def _conv_macs(module: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * module.in_features


def _attention_flops(module: MDTA, x: torch.Tensor) -> int:
    batch, channels, height, width = x.shape
    per_head = channels // module.heads
    macs_one_product = batch * module.heads * per_head * per_head * height * width
    return 2 * 2 * macs_one_product  # two products, 2 FLOPs per MAC


def _meta_copy(model: nn.Module) -> nn.Module:
    """A parameter-free (meta) copy of `model`; DyNets are rebuilt from their config."""
    config = getattr(model, "config", None)
    if config is not None:
        try:
            with torch.device("meta"):
                return type(model)(config)
        except TypeError:
            pass
    return copy.deepcopy(model).to("meta")


def count_flops(model: nn.Module, height: int = 224, width: int = 224,
                reuse: Sequence[int] | None = None, variant: str | None = None,
                batch: int = 1) -> FlopCount:
    """FLOPs of one forward of a (batch, C_in, height, width) input through `model`.

    Args:
        model: a DyNet (or any module whose forward takes ``(x, reuse=, variant=)``); it is not
            run itself: a meta-device copy is.
        height, width: input size (non-multiples of 8 are counted at the padded size the model
            actually runs).
        reuse, variant: which member of the family to count (default: the model's default).
        batch: batch size.
    """
    meta = _meta_copy(model)
    meta.train(model.training)
    in_channels = getattr(getattr(model, "config", None), "in_channels", 3)
    x = torch.empty(batch, in_channels, height, width, device="meta")
    return _hooked_count(meta, lambda m: m(x, reuse=reuse, variant=variant))


def count_router_flops(router: nn.Module, height: int = 224, width: int = 224,
                       batch: int = 1) -> FlopCount:
    """FLOPs of one variant router (dynet.router.VariantRouter) on a (batch, 3, height, width) input,
    in the same convention: its convolutions and linear layers (the resize, the high-pass residual
    and the pooling are elementwise work, not counted, as for DyNet)."""
    meta = _meta_copy(router)
    x = torch.empty(batch, 3, height, width, device="meta")
    return _hooked_count(meta, lambda m: m(x))


def _hooked_count(meta: nn.Module, run) -> FlopCount:
    """Run ``run(meta)`` under no_grad with FLOP-counting hooks on every conv/linear/MDTA/GDFN."""
    totals = {"conv_linear": 0, "attention": 0, "gelu": 0}

    def on_conv(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        totals["conv_linear"] += 2 * _conv_macs(module, out)  # type: ignore[arg-type]

    def on_linear(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        totals["conv_linear"] += 2 * _linear_macs(module, out)  # type: ignore[arg-type]

    def on_mdta(module: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        totals["attention"] += _attention_flops(module, inputs[0])  # type: ignore[arg-type]

    def on_gdfn(module: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        x = inputs[0]  # (B, C, H, W); GELU runs on (B, hidden, H, W)
        totals["gelu"] += x.shape[0] * module.project_out.in_channels * x.shape[-2] * x.shape[-1]

    handles = []
    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_linear))
        elif isinstance(m, MDTA):
            handles.append(m.register_forward_hook(on_mdta))
        elif isinstance(m, GDFN):
            handles.append(m.register_forward_hook(on_gdfn))
    try:
        with torch.no_grad():
            run(meta)
    finally:
        for h in handles:
            h.remove()
    return FlopCount(**totals)
