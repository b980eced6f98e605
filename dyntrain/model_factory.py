"""Build the DyNet of a run from ``cfg.model`` (the only place that maps config -> DyNetConfig)."""
from __future__ import annotations

import torch

from .config import Config


def dynet_config(cfg: Config):
    """The ``dynet.DyNetConfig`` described by ``cfg.model``."""
    from dynet import DyNetConfig

    m = cfg.model
    variants = {name: tuple(reuse) for name, reuse in m.variants.items()}
    default = "L" if "L" in variants else sorted(variants)[0]
    return DyNetConfig(dim=m.dim, heads=tuple(m.heads), ffn_expansion=m.ffn_expansion,
                       num_refinement=m.num_refinement, prompt_len=m.prompt_len,
                       prompt_dims=tuple(m.prompt_dims), prompt_sizes=tuple(m.prompt_sizes),
                       variants=variants, default_variant=default,
                       checkpoint_blocks=m.activation_checkpointing)


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
