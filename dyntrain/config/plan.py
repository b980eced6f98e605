"""The batch plan: what a config's global batch and budget become on the world size at hand.

A config states the **global batch** (``deepspeed.global_batch_size``: samples per optimizer step
over all GPUs) and the **budget** (``run.max_samples``, or ``run.max_steps`` optimizer steps at the
configured global batch). ``data.micro_batch_size`` is the most samples one GPU takes in one forward
pass (a memory cap), not a fixed size. ``batch_plan`` derives the rest for ``D`` data ranks (the
readers the data is split into: the world size, or the data ranks of the run a resume continues,
``dyntrain.data.logical``) hosted by ``W`` processes:

1. the global batch ``G`` grows to the smallest multiple of ``D`` at or above it (32 over 64 GPUs
   -> 64; unchanged whenever ``D`` divides it);
2. each reader's share ``G / D`` is taken in micro-batches of the largest size that divides the
   share and stays <= ``data.micro_batch_size``; the reader's accumulation is the share over it, and
   the engine's accumulation on a process is that times the readers it hosts (``D / W``);
3. the budget is kept in samples: ``iterations = ceil(samples / G)``;
4. when the batch grew by ``k = G / G_configured``, ``optim.lr_scaling`` scales the learning rate
   (and ``optim.min_lr``): ``linear`` by ``k``, ``sqrt`` by ``sqrt(k)`` (the rule for Adam), ``none``
   keeps it; and every count of optimizer steps is divided by ``k`` (rounded up) so that it covers
   the same samples: ``optim.warmup_steps``, ``optim.total_steps``, ``checkpoint.every``,
   ``checkpoint.milestone_every``, ``eval.every``, ``schedule.tasks.period_steps`` and
   ``schedule.tasks.warmup_steps``. A config's step counts are therefore stated at its own global
   batch.

Without ``deepspeed.global_batch_size`` the per-GPU batch is fixed instead (micro-batch x
``deepspeed.gradient_accumulation_steps``; the global batch grows with the data ranks) and nothing is
scaled: the quickstart and the tests run that way.

The plan of a planned config is the plan itself (``apply`` is idempotent), and a config that started
on some GPU count before plans was written derives exactly the micro-batch and accumulation it had, so
old checkpoints resume unchanged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from dyntrain.config.typed import ConfigError


LR_RULES = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class BatchPlan:
    """Args:
    world_size, data_ranks: processes, and readers they host (``dyntrain.data.logical``).
    micro_batch: samples per forward pass on one process.
    reader_accumulation: micro-batches per optimizer step of one reader.
    accumulation: micro-batches per optimizer step of one process (DeepSpeed's).
    global_batch, configured_global_batch: samples per optimizer step; as the config stated it.
    scale: global_batch / configured_global_batch (1.0: as configured).
    rule: ``optim.lr_scaling`` ("fixed per-GPU batch" when the config states no global batch).
    lr, min_lr, warmup_steps, total_steps: the optimizer's schedule after scaling.
    iterations, samples: optimizer steps, and the samples they take.
    """
    world_size: int
    data_ranks: int
    micro_batch: int
    reader_accumulation: int
    accumulation: int
    global_batch: int
    configured_global_batch: int
    scale: float
    rule: str
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: Optional[int]
    iterations: int
    samples: int

    @property
    def grown(self) -> bool:
        return self.global_batch != self.configured_global_batch

    def steps(self, n: int) -> int:
        """A count of optimizer steps at the configured global batch, at this plan's (same samples)."""
        return scaled_steps(n, self.scale)

    def params(self) -> dict[str, Any]:
        """The ``plan.*`` MLflow params."""
        return {f"plan.{k}": v for k, v in asdict(self).items()}

    def lines(self) -> list[str]:
        """What was derived, for the log's first lines and the dry run."""
        grown = (f" (grown from {self.configured_global_batch}: {self.configured_global_batch} cannot be "
                 f"split over {self.data_ranks} data ranks; lr x{lr_factor(self.rule, self.scale):.4g} by "
                 f"optim.lr_scaling={self.rule}, step counts / {self.scale:.4g})" if self.grown else "")
        hosted = (f", {self.data_ranks // self.world_size} readers per rank x {self.reader_accumulation}"
                  if self.data_ranks != self.world_size else "")
        return [
            f"batch plan: world size {self.world_size}, data ranks {self.data_ranks}, micro batch "
            f"{self.micro_batch}, accumulation {self.accumulation}{hosted}, global batch {self.global_batch}{grown}",
            f"batch plan: {self.iterations} iterations = {self.samples} samples, lr {self.lr:.6g}, "
            f"warm-up {self.warmup_steps} steps, schedule {self.total_steps or self.iterations} steps, "
            f"rule {self.rule}",
        ]

    def apply(self, cfg: Any) -> Any:
        """A copy of ``cfg`` that states this plan: its global batch, micro-batch, lr and step counts
        (planning the copy again on the same world gives the same plan)."""
        out = copy.deepcopy(cfg)
        out.data.micro_batch_size = self.micro_batch
        out.run.max_steps = self.iterations
        out.run.max_samples = None
        opt = out.optim
        opt.lr, opt.min_lr, opt.warmup_steps, opt.total_steps = self.lr, self.min_lr, self.warmup_steps, self.total_steps
        if cfg.deepspeed.global_batch_size is None:
            return out
        out.deepspeed.global_batch_size = self.global_batch
        out.checkpoint.every = self.steps(cfg.checkpoint.every)
        out.checkpoint.milestone_every = self.steps(cfg.checkpoint.milestone_every)
        out.eval.every = self.steps(cfg.eval.every)
        tasks = out.schedule.tasks
        tasks.period_steps = self.steps(tasks.period_steps)
        tasks.warmup_steps = min(self.steps(tasks.warmup_steps), tasks.period_steps - 1)
        return out


def scaled_steps(n: int, scale: float) -> int:
    """``n`` optimizer steps at a global batch ``scale`` times smaller: ceil(n / scale); 0 stays 0."""
    return 0 if n <= 0 else max(1, math.ceil(n / scale - 1e-9))


def lr_factor(rule: str, scale: float) -> float:
    return {"linear": scale, "sqrt": math.sqrt(scale)}.get(rule, 1.0)


def largest_divisor_at_most(n: int, cap: int) -> int:
    return next(d for d in range(min(n, cap), 0, -1) if n % d == 0)


def batch_plan(cfg: Any, world_size: int, data_ranks: Optional[int] = None) -> BatchPlan:
    """The batch plan of ``cfg`` (a ``Config``) on ``world_size`` processes hosting ``data_ranks`` readers (None =
    one each): see the module docstring. The one place the global batch is derived."""
    world = int(world_size)
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    readers = int(data_ranks or world)
    if readers % world:
        raise ConfigError(f"{readers} data ranks (data.logical_ranks) cannot be spread evenly over {world} ranks")
    cap, opt, ds = cfg.data.micro_batch_size, cfg.optim, cfg.deepspeed
    if ds.global_batch_size is None:  # a fixed per-GPU batch: nothing is derived or scaled
        micro, reader_accum = cap, int(ds.gradient_accumulation_steps)
        configured = glob = micro * reader_accum * readers
        rule = "fixed per-GPU batch"
    else:
        configured = int(ds.global_batch_size)
        glob = -(-configured // readers) * readers
        share = glob // readers
        micro = largest_divisor_at_most(share, cap)
        reader_accum = share // micro
        rule = opt.lr_scaling
    scale = glob / configured
    budget = cfg.run.max_samples if cfg.run.max_samples is not None else cfg.run.max_steps * configured
    iterations = max(1, math.ceil(budget / glob - 1e-9))
    factor = lr_factor(rule, scale)
    return BatchPlan(
        world_size=world, data_ranks=readers, micro_batch=micro, reader_accumulation=reader_accum,
        accumulation=reader_accum * (readers // world), global_batch=glob, configured_global_batch=configured,
        scale=scale, rule=rule, lr=opt.lr * factor, min_lr=opt.min_lr * factor,
        warmup_steps=scaled_steps(opt.warmup_steps, scale),
        total_steps=None if opt.total_steps is None else scaled_steps(opt.total_steps, scale),
        iterations=iterations, samples=iterations * glob)


def check_resume_plan(cfg: Any, plan: BatchPlan, saved_data_ranks: Optional[int]) -> None:
    """A resume whose data ranks changed (resharded onto more or other GPUs) must keep the run's
    global batch: a grown batch would change its iterations and step counts mid-run. Raises
    ``ConfigError`` then (a config without ``deepspeed.global_batch_size`` keeps its old behaviour:
    the per-GPU batch is fixed, the global batch follows the ranks)."""
    if cfg.deepspeed.global_batch_size is None or not saved_data_ranks or saved_data_ranks == plan.data_ranks:
        return
    before = batch_plan(cfg, saved_data_ranks, saved_data_ranks)
    if before.global_batch != plan.global_batch:
        raise ConfigError(
            f"checkpoint.dir: the run was written by {saved_data_ranks} data ranks at global batch "
            f"{before.global_batch}; on {plan.world_size} ranks the batch plan gives {plan.global_batch}, which "
            f"would change its iterations and step counts mid-run: resume on a GPU count that divides "
            f"{saved_data_ranks} or that keeps the batch, or start a new run (checkpoint.dir)")
