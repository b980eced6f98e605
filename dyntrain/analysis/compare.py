"""Compare MLflow runs: dynamic vs fixed-variant pre-training, and fine-tuned PSNR/SSIM per variant.

``collect_runs`` reads runs (through ``dyntrain.tracking.store``) and sorts them into
  - pre-training runs (``data.source`` "shards"): mode (dynamic, or fixed:<variant> for the
    separate-training baselines), steps, GPU hours, ``gpu_hours_separate``, ``gpu_hours_saved_frac``;
  - result runs (any run with ``eval/<variant>/<task>/psnr`` metrics: fine-tuning runs evaluated
    periodically, or evaluation runs): PSNR/SSIM per variant and task and the variant's GFLOPs
    (``model/<variant>/gflops_224``).
``format_tables`` prints them; ``dyntrain.analysis.plot.plot`` draws PSNR vs GFLOPs per variant and the
GPU hours of dynamic vs separate pre-training into one PNG; ``log_comparison`` stores PNG and tables in
a "comparison" run.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

from dynet.summary import text_table
from dyntrain.analysis.plot import plot_iso
from dyntrain.analysis.runs import PretrainRun, ResultRun, separate_vs_dynamic
from dyntrain.eval.iso_quality import as_metrics, format_result, iso_quality
from dyntrain.eval.testdata import TASK_LABELS
from dyntrain.tracking import store
from dyntrain.tracking.savings import EQUAL_ITERATIONS, iso_basis_tag, saved_text


EVAL_METRIC = re.compile(r"^eval/(?P<variant>[^/]+)/(?P<task>[^/]+)/(?P<name>psnr|ssim)$")
TASK_ORDER = list(TASK_LABELS) + ["average", "mio_in_average", "mio_out_average"]


def collect_runs(tracking_uri: str, experiments: Optional[Sequence[str]] = None
                 ) -> tuple[list[PretrainRun], list[ResultRun]]:
    """Pre-training and result runs of the given experiments (all experiments when None)."""
    names, runs = store.search_runs(tracking_uri, experiments)
    pretrain, results = [], []
    for run in runs:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        stage = tags.get("dyntrain.stage") or _stage_from_params(params)
        if stage == "comparison":
            continue
        name = tags.get("mlflow.runName") or run.info.run_name or run.info.run_id[:8]
        exp = names.get(run.info.experiment_id, run.info.experiment_id)
        if stage == "pretrain":
            mode = tags.get("schedule") or params.get("schedule.mode", "dynamic")
            if mode == "fixed":
                mode = f"fixed:{params.get('schedule.fixed_variant', '?')}"
            pretrain.append(PretrainRun(run.info.run_id, name, exp, mode, run.info.status, dict(metrics),
                                        training_data(run)))
        rr = ResultRun(run.info.run_id, name, exp, stage)
        for key, value in metrics.items():
            m = EVAL_METRIC.match(key)
            if m:
                rr.results.setdefault(m["variant"], {}).setdefault(m["task"], {})[m["name"]] = value
            elif key.startswith("model/") and key.endswith("/gflops_224"):
                rr.gflops[key.split("/")[1]] = value
        if rr.results:
            results.append(rr)
    return pretrain, results


def training_data(run) -> str:
    """``name@digest`` of the run's training set (its MLflow dataset input), "" when it has none."""
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    for item in inputs:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in item.tags):
            return f"{item.dataset.name}@{item.dataset.digest[:8]}"
    return ""


def _stage_from_params(params: dict[str, str]) -> str:
    source = params.get("data.source")
    if source == "shards":
        return "pretrain"
    if source in ("paired", "paired_shards"):
        return "finetune"
    return "other"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_tables(pretrain: list[PretrainRun], results: list[ResultRun]) -> str:
    parts = []
    if pretrain:
        rows = [[r.name, r.mode, r.data or "-", r.status, f"{r.steps:.0f}", _fmt(r.metrics.get("gpu_hours"), ".4f"),
                 _fmt(r.metrics.get("gpu_hours_separate"), ".4f"),
                 _fmt(r.metrics.get("gpu_hours_saved_frac"), ".3f"), _fmt(r.metrics.get("loss"), ".4f")]
                for r in pretrain]
        parts.append("Pre-training runs\n" + text_table(
            ["run", "mode", "data", "status", "steps", "gpu_hours", "gpu_hours_separate",
             "saved_frac (equal iterations)", "loss"], rows))
        saving = separate_vs_dynamic(pretrain)
        if saving:
            parts.append(f"dynamic run {saving['dynamic']}: {saving['dynamic_gpu_hours']:.4f} GPU h for "
                         f"{saving['steps']:.0f} steps; fixed-variant baselines "
                         f"({', '.join(saving['baselines'])}) at the same step count: "
                         f"{saving['separate_gpu_hours']:.4f} GPU h -> {saved_text(saving['saved_frac'], EQUAL_ITERATIONS)}")
    else:
        parts.append("Pre-training runs: none found")
    if results:
        tasks = [t for t in TASK_ORDER if any(t in v for r in results for v in r.results.values())]
        rows = []
        for r in results:
            for variant, per_task in sorted(r.results.items(), key=lambda kv: (r.gflops.get(kv[0], 0.0), kv[0])):
                rows.append([r.name, r.stage, variant, _fmt(r.gflops.get(variant), ".2f")] + [
                    (f"{per_task[t].get('psnr', float('nan')):.2f}/{per_task[t].get('ssim', float('nan')):.4f}"
                     if t in per_task else "-") for t in tasks])
        parts.append("Evaluated runs (PSNR/SSIM)\n" + text_table(["run", "stage", "variant", "GFLOPs"] + tasks, rows))
    else:
        parts.append("Evaluated runs: none found")
    return "\n\n".join(parts)


def log_comparison(tracking_uri: str, experiment: str, png: Path, text: str,
                   compared: Sequence[str]) -> str:
    """A run in ``experiment`` tagged dyntrain.stage=comparison holding the plot and the tables."""
    return store.log_comparison_run(tracking_uri, experiment, png, text, compared)


# ------------------------------------------------------------------ iso-quality (dyntrain.eval.iso_quality)
class ComparisonError(ValueError):
    """The runs cannot be compared at equal quality (missing baseline, different val sets, ...)."""


ISO_AXES = ("gpu_hours", "pflop")


def val_curves(client, run_id: str, variants: Sequence[str], x: str = "gpu_hours"
               ) -> dict[str, list[tuple[float, float, float]]]:
    """variant -> [(val/<x>, val/<v>/own_steps, val/<v>/psnr)] of one run, one point per step
    (x: "gpu_hours", the default, or "pflop", the machine-independent work count). ``client``: a
    tracking URI or a client (``store.open_client``)."""
    def by_step(key: str) -> dict[int, float]:
        return store.metric_history(client, run_id, key)
    hours = by_step(f"val/{x}")
    curves = {}
    for v in variants:
        own, psnr = by_step(f"val/{v}/own_steps"), by_step(f"val/{v}/psnr")
        pts = [(hours[s], own[s], psnr[s]) for s in sorted(psnr) if s in hours and s in own]
        if pts:
            curves[v] = pts
    return curves


def find_iso_runs(client, experiment: Optional[str], run_ids: Optional[Sequence[str]] = None):
    """(dynamic run, {variant: fixed-variant run}) - the ids given, else the newest of each mode with
    validation in ``experiment``; refuses different val fingerprints and missing baselines. ``client``:
    a tracking URI or a client (``store.open_client``)."""
    if run_ids:
        runs = [store.get_run(client, r) for r in run_ids]
    else:
        if not experiment:
            raise ComparisonError("--iso-quality needs --experiment NAME or --runs ID ID ID")
        exp = store.find_experiment(client, experiment)
        if exp is None:
            raise ComparisonError(f"MLflow experiment {experiment!r} not found")
        runs = store.search_experiment_runs(client, exp.experiment_id, "tags.`dyntrain.stage` = 'pretrain'",
                                            order_by=["attributes.start_time DESC"], max_results=5000)
        runs = [r for r in runs if r.data.tags.get("val.fingerprint")]
    dynamic, fixed = None, {}
    for r in runs:  # newest first when searched; any recipe that trains several variants
        mode = r.data.tags.get("mode", "")
        if mode and not mode.startswith("fixed:") and dynamic is None:
            dynamic = r
        elif mode.startswith("fixed:"):
            fixed.setdefault(mode[6:], r)
    if dynamic is None:
        raise ComparisonError(f"no dynamic pre-training run with validation among "
                              f"{run_ids or experiment!r}")
    variants = [v for v in dynamic.data.tags.get("variants", "").split(",") if v]
    missing = [v for v in variants if v not in fixed]
    if missing:
        raise ComparisonError(f"no separate baseline (schedule.mode=fixed schedule.fixed_variant="
                              f"{missing[0]}) with validation for the dynamic run {dynamic.info.run_id}: "
                              f"missing {', '.join(missing)}")
    prints = {r.info.run_id: r.data.tags.get("val.fingerprint") for r in [dynamic, *fixed.values()]}
    if len(set(prints.values())) != 1:
        raise ComparisonError("val fingerprints differ (different val shards, seed or sizes): " +
                              ", ".join(f"{k} {v}" for k, v in prints.items()))
    return dynamic, {v: fixed[v] for v in variants}


def compare_iso_quality(tracking_uri: str, experiment: Optional[str], run_ids=None,
                        png: Optional[Path] = None, log: bool = True, x: str = "gpu_hours") -> dict[str, Any]:
    """Find the runs, compute ``iso_quality.iso_quality``, and (``log``) store its metrics, table
    and plot in the dynamic run (the "dynamic" side is any recipe's run: paper, sandwich, ...).
    ``x``: the cost axis, "gpu_hours" (wall time) or "pflop" (work: independent of the machine's
    load; metrics then named ``iso_pflop/...`` and ``iso_quality_saving_pflop``). Returns the
    result plus ``text`` and the run ids."""
    if x not in ISO_AXES:
        raise ComparisonError(f"iso-quality axis must be one of {ISO_AXES}, got {x!r}")
    client = store.open_client(tracking_uri)
    dynamic, baselines = find_iso_runs(client, experiment, run_ids)
    variants = list(baselines)
    dyn_curves = val_curves(client, dynamic.info.run_id, variants, x)
    sep_curves = {v: val_curves(client, b.info.run_id, [v], x).get(v, []) for v, b in baselines.items()}
    empty = [v for v in variants if not dyn_curves.get(v) or not sep_curves[v]]
    if empty:
        raise ComparisonError(f"no val/<variant>/psnr with val/{x} history for variant(s) "
                              f"{', '.join(empty)} (were the runs started with data.val_urls?)")
    result = iso_quality(dyn_curves, sep_curves)
    result["x"] = x
    result["recipe"] = dynamic.data.tags.get("recipe", dynamic.data.tags.get("mode"))
    result["text"] = format_result(result, "GPU h" if x == "gpu_hours" else x)
    result["dynamic_run"] = dynamic.info.run_id
    result["baseline_runs"] = {v: b.info.run_id for v, b in baselines.items()}
    if png is not None:
        plot_iso(dyn_curves, sep_curves, png, result,
                 xlabel="GPU hours (validation excluded)" if x == "gpu_hours" else "training work (PFLOP)",
                 label=result["recipe"] or "dynamic")
    if log:
        step = max(store.metric_history(client, dynamic.info.run_id, f"val/{x}"))
        store.log_batch_metrics(client, dynamic.info.run_id,
                                [(k, v, step) for k, v in as_metrics(result, x).items()])
        for key, basis in iso_basis_tag(x).items():  # which saving iso_quality_saving is
            store.set_tag(client, dynamic.info.run_id, key, basis)
        store.log_text(client, dynamic.info.run_id, result["text"] + "\n",
                       "iso_quality.txt" if x == "gpu_hours" else f"iso_quality_{x}.txt")
        if png is not None:
            store.log_artifact(client, dynamic.info.run_id, png)
    return result
