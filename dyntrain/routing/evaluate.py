"""``--variant auto`` for evaluation and inference, and the figures of the routing benchmark.

Evaluation (``evaluate_routed``): per test image the router chooses on the whole (centre-cropped)
image, the chosen variant restores it, and the image is charged the FLOPs of that variant plus the
router's at its size (``Routing.gflops``, the project's counter, paper convention). Reported per task:
PSNR/SSIM, mean GFLOPs per image and how often each variant was chosen.

Benchmark (``score_every_variant`` + ``sweep``): every variant's PSNR on every image and the router's
predictions, then, over a tolerance sweep, the mean PSNR and GFLOPs of the router, of each fixed
variant and of the oracle (per image the cheapest variant within the tolerance of the best one), per
task and averaged over tasks; regret = the oracle's PSNR at the router's mean GFLOPs (interpolated on
the oracle's curve) minus the router's PSNR.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dynet.flops import count_router_flops
from dynet.inference import gray_world, restore_image
from dynet.router import choose_variant, oracle_variant
from dyntrain.devices import choose_device
from dyntrain.eval.evaluate import format_table, load_test_sets, log_to_mlflow, metrics_dict
from dyntrain.eval.metrics import psnr, ssim
from dyntrain.eval.testdata import TASK_LABELS
from dyntrain.images import to_tensor
from dyntrain.logs import get_logger
from dyntrain.redaction import redact_uri
from dyntrain.progress import progress_bar
from dyntrain.restore import Restorer, load_model, plan_outputs, read_checkpoint_info, read_image, write_image
from dyntrain.routing.router import load_routing


log = get_logger(__name__)
AUTO = "auto"


def _restore(model: torch.nn.Module, x: torch.Tensor, variant: str) -> torch.Tensor:
    return restore_image(model, x, variant=variant).float().clamp(0.0, 1.0)


@torch.no_grad()
def evaluate_routed(model: torch.nn.Module, routing: Any, pairs: Sequence[Any]
                    ) -> tuple[dict[str, dict[str, float]], dict[str, float], list[dict[str, Any]]]:
    """(table {task: {psnr, ssim, images, gflops}} with an "average", MLflow metrics, per-image records)."""

    device = next(model.parameters()).device
    records = []
    for pair in pairs:
        x, y = to_tensor(pair.input, device), to_tensor(pair.target, device)
        chosen, predicted = routing.choose(x)
        out = _restore(model, x, chosen)
        records.append({"task": pair.task, "key": pair.key, "variant": chosen, "predicted": predicted,
                        "height": x.shape[-2], "width": x.shape[-1], "psnr": psnr(out, y).item(), "ssim": ssim(out, y).item(),
                        "gflops": routing.gflops(chosen, x.shape[-2], x.shape[-1])})
    return summarize_routed(records, routing.names)


def summarize_routed(records: list[dict[str, Any]], names: Sequence[str]
                     ) -> tuple[dict[str, dict[str, float]], dict[str, float], list[dict[str, Any]]]:

    table: dict[str, dict[str, float]] = {}
    metrics: dict[str, float] = {}
    for task in [t for t in TASK_LABELS if any(r["task"] == t for r in records)]:
        rows = [r for r in records if r["task"] == task]
        table[task] = {"psnr": float(np.mean([r["psnr"] for r in rows])),
                       "ssim": float(np.mean([r["ssim"] for r in rows])), "images": len(rows),
                       "gflops": float(np.mean([r["gflops"] for r in rows]))}
        for name in names:
            metrics[f"eval/{AUTO}/{task}/chosen_{name}"] = sum(r["variant"] == name for r in rows) / len(rows)
    if table:
        table["average"] = {k: float(np.mean([v[k] for v in table.values()])) for k in ("psnr", "ssim", "gflops")}
        table["average"]["images"] = len(records)
        for name in names:
            metrics[f"eval/{AUTO}/all/chosen_{name}"] = sum(r["variant"] == name for r in records) / len(records)
    for task, vals in table.items():
        metrics[f"eval/{AUTO}/{task}/gflops"] = vals["gflops"]
    return table, metrics, records


def format_choices(table: dict[str, dict[str, float]], metrics: dict[str, float], names: Sequence[str]) -> str:
    """One line per task: mean GFLOPs per image and the share of each chosen variant."""

    lines = []
    for task, vals in table.items():
        key = "all" if task == "average" else task
        shares = ", ".join(f"{n} {100 * metrics[f'eval/{AUTO}/{key}/chosen_{n}']:.0f}%" for n in names)
        lines.append(f"{TASK_LABELS.get(task, task):<10} {vals['gflops']:.4f} GFLOPs/image (router included); "
                     f"chosen: {shares}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inference
def restore_paths_routed(model: torch.nn.Module, routing: Any, src: Any, dst: Any, options: Any,
                         device: torch.device, printer: Optional[Callable[[str], None]] = None
                         ) -> list[dict[str, Any]]:
    """``launch/restore.py --variant auto``: per image the router chooses (on the whole image, after
    Gray-World when asked), then the chosen variant restores it as usual (tiles when it is large);
    one line per image, with the choice, to ``printer`` (default: an INFO log line)."""



    say = printer if printer is not None else log.info
    restorers: dict[str, Any] = {}
    records = []
    pairs = plan_outputs(src, dst)
    with progress_bar(len(pairs), "DyNet-auto") as bar:
        for inp, out in pairs:
            img = read_image(inp)
            start = time.perf_counter()
            x = to_tensor(img, device)
            chosen, predicted = routing.choose(gray_world(x) if options.gray_world else x)
            if chosen not in restorers:
                restorers[chosen] = Restorer(model, dataclasses.replace(options, variant=chosen), device)
            restored, tile = restorers[chosen](img)
            seconds = time.perf_counter() - start
            write_image(restored, out)
            records.append({"input": str(inp), "output": str(out), "variant": chosen, "predicted": predicted,
                            "height": img.shape[0], "width": img.shape[1], "tile": tile, "seconds": seconds})
            guess = ", ".join(f"{n} {0.0 - predicted[n]:+.2f} dB" for n in routing.names)
            say(f"{inp} -> {out}  {img.shape[1]}x{img.shape[0]}  DyNet-{chosen} (auto: {guess})  "
                f"{'tiles ' + str(tile) if tile else 'whole image'}  {seconds:.2f}s")
            bar.update()
    return records


# ----------------------------------------------------------------------------- benchmark
@torch.no_grad()
def score_every_variant(model: torch.nn.Module, routing: Any, pairs: Sequence[Any]) -> list[dict[str, Any]]:
    """Per image: every variant's PSNR and GFLOPs, the router's predictions and its GFLOPs."""


    device = next(model.parameters()).device
    records = []
    for pair in pairs:
        x, y = to_tensor(pair.input, device), to_tensor(pair.target, device)
        height, width = x.shape[-2:]
        router_g = count_router_flops(routing.router, height, width).paper / 1e9
        records.append({
            "task": pair.task, "key": pair.key, "predicted": dict(zip(routing.names, routing.predict(x).tolist())),
            "psnr": {n: psnr(_restore(model, x, n), y).clamp(max=100.0).item() for n in routing.names},
            "gflops": {n: routing.gflops(n, height, width) - router_g for n in routing.names},
            "router_gflops": router_g})
    return records


def _mean(records: list[dict[str, Any]], pick: Callable[[dict[str, Any]], tuple[float, float]]) -> tuple[float, float]:
    values = np.array([pick(r) for r in records], dtype=np.float64)
    return float(values[:, 0].mean()), float(values[:, 1].mean())


def _curves(records: list[dict[str, Any]], costs: dict[str, float], tolerances: Sequence[float]) -> dict[str, Any]:
    names = list(costs)

    def routed(t: float) -> Callable[[dict[str, Any]], tuple[float, float]]:
        def pick(r: dict[str, Any]) -> tuple[float, float]:
            v = choose_variant([r["predicted"][n] for n in names], names, costs, t)
            return r["psnr"][v], r["gflops"][v] + r["router_gflops"]
        return pick

    def oracle(t: float) -> Callable[[dict[str, Any]], tuple[float, float]]:
        def pick(r: dict[str, Any]) -> tuple[float, float]:
            v = oracle_variant(r["psnr"], costs, t)
            return r["psnr"][v], r["gflops"][v]
        return pick

    fixed = {n: _mean(records, lambda r, n=n: (r["psnr"][n], r["gflops"][n])) for n in names}
    router = [_mean(records, routed(t)) for t in tolerances]
    oracle_pts = [_mean(records, oracle(t)) for t in tolerances]
    by_g = sorted(oracle_pts, key=lambda p: p[1])
    regret = [float(np.interp(g, [p[1] for p in by_g], [p[0] for p in by_g]) - p) for p, g in router]
    return {"fixed": {n: {"psnr": p, "gflops": g} for n, (p, g) in fixed.items()},
            "router": [{"tolerance_db": t, "psnr": p, "gflops": g, "regret_db": r}
                       for t, (p, g), r in zip(tolerances, router, regret)],
            "oracle": [{"tolerance_db": t, "psnr": p, "gflops": g} for t, (p, g) in zip(tolerances, oracle_pts)]}


def sweep(records: list[dict[str, Any]], costs: dict[str, float], tolerances: Sequence[float]) -> dict[str, Any]:
    """The curves per task and "average" (the mean of the per-task figures, as Table 1 averages)."""
    tasks = sorted({r["task"] for r in records}, key=[r["task"] for r in records].index)
    out = {task: _curves([r for r in records if r["task"] == task], costs, tolerances) for task in tasks}
    first = out[tasks[0]]

    def avg(get: Callable[[dict[str, Any]], float]) -> float:
        return float(np.mean([get(out[t]) for t in tasks]))

    out["average"] = {
        "fixed": {n: {k: avg(lambda c, n=n, k=k: c["fixed"][n][k]) for k in ("psnr", "gflops")} for n in first["fixed"]},
        **{curve: [{**{k: avg(lambda c, i=i, k=k, curve=curve: c[curve][i][k]) for k in point if k != "tolerance_db"},
                    "tolerance_db": point["tolerance_db"]} for i, point in enumerate(first[curve])]
           for curve in ("router", "oracle")}}
    return out


def run_routed_evaluation(checkpoint: str, cfg: Any, device: str = "auto", router: Optional[str] = None,
                          tolerance_db: float = 0.05, run_id: Optional[str] = None, child: bool = False,
                          step: Optional[int] = None, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """``launch/evaluate.py --variant auto``: Table 1 of the routed model (variant "auto"), mean GFLOPs
    per image (router included) and the share of each chosen variant per task, printed and logged to
    MLflow like a fixed variant's evaluation (eval/auto/<task>/psnr|ssim|gflops|chosen_<variant>)."""


    dev = choose_device(device)
    model = load_model(checkpoint, dev, cfg)
    routing = load_routing(checkpoint, model, router, tolerance_db)
    pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)
    start = time.perf_counter()
    table, extra, records = evaluate_routed(model, routing, pairs)
    text = format_table({AUTO: table}) + "\n" + format_choices(table, extra, routing.names)
    log.info(f"checkpoint {checkpoint}: {len(pairs)} test images routed over {routing.names} at "
             f"{tolerance_db} dB in {time.perf_counter() - start:.1f}s on {dev}")
    printer(text)
    out: dict[str, Any] = {"results": {AUTO: table}, "metrics": extra, "records": records, "run_id": None}
    if cfg.tracking.enabled:
        info = read_checkpoint_info(checkpoint)
        metrics = {**metrics_dict({AUTO: table}), **extra, f"eval/{AUTO}/tolerance_db": tolerance_db}
        out["run_id"] = log_to_mlflow(
            metrics, cfg.tracking.uri, cfg.tracking.experiment, run_id or info.get("mlflow_run_id"), child=child,
            step=step if step is not None else int(info.get("step") or 0),
            run_name=f"eval-auto-{info.get('tag') or Path(checkpoint).stem}",
            tags={"dyntrain.checkpoint": str(checkpoint), "dyntrain.variant": AUTO},
            texts={"evaluation/auto.txt": text + "\n"})
        log.info(f"logged {len(metrics)} metrics to MLflow run {out['run_id']} ({redact_uri(cfg.tracking.uri)})")
    return out
