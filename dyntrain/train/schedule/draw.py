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

Recipes (``dyntrain.train.schedule.recipes`` computes their losses). ``plan_at(step)`` says what step ``step`` runs:

    dynamic   one drawn variant (the paper's recipe, the default)
    fixed     ``fixed_variant`` every step (the separate baselines)
    sandwich  every active variant (probability > 0), largest reuse first, on every micro-batch;
              their losses are summed with ``loss_weights``
    distill   (dynamic or sandwich) ``teacher``'s output, detached, is a second target of the other
              variants: in sandwich mode the teacher's own training pass of the same micro-batch;
              in dynamic mode a forward without gradient at every ``distill_every``-th step whose
              drawn variant is not the teacher

Cost-aware probabilities (``probs_policy="cost_aware"``): the probabilities are a table of
``(from_step, probs)`` entries, uniform from step 0; ``set_probs(step, probs)`` adds an entry (the
trainer's cost-aware callback does so after each validation, from figures that are the same on every
rank). The draw of step t uses the newest entry with from_step <= t, so it is a pure function of
(seed, t, the table); the table is saved with checkpoints (``state_dict``) and restored on resume.

``run_training(schedule_hook=...)`` may replace a rank's schedule by another object with the same
interface (a subclass of ``VariantSchedule`` overriding ``variant_at``, for instance).
"""
from __future__ import annotations

import datetime
from bisect import bisect_right
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from dyntrain.errors import DyntrainError
from dyntrain.seeds import splitmix64  # noqa: F401 - re-exported: the variant draw's mixing function

_MASK64 = (1 << 64) - 1


class VariantMismatchError(DyntrainError, RuntimeError):
    """Ranks disagree on the variant of an iteration (or one did not answer the check)."""


def uniform_at(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    h = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains.

    variants: the variants that get a training pass, in the order they run (one, except sandwich).
    weights: each one's loss weight.
    teacher: the variant whose detached output is the distillation target of the others, or None.
    distill_weight: weight of a student's L1 to the teacher's output.
    teacher_pass: True when the teacher runs a forward without gradient first (dynamic mode: the
        drawn variant is a student).
    """
    variants: tuple[str, ...]
    weights: tuple[float, ...]
    teacher: Optional[str] = None
    distill_weight: float = 0.0
    teacher_pass: bool = False

    @property
    def label(self) -> str:
        """The variant, or the variants joined by "+" (trace, logs, the cross-rank check)."""
        return "+".join(self.variants)


class VariantSchedule:
    """Args:
    seed: run seed (``run.seed``).
    variants: variant name -> reuse tuple (f1, f2, f3, f4) (``model.variants``).
    probs: variant name -> weight (``schedule.variant_probs``); normalised here; names missing from
        ``probs`` are never drawn in dynamic mode.
    mode: "dynamic" (draw every iteration), "fixed" (always ``fixed_variant``) or "sandwich" (every
        variant with probability > 0, every step).
    fixed_variant: the variant of fixed mode.
    loss_weights: sandwich mode: variant -> loss weight (default 1).
    teacher, distill_weight, distill_every: in-place distillation (see the module docstring).
    probs_policy: "given" (``probs``) or "cost_aware" (a table updated by ``set_probs``; dynamic only).
    """

    def __init__(self, seed: int, variants: Mapping[str, Sequence[int]],
                 probs: Optional[Mapping[str, float]] = None, mode: str = "dynamic",
                 fixed_variant: Optional[str] = None, *, loss_weights: Optional[Mapping[str, float]] = None,
                 teacher: Optional[str] = None, distill_weight: float = 0.0, distill_every: int = 1,
                 probs_policy: str = "given") -> None:
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
        elif mode in ("dynamic", "sandwich"):
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
            raise ValueError(f"schedule.mode must be 'dynamic', 'fixed' or 'sandwich', got {mode!r}")
        if probs_policy not in ("given", "cost_aware"):
            raise ValueError(f"probs_policy must be 'given' or 'cost_aware', got {probs_policy!r}")
        if probs_policy == "cost_aware" and mode != "dynamic":
            raise ValueError("schedule.variant_probs: cost_aware is a draw of schedule.mode=dynamic")
        self.probs_policy = probs_policy
        if teacher is not None and teacher not in self.variants:
            raise ValueError(f"schedule.distill.teacher {teacher!r} is not one of {self.names}")
        self.teacher = teacher if mode != "fixed" else None
        self.distill_weight = float(distill_weight)
        self.distill_every = max(1, int(distill_every))
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in self.names}
        self._cum = self._cumulative(self.probs)
        # the cost-aware table: from_step -> probabilities (entry 0: the initial ones)
        self._initial = dict(self.probs)  # what ``describe`` reports (the table may replace step 0)
        self._table: list[tuple[int, dict[str, float]]] = [(0, dict(self.probs))]
        self._table_cum: list[list[tuple[float, str]]] = [self._cum]
        self._sandwich: Optional[StepPlan] = None  # the same plan at every step
        if mode == "sandwich":
            # largest first (BigNAS order): the teacher's pass exists before its students'
            order = sorted(self.active, key=lambda n: (n != self.teacher, -sum(self.variants[n]), n))
            self._sandwich = StepPlan(tuple(order), tuple(self.loss_weights[n] for n in order),
                                      self.teacher, self.distill_weight if self.teacher else 0.0)

    def _cumulative(self, probs: Mapping[str, float]) -> list[tuple[float, str]]:
        out, acc = [], 0.0
        for n in self.names:
            if probs.get(n, 0.0) > 0:
                acc += probs[n]
                out.append((acc, n))
        return out

    @classmethod
    def from_config(cls, cfg) -> "VariantSchedule":
        """Build from a ``dyntrain.config.Config``."""
        sch = cfg.schedule
        cost_aware = isinstance(sch.variant_probs, str)
        return cls(cfg.run.seed, cfg.model.variants, None if cost_aware else sch.variant_probs,
                   mode=sch.mode, fixed_variant=sch.fixed_variant, loss_weights=sch.loss_weights,
                   teacher=sch.distill.teacher, distill_weight=sch.distill.weight,
                   distill_every=sch.distill.every,
                   probs_policy="cost_aware" if cost_aware else "given")

    @property
    def recipe(self) -> str:
        """A short name of what this schedule trains: fixed:<v>, paper, cost_aware, sandwich,
        sandwich_distill, dynamic_distill (MLflow tag ``recipe``)."""
        if self.mode == "fixed":
            return f"fixed:{self.fixed_variant}"
        if self.mode == "sandwich":
            return "sandwich_distill" if self.teacher else "sandwich"
        base = "cost_aware" if self.probs_policy == "cost_aware" else "paper"
        return f"{base}_distill" if self.teacher else base

    # ----------------------------------------------------------------------------------- draws
    @property
    def active(self) -> list[str]:
        """Variants that can be drawn (probability > 0), in sorted order."""
        return [n for _, n in self._cum]

    def variant_at(self, step: int) -> str:
        """The drawn variant of ``step`` (sandwich mode: the plan's label, e.g. "L+S")."""
        if self.fixed_variant is not None:
            return self.fixed_variant
        if self._sandwich is not None:
            return self._sandwich.label
        cum = self._table_cum[self._entry(step)]
        u = uniform_at(self.seed, step)
        for c, name in cum:
            if u < c:
                return name
        return cum[-1][1]  # u within rounding of 1.0

    def _entry(self, step: int) -> int:
        """Index of the table entry the draw of ``step`` uses (the newest with from_step <= step)."""
        return bisect_right(self._table, step, key=itemgetter(0)) - 1

    def probs_at(self, step: int) -> dict[str, float]:
        """The probabilities the draw of ``step`` uses."""
        return dict(self._table[self._entry(step)][1])

    def plan_at(self, step: int) -> StepPlan:
        """What step ``step`` trains (see ``StepPlan``)."""
        if self._sandwich is not None:
            return self._sandwich
        name = self.variant_at(step)
        if self.teacher is not None and name != self.teacher and step % self.distill_every == 0:
            return StepPlan((name,), (1.0,), self.teacher, self.distill_weight, teacher_pass=True)
        return StepPlan((name,), (1.0,))

    # ---------------------------------------------------------------------- cost-aware table
    def set_probs(self, step: int, probs: Mapping[str, float]) -> None:
        """From ``step`` on, draw with ``probs`` (normalised; call with the same values on every
        rank, at a step no later than the next one to be drawn)."""
        total = float(sum(probs.values()))
        if total <= 0 or any(p < 0 for p in probs.values()) or set(probs) - set(self.names):
            raise ValueError(f"set_probs: bad probabilities {dict(probs)}")
        clean = {n: float(probs.get(n, 0.0)) / total for n in self.names}
        while self._table and self._table[-1][0] >= step and len(self._table) > 1:
            self._table.pop()
            self._table_cum.pop()
        if self._table[-1][0] == step:  # step 0: replace the initial entry
            self._table[-1], self._table_cum[-1] = (step, clean), self._cumulative(clean)
        else:
            self._table.append((int(step), clean))
            self._table_cum.append(self._cumulative(clean))
        self.probs = clean

    def state_dict(self) -> dict[str, Any]:
        """The probability table (checkpoints): with ``describe`` all the draw depends on."""
        return {"table": [[s, dict(p)] for s, p in self._table]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        table = state.get("table") or []
        if not table:
            return
        self._table = [(int(s), {n: float(p.get(n, 0.0)) for n in self.names}) for s, p in table]
        self._table_cum = [self._cumulative(p) for _, p in self._table]
        self.probs = dict(self._table[-1][1])

    def reuse_at(self, step: int) -> tuple[int, ...]:
        return self.variants[self.variant_at(step)]

    def index_of(self, name: str) -> int:
        return self.names.index(name)

    def code_of(self, label: str) -> int:
        """A variant or "+"-joined set of variants as one integer (bit i = ``names[i]``)."""
        return sum(1 << self.names.index(n) for n in label.split("+"))

    def label_of(self, code: int) -> str:
        names = [n for i, n in enumerate(self.names) if code >> i & 1]
        return "+".join(names) if names and code < (1 << len(self.names)) else f"#{code}"

    def sequence(self, start: int, count: int) -> list[str]:
        return [self.variant_at(t) for t in range(start, start + count)]

    def describe(self) -> dict:
        """Everything the draw depends on (saved with checkpoints to detect a changed schedule)."""
        out = {"seed": self.seed, "mode": self.mode, "fixed_variant": self.fixed_variant,
               "probs": dict(self._initial),
               "variants": {n: list(r) for n, r in self.variants.items()}}
        if self.probs_policy != "given":
            out["probs_policy"] = self.probs_policy
        if self.mode == "sandwich":
            out["loss_weights"] = dict(self.loss_weights)
        if self.teacher is not None:
            out["distill"] = {"teacher": self.teacher, "weight": self.distill_weight,
                              "every": self.distill_every}
        return out


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
    mine = torch.tensor([step, schedule.code_of(variant)], dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as exc:  # gloo raises on timeout or when a peer died
        raise VariantMismatchError(
            f"variant check at step {step}: rank {rank} got no answer from every rank within "
            f"{timeout_s:g}s (a rank is at another step or gone): {exc}") from None
    seen = {r: (int(t[0]), schedule.label_of(int(t[1]))) for r, t in enumerate(gathered)}
    ref = seen[0]
    bad = [r for r, v in seen.items() if v != ref]
    if bad:
        listing = ", ".join(f"rank {r}: step {s} variant {v}" for r, (s, v) in seen.items())
        raise VariantMismatchError(
            f"variant check at step {step}: ranks {bad} disagree with rank 0 ({listing})")
