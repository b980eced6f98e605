"""All-in-one fine-tuning through the pre-training machinery: same config tree, ``run_training``,
DeepSpeed engine, trainer, checkpoints and MLflow tracking — only the loader (paired data), the
starting weights (``init.checkpoint``) and an optional periodic evaluation differ.

Starting point:
  - ``init.checkpoint`` = a pre-training checkpoint folder (DeepSpeed) or an exported weights file:
    its module weights only (no optimizer state, no step, no schedule) initialise the model. When
    the checkpoint records its architecture, that architecture is used (every field that fixes the
    parameters: ``model.dim``, heads, prompt sizes ...; the variants table and the runtime switches
    stay the config's) and a note is logged if the YAML said otherwise.
  - ``init.checkpoint: null`` = from scratch (the no-pre-training ablation).
A fine-tuning run that is resumed from its own ``checkpoint.dir`` continues from there (the trainer's
resume overrides the initial weights).

The job's components: the paired (or synthetic) loader, the initial weights (``make_model_builder``),
the task curriculum's log and LR restarts when the source draws tasks by a curriculum
(``dyntrain.train.curriculum``), and, with ``eval.every > 0`` and ``eval.sets`` given, the periodic
evaluation (``dyntrain.eval.periodic.TestSetEvaluation``): rank 0 evaluates every variant of
``eval.variants`` every ``eval.every`` steps and at the last step, and logs
``eval/<variant>/<task>/psnr|ssim`` into the fine-tuning run (test sets are read once, at start-up,
so a wrong folder fails before training starts). At the end, rank 0 logs the model into the run as
an MLflow Model and registers it with ``tracking.register_as`` (``dyntrain.serving.hook``;
``tracking.log_model: false`` turns it off).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dyntrain.config import PARAMETER_FIELDS, Config, dynet_config_from_dict
from dyntrain.data.finetune.paired import build_finetune_loader
from dyntrain.data.finetune.tasks import task_curriculum
from dyntrain.data.loader import LoaderFactory
from dyntrain.errors import DyntrainError
from dyntrain.eval.periodic import TestSetEvaluation
from dyntrain.interop import read_weights
from dyntrain.jobs.preflight import preflight_lines
from dyntrain.logs import get_logger, setup_logging
from dyntrain.serving.hook import model_logging
from dyntrain.train import run
from dyntrain.train.curriculum import CurriculumLog, CurriculumLR
from dyntrain.train.model import build_model


log = get_logger(__name__)


class InitCheckpointError(DyntrainError, ValueError):
    """``init.checkpoint`` is missing or does not fit the model."""


def read_init_weights(cfg: Config) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, Any]]]:
    """(state_dict, model config dict) of ``init.checkpoint``; (None, None) when training from scratch."""


    path = cfg.init.checkpoint
    if not path:
        return None, None
    if not Path(path).exists():
        raise InitCheckpointError(f"init.checkpoint: {path} does not exist")
    return read_weights(path)  # dyntrain's own files or the authors' reference layout


def adopt_architecture(cfg: Config, model_cfg: Optional[dict[str, Any]]) -> list[str]:
    """Copy the checkpoint's architecture (the fields that fix the parameters, read from the stored
    dict in any form) into ``cfg.model``; returns the keys that changed, as "key: old -> new"."""
    if not model_cfg:
        return []
    stored = dynet_config_from_dict(model_cfg, where=f"init.checkpoint {cfg.init.checkpoint}: model").to_dict()
    changed = []
    for key in PARAMETER_FIELDS:
        if getattr(cfg.model, key) != stored[key]:
            changed.append(f"{key}: {getattr(cfg.model, key)} -> {stored[key]}")
            setattr(cfg.model, key, stored[key])
    cfg.model.to_dynet()  # the adopted architecture with the config's variants must still be valid
    return changed


def make_model_builder(cfg: Config, state: Optional[dict[str, torch.Tensor]]):
    """``model_builder`` for ``run_training``: the config's DyNet, then the init weights loaded."""

    def builder(c: Config) -> torch.nn.Module:
        model = build_model(c)
        if state is None:
            return model
        own = model.state_dict()
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if c.init.strict and (shapes or missing or unexpected):
            raise InitCheckpointError(
                f"init.checkpoint {c.init.checkpoint} does not fit the model (checkpoint vs model): "
                f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}, missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (init.strict=false loads what fits)")
        fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        model.load_state_dict(fitting, strict=False)
        return model

    return builder


def finetune_callbacks(cfg: Config) -> tuple[list, Optional[Callable]]:
    """(callbacks, lr_scheduler) of a fine-tuning job: the task curriculum's log and LR restarts when
    the data source draws its tasks by a curriculum, and the periodic evaluation on ``eval.sets``."""
    callbacks: list = []
    lr_scheduler = None
    curriculum = task_curriculum(cfg)
    if curriculum is not None:
        callbacks.append(CurriculumLog(curriculum))
        if curriculum.mode == "sequential":
            lr_scheduler = CurriculumLR.factory(curriculum)
    if cfg.eval.every > 0 and cfg.eval.sets:
        callbacks.append(TestSetEvaluation(cfg, printer=log.info))
    return callbacks, lr_scheduler


def run_finetune(cfg: Config, loader_factory: Optional[LoaderFactory] = None, **extension: Any):
    """``launch/finetune.py``: fine-tune ``cfg`` on this rank; returns the trainer's result.
    ``extension``: ``run_training``'s test and debugging hooks (``schedule_hook``, ``trace_dir``,
    ``checkpoint_factory``; ``callbacks`` are added after the job's own)."""
    setup_logging()  # rank from the launcher's environment: the process group does not exist yet
    state, model_cfg = read_init_weights(cfg)
    changed = adopt_architecture(cfg, model_cfg)
    if changed:
        log.info(f"model architecture taken from init.checkpoint ({'; '.join(changed)})")
    # pre-flight (of the config's data source unless a loader is given), data ranks, batch plan
    job = run.prepare(cfg, partial(preflight_lines, check_data=loader_factory is None))
    cfg = job.cfg
    callbacks, lr_scheduler = finetune_callbacks(cfg)
    callbacks += list(extension.pop("callbacks", ()))
    end_hooks = model_logging(cfg, default=True) + list(extension.pop("end_hooks", ()))
    tags = {"dyntrain.stage": "finetune", "init_checkpoint": str(cfg.init.checkpoint or "none (from scratch)")}
    return run.run_training(cfg, loader_factory or build_finetune_loader, callbacks=callbacks, tags=tags,
                            model_builder=make_model_builder(cfg, state), lr_scheduler=lr_scheduler,
                            end_hooks=end_hooks, prepared=job, **extension)


def brings_lr_scheduler(cfg: Config) -> bool:
    """Whether the job hands DeepSpeed its own LR scheduler (a sequential task curriculum's restarts)."""
    curriculum = task_curriculum(cfg)
    return curriculum is not None and curriculum.mode == "sequential"
