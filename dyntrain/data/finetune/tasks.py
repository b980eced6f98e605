"""The task curriculum of multiple-in-one fine-tuning (MiOIR's sequential learning).

    mixed:       every task of ``data.tasks`` from the start, drawn by weight; the LR follows ``optim``.
    sequential:  training is cut into periods of ``schedule.tasks.period_steps`` steps; period k
                 (1-based, at most ``periods``) trains the first min(k, len(order)) tasks of
                 ``order``, drawn uniformly (earlier tasks stay in the mix), and the learning rate
                 restarts at every period: optional linear warm-up over ``warmup_steps``, then a
                 cosine from ``optim.lr`` to ``optim.min_lr`` over the rest of the period. Past the
                 last period the last period's tasks and its final LR stay.

The task of a sample is a pure function of (seed, step, global sample index), where the global index
of sample i of micro-batch m on rank r is ``(m * world_size + r) * micro_batch + i``: every rank
agrees on every sample's task with no communication, a resume mid-period draws the same tasks, and
the draw is independent of the S/L draw (a different salt on the same SplitMix64 counter).

The LR of a sequential curriculum (``lr_at``) is a function of the step alone, so a resume continues
it exactly; ``dyntrain.train.curriculum.CurriculumLR`` hands it to DeepSpeed as the run's scheduler
(DeepSpeed's built-in schedulers have no cosine-with-restarts).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from dyntrain.logs import get_logger
from dyntrain.seeds import splitmix64


log = get_logger(__name__)

_TASK_SALT = 0x7A5C_3E11_D00D_F00D
_MASK64 = (1 << 64) - 1


class TaskCurriculum:
    """Args:
    seed: ``run.seed``.
    weights: task -> weight (``data.tasks``; tasks with weight 0 are never drawn in mixed mode).
    mode: "mixed" or "sequential".
    order, period_steps, periods, warmup_steps: ``schedule.tasks``.
    lr, min_lr: the peak and final LR of every period (``optim.lr``, ``optim.min_lr``).
    """

    def __init__(self, seed: int, weights: Mapping[str, float], mode: str = "mixed",
                 order: Sequence[str] = (), period_steps: int = 1000, periods: int = 10,
                 warmup_steps: int = 0, lr: float = 1e-4, min_lr: float = 0.0) -> None:
        self.seed, self.mode = int(seed), mode
        self.period_steps, self.periods, self.warmup_steps = int(period_steps), int(periods), int(warmup_steps)
        self.lr, self.min_lr = float(lr), float(min_lr)
        if mode == "sequential":
            missing = [t for t in order if t not in weights]
            if missing:
                raise ValueError(f"schedule.tasks.order: tasks {missing} are not in data.tasks ({list(weights)})")
            self.order = list(order)
            self.weights = {t: 1.0 for t in self.order}
        elif mode == "mixed":
            self.weights = {t: float(w) for t, w in weights.items() if w > 0}
            if not self.weights:
                raise ValueError(f"data.tasks: no task has a positive weight ({dict(weights)})")
            self.order = list(self.weights)
        else:
            raise ValueError(f"schedule.tasks.mode must be 'mixed' or 'sequential', got {mode!r}")

    @classmethod
    def from_config(cls, cfg) -> "TaskCurriculum":
        t = cfg.schedule.tasks
        return cls(cfg.run.seed, cfg.data.tasks, t.mode, t.order, t.period_steps, t.periods,
                   t.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)

    # --------------------------------------------------------------------------------- draws
    def period_at(self, step: int) -> int:
        """The 1-based period of ``step`` (always 1 in mixed mode)."""
        if self.mode == "mixed":
            return 1
        return min(step // self.period_steps + 1, self.periods)

    def active_at(self, step: int) -> list[str]:
        """The tasks drawn at ``step``, in curriculum order."""
        if self.mode == "mixed":
            return list(self.order)
        return self.order[:min(self.period_at(step), len(self.order))]

    def task_at(self, step: int, index: int) -> str:
        """The task of global sample ``index`` of ``step``."""
        active = self.active_at(step)
        h = splitmix64(splitmix64(splitmix64((self.seed ^ _TASK_SALT) & _MASK64) ^ (step & _MASK64))
                       ^ (index & _MASK64))
        u = (h >> 11) * (1.0 / (1 << 53)) * sum(self.weights[t] for t in active)
        for task in active:
            u -= self.weights[task]
            if u < 0:
                return task
        return active[-1]

    def lr_at(self, step: int) -> Optional[float]:
        """The LR of ``step`` in sequential mode (None in mixed mode: ``optim`` decides)."""
        if self.mode == "mixed":
            return None
        pos = step - (self.period_at(step) - 1) * self.period_steps
        if pos < self.warmup_steps:
            return self.lr * (pos + 1) / (self.warmup_steps + 1)
        span = max(1, self.period_steps - self.warmup_steps)
        frac = min(1.0, (pos - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))

    def describe(self) -> dict:
        return {"mode": self.mode, "order": self.order, "weights": self.weights, "seed": self.seed,
                "period_steps": self.period_steps, "periods": self.periods, "warmup_steps": self.warmup_steps}


def task_curriculum(cfg) -> Optional[TaskCurriculum]:
    """The task curriculum by which the fine-tuning loader of ``cfg`` draws each sample's task: the
    synthetic pairs (either mode) and the paired folders in sequential mode; None where the loader
    draws from a fixed mix (paired folders in mixed mode, paired shards)."""
    source = cfg.data.source
    if source == "synthetic" or (source == "paired" and cfg.schedule.tasks.mode == "sequential"):
        return TaskCurriculum.from_config(cfg)
    return None
