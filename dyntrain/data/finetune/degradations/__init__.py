"""The seven MiOIR degradations, synthesised on the fly from clean images (and by
``launch/make_testsets.py``): batched torch operations on the training device.

    from dyntrain.data.finetune.degradations import TABLE, draw_params, degrade
    params = draw_params(["noise", "haze"], "in", seed, step, rank, first_index)
    lq = degrade(clean_uint8_valued_float, ["noise", "haze"], params, depth=None)

Every function takes a float batch (B, 3, H, W) holding 8-bit values (0..255) and per-sample
parameters (one tensor of shape (B,) per parameter), and returns the degraded batch rounded to
uint8 values (the spec: "every degraded image is rounded to uint8"). Parameters are drawn per
sample from (seed, step, rank, index) (``dyntrain.seeds``), so a resumed run draws the same ones.

The set is open: a new degradation is one function, one row of ``TABLE`` (``registry.py``) and its
name in ``dyntrain.config.sections.SYNTHETIC_TASKS`` (the config checks ``data.tasks`` against it and
may not import this package); the registry refuses to import when the two lists differ.
"""
from dyntrain.data.finetune.degradations.registry import (PRESETS, TABLE, Degradation, DegradationError,
                                                          check_tasks, degrade, draw_params)


__all__ = ["PRESETS", "TABLE", "Degradation", "DegradationError", "check_tasks", "degrade", "draw_params"]
