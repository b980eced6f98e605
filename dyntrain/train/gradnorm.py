"""A gradient norm for clipping that does not depend on how ZeRO partitions the gradients.

DeepSpeed's ZeRO stage 1/2 optimizer clips with the global norm it computes as: on each rank, the
float64 norms of the gradient slices in its partition, squared and summed, **cast to float32**, then
all-reduced in float32. One rank holding every slice rounds the sum once; two ranks round two partial
sums and their float32 sum. The norms then differ in the last bit, and on a step where clipping
engages (norm > ``optim.grad_clip``) the clip factor, and so every gradient, differs: a run resumed on
1 rank hosting the readers of 2 data ranks drifted from the 2-rank run by ~1e-7 at the first clipped
step, although its samples, losses and unclipped gradients were bit-identical (the chaos soak at
seeds 3 and 8).

``install(optimizer)`` replaces that optimizer's ``get_grad_norm_direct`` (2-norm) with one that keeps
the sum of squares in float64 through the all-reduce and rounds to float32 once, after the square
root. The partitions still group the float64 sum differently (~1e-16 relative), so the float32 norm
is the same on any number of ranks unless the float64 value falls within that of a float32 rounding
boundary (about 1 clipped step in 10^8-10^9). Stage 3 already reduces in float64; stage 0 has no
partitions (every rank sums the whole gradient in the same order). The infinity norm is left to
DeepSpeed (a maximum is exact).
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def install(optimizer: Any) -> bool:
    """Give a ZeRO 1/2 optimizer the partition-independent 2-norm; False (and a warning) when the
    optimizer does not have DeepSpeed's ``get_grad_norm_direct`` (another stage or DeepSpeed version)."""
    original = getattr(optimizer, "get_grad_norm_direct", None)
    if original is None or not hasattr(optimizer, "dp_process_group"):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(_norm(original), optimizer)
    return True


def _norm(original):
    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        device = next((g.device for g in gradients), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float64, device=device)
        mp_rank = getattr(self, "model_parallel_rank", 0)
        kept = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for g, p in zip(kept, params):
            if getattr(p, "ds_pipe_replicated", False):   # pipeline replicas: counted once
                continue
            if getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False) or mp_rank == 0:
                total += g.detach().to(torch.float64).square().sum()
        if dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        if hasattr(self, "_model_parallel_all_reduce"):
            self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        norm = total.sqrt().float()
        return norm.masked_fill_(~torch.isfinite(norm), -1.0)   # DeepSpeed's mark of an invalid norm

    return get_grad_norm_direct
