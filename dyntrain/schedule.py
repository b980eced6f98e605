"""Which DyNet variant trains at each global iteration.

The variant of global iteration ``t`` is a pure function of ``(seed, t, probs)``:

    u = uniform53(splitmix64(splitmix64(seed) XOR t))        # counter-based, no state
    variant = first name n (in sorted order) with u < cumsum(probs normalised)[n]

Every rank evaluates the same function, so all ranks agree without communication, a resumed run
draws the same sequence, and the draw of step 10**6 costs as little as the draw of step 0. Python's
``hash()`` is never used (it is salted per process). Any number of variants works; a variant with
probability 0 is never drawn. In ``mode="fixed"`` every iteration trains ``fixed_variant`` (the
separate-training baselines of the paper).

``verify_draw`` is the optional cross-rank check (``schedule.verify_every``): every rank
all-gathers (step, variant index) over a dedicated gloo group with a short timeout and raises
``VariantMismatchError`` naming the ranks when they disagree — or when a rank does not answer within
the timeout — so a disagreement can never hang the job.

``run_training(schedule_hook=...)`` may replace a rank's schedule by another object with the same
interface (a subclass of ``VariantSchedule`` overriding ``variant_at``, for instance).
"""
from __future__ import annotations

import datetime
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import DyntrainError
from .seeds import splitmix64  # noqa: F401 - re-exported: the variant draw's mixing function

_MASK64 = (1 << 64) - 1


class VariantMismatchError(DyntrainError, RuntimeError):
    """Ranks disagree on the variant of an iteration (or one did not answer the check)."""


def uniform_at(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    h = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


class VariantSchedule:
    """Args:
    seed: run seed (``run.seed``).
    variants: variant name -> reuse tuple (f1, f2, f3, f4) (``model.variants``).
    probs: variant name -> weight (``schedule.variant_probs``); normalised here; names missing from
        ``probs`` are never drawn in dynamic mode.
    mode: "dynamic" (draw every iteration) or "fixed" (always ``fixed_variant``).
    fixed_variant: the variant of fixed mode.
    """

    def __init__(self, seed: int, variants: Mapping[str, Sequence[int]],
                 probs: Optional[Mapping[str, float]] = None, mode: str = "dynamic",
                 fixed_variant: Optional[str] = None) -> None:
        if not variants:
            raise ValueError("VariantSchedule: no variants")
        self.seed = int(seed)
        self.variants = {name: tuple(int(f) for f in reuse) for name, reuse in variants.items()}
        self.names = sorted(self.variants)
        self.mode = mode
        if mode == "fixed":
            if fixed_variant not in self.variants:
                raise ValueError(f"schedule.fixed_variant {fixed_variant!r} is not one of {self.names}")
            self.fixed_variant: Optional[str] = fixed_variant
            self.probs = {n: float(n == fixed_variant) for n in self.names}
        elif mode == "dynamic":
            self.fixed_variant = None
            probs = dict(probs) if probs else {n: 1.0 for n in self.names}
            unknown = sorted(set(probs) - set(self.variants))
            if unknown:
                raise ValueError(f"schedule.variant_probs.{unknown[0]}: no such variant in {self.names}")
            total = float(sum(probs.values()))
            if total <= 0 or any(p < 0 for p in probs.values()):
                raise ValueError(f"schedule.variant_probs: need non-negative weights with a positive "
                                 f"sum, got {probs}")
            self.probs = {n: float(probs.get(n, 0.0)) / total for n in self.names}
        else:
            raise ValueError(f"schedule.mode must be 'dynamic' or 'fixed', got {mode!r}")
        self._cum: list[tuple[float, str]] = []
        acc = 0.0
        for n in self.names:
            if self.probs[n] > 0:
                acc += self.probs[n]
                self._cum.append((acc, n))

    @classmethod
    def from_config(cls, cfg) -> "VariantSchedule":
        """Build from a ``dyntrain.config.Config``."""
        return cls(cfg.run.seed, cfg.model.variants, cfg.schedule.variant_probs,
                   mode=cfg.schedule.mode, fixed_variant=cfg.schedule.fixed_variant)

    # ----------------------------------------------------------------------------------- draws
    @property
    def active(self) -> list[str]:
        """Variants that can be drawn (probability > 0), in sorted order."""
        return [n for _, n in self._cum]

    def variant_at(self, step: int) -> str:
        if self.fixed_variant is not None:
            return self.fixed_variant
        u = uniform_at(self.seed, step)
        for cum, name in self._cum:
            if u < cum:
                return name
        return self._cum[-1][1]  # u within rounding of 1.0

    def reuse_at(self, step: int) -> tuple[int, ...]:
        return self.variants[self.variant_at(step)]

    def index_of(self, name: str) -> int:
        return self.names.index(name)

    def sequence(self, start: int, count: int) -> list[str]:
        return [self.variant_at(t) for t in range(start, start + count)]

    def describe(self) -> dict:
        """Everything the draw depends on (saved with checkpoints to detect a changed schedule)."""
        return {"seed": self.seed, "mode": self.mode, "fixed_variant": self.fixed_variant,
                "probs": dict(self.probs), "variants": {n: list(r) for n, r in self.variants.items()}}


# ------------------------------------------------------------------------------ cross-rank check
def new_verify_group(timeout_s: float):
    """A gloo process group with a short timeout for ``verify_draw`` (all ranks must call this)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def verify_draw(step: int, variant: str, schedule: VariantSchedule, group, rank: int,
                world_size: int, timeout_s: float) -> None:
    """All-gather (step, variant index) from every rank; raise ``VariantMismatchError`` naming the
    ranks if any disagree, or if the gather does not complete within ``timeout_s``."""
    if world_size <= 1 or group is None:
        return
    mine = torch.tensor([step, schedule.index_of(variant)], dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as exc:  # gloo raises on timeout or when a peer died
        raise VariantMismatchError(
            f"variant check at step {step}: rank {rank} got no answer from every rank within "
            f"{timeout_s:g}s (a rank is at another step or gone): {exc}") from None
    seen = {r: (int(t[0]), schedule.names[int(t[1])] if 0 <= int(t[1]) < len(schedule.names)
                else f"#{int(t[1])}") for r, t in enumerate(gathered)}
    ref = seen[0]
    bad = [r for r, v in seen.items() if v != ref]
    if bad:
        listing = ", ".join(f"rank {r}: step {s} variant {v}" for r, (s, v) in seen.items())
        raise VariantMismatchError(
            f"variant check at step {step}: ranks {bad} disagree with rank 0 ({listing})")
