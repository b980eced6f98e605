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

Periodic evaluation: with ``eval.every > 0`` and ``eval.sets`` given, rank 0 evaluates every variant
of ``eval.variants`` every ``eval.every`` steps and at the last step, and logs
``eval/<variant>/<task>/psnr|ssim`` into the fine-tuning run (test sets are read once, at start-up,
so a wrong folder fails before training starts).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dyntrain.errors import DyntrainError
from dyntrain.config import PARAMETER_FIELDS, Config, dynet_config_from_dict
from dyntrain.logs import get_logger, setup_logging
from dyntrain.train.model import build_model

log = get_logger(__name__)


class InitCheckpointError(DyntrainError, ValueError):
    """``init.checkpoint`` is missing or does not fit the model."""


def read_init_weights(cfg: Config) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, Any]]]:
    """(state_dict, model config dict) of ``init.checkpoint``; (None, None) when training from scratch."""
    from pathlib import Path

    from dyntrain.checkpoint.weights import load_weights

    path = cfg.init.checkpoint
    if not path:
        return None, None
    if not Path(path).exists():
        raise InitCheckpointError(f"init.checkpoint: {path} does not exist")
    return load_weights(path)


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


def make_eval_hook(cfg: Config):
    """``trainer_hook`` for ``run_training``: registers the periodic evaluation callback."""
    from dyntrain.eval.evaluate import PeriodicEvaluator, load_test_sets

    def hook(trainer) -> None:
        trainer.tracker.set_tags({"init_checkpoint": str(cfg.init.checkpoint or "none (from scratch)")})
        if hasattr(trainer.loader, "curriculum"):  # synthetic pairs, or paired data in sequential mode
            from dyntrain.data.finetune.tasks import install
            install(trainer, trainer.loader.curriculum)
        if cfg.eval.every <= 0 or not cfg.eval.sets:
            return
        evaluator = PeriodicEvaluator(cfg, trainer.tracker, trainer.rank, printer=log.info)
        if trainer.rank == 0:
            evaluator.pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)
        zero3 = cfg.deepspeed.zero_stage == 3

        def due(step: int) -> bool:
            return evaluator.due(step) or step == cfg.run.max_steps

        def callback(tr, step: int, metrics: dict) -> None:
            if not due(step):
                return
            copy = plain_copy(tr.engine.module, tr.rank == 0, zero3)
            if copy is not None:
                evaluator(copy.to(tr.device), step)

        trainer.add_callback(callback, at=due)  # the host waits for a step only where it evaluates

    return hook


def plain_copy(module: torch.nn.Module, keep: bool, zero3: bool) -> Optional[torch.nn.Module]:
    """A plain fp32 DyNet with the engine module's current weights (on the CPU), or None where
    ``keep`` is false. The evaluation runs on this copy, never through the engine's module: under
    ZeRO-3 that module's forward hooks would start collectives on rank 0 alone. Under ZeRO-3 every
    rank must call this (the partitioned weights are gathered collectively)."""
    import contextlib
    import dataclasses

    from dynet import DyNet

    gather = contextlib.nullcontext()
    if zero3:
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


def run_finetune(cfg: Config, loader_factory=None):
    """``launch/finetune.py``: fine-tune ``cfg`` on this rank; returns the trainer's result."""
    from dyntrain.data.finetune.paired import build_finetune_loader
    from dyntrain.train.run import run_training

    setup_logging()  # rank from the launcher's environment: the process group does not exist yet
    state, model_cfg = read_init_weights(cfg)
    changed = adopt_architecture(cfg, model_cfg)
    if changed:
        log.info(f"model architecture taken from init.checkpoint ({'; '.join(changed)})")
    return run_training(cfg, loader_factory or build_finetune_loader, mode="finetune",
                        model_builder=make_model_builder(cfg, state), trainer_hook=make_eval_hook(cfg))
