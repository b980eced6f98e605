"""A week of faults in one run: pre-training on 2 CPU ranks from S3 shards (a real moto server behind
``s3_fault_proxy.py``) with a real MLflow server, a seeded schedule of faults injected from outside
the process tree, a supervisor that restarts the job as Slurm's requeue would, and a comparison with
an uninterrupted run of the same config.

    python bench/chaos_soak.py --faults 12 --seed 0 --workdir DIR --json PATH [--steps N]
        [--kinds K1,K2] [--outage-scale F]
    python bench/chaos_soak.py --faults 6 --seeds 0-19 [--jobs 2] --workdir DIR --json PATH

``--seeds`` sweeps: one soak per seed (``DIR/seed-S/``, ``DIR/seed-S.json``, ``DIR/seed-S.log``), ``--jobs``
at a time, a row per seed and ``seeds_identical=K/N`` last (``chaos_sweep.py``).

Fault kinds (cycled in a seeded order, at seeded steps):

    kill9_rank    SIGKILL of one rank (the launcher then ends the job)      -> restart
    ckpt_kill     every rank SIGKILLed inside a checkpoint save, before COMPLETE (the
                  ``tests/rank_entry.py --ckpt-fault`` hook: the one point that cannot be hit
                  from outside by timing)                                    -> restart
    s3_down       the S3 endpoint refuses connections for 20-60 s            -> no restart expected
    s3_503        the S3 endpoint answers 503 SlowDown for 10-30 s           -> no restart expected
    mlflow_down   the MLflow server is killed for 60 s                       -> no restart expected
                  (the three outage lengths times --outage-scale, default 1)
    disk_full     the next checkpoint save meets a full disk: every file DeepSpeed writes stops
                  after 4 KiB with ENOSPC (``tests/rank_entry.py --disk-full FLAG``, switched on
                  from outside by writing FLAG; no root needed); the save fails, ``latest`` keeps
                  naming the previous checkpoint                              -> restart
    resume_1rank  SIGUSR1, then the job resumes on 1 rank (and on 2 again at the next restart)
    sigusr1       SIGUSR1 to every rank, as Slurm's preemption notice       -> restart

Leaves the faulted run's checkpoints in ``DIR/chaos/``, the uninterrupted run's in ``DIR/clean/``,
the MLflow store in ``DIR/mlflow/``, logs in ``DIR/logs/``. The JSON holds ``faults`` (kind, at_step,
restarts, survived), ``weights_identical``, ``draws_identical``, ``metrics_missing``,
``metrics_duplicated``, the checkpoint checks, ``first_difference`` (the first step of any segment,
a killed one's included, whose variant, keys or loss differ from the clean run's trace; None: none),
the GPU-hour account of both runs (``saving_clean``, ``saving_faulted``, ``saving_diff_points``, the
faulted run's ``gpu_hours`` = productive + lost and ``gpu_hours_lost_by_cause``; ``account_ok`` false,
and a ``FLAG`` line, when the saving moved more than 3 points or the identity fails) and the wall
time. Last line: ``faults_survived=K/N``.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import common
from chaos_parts import SAVING_TOLERANCE_POINTS, Services, compare_runs, rank_pids


ROOT = Path(__file__).resolve().parents[1]
KINDS = ("s3_503", "kill9_rank", "s3_down", "ckpt_kill", "mlflow_down", "sigusr1", "disk_full",
         "resume_1rank")
TRANSIENT = {"s3_down", "s3_503", "mlflow_down"}
ENDING = {"kill9_rank", "sigusr1", "resume_1rank"}   # the job ends right after these
EVERY = 4
STEP_RE = re.compile(r"step (\d+)/(\d+)")
LAUNCHED: list[subprocess.Popen] = []   # every job started (each in its own session), killed on the way out


def plan(faults: int, seed: int, steps: int, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """``faults`` faults, every kind in turn (the order shuffled by ``seed``), at distinct steps
    spread over the run (never in the first or last ``EVERY`` steps)."""
    rng = random.Random(seed)
    kinds = list(kinds)
    rng.shuffle(kinds)
    slots = sorted(rng.sample(range(EVERY + 1, steps - EVERY), faults))
    return [{"kind": kinds[i % len(kinds)], "at_step": s, "restarts": 0, "survived": None,
             "duration_s": None} for i, s in enumerate(slots)]


def overrides(args, ckpt: Path, uri: str, experiment: str) -> list[str]:
    o = {"run.max_steps": args.steps, "run.log_every": 1, "run.deterministic": "true", "run.seed": args.seed,
         "model.dim": 8, "model.prompt_dims": "[8,8,16]", "model.prompt_sizes": "[16,8,4]",
         "model.num_refinement": 1, "data.train_urls": "[s3://chaos-soak/pre/*.tar]", "data.crop_size": 32,
         "data.micro_batch_size": 2, "data.num_threads": 1, "data.shuffle_buffer": 4, "data.decode": "cpu",
         "data.io_retry_s": 150, "schedule.verify_every": 0, "optim.lr_schedule": "constant",
         "deepspeed.zero_stage": 2, "deepspeed.bf16": "false", "deepspeed.global_batch_size": 4,
         "tracking.uri": uri, "tracking.experiment": experiment, "tracking.system_metrics": "false",
         "checkpoint.dir": str(ckpt), "checkpoint.every": EVERY, "checkpoint.keep": args.keep,
         "checkpoint.resume": "auto", "checkpoint.overwrite": "false"}
    return [f"{k}={v}" for k, v in o.items()]


def disk_flag(args) -> Path:
    """The file whose presence fills the disk of the job's checkpoint saves (``disk_full``)."""
    return args.workdir / "disk_full.flag"


class Job:
    """One launch of the job (the deepspeed launcher in its own process group)."""

    def __init__(self, args, services: Services, name: str, segment: int, ranks: int,
                 ckpt_fault: int | None = None) -> None:
        self.log = args.workdir / "logs" / f"{name}-{segment:02d}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        entry = [str(ROOT / "tests" / "rank_entry.py"), "--cli", "--trace",
                 str(args.workdir / "trace" / f"{name}-{segment:02d}"), "--disk-full", str(disk_flag(args))]
        if ckpt_fault is not None:
            entry += ["--ckpt-fault", f"before_complete@{ckpt_fault}"]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(services.free_port()), *entry, str(ROOT / "launch" / "pretrain.py"), "--config",
               str(ROOT / "configs" / "quickstart.yaml"),
               *overrides(args, args.workdir / name, services.mlflow_uri, f"chaos-soak-{name}")]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=args.workdir, env=services.env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        LAUNCHED.append(self.proc)

    def step(self) -> int:
        found = STEP_RE.findall(self.log.read_text(errors="replace"))
        return max((int(s) for s, _ in found), default=0)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def signal_ranks(self, sig: int, only_one: bool = False) -> None:
        pids = rank_pids(self.proc.pid)
        for pid in (pids[-1:] if only_one else pids):
            os.kill(pid, sig)


def run_chaos(args, services: Services, faults: list[dict]) -> int:
    """The supervisor: launch, inject the faults due, restart after every exit until the run has
    reached its last step. Returns the number of restarts."""
    restarts, segment, ranks = 0, 0, 2
    pending = list(faults)
    last = None               # the fault blamed for the next exit
    while True:
        # the hook that kills every rank inside the save of the first checkpoint at or after the
        # first pending ckpt_kill (armed in every segment until that fault has happened)
        armed = next((f for f in pending if f["kind"] == "ckpt_kill"), None)
        fault_step = None if armed is None else -(-armed["at_step"] // EVERY) * EVERY
        job = Job(args, services, "chaos", segment, ranks, fault_step)
        deadline = time.monotonic() + args.segment_timeout
        ending = False   # a kill or a signal went in: the next fault waits for the next segment
        try:
            while job.proc.poll() is None and time.monotonic() < deadline:
                if pending and not ending and job.step() >= pending[0]["at_step"]:
                    f = pending.pop(0)
                    injected = inject(f, job, services, args)
                    # the exit is blamed on a fault that ends the job (or fills the disk) before a
                    # transient one injected meanwhile: a transient fault blamed for a restart is lost
                    if last is None or last["kind"] in TRANSIENT:
                        last = injected
                    ending = f["kind"] in ENDING
                    if f["kind"] == "resume_1rank":
                        ranks = 1
                time.sleep(0.2)
            rc = job.wait(5)
        finally:
            if job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
        if armed is not None and "[rank_entry] killing rank" in job.log.read_text(errors="replace"):
            armed["fired_at_save"] = fault_step
            if armed in pending:     # killed in the save before the supervisor saw the step
                pending.remove(armed)
                print(f"chaos: step {fault_step}: ckpt_kill", flush=True)
            last = armed
        disk_flag(args).unlink(missing_ok=True)  # the disk is full for one save only
        reached = job.step() >= args.steps and rc == 0
        if reached:
            return restarts
        restarts += 1
        segment += 1
        if last is not None:
            last["restarts"] += 1
        else:
            print(f"chaos: restart {restarts} with no fault to blame (rc {rc}, log {job.log})", flush=True)
        if ranks == 1 and (last is None or last["kind"] != "resume_1rank"):
            ranks = 2
        last = None
        if restarts > 3 * len(faults) + 3:
            raise SystemExit(f"chaos: gave up after {restarts} restarts (log {job.log})")


def inject(f: dict, job: Job, services: Services, args) -> dict | None:
    """Inject fault ``f`` into the running ``job``; returns the fault to blame if the job exits."""
    kind, rng = f["kind"], random.Random(f["at_step"])
    print(f"chaos: step {job.step()}: {kind}", flush=True)
    if kind == "kill9_rank":
        job.signal_ranks(signal.SIGKILL, only_one=True)
    elif kind in ("sigusr1", "resume_1rank"):
        job.signal_ranks(signal.SIGUSR1)
    elif kind in ("s3_down", "s3_503"):
        seconds = (rng.uniform(20, 60) if kind == "s3_down" else rng.uniform(10, 30)) * args.outage_scale
        services.s3_fault("down" if kind == "s3_down" else "503", seconds)
        f["duration_s"] = round(seconds, 1)
    elif kind == "mlflow_down":
        seconds = 60.0 * args.outage_scale
        services.mlflow_outage(seconds)
        f["duration_s"] = round(seconds, 1)
    elif kind == "disk_full":
        disk_flag(args).write_text(str(job.step()))
    return f


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def account_line(r: dict) -> str:
    """``saving clean 44.43% faulted 44.10% (-0.33 points) | gpu_hours ... lost ... (stall .., ...)``"""
    hours, lost = r["gpu_hours"], r["gpu_hours_lost_by_cause"]
    causes = ", ".join(f"{k} {v:.5f}" for k, v in lost.items() if v is not None)
    fmt = (lambda x: "n/a" if x is None else f"{x:.5f}")
    return (f"account: saving at equal iterations: clean {_pct(r['saving_clean'])}, faulted "
            f"{_pct(r['saving_faulted'])} ({r['saving_diff_points']} points) | gpu_hours {fmt(hours['gpu_hours'])} = productive "
            f"{fmt(hours['gpu_hours_productive'])} + lost {fmt(hours['gpu_hours_lost'])} ({causes}) | "
            f"replayed_steps={r['replayed_steps']} stalled_steps={r['stalled_steps']} account_ok={r['account_ok']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, metavar="A-B",
                        help="sweep: one soak per seed ('0-19', '3,5,10-12'); the other options apply to each")
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: soaks run at the same time")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=0, help="default: 8 per fault, at least 40")
    parser.add_argument("--keep", type=int, default=2, help="checkpoint.keep")
    parser.add_argument("--segment-timeout", type=float, default=1200)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds to draw from")
    parser.add_argument("--outage-scale", type=float, default=1.0,
                        help="multiplies the outage durations (S3 down 20-60 s, 503 10-30 s, MLflow 60 s); "
                             "the CI soak uses 0.25")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.steps = args.steps or max(40, 8 * args.faults)
    if args.faults > args.steps - 2 * EVERY - 1:
        raise SystemExit(f"--steps {args.steps} leaves no room for {args.faults} faults")
    if args.outage_scale <= 0:
        raise SystemExit(f"--outage-scale must be positive, got {args.outage_scale}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the services and the job on the way out
    t0 = time.time()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)} (known: {', '.join(KINDS)})")
    if args.seeds is not None:
        from chaos_sweep import parse_seeds, sweep

        seeds = parse_seeds(args.seeds)
        soak_args = ["--faults", str(args.faults), "--steps", str(args.steps), "--keep", str(args.keep),
                     "--segment-timeout", str(args.segment_timeout), "--kinds", args.kinds,
                     "--outage-scale", str(args.outage_scale)]
        result = sweep(seeds, soak_args, args.workdir, args.jobs)
        common.write_json(args.json, result)
        print(f"seeds_identical={result['seeds_identical']}/{result['seeds_total']}")
        return
    faults = plan(args.faults, args.seed, args.steps, kinds)
    phases = {}                 # where the wall time goes: seconds per phase

    def lap(name: str, since: float) -> float:
        now = time.time()
        phases[name] = round(now - since, 1)
        return now

    with Services(args.workdir) as services:
        try:
            t = lap("services", t0)
            clean = Job(args, services, "clean", 0, 2)
            if clean.wait(args.segment_timeout) != 0:
                raise SystemExit(f"chaos: the uninterrupted run failed (log {clean.log})")
            t = lap("clean_run", t)
            restarts = run_chaos(args, services, faults)
            services.settle()
            t = lap("chaos_run", t)
            result = compare_runs(args, services, faults, restarts)
            lap("compare", t)
        finally:   # stopped (SIGTERM, an error): no job outlives the soak
            for proc in LAUNCHED:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    result.update(benchmark="chaos_soak", seed=args.seed, steps=args.steps, outage_scale=args.outage_scale,
                  phases_s=phases, wall_s=round(time.time() - t0, 1))
    survived = sum(1 for f in faults if f["survived"] is True)
    print(f"{'kind':<13} {'at_step':>7} {'restarts':>8} {'survived':>8}  metrics lost")
    for f in faults:
        print(f"{f['kind']:<13} {f['at_step']:>7} {f['restarts']:>8} {str(f['survived']):>8}  {f['metrics_lost']}")
    for key in ("weights_identical", "draws_identical", "draws_checked", "metrics_missing", "metrics_duplicated",
                "latest_complete", "retention_ok", "restarts", "killed_segments_traced", "first_difference",
                "metrics_synced_after_end",
                "phases_s", "wall_s"):
        print(f"{key}={result[key]}")
    print(account_line(result))
    if not result["account_ok"]:
        print(f"chaos: FLAG: the GPU-hour account moved with the faults (saving "
              f"{result['saving_diff_points']} points from the clean run's, more than {SAVING_TOLERANCE_POINTS:g}, "
              f"or productive + lost != gpu_hours)", flush=True)
    common.write_json(args.json, result)
    print(f"faults_survived={survived}/{len(faults)}")


if __name__ == "__main__":
    main()
