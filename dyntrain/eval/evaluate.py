"""All-in-one evaluation: PSNR/SSIM per variant and task, as in the paper's Table 1.

Protocol: RGB in [0, 1], output clamped to [0, 1], no border shave, no Y channel; every image is
centre-cropped to a multiple of 16 (the same way in input and target) and restored whole at batch 1.
The test sets and their layouts are in ``dyntrain.eval.testdata`` (its names are importable from here
too). This module scores a model (``evaluate_model``), formats and flattens the results, evaluates
periodically inside a training run (``PeriodicEvaluator``) and runs ``launch/evaluate.py``
(``run_evaluation``, logging to MLflow with ``log_to_mlflow``).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dynet.flops import count_flops
from dynet.inference import restore_image
from dynet.summary import text_table
from dyntrain.data.finetune.degradations import PRESETS
from dyntrain.devices import choose_device
from dyntrain.eval.metrics import psnr, ssim
from dyntrain.eval.testdata import (BSD68_SIGMAS, SET_KINDS, TASK_LABELS, EvalDataError,  # noqa: F401
                                    TestPair, add_test_noise, centre_crop, load_bsd68, load_rain100l,
                                    load_sots, load_test_sets)
from dyntrain.images import to_tensor
from dyntrain.logs import get_logger
from dyntrain.redaction import redact_uri
from dyntrain.progress import progress_bar
from dyntrain.restore import load_model, read_checkpoint_info
from dyntrain.tracking import store


log = get_logger(__name__)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, pairs: Sequence[TestPair], variants: Sequence[str],
                   device: torch.device | str | None = None,
                   restore: Optional[Callable[..., torch.Tensor]] = None,
                   autocast_dtype: Optional[torch.dtype] = None) -> dict[str, dict[str, dict[str, float]]]:
    """PSNR/SSIM of every variant on every pair, averaged per task, plus an "average" over tasks.

    Returns {variant: {task: {"psnr", "ssim", "images"}}}; tasks in Table 1 order. A progress bar
    counts the restored images (rank 0, on a terminal).
    """
    if restore is None:
        restore = restore_image
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    param_dtype = next(model.parameters()).dtype  # bf16 under a DeepSpeed bf16 engine
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict[str, dict[str, float]]] = {}
        with progress_bar(len(variants) * len(pairs), "evaluating") as bar:
            for variant in variants:
                bar.set_postfix_str(f"DyNet-{variant}")
                sums: dict[str, list[float]] = {}
                for pair in pairs:
                    x, y = to_tensor(pair.input, device), to_tensor(pair.target, device)
                    with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                          else contextlib.nullcontext()):
                        out = restore(model, x.to(param_dtype), variant=variant)
                    out = out.float().clamp(0.0, 1.0)
                    acc = sums.setdefault(pair.task, [0.0, 0.0, 0])
                    acc[0] += psnr(out, y).item()
                    acc[1] += ssim(out, y).item()
                    acc[2] += 1
                    bar.update()
                results[variant] = _per_task(sums)
        return results
    finally:
        model.train(was_training)


def _per_task(sums: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """{task: [psnr sum, ssim sum, n]} -> means per task in Table 1 order, plus their "average"."""
    table = {task: {"psnr": p / n, "ssim": s / n, "images": n} for task, (p, s, n) in sums.items()}
    ordered = {t: table[t] for t in TASK_LABELS if t in table}
    groups = {f"mio_{p}_average": [v for t, v in ordered.items() if t.startswith(f"mio_{p}_")] for p in PRESETS}
    if ordered:
        ordered["average"] = _mean(list(ordered.values()))
    ordered.update({name: _mean(group) for name, group in groups.items() if group})  # per MiO preset
    return ordered


def _mean(entries: list[dict[str, float]]) -> dict[str, float]:
    return {"psnr": float(np.mean([v["psnr"] for v in entries])),
            "ssim": float(np.mean([v["ssim"] for v in entries])), "images": sum(v["images"] for v in entries)}


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Table 1 style: one row per variant, PSNR/SSIM per task and their average."""
    tasks = [t for t in list(TASK_LABELS) + ["average"] if any(t in r for r in results.values())]
    headers = ["variant"] + [TASK_LABELS.get(t, t) for t in tasks]
    rows = [[f"DyNet-{v}"] + [(f"{r[t]['psnr']:.2f}/{r[t]['ssim']:.4f}" if t in r else "-") for t in tasks]
            for v, r in results.items()]
    return text_table(headers, rows)


def metrics_dict(results: dict[str, dict[str, dict[str, float]]], prefix: str = "eval") -> dict[str, float]:
    """Flat MLflow metric names: eval/<variant>/<task>/psnr|ssim."""
    out = {}
    for variant, tasks in results.items():
        for task, vals in tasks.items():
            for name in ("psnr", "ssim"):
                if math.isfinite(vals[name]):
                    out[f"{prefix}/{variant}/{task}/{name}"] = float(vals[name])
    return out


def resolve_variants(requested: Sequence[str] | str, known: Sequence[str]) -> list[str]:
    """"all" (or ["all"]) -> every known variant; otherwise check each name."""
    names = [requested] if isinstance(requested, str) else list(requested)
    if "all" in names:
        return list(known)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown variant {name!r}; the model has {list(known)} (or 'all')")
    return names


class PeriodicEvaluator:
    """Evaluation inside a training run: every ``eval.every`` steps (and when asked), on rank 0,
    logging eval/<variant>/<task>/psnr|ssim into the run's tracker at the training step. The table
    goes to ``printer`` (default: an INFO log line)."""

    def __init__(self, cfg: Any, tracker: Any = None, rank: int = 0,
                 printer: Optional[Callable[[str], None]] = None) -> None:
        self.every = int(cfg.eval.every)
        self.rank = rank
        self.tracker = tracker
        self.printer = printer if printer is not None else log.info
        self.variants = resolve_variants(cfg.eval.variants, list(cfg.model.variants))
        self.pairs: Optional[list[TestPair]] = None
        self.sets, self.noise_seed, self.max_images = dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images
        self.last: Optional[dict] = None
        self.flops_logged = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0 and bool(self.sets)

    def __call__(self, model: torch.nn.Module, step: int) -> Optional[dict]:
        if self.rank != 0 or not self.sets:
            return None
        if self.pairs is None:
            self.pairs = load_test_sets(self.sets, self.noise_seed, self.max_images)
        results = evaluate_model(model, self.pairs, self.variants)
        self.last = results
        self.printer(f"evaluation at step {step}:\n{format_table(results)}")
        if self.tracker is not None:
            metrics = metrics_dict(results)
            if not self.flops_logged:  # the compute of each variant, for PSNR-vs-GFLOPs comparisons
                metrics.update(flops_metrics(model, self.variants))
                self.flops_logged = True
            self.tracker.log_metrics(metrics, step=step)
        return results


# ------------------------------------------------------------------------------ MLflow + CLI
def flops_metrics(model: torch.nn.Module, variants: Sequence[str], size: int = 224) -> dict[str, float]:
    """model/<variant>/gflops_224: the paper's FLOP figure (conv + linear + GELU) at 224x224."""

    return {f"model/{v}/gflops_{size}": count_flops(model, size, size, variant=v).paper / 1e9 for v in variants}


def log_to_mlflow(metrics: dict[str, float], tracking_uri: str, experiment: str, run_id: Optional[str] = None,
                  child: bool = False, step: int = 0, run_name: str = "evaluation",
                  tags: Optional[dict[str, str]] = None, texts: Optional[dict[str, str]] = None) -> str:
    """Log ``metrics`` (at ``step``) to run ``run_id``, to a new child run of it (``child``), or — with
    no run id — to a new run in ``experiment``. Returns the id of the run written to
    (``dyntrain.tracking.store.log_to_run``)."""
    return store.log_to_run(metrics, tracking_uri, experiment, run_id, child=child, step=step,
                            run_name=run_name, tags=tags, texts=texts)


def run_evaluation(checkpoint: str, cfg: Any, variants: Sequence[str] | str = "all", device: str = "auto",
                   run_id: Optional[str] = None, child: bool = False, step: Optional[int] = None,
                   printer: Callable[[str], None] = print) -> dict[str, Any]:
    """``launch/evaluate.py``: load ``checkpoint``, evaluate ``cfg.eval.sets``, print Table 1 (through
    ``printer``: it is the command's result), log to MLflow; the other lines are log records.

    The MLflow run is ``run_id`` when given, else the training run recorded in the checkpoint (when
    it records one), else a new run in ``cfg.tracking.experiment``; ``child`` writes to a child run.
    """

    dev = choose_device(device)
    model = load_model(checkpoint, dev, cfg)
    names = resolve_variants(variants, list(model.variants))
    pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)
    start = time.perf_counter()
    results = evaluate_model(model, pairs, names, dev)
    table = format_table(results)
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.task] = counts.get(p.task, 0) + 1
    log.info(f"checkpoint {checkpoint}: " + ", ".join(f"{TASK_LABELS.get(t, t)} {n}" for t, n in counts.items())
             + f" test images; {len(names)} variant(s) in {time.perf_counter() - start:.1f}s on {dev}")
    printer(table)
    out: dict[str, Any] = {"results": results, "table": table, "run_id": None}
    if cfg.tracking.enabled:
        info = read_checkpoint_info(checkpoint)
        target = run_id or info.get("mlflow_run_id")
        metrics = {**metrics_dict(results), **flops_metrics(model, names)}
        out["run_id"] = log_to_mlflow(
            metrics, cfg.tracking.uri, cfg.tracking.experiment, target, child=child,
            step=step if step is not None else int(info.get("step") or 0),
            run_name=f"eval-{info.get('tag') or Path(checkpoint).stem}", tags={"dyntrain.checkpoint": str(checkpoint)},
            texts={"evaluation/table.txt": table + "\n"})
        log.info(f"logged {len(metrics)} metrics to MLflow run {out['run_id']} ({redact_uri(cfg.tracking.uri)})")
    return out
