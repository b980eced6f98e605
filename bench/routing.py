"""Per-image variant routing: PSNR vs mean GFLOPs of the router against every fixed variant and the oracle.

    python bench/routing.py --checkpoint CKPT --config configs/finetune_X.yaml [dotted.key=value ...]
        [--router FILE] [--tolerances 0 0.02 0.05 0.1 0.2 0.5 1] [--out runs/routing]
        [--device auto|cpu|cuda] [--json PATH]

Every variant restores every test image of eval.sets (the evaluation protocol: centre crop, whole image,
batch 1) and the router predicts on each; then, per tolerance, the router's choice and the oracle's (per
image the cheapest variant within the tolerance of the best) give a mean PSNR and a mean GFLOPs per image
(router included for the router; the project's FLOP counter, paper convention), per task and averaged over
tasks. Regret: the oracle's PSNR at the router's mean GFLOPs minus the router's. Writes a plot
(OUT/routing.png), logs it with the figures to MLflow (tracking.*, run "routing-bench") and prints
gflops_saved_vs_largest_at_0.05db = 1 - router GFLOPs / largest variant's GFLOPs at 0.05 dB (task average).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import common  # noqa: E402

from dyntrain.config import add_config_arguments, config_from_args  # noqa: E402

TOLERANCES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def run(checkpoint: str, cfg: Any, router: str | None, tolerances: list[float], device: str) -> dict[str, Any]:
    from dyntrain.eval.evaluate import load_test_sets
    from dyntrain.devices import choose_device
    from dyntrain.restore import load_model
    from dyntrain.routing.router import load_routing
    from dyntrain.routing.evaluate import score_every_variant, sweep

    dev = choose_device(device)
    model = load_model(checkpoint, dev, cfg)
    routing = load_routing(checkpoint, model, router)
    pairs = load_test_sets(dict(cfg.eval.sets), cfg.eval.noise_seed, cfg.eval.max_images)
    records = score_every_variant(model, routing, pairs)
    curves = sweep(records, routing.costs, tolerances)
    largest = max(routing.costs, key=routing.costs.get)
    avg = curves["average"]
    at = next(p for p in avg["router"] if p["tolerance_db"] == 0.05)
    return {"environment": common.environment(dev), "checkpoint": checkpoint, "variants": routing.names,
            "largest": largest, "tolerances": tolerances, "curves": curves, "images": records,
            "gflops_saved_vs_largest_at_0.05db": 1 - at["gflops"] / avg["fixed"][largest]["gflops"],
            "regret_db_at_0.05db": at["regret_db"]}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), squeeze=False)
    for ax, (task, c) in zip(axes[0], curves.items()):
        for name, kind, style in (("router", "router", "o-"), ("oracle", "oracle", "s--")):
            pts = sorted((p["gflops"], p["psnr"]) for p in c[kind])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=4)
        for v, p in c["fixed"].items():
            ax.plot(p["gflops"], p["psnr"], "k^", markersize=6)
            ax.annotate(v, (p["gflops"], p["psnr"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("mean GFLOPs per image")
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(result: dict[str, Any]) -> str:
    lines = []
    for task, c in result["curves"].items():
        fixed = "  ".join(f"{v} {p['psnr']:.2f} dB/{p['gflops']:.3f} G" for v, p in c["fixed"].items())
        lines.append(f"{task}: fixed {fixed}")
        for r, o in zip(c["router"], c["oracle"]):
            lines.append(f"  tol {r['tolerance_db']:<5} router {r['psnr']:.2f} dB/{r['gflops']:.3f} G "
                         f"(regret {r['regret_db']:+.3f} dB)  oracle {o['psnr']:.2f} dB/{o['gflops']:.3f} G")
    return "\n".join(lines)


def log_mlflow(cfg: Any, result: dict[str, Any], png: Path, text: str) -> str:
    from mlflow.entities import Metric

    from dyntrain.routing.train import new_mlflow_run

    client, run_id = new_mlflow_run(cfg.tracking.uri, cfg.tracking.experiment, "routing-bench",
                                    {"dyntrain.stage": "routing-bench", "dyntrain.checkpoint": result["checkpoint"]})
    metrics = []
    for task, c in result["curves"].items():
        for i, (r, o) in enumerate(zip(c["router"], c["oracle"])):
            for key, value in (("router_psnr", r["psnr"]), ("router_gflops", r["gflops"]),
                               ("regret_db", r["regret_db"]), ("oracle_psnr", o["psnr"]),
                               ("oracle_gflops", o["gflops"])):
                metrics.append(Metric(f"routing/{task}/{key}", value, 0, i))
    metrics.append(Metric("gflops_saved_vs_largest_at_0.05db", result["gflops_saved_vs_largest_at_0.05db"], 0, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    client.log_artifact(run_id, str(png))
    client.log_text(run_id, text + "\n", "routing.txt")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--router", default=None, help="router file (default: beside the weights)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    parser.add_argument("--out", default="runs/routing", help="folder for routing.png")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default=None)
    add_config_arguments(parser, "YAML with eval.sets and tracking (the fine-tuning config)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    common.set_threads(args.threads)
    tolerances = sorted(set(args.tolerances) | {0.05})
    result = run(args.checkpoint, cfg, args.router, tolerances, args.device)
    common.write_json(args.json, result)
    text = table(result)
    print(text)
    png = plot(result, Path(args.out) / "routing.png")
    print(f"plot: {png}")
    if cfg.tracking.enabled:
        print(f"MLflow run: {log_mlflow(cfg, result, png, text)}")
    common.headline("gflops_saved_vs_largest_at_0.05db", result["gflops_saved_vs_largest_at_0.05db"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
