"""The ``schedule`` section: the variant draw and the training recipes (``dyntrain.train.schedule``), and the
fine-tuning task curriculum (``dyntrain.data.finetune.tasks``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from dyntrain.config.typed import ConfigError, positive


@dataclass
class TaskScheduleConfig:
    """Args (the task curriculum, ``dyntrain.data.finetune.tasks``):
    mode: "mixed" (every task of data.tasks from the start, by weight) or "sequential" (period k
        trains the first min(k, len(order)) tasks of ``order``, uniformly; the LR restarts per period).
    order: the sequential order of tasks.
    period_steps: optimizer steps per period.
    periods: number of periods (after the last one, the last period's tasks and final LR stay).
    warmup_steps: linear LR warm-up at the start of every period (sequential mode).
    """
    mode: Literal["mixed", "sequential"] = "mixed"
    order: list[str] = field(default_factory=lambda: ["sr", "blur", "noise", "jpeg", "rain", "haze", "lowlight"])
    period_steps: int = 1000
    periods: int = 10
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        positive("schedule.tasks.period_steps", self.period_steps)
        positive("schedule.tasks.periods", self.periods)
        if not self.order or len(set(self.order)) != len(self.order):
            raise ConfigError(f"schedule.tasks.order: need distinct task names, got {self.order}")
        if not 0 <= self.warmup_steps < self.period_steps:
            raise ConfigError(f"schedule.tasks.warmup_steps: must lie in [0, period_steps), got {self.warmup_steps}")


@dataclass
class DistillConfig:
    """Args (in-place distillation, ``dyntrain.train.schedule.recipes``):
    teacher: the variant whose output (detached) the other variants also learn from; None = off.
    weight: weight of the student's L1 to the teacher's output, added to its L1 to the target.
    every: dynamic mode only: a teacher forward (no gradient) every ``every`` steps whose drawn
        variant is not the teacher; sandwich mode uses the teacher's own training pass every step.
    """
    teacher: Optional[str] = None
    weight: float = 1.0
    every: int = 1

    def __post_init__(self) -> None:
        positive("schedule.distill.every", self.every)
        if self.weight < 0:
            raise ConfigError(f"schedule.distill.weight: must be >= 0, got {self.weight}")


@dataclass
class CostAwareConfig:
    """Args (``schedule.variant_probs: cost_aware``, ``dyntrain.train.schedule.recipes.cost_aware_probs``):
    headroom_db: every variant's quality gap is its distance in val PSNR below the best variant
        plus this headroom (so the leading variant keeps a share).
    min_prob: no variant is drawn with a probability below this.
    """
    headroom_db: float = 1.0
    min_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.headroom_db <= 0:
            raise ConfigError(f"schedule.cost_aware.headroom_db: must be positive, got {self.headroom_db}")
        if not 0 <= self.min_prob < 1:
            raise ConfigError(f"schedule.cost_aware.min_prob: must lie in [0, 1), got {self.min_prob}")


@dataclass
class ScheduleConfig:
    """Args:
    mode: "dynamic" draws a variant every iteration (the paper's recipe); "fixed" always trains
        ``fixed_variant`` (the separate-training baselines the paper compares against); "sandwich"
        runs every active variant on every micro-batch and sums their losses (``dyntrain.train.schedule.recipes``).
    variant_probs: variant name -> probability (normalised); every name must be in model.variants.
        In sandwich mode the variants with a positive weight are the ones that run. "cost_aware"
        (dynamic mode): every variant of model.variants, drawn uniformly until the first validation,
        then by ``cost_aware_probs`` of the validation history (needs data.val_urls).
    loss_weights: sandwich mode: variant name -> weight of its loss in the sum (default 1 each).
    distill: in-place distillation from a teacher variant (``DistillConfig``).
    cost_aware: the cost-aware draw's settings (``CostAwareConfig``).
    verify_every: every N steps all ranks all-gather their draw and fail fast on disagreement (0 = off).
    verify_timeout_s: seconds the check waits for every rank before failing (it never hangs).
    tasks: the fine-tuning task curriculum (``TaskScheduleConfig``).
    """
    mode: Literal["dynamic", "fixed", "sandwich"] = "dynamic"
    variant_probs: Union[dict[str, float], Literal["cost_aware"]] = field(
        default_factory=lambda: {"S": 0.5, "L": 0.5})
    fixed_variant: str = "L"
    loss_weights: dict[str, float] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cost_aware: CostAwareConfig = field(default_factory=CostAwareConfig)
    verify_every: int = 0
    verify_timeout_s: float = 60.0
    tasks: TaskScheduleConfig = field(default_factory=TaskScheduleConfig)

    @property
    def probs_given(self) -> dict[str, float]:
        """The explicit probabilities ({} under cost_aware)."""
        return {} if isinstance(self.variant_probs, str) else dict(self.variant_probs)

    def __post_init__(self) -> None:
        probs = self.probs_given
        if probs and (any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0):
            raise ConfigError(f"schedule.variant_probs: need non-negative weights with a positive sum, "
                              f"got {self.variant_probs}")
        if isinstance(self.variant_probs, str) and self.mode != "dynamic":
            raise ConfigError(f"schedule.variant_probs: cost_aware is a draw of schedule.mode=dynamic, "
                              f"not of {self.mode!r}")
        if any(w < 0 for w in self.loss_weights.values()):
            raise ConfigError(f"schedule.loss_weights: need non-negative weights, got {self.loss_weights}")
        if self.verify_every < 0:
            raise ConfigError(f"schedule.verify_every: must be >= 0, got {self.verify_every}")
        if self.verify_timeout_s <= 0:
            raise ConfigError(f"schedule.verify_timeout_s: must be positive, got {self.verify_timeout_s}")
