"""What a plug-in of a training job sees: the ``Callback`` protocol and its narrow ``StepContext``.

A callback (validation, fine-tuning evaluation, the curriculum's log, a test's pause) is handed to
``run_training`` by the entry point; nothing in the trainer asks which kind of job it runs. The
trainer calls, on every rank and in list order:

    on_start(ctx)   once, after the resume, before the first step (``ctx.step`` = the next step)
    on_step(ctx)    for every step once its figures are on the host (``ctx.step`` = steps done)

``due(step)`` names the steps at which a callback needs the model exactly as that step left it (an
evaluation): there the trainer reads the step on the host before it queues the next one. At every
other step ``on_step`` comes one step late, while the next step runs, and the device is never waited
for: ``due`` is the only way a callback costs a host synchronisation. It must give the same answer
on every rank. Ordering between two plug-ins is explicit where it matters: the cost-aware draw
subscribes to the validation's results (``PeriodicEvaluation.then``) instead of relying on its
place in the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dyntrain.data.loader import Loader


@dataclass
class StepContext:
    """Args:
    step: steps done (``on_start``: the next step to train, 0 for a fresh run).
    metrics: the step's host figures (loss, variant, step time ...); empty in ``on_start``.
    max_steps, log_every: ``run.max_steps`` and ``run.log_every``.
    rank, world_size, device: this process in the data-parallel world.
    model: the engine's module (under ZeRO-3 partitioned: gather collectively, see
        ``dyntrain.eval.periodic.plain_copy``); read it, never train it.
    schedule: the variant schedule (the cost-aware draw sets its probabilities).
    account: the GPU-hour account (an evaluation books its time with ``add_validation``).
    tracker: where metrics, params and tags go (MLflow on rank 0, the console).
    loader: this rank's data source (its ``stats``).
    """
    step: int
    metrics: dict[str, Any]
    max_steps: int
    log_every: int
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    schedule: Any
    account: Any
    tracker: Any
    loader: Loader


class Callback(Protocol):
    def due(self, step: int) -> bool: ...

    def on_start(self, ctx: StepContext) -> None: ...

    def on_step(self, ctx: StepContext) -> None: ...


class CallbackBase:
    """Defaults: never due, nothing to do at the start."""

    def due(self, step: int) -> bool:
        return False

    def on_start(self, ctx: StepContext) -> None:
        return None

    def on_step(self, ctx: StepContext) -> None:
        return None


class OnEveryStep(CallbackBase):
    """``fn(ctx)`` for every step, never forcing a host read (records, traces, benchmarks)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_step(self, ctx: StepContext) -> None:
        self.fn(ctx)
