"""Build and run one training job: what ``launch/pretrain.py`` (and fine-tuning) call.

Order: distributed start-up (launcher or single process) -> model (init from ``run.seed``) ->
DeepSpeed engine -> loader (``loader_factory(cfg, rank, world_size, device)``) -> schedule ->
checkpoint manager and resume -> MLflow run (the checkpoint's run id when resuming) -> ``train()``.
The MLflow run ends FINISHED, KILLED (stopped early on request, to be resumed) or FAILED (any
exception, re-raised).

Extension points (all optional, all called on every rank): ``model_builder`` (the model),
``checkpoint_factory`` (the checkpoint manager, e.g. one with a ``before_commit`` callback),
``schedule_hook`` (may replace the variant schedule of a rank) and ``trainer_hook`` (callbacks,
``Trainer.enable_trace`` ...). Pre-training runs with ``data.val_urls`` get the validation callback
(``dyntrain.eval.validation``) after ``trainer_hook``. Fine-tuning uses the first and the last; tests use them to trace runs
and to inject faults without any switch in this code path.
"""
from __future__ import annotations

import json
import signal
import time
from typing import Any, Callable, Optional

import torch

from dyntrain.config import Config
from dyntrain.train.engine import ZERO3_NOTE, build_engine, init_distributed, shutdown_distributed
from dyntrain.logs import setup_logging
from dyntrain.train.model import build_model
from dyntrain.train.schedule import VariantSchedule, install_cost_aware, new_verify_group, splitmix64
from dyntrain.tracking import make_tracker
from dyntrain.train.trainer import Trainer, TrainResult
from dyntrain.eval.validation import install_validation

LoaderFactory = Callable[[Config, int, int, torch.device], Any]
ScheduleHook = Callable[[VariantSchedule, int], VariantSchedule]


def default_checkpoint_manager(cfg: Config, engine, rank: int, world_size: int):
    """``dyntrain.checkpoint.CheckpointManager`` when ``checkpoint.dir`` is set, else None."""
    if not cfg.checkpoint.dir:
        return None
    from dyntrain.checkpoint import CheckpointManager

    return CheckpointManager(cfg.checkpoint, engine, rank, world_size)


def run_training(cfg: Config, loader_factory: LoaderFactory, *, mode: str = "pretrain",
                 model_builder: Callable[[Config], torch.nn.Module] = build_model,
                 checkpoint_factory=default_checkpoint_manager,
                 trainer_hook: Optional[Callable[[Trainer], None]] = None,
                 schedule_hook: Optional[ScheduleHook] = None) -> TrainResult:
    """Train ``cfg`` end to end on this rank; returns the trainer's result.

    Args:
        loader_factory: ``(cfg, rank, world_size, device) -> loader`` (data contract).
        mode: "pretrain" or "finetune" (MLflow tag ``dyntrain.stage``; tag ``mode`` is the schedule's
            "dynamic" or "fixed:<variant>").
        model_builder: builds the (initialised) model; fine-tuning loads ``init.checkpoint`` here.
        checkpoint_factory: ``(cfg, engine, rank, world_size) -> manager | None``.
        trainer_hook: called with the trainer before training (e.g. to add callbacks).
        schedule_hook: ``(schedule, rank) -> schedule`` used by this rank instead (default: the
            config's ``VariantSchedule`` unchanged).
    """
    t_start = time.perf_counter()
    setup_logging()  # the launcher's RANK until the process group exists
    info = init_distributed(cfg)
    rank, world = info.rank, info.world_size
    setup_logging(rank)
    # the global torch/numpy streams are seeded from (seed, rank); the model init forks its own
    torch.manual_seed(splitmix64(cfg.run.seed * 1_000_003 + rank) & 0x7FFF_FFFF_FFFF_FFFF)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model = model_builder(cfg)
    engine, ds_config = build_engine(cfg, model, info)
    loader = loader_factory(cfg, rank, world, info.device)
    tracker = None
    status = "FAILED"
    try:
        schedule = VariantSchedule.from_config(cfg)
        if schedule_hook is not None:
            schedule = schedule_hook(schedule, rank)
        verify_group = (new_verify_group(cfg.schedule.verify_timeout_s)
                        if cfg.schedule.verify_every and world > 1 else None)
        manager = checkpoint_factory(cfg, engine, rank, world)
        trainer = Trainer(cfg, engine, loader, schedule, None, rank, world,
                          checkpoint_manager=manager, verify_group=verify_group, device=info.device)
        resumed_from = trainer.resume()
        tracker = make_tracker(cfg, rank, run_id=trainer.mlflow_run_id)
        trainer.attach_tracker(tracker)
        _describe_run(tracker, cfg, ds_config, schedule, info, mode, resumed_from, step=trainer.step)
        if trainer_hook is not None:
            trainer_hook(trainer)
        validator = None
        if mode == "pretrain":  # fixed held-out set, every variant every eval.every steps
            validator = install_validation(trainer, cfg)
        install_cost_aware(trainer, cfg, validator)  # after the validator: reads its figures
        trainer.account.add_startup(time.perf_counter() - t_start)
        previous = _install_signal_handlers(trainer)
        try:
            result = trainer.train()
        finally:
            _restore_signal_handlers(previous)
        status = "KILLED" if result.stopped_early else "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
        if hasattr(loader, "close"):
            loader.close()
        if status != "FAILED":  # after a failure a peer may never reach the barrier
            shutdown_distributed()


def _describe_run(tracker, cfg: Config, ds_config: dict, schedule: VariantSchedule, info, mode: str,
                  resumed_from: Optional[str], step: int) -> None:
    """Params, tags and artifacts of the MLflow run (rank 0; no-ops on a NullTracker)."""
    variants = schedule.active
    schedule_mode = f"fixed:{schedule.fixed_variant}" if schedule.mode == "fixed" else schedule.mode
    tags = {
        "dyntrain.stage": mode,           # pretrain | finetune
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
    if cfg.deepspeed.zero_stage == 3:
        tags["zero3_note"] = ZERO3_NOTE[:5000]
    if resumed_from:
        tags["resumed_from"] = resumed_from
        tracker.log_text(cfg.to_yaml(), f"config_resume_step{step:08d}.yaml")
    else:
        tracker.log_params(cfg.flatten())
        tracker.log_params({"derived.global_batch": ds_config["train_batch_size"],
                            "derived.world_size": info.world_size})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_text(json.dumps(ds_config, indent=2, default=str), "deepspeed_config.json")
    tracker.set_tags(tags)


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
