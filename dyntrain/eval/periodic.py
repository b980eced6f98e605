"""One periodic-evaluation mechanism for every job: pre-training validation and fine-tuning
evaluation are both a ``PeriodicEvaluation``.

Due every ``every`` steps (0: only at the end) and at the last step; the trainer reads a due step on
the host before queuing the next, so the evaluation sees the model exactly as that step left it. The
evaluation runs on a plain fp32 copy of the engine's module (``plain_copy``), never through the
engine: under ZeRO-3 that module's forward hooks would start collectives on one rank alone.
Subscribers (``then``) get each evaluation's figures, in subscription order, right after it, at the
same step: that is how the cost-aware draw follows validation, explicitly.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch

from dynet import DyNet
from dyntrain.eval.evaluate import PeriodicEvaluator, load_test_sets
from dyntrain.train.callbacks import CallbackBase, StepContext


Subscriber = Callable[[StepContext, Any], None]


def plain_copy(module: torch.nn.Module, keep: bool, zero3: bool) -> Optional[torch.nn.Module]:
    """A plain fp32 DyNet with the engine module's current weights (on the CPU), or None where
    ``keep`` is false. Under ZeRO-3 every rank must call this (the partitioned weights are gathered
    collectively)."""
    gather = contextlib.nullcontext()
    if zero3:
        # lazy: deepspeed is slow to import and unused by inference
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gather:
        if not keep:
            return None
        state = {name: t.detach().float().cpu().clone()
                 for name, t in list(module.named_parameters()) + list(module.named_buffers())}
    copy = DyNet(dataclasses.replace(module.config, checkpoint_blocks=False))
    copy.load_state_dict(state)
    return copy.eval()


class PeriodicEvaluation(CallbackBase):
    """Args:
    every: evaluate every ``every`` steps (0: only at ``max_steps``).
    max_steps: ``run.max_steps`` (always evaluated).
    zero3: the engine's weights are partitioned (gather on every rank).
    all_ranks: every rank evaluates (its share of a distributed set) or only rank 0.
    Subclasses implement ``evaluate(model, ctx)``; ``model`` is None on ranks that do not evaluate.
    """

    def __init__(self, every: int, max_steps: int, zero3: bool, all_ranks: bool) -> None:
        self.every, self.max_steps = int(every), int(max_steps)
        self.zero3, self.all_ranks = zero3, all_ranks
        self._subscribers: list[Subscriber] = []

    def then(self, fn: Subscriber) -> Subscriber:
        """Call ``fn(ctx, figures)`` after every evaluation that ``on_step`` runs."""
        self._subscribers.append(fn)
        return fn

    def due(self, step: int) -> bool:
        return step == self.max_steps or (self.every > 0 and step > 0 and step % self.every == 0)

    def on_step(self, ctx: StepContext) -> None:
        if not self.due(ctx.step):
            return
        figures = self.run(ctx)
        for fn in self._subscribers:
            fn(ctx, figures)

    def run(self, ctx: StepContext) -> Any:
        """Evaluate the model as it is now (all ranks call this)."""
        model = plain_copy(ctx.model, self.all_ranks or ctx.rank == 0, self.zero3)
        return self.evaluate(model.to(ctx.device) if model is not None else None, ctx)

    def evaluate(self, model: Optional[torch.nn.Module], ctx: StepContext) -> Any:
        raise NotImplementedError


class TestSetEvaluation(PeriodicEvaluation):
    """Fine-tuning evaluation: rank 0 restores ``eval.sets`` with every variant of ``eval.variants``
    and logs ``eval/<variant>/<task>/psnr|ssim`` at the training step (``PeriodicEvaluator``). The
    test sets are read at the start, so a wrong folder fails before training does."""

    def __init__(self, cfg, printer: Optional[Callable[[str], None]] = None) -> None:
        super().__init__(cfg.eval.every, cfg.run.max_steps, cfg.deepspeed.zero_stage == 3, all_ranks=False)
        self.cfg = cfg
        self.printer = printer
        self.evaluator: Optional[PeriodicEvaluator] = None

    def on_start(self, ctx: StepContext) -> None:
        cfg = self.cfg
        self.evaluator = PeriodicEvaluator(cfg, ctx.tracker, ctx.rank, printer=self.printer)
        if ctx.rank == 0:
            self.evaluator.pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)

    def evaluate(self, model: Optional[torch.nn.Module], ctx: StepContext) -> Optional[dict]:
        if model is None:
            return None
        return self.evaluator(model, ctx.step)
