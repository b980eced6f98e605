"""Training the variant router (``launch/train_router.py``).

Labels: every variant of the fine-tuned checkpoint restores a crop of every degraded training input
of the paired data (``data.root``, ``data.tasks``, ``data.sigmas``: the fine-tuning config); a crop's
label per variant is the PSNR (dB) it loses against the largest (most FLOPs) variant. Crops and noise
are seeded by (``run.seed``, entry, sample), and the labels are cached on disk keyed by the checkpoint
file, the variant set and the data, so retraining the router with other settings costs no DyNet pass.

The router regresses the labels (smooth L1) with Adam on random flips/rotations; a fifth of the
crops is held out to report the error and how often the policy picks what the labels' oracle picks.
Metrics go to MLflow (``tracking``) like every other stage; the router is saved beside the weights.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dynet.router import RouterConfig, VariantRouter, choose_variant
from dyntrain.data.finetune.base import random_pair_crop, scan_tasks
from dyntrain.devices import choose_device
from dyntrain.eval.metrics import psnr
from dyntrain.images import read_image
from dyntrain.logs import get_logger
from dyntrain.redaction import redact_uri
from dyntrain.restore import load_model
from dyntrain.routing.router import router_path_for, save_router, variant_costs
from dyntrain.seeds import mix_seed
from dyntrain.tracking import store


log = get_logger(__name__)
MAX_PSNR = 100.0  # identical images give inf; cap so that differences stay finite


@dataclass
class LabelSet:
    """Router training data: uint8 crops (N, 3, c, c), their task names, and per variant (N, V)
    the PSNR of its output and the dB it loses against the largest variant."""
    inputs: torch.Tensor
    tasks: list[str]
    names: list[str]
    psnrs: torch.Tensor
    losses: torch.Tensor


def degraded_crops(entries: Sequence[Any], crop: int, seed: int, samples: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(inputs, targets) uint8 (N, 3, crop, crop) and tasks for ``samples`` seeded crops per entry."""

    inputs, targets, tasks = [], [], []
    for i, entry in enumerate(entries):
        clean = read_image(entry.target_path)
        degraded = clean if entry.sigma > 0 else read_image(entry.input_path)
        for s in range(samples):
            rng = np.random.default_rng(mix_seed(seed, i, s, 0x0A7E))
            inp, tgt = random_pair_crop(degraded, clean, crop, rng, what=entry.key)
            if entry.sigma > 0:  # Gaussian noise, saved as uint8 as the fine-tuning data does
                noisy = tgt.astype(np.float64) + rng.standard_normal(tgt.shape) * entry.sigma
                inp = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
            inputs.append(torch.from_numpy(inp).permute(2, 0, 1))
            targets.append(torch.from_numpy(tgt).permute(2, 0, 1))
            tasks.append(entry.task)
    return torch.stack(inputs), torch.stack(targets), tasks


@torch.no_grad()
def variant_psnrs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  names: Sequence[str], batch: int = 8) -> torch.Tensor:
    """(N, V) PSNR of every variant's clamped output on uint8 (N, 3, H, W) pairs."""

    device = next(model.parameters()).device
    out = torch.empty(len(inputs), len(names), dtype=torch.float64)
    for start in range(0, len(inputs), batch):
        x = inputs[start:start + batch].to(device).float() / 255
        y = targets[start:start + batch].to(device).float() / 255
        for j, name in enumerate(names):
            restored = model(x, variant=name).float().clamp(0, 1)
            out[start:start + batch, j] = psnr(restored, y).clamp(max=MAX_PSNR).cpu()
    return out


def largest_variant(costs: dict[str, float]) -> str:
    return max(costs, key=lambda n: costs[n])


def make_labels(model: torch.nn.Module, entries: Sequence[Any], costs: dict[str, float], crop: int,
                seed: int, samples: int = 1) -> LabelSet:
    """Run every variant of ``model`` over seeded degraded crops of ``entries``."""
    names = list(model.variants)
    inputs, targets, tasks = degraded_crops(entries, crop, seed, samples)
    psnrs = variant_psnrs(model, inputs, targets, names)
    largest = psnrs[:, names.index(largest_variant(costs))]
    return LabelSet(inputs, tasks, names, psnrs.float(), (largest[:, None] - psnrs).float())


def labels_key(checkpoint: str | Path, model: torch.nn.Module, entries: Sequence[Any], crop: int,
               seed: int, samples: int) -> str:
    """Cache key: the checkpoint file(s) (path, size, mtime), the variant set and the data drawn."""
    path = Path(checkpoint).resolve()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    spec = {"checkpoint": stamp, "variants": {k: list(v) for k, v in model.variants.items()},
            "entries": [(e.task, e.key, e.input_path, e.sigma) for e in entries],
            "crop": crop, "seed": seed, "samples": samples}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_labels(cache_dir: Path, key: str, build: Callable[[], LabelSet]) -> LabelSet:
    """The labels stored under ``key`` in ``cache_dir``, or ``build()`` them and store them."""
    path = cache_dir / f"router_labels-{key}.pt"
    if path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        log.info("router labels: %d crops from the cache %s", len(d["tasks"]), path)
        return LabelSet(**d)
    labels = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(vars(labels)), tmp)
    tmp.replace(path)
    log.info("router labels: %d crops x %d variants, cached in %s", len(labels.tasks), len(labels.names), path)
    return labels


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    op = int(torch.randint(0, 8, (1,), generator=generator))
    x = torch.rot90(x, op % 4, dims=(-2, -1))
    return x.flip(-1) if op >= 4 else x


def oracle_agreement(predicted: torch.Tensor, losses: torch.Tensor, names: list[str],
                     costs: dict[str, float], tolerance_db: float) -> float:
    """Share of rows where the policy on ``predicted`` picks what it picks on the true ``losses``."""

    same = [choose_variant(p, names, costs, tolerance_db) == choose_variant(t, names, costs, tolerance_db)
            for p, t in zip(predicted, losses)]
    return float(np.mean(same)) if same else float("nan")


def train_router(labels: LabelSet, costs: dict[str, float], variants: dict[str, Any], epochs: int = 60,
                 lr: float = 2e-3, batch_size: int = 16, seed: int = 0, tolerance_db: float = 0.05,
                 device: torch.device | str = "cpu", width: int = 16,
                 on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None) -> torch.nn.Module:
    """A VariantRouter over ``variants`` fitted to ``labels`` (a fifth held out when there are >= 10)."""

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = VariantRouter(RouterConfig(variants=dict(variants), width=width)).to(device)
    n = len(labels.tasks)
    order = torch.randperm(n, generator=gen)
    held = order[: n // 5] if n >= 10 else order[:0]
    train = order[n // 5:] if n >= 10 else order
    x_all = labels.inputs.float().div(255).to(device)
    y_all = labels.losses.to(device)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for epoch in range(1, epochs + 1):
        router.train()
        perm = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.smooth_l1_loss(router(_augment(x_all[idx], gen)), y_all[idx], beta=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        metrics = {"router/train_loss": total / max(1, len(perm))}
        if len(held) and (epoch % 5 == 0 or epoch == epochs):
            router.eval()
            with torch.no_grad():
                pred = router(x_all[held]).cpu()
            metrics["router/val_mae_db"] = float((pred - labels.losses[held]).abs().mean())
            metrics["router/val_oracle_agreement"] = oracle_agreement(
                pred, labels.losses[held], labels.names, costs, tolerance_db)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return router.eval()


def label_summary(labels: LabelSet) -> dict[str, float]:
    """labels/<task>/<variant>/db_lost: the mean dB each variant loses against the largest, per task."""
    out = {}
    for task in sorted(set(labels.tasks)):
        rows = torch.tensor([t == task for t in labels.tasks])
        for j, name in enumerate(labels.names):
            out[f"labels/{task}/{name}/db_lost"] = float(labels.losses[rows, j].mean())
    return out


def run_train_router(checkpoint: str, cfg: Any, out: Optional[str] = None, epochs: int = 60,
                     lr: float = 2e-3, crop: int = 64, samples: int = 2, tolerance_db: float = 0.05,
                     cache_dir: Optional[str] = None, device: str = "auto") -> dict[str, Any]:
    """``launch/train_router.py``: labels (cached), training, the router file, MLflow. Returns
    {"router": path, "labels": LabelSet, "metrics": final metrics, "run_id": MLflow run or None}."""

    dev = choose_device(device)
    model = load_model(checkpoint, dev, cfg)
    if len(model.variants) < 2:
        raise ValueError(f"checkpoint {checkpoint} has one variant {list(model.variants)}: nothing to route")
    per_task = scan_tasks(cfg.data.root, cfg.data.tasks, cfg.data.sigmas)
    entries = [e for name in per_task for e in per_task[name]]
    costs = variant_costs(model)
    key = labels_key(checkpoint, model, entries, crop, cfg.run.seed, samples)
    target = Path(out) if out else router_path_for(checkpoint)
    cache = Path(cache_dir) if cache_dir else target.parent / "router_labels"
    labels = cached_labels(cache, key, lambda: make_labels(model, entries, costs, crop, cfg.run.seed, samples))
    summary = label_summary(labels)
    for task in sorted(set(labels.tasks)):
        log.info("labels %s: %s", task, ", ".join(
            f"{n} {0.0 - summary[f'labels/{task}/{n}/db_lost']:+.3f} dB" for n in labels.names))
    history: list[tuple[int, dict[str, float]]] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        history.append((epoch, metrics))
        if "router/val_mae_db" in metrics or epoch == epochs:
            log.info("router epoch %d/%d: %s", epoch, epochs,
                     ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()))

    router = train_router(labels, costs, dict(model.variants), epochs, lr, seed=cfg.run.seed,
                          tolerance_db=tolerance_db, device=dev, on_epoch=on_epoch)
    info = {"checkpoint": str(checkpoint), "crops": len(labels.tasks), "epochs": epochs,
            "tolerance_db": tolerance_db, **history[-1][1]}
    path = save_router(target, router, model, info)
    log.info("router saved to %s", path)
    run_id = None
    if cfg.tracking.enabled:
        params = {"checkpoint": str(checkpoint), "crop": crop, "samples": samples, "epochs": epochs,
                  "lr": lr, "tolerance_db": tolerance_db, "crops": len(labels.tasks),
                  "variants": json.dumps({k: list(v) for k, v in model.variants.items()})}
        run_id = log_router_run(cfg, params, history, summary, str(path))
    return {"router": path, "labels": labels, "metrics": history[-1][1], "run_id": run_id}


def log_router_run(cfg: Any, params: dict[str, Any], history: list[tuple[int, dict[str, float]]],
                   summary: dict[str, float], router_file: str) -> str:
    """One MLflow run (stage "router") in ``tracking.experiment``: params, per-epoch metrics, labels."""
    client, run_id = new_mlflow_run(cfg.tracking.uri, cfg.tracking.experiment, "router",
                                    {"dyntrain.stage": "router", "dyntrain.router": router_file})
    now = int(time.time() * 1000)
    metrics = [(k, v, epoch) for epoch, m in history for k, v in m.items()]
    metrics += [(k, v, 0) for k, v in summary.items()]
    store.log_params(client, run_id, {f"router.{k}": v for k, v in params.items()})
    store.log_batch_metrics(client, run_id, metrics, timestamp_ms=now)
    store.finish_run(client, run_id, "FINISHED")
    log.info("logged the router run %s to %s", run_id, redact_uri(cfg.tracking.uri))
    return run_id


def new_mlflow_run(uri: str, experiment: str, name: str, tags: dict[str, str]) -> tuple[Any, str]:
    """(client, run id) of a new run ``name`` in ``experiment`` (created when missing): the client is
    ``dyntrain.tracking.store.open_client(uri)``, for ``store``'s functions."""
    client = store.open_client(uri)
    return client, store.new_run(uri, experiment, name, tags, client=client)
