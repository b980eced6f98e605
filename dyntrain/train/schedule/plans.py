"""What each optimizer step trains: ``VariantSchedule.plan_at(step) -> StepPlan``.

The recipes (``dyntrain.train.schedule.recipes`` computes their losses):

    dynamic   one drawn variant (the paper's recipe, the default; ``dyntrain.train.schedule.draw``)
    fixed     ``fixed_variant`` every step (the separate baselines of the paper)
    sandwich  every active variant (probability > 0), largest reuse first, on every micro-batch;
              their losses are summed with ``loss_weights``
    distill   (dynamic or sandwich) ``teacher``'s output, detached, is a second target of the other
              variants: in sandwich mode the teacher's own training pass of the same micro-batch;
              in dynamic mode a forward without gradient at every ``distill_every``-th step whose
              drawn variant is not the teacher

The rules (a fixed variant that exists, probabilities over known variants, cost-aware only in
dynamic mode, a teacher that trains) are validated once, by the config (``dyntrain.config``).
``run_training(schedule_hook=...)`` may replace a rank's schedule by another object with the same
interface (a subclass of ``VariantSchedule`` overriding ``variant_at``, for instance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from dyntrain.train.schedule.draw import ProbabilityTable, cumulative, draw, normalised


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
        self.seed = int(seed)
        self.variants = {name: tuple(int(f) for f in reuse) for name, reuse in variants.items()}
        self.names = sorted(self.variants)
        self.mode = mode
        self.fixed_variant: Optional[str] = fixed_variant if mode == "fixed" else None
        if mode == "fixed":
            self.probs = {n: float(n == fixed_variant) for n in self.names}
        else:
            self.probs = normalised(self.names, probs or {n: 1.0 for n in self.names})
        self.probs_policy = probs_policy
        self.teacher = teacher if mode != "fixed" else None
        self.distill_weight = float(distill_weight)
        self.distill_every = max(1, int(distill_every))
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in self.names}
        self._cum = cumulative(self.names, self.probs)
        self._initial = dict(self.probs)  # what ``describe`` reports (the table may replace step 0)
        self.table = ProbabilityTable(self.names, self.probs)
        self._sandwich: Optional[StepPlan] = None  # the same plan at every step
        if mode == "sandwich":
            # largest first (BigNAS order): the teacher's pass exists before its students'
            order = sorted(self.active, key=lambda n: (n != self.teacher, -sum(self.variants[n]), n))
            self._sandwich = StepPlan(tuple(order), tuple(self.loss_weights[n] for n in order),
                                      self.teacher, self.distill_weight if self.teacher else 0.0)

    @classmethod
    def from_config(cls, cfg) -> "VariantSchedule":
        """Build from a ``dyntrain.config.Config`` (which has validated every rule)."""
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
        return draw(self.seed, step, self.table.cumulative_at(step))

    def plan_at(self, step: int) -> StepPlan:
        """What step ``step`` trains (see ``StepPlan``)."""
        if self._sandwich is not None:
            return self._sandwich
        name = self.variant_at(step)
        if self.teacher is not None and name != self.teacher and step % self.distill_every == 0:
            return StepPlan((name,), (1.0,), self.teacher, self.distill_weight, teacher_pass=True)
        return StepPlan((name,), (1.0,))

    # ---------------------------------------------------------------------- cost-aware table
    def probs_at(self, step: int) -> dict[str, float]:
        """The probabilities the draw of ``step`` uses."""
        return self.table.at(step)

    def set_probs(self, step: int, probs: Mapping[str, float]) -> None:
        """From ``step`` on, draw with ``probs`` (normalised; call with the same values on every
        rank, at a step no later than the next one to be drawn)."""
        self.probs = self.table.set(step, probs)

    def state_dict(self) -> dict[str, Any]:
        """The probability table (checkpoints): with ``describe`` all the draw depends on."""
        return self.table.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.table.load_state_dict(state)
        self.probs = self.table.latest

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
