"""Build and run one training job: what the jobs (``dyntrain.jobs.pretrain``, ``dyntrain.jobs.finetune``)
call with the components they pick.

Order: ``prepare``: distributed start-up (launcher or single process) -> the job's pre-flight on rank 0
(``dyntrain.jobs.preflight``; its outcome broadcast, a failure ends every rank with one line) -> the
data ranks (``data.logical_ranks`` or those of the checkpoint a resume continues from) -> the batch
plan (``dyntrain.config.plan``; logged, and the planned config is what every later part sees); then
model (``model_builder``, init from ``run.seed``) -> DeepSpeed engine (with ``lr_scheduler`` when given; its accumulation covers the hosted data
ranks) -> loader (``dyntrain.data.logical.LogicalRanks`` over ``loader_factory(cfg, data_rank,
data_ranks, device)`` for each data rank this process hosts: one, unless a resume runs on fewer
ranks than the run started with) -> schedule -> checkpoint manager -> the resume state, if any -> MLflow
run (the checkpoint's run id when resuming) -> trainer with its account, tracker and ``callbacks``
-> every callback's ``on_start`` -> ``train()``. The MLflow run ends FINISHED, KILLED (stopped early
on request, to be resumed) or FAILED (any exception, re-raised).

Nothing here asks which kind of job it runs: the entry point hands over the loader factory, the
callbacks (validation, fine-tuning evaluation, the curriculum's log ...), the model builder (e.g.
fine-tuning's initial weights), the LR scheduler (e.g. the curriculum's restarts) and the run's
tags (``dyntrain.stage``), and ``end_hooks``: called on every rank with a ``RunEnd`` once the last
step and its checkpoint are done and before the MLflow run is ended (the job's model logging:
``dyntrain.serving``); not after a run stopped early to be resumed. Two more extension points
serve tests and debugging: ``schedule_hook`` (may replace the variant schedule of a rank) and
``trace_dir`` (``Trainer.enable_trace``), plus ``checkpoint_factory`` (e.g. a manager with a
``before_commit`` callback).
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from dyntrain.checkpoint import CheckpointManager, broadcast, resume_data_ranks
from dyntrain.config import Config
from dyntrain.config.plan import BatchPlan, batch_plan, check_resume_plan
from dyntrain.data.loader import LoaderFactory
from dyntrain.data.logical import LogicalRanks, choose_data_ranks
from dyntrain.data.shards.describe import describe_datasets
from dyntrain.errors import DyntrainError, one_line
from dyntrain.logs import get_logger, setup_logging
from dyntrain.tracking import GPUHourAccount, make_tracker
from dyntrain.tracking.faults import read_progress
from dyntrain.tracking.savings import run_tags
from dyntrain.train.callbacks import Callback
from dyntrain.train.engine import (ZERO3_NOTE, DistInfo, build_engine, init_distributed,
                                   shutdown_distributed)
from dyntrain.train.model import build_model, variant_flops
from dyntrain.train.schedule import VariantSchedule, new_verify_group, splitmix64
from dyntrain.train.state import load_resume_state
from dyntrain.train.trainer import Trainer, TrainResult


ScheduleHook = Callable[[VariantSchedule, int], VariantSchedule]
log = get_logger(__name__)


class PreflightError(DyntrainError):
    """The pre-flight found a problem (its message names the key, file or URL)."""


@dataclass(frozen=True)
class RunEnd:
    """What an end hook sees: the config, this rank, the result, the MLflow run (None without one)
    and the run's tags (variants, recipe, stage ...)."""
    cfg: Config
    rank: int
    world_size: int
    result: TrainResult
    run_id: Optional[str]
    tags: Mapping[str, str]


EndHook = Callable[[RunEnd], None]


def default_checkpoint_manager(cfg: Config, engine, rank: int, world_size: int) -> Optional[CheckpointManager]:
    """``dyntrain.checkpoint.CheckpointManager`` when ``checkpoint.dir`` is set, else None."""
    if not cfg.checkpoint.dir:
        return None
    return CheckpointManager(cfg.checkpoint, engine, rank, world_size)


@dataclass(frozen=True)
class Prepared:
    """A job after its pre-flight, before its engine: the planned config (``BatchPlan.apply``), the
    plan, the process group's view and the data ranks."""
    cfg: Config
    plan: BatchPlan
    info: DistInfo
    data_ranks: int
    t_start: float


Preflight = Callable[[Config, int], Sequence[str]]   # (cfg, world size) -> lines; raises DyntrainError


def prepare(cfg: Config, preflight: Optional[Preflight] = None) -> Prepared:
    """Start the process group; on rank 0 run ``preflight`` (if any) and read the data ranks of the
    checkpoint a resume continues from; broadcast the outcome (a failure ends every rank with the
    same one-line error, before any engine exists); derive the batch plan and log it."""
    t_start = time.perf_counter()
    setup_logging()  # the launcher's RANK until the process group exists
    info = init_distributed(cfg)
    rank, world = info.rank, info.world_size
    setup_logging(rank)
    outcome: Any = None
    if rank == 0:
        try:
            lines = list(preflight(cfg, world)) if preflight is not None else []
            outcome = ("ok", lines, resume_data_ranks(cfg.checkpoint.dir, cfg.checkpoint.resume))
        except DyntrainError as exc:
            outcome = ("failed", one_line(exc), None)
    outcome = broadcast(outcome, rank)
    if outcome[0] == "failed":
        shutdown_distributed()  # every rank is here: leave the group cleanly
        raise PreflightError(outcome[1])
    data_ranks, note = choose_data_ranks(cfg.data.logical_ranks, outcome[2], world)
    plan = batch_plan(cfg, world, data_ranks)
    try:
        check_resume_plan(cfg, plan, outcome[2])  # every rank sees the same: all raise alike
    except DyntrainError:
        shutdown_distributed()
        raise
    if rank == 0:
        for line in [*outcome[1], *([note] if note else []), *plan.lines()]:
            log.info(line)
    return Prepared(plan.apply(cfg), plan, info, data_ranks, t_start)


def run_training(cfg: Config, loader_factory: LoaderFactory, *, callbacks: Sequence[Callback] = (),
                 tags: Optional[Mapping[str, str]] = None,
                 model_builder: Callable[[Config], torch.nn.Module] = build_model,
                 lr_scheduler: Optional[Callable[[Any], Any]] = None,
                 checkpoint_factory=default_checkpoint_manager,
                 schedule_hook: Optional[ScheduleHook] = None,
                 trace_dir: Optional[str | Path] = None,
                 end_hooks: Sequence[EndHook] = (),
                 prepared: Optional["Prepared"] = None) -> TrainResult:
    """Train ``cfg`` end to end on this rank; returns the trainer's result.

    Args:
        loader_factory: ``(cfg, data_rank, data_ranks, device) -> Loader`` (``dyntrain.data.loader``;
            called as ``(cfg, rank, world_size, device)`` unless this process hosts other data ranks).
        callbacks: ``dyntrain.train.callbacks.Callback`` objects, called in this order.
        tags: MLflow tags of the run (e.g. ``{"dyntrain.stage": "finetune"}``).
        model_builder: builds the (initialised) model; fine-tuning loads ``init.checkpoint`` here.
        lr_scheduler: ``optimizer -> scheduler`` given to DeepSpeed instead of ``optim.lr_schedule``.
        checkpoint_factory: ``(cfg, engine, rank, world_size) -> manager | None``.
        schedule_hook: ``(schedule, rank) -> schedule`` used by this rank instead (default: the
            config's ``VariantSchedule`` unchanged).
        trace_dir: every rank writes its step trace there (``Trainer.enable_trace``).
        end_hooks: ``RunEnd -> None``, called in order after a run that reached ``run.max_steps``.
        prepared: what ``prepare(cfg)`` returned, when the job built its components from the planned
            config first (None: prepared here, without a pre-flight).
    """
    job = prepared if prepared is not None else prepare(cfg)
    cfg, info, data_ranks, t_start = job.cfg, job.info, job.data_ranks, job.t_start
    rank, world = info.rank, info.world_size
    # the global torch/numpy streams are seeded from (seed, rank); the model init forks its own
    torch.manual_seed(splitmix64(cfg.run.seed * 1_000_003 + rank) & 0x7FFF_FFFF_FFFF_FFFF)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model = model_builder(cfg)
    engine, ds_config = build_engine(cfg, model, info, lr_scheduler=lr_scheduler, data_ranks=data_ranks)
    loader = LogicalRanks(lambda data_rank: loader_factory(cfg, data_rank, data_ranks, info.device),
                          rank, world, data_ranks, int(engine.gradient_accumulation_steps()))
    tracker = None
    status = "FAILED"
    try:
        schedule = VariantSchedule.from_config(cfg)
        if schedule_hook is not None:
            schedule = schedule_hook(schedule, rank)
        verify_group = (new_verify_group(cfg.schedule.verify_timeout_s)
                        if cfg.schedule.verify_every and world > 1 else None)
        manager = checkpoint_factory(cfg, engine, rank, world)
        resume = load_resume_state(manager)
        state = resume[1] if resume else {}
        tracker = make_tracker(cfg, rank, run_id=state.get("mlflow_run_id"),
                               carried=state.get("tracking_unsent"))  # the checkpoint's unsent metrics
        account = GPUHourAccount(world, schedule.active)
        account.flops_per_sample = variant_flops(cfg, schedule.variants)
        trainer = Trainer(cfg, engine, loader, schedule, tracker, rank, world, account=account,
                          checkpoint_manager=manager, verify_group=verify_group, device=info.device,
                          callbacks=callbacks)
        if resume is not None:
            trainer.restore(*resume)
            # the furthest step a killed segment reached after that checkpoint: those steps are replays
            account.faults.continue_after(*read_progress(cfg.checkpoint.dir))
        if trace_dir is not None:
            trainer.enable_trace(trace_dir)
        run_tags = _describe_run(tracker, cfg, ds_config, job.plan, schedule, info,
                                 {**(tags or {}), "data_ranks": str(data_ranks)},
                                 resume[0] if resume else None, step=trainer.step)
        trainer.start_callbacks()
        trainer.account.add_startup(time.perf_counter() - t_start)
        previous = _install_signal_handlers(trainer)
        try:
            result = trainer.train()
        finally:
            _restore_signal_handlers(previous)
        if not result.stopped_early:
            end = RunEnd(cfg, rank, world, result, tracker.run_id, run_tags)
            for hook in end_hooks:
                hook(end)
        status = "KILLED" if result.stopped_early else "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
        loader.close()
        if status != "FAILED":  # after a failure a peer may never reach the barrier
            shutdown_distributed()


def _describe_run(tracker, cfg: Config, ds_config: dict, plan: BatchPlan, schedule: VariantSchedule, info, tags: dict,
                  resumed_from: Optional[str], step: int) -> dict[str, str]:
    """Params, tags and artifacts of the MLflow run (rank 0; no-ops on a NullTracker); returns the tags."""
    variants = schedule.active
    schedule_mode = f"fixed:{schedule.fixed_variant}" if schedule.mode == "fixed" else schedule.mode
    tags = {
        "dyntrain.stage": "pretrain",     # pretrain | finetune (the job's tags decide)
        **tags,
        "mode": schedule_mode,            # dynamic | sandwich | fixed:<variant> (the separate baselines)
        "schedule": schedule_mode,
        "recipe": schedule.recipe,        # paper | cost_aware | sandwich | sandwich_distill | ..._distill | fixed:<v>
        "variants": ",".join(variants),
        "variant_probs": json.dumps({n: round(p, 6) for n, p in schedule.probs.items() if p > 0}),
        "world_size": str(info.world_size),
        "device": info.device.type,
        "zero_stage": str(cfg.deepspeed.zero_stage),
        "bf16": str(ds_config["bf16"]["enabled"]),
    }
    tags.update(run_tags())  # which saving gpu_hours_saved_frac is (dyntrain.tracking.savings)
    datasets = describe_datasets(cfg.data) if info.rank == 0 and cfg.tracking.enabled else []
    if datasets:  # MLflow dataset inputs; the fingerprint hashes the data's manifests, not the config
        tracker.log_datasets(datasets)
        tags["dyntrain.data_fingerprint"] = datasets[0]["digest"][:16]
    if cfg.deepspeed.zero_stage == 3:
        tags["zero3_note"] = ZERO3_NOTE[:5000]
    if resumed_from:
        tags["resumed_from"] = resumed_from
        tracker.log_text(cfg.to_yaml(), f"config_resume_step{step:08d}.yaml")
    else:
        tracker.log_params(cfg.flatten())
        tracker.log_params({"derived.global_batch": ds_config["train_batch_size"],
                            "derived.world_size": info.world_size, **plan.params()})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_text(json.dumps(ds_config, indent=2, default=str), "deepspeed_config.json")
    tracker.set_tags(tags)
    return tags


def _install_signal_handlers(trainer: Trainer) -> dict:
    """SIGUSR1 / SIGTERM ask for a checkpoint and a clean stop at the next step boundary."""
    previous = {}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: trainer.request_checkpoint())
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
