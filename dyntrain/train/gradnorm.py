"""The global gradient norm behind gradient clipping, the same bits on every world size.

DeepSpeed's ZeRO-1/2 optimizer takes the norm as a float32 sum over its rank's partition of the
gradients, all-reduced over the ranks. The partitions depend on the world size (a parameter may be
cut in two at a partition edge), so 1 rank and 2 ranks add the same squares in other orders and get
norms a few ulps apart. Whenever clipping is active (norm above ``optim.grad_clip``), the clip factor
and so every gradient element then differ in their last bits, and the weights drift apart: a run
resumed on fewer ranks hosting the original data ranks (``dyntrain.data.logical``), or a 2-rank
resume of its 1-rank checkpoint, was not the original run bit for bit (the chaos soak's seed 7 and
seed 3 schedules: final weights different after a 1-rank segment with clipped steps).

``exact_sum_of_squares`` adds the squares exactly, in integers: each float32 element squared in
float64 is exact (24-bit mantissa -> 48 bits); every square is cut into a fixed-point integer part
and a 31-bit fraction on a scale shared by all ranks (from the largest square and the number of
gradient elements of the model, both the same on any world size), and integer sums do not depend on
the order or on the cut into partitions. What is dropped below the last fraction bit (2^-31 of the
quantum, per element) changes the norm by far less than float32 resolves, and identically everywhere.
``use_exact_norm`` puts it in place of ``get_grad_norm_direct`` on a ZeRO-1/2 optimizer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


_FRACTION_BITS = 31


def exact_sum_of_squares(parts: Sequence[torch.Tensor], total_elements: int,
                         group=None) -> Optional[float]:
    """Sum of the squares of every element of ``parts`` (this rank's pieces of the gradient) over all
    ranks of ``group``, the same float64 value however the elements are split between ranks and
    pieces; None when some element is not finite (on any rank). ``total_elements``: the number of
    gradient elements of the whole model (the same on every rank and world size). One piece at a
    time in float64: the extra memory is that of the largest piece."""
    parts = [p.detach().reshape(-1) for p in parts if p.numel()]
    device = parts[0].device if parts else torch.device("cpu")
    head = torch.zeros(2, dtype=torch.float64, device=device)     # largest square, any non-finite
    for p in parts:
        square = p.to(torch.float64).square()
        head[0] = torch.maximum(head[0], square.max())
        head[1] = torch.maximum(head[1], (~torch.isfinite(square)).any().to(torch.float64))
    if _distributed(group):
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
    largest, bad = float(head[0]), bool(head[1])
    if bad or not math.isfinite(largest):
        return None
    if largest == 0.0:
        return 0.0
    # scale so that the largest square times every element of the model stays below 2^62
    exponent = math.frexp(largest)[1]                     # largest < 2^exponent
    headroom = max(1, int(total_elements)).bit_length()   # elements < 2^headroom
    scale = 62 - headroom - exponent
    bits = max(0, min(_FRACTION_BITS, 62 - headroom))     # the fractions' sum fits in 63 bits too
    sums = torch.zeros(2, dtype=torch.int64, device=device)       # whole parts, 31-bit fractions
    for p in parts:
        scaled = torch.ldexp(p.to(torch.float64).square(), torch.tensor(float(scale), dtype=torch.float64,
                                                                         device=device))
        whole = torch.floor(scaled)
        fraction = torch.floor(torch.ldexp(scaled - whole, torch.tensor(float(bits), dtype=torch.float64,
                                                                        device=device)))
        sums += torch.stack([whole.to(torch.int64).sum(), fraction.to(torch.int64).sum()])
    if _distributed(group):
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    whole_sum, fraction_sum = (int(v) for v in sums.tolist())
    exact = whole_sum * 2**bits + fraction_sum              # a Python int: no rounding
    return math.ldexp(float(exact), -(scale + bits))


def use_exact_norm(optimizer) -> bool:
    """Give a DeepSpeed ZeRO-1/2 optimizer the world-size-independent L2 norm (other norms and other
    optimizers keep DeepSpeed's); returns whether it was installed."""
    original = getattr(optimizer, "get_grad_norm_direct", None)
    groups = getattr(optimizer, "bit16_groups", None)
    if original is None or groups is None or not hasattr(optimizer, "averaged_gradients"):
        return False
    # lazy: deepspeed is slow to import and unused by inference
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    total = sum(p.numel() for group in groups for p in group)
    group = getattr(optimizer, "dp_process_group", None)

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        parts = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        device = parts[0].device if parts else torch.device(optimizer.device)
        squares = exact_sum_of_squares(parts, total, group)
        norm = float("nan") if squares is None else math.sqrt(squares)
        out = torch.tensor(norm, dtype=torch.float32, device=device)
        mask_nan_or_inf_with_val_inplace(out, device=device)
        return out

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1
