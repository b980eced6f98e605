"""Dynamic pre-training as a job: which components ``run_training`` gets.

    loader      the DALI pre-training stream (``dyntrain.data.pretrain.pipeline``)
    callbacks   validation on the fixed held-out set when ``data.val_urls`` is given
                (``dyntrain.eval.validation``), and the cost-aware draw subscribed to it when
                ``schedule.variant_probs: cost_aware`` (it needs validation's figures, so it follows
                validation explicitly rather than by its place in a list)
    end hooks   the model logged into the run as an MLflow Model when ``tracking.log_model: true``
                (``dyntrain.serving.hook``; off by default for pre-training)
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

from dyntrain.config import Config
from dyntrain.data.loader import LoaderFactory
from dyntrain.data.pretrain.pipeline import build_pretrain_loader
from dyntrain.errors import ConfigError
from dyntrain.eval.validation import Validation
from dyntrain.jobs.preflight import preflight_lines
from dyntrain.serving.hook import model_logging
from dyntrain.train import run
from dyntrain.train.callbacks import Callback
from dyntrain.train.schedule import CostAwareUpdater


def pretrain_callbacks(cfg: Config) -> list[Callback]:
    """Validation (with ``data.val_urls``) and, subscribed to it, the cost-aware draw."""
    if not cfg.data.val_urls:
        if cfg.schedule.variant_probs == "cost_aware":
            raise ConfigError("schedule.variant_probs=cost_aware needs validation: set data.val_urls")
        return []
    validation = Validation(cfg)
    if cfg.schedule.variant_probs == "cost_aware":
        validation.then(CostAwareUpdater(cfg).update)
    return [validation]


def run_pretrain(cfg: Config, loader_factory: Optional[LoaderFactory] = None, **extension: Any):
    """``launch/pretrain.py``: pre-train ``cfg`` on this rank; returns the trainer's result.
    ``extension``: ``run_training``'s test and debugging hooks (``schedule_hook``, ``trace_dir``,
    ``checkpoint_factory``; ``callbacks`` run before the job's own)."""
    # pre-flight (of the config's data source unless a loader is given), data ranks, batch plan
    job = run.prepare(cfg, partial(preflight_lines, check_data=loader_factory is None))
    cfg = job.cfg
    callbacks = list(extension.pop("callbacks", ())) + pretrain_callbacks(cfg)
    end_hooks = model_logging(cfg, default=False) + list(extension.pop("end_hooks", ()))
    return run.run_training(cfg, loader_factory or build_pretrain_loader, callbacks=callbacks,
                            tags={"dyntrain.stage": "pretrain"}, end_hooks=end_hooks, prepared=job, **extension)
