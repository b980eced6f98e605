"""The saving where it matters: fine-tuned quality after dynamic vs separate pre-training, over seeds.

    python bench/downstream_saving.py [--seeds 4] [--seed0 0] [--recipes paper[,sandwich,...]]
                                      [--steps 160] [--fractions 4] [--ft-steps 100] [--work DIR]
                                      [--device auto|cpu|cuda] [--json PATH]

A seed already finished in the same --work with the same settings (its seed<S>/result.json) is read
back instead of rerun, so an interrupted call continues where it stopped.

Per seed, from one pre-training budget of N steps (``launch/pretrain.py``, the real path: DeepSpeed,
DALI on shards built here from generated photographs, validation on held-out shards, MLflow):

    each recipe of --recipes (the paper's dynamic S/L draw by default)   its own N steps (a sandwich
                                                                          recipe N / 2: same cost)
    S alone, L alone (schedule.mode=fixed)                              N steps each

each checkpointing at ``--fractions`` evenly spaced points of its budget. Every checkpoint, and a
random start, is then fine-tuned for every variant it serves with ONE fixed budget (``--ft-steps``
Adam steps, that variant only, on MiOIR's seven synthetic degradations mixed, the same data order
for every start) and evaluated on fixed In-Dis MiO test sets (average PSNR over the tasks).
Fine-tuning runs in this process with plain Adam (a DeepSpeed engine per fine-tune would cost more
start-up than training at this size); the pre-training is the production path.

Reported per variant and cost axis (GPU hours = wall time of training; PFLOP = work, immune to the
load of a shared machine), by ``dyntrain.analysis.downstream``:
  - downstream saving: the share of the separate pre-training of v that the dynamic run saves while
    reaching the same fine-tuned PSNR (interpolated between B_v's checkpoints; a bound when never
    reached), and the family saving 1 - C_D / sum_v cost_to_match;
  - fine-tuned PSNR from the dynamic vs the separate checkpoint at equal iterations and equal cost;
  - the gain of pre-training itself: fine-tuned PSNR from D's last checkpoint minus from scratch;
  - the proxy saving of the same runs (pre-training validation curves, same formula), and the
    paired difference proxy - downstream.
Over seeds: mean and a Student-t 95% interval (``dyntrain.analysis.stats``), paired comparisons
between recipes on the same seeds. MLflow: every run tagged ``arm`` and ``seed``; a parent run holds
the table and the plot (fine-tuned PSNR vs pre-training cost, per variant and arm). Last line:
downstream_saving=<family saving of the first recipe, GPU-hour axis, mean over seeds>.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import common
import downstream_parts as parts
from quality_saving import BASELINES, RECIPES, _run_id, _train, base_overrides, prepare_data

from dyntrain.tracking.savings import EQUAL_FINETUNED_QUALITY, EQUAL_VALIDATION_QUALITY


ROOT = Path(__file__).resolve().parents[1]
CPU = {"dim": 8, "crop": 32, "batch": 4, "steps": 160, "fractions": 4, "images": 16, "val_samples": 32,
       "lr": 2e-3, "ft_steps": 100, "ft_lr": 1e-3, "ft_images": 8, "test_images": 3}
GPU = {"dim": 48, "crop": 128, "batch": 16, "steps": 800, "fractions": 4, "images": 48,
       "val_samples": 128, "lr": 1e-3, "ft_steps": 200, "ft_lr": 5e-4, "ft_images": 16,
       "test_images": 4}
AXES = ("gpu_hours", "pflop")
EXPERIMENT = "downstream-saving"
BASES = {"downstream_saving": EQUAL_FINETUNED_QUALITY, "proxy_saving": EQUAL_VALIDATION_QUALITY}


def pretrain_arms(work: Path, size: dict[str, Any], seed: int, device: str, recipes: list[str],
                  uri: str, parent: Optional[str], extra: Optional[list[str]] = None) -> dict[str, dict]:
    """Every recipe and the separate S and L runs with checkpoints at the budget's fractions; returns
    arm -> {run_id, steps, ckpt_dir, variants, checkpoints: [{step, gpu_hours, pflop}], metrics}."""
    from mlflow.tracking import MlflowClient

    train, val = prepare_data(work, size["images"], seed, max(64, 2 * size["crop"]))
    client = MlflowClient(uri)
    arms: dict[str, dict] = {}
    plan = [(r, RECIPES[r][0], RECIPES[r][1]) for r in recipes] + [(v, m, 1.0) for v, m in BASELINES.items()]
    for arm, mode, frac in plan:
        steps = max(size["fractions"], int(round(size["steps"] * frac)))
        every = steps // size["fractions"]
        steps = every * size["fractions"]
        name = f"ds-{arm}-seed{seed}"
        ckpt = work / "ckpt" / arm
        sized = dict(size, eval_every=every)
        base = base_overrides(sized, seed, device, train, val, uri, EXPERIMENT) + [
            f"checkpoint.dir={ckpt}", f"checkpoint.every={every}", f"checkpoint.keep={size['fractions'] + 1}",
            "checkpoint.resume=never", "checkpoint.overwrite=true"]
        _train(work, name, base, mode, steps, device, extra)
        run_id = _run_id(client, EXPERIMENT, name)
        for key, value in (("arm", arm), ("seed", str(seed)), *((("mlflow.parentRunId", parent),) if parent else ())):
            client.set_tag(run_id, key, value)
        costs = {x: {m.step: m.value for m in client.get_metric_history(run_id, f"val/{x}")} for x in AXES}
        points = [{"step": s, **{x: costs[x][s] for x in AXES}} for s in range(every, steps + 1, every)
                  if all(s in costs[x] for x in AXES)]
        if len(points) != size["fractions"]:
            raise RuntimeError(f"{name}: expected val/gpu_hours and val/pflop at steps {every}..{steps} "
                               f"every {every}, got {sorted(costs['gpu_hours'])}")
        run = client.get_run(run_id)
        arms[arm] = {"run_id": run_id, "steps": steps, "ckpt_dir": str(ckpt), "checkpoints": points,
                     "variants": [v for v in run.data.tags.get("variants", "").split(",") if v],
                     "metrics": dict(run.data.metrics)}
    return arms


def run_seed(work: Path, size: dict[str, Any], seed: int, device: str, recipes: list[str], uri: str,
             parent: Optional[str], extra: Optional[list[str]] = None) -> dict[str, Any]:
    """One seed: pre-training arms, fine-tuning every checkpoint and a random start, comparisons."""
    t0 = time.time()
    arms = pretrain_arms(work, size, seed, device, recipes, uri, parent, extra)
    t1 = time.time()
    ft = parts.FineTuner(work / "finetune", size, seed, device, ROOT / "configs" / "quickstart.yaml")
    scratch = {v: ft.run(None, v) for v in BASELINES}
    for arm, a in arms.items():
        for point in a["checkpoints"]:
            weights = parts.checkpoint_weights(a["ckpt_dir"], point["step"])
            point["finetuned"] = {v: ft.run(weights, v) for v in (a["variants"] or [arm])}
    ft.log_children(uri, EXPERIMENT, parent, seed)
    out: dict[str, Any] = {"seed": seed, "arms": arms, "scratch": scratch, "recipes": {},
                           "pretrain_s": t1 - t0, "finetune_s": time.time() - t1, "finetunes": ft.count}
    flops = {v: common.train_flops_per_step(parts.model_config(ROOT, size), size["crop"], size["batch"], v)
             for v in BASELINES}
    for recipe in recipes:
        out["recipes"][recipe] = parts.compare_recipe(arms, recipe, list(BASELINES), scratch, flops, uri)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="how many seeds (seed0, seed0+1, ...)")
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("--recipes", default="paper", help=f"comma-separated, from {','.join(RECIPES)}")
    for key in CPU:
        kind = float if key.endswith("lr") else int
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--work", default="runs/downstream_saving")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                        help="extra pre-training overrides")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    if args.threads:
        common.set_threads(args.threads)
    size = dict(GPU if device.type == "cuda" else CPU)
    size.update({k: getattr(args, k) for k in CPU if getattr(args, k, None) is not None})
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"downstream_saving: unknown recipe(s) {unknown}; known: {sorted(RECIPES)}")
    result = run(Path(args.work), size, list(range(args.seed0, args.seed0 + args.seeds)), device.type,
                 recipes, args.set)
    result["environment"] = common.environment(device)
    print(result["table"])
    common.write_json(args.json, result)
    fam = result["family_saving"]["downstream"]["gpu_hours"]
    common.headline("downstream_saving", fam["mean"])
    return 0


def run(work: Path, size: dict[str, Any], seeds: list[int], device: str, recipes: list[str],
        extra: Optional[list[str]] = None) -> dict[str, Any]:
    """All seeds, the summary over them, and the parent MLflow run with the table and the plot."""
    from dyntrain.tracking import store

    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    parent = store.new_run(uri, EXPERIMENT, f"downstream-{'+'.join(recipes)}-seeds{len(seeds)}",
                           {"arm": "summary", "seeds": ",".join(map(str, seeds))})
    per_seed = []
    for s in seeds:  # a seed finished by an earlier call with the same settings is read back, not rerun
        done = work / f"seed{s}" / "result.json"
        if done.exists() and json.loads(done.read_text()).get("key") == [size, recipes]:
            per_seed.append(json.loads(done.read_text()))
            continue
        per_seed.append(dict(run_seed(work / f"seed{s}", size, s, device, recipes, uri, parent, extra),
                             key=[size, recipes]))
        done.write_text(json.dumps(per_seed[-1], indent=1))
    result = parts.summarize(per_seed, recipes, list(BASELINES), AXES)
    result["size"] = size
    result["per_seed_results"] = per_seed
    result["table"] = parts.format_table(result, recipes)
    png = parts.plot(per_seed, recipes, work / "downstream_saving.png")
    store.log_batch_metrics(uri, parent, [(k, v, 0) for k, v in parts.headline_metrics(result).items()])
    for key, basis in BASES.items():  # which saving each figure is
        store.set_tag(uri, parent, f"{key}_basis", basis)
    result["basis"] = dict(BASES)
    store.log_text(uri, parent, result["table"] + "\n", "downstream_saving.md")
    store.log_artifact(uri, parent, png)
    store.finish_run(uri, parent)
    result["tracking_uri"], result["parent_run"] = uri, parent
    return result


def suite_stage(dry_run: bool = False, deadline: Optional[float] = None) -> dict[str, Any]:
    """The GPU suite's "downstream saving" stage (bench/gpu_stages.py): the smallest meaningful version,
    one seed of the paper's recipe at the GPU size cut to the slot (two checkpoints per arm, a short
    fine-tune). The dry run builds the fine-tuning data and the test sets only (seconds)."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="downstream_saving_") as tmp:
        if dry_run:
            ft = parts.FineTuner(Path(tmp), dict(CPU, ft_images=2, test_images=1), 0, "cpu",
                                 ROOT / "configs" / "quickstart.yaml")
            return {"dry_run": True, "train_images": len(ft.images), "test_pairs": len(ft.pairs)}
        gpu = torch.cuda.is_available()
        size = dict(GPU if gpu else CPU, steps=200 if gpu else 8, fractions=2, ft_steps=100 if gpu else 4)
        r = run(Path(tmp), size, [0], "cuda" if gpu else "cpu", ["paper"])
    r.pop("per_seed_results", None)
    return r


if __name__ == "__main__":
    sys.exit(main())
