"""The clipping norm does not depend on how ZeRO partitions the gradients (``dyntrain.train.gradnorm``),
through the optimizer hook and a real 2-process gloo all-reduce: one rank holding every slice and two
ranks holding half each (a tensor split between them, as ZeRO's flat partitions do) get the same
float32 norm; DeepSpeed's own formula (per-rank float32 partial sums) does not for these gradients.
``tests/test_engine_config.py`` checks the exact sum itself over many cuts in one process."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port


class _ZeroLike:
    """What ``gradnorm.use_exact_norm`` needs of a ZeRO 1/2 optimizer: the model's parameters
    (``bit16_groups``, the same on every rank), its process group and device."""
    dp_process_group = None
    device = "cpu"
    averaged_gradients: dict = {}

    def __init__(self, numel: int) -> None:
        self.bit16_groups = [[torch.empty(numel)]]

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        raise AssertionError("replaced by use_exact_norm()")


def _gradients(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * s for n, s in ((1000, 1e-3), (37, 3.0), (4096, 1e-2), (513, 0.3))]


def _split(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two partitions of the flattened gradients, the boundary inside the third tensor."""
    flat = torch.cat(grads)
    half = flat.numel() // 2
    out, start = ([], []), 0
    for t in grads:
        end = start + t.numel()
        if end <= half:
            out[0].append(t)
        elif start >= half:
            out[1].append(t)
        else:
            out[0].append(t[: half - start])
            out[1].append(t[half - start:])
        start = end
    return out


def _deepspeed_formula(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """DeepSpeed 0.19's ZeRO 1/2 2-norm: float64 slice norms, squared and summed per rank, cast to
    float32, summed over ranks in float32."""
    total = torch.zeros((), dtype=torch.float32)
    for part in parts:
        total += torch.stack([torch.linalg.vector_norm(t.double()) for t in part]).pow(2).sum().float()
    return total.sqrt()


def _norm_of(grads: list[torch.Tensor], numel: int) -> torch.Tensor:
    from dyntrain.train.gradnorm import use_exact_norm

    opt = _ZeroLike(numel)
    assert use_exact_norm(opt)
    return opt.get_grad_norm_direct(grads, [torch.nn.Parameter(torch.empty(0)) for _ in grads])


def _rank(rank: int, port: int, seed: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        grads = _gradients(seed)
        out[rank] = _norm_of(_split(grads)[rank], sum(g.numel() for g in grads)).item()
    finally:
        dist.destroy_process_group()


def _a_partition_sensitive_seed() -> int:
    for seed in range(200):
        grads = _gradients(seed)
        if not torch.equal(_deepspeed_formula([grads]), _deepspeed_formula(list(_split(grads)))):
            return seed
    pytest.fail("no gradients among 200 seeds whose DeepSpeed norm depends on the partitioning")


def test_the_clipping_norm_is_the_same_on_one_and_two_ranks():
    seed = _a_partition_sensitive_seed()
    grads = _gradients(seed)
    one_rank = _norm_of(grads, sum(g.numel() for g in grads))
    assert one_rank.dtype == torch.float32
    assert one_rank.item() == pytest.approx(torch.cat(grads).double().norm().item(), rel=1e-7)
    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(free_port(), seed, out), nprocs=2, start_method="spawn")
    assert out[0] == out[1] == one_rank.item()
    # DeepSpeed's own formula gives the two layouts different norms here (the bug this replaces)
    assert _deepspeed_formula([grads]).item() != _deepspeed_formula(list(_split(grads))).item()


def test_only_the_two_norm_is_replaced_and_other_optimizers_are_left_alone():
    from dyntrain.train.gradnorm import use_exact_norm

    calls = []

    class Opt(_ZeroLike):
        def get_grad_norm_direct(self, gradients, params, norm_type=2):
            calls.append(norm_type)
            return torch.tensor(7.0)

    opt = Opt(3)
    assert use_exact_norm(opt)
    assert opt.get_grad_norm_direct([torch.ones(3)], [None], norm_type=float("inf")).item() == 7.0
    assert calls == [float("inf")]
    assert opt.get_grad_norm_direct([torch.full((3,), float("nan"))], [None]).item() == -1.0
    assert not use_exact_norm(object())
