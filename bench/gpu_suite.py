"""The prepared GPU suite: every GPU figure the project owes, in one run of at most 8 minutes.

    bash bench/gpu_suite.sh OUTDIR [--dry-run] [--budget-s 480] [--only STAGE,STAGE]
    python bench/gpu_suite.py OUTDIR ...                 # the same without the wheel installation

Stages, in order, each in its own process with a wall-clock budget (a stage that runs out is
stopped and keeps what it measured; the suite goes on), each skipped with a reason when a package
it needs is not installed:

  0  environment         device, driver, CUDA, torch, DeepSpeed and DALI versions; ``pytest -m gpu``
     gpu_tests
  1  train_step          S and L at 128x128, batch 32: fp32 eager vs bf16 + channels-last +
                         compiled blocks, plus whole-model compile and CUDA graphs on L
  2  dynamic_vs_separate GPU hours of dynamic S/L vs separate runs through DeepSpeed, ZeRO 2, 0, 1
  3  input_pipeline      DALI ``mixed`` decode images/s; input wait of the Trainer fed by DALI
  4  quality_saving      the iso-quality saving benchmark, once ``bench/quality_saving.py`` exists
  5  downstream_saving   the smallest version of ``bench/downstream_saving.py`` (one seed, paper)

Writes OUTDIR/gpu_suite.json (rewritten after every stage; a figure not measured is null with its
reason under ``skipped``), OUTDIR/gpu_suite.md (a summary for bench/RESULTS.md) and
OUTDIR/gpu_suite.log. ``--dry-run`` runs every stage on the CPU at tiny sizes (CI).
See bench/GPU_SUITE.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

from dyntrain.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("gpu_suite")

# stage -> (number, budget on a GPU, budget in the dry run (seconds), the headline figures it fills)
STAGES: dict[str, tuple[int, float, float, tuple[str, ...]]] = {
    "gpu_tests": (0, 60, 40, ()),
    "train_step": (1, 160, 40, ("mfu_L", "mfu_S", "step_ms_L", "step_ms_S",
                                "speedup_L_vs_fp32_eager", "compile_s")),
    "dynamic_vs_separate": (2, 170, 45, ("gpu_hours_saved_frac", "switch_penalty_s",
                                         "zero_stage_step_ms")),
    "input_pipeline": (3, 70, 40, ("dali_images_per_s", "input_wait_frac")),
    "quality_saving": (4, 0, 0, ()),  # what is left after stage 5's share
    "downstream_saving": (5, 110, 25, ()),
}
# stage -> (module, package) pairs it cannot run without
NEEDS = {"gpu_tests": [("pytest", "pytest")],
         "dynamic_vs_separate": [("deepspeed", "deepspeed"), ("yaml", "pyyaml")],
         "input_pipeline": [("nvidia.dali", "nvidia-dali")]}
HEADLINE = ("device", "driver", "versions", "mfu_L", "mfu_S", "step_ms_L", "step_ms_S",
            "speedup_L_vs_fp32_eager", "gpu_hours_saved_frac", "switch_penalty_s",
            "zero_stage_step_ms", "input_wait_frac", "dali_images_per_s", "compile_s")
DISTRIBUTIONS = {"torch": ["torch"], "deepspeed": ["deepspeed"],
                 "nvidia-dali": ["nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"],
                 "pytest": ["pytest"], "pyyaml": ["PyYAML", "pyyaml"], "einops": ["einops"],
                 "numpy": ["numpy"], "mlflow": ["mlflow"], "webdataset": ["webdataset"],
                 "boto3": ["boto3"]}
MODULES = {"torch": "torch", "deepspeed": "deepspeed", "nvidia-dali": "nvidia.dali",
           "pytest": "pytest", "pyyaml": "yaml", "einops": "einops", "numpy": "numpy",
           "mlflow": "mlflow", "webdataset": "webdataset", "boto3": "boto3"}


def installed(module: str) -> bool:
    """Whether ``module`` can be found (without importing it; an import blocker counts)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> dict[str, Optional[str]]:
    """Versions of the packages the stages use (None = not installed), CUDA, cuDNN and Python."""
    import torch

    found: dict[str, Optional[str]] = {}
    for package, dists in DISTRIBUTIONS.items():
        found[package] = None
        if not installed(MODULES[package]):
            continue
        for dist in dists:
            try:
                found[package] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**found, "cuda": torch.version.cuda, "cudnn": cudnn and str(cudnn),
            "python": sys.version.split()[0]}


def driver_version() -> tuple[Optional[str], str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0], ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0], ""
    except (OSError, IndexError):
        return None, "no NVIDIA driver found (nvidia-smi, /proc/driver/nvidia/version)"


class Suite:
    """The suite's JSON, Markdown and log in OUTDIR; the stages run as child processes."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, only: Optional[set[str]]):
        self.out, self.dry_run, self.only = out, dry_run, only
        self.start = time.time()
        self.end = self.start + budget_s
        (out / "stages").mkdir(parents=True, exist_ok=True)
        self.result: dict[str, Any] = {
            "suite": "gpu_suite", "dry_run": dry_run, "started": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"), "budget_s": budget_s,
            **{key: None for key in HEADLINE}, "skipped": {}, "stages": {}}

    # ---------------------------------------------------------------------------- writing
    def write(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.start, 1)
        for path, text in ((self.out / "gpu_suite.json",
                            json.dumps(self.result, indent=2, default=str) + "\n"),
                           (self.out / "gpu_suite.md", markdown(self.result))):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def skip(self, key: str, reason: str) -> None:
        self.result["skipped"][key] = reason

    # ------------------------------------------------------------------------------ stages
    def environment(self) -> None:
        import torch

        import common

        gpu = torch.cuda.is_available() and not self.dry_run
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        self.result["device"] = common.device_name(device)
        self.result["versions"] = versions()
        driver, why = driver_version()
        self.result["driver"] = driver
        if driver is None:
            self.skip("driver", why)
        log.info(f"device {self.result['device']}, driver {driver}, versions "
                 f"{self.result['versions']}")
        self.write()

    def run_stage(self, name: str) -> None:
        number, gpu_budget, dry_budget, figures = STAGES[name]
        entry: dict[str, Any] = {"number": number, "status": "pending"}
        self.result["stages"][name] = entry
        reason = self._reason_not_to_run(name)
        if reason is None:
            later = sum((s[2] if self.dry_run else s[1]) for n, s in STAGES.items()
                        if s[0] > number and self._selected(n))
            deadline = self.end - later
            entry["budget_s"] = round(deadline - time.time(), 1)
            if deadline - time.time() < 5:
                reason = "out of time"
        if reason is not None:
            entry["status"] = f"skipped: {reason}"
            self.skip(name, reason)
            for key in figures:
                self.skip(key, f"stage {name} skipped: {reason}")
            log.info(f"stage {number} {name}: skipped: {reason}")
            self.write()
            return
        log.info(f"stage {number} {name}: started, {entry['budget_s']:.0f} s")
        stage_file = self.out / "stages" / f"{name}.json"
        stage_file.unlink(missing_ok=True)  # nothing left from an earlier suite
        entry["status"], entry["wall_s"] = self._child(name, deadline)
        data = json.loads(stage_file.read_text()) if stage_file.exists() else {}
        for key, value in data.get("figures", {}).items():
            self.result[key] = value
        self.result["skipped"].update(data.get("skipped", {}))
        entry["details"] = data.get("details", {})
        for key in figures:
            if self.result.get(key) is None and key not in self.result["skipped"]:
                self.skip(key, f"not measured by stage {name} ({entry['status']}; see its "
                               "entries in skipped and its log)")
        log.info(f"stage {number} {name}: {entry['status']} in {entry['wall_s']:.1f} s")
        self.write()

    def _selected(self, name: str) -> bool:
        return self.only is None or name in self.only

    def _reason_not_to_run(self, name: str) -> Optional[str]:
        if not self._selected(name):
            return "not selected (--only)"
        for module, package in NEEDS.get(name, []):
            if not installed(module):
                return f"{package} not installed"
        return None

    def _child(self, name: str, deadline: float) -> tuple[str, float]:
        """Run one stage in a process group of its own; stop it (and what it started) a little
        after its deadline. Its output goes to the log."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH)]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
        if self.dry_run:
            env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
            env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"  # a stopped stage leaves its output in the log
        cmd = [sys.executable, str(Path(__file__).resolve()), str(self.out), "--stage", name,
               "--deadline", f"{deadline:.3f}"] + (["--dry-run"] if self.dry_run else [])
        start = time.time()
        with open(self.out / "gpu_suite.log", "a") as logfile:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logfile,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time() + 5))
            except subprocess.TimeoutExpired:
                # SIGTERM first: the stage exits through its finally blocks (a JIT build's lock
                # file, e.g. DeepSpeed's CPU comm op, would otherwise stay and block later runs)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return "timed out (stopped at its deadline)", time.time() - start
        return ("done" if rc == 0 else f"failed (exit code {rc})"), time.time() - start


def markdown(r: dict[str, Any]) -> str:
    """The summary to paste into bench/RESULTS.md."""
    def num(value: Any, spec: str = ".2f") -> str:
        return "n/a" if not isinstance(value, (int, float)) else format(value, spec)

    v = r.get("versions") or {}
    lines = [f"## GPU suite, {r['started'][:10]}{' (dry run on the CPU)' if r['dry_run'] else ''}",
             "", f"Device: {r['device']}; driver {r['driver'] or 'n/a'}; torch {v.get('torch')}, "
             f"CUDA {v.get('cuda')}, DeepSpeed {v.get('deepspeed') or 'not installed'}, DALI "
             f"{v.get('nvidia-dali') or 'not installed'}; {r.get('elapsed_s')} s in all.", "",
             "| figure | value |", "|---|---|"]
    rows = [("L step, optimised (ms)", num(r["step_ms_L"])),
            ("S step, optimised (ms)", num(r["step_ms_S"])),
            ("MFU L / S (attention products counted)", f"{num(r['mfu_L'], '.1%')} / "
                                                       f"{num(r['mfu_S'], '.1%')}"),
            ("speed-up of L over fp32 eager", num(r["speedup_L_vs_fp32_eager"]) + "x"),
            ("compile time of the optimised recipe (s)", num(r["compile_s"], ".1f")),
            ("GPU hours saved at equal iterations, dynamic vs separate (ZeRO 2)",
             num(r["gpu_hours_saved_frac"], ".1%")),
            ("switch penalty (s per switched step)", num(r["switch_penalty_s"], "+.4f")),
            ("DALI decode + crop (images/s)", num(r["dali_images_per_s"], ".0f")),
            ("input wait, Trainer fed by DALI", num(r["input_wait_frac"], ".2%"))]
    lines += [f"| {name} | {value} |" for name, value in rows]
    alternatives = r.get("alternatives") or {}
    if alternatives:
        lines += ["", "| alternative recipe | variant | step ms | vs optimised | compile s |",
                  "|---|---|---|---|---|"]
        for name, a in alternatives.items():
            v = a["variant"]
            lines.append(f"| {name} | {v} | {num(a[f'step_ms_{v}'])} | "
                         f"{num(a[f'speedup_{v}_vs_optimised'])}x | {num(a['compile_s'], '.1f')} |")
    zero = r.get("zero_stage_step_ms") or {}
    if zero:
        lines += ["", "| ZeRO | S ms | L ms | dynamic ms |", "|---|---|---|---|"]
        lines += [f"| {z} | {num(s.get('S'))} | {num(s.get('L'))} | {num(s.get('dynamic'))} |"
                  for z, s in sorted(zero.items())]
    tests = r.get("gpu_tests")
    if isinstance(tests, dict):
        lines += ["", f"GPU tests: {tests.get('summary')}"]
    if r["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- `{k}`: {why}" for k, why in r["skipped"].items()]
    return "\n".join(lines) + "\n"


def run_child(out: Path, name: str, deadline: float, dry_run: bool) -> int:
    import gpu_stages

    setup_logging(stream=sys.stdout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: unwind, then exit
    rec = gpu_stages.Recorder(out / "stages" / f"{name}.json", deadline, dry_run)
    rec.flush()
    try:
        gpu_stages.STAGES[name](rec)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        rec.skip(name, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        return 1
    rec.data["done"] = True
    rec.flush()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU at tiny sizes (a few minutes on 2 cores)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole suite's wall-clock budget (default 480, dry run 170)")
    parser.add_argument("--only", default=None, help="comma-separated stages to run")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.outdir).resolve()
    if args.stage:
        return run_child(out, args.stage, args.deadline, args.dry_run)

    only = None if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sorted((only or set()) - set(STAGES))
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {unknown}; stages: {list(STAGES)}")
    budget = args.budget_s if args.budget_s is not None else (170.0 if args.dry_run else 480.0)
    suite = Suite(out, args.dry_run, budget, only)
    setup_logging()
    handler = logging.FileHandler(out / "gpu_suite.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s gpu_suite] %(message)s", "%H:%M:%S"))
    logging.getLogger("dyntrain").addHandler(handler)
    log.info(f"GPU suite into {out}{' (dry run)' if args.dry_run else ''}, budget {budget:.0f} s")
    suite.environment()
    for name in STAGES:
        suite.run_stage(name)
    print(markdown(suite.result), end="")
    print(f"wrote {out / 'gpu_suite.json'} in {time.time() - suite.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
