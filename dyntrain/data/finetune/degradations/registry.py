"""The table of degradations (name -> function and parameter ranges per preset), the per-sample
parameter draw and the batched application.

A parameter range is ``(low, high, kind)``: ``uniform`` draws a float in [low, high), ``odd`` an odd
integer in [low, high], ``int`` an integer in [low, high]. Stochastic degradations (noise, rain)
also get a ``seed`` for their own torch generator.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dyntrain.config.sections import PRESETS, SYNTHETIC_TASKS
from dyntrain.data.finetune.degradations.blur import blur
from dyntrain.data.finetune.degradations.compress import jpeg
from dyntrain.data.finetune.degradations.light import lowlight
from dyntrain.data.finetune.degradations.noise import noise
from dyntrain.data.finetune.degradations.resample import sr
from dyntrain.data.finetune.degradations.weather import haze, rain
from dyntrain.errors import DyntrainError
from dyntrain.seeds import seed_sequence


Range = tuple[float, float, str]


class DegradationError(DyntrainError, ValueError):
    """An unknown task or preset, or parameters that do not fit a degradation."""


@dataclass(frozen=True)
class Degradation:
    """One row of the table: the function, its parameter ranges per preset, and whether it draws
    its own noise (then a ``seed`` parameter is added) or takes a depth map (haze)."""
    fn: Callable[..., torch.Tensor]
    ranges: dict[str, dict[str, Range]]
    stochastic: bool = False
    uses_depth: bool = False


_RAIN_SHAPE = {"length": (20, 40, "uniform"), "angle": (-45, 45, "uniform"), "width": (3, 11, "uniform")}

TABLE: dict[str, Degradation] = {
    "sr": Degradation(sr, {"in": {"scale": (4, 4, "uniform")}, "out": {"scale": (6, 6, "uniform")}}),
    "blur": Degradation(blur, {"in": {"sigma": (1, 3, "uniform"), "ksize": (7, 23, "odd")},
                               "out": {"sigma": (3, 5, "uniform"), "ksize": (7, 23, "odd")}}),
    "noise": Degradation(noise, {"in": {"sigma": (15, 50, "uniform")},
                                 "out": {"sigma": (50, 70, "uniform")}}, stochastic=True),
    "jpeg": Degradation(jpeg, {"in": {"quality": (30, 70, "int")}, "out": {"quality": (10, 30, "int")}}),
    "rain": Degradation(rain, {"in": {"density": (50, 100, "uniform"), **_RAIN_SHAPE},
                               "out": {"density": (100, 150, "uniform"), **_RAIN_SHAPE}}, stochastic=True),
    "haze": Degradation(haze, {"in": {"A": (0.8, 1.0, "uniform"), "beta": (0.5, 2.5, "uniform")},
                               "out": {"A": (0.8, 1.0, "uniform"), "beta": (2.5, 3.0, "uniform")}},
                        uses_depth=True),
    "lowlight": Degradation(lowlight, {"in": {"gamma": (1, 3, "uniform")}, "out": {"gamma": (3, 4, "uniform")}}),
}

if tuple(TABLE) != SYNTHETIC_TASKS:  # a new degradation is one function, one row here and its name there
    raise ImportError(f"degradations: TABLE names {tuple(TABLE)}, dyntrain.config.sections.SYNTHETIC_TASKS "
                      f"names {SYNTHETIC_TASKS}")


def check_tasks(tasks: Sequence[str], key: str = "data.tasks") -> list[str]:
    """``tasks`` as a list; raises naming ``key`` and the known names when one is unknown."""
    unknown = [t for t in tasks if t not in TABLE]
    if unknown:
        raise DegradationError(f"{key}: unknown tasks {unknown} (known: {list(TABLE)})")
    return list(tasks)


def check_preset(preset: str, key: str = "data.preset") -> str:
    if preset not in PRESETS:
        raise DegradationError(f"{key}: unknown preset {preset!r} (known: {list(PRESETS)})")
    return preset


def _draw(rng: np.random.Generator, lo: float, hi: float, kind: str) -> float:
    if kind == "odd":
        return float(2 * rng.integers((int(lo) + 1) // 2, int(hi) // 2 + 1) + 1)
    if kind == "int":
        return float(rng.integers(int(lo), int(hi) + 1))
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def sample_params(task: str, preset: str, *key: int) -> dict[str, float]:
    """The parameters of one sample of ``task``: a pure function of (task, preset, key...), where key
    is (seed, step, rank, index) in training and (seed, image index) for test sets."""
    row = TABLE[check_tasks([task])[0]]
    rng = np.random.default_rng(seed_sequence(*key, zlib.crc32(f"{task}/{check_preset(preset)}".encode())))
    out = {name: _draw(rng, *r) for name, r in sorted(row.ranges[preset].items())}
    if row.stochastic:
        out["seed"] = float(rng.integers(0, 2 ** 31 - 1))
    return out


def draw_params(tasks: Sequence[str], preset: str, seed: int, step: int, rank: int,
                first_index: int = 0) -> list[dict[str, float]]:
    """Per-sample parameters of a batch: sample i of the batch gets index ``first_index + i``."""
    return [sample_params(t, preset, seed, step, rank, first_index + i) for i, t in enumerate(tasks)]


def degrade(x: torch.Tensor, tasks: Sequence[str], params: Sequence[dict[str, Any]],
            depth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Degrade each sample of ``x`` ((B, 3, H, W), float 8-bit values) by its task and parameters.
    Samples of one task run as one batched call. ``depth``: (B, 1, H, W) normalised depth, NaN where
    a sample has none (only haze reads it)."""
    if len(tasks) != x.shape[0] or len(params) != x.shape[0]:
        raise DegradationError(f"degrade: {x.shape[0]} images, {len(tasks)} tasks, {len(params)} parameter sets")
    out = torch.empty_like(x, dtype=torch.float32)
    for task in dict.fromkeys(check_tasks(tasks)):
        idx = [i for i, t in enumerate(tasks) if t == task]
        p = {k: torch.tensor([params[i][k] for i in idx], dtype=torch.float64) for k in params[idx[0]]}
        sel = torch.tensor(idx, device=x.device)
        row = TABLE[task]
        if row.uses_depth:
            out[sel] = row.fn(x[sel].float(), p, None if depth is None else depth[sel])
        else:
            out[sel] = row.fn(x[sel].float(), p)
    return out
