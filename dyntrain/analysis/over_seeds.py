"""The iso-quality saving over several runs per arm: one comparison per seed, then the mean with its
95% interval per recipe and the paired difference between recipes on the seeds they share
(``launch/compare.py --iso-quality --over-seeds``).

Runs are the experiment's pre-training runs with validation, grouped by their ``run.seed`` param; in
each seed the newest run of each recipe (tag ``recipe``, else ``mode``) is compared with the newest
fixed-variant run of each variant of that seed. A seed without the baselines a recipe needs is
skipped and named, never filled in from another seed.
"""
from __future__ import annotations

from typing import Any, Optional

from dyntrain.analysis.compare import ComparisonError, compare_iso_quality
from dyntrain.analysis.stats import METHOD, format_ci, paired_difference, with_bound
from dyntrain.tracking import store


def seed_order(seed: str) -> tuple[int, str]:
    """Sort key of seed params (strings): numerically for numbers ("2" before "10")."""
    return len(seed), seed


def _group(runs) -> dict[str, dict[str, Any]]:
    """seed -> {"fixed": {variant: run}, "recipes": {recipe: run}} (newest first in ``runs``)."""
    seeds: dict[str, dict[str, Any]] = {}
    for r in runs:
        seed = r.data.params.get("run.seed")
        if seed is None:
            continue
        g = seeds.setdefault(seed, {"fixed": {}, "recipes": {}})
        mode = r.data.tags.get("mode", "")
        if mode.startswith("fixed:"):
            g["fixed"].setdefault(mode[6:], r)
        elif mode:
            g["recipes"].setdefault(r.data.tags.get("recipe") or mode, r)
    return seeds


def iso_quality_over_seeds(tracking_uri: str, experiment: str, x: str = "gpu_hours",
                           reference: Optional[str] = "paper") -> dict[str, Any]:
    """{"recipes": {recipe: with_bound summary + "seeds"}, "paired": {recipe: paired difference
    against ``reference`` (the first recipe found when absent)}, "skipped": [...], "text"}."""
    client = store.open_client(tracking_uri)
    exp = store.find_experiment(client, experiment)
    if exp is None:
        raise ComparisonError(f"MLflow experiment {experiment!r} not found")
    runs = store.search_experiment_runs(client, exp.experiment_id, "tags.`dyntrain.stage` = 'pretrain'",
                                        order_by=["attributes.start_time DESC"], max_results=5000)
    groups = _group([r for r in runs if r.data.tags.get("val.fingerprint")])
    if not groups:
        raise ComparisonError(f"no pre-training runs with validation and a run.seed param in {experiment!r}")
    per: dict[str, dict[str, dict]] = {}
    skipped: list[str] = []
    for seed in sorted(groups, key=seed_order):
        g = groups[seed]
        for recipe, run in g["recipes"].items():
            ids = [run.info.run_id] + [f.info.run_id for f in g["fixed"].values()]
            try:
                res = compare_iso_quality(tracking_uri, None, ids, None, log=False, x=x)
            except ComparisonError as exc:
                skipped.append(f"seed {seed}, {recipe}: {exc}")
                continue
            per.setdefault(recipe, {})[seed] = res
    if not per:
        raise ComparisonError(f"no seed of {experiment!r} has a complete comparison: " + "; ".join(skipped))
    out: dict[str, Any] = {"x": x, "interval": METHOD, "recipes": {}, "paired": {}, "skipped": skipped}
    for recipe, by_seed in per.items():
        seeds = sorted(by_seed, key=seed_order)
        summary = with_bound([by_seed[s]["iso_quality_saving"] for s in seeds],
                             [by_seed[s]["iso_quality_saving_is_bound"] for s in seeds])
        out["recipes"][recipe] = dict(summary, seeds=seeds)
    ref = reference if reference in per else next(iter(per))
    for recipe, by_seed in per.items():
        common = sorted(set(by_seed) & set(per[ref]), key=seed_order)
        if recipe == ref or len(common) < 2:
            continue
        d = paired_difference([by_seed[s]["iso_quality_saving"] for s in common],
                              [per[ref][s]["iso_quality_saving"] for s in common])
        out["paired"][recipe] = dict(d, seeds=common, reference=ref)
    out["reference"] = ref
    out["text"] = format_over_seeds(out)
    return out


def format_over_seeds(result: dict[str, Any]) -> str:
    unit = "GPU-hour" if result["x"] == "gpu_hours" else result["x"]
    lines = [f"iso-quality saving over seeds ({unit} axis): mean [95% interval, {result['interval']}]"]
    for recipe, s in result["recipes"].items():
        per = ", ".join("-" if v is None else f"{v:+.3f}" for v in s["per_seed"])
        lines.append(f"  {recipe:18s} {format_ci(s)}   seeds {','.join(s['seeds'])}: {per}")
    for recipe, d in result["paired"].items():
        lines.append(f"  paired {recipe} - {d['reference']}: {format_ci(d)} over seeds {','.join(d['seeds'])}"
                     f"{' (the interval excludes 0)' if d['significant'] else ''}")
    for line in result["skipped"]:
        lines.append(f"  skipped {line}")
    return "\n".join(lines)
