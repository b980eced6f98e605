"""The task curriculum's side of training: its LR restarts as DeepSpeed's scheduler, and its log.

``CurriculumLR`` is the client scheduler of the engine (``run_training(lr_scheduler=...)``, which
replaces ``optim.lr_schedule``): optimizer step t runs at ``TaskCurriculum.lr_at(t)``. DeepSpeed
steps it after every optimizer step and saves and restores its state with the checkpoint, so
nothing reads the device or writes the LR behind DeepSpeed's back.

``CurriculumLog`` (a callback that is never due: it costs no host synchronisation) tags the run
with the task mode and order, announces every period and logs the loader's per-task counts at the
progress steps.
"""
from __future__ import annotations

from typing import Any

from dyntrain.data.finetune.tasks import TaskCurriculum
from dyntrain.logs import get_logger
from dyntrain.train.callbacks import CallbackBase, StepContext


log = get_logger(__name__)


class CurriculumLR:
    """Args:
    optimizer: what DeepSpeed hands a client scheduler (its basic optimizer).
    curriculum: a sequential ``TaskCurriculum`` (its ``lr_at``).
    """

    def __init__(self, optimizer, curriculum: TaskCurriculum) -> None:
        if curriculum.lr_at(0) is None:
            raise ValueError("CurriculumLR needs a sequential curriculum (mixed mode leaves the LR to optim)")
        self.optimizer, self.curriculum = optimizer, curriculum
        self.last_step = 0  # the optimizer step the LR is set for
        self._apply()

    def _apply(self) -> None:
        lr = self.curriculum.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.last_step += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "last_step" in state:
            self.last_step = int(state["last_step"])
        else:  # a checkpoint from before this scheduler: DeepSpeed's WarmupLR counted from -1
            self.last_step = int(state["last_batch_iteration"]) + 1
        self._apply()

    @classmethod
    def factory(cls, curriculum: TaskCurriculum):
        """``optimizer -> CurriculumLR``: what ``run_training(lr_scheduler=...)`` takes."""
        return lambda optimizer: cls(optimizer, curriculum)


class CurriculumLog(CallbackBase):
    """Period announcements, task tags and the loader's per-task counts (rank 0's tracker logs)."""

    def __init__(self, curriculum: TaskCurriculum) -> None:
        self.curriculum = curriculum

    def on_start(self, ctx: StepContext) -> None:
        c = self.curriculum
        ctx.tracker.set_tags({"task_mode": c.mode, "task_order": ",".join(c.order)})
        self._announce(ctx, ctx.step)

    def on_step(self, ctx: StepContext) -> None:
        step = ctx.step
        if step % ctx.log_every == 0 or step == ctx.max_steps:
            stats = ctx.loader.stats()  # this rank's counts (rank 0 logs)
            ctx.tracker.log_metrics({f"data/{k}": float(v) for k, v in stats.items()
                                     if k.startswith("samples_") or k in ("depth_proxy", "small_skipped")},
                                    step=step)
        if step < ctx.max_steps and self.curriculum.period_at(step) != self.curriculum.period_at(step - 1):
            self._announce(ctx, step)

    def _announce(self, ctx: StepContext, step: int) -> None:
        c = self.curriculum
        active = c.active_at(step)
        ctx.tracker.log_metrics({"curriculum/period": float(c.period_at(step)),
                                 "curriculum/active_tasks": float(len(active))}, step=step)
        ctx.tracker.set_tags({"active_tasks": ",".join(active)})
        if ctx.rank == 0:
            log.info(f"step {step}: period {c.period_at(step)}, tasks {','.join(active)}")
