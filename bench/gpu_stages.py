"""The stages of the GPU suite (``bench/gpu_suite.py``), each run in its own process.

A stage measures through the existing benchmarks' functions (``train_step``, ``dynamic_vs_separate``,
``input_pipeline``, ``data_throughput``), records every figure the moment it has it (the
:class:`Recorder` rewrites the stage's JSON file each time, so a stage killed at its deadline still
leaves what it measured), checks its deadline between measurements, and records a reason for each
figure it could not measure. On a GPU it runs the paper's setting; without one (``--dry-run``) the
same code runs at tiny sizes with quick compile backends.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent

from dyntrain.logs import get_logger  # noqa: E402

log = get_logger("gpu_suite")

DRY_SIZES = {"dim": 8, "crop": 32, "batch": 2}


def missing(*modules: tuple[str, str]) -> Optional[str]:
    """Why the first of the (module, package) pairs that does not import cannot be used
    ("<package> not installed", or the import error of one that is installed), or None."""
    for module, package in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if getattr(exc, "name", None) and module.startswith(exc.name):
                return f"{package} not installed"
            return f"{package} does not import: {type(exc).__name__}: {exc}"
    return None


def _skip_stage(rec: Recorder, reason: str, figures: tuple[str, ...]) -> None:
    rec.skip(Path(rec.path).stem, reason)
    for key in figures:
        rec.figure(key, None, reason)


class Recorder:
    """A stage's figures, reasons for the ones it could not measure, and details; written to
    ``path`` after every change."""

    def __init__(self, path: Path, deadline: float, dry_run: bool) -> None:
        self.path, self.deadline, self.dry_run = path, deadline, dry_run
        self.data: dict[str, Any] = {"figures": {}, "skipped": {}, "details": {}, "done": False}

    def figure(self, key: str, value: Any, reason: str = "not measured") -> None:
        self.data["figures"][key] = value
        if value is None:
            self.data["skipped"][key] = reason
        else:
            self.data["skipped"].pop(key, None)
        self.flush()

    def skip(self, key: str, reason: str) -> None:
        log.info(f"skipped {key}: {reason}")
        self.data["skipped"][key] = reason
        self.flush()

    def detail(self, key: str, value: Any) -> None:
        self.data["details"][key] = value
        self.flush()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _device():
    import common

    device = common.resolve_device("auto")
    return device, device.type == "cuda"


# ------------------------------------------------------------------------- 0. the GPU tests
def gpu_tests(rec: Recorder) -> None:
    """``pytest -m gpu`` over the test files that hold GPU tests; a test file whose imports are
    missing is reported as skipped (``gpu_pytest_skip``), not as an error."""
    import re
    import subprocess

    tests = BENCH.parent / "tests"
    files = sorted(str(p) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "gpu_pytest_skip",
           "-p", "no:cacheprovider", *files]
    rec.detail("command", " ".join(Path(c).name if os.sep in c else c for c in cmd))
    try:
        proc = subprocess.run(cmd, cwd=BENCH.parent, capture_output=True, text=True,
                              timeout=max(1.0, rec.time_left() - 2))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        rec.detail("output_tail", out[-4000:])
        rec.figure("gpu_tests", None, "pytest -m gpu ran out of time")
        return
    print(proc.stdout[-6000:] + proc.stderr[-2000:], flush=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|"
                                                r"xpassed|deselected)", summary)}
    rec.detail("output_tail", proc.stdout[-4000:])
    rec.figure("gpu_tests", {"exit_code": proc.returncode, "summary": summary.strip("= "),
                             **counts})


# ------------------------------------------------------------------------- 1. training step
def train_step(rec: Recorder) -> None:
    """fp32 eager against the optimised recipe for S and L, then the two alternatives on L."""
    import common
    import train_step as ts

    device, gpu = _device()
    sizes = dict(common.PAPER) if gpu else dict(DRY_SIZES)
    steps, warmup = (20, 5) if gpu else (2, 1)
    backend = "inductor" if gpu else "eager"  # dynamo alone in the dry run: quick
    cfg = ts.model_config(sizes["dim"])
    flops = {v: common.train_flops_per_step(cfg, sizes["crop"], sizes["batch"], v)
             for v in ("S", "L")}
    peak, peak_source = common.peak_tflops(device)
    rec.detail("setting", {**sizes, "steps": steps, "warmup": warmup, "compile_backend": backend,
                           "device": common.device_name(device), "peak_tflops": peak,
                           "peak_source": peak_source, "train_flops_per_step": flops})
    plan = [(ts.fp32_eager(), ["L", "S"]), (ts.optimised(gpu, backend), ["L", "S"])]
    if gpu:  # CUDA graphs first: its graphs are mostly in inductor's cache by now
        plan += [(ts.cuda_graphs(gpu), ["L"]), (ts.whole_model(gpu, backend), ["L"])]
    else:  # tracing the whole unrolled L forward alone takes 20-50 s on a busy CPU
        rec.skip("cuda_graphs", "CUDA graphs need a GPU")
        plan.append((ts.whole_model(gpu, backend), ["S"]))
    rows: dict[str, dict[str, Any]] = {}
    compile_s: dict[str, float] = {}
    for recipe, variants in plan:
        if rec.time_left() < (30 if gpu else 3):
            rec.skip(recipe.name, "out of time")
            continue
        log.info(f"train step: {recipe.name} recipe, DyNet-{'/'.join(variants)}")
        try:
            result = ts.measure_recipe(recipe, cfg, device, sizes, variants, warmup, steps,
                                       flops, peak)
        except Exception as exc:  # an alternative may fail on this stack: note it, go on
            traceback.print_exc()
            rec.skip(recipe.name, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        rows[recipe.name] = result["variants"]
        if recipe.compile_backend:
            compile_s[recipe.name] = sum(ts.compile_seconds(r, warmup)
                                         for r in result["variants"].values())
        rec.detail(recipe.name, {**result, "compile_s": compile_s.get(recipe.name)})
        _train_step_figures(rec, rows, compile_s, peak_source)


def _train_step_figures(rec: Recorder, rows: dict, compile_s: dict, peak_source: str) -> None:
    opt, base = rows.get("optimised"), rows.get("baseline")
    if opt is None:
        return
    for v in ("S", "L"):
        rec.figure(f"step_ms_{v}", opt[v]["step_s"] * 1e3)
        rec.figure(f"patches_per_s_{v}", opt[v]["patches_per_s"])
        rec.figure(f"peak_mb_{v}", opt[v]["peak_mb"])
        rec.figure(f"mfu_{v}", opt[v]["mfu"], f"no bf16 peak: {peak_source}")
        if base is not None:
            rec.figure(f"speedup_{v}_vs_fp32_eager", base[v]["step_s"] / opt[v]["step_s"])
    rec.figure("compile_s", compile_s.get("optimised"), "the optimised recipe did not compile")
    alternatives = {}
    for name in ("cuda_graphs", "whole_model"):
        for v, row in rows.get(name, {}).items():  # L on a GPU (S for whole_model in a dry run)
            alternatives[name] = {
                "variant": v, f"step_ms_{v}": row["step_s"] * 1e3, f"mfu_{v}": row["mfu"],
                "compile_s": compile_s.get(name),
                f"speedup_{v}_vs_optimised": opt[v]["step_s"] / row["step_s"],
                f"speedup_{v}_vs_fp32_eager": base[v]["step_s"] / row["step_s"] if base else None}
    rec.figure("alternatives", alternatives)


# --------------------------------------------------------------- 2. dynamic vs separate, ZeRO
def dynamic_vs_separate(rec: Recorder) -> None:
    """Dynamic S/L against S alone + L alone through the DeepSpeed engine, ZeRO 2 (the paper's
    stage, the headline figures) first, then ZeRO 0 and 1 with the steps the time left allows."""
    lacking = missing(("deepspeed", "deepspeed"), ("yaml", "pyyaml"))
    if lacking:
        _skip_stage(rec, lacking, ("gpu_hours_saved_frac", "switch_penalty_s",
                                   "zero_stage_step_ms", "fastest_zero_stage"))
        return
    import common
    import dynamic_vs_separate as dvs
    from dyntrain.train.engine import init_distributed, shutdown_distributed

    device, gpu = _device()
    sizes = dict(common.PAPER) if gpu else dict(DRY_SIZES)
    plan = {2: 300, 0: 150, 1: 150} if gpu else {2: 6, 0: 4, 1: 4}
    warmup, rounds, least = (10, 3, 30) if gpu else (1, 1, 2)
    compile_blocks = gpu  # inductor through model.compile on the GPU; no compile in the dry run
    if gpu:
        plan[2] = max(least, min(plan[2], _fit_first(rec)))
    step_ms: dict[str, dict[str, float]] = {}
    per_step_s, setup_s = None, 0.0
    info = init_distributed(common.training_config(None, [], device, sizes, 2, False, gpu))
    for zero, steps in plan.items():
        if per_step_s is not None:  # fit the steps into the time left
            fit = int((rec.time_left() - 1.5 * setup_s) / (3 * per_step_s * 1.2))
            steps = min(steps, fit)
        if steps < least or rec.time_left() <= 0:
            rec.skip(f"zero_{zero}", "out of time")
            continue
        t0 = time.time()
        cfg = common.training_config(None, [f"deepspeed.zero_stage={zero}"], device, sizes, steps,
                                     compile_blocks, gpu)
        engine, ds_config = dvs.engine_for(cfg, info)
        loader = common.SyntheticBatches(cfg.data.micro_batch_size, cfg.data.crop_size,
                                         info.device)
        log.info(f"dynamic vs separate: ZeRO {zero}, N={steps} per phase")
        run = dvs.compare_phases(cfg, engine, loader, info, steps, warmup, rounds)
        loader.close()
        del engine
        common.release(info.device)
        walls = sum(run["wall_s"].values())
        per_step_s = walls / (3 * steps)
        setup_s = time.time() - t0 - walls
        step_ms[str(zero)] = {**{v: s * 1e3 for v, s in run["step_s_alone"].items()},
                              "dynamic": run["wall_s"]["dynamic"] / steps * 1e3}
        rec.detail(f"zero_{zero}", {k: v for k, v in run.items() if k != "step_records"}
                   | {"steps": steps, "warmup": warmup, "bf16": ds_config["bf16"]["enabled"],
                      "compile": cfg.model.compile, "channels_last": cfg.model.channels_last})
        rec.figure("zero_stage_step_ms", step_ms)
        rec.figure("fastest_zero_stage", fastest_zero_stage(step_ms))
        if zero == 2:
            rec.figure("gpu_hours_saved_frac", run["gpu_hours_saved_frac"])
            rec.figure("expected_saved_frac", run["expected_saved_frac"])
            rec.figure("switching_overhead_frac", run["switching_overhead_frac"])
            rec.figure("switch_penalty_s", run["switch_penalty_s"],
                       "no step followed both a switch and its own variant")
    shutdown_distributed()


def fastest_zero_stage(step_ms: dict[str, dict[str, float]]) -> int:
    """The ZeRO stage whose dynamic S/L training took the least time per step (``step_ms``: stage ->
    {"dynamic": ms, ...}); what ``deepspeed.zero_stage`` of configs/pretrain.yaml should be."""
    if not step_ms:
        raise ValueError("fastest_zero_stage: no ZeRO stage was measured")
    return int(min(step_ms, key=lambda zero: step_ms[zero]["dynamic"]))


def _fit_first(rec: Recorder, reserve_s: float = 60.0, engine_factor: float = 1.3) -> int:
    """N per phase for the first ZeRO stage: half the time left after ``reserve_s`` (engine set-up
    and compilation), priced at the train_step stage's S and L step times (if it measured them;
    the engine's steps taken ``engine_factor`` times slower). A run of N costs N * 1.5 (t_S + t_L)
    over its three phases (dynamic, S alone, L alone)."""
    try:
        figures = json.loads((rec.path.parent / "train_step.json").read_text())["figures"]
        pair_s = (figures["step_ms_S"] + figures["step_ms_L"]) / 1e3
    except (OSError, ValueError, KeyError, TypeError):
        return 200
    return int(0.5 * (rec.time_left() - reserve_s) / (engine_factor * 1.5 * pair_s))


# ------------------------------------------------------------------- 3. input pipeline (DALI)
def input_pipeline(rec: Recorder) -> None:
    """DALI decode throughput (``mixed`` on the GPU) of JPEG patches to crops, then the input
    wait of the Trainer fed by the DALI loader (needs DeepSpeed too)."""
    lacking = missing(("nvidia.dali", "nvidia-dali"))
    if lacking:
        _skip_stage(rec, lacking, ("dali_images_per_s", "input_wait_frac"))
        return
    import common
    import data_throughput as dt
    import dynamic_vs_separate as dvs
    import input_pipeline as ip
    from dyntrain.data.pretrain.degrade import DegradeSpec

    device, gpu = _device()
    sizes = dict(common.PAPER) if gpu else dict(DRY_SIZES)
    images, patch, threads = (16, 512, 8) if gpu else (2, 64, 1)
    warmup, batches, steps = (5, 30, 60) if gpu else (1, 3, 3)
    decode = "mixed" if gpu else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu_suite-shards-") as tmp:
        urls, samples = ip.make_shards(Path(tmp), images, patch)
        spec = DegradeSpec(crop_size=sizes["crop"])
        rate, stats = dt.dali_rate(urls, spec, sizes["batch"], device, 0, threads,
                                   min(256, samples), decode, warmup, batches)
        rec.detail("dali", {"patch": patch, "crop": sizes["crop"], "batch": sizes["batch"],
                            "threads": threads, "samples": samples, "decode": stats["decode"],
                            "batches": batches})
        rec.figure("dali_images_per_s", rate)
        lacking = missing(("deepspeed", "deepspeed"), ("yaml", "pyyaml"))
        if lacking:
            rec.figure("input_wait_frac", None, lacking)
            return
        if rec.time_left() < (40 if gpu else 5):
            rec.figure("input_wait_frac", None, "out of time")
            return
        from dyntrain.train.engine import init_distributed, shutdown_distributed

        overrides = ip.loader_overrides(urls, samples, decode, threads, None)
        cfg = common.training_config(None, overrides, device, sizes, steps, gpu, gpu)
        info = init_distributed(cfg)
        engine, _ = dvs.engine_for(cfg, info)
        feed = ip.measure_feed(cfg, engine, info, steps, warmup, batches)
        rec.detail("feed", feed)
        rec.figure("input_wait_frac", feed["input_wait_frac"])
        rec.figure("fed_slowdown_frac", feed["fed_slowdown_frac"])
        shutdown_distributed()


# ------------------------------------------------------------ 4. iso-quality saving (a slot)
def _saving_stage(rec: Recorder, name: str, dry_note: str) -> None:
    """Runs ``bench/<name>.py``'s ``suite_stage(dry_run=..., deadline=...)`` and records its dict of
    figures as ``name`` (the dry run's description as a detail, the figure then null with ``dry_note``);
    skipped while DeepSpeed, DALI or MLflow is missing."""
    if not (BENCH / f"{name}.py").exists():
        rec.figure(name, None, f"bench/{name}.py not present")
        return
    lacking = missing(("deepspeed", "deepspeed"), ("nvidia.dali", "nvidia-dali"), ("mlflow", "mlflow"))
    if lacking:
        _skip_stage(rec, lacking, (name,))
        return
    module = importlib.import_module(name)
    result = module.suite_stage(dry_run=rec.dry_run, deadline=rec.deadline)
    if rec.dry_run:
        rec.detail(f"{name}_dry_run", result)
        rec.figure(name, None, dry_note)
        return
    rec.figure(name, result)


def quality_saving(rec: Recorder) -> None:
    """``bench/quality_saving.py``'s stage: the GPU-sized baselines, the paper's recipe and, while time
    is left, sandwich, sandwich_distill and cost_aware, each with its equal-quality comparison; the dry
    run only builds the held-out data and the fixed validation set (three trainings do not fit its
    budget)."""
    _saving_stage(rec, "quality_saving", "dry run: data and validation set built, no trainings "
                                         "(CPU figures: bench/RESULTS.md)")


# ------------------------------------------------------- 5. downstream saving (the smallest version)
def downstream_saving(rec: Recorder) -> None:
    """``bench/downstream_saving.py``'s stage: one seed of the paper's recipe, S alone and L alone with
    two checkpoints each, every checkpoint fine-tuned briefly and evaluated; the dry run builds the
    fine-tuning data and test sets only."""
    _saving_stage(rec, "downstream_saving", "dry run: fine-tuning data and test sets built, no trainings "
                                            "(CPU figures: bench/results/downstream_cpu.json)")


STAGES: dict[str, Callable[[Recorder], None]] = {
    "gpu_tests": gpu_tests, "train_step": train_step, "dynamic_vs_separate": dynamic_vs_separate,
    "input_pipeline": input_pipeline, "quality_saving": quality_saving,
    "downstream_saving": downstream_saving}
