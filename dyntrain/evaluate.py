"""All-in-one evaluation: PSNR/SSIM per variant and task, as in the paper's Table 1.

Protocol: RGB in [0, 1], output clamped to [0, 1], no border shave, no Y channel; every image is
centre-cropped to a multiple of 16 (the same way in input and target) and restored whole at batch 1.

Test-set layouts (``eval.sets`` maps a name below to its folder):

    bsd68     a folder of clean images (recursive); noisy inputs are made here at sigma 15, 25 and 50
              from seed ``eval.noise_seed`` (image i at sigma s gets its own generator seeded by
              (seed, s, i)), rounded to uint8 — reported as tasks bsd68_s15, bsd68_s25, bsd68_s50
    rain100l  rainy/ + gt/ (or input/ + target/): rainy X pairs with gt X, gt "no"+X (rain-001.png ->
              norain-001.png) or gt with X's stem
    sots      hazy/ + gt/ (or outdoor/hazy + outdoor/gt, or hazy/ + clear/): hazy "0001_0.8_0.2.jpg"
              pairs with gt "0001.*" (the text before the first underscore)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .data.paired_base import haze_clean_stem
from .images import list_images, read_image
from .metrics import psnr, ssim

SET_KINDS = ("sots", "rain100l", "bsd68")
BSD68_SIGMAS = (15, 25, 50)
TASK_LABELS = {"sots": "SOTS", "rain100l": "Rain100L", "bsd68_s15": "BSD68 s15",
               "bsd68_s25": "BSD68 s25", "bsd68_s50": "BSD68 s50"}


class EvalDataError(ValueError):
    """A test-set folder, file or pairing that is missing or inconsistent."""


@dataclass
class TestPair:
    """One test image: degraded input and clean target, uint8 (H, W, 3), already centre-cropped."""
    task: str
    key: str
    input: np.ndarray
    target: np.ndarray


def centre_crop(img: np.ndarray, base: int = 16) -> np.ndarray:
    """Crop (H, W, ...) centrally so both sides are multiples of ``base`` (extra row/column at the end)."""
    height, width = img.shape[:2]
    dh, dw = height % base, width % base
    if height - dh <= 0 or width - dw <= 0:
        raise EvalDataError(f"image of {height}x{width} is smaller than the {base}-pixel crop base")
    return img[dh // 2: height - dh + dh // 2, dw // 2: width - dw + dw // 2]


def _read(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except OSError as exc:
        raise EvalDataError(f"cannot read test image {path}: {exc}") from exc


def _first_dir(folder: Path, options: Sequence[tuple[str, str]], name: str) -> tuple[Path, Path]:
    for a, b in options:
        if (folder / a).is_dir() and (folder / b).is_dir():
            return folder / a, folder / b
    tried = ", ".join(f"{a}/ + {b}/" for a, b in options)
    raise EvalDataError(f"{name}: {folder} has none of the layouts {tried}")


def _by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in list_images(folder):
        out.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return out


def _limit(items: list, max_images: int) -> list:
    return items[:max_images] if max_images > 0 else items


def add_test_noise(clean: np.ndarray, sigma: float, seed: int, index: int) -> np.ndarray:
    """Seeded Gaussian noise for BSD68: image ``index`` at ``sigma``, rounded and clipped to uint8."""
    rng = np.random.default_rng([seed, int(sigma), index])
    noisy = clean.astype(np.float64) + rng.standard_normal(clean.shape) * sigma
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def load_bsd68(folder: Path, noise_seed: int = 0, max_images: int = 0, base: int = 16,
               sigmas: Iterable[int] = BSD68_SIGMAS) -> list[TestPair]:
    images = _limit(list_images(folder), max_images)
    if not images:
        raise EvalDataError(f"bsd68: no images under {folder}")
    pairs = []
    for i, path in enumerate(images):
        clean = centre_crop(_read(path), base)
        key = path.relative_to(folder).with_suffix("").as_posix()
        for sigma in sigmas:
            pairs.append(TestPair(f"bsd68_s{sigma}", key, add_test_noise(clean, sigma, noise_seed, i), clean))
    return pairs


def load_rain100l(folder: Path, max_images: int = 0, base: int = 16) -> list[TestPair]:
    rainy_dir, gt_dir = _first_dir(folder, [("rainy", "gt"), ("input", "target")], "rain100l")
    gt = _by_stem(gt_dir)
    pairs = []
    for path in _limit(list_images(rainy_dir), max_images):
        stem = path.relative_to(rainy_dir).with_suffix("").as_posix()
        name = Path(stem).name
        match = gt.get(stem) or gt.get((Path(stem).parent / ("no" + name)).as_posix())
        if match is None:
            raise EvalDataError(f"rain100l: no clean image in {gt_dir} for {path}")
        pairs.append(TestPair("rain100l", stem, *_pair(path, match, base)))
    if not pairs:
        raise EvalDataError(f"rain100l: no images under {rainy_dir}")
    return pairs


def load_sots(folder: Path, max_images: int = 0, base: int = 16) -> list[TestPair]:
    hazy_dir, gt_dir = _first_dir(folder, [("hazy", "gt"), ("outdoor/hazy", "outdoor/gt"),
                                           ("hazy", "clear")], "sots")
    gt = {path.stem: path for path in list_images(gt_dir)}
    pairs = []
    for path in _limit(list_images(hazy_dir), max_images):
        stem = haze_clean_stem(path.name)
        if stem not in gt:
            raise EvalDataError(f"sots: no clean image {gt_dir}/{stem}.* for hazy image {path}")
        pairs.append(TestPair("sots", path.relative_to(hazy_dir).with_suffix("").as_posix(),
                              *_pair(path, gt[stem], base)))
    if not pairs:
        raise EvalDataError(f"sots: no images under {hazy_dir}")
    return pairs


def _pair(inp_path: Path, tgt_path: Path, base: int) -> tuple[np.ndarray, np.ndarray]:
    inp, tgt = _read(inp_path), _read(tgt_path)
    if inp.shape != tgt.shape:
        raise EvalDataError(f"{inp_path} and {tgt_path} differ in size: {inp.shape[:2]} vs {tgt.shape[:2]}")
    return centre_crop(inp, base), centre_crop(tgt, base)


def load_test_sets(sets: dict[str, str], noise_seed: int = 0, max_images: int = 0) -> list[TestPair]:
    """Every pair of the configured sets (``eval.sets``: kind -> folder), in Table 1's task order."""
    if not sets:
        raise EvalDataError("eval.sets is empty: give at least one of "
                            f"{list(SET_KINDS)} -> folder (e.g. eval.sets={{sots: data/SOTS/outdoor}})")
    out: list[TestPair] = []
    for name in sets:
        if name not in SET_KINDS:
            raise EvalDataError(f"eval.sets.{name}: unknown test set (known: {list(SET_KINDS)})")
    for name in SET_KINDS:
        if name not in sets:
            continue
        folder = Path(sets[name])
        if not folder.is_dir():
            raise EvalDataError(f"eval.sets.{name}: folder {folder} does not exist")
        if name == "bsd68":
            out += load_bsd68(folder, noise_seed, max_images)
        elif name == "rain100l":
            out += load_rain100l(folder, max_images)
        else:
            out += load_sots(folder, max_images)
    return out


def _to_tensor(img: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(device).float().div_(255.0)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, pairs: Sequence[TestPair], variants: Sequence[str],
                   device: torch.device | str | None = None,
                   restore: Optional[Callable[..., torch.Tensor]] = None,
                   autocast_dtype: Optional[torch.dtype] = None) -> dict[str, dict[str, dict[str, float]]]:
    """PSNR/SSIM of every variant on every pair, averaged per task, plus an "average" over tasks.

    Returns {variant: {task: {"psnr", "ssim", "images"}}}; tasks in Table 1 order.
    """
    if restore is None:
        from dynet.inference import restore_image as restore
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    param_dtype = next(model.parameters()).dtype  # bf16 under a DeepSpeed bf16 engine
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict[str, dict[str, float]]] = {}
        for variant in variants:
            sums: dict[str, list[float]] = {}
            for pair in pairs:
                x, y = _to_tensor(pair.input, device), _to_tensor(pair.target, device)
                with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                      else contextlib.nullcontext()):
                    out = restore(model, x.to(param_dtype), variant=variant)
                out = out.float().clamp(0.0, 1.0)
                acc = sums.setdefault(pair.task, [0.0, 0.0, 0])
                acc[0] += psnr(out, y).item()
                acc[1] += ssim(out, y).item()
                acc[2] += 1
            table = {task: {"psnr": p / n, "ssim": s / n, "images": n} for task, (p, s, n) in sums.items()}
            ordered = {t: table[t] for t in TASK_LABELS if t in table}
            if ordered:
                ordered["average"] = {"psnr": float(np.mean([v["psnr"] for v in ordered.values()])),
                                      "ssim": float(np.mean([v["ssim"] for v in ordered.values()])),
                                      "images": sum(v["images"] for v in ordered.values())}
            results[variant] = ordered
        return results
    finally:
        model.train(was_training)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Table 1 style: one row per variant, PSNR/SSIM per task and their average."""
    tasks = [t for t in list(TASK_LABELS) + ["average"] if any(t in r for r in results.values())]
    headers = ["variant"] + [TASK_LABELS.get(t, t) for t in tasks]
    rows = [[f"DyNet-{v}"] + [(f"{r[t]['psnr']:.2f}/{r[t]['ssim']:.4f}" if t in r else "-") for t in tasks]
            for v, r in results.items()]
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines)


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
    logging eval/<variant>/<task>/psnr|ssim into the run's tracker at the training step."""

    def __init__(self, cfg: Any, tracker: Any = None, rank: int = 0, printer: Callable[[str], None] = print) -> None:
        self.every = int(cfg.eval.every)
        self.rank = rank
        self.tracker = tracker
        self.printer = printer
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
    from dynet.flops import count_flops

    return {f"model/{v}/gflops_{size}": count_flops(model, size, size, variant=v).paper / 1e9 for v in variants}


def log_to_mlflow(metrics: dict[str, float], tracking_uri: str, experiment: str, run_id: Optional[str] = None,
                  child: bool = False, step: int = 0, run_name: str = "evaluation",
                  tags: Optional[dict[str, str]] = None, texts: Optional[dict[str, str]] = None) -> str:
    """Log ``metrics`` (at ``step``) to run ``run_id``, to a new child run of it (``child``), or — with
    no run id — to a new run in ``experiment``. Returns the id of the run written to."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from .tracking import default_artifact_location

    client = MlflowClient(tracking_uri)
    all_tags = {"dyntrain.stage": "evaluation", **(tags or {})}
    created = False
    if run_id is not None:
        try:
            parent = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"MLflow run {run_id} not found at {tracking_uri}: {exc}") from None
        if child:
            run = client.create_run(parent.info.experiment_id, run_name=run_name,
                                    tags={"mlflow.parentRunId": run_id, **all_tags})
            target, created = run.info.run_id, True
        else:
            target = run_id
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            experiment, artifact_location=default_artifact_location(tracking_uri))
        target, created = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id, True
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(target, metrics=batch[i:i + 500])
    if not created:
        client.set_tag(target, "dyntrain.evaluated", "true")
    for name, text in (texts or {}).items():
        client.log_text(target, text, name)
    if created:
        client.set_terminated(target, "FINISHED")
    return target


def run_evaluation(checkpoint: str, cfg: Any, variants: Sequence[str] | str = "all", device: str = "auto",
                   run_id: Optional[str] = None, child: bool = False, step: Optional[int] = None,
                   printer: Callable[[str], None] = print) -> dict[str, Any]:
    """``launch/evaluate.py``: load ``checkpoint``, evaluate ``cfg.eval.sets``, print Table 1, log to MLflow.

    The MLflow run is ``run_id`` when given, else the training run recorded in the checkpoint (when
    it records one), else a new run in ``cfg.tracking.experiment``; ``child`` writes to a child run.
    """
    from .restore import load_model, pick_device, read_checkpoint_info

    dev = pick_device(device)
    model = load_model(checkpoint, dev, cfg)
    names = resolve_variants(variants, list(model.variants))
    pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)
    start = time.perf_counter()
    results = evaluate_model(model, pairs, names, dev)
    table = format_table(results)
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.task] = counts.get(p.task, 0) + 1
    printer(f"checkpoint {checkpoint}: " + ", ".join(f"{TASK_LABELS.get(t, t)} {n}" for t, n in counts.items())
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
        printer(f"logged {len(metrics)} metrics to MLflow run {out['run_id']} ({cfg.tracking.uri})")
    return out
