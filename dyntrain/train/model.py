"""Build the DyNet of a run from ``cfg.model`` (architecture: ``cfg.model.to_dynet()``)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from dynet import DyNet, count_flops
from dyntrain.config import Config
from dyntrain.logs import get_logger


log = get_logger(__name__)


def dynet_config(cfg: Config):
    """The ``dynet.DyNetConfig`` described by ``cfg.model`` (activation checkpointing included)."""
    return cfg.model.to_dynet()


def compilation(cfg: Config) -> Optional[str]:
    """How ``model.compile`` is done, decided here only: "blocks" (``DyNet.compile_blocks``: one
    compiled graph per block shape, shared by every variant, so a switch never recompiles) below
    ZeRO-3; "engine" (DeepSpeed's ``engine.compile()``: ZeRO-3's parameter hooks need it) at
    stage 3; None without ``model.compile``."""
    if not cfg.model.compile:
        return None
    return "engine" if cfg.deepspeed.zero_stage == 3 else "blocks"


def build_model(cfg: Config) -> torch.nn.Module:
    """A freshly initialised DyNet; the init depends only on ``run.seed`` (same on every rank)."""
    devices = []  # fork the RNG so building the model leaves the global stream untouched
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.run.seed)
        model = DyNet(dynet_config(cfg))
    if cfg.model.channels_last:
        model.use_channels_last()  # activations only: DeepSpeed needs plainly strided weights
    if compilation(cfg) == "blocks":
        model.compile_blocks()
    return model


def variant_flops(cfg: Config, variants: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """F_v: FLOPs of one forward of every variant on one crop (``dynet.flops`` on the meta device),
    the account's work count; {} (work not counted) for a model ``cfg.model`` does not describe."""
    try:
        with torch.device("meta"):
            model = DyNet(dynet_config(cfg))
        size = int(cfg.data.crop_size)
        return {n: float(count_flops(model, size, size, reuse=tuple(r)).total) for n, r in variants.items()}
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        log.warning(f"work count (pflop) off: could not count the model's FLOPs ({exc})")
        return {}
