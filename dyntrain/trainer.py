"""The training loop shared by pre-training and fine-tuning.

One optimizer step = global iteration ``t``: the schedule names the variant of ``t`` (the same on
every rank), every micro-batch of the step runs with that variant's reuse tuple, the loss is L1
between the output clamped to [0, 1] and the clean target, and DeepSpeed does backward and step.
The loader is any iterator of batch dicts (see the data contract): the trainer does not care whether
it is the DALI pre-training stream or the paired fine-tuning data.

Per micro-batch the ranks all-reduce (loss, stop request): the summed loss is what is logged, and a
NaN/Inf on any rank is seen by every rank at once, so all of them raise ``NonFiniteLossError``
(naming step and variant) before backward — no corrupt update is applied and nothing is saved. A
checkpoint is written only after an all-rank check that every weight is finite. A stop request (a
signal handler calls ``request_checkpoint``) travels in the same all-reduce, so all ranks stop after
the same step, save, and ``train`` returns with ``stopped_early=True``.

Trace (debugging, tests): after ``enable_trace(directory)`` every rank writes ``trace_rank<r>.json``
there at the end of ``train`` (per-step variant, loss and sample keys, and a SHA-256 of the full
fp32 weights); ``run_training(trainer_hook=...)`` is the place to switch it on.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import DyntrainError
from .logs import get_logger
from .schedule import VariantSchedule, verify_draw
from .tracking import ConsoleTracker, GPUHourAccount, NullTracker, RunHeader, TrackerGroup
from .tracking.window import StepWindow


class NonFiniteLossError(DyntrainError, FloatingPointError):
    """The loss of a step was NaN or Inf (on at least one rank)."""


class CorruptWeightsError(FloatingPointError):
    """A weight is NaN or Inf where a checkpoint was about to be written."""


def restoration_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the output clamped to [0, 1] and the target, in fp32."""
    return F.l1_loss(output.float().clamp(0.0, 1.0), target.float())


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    metrics: dict[str, float] = field(default_factory=dict)


log = get_logger(__name__)


class Trainer:
    """Args:
    cfg: the run's ``dyntrain.config.Config``.
    engine: a DeepSpeed engine wrapping DyNet (``engine(x, reuse=...)``).
    loader: iterator of batch dicts ("input", "target", optional "mask", "keys"); optional
        ``state_dict``/``load_state_dict``/``stats``.
    schedule: ``VariantSchedule``.
    tracker: ``make_tracker(...)`` result (None = NullTracker); may be replaced via ``attach_tracker``.
        The trainer talks to one ``TrackerGroup``: this tracker and, on rank 0, the console tracker
        (header, progress and summary lines).
    rank, world_size: this process in the data-parallel world.
    checkpoint_manager: object with ``save(step, client_state, rank_state) -> tag``,
        ``find_resume() -> tag | None`` and ``load(tag) -> (client_state, rank_state)``; None = no
        checkpoints.
    verify_group: process group for ``schedule.verify_every`` (see ``schedule.new_verify_group``).
    """

    def __init__(self, cfg, engine, loader, schedule: VariantSchedule, tracker=None, rank: int = 0,
                 world_size: int = 1, *, checkpoint_manager=None, verify_group=None,
                 device: Optional[torch.device] = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.loader = loader
        self._batches = loader if hasattr(loader, "__next__") else iter(loader)
        self.schedule = schedule
        self.console = ConsoleTracker(cfg.run.name, cfg.run.max_steps) if rank == 0 else NullTracker()
        self.tracker = TrackerGroup(tracker if tracker is not None else NullTracker(), self.console)
        self.rank = rank
        self.world_size = world_size
        self.checkpoint_manager = checkpoint_manager
        self.verify_group = verify_group
        self.device = torch.device(device if device is not None else getattr(engine, "device", "cpu"))
        self.accum = int(engine.gradient_accumulation_steps()) if hasattr(
            engine, "gradient_accumulation_steps") else cfg.deepspeed.gradient_accumulation_steps
        self.input_dtype = torch.bfloat16 if _bf16(engine) else torch.float32
        self.channels_last = bool(cfg.model.channels_last)
        self.step = 0  # optimizer steps done == index of the next global iteration
        self.account = GPUHourAccount(world_size, schedule.active)
        self.mlflow_run_id: Optional[str] = None
        self.stopped_early = False
        self.callbacks: list[Callable[["Trainer", int, dict], None]] = []
        self._stop_requested = False
        self._last_saved_step: Optional[int] = None
        self._trace: Optional[list[dict]] = None    # per-step records once enable_trace() ran
        self._trace_dir: Optional[Path] = None
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------ hooks
    def request_checkpoint(self) -> None:
        """Ask for a checkpoint and a clean stop at the next step boundary (signal-handler safe)."""
        self._stop_requested = True

    def attach_tracker(self, tracker) -> None:
        """Replace the recording tracker (MLflow); the console tracker stays beside it."""
        self.tracker = TrackerGroup(tracker, self.console)
        if getattr(tracker, "run_id", None):
            self.mlflow_run_id = tracker.run_id

    def add_callback(self, fn: Callable[["Trainer", int, dict], None]) -> None:
        """``fn(trainer, step, metrics)`` runs on every rank after every optimizer step."""
        self.callbacks.append(fn)

    def enable_trace(self, directory: str | Path) -> None:
        """Record every step (variant, loss, sample keys) and write ``<directory>/trace_rank<r>.json``
        with the final weights' SHA-256 when ``train`` ends (call on every rank: the digest is
        collective under ZeRO-3)."""
        self._trace_dir = Path(directory)
        if self._trace is None:
            self._trace = []

    # ------------------------------------------------------------------------------- step
    def train_step(self, step: int) -> dict[str, Any]:
        """Train global iteration ``step`` (all its micro-batches with one variant)."""
        variant = self.schedule.variant_at(step)
        reuse = self.schedule.variants[variant]
        every = self.cfg.schedule.verify_every
        if every and step % every == 0:
            verify_draw(step, variant, self.schedule, self.verify_group, self.rank,
                        self.world_size, self.cfg.schedule.verify_timeout_s)
        t0 = time.perf_counter()
        lr = _current_lr(self.engine)
        loss_total, data_wait, samples, stop = 0.0, 0.0, 0, False
        keys: list[str] = []
        for _ in range(self.accum):
            td = time.perf_counter()
            batch = next(self._batches)
            data_wait += time.perf_counter() - td
            x = batch["input"].to(self.device, self.input_dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["target"].to(self.device, non_blocking=True)
            out = self.engine(x, reuse=reuse)
            loss = restoration_loss(out, y)
            # one small all-reduce: the logged loss, NaN/Inf seen by all ranks, agreed stop
            shared = torch.stack([loss.detach().float(),
                                  torch.tensor(float(self._stop_requested), device=loss.device)])
            if self.world_size > 1:
                dist.all_reduce(shared)
            shared = shared.cpu()
            mean_loss = float(shared[0]) / self.world_size
            if not np.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({mean_loss}) at step {step} (variant {variant}, reuse "
                    f"{tuple(reuse)}); stopping before the update — no checkpoint written for it")
            stop = stop or bool(shared[1] > 0)
            self.engine.backward(loss)
            self.engine.step()
            loss_total += mean_loss
            samples += int(x.shape[0]) * self.world_size
            if self._trace is not None:
                keys.extend(batch.get("keys") or [])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-variant step time
        dt = time.perf_counter() - t0
        self.account.record(variant, dt)
        metrics = {"step": step, "variant": variant, "loss": loss_total / self.accum, "lr": lr,
                   "step_time_s": dt, "data_wait_s": data_wait, "samples": samples, "stop": stop}
        if self._trace is not None:
            self._trace.append({"step": step, "variant": variant, "loss": metrics["loss"], "keys": keys})
        return metrics

    # ------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Train until ``run.max_steps`` (or a stop request); checkpoints per ``checkpoint.every``."""
        total = self.cfg.run.max_steps
        every_ckpt = self.cfg.checkpoint.every
        log_every = self.cfg.run.log_every
        self._print_header()
        self.account.start()
        window = StepWindow()
        try:
            while self.step < total:
                m = self.train_step(self.step)
                self.step += 1
                window.add(m)
                for fn in self.callbacks:
                    fn(self, self.step, m)
                last = self.step >= total
                if self.step % log_every == 0 or last or m["stop"]:
                    self._log(window, m)
                    window = StepWindow()
                if m["stop"]:
                    self.stopped_early = True
                    self.save_checkpoint()
                    break
                if last or (every_ckpt and self.step % every_ckpt == 0):
                    self.save_checkpoint()
        finally:
            self.account.stop()
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

    def resume(self) -> Optional[str]:
        """Load the checkpoint ``checkpoint_manager.find_resume()`` names, if any; returns its tag."""
        if self.checkpoint_manager is None:
            return None
        tag = self.checkpoint_manager.find_resume()
        if tag is None:
            return None
        client_state, rank_state = self.checkpoint_manager.load(tag)
        self.load_state_dict({**client_state, "rank_state": rank_state})
        self._last_saved_step = self.step
        log.info(f"[{self.cfg.run.name}] resumed from {tag} at step {self.step}")
        return tag

    def state_dict(self) -> dict[str, Any]:
        """Global client state plus ``rank_state`` (this rank's RNG and loader state)."""
        return {
            "step": self.step,
            "schedule": self.schedule.describe(),
            "account": self.account.state_dict(),
            "mlflow_run_id": self.tracker.run_id or self.mlflow_run_id,
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
            "rank_state": self.rank_state(),
        }

    def rank_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        loader = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        return {"rank": self.rank, "world_size": self.world_size, "rng": rng, "loader": loader}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if state.get("schedule") and state["schedule"] != self.schedule.describe() and self.rank == 0:
            log.warning(f"[{self.cfg.run.name}] warning: the variant schedule differs from the checkpoint's "
                        f"({state['schedule']} -> {self.schedule.describe()}); the draw sequence after "
                        f"step {self.step} is not the one the original run would have drawn")
        if state.get("account"):
            self.account.load_state_dict(state["account"])
        self.mlflow_run_id = state.get("mlflow_run_id") or self.mlflow_run_id
        rank_state = state.get("rank_state")
        if rank_state is None:
            if self.rank == 0:
                log.warning(f"[{self.cfg.run.name}] warning: no per-rank state for rank {self.rank} in the "
                            f"checkpoint; RNG and reader positions start fresh (resume is not exact)")
            return
        rng = rank_state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if rank_state.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(rank_state["loader"])

    # ---------------------------------------------------------------------------- helpers
    def _local_params(self):
        for p in self.engine.module.parameters():
            yield getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition

    def _check_weights_finite(self) -> None:
        bad = torch.zeros(1, dtype=torch.float32)
        for p in self._local_params():
            if p.numel() and not torch.isfinite(p.detach()).all():
                bad += 1
                break
        if self.world_size > 1:
            bad = bad.to(self.device)
            dist.all_reduce(bad)
        if float(bad.cpu()) > 0:
            raise CorruptWeightsError(f"non-finite weights after step {self.step}: refusing to save "
                                      f"a checkpoint")

    def weights_digest(self) -> str:
        """SHA-256 of the full fp32 weights (collective under ZeRO-3: call on all ranks)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        stage3 = any(hasattr(p, "ds_tensor") for p in params)
        h = hashlib.sha256()
        with deepspeed.zero.GatheredParameters(params, enabled=stage3):
            for name, p in self.engine.module.named_parameters():
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _write_trace(self) -> None:
        trace_dir = self._trace_dir
        if trace_dir is None or self._trace is None:
            return
        digest = self.weights_digest()
        trace_dir.mkdir(parents=True, exist_ok=True)
        out = {"rank": self.rank, "world_size": self.world_size, "final_step": self.step,
               "stopped_early": self.stopped_early, "steps": self._trace, "weights_sha256": digest,
               "account": self.account.metrics()}
        (trace_dir / f"trace_rank{self.rank}.json").write_text(json.dumps(out))

    def _log(self, window: StepWindow, last: dict[str, Any]) -> None:
        metrics = window.metrics(last["lr"])
        if self.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if hasattr(self.loader, "stats"):
            stats = self.loader.stats()
            metrics["data_epoch"] = float(stats.get("epoch", 0))
            metrics["corrupt_skipped"] = float(stats.get("corrupt_skipped", 0))
        account = self.account.metrics()
        metrics.update(account)
        self._last_metrics = metrics
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
    try:
        return float(engine.get_lr()[0])
    except Exception:  # engines without an optimizer (never in training)
        return float("nan")
