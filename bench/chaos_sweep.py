"""The chaos soak over many seeds (``chaos_soak.py --seeds A-B``): one soak per seed, each in its own
process, work folder and services, ``--jobs`` at a time; one row per seed and the total.

A seed passes when every fault was survived (``faults_survived=N/N``: weights identical to the clean
run, every draw identical, no metric lost or duplicated, no restart for a transient fault) and,
the GPU-hour account holds (``account_ok``: productive + lost = total, and the faulted run's saving at
equal iterations within ``SAVING_TOLERANCE_POINTS`` of the clean run's). Last line: ``seeds_identical=K/N``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from chaos_parts import SAVING_TOLERANCE_POINTS

ROOT = Path(__file__).resolve().parents[1]
_RUNNING: list[subprocess.Popen] = []   # the soaks started, stopped with the sweep


def parse_seeds(text: str) -> list[int]:
    """``"3"``, ``"0-19"``, ``"3,5,10-12"`` -> the seeds in the order given, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise SystemExit(f"--seeds: {part.strip()!r} is not a seed or a range A-B in {text!r}") from None
        if a < 0 or b < a:
            raise SystemExit(f"--seeds: {part.strip()!r} is not a range A-B with 0 <= A <= B")
        seeds += [s for s in range(a, b + 1) if s not in seeds]
    return seeds


def saving_points(result: dict[str, Any]) -> Optional[float]:
    """The faulted saving minus the clean one, in percentage points (None: not reported)."""
    return result.get("saving_diff_points")


def verdict(result: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether one seed's soak passed, and what failed (empty when it passed)."""
    why = []
    faults = result.get("faults") or []
    survived = sum(1 for f in faults if f.get("survived") is True)
    if not faults or survived != len(faults):
        why.append(f"faults_survived={survived}/{len(faults)}")
    if not result.get("weights_identical"):
        why.append("weights differ")
    if not result.get("draws_identical"):
        why.append("draws differ")
    if result.get("metrics_missing") or result.get("metrics_duplicated"):
        why.append(f"metrics missing {result.get('metrics_missing')} duplicated {result.get('metrics_duplicated')}")
    if result.get("first_difference") is not None:
        why.append(f"first difference at step {result['first_difference'].get('step')}")
    points = saving_points(result)
    if points is None or abs(points) > SAVING_TOLERANCE_POINTS:
        why.append("no saving reported" if points is None else f"saving moved {points:+.1f} points")
    elif not result.get("account_identity_ok", True):
        why.append("gpu_hours != productive + lost")
    return not why, why


def _one(seed: int, soak_args: list[str], workdir: Path) -> dict[str, Any]:
    """One seed's soak in its own process; its JSON (or why there is none)."""
    out = workdir / f"seed-{seed}.json"
    log = workdir / f"seed-{seed}.log"
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "chaos_soak.py"), *soak_args, "--seed",
                                 str(seed), "--workdir", str(workdir / f"seed-{seed}"), "--json", str(out)],
                                stdout=f, stderr=subprocess.STDOUT)
        _RUNNING.append(proc)
        rc = proc.wait()
    if rc != 0 or not out.exists():
        return {"seed": seed, "error": f"exit code {rc} (log {log})", "wall_s": round(time.time() - t0, 1)}
    return json.loads(out.read_text())


def sweep(seeds: list[int], soak_args: list[str], workdir: Path, jobs: int) -> dict[str, Any]:
    """Run the soak for every seed (``jobs`` at a time), print a row per seed as it ends and the total."""
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'seed':>4} {'ok':<4} {'survived':>8} {'weights':<9} {'lost':>4} {'dup':>3} {'restarts':>8} "
          f"{'saving clean':>12} {'faulted':>8} {'points':>6} {'wall_s':>7}  faults / what failed", flush=True)
    rows = []
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        for result in pool.map(lambda s: _one(s, soak_args, workdir), seeds):
            rows.append(_row(result))
    finally:   # stopped (SIGTERM, Ctrl-C): each running soak stops its services and its job
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in _RUNNING:
            if proc.poll() is None:
                proc.terminate()
        for proc in _RUNNING:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    passed = sum(r["ok"] for r in rows)
    return {"benchmark": "chaos_sweep", "seeds": seeds, "soak_args": soak_args, "jobs": jobs, "rows": rows,
            "seeds_identical": passed, "seeds_total": len(rows),
            "seeds_failed": [r["seed"] for r in rows if not r["ok"]]}


def _row(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        row = {"seed": result["seed"], "ok": False, "why": [result["error"]], "wall_s": result["wall_s"]}
        print(f"{row['seed']:>4} {'FAIL':<4} {'-':>8} {'-':<9} {'-':>4} {'-':>3} {'-':>8} {'-':>12} {'-':>8} "
              f"{'-':>6} {row['wall_s']:>7}  {result['error']}", flush=True)
        return row
    ok, why = verdict(result)
    faults = result.get("faults") or []
    row = {"seed": result.get("seed"), "ok": ok, "why": why,
           "faults": [f"{f['kind']}@{f['at_step']}" for f in faults],
           "survived": sum(1 for f in faults if f.get("survived") is True), "n_faults": len(faults),
           "weights_identical": bool(result.get("weights_identical")),
           "metrics_missing": result.get("metrics_missing"), "metrics_duplicated": result.get("metrics_duplicated"),
           "restarts": result.get("restarts"),
           "saving_clean": result.get("saving_clean"), "saving_chaos": result.get("saving_faulted"),
           "saving_points": saving_points(result), "first_difference": result.get("first_difference"),
           "wall_s": result.get("wall_s")}

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    points = "-" if row["saving_points"] is None else f"{row['saving_points']:+.1f}"
    print(f"{row['seed']:>4} {'ok' if ok else 'FAIL':<4} {row['survived']:>4}/{row['n_faults']:<3} "
          f"{'same' if row['weights_identical'] else 'DIFFER':<9} {row['metrics_missing']:>4} "
          f"{row['metrics_duplicated']:>3} {row['restarts']:>8} {pct(row['saving_clean']):>12} "
          f"{pct(row['saving_chaos']):>8} {points:>6} {row['wall_s']:>7}  "
          f"{' '.join(row['faults'])}{'  <- ' + '; '.join(why) if why else ''}", flush=True)
    return row
