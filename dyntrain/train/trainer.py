"""The training loop shared by pre-training and fine-tuning.

One optimizer step = global iteration ``t``: the schedule names the variant of ``t`` (the same on
every rank), every micro-batch of the step runs with that variant's reuse tuple, the loss is L1
between the output clamped to [0, 1] and the clean target, and DeepSpeed does backward and step.
Other recipes (``schedule.mode: sandwich``, ``schedule.distill``) give a step several passes: the
schedule's ``plan_at(t)`` names them and ``dyntrain.train.schedule.recipes.plan_loss`` sums their losses into the
one objective of each micro-batch.
The loader is any iterator of batch dicts (see the data contract): the trainer does not care whether
it is the DALI pre-training stream or the paired fine-tuning data.

No host synchronisation inside a step: per micro-batch the (loss, stop request) flags stay on the
device (all-reduced asynchronously across ranks, see ``dyntrain.train.pending``), and step t's flags
are read on the host only after step t+1 has been queued, or at once where the host must know: before
a checkpoint save, before a progress line, at the last step, after a stop request, and at steps a
callback asks for. A NaN/Inf loss at step t therefore raises ``NonFiniteLossError`` (naming step t and
its variant) on every rank at the latest one step later and always before any checkpoint; a
checkpoint is written only after an all-rank check that every weight is finite. A stop request (a
signal handler calls ``request_checkpoint``) travels in the flags, so all ranks see it at the same
point and stop after the same step, save, and ``train`` returns with ``stopped_early=True``.
Checkpoint state, resume and the trace live in ``dyntrain.train.state``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from dyntrain.data.loader import Loader
from dyntrain.errors import DyntrainError
from dyntrain.logs import get_logger
from dyntrain.tracking import ConsoleTracker, GPUHourAccount, NullTracker, RunHeader, TrackerGroup
from dyntrain.tracking.faults import ProgressWriter
from dyntrain.tracking.window import StepWindow
from dyntrain.train.callbacks import Callback, StepContext
from dyntrain.train.pending import NonFiniteLossError, PendingStep, StepTimer
from dyntrain.train.schedule import VariantSchedule, plan_loss, restoration_loss, verify_draw
from dyntrain.train.state import TrainerStateMixin


__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "CorruptWeightsError", "restoration_loss"]


class CorruptWeightsError(DyntrainError, FloatingPointError):
    """A weight is NaN or Inf where a checkpoint was about to be written."""


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    metrics: dict[str, float] = field(default_factory=dict)


log = get_logger(__name__)


class Trainer(TrainerStateMixin):
    """Args:
    cfg: the run's ``dyntrain.config.Config``.
    engine: a DeepSpeed engine wrapping DyNet (``engine(x, reuse=...)``).
    loader: a ``dyntrain.data.loader.Loader`` (iterator of batch dicts with reader state and stats).
    schedule: ``VariantSchedule``.
    tracker: ``make_tracker(...)`` result (None = NullTracker). The trainer talks to one
        ``TrackerGroup``: this tracker and, on rank 0, the console tracker (header, progress and
        summary lines).
    rank, world_size: this process in the data-parallel world.
    account: the run's ``GPUHourAccount`` (None = a fresh one that counts no FLOPs).
    checkpoint_manager: object with ``save(step, client_state, rank_state) -> tag`` (the resume is
        read before the trainer exists: ``dyntrain.train.state.load_resume_state``); None = no
        checkpoints.
    verify_group: process group for ``schedule.verify_every`` (see ``schedule.new_verify_group``).
    callbacks: ``dyntrain.train.callbacks.Callback`` objects, called in this order.
    """

    def __init__(self, cfg, engine, loader: Loader, schedule: VariantSchedule, tracker=None, rank: int = 0,
                 world_size: int = 1, *, account: Optional[GPUHourAccount] = None, checkpoint_manager=None,
                 verify_group=None, device: Optional[torch.device] = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.engine = engine
        self.loader = loader
        self._batches = iter(loader)
        self.schedule = schedule
        self.console = ConsoleTracker(cfg.run.name, cfg.run.max_steps) if rank == 0 else NullTracker()
        self.tracker = TrackerGroup(tracker if tracker is not None else NullTracker(), self.console)
        self.rank = rank
        self.world_size = world_size
        self.checkpoint_manager = checkpoint_manager
        self.verify_group = verify_group
        self.device = torch.device(device if device is not None else engine.device)
        self.accum = int(engine.gradient_accumulation_steps())
        self.input_dtype = torch.bfloat16 if _bf16(engine) else torch.float32
        self.channels_last = bool(cfg.model.channels_last)
        self.step = 0  # optimizer steps done == index of the next global iteration
        self.account = account if account is not None else GPUHourAccount(world_size, schedule.active)
        self.mlflow_run_id: Optional[str] = tracker.run_id if tracker is not None else None
        self.stopped_early = False
        self.callbacks: list[Callback] = list(callbacks)
        self._stop_requested = False
        self._last_saved_step: Optional[int] = None
        self._trace: Optional[list[dict]] = None    # per-step records once enable_trace() ran
        self._trace_dir = None
        self._trace_file = None     # the per-step trace file, appended and flushed as steps are read
        self._window = StepWindow()
        self._resolved: dict[str, Any] = {}  # the last step read on the host
        # rank 0 records the furthest step beside the checkpoints: a resume from an older one books
        # the steps it computes again as replays (``dyntrain.tracking.account``)
        # rank 0 records the furthest step reached beside the checkpoints (the account's replays)
        self._progress = ProgressWriter(cfg.checkpoint.dir, on_error=lambda exc: log.warning(
            f"[{cfg.run.name}] warning: cannot record the step reached ({exc})")) \
            if checkpoint_manager is not None and rank == 0 else None

    # ------------------------------------------------------------------------------ hooks
    def request_checkpoint(self) -> None:
        """Ask for a checkpoint and a clean stop at the next step boundary (signal-handler safe)."""
        self._stop_requested = True

    def add_callback(self, callback: Callback) -> None:
        """Append a callback (see ``dyntrain.train.callbacks``) after those given at construction."""
        self.callbacks.append(callback)

    def context(self, step: int, metrics: Optional[dict] = None) -> StepContext:
        """What a callback sees after ``step`` steps."""
        return StepContext(step=step, metrics=metrics or {}, max_steps=self.cfg.run.max_steps,
                           log_every=self.cfg.run.log_every, rank=self.rank, world_size=self.world_size,
                           device=self.device, model=self.engine.module, schedule=self.schedule,
                           account=self.account, tracker=self.tracker, loader=self.loader)

    def start_callbacks(self) -> None:
        """Every callback's ``on_start`` (after the resume, before the first step)."""
        ctx = self.context(self.step)
        for cb in self.callbacks:
            cb.on_start(ctx)

    # ------------------------------------------------------------------------------- step
    def train_step(self, step: int) -> PendingStep:
        """Queue global iteration ``step`` (all its micro-batches with one variant); its flags,
        loss and time are read later by ``PendingStep.resolve``."""
        plan = self.schedule.plan_at(step)
        label = plan.label
        reuse = self.schedule.variants[plan.variants[0]]
        every = self.cfg.schedule.verify_every
        if every and step % every == 0:
            verify_draw(step, label, self.schedule, self.verify_group, self.rank,
                        self.world_size, self.cfg.schedule.verify_timeout_s)
        pending = PendingStep(step, label, tuple(reuse), self.world_size, _current_lr(self.engine),
                              StepTimer(self.device), variants=plan.variants,
                              teacher=plan.teacher if plan.teacher_pass else None)
        one_pass = len(plan.variants) == 1 and not plan.teacher_pass
        for _ in range(self.accum):
            td = time.perf_counter()
            batch = next(self._batches)
            pending.data_wait += time.perf_counter() - td
            x = batch["input"].to(self.device, self.input_dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["target"].to(self.device, non_blocking=True)
            if one_pass:  # the paper's recipe and the baselines
                loss = restoration_loss(self.engine(x, reuse=reuse), y)
                pending.add(loss, self._stop_requested)  # on the device: no host copy here
            else:
                pending.timer.begin()
                loss, parts = plan_loss(self._forward, plan, self.schedule.variants, x, y,
                                        pending.timer.mark)
                pending.add(loss, self._stop_requested, parts)
            self.engine.backward(loss)
            self.engine.step()
            pending.samples += int(x.shape[0]) * self.world_size
            if self._trace is not None:
                pending.keys.extend(batch.get("keys") or [])
        pending.timer.stop()
        return pending

    def _finish(self, pending: PendingStep) -> bool:
        """Read a queued step on the host (raises ``NonFiniteLossError``), account, window, trace,
        callbacks; returns whether a stop was requested on any rank."""
        m = pending.resolve()
        self.account.record_step(m["variants"], m["step_time_s"], m["pass_s"], m["samples"],
                                 teacher=pending.teacher, step=m["step"])
        if self._progress is not None and m["step"] + 1 >= self.account.faults.furthest_step:
            self._progress.update(self.account.faults.run_key, self.account.faults.furthest_step)
        self._window.add(m)
        if self._trace is not None:
            self._trace_step({"step": m["step"], "variant": m["variant"], "loss": m["loss"],
                              "losses": m["losses"], "teacher": pending.teacher, "keys": pending.keys})
        if self.callbacks:
            ctx = self.context(m["step"] + 1, m)
            for cb in self.callbacks:
                cb.on_step(ctx)
        self._resolved = m
        return m["stop"]

    def _host_needed(self, done: int) -> bool:
        """Whether the step that made ``done`` steps must be read before the next is queued."""
        total, every = self.cfg.run.max_steps, self.cfg.checkpoint.every
        return (done >= total or done % self.cfg.run.log_every == 0 or bool(every and done % every == 0)
                or any(cb.due(done) for cb in self.callbacks))

    # ------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Train until ``run.max_steps`` (or a stop request); checkpoints per ``checkpoint.every``."""
        total = self.cfg.run.max_steps
        every_ckpt = self.cfg.checkpoint.every
        self._print_header()
        self.account.start()
        self._window = StepWindow()
        pending: Optional[PendingStep] = None
        try:
            while self.step < total:
                queued = self.train_step(self.step)
                self.step += 1
                # step t-1 is read only now that step t is queued: the device never waits for the host
                stop = self._finish(pending) if pending is not None else False
                pending = queued
                if stop or self._host_needed(self.step):
                    stop = self._finish(pending) or stop
                    pending = None
                    if stop or self.step >= total or self.step % self.cfg.run.log_every == 0:
                        self._log(self._window, self._resolved)
                        self._window = StepWindow()
                if stop:
                    self.stopped_early = True
                    self.save_checkpoint()
                    break
                if self.step >= total or (every_ckpt and self.step % every_ckpt == 0):
                    self.save_checkpoint()
        finally:
            self.account.stop()
            if self._progress is not None:
                self._progress.close()
        final = self.account.metrics()
        self.tracker.log_metrics(final, step=self.step)
        self._print_summary(final)
        self._write_trace()
        return TrainResult(self.step, self.stopped_early, final)

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Optional[str]:
        """Save through the checkpoint manager (all ranks), after checking the weights are finite."""
        if self.checkpoint_manager is None or self._last_saved_step == self.step:
            return None
        self._check_weights_finite()
        state = self.state_dict()
        rank_state = state.pop("rank_state")
        tag = self.checkpoint_manager.save(self.step, client_state=state, rank_state=rank_state)
        self._last_saved_step = self.step
        self.tracker.set_tags({"last_checkpoint": tag})
        return tag

    # ---------------------------------------------------------------------------- helpers
    def _forward(self, x: torch.Tensor, reuse: tuple) -> torch.Tensor:
        return self.engine(x, reuse=reuse)

    def _check_weights_finite(self) -> None:
        bad = torch.zeros(1, dtype=torch.float32)
        for p in local_weights(self.engine.module.parameters()):
            if p.numel() and not torch.isfinite(p.detach()).all():
                bad += 1
                break
        if self.world_size > 1:
            bad = bad.to(self.device)
            dist.all_reduce(bad)
        if float(bad.cpu()) > 0:
            raise CorruptWeightsError(f"non-finite weights after step {self.step}: refusing to save "
                                      f"a checkpoint")

    def _log(self, window: StepWindow, last: dict[str, Any]) -> None:
        metrics = window.metrics(last["lr"])
        if self.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        stats = self.loader.stats()
        metrics["data_epoch"] = float(stats.get("epoch", 0))
        counts = [float(stats.get("corrupt_skipped", 0)), float(stats.get("io_retries", 0))]
        if self.world_size > 1:  # the run's totals, not rank 0's share (every rank logs at the same steps)
            summed = torch.tensor(counts, dtype=torch.float64, device=self.device)
            dist.all_reduce(summed)
            counts = summed.tolist()
        metrics["corrupt_skipped"], metrics["io_retries"] = counts
        account = self.account.metrics()
        metrics.update(account)
        self.tracker.log_metrics(metrics, step=self.step)  # the console tracker prints the progress line

    def _print_header(self) -> None:
        """Announce the run to the trackers (the console tracker prints the header line)."""
        self.tracker.log_start(RunHeader(
            schedule_mode=self.schedule.mode, probs=dict(self.schedule.probs), world_size=self.world_size,
            device_type=self.device.type, zero_stage=self.cfg.deepspeed.zero_stage, bf16=_bf16(self.engine),
            global_batch=self.cfg.data.micro_batch_size * self.accum * self.world_size,
            start_step=self.step, max_steps=self.cfg.run.max_steps, run_id=self.tracker.run_id))

    def _print_summary(self, m: dict[str, float]) -> None:
        """The end of the run to the trackers (the console tracker prints the summary line)."""
        self.tracker.log_end(self.step, self.stopped_early, m)


def _bf16(engine) -> bool:
    fn = getattr(engine, "bfloat16_enabled", None)
    return bool(fn()) if callable(fn) else False


def _current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def local_weights(params):
    """This rank's own elements of each parameter: the whole tensor, or under ZeRO-3 the real part of
    its partition (``ds_tensor``). Partitions are padded to one size on every rank, and DeepSpeed
    never writes the padding (``torch.empty``: the tail of the last rank's partition, all of it for a
    parameter with fewer elements than ranks), so it holds whatever bits the memory had, NaN
    included. Checking it refused a good checkpoint at random ("non-finite weights" from finite
    losses, seen once in CI with ZeRO-3), so only elements below ``ds_numel`` are yielded."""
    for p in params:
        part = getattr(p, "ds_tensor", None)
        if part is None:
            yield p
            continue
        size = part.numel()
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
        yield part.narrow(0, 0, max(0, min(size, p.ds_numel - size * rank)))
