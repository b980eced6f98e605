"""Build the DyNet of a run from ``cfg.model`` (architecture: ``cfg.model.to_dynet()``)."""
from __future__ import annotations

import torch

from dyntrain.config import Config


def dynet_config(cfg: Config):
    """The ``dynet.DyNetConfig`` described by ``cfg.model`` (activation checkpointing included)."""
    return cfg.model.to_dynet()


def build_model(cfg: Config) -> torch.nn.Module:
    """A freshly initialised DyNet; the init depends only on ``run.seed`` (same on every rank)."""
    from dynet import DyNet

    devices = []  # fork the RNG so building the model leaves the global stream untouched
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.run.seed)
        model = DyNet(dynet_config(cfg))
    if cfg.model.channels_last:
        model.use_channels_last()  # activations only: DeepSpeed needs plainly strided weights
    if cfg.model.compile and cfg.deepspeed.zero_stage < 3:
        # one compiled graph per block shape, shared by every variant: no recompile on a switch
        # (ZeRO-3's parameter hooks need DeepSpeed's own compile: engine.compile(), see engine.py)
        model.compile_blocks()
    return model
