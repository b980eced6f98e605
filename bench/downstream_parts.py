"""The pieces of ``bench/downstream_saving.py``: fine-tuning a checkpoint, the per-seed comparison,
the summary over seeds, its table and its plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from curriculum import DETAIL, train_and_evaluate

from dyntrain.analysis.downstream import cost_shares, pretraining_gain, saving_at_equal_quality
from dyntrain.analysis.stats import METHOD, format_ci, mean_ci95, paired_difference, with_bound


PRESET = "in"
AVERAGE = f"mio_{PRESET}_average"


def model_config(root: Path, size: dict[str, Any]):
    """The model section every arm pre-trains (quickstart.yaml at ``size['dim']``)."""
    from dyntrain.config import load_config
    from dyntrain.train.model import dynet_config

    return dynet_config(load_config(root / "configs" / "quickstart.yaml", [f"model.dim={size['dim']}"]))


def checkpoint_weights(ckpt_dir: str, step: int) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of the checkpoint at ``step``."""
    from dyntrain.checkpoint.layout import tag_for_step
    from dyntrain.checkpoint.weights import consolidated_weights

    weights, _, info = consolidated_weights(ckpt_dir, tag_for_step(step))
    if info.get("step") != step:
        raise RuntimeError(f"{ckpt_dir}: asked for the checkpoint of step {step}, got {info}")
    return weights


class FineTuner:
    """One fixed fine-tuning budget, the same for every start: ``ft_steps`` Adam steps of one variant
    on MiOIR's seven degradations (mixed, the same data order every time), then that variant on In-Dis
    MiO test sets made from held-out images. Each call is one record for the MLflow child runs."""

    def __init__(self, work: Path, size: dict[str, Any], seed: int, device: str, config: Path) -> None:
        from dyntrain.config import load_config
        from dyntrain.data.finetune.synthetic_pairs import scan_clean
        from dyntrain.data.synthetic import write_synthetic_images
        from dyntrain.eval.evaluate import load_test_sets
        from dyntrain.eval.testsets import make_testsets

        crop = size["crop"]
        write_synthetic_images(work / "train", size["ft_images"], size=(3 * crop, 3 * crop), seed=seed + 7919)
        write_synthetic_images(work / "test", size["test_images"], size=(2 * crop, 2 * crop), seed=seed + 104729)
        make_testsets(work / "test", work / "mio", [PRESET], DETAIL, seed)
        self.images, _ = scan_clean([str(work / "train")], crop)
        self.pairs = load_test_sets({"mio": str(work / "mio")})
        self.cfg = load_config(config, [f"model.dim={size['dim']}", f"run.seed={seed}"])
        self.size, self.seed, self.device = size, seed, torch.device(device)
        self.records: list[dict[str, Any]] = []
        self.count = 0

    def run(self, weights: Optional[dict[str, torch.Tensor]], variant: str, label: str = "") -> float:
        """Fine-tune from ``weights`` (None: the random init of the seed) as ``variant``; the average
        MiO PSNR of ``variant`` afterwards."""
        from dyntrain.data.finetune.synthetic_pairs import SyntheticPairLoader
        from dyntrain.data.finetune.tasks import TaskCurriculum
        from dyntrain.train.model import build_model

        s = self.size
        model = build_model(self.cfg).to(self.device)
        if weights is not None:
            model.load_state_dict(weights)
        opt = torch.optim.Adam(model.parameters(), lr=s["ft_lr"])
        curriculum = TaskCurriculum(self.seed, {t: 1 for t in DETAIL}, "mixed")
        loader = SyntheticPairLoader(self.images, curriculum, PRESET, s["crop"], s["batch"], self.seed,
                                     0, 1, 1, self.device)
        train_s, results = train_and_evaluate(model, opt, loader, lambda _step: variant, s["ft_steps"],
                                              self.pairs, self.device, variants=(variant,))
        psnr = results[variant][AVERAGE]["psnr"]
        self.records.append({"start": label or ("scratch" if weights is None else "checkpoint"),
                             "variant": variant, "psnr": psnr, "train_s": train_s})
        self.count += 1
        return psnr

    def log_children(self, uri: str, experiment: str, parent: Optional[str], seed: int) -> None:
        """One MLflow run per fine-tune, tagged arm/seed/variant, under ``parent``."""
        from dyntrain.tracking import store

        client = store.open_client(uri)
        for r in self.records:
            tags = {"arm": f"finetune:{r['start']}", "seed": str(seed), "variant": r["variant"],
                    "dyntrain.stage": "downstream-finetune"}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run = store.new_run(uri, experiment, f"ft-{r['start']}-{r['variant']}-seed{seed}", tags, client)
            store.log_batch_metrics(client, run, [(f"test/{r['variant']}/{AVERAGE}/psnr", r["psnr"], 0),
                                                  ("finetune_s", r["train_s"], 0)])
            store.finish_run(client, run)


def compare_recipe(arms: dict[str, dict], recipe: str, variants: Sequence[str], scratch: dict[str, float],
                   flops: dict[str, float], uri: str) -> dict[str, Any]:
    """Downstream and proxy savings of ``recipe`` against the separate arms, on both axes."""
    from dyntrain.analysis.compare import val_curves

    d = arms[recipe]
    shares = {"gpu_hours": cost_shares({v: d["metrics"].get(f"gpu_hours_{v}", 0.0) for v in variants}),
              "pflop": cost_shares({v: d["metrics"].get(f"steps_{v}", 0.0) * flops[v] for v in variants})}
    out: dict[str, Any] = {"downstream": {}, "proxy": {}, "shares": shares}
    for axis in shares:
        dyn = {v: [(p[axis], p["step"], p["finetuned"][v]) for p in d["checkpoints"]] for v in variants}
        sep = {v: [(p[axis], p["step"], p["finetuned"][v]) for p in arms[v]["checkpoints"]] for v in variants}
        out["downstream"][axis] = saving_at_equal_quality(dyn, sep, shares[axis], scratch)
        dyn_val = val_curves(uri, d["run_id"], variants, axis)
        sep_val = {v: val_curves(uri, arms[v]["run_id"], [v], axis)[v] for v in variants}
        out["proxy"][axis] = saving_at_equal_quality(dyn_val, sep_val, shares[axis])
    final = {v: d["checkpoints"][-1]["finetuned"][v] for v in variants}
    out["gain_db"] = pretraining_gain(final, scratch)
    return out


def _per_variant(per_seed: list[dict], recipe: str, kind: str, variants, axes) -> dict:
    return {v: {x: with_bound([s["recipes"][recipe][kind][x]["per_variant"][v]["saving"] for s in per_seed],
                              [s["recipes"][recipe][kind][x]["per_variant"][v]["bound"] for s in per_seed])
                for x in axes} for v in variants}


def _values(per_seed: list[dict], recipe: str, kind: str, v: str, axis: str) -> list:
    return [s["recipes"][recipe][kind][axis]["per_variant"][v]["saving"] for s in per_seed]


def summarize(per_seed: list[dict], recipes: list[str], variants: list[str], axes) -> dict[str, Any]:
    """The results file's figures (first recipe) and every recipe's, with intervals over seeds."""
    def one(recipe: str) -> dict[str, Any]:
        fam = {kind: {x: with_bound([s["recipes"][recipe][kind][x]["family_saving"] for s in per_seed],
                                    [s["recipes"][recipe][kind][x]["family_bound"] for s in per_seed])
                      for x in axes} for kind in ("downstream", "proxy")}
        def final_gap(s: dict, v: str):  # dynamic - separate at the last equal-iterations point
            points = s["recipes"][recipe]["downstream"]["gpu_hours"]["per_variant"][v]["equal_iterations"]
            return points[-1]["dynamic_minus_separate_db"] if points else None
        eq_iter = {v: mean_ci95([final_gap(s, v) for s in per_seed]) for v in variants}
        eq_cost = {v: {x: mean_ci95([_minus(r["target_psnr"], r["separate_psnr_at_dynamic_cost"])
                                     for r in (s["recipes"][recipe]["downstream"][x]["per_variant"][v]
                                               for s in per_seed)]) for x in axes} for v in variants}
        return {"downstream_saving": _per_variant(per_seed, recipe, "downstream", variants, axes),
                "proxy_saving": _per_variant(per_seed, recipe, "proxy", variants, axes),
                "pretraining_gain_db": {v: mean_ci95([s["recipes"][recipe]["gain_db"].get(v) for s in per_seed])
                                        for v in variants},
                "family_saving": fam,
                "proxy_minus_downstream": {v: {x: paired_difference(_values(per_seed, recipe, "proxy", v, x),
                                                                    _values(per_seed, recipe, "downstream", v, x))
                                               for x in axes} for v in variants},
                "equal_iterations_final_db": eq_iter, "equal_cost_db": eq_cost}

    head = recipes[0]
    by_recipe = {r: one(r) for r in recipes}
    result = {"seeds": [s["seed"] for s in per_seed], "variants": list(variants), "recipe": head,
              "interval": METHOD, **by_recipe[head], "recipes": by_recipe,
              "scratch_psnr": {v: mean_ci95([s["scratch"][v] for s in per_seed]) for v in variants}}
    result["paired_vs_first"] = {
        r: {v: {x: paired_difference(_values(per_seed, r, "downstream", v, x), _values(per_seed, head, "downstream", v, x))
                for x in axes} for v in variants} for r in recipes[1:]}
    return result


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: each saving's mean and interval ends per variant and axis (first
    recipe), ``downstream_saving_family_<axis>_mean`` and the pre-training gain per variant."""
    out: dict[str, float] = {}

    def put(name: str, s: dict) -> None:
        for key, value in (("mean", s["mean"]), ("ci95_lo", s["ci95"][0]), ("ci95_hi", s["ci95"][1])):
            if value is not None:
                out[f"{name}_{key}"] = value
    for kind in ("downstream_saving", "proxy_saving"):
        for v, by_axis in result[kind].items():
            for axis, s in by_axis.items():
                put(f"{kind}_{v}_{axis}", s)
        for axis, s in result["family_saving"][kind.split("_")[0]].items():
            put(f"{kind}_family_{axis}", s)
    for v, s in result["pretraining_gain_db"].items():
        put(f"pretraining_gain_db_{v}", s)
    return out


def _minus(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def format_table(result: dict[str, Any], recipes: list[str]) -> str:
    """Markdown: per recipe and variant, the two savings on both axes and the gains, with intervals."""
    lines = [f"seeds {result['seeds']}; mean [95% interval] ({result['interval']}); downstream saving = at "
             "equal fine-tuned quality, proxy saving = at equal validation quality (pre-training curves); (bound) "
             "= a separate run never reached the dynamic run's PSNR in some seed, so the figure is a lower bound", "",
             "| recipe | variant | downstream saving, GPU h | downstream saving, PFLOP | proxy saving, GPU h | "
             "proxy saving, PFLOP | proxy - downstream, PFLOP | pre-training gain (dB) | dyn - sep at equal "
             "iterations (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recipes:
        x = result["recipes"][r]
        for v in result["variants"]:
            lines.append(f"| {r} | {v} | {format_ci(x['downstream_saving'][v]['gpu_hours'])} | "
                         f"{format_ci(x['downstream_saving'][v]['pflop'])} | {format_ci(x['proxy_saving'][v]['gpu_hours'])} | "
                         f"{format_ci(x['proxy_saving'][v]['pflop'])} | "
                         f"{format_ci(x['proxy_minus_downstream'][v]['pflop'])} | "
                         f"{format_ci(x['pretraining_gain_db'][v], '.2f')} | "
                         f"{format_ci(x['equal_iterations_final_db'][v], '.2f')} |")
        fam = x["family_saving"]
        lines.append(f"| {r} | family (S+L) | {format_ci(fam['downstream']['gpu_hours'])} | "
                     f"{format_ci(fam['downstream']['pflop'])} | {format_ci(fam['proxy']['gpu_hours'])} | "
                     f"{format_ci(fam['proxy']['pflop'])} | | | |")
    for r, by_v in result.get("paired_vs_first", {}).items():
        for v, by_x in by_v.items():
            d = by_x["pflop"]
            lines.append(f"paired, {r} - {result['recipe']}, {v}, downstream saving (PFLOP): {format_ci(d)}"
                         f"{' (significant)' if d['significant'] else ''}")
    return "\n".join(lines)


def plot(per_seed: list[dict], recipes: list[str], path: Path) -> Path:
    """Fine-tuned PSNR vs pre-training PFLOP, one panel per variant, one line per arm and seed (the
    random start at 0)."""
    # lazy: matplotlib is optional: plots only
    import matplotlib
    matplotlib.use("Agg")
    # lazy: matplotlib is optional: plots only
    import matplotlib.pyplot as plt

    variants = sorted(per_seed[0]["scratch"])
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    colors = {}
    for ax, v in zip(axes[0], variants):
        for s in per_seed:
            for arm in [*recipes, v]:
                pts = [(0.0, s["scratch"][v])] + [(p["pflop"], p["finetuned"][v]) for p in s["arms"][arm]["checkpoints"]]
                label = arm if arm in recipes else f"{v} alone"
                color = colors.setdefault(label, f"C{len(colors)}")
                ax.plot(*zip(*pts), marker="o", color=color, alpha=0.6,
                        label=label if s is per_seed[0] else None)
        ax.set_title(f"DyNet-{v}: fine-tuned MiO PSNR")
        ax.set_xlabel("pre-training work (PFLOP)")
        ax.set_ylabel("PSNR (dB)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
