"""A queued optimizer step whose (loss, stop) flags are still on the device.

The trainer queues step t (forward, backward and optimizer step of every micro-batch), then step
t+1, and only then reads step t's flags on the host (``PendingStep.resolve``), so that the host never
stalls the accelerator in the middle of a step. Per micro-batch the flags are one 2-element tensor
``(loss, stop request)``: all-reduced with ``async_op=True`` where the world has more than one rank
(on CUDA the wait only orders the streams), copied to the host once per step at resolution.

What the host learns at resolution is the same on every rank (the reduced flags), so all ranks raise
``NonFiniteLossError`` or stop at the same point, provided they resolve at the same steps (the
trainer decides that from the step number and the config only).

Step times: on CUDA two events per step (recorded when the step starts and ends, read when it is
resolved: no synchronisation per step); elsewhere ``time.perf_counter`` around the step. Steps that
run several passes (sandwich, a distillation teacher) also mark the end of every forward pass
(``StepTimer.begin`` / ``mark``): the seconds of each pass are summed per label over the step's
micro-batches (``pass_s`` in the resolved metrics).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from dyntrain.errors import DyntrainError


class NonFiniteLossError(DyntrainError, FloatingPointError):
    """The loss of a step was NaN or Inf (on at least one rank)."""


class StepTimer:
    """Wall time of one step: CUDA events on a CUDA device, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._t0 = time.perf_counter()
        self._t1: Optional[float] = None
        self._marks: list[tuple[Optional[str], Any]] = []
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(device))

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def begin(self) -> None:
        """A micro-batch's passes start now."""
        self._marks.append((None, self._now()))

    def mark(self, label: str) -> None:
        """The pass ``label`` ended now."""
        self._marks.append((label, self._now()))

    def pass_seconds(self) -> dict[str, float]:
        """label -> summed seconds of its passes (each from the previous mark or ``begin``)."""
        out: dict[str, float] = {}
        for (_, t0), (label, t1) in zip(self._marks, self._marks[1:]):
            if label is None:
                continue
            dt = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            out[label] = out.get(label, 0.0) + dt
        return out

    def stop(self) -> None:
        """Mark the end of the step's work (queued, on CUDA)."""
        if self.cuda:
            self._end.record(torch.cuda.current_stream(self.device))
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """The step's duration; on CUDA waits for the end event only (the step is done by then)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return float(self._t1 if self._t1 is not None else time.perf_counter()) - self._t0


@dataclass
class PendingStep:
    """Step ``step`` as queued: per-micro-batch flags still on the device, and what the host knew."""

    step: int
    variant: str
    reuse: tuple[int, ...]
    world_size: int
    lr: float
    timer: StepTimer
    variants: tuple[str, ...] = ()
    teacher: Optional[str] = None  # the variant of a teacher forward without gradient, if any
    flags: list[torch.Tensor] = field(default_factory=list)
    works: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    data_wait: float = 0.0
    samples: int = 0

    def add(self, loss: torch.Tensor, stop_requested: bool,
            parts: Optional[list[torch.Tensor]] = None) -> None:
        """Queue one micro-batch's (loss, stop, per-variant losses) flags: no host copy, an async
        all-reduce if world > 1."""
        flags = torch.stack([loss.detach().float(),
                             torch.full((), float(stop_requested), device=loss.device),
                             *[p.detach().float() for p in (parts or [])]])
        if self.world_size > 1:
            self.works.append(dist.all_reduce(flags, async_op=True))
        self.flags.append(flags)

    def resolve(self) -> dict[str, Any]:
        """Read the flags on the host: the step's metrics (loss = mean over micro-batches of the
        rank-mean loss), or ``NonFiniteLossError`` naming the step and its variant."""
        for work in self.works:
            work.wait()
        shared = torch.stack(self.flags).cpu()
        loss_total, stop = 0.0, False
        names = self.variants or (self.variant,)
        per_variant = {}
        if shared.shape[1] == 2 + len(names):
            means = shared[:, 2:].double().mean(0) / self.world_size
            per_variant = {n: float(means[i]) for i, n in enumerate(names)}
        for row in shared:
            mean_loss = float(row[0]) / self.world_size
            if not np.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({mean_loss}) at step {self.step} (variant {self.variant}, "
                    f"reuse {tuple(self.reuse)}); stopping before any checkpoint is written")
            stop = stop or bool(row[1] > 0)
            loss_total += mean_loss
        if not per_variant and len(names) == 1:  # one pass: the loss is that variant's L1
            per_variant = {names[0]: loss_total / len(self.flags)}
        return {"step": self.step, "variant": self.variant, "loss": loss_total / len(self.flags),
                "lr": self.lr, "step_time_s": self.timer.seconds(), "data_wait_s": self.data_wait,
                "samples": self.samples, "stop": stop, "variants": names, "losses": per_variant,
                "pass_s": self.timer.pass_seconds()}
