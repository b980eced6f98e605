"""The GPU-hour saving at equal quality: each training recipe against the two separate runs.

    python bench/quality_saving.py [--seed 0] [--recipes paper,sandwich,sandwich_distill,cost_aware]
                                   [--scale toy|long] [--steps N] [--eval-every E] [--images M]
                                   [--dim 8 --crop 32 --batch 4] [--device auto|cpu|cuda]
                                   [--work DIR] [--json PATH] [--reuse-baselines]
    python bench/quality_saving.py --seeds K ...    # K seeds: mean, 95% interval, paired recipe differences
    python bench/quality_saving.py --summarize A.json B.json ...    # one table over scales x seeds

Pre-trainings through the real path (``launch/pretrain.py``, one process each, one after another -
DeepSpeed keeps process groups that a second engine in the same process cannot reuse: DeepSpeed
engine, Trainer, DALI loader on real shards, MLflow in sqlite, validation every E steps), with the
same seed, training shards and held-out validation shards (built here from generated photographs
with ``make_shards --holdout 0.25``):

    S alone           schedule.mode=fixed schedule.fixed_variant=S                 N steps
    L alone           schedule.mode=fixed schedule.fixed_variant=L                 N steps
    paper             schedule.mode=dynamic (S and L drawn with p = 0.5)           N steps
    sandwich          schedule.mode=sandwich (S and L on every batch, summed)      N / 2 steps
    sandwich_distill  sandwich + schedule.distill.teacher=L                        N / 2 steps
    cost_aware        schedule.variant_probs=cost_aware                            N steps
    paper_distill     dynamic + schedule.distill.teacher=L (teacher forward)       N steps
    sandwich_distill_0.1, paper_distill_0.1   the same with schedule.distill.weight=0.1

(a sandwich step trains both variants, so N / 2 of them cost about what N dynamic steps cost), then
for each recipe ``dyntrain.analysis.compare.compare_iso_quality`` (what ``launch/compare.py --iso-quality
--runs RECIPE S L`` runs) on both cost axes: GPU hours (wall time) and PFLOP of training work (the
same comparison, immune to the load of a shared machine). For each variant the cost its separate run
needed to reach the recipe's final val PSNR, and ``iso_quality_saving = 1 - cost_recipe / sum_v
cost_separate_to_match[v]``, plus the equal-budget view and the account's equal-iterations saving.

Scales: ``toy`` (CPU: dim 8, 32x32 crops, batch 4, N=240, E=20; CUDA: dim 48, 128x128, batch 32,
N=2000, E=100) and ``long`` (4x the steps, E 2x). Last line: iso_quality_saving=<value> of the first
recipe.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import common  # noqa: E402

from dyntrain.analysis.stats import METHOD, format_ci, paired_difference, with_bound


ROOT = Path(__file__).resolve().parents[1]
CPU = {"dim": 8, "crop": 32, "batch": 4, "steps": 240, "eval_every": 20, "images": 16,
       "val_samples": 32, "lr": 2e-3}
GPU = {"dim": 48, "crop": 128, "batch": 32, "steps": 2000, "eval_every": 100, "images": 48,
       "val_samples": 256, "lr": 1e-3}
BASELINES = {"S": ["schedule.mode=fixed", "schedule.fixed_variant=S"],
             "L": ["schedule.mode=fixed", "schedule.fixed_variant=L"]}
# recipe -> (overrides, fraction of N steps it runs)
RECIPES = {
    "paper": (["schedule.mode=dynamic"], 1.0),
    "sandwich": (["schedule.mode=sandwich"], 0.5),
    "sandwich_distill": (["schedule.mode=sandwich", "schedule.distill.teacher=L"], 0.5),
    "cost_aware": (["schedule.mode=dynamic", "schedule.variant_probs=cost_aware"], 1.0),
    "paper_distill": (["schedule.mode=dynamic", "schedule.distill.teacher=L"], 1.0),
    # the same two with a tenth of the distillation weight
    "sandwich_distill_0.1": (["schedule.mode=sandwich", "schedule.distill.teacher=L",
                              "schedule.distill.weight=0.1"], 0.5),
    "paper_distill_0.1": (["schedule.mode=dynamic", "schedule.distill.teacher=L",
                           "schedule.distill.weight=0.1"], 1.0),
}
SUITE_RECIPES = ["paper", "sandwich", "sandwich_distill", "cost_aware"]
MODES = {"dynamic": RECIPES["paper"][0], **BASELINES}  # the three runs of the paper's comparison


def prepare_data(work: Path, images: int, seed: int, patch: int) -> tuple[str, str]:
    """Generated photographs -> training and held-out validation shards; returns their globs."""
    from dyntrain.data.shards.patches import ShardBuildConfig
    from dyntrain.data.shards.writer import build_with_holdout
    from dyntrain.data.synthetic import write_synthetic_images

    write_synthetic_images(work / "images", images, size=(4 * patch, 4 * patch), seed=seed)
    cfg = ShardBuildConfig(patch_size=patch, shard_samples=32, max_flat_frac=1.0, workers=1)
    build_with_holdout([work / "images"], str(work / "shards"), str(work / "val"), 0.25, cfg,
                       seed=seed, progress=False)
    return f"{work / 'shards'}/*.tar", f"{work / 'val'}/*.tar"


def _train(work: Path, name: str, base: list[str], mode: list[str], steps: int, device: str,
           extra: Optional[list[str]]) -> None:
    import os
    import subprocess

    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", device))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = work / f"train_{name}.log"
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
                             str(ROOT / "configs" / "quickstart.yaml"), *base, *mode,
                             f"run.max_steps={steps}", f"run.name={name}", *(extra or [])],
                            env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"training {name} failed (exit {rc}); log: {log}")


def _run_id(client, experiment: str, name: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise RuntimeError(f"no MLflow run named {name!r} in {experiment!r}")
    return runs[0].info.run_id


def _finished(client, experiment: str, name: str) -> bool:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return bool(runs) and runs[0].info.status == "FINISHED"


def base_overrides(size: dict[str, Any], seed: int, device: str, train: str, val: str, uri: str,
                   experiment: str) -> list[str]:
    """The pre-training settings every arm of a comparison shares (quickstart.yaml + these)."""
    return [f"run.seed={seed}", f"run.log_every={size['eval_every']}",
            f"run.device={device}", f"model.dim={size['dim']}", f"data.crop_size={size['crop']}",
            f"data.micro_batch_size={size['batch']}", f"data.train_urls=[{train}]",
            f"data.val_urls=[{val}]", "data.shuffle_buffer=64", f"eval.every={size['eval_every']}",
            f"eval.val_samples={size['val_samples']}", f"optim.lr={size['lr']}",
            "optim.lr_schedule=constant", "optim.warmup_steps=0",
            f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.system_metrics=false",
            "schedule.verify_every=0", "deepspeed.zero_stage=2"]


def run_recipes(work: Path, size: dict[str, Any], seed: int, device: str, recipes: list[str],
                extra: Optional[list[str]] = None, deadline: Optional[float] = None,
                reuse_baselines: bool = False) -> dict[str, Any]:
    """The baselines, every recipe, and each recipe's comparison on both axes. With ``deadline``
    (time.time()), a recipe after the first is skipped when the time left is under 1.2x the longest
    training so far. ``reuse_baselines``: keep finished S/L runs of an earlier call in ``work``."""
    import time

    from mlflow.tracking import MlflowClient

    from dyntrain.analysis.compare import compare_iso_quality

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"quality_saving: unknown recipe(s) {unknown}; known: {sorted(RECIPES)}")
    work.mkdir(parents=True, exist_ok=True)
    train, val = prepare_data(work, size["images"], seed, max(64, 2 * size["crop"]))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    experiment = f"quality-saving-seed{seed}"
    base = base_overrides(size, seed, device, train, val, uri, experiment) + ["checkpoint.dir=null"]
    names = {v: f"qs-{v}-seed{seed}" for v in BASELINES}
    longest = 0.0
    client = MlflowClient(uri)
    for v, mode in BASELINES.items():
        if reuse_baselines and _finished(client, experiment, names[v]):
            continue
        t0 = time.time()
        _train(work, names[v], base, mode, size["steps"], device, extra)
        longest = max(longest, time.time() - t0)
    baseline_ids = {v: _run_id(client, experiment, n) for v, n in names.items()}
    out: dict[str, Any] = {"seed": seed, "size": size, "recipes": {}, "tracking_uri": uri,
                           "experiment": experiment, "baseline_runs": baseline_ids, "skipped": {}}
    for i, recipe in enumerate(recipes):
        mode, frac = RECIPES[recipe]
        name = f"qs-{recipe}-seed{seed}"
        steps = max(1, int(round(size["steps"] * frac)))
        if i and deadline is not None and deadline - time.time() < 1.2 * longest:
            out["skipped"][recipe] = "out of time"
            continue
        t0 = time.time()
        _train(work, name, base, mode, steps, device, extra)
        longest = max(longest, time.time() - t0)
        run_id = _run_id(client, experiment, name)
        ids = [run_id, baseline_ids["S"], baseline_ids["L"]]
        by_axis = {x: compare_iso_quality(uri, None, ids, work / f"iso_{recipe}_{x}.png", log=True, x=x)
                   for x in ("gpu_hours", "pflop")}
        r = by_axis["gpu_hours"]
        metrics = client.get_run(run_id).data.metrics
        out["recipes"][recipe] = {
            "run_id": run_id, "steps": steps,
            "iso_quality_saving": r["iso_quality_saving"],
            "iso_quality_saving_is_bound": r["iso_quality_saving_is_bound"],
            "iso_quality_saving_pflop": by_axis["pflop"]["iso_quality_saving"],
            "iso_quality_saving_pflop_is_bound": by_axis["pflop"]["iso_quality_saving_is_bound"],
            "final_psnr": r["target_psnr"], "own_steps": r["own_steps_dynamic"],
            "gh_recipe": r["gh_dynamic"], "gh_separate_to_match": r["gh_separate_to_match"],
            "reached": r["reached"], "pflop_recipe": by_axis["pflop"]["gh_dynamic"],
            "psnr_separate_same_gpu_hours": r["psnr_separate_same_gpu_hours"],
            "psnr_separate_same_pflop": by_axis["pflop"]["psnr_separate_same_gpu_hours"],
            "psnr_separate_same_own_steps": r["psnr_separate_same_own_steps"],
            "gpu_hours_saved_frac_equal_iterations": metrics.get("gpu_hours_saved_frac"),
            "table": r["text"], "table_pflop": by_axis["pflop"]["text"]}
    out["baseline_final_psnr"] = {
        v: max(((m.step, m.value) for m in client.get_metric_history(i, f"val/{v}/psnr")))[1]
        for v, i in baseline_ids.items()}
    return out


def format_recipes(r: dict[str, Any]) -> str:
    """One line per recipe (markdown table)."""
    head = ("| recipe | steps | saving at equal val. quality (GPU h) | saving at equal val. quality (PFLOP) | final val PSNR S / L | "
            "separate at same PFLOP S / L | equal-iterations saving |\n|---|---|---|---|---|---|---|")
    rows = [head]
    for name, x in r["recipes"].items():
        def iso(key):
            return common.fmt(x[key], ".3f") + (" (bound)" if x[key + "_is_bound"] else "")
        same = x["psnr_separate_same_pflop"]
        rows.append(f"| {name} | {x['steps']} | {iso('iso_quality_saving')} | "
                    f"{iso('iso_quality_saving_pflop')} | {x['final_psnr']['S']:.2f} / "
                    f"{x['final_psnr']['L']:.2f} | {common.fmt(same.get('S'), '.2f')} / "
                    f"{common.fmt(same.get('L'), '.2f')} | "
                    f"{common.fmt(x['gpu_hours_saved_frac_equal_iterations'], '.3f')} |")
    b = r["baseline_final_psnr"]
    rows.append(f"separate runs' final val PSNR: S {b['S']:.2f}, L {b['L']:.2f} ({r['size']['steps']} steps each)")
    return "\n".join(rows)


def summarize(paths: list[str]) -> str:
    """One markdown table over several JSONs of this benchmark (scales x seeds, recipes merged):
    per recipe and scale, the PFLOP- and GPU-hour-axis savings of every seed and their mean, and the
    final val PSNR of S and L (mean over seeds)."""
    import json
    from collections import defaultdict

    rows: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    base: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in paths:
        r = json.loads(Path(path).read_text())
        scale = r.get("scale", "?")
        base[scale][r["seed"]] = r["baseline_final_psnr"]
        for name, x in r["recipes"].items():
            rows[(scale, name)][r["seed"]] = x

    def cell(values: list[tuple[float, bool]]) -> str:
        parts = [f"{v:+.2f}{'*' if b else ''}" for v, b in values]
        summary = with_bound([v for v, _ in values], [b for _, b in values])
        return f"{' / '.join(parts)} (mean [95% CI] {format_ci(summary, '+.2f')})"

    order = list(RECIPES)
    out = ["| scale | recipe | seeds | saving at equal val. quality, PFLOP axis | saving at equal val. quality, "
           "GPU-hour axis | final val PSNR S / L |",
           "|---|---|---|---|---|---|"]
    for scale in sorted(base, key=lambda k: (k != "toy", k)):
        for name in sorted({n for (sc, n) in rows if sc == scale}, key=order.index):
            per = rows[(scale, name)]
            seeds = sorted(per)
            pf = cell([(per[k]["iso_quality_saving_pflop"], per[k]["iso_quality_saving_pflop_is_bound"]) for k in seeds])
            gh = cell([(per[k]["iso_quality_saving"], per[k]["iso_quality_saving_is_bound"]) for k in seeds])
            s_ = sum(per[k]["final_psnr"]["S"] for k in seeds) / len(seeds)
            l_ = sum(per[k]["final_psnr"]["L"] for k in seeds) / len(seeds)
            out.append(f"| {scale} | {name} | {','.join(map(str, seeds))} | {pf} | {gh} | {s_:.2f} / {l_:.2f} |")
        b = base[scale]
        out.append(f"| {scale} | S alone / L alone | {','.join(map(str, sorted(b)))} | | | "
                   f"{sum(x['S'] for x in b.values()) / len(b):.2f} / {sum(x['L'] for x in b.values()) / len(b):.2f} |")
    out.append("(* = a lower bound: a separate run never reached the recipe's PSNR; intervals: "
               f"{METHOD})")
    return "\n".join(out)


def seed_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per recipe and axis the mean saving with its 95% interval over the seeds, and each recipe's
    paired difference against the first on the same seeds."""
    axes = {"gpu_hours": "iso_quality_saving", "pflop": "iso_quality_saving_pflop"}
    recipes = list(per_seed[0]["recipes"])
    out: dict[str, Any] = {"seeds": [r["seed"] for r in per_seed], "interval": METHOD, "recipes": {},
                           "paired_vs_first": {}}
    for name in recipes:
        have = [r["recipes"][name] for r in per_seed if name in r["recipes"]]
        out["recipes"][name] = {ax: with_bound([x[key] for x in have], [x[key + "_is_bound"] for x in have])
                                for ax, key in axes.items()}
    for name in recipes[1:]:
        both = [r["recipes"] for r in per_seed if name in r["recipes"] and recipes[0] in r["recipes"]]
        out["paired_vs_first"][name] = {ax: paired_difference([b[name][key] for b in both],
                                                              [b[recipes[0]][key] for b in both])
                                        for ax, key in axes.items()}
    lines = [f"over seeds {out['seeds']} (mean [95% interval], {METHOD}):"]
    for name, by_ax in out["recipes"].items():
        lines.append(f"  {name:20s} GPU h {format_ci(by_ax['gpu_hours'])}   PFLOP {format_ci(by_ax['pflop'])}")
    for name, by_ax in out["paired_vs_first"].items():
        d = by_ax["pflop"]
        lines.append(f"  paired {name} - {recipes[0]} (PFLOP): {format_ci(d)}"
                     f"{' (the interval excludes 0)' if d['significant'] else ''}")
    out["text"] = "\n".join(lines)
    return out


def run_three(work: Path, size: dict[str, Any], seed: int, device: str,
              extra: Optional[list[str]] = None) -> dict[str, Any]:
    """The paper's comparison alone (dynamic, S alone, L alone): the GPU suite's stage."""
    r = run_recipes(work, size, seed, device, ["paper"], extra)
    p = r["recipes"]["paper"]
    return {"seed": seed, "size": size, "iso_quality_saving": p["iso_quality_saving"],
            "iso_quality_saving_is_bound": p["iso_quality_saving_is_bound"],
            "iso_quality_saving_pflop": p["iso_quality_saving_pflop"],
            "gh_dynamic": p["gh_recipe"], "gh_separate_to_match": p["gh_separate_to_match"],
            "reached": p["reached"], "target_psnr": p["final_psnr"],
            "psnr_separate_same_gpu_hours": p["psnr_separate_same_gpu_hours"],
            "psnr_separate_same_own_steps": p["psnr_separate_same_own_steps"],
            "own_steps_dynamic": p["own_steps"],
            "gpu_hours_saved_frac_equal_iterations": p["gpu_hours_saved_frac_equal_iterations"],
            "table": p["table"], "tracking_uri": r["tracking_uri"], "experiment": r["experiment"]}


def suite_stage(dry_run: bool = False, deadline: Optional[float] = None) -> dict[str, Any]:
    """The GPU suite's "quality saving" stage (bench/gpu_stages.py): the GPU-sized setting (steps
    cut to what the deadline leaves, at least 500): the baselines and the paper's recipe, then
    sandwich, sandwich_distill and cost_aware as long as the deadline leaves room for one more run
    (the rest are listed under ``skipped``). The dry run builds the held-out shards and the
    fixed validation set only (seconds) and returns their description."""
    import tempfile
    import time

    import torch

    with tempfile.TemporaryDirectory(prefix="quality_saving_") as tmp:
        if dry_run:
            from dyntrain.data.pretrain.degrade import DegradeSpec
            from dyntrain.eval.validation import build_val_set

            _, val = prepare_data(Path(tmp), 4, 0, 64)
            vs = build_val_set([val], DegradeSpec(crop_size=32), 8, seed=0)
            return {"dry_run": True, "val_samples": len(vs), "val_fingerprint": vs.fingerprint}
        gpu = torch.cuda.is_available()
        size = dict(GPU if gpu else CPU)
        if deadline is not None:  # ~0.1 s per step and run with start-up and validation, 3 runs
            left = deadline - time.time() - 120
            size["steps"] = max(500, min(size["steps"], int(left / 0.3)))
            size["eval_every"] = max(1, size["steps"] // 20)
        # the paper's comparison first; the other recipes while the deadline leaves time for them
        r = run_recipes(Path(tmp), size, 0, "cuda" if gpu else "cpu", SUITE_RECIPES, deadline=deadline)
    for x in r["recipes"].values():
        x.pop("table_pflop", None)
    p = r["recipes"]["paper"]
    r["iso_quality_saving"] = p["iso_quality_saving"]
    r["iso_quality_saving_pflop"] = p["iso_quality_saving_pflop"]
    r["table"] = format_recipes(r)
    return r


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run K seeds (seed, seed+1, ...; each in <work>-seed<S>) and summarize "
                             "them with 95%% intervals and paired differences between recipes")
    parser.add_argument("--recipes", default="paper",
                        help=f"comma-separated, from {','.join(RECIPES)} (default paper)")
    parser.add_argument("--scale", choices=("toy", "long"), default="toy",
                        help="long: 4x the steps, validation half as often")
    for key in ("steps", "eval_every", "images", "dim", "crop", "batch", "val_samples"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--work", default=None, help="where shards, mlflow.db and the plots go "
                                                     "(default runs/quality_saving/<scale>-seed<S>)")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="print one table over earlier --json outputs (scales x seeds) and exit")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="keep the finished S/L runs of an earlier call with the same --work")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    device = common.resolve_device(args.device)
    if args.threads:
        common.set_threads(args.threads)
    size = dict(GPU if device.type == "cuda" else CPU)
    if args.scale == "long":
        size["steps"] *= 4
        size["eval_every"] *= 2
    for key in list(size):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    recipes = [r for r in args.recipes.split(",") if r]
    if args.seeds > 1:
        per_seed = []
        for seed in range(args.seed, args.seed + args.seeds):
            work = Path(f"{args.work or f'runs/quality_saving/{args.scale}'}-seed{seed}")
            per_seed.append(run_recipes(work, size, seed, device.type, recipes, args.set,
                                        reuse_baselines=args.reuse_baselines))
            print(format_recipes(per_seed[-1]))
        summary = seed_summary(per_seed)
        print(summary["text"])
        common.write_json(args.json, {"scale": args.scale, "per_seed": per_seed, "summary": summary,
                                      "environment": common.environment(device)})
        common.headline("iso_quality_saving_mean", summary["recipes"][recipes[0]]["gpu_hours"]["mean"])
        return 0
    work = Path(args.work or f"runs/quality_saving/{args.scale}-seed{args.seed}")
    r = run_recipes(work, size, args.seed, device.type, recipes, args.set,
                    reuse_baselines=args.reuse_baselines)
    for name, x in r["recipes"].items():
        print(f"== {name} (GPU hours)\n{x['table']}\n== {name} (PFLOP)\n{x['table_pflop']}")
    print(format_recipes(r))
    r["scale"] = args.scale
    r["environment"] = common.environment(device)
    common.write_json(args.json, r)
    common.headline("iso_quality_saving", r["recipes"][recipes[0]]["iso_quality_saving"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
