"""The optional cross-rank check of the variant draw (``schedule.verify_every``): every rank
all-gathers (step, variant code) over a dedicated gloo group with a short timeout and raises
``VariantMismatchError`` naming the ranks when they disagree - or when a rank does not answer within
the timeout - so a disagreement can never hang the job."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from dyntrain.errors import DyntrainError


class VariantMismatchError(DyntrainError, RuntimeError):
    """Ranks disagree on the variant of a step (or one did not answer the check in time)."""


def code_of(names: list[str], label: str) -> int:
    """A variant or "+"-joined set of variants as one integer (bit i = ``names[i]``)."""
    return sum(1 << names.index(n) for n in label.split("+"))


def label_of(names: list[str], code: int) -> str:
    chosen = [n for i, n in enumerate(names) if code >> i & 1]
    return "+".join(chosen) if chosen and code < (1 << len(names)) else f"#{code}"


def new_verify_group(timeout_s: float):
    """A gloo process group with a short timeout for ``verify_draw`` (all ranks must call this)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def verify_draw(step: int, variant: str, schedule, group, rank: int,
                world_size: int, timeout_s: float) -> None:
    """All-gather (step, variant index) from every rank; raise ``VariantMismatchError`` naming the
    ranks if any disagree, or if the gather does not complete within ``timeout_s``."""
    if world_size <= 1 or group is None:
        return
    mine = torch.tensor([step, code_of(schedule.names, variant)], dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as exc:  # gloo raises on timeout or when a peer died
        raise VariantMismatchError(
            f"variant check at step {step}: rank {rank} got no answer from every rank within "
            f"{timeout_s:g}s (a rank is at another step or gone): {exc}") from None
    seen = {r: (int(t[0]), label_of(schedule.names, int(t[1]))) for r, t in enumerate(gathered)}
    ref = seen[0]
    bad = [r for r, v in seen.items() if v != ref]
    if bad:
        listing = ", ".join(f"rank {r}: step {s} variant {v}" for r, (s, v) in seen.items())
        raise VariantMismatchError(
            f"variant check at step {step}: ranks {bad} disagree with rank 0 ({listing})")
