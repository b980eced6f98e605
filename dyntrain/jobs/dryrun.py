"""``--dry-run --world-size N``: what a training job would do on N processes, without a GPU, a
process group or training.

    python launch/pretrain.py --config configs/pretrain.yaml --dry-run --world-size 64 [dotted.key=value ...]

Runs the pre-flight (``dyntrain.jobs.preflight``; a failure is one ``error:`` line, exit 2), chooses
the data ranks as the real start would (the checkpoint a resume continues from), derives the batch
plan (``dyntrain.config.plan``), prints it with the steps, the epochs over the data, where the job
resumes from and where it logs, and prints as its **last line** the DeepSpeed config as one JSON
object: the one ``dyntrain.train.engine.ds_config_for`` builds for ``deepspeed.initialize``.

The device is the one the job would train on: CUDA when ``run.device`` is ``cuda``, or ``auto`` with
a GPU visible here; on a login node without a GPU, ``run.device=cuda`` shows the GPU job's JSON
(``bf16: auto`` is then taken as on: every GPU the configs target supports it).
"""
from __future__ import annotations

import json
from typing import Callable, Optional

import torch

from dyntrain.checkpoint.layout import resume_data_ranks
from dyntrain.config import Config
from dyntrain.config.plan import batch_plan, check_resume_plan
from dyntrain.data.logical import choose_data_ranks
from dyntrain.jobs.preflight import preflight
from dyntrain.tracking.mlflow_tracker import redact
from dyntrain.train.engine import ds_config_for


def dry_run_device(cfg: Config) -> torch.device:
    wanted = cfg.run.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def dry_run(cfg: Config, world_size: int, custom_scheduler: bool = False,
            out: Callable[[str], None] = print) -> int:
    """Print the plan of ``cfg`` on ``world_size`` processes and, last, its DeepSpeed JSON; returns 0
    (a problem raises a ``DyntrainError`` naming the key, file or URL). ``custom_scheduler``: the job
    hands DeepSpeed its own LR scheduler (the task curriculum), so the JSON has no "scheduler"."""
    report = preflight(cfg, world_size)
    saved = resume_data_ranks(cfg.checkpoint.dir, cfg.checkpoint.resume)
    data_ranks, note = choose_data_ranks(cfg.data.logical_ranks, saved, world_size)
    plan = batch_plan(cfg, world_size, data_ranks)
    check_resume_plan(cfg, plan, saved)
    planned = plan.apply(cfg)
    device = dry_run_device(cfg)
    hint = " (run.device=cuda: the JSON of a GPU job)" if device.type == "cpu" and cfg.run.device == "auto" else ""
    out(f"dry run: {cfg.run.name} on {world_size} process(es), device {device.type}{hint}; nothing is started")
    for line in [*report.lines, *([note] if note else []), *plan.lines()]:
        out(line)
    out(steps_line(plan.iterations, plan.global_batch, report.samples_per_epoch, report.resume_step))
    out(f"checkpoints every {planned.checkpoint.every} steps into {cfg.checkpoint.dir}; "
        f"progress every {cfg.run.log_every} steps; MLflow {redact('tracking.uri', cfg.tracking.uri)} "
        f"experiment {cfg.tracking.experiment}" + ("" if cfg.tracking.enabled else " (tracking off)"))
    config = ds_config_for(cfg, world_size, device, data_ranks, custom_scheduler=custom_scheduler)
    out(json.dumps(config, sort_keys=True))
    return 0


def steps_line(iterations: int, global_batch: int, per_epoch: Optional[int], start: int) -> str:
    where = f"from step {start}" if start else "from step 0"
    if not per_epoch:
        return f"steps: {iterations} ({where}); samples per epoch not counted"
    steps_per_epoch = max(1, per_epoch // global_batch)
    epochs = iterations * global_batch / per_epoch
    return (f"steps: {iterations} ({where}); {per_epoch} samples per epoch = {steps_per_epoch} steps per "
            f"epoch at global batch {global_batch}; {epochs:.4g} epochs")
