"""Training start-up and per-rank memory against the shard count: time from process start to the end
of step 2 of ``launch/pretrain.py`` (CPU, the quickstart model) and the peak RSS of its largest process
(a rank), reading 20, 2,000 and 8,000 shards from a local S3 server (moto on 127.0.0.1, as the S3 tests
use), side by side in one run, in three setups (``--modes``): ``1rank``, ``2ranks`` (the ``deepspeed``
launcher, 2 processes over gloo) and ``hosted2`` (2 data ranks hosted by 1 process,
``data.logical_ranks=2``).

The shards hold ``--per-shard`` samples of ``--size`` px JPEGs (default 1,000 a shard, the mission's
shape: ~8M patches in ~8,000 shards) and each folder has the builder's ``manifest.json`` listing every
shard; above ``--real-shards`` shards only the first ``--real-shards`` of each data rank's share exist
as objects (2 steps read a few hundred samples; the loader reads the manifest and opens only a window
of shards ahead of its reader: ``dyntrain/data/pretrain/window.py``). ``--baseline-upto N`` also times,
for the counts up to N (all written), the path that opens every shard (a brace pattern: the folder is
listed and DALI gets every shard and index).

``--late-shards N`` (0: skip) also measures, in this process on a folder of N real shards, what a
window rebuild and a resume cost late in an epoch (both replay the epoch from the share's start):
seconds against the position, and the index files read.

Headline: ``rss_ratio_<largest>_to_<smallest>`` (peak RSS at the largest count over the smallest, 1 rank).

    .venv/bin/python bench/startup.py --json bench/results/startup_cpu.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import chaos_parts
import common


ROOT = Path(__file__).resolve().parents[1]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto.server on a free port of 127.0.0.1 (with the chaos soak's port helpers)."""
    port = chaos_parts._port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chaos_parts._wait_port(port, proc, "moto.server")
    return proc, f"http://127.0.0.1:{port}"


class PeakRss:
    """The highest VmHWM (peak resident set) of a process and its descendants, polled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import psutil

        self.root, self.every_s, self.peaks = psutil.Process(pid), every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poll(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), kb * 1024)
            except (OSError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def stop(self) -> int:
        self.poll()
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0)


def time_to_step2(urls: str, work: Path, env: dict, timeout: float, mode: str = "1rank") -> tuple[float, int]:
    """Seconds from starting ``launch/pretrain.py`` (``mode``: 1rank, 2ranks, hosted2) to its
    'step 2/2' line, and the peak RSS in bytes of its largest process."""
    work.mkdir(parents=True, exist_ok=True)
    script = [str(ROOT / "launch" / "pretrain.py")]
    if mode == "2ranks":
        script = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(chaos_parts._port()), *script]
    cmd = [sys.executable, *script, "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"data.train_urls=['{urls}']", "run.max_steps=2", "run.log_every=1", "checkpoint.dir=null",
           f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=startup",
           "tracking.system_metrics=false"]
    if mode == "hosted2":
        cmd.append("data.logical_ranks=2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    rss = PeakRss(proc.pid)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 2/2" in line:
                elapsed = time.perf_counter() - t0
                proc.wait(timeout=timeout)
                return elapsed, rss.stop()
            if time.perf_counter() - t0 > timeout:
                break
    finally:
        rss.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise SystemExit(f"startup: no 'step 2/2' from launch/pretrain.py ({mode}):\n" + "".join(lines[-30:]))


def loader_start(urls: str) -> float:
    """Seconds to build the pre-training loader in this process (the quickstart's data settings)
    and take 2 batches from it: the start-up without the launcher, the model and DeepSpeed."""
    from dyntrain.config import load_config
    from dyntrain.data.pretrain.degrade import DegradeSpec
    from dyntrain.data.pretrain.pipeline import DaliPretrainLoader

    data = load_config(str(ROOT / "configs" / "quickstart.yaml")).data
    t0 = time.perf_counter()
    loader = DaliPretrainLoader([urls], DegradeSpec.from_config(data), data.micro_batch_size, device="cpu",
                                num_threads=data.num_threads, prefetch=data.prefetch,
                                shuffle_buffer=data.shuffle_buffer, decode=data.decode)
    next(loader), next(loader)
    elapsed = time.perf_counter() - t0
    loader.close()
    return elapsed


def late_epoch(folder: str, shards: int, per_shard: int, fractions: list[float], batch: int) -> list[dict]:
    """A window rebuild and a resume at positions late in an epoch of one rank reading ``folder``
    (``shards`` real shards): seconds, index files fetched and the window's samples, against the
    position."""
    from dyntrain.config import load_config
    from dyntrain.data.pretrain import window
    from dyntrain.data.pretrain.degrade import DegradeSpec
    from dyntrain.data.pretrain.pipeline import DaliPretrainLoader

    data = load_config(str(ROOT / "configs" / "quickstart.yaml")).data
    window.MIN_SHARDS = min(window.MIN_SHARDS, shards)  # the window path whatever the count

    def make() -> DaliPretrainLoader:
        return DaliPretrainLoader([f"{folder}/*.tar"], DegradeSpec.from_config(data), batch, device="cpu",
                                  num_threads=data.num_threads, prefetch=data.prefetch,
                                  shuffle_buffer=data.shuffle_buffer, decode=data.decode)

    share = shards * per_shard
    targets = sorted({max(1, int(f * share) // batch) for f in fractions})
    rows = []
    straight = make()
    try:
        done = 0
        for target in targets:
            while done < target:
                next(straight)
                done += 1
            state = straight.state_dict()
            t0 = time.perf_counter()
            straight._reopen(straight._ckpt, straight.shards[0])   # what a window rebuild does
            next(straight)
            done += 1
            rebuild_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            resumed = make()
            open_s = time.perf_counter() - t0
            try:
                t0 = time.perf_counter()
                resumed.load_state_dict(state)
                next(resumed)
                resume_s = time.perf_counter() - t0
                rows.append({"position": target * batch, "fraction": target * batch / share,
                             "rebuild_s": round(rebuild_s, 2),
                             "resume_s": round(resume_s, 2),
                             "open_s": round(open_s, 2), "resume_index_files": resumed._window.fetched,
                             "window_samples": resumed._window.covered})
            finally:
                resumed.close()
            print(f"  late epoch: position {rows[-1]['position']:>7} ({rows[-1]['fraction']:.0%}): "
                  f"rebuild {rebuild_s:.1f} s, resume {resume_s:.1f} s, "
                  f"{rows[-1]['resume_index_files']} index files read, window {rows[-1]['window_samples']} "
                  f"samples", flush=True)
    finally:
        straight.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="20,2000,8000", help="shard counts, comma-separated")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--real-shards", type=int, default=0,
                   help="above this count, only the first this many shards of each data rank's share exist "
                        "(0: enough for 2,048 samples, over 4x what 2 quickstart steps and the window need)")
    p.add_argument("--size", type=int, default=64, help="patch side in pixels (>= the quickstart crop 48)")
    p.add_argument("--modes", default="1rank,2ranks,hosted2", help="1rank, 2ranks, hosted2, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per count (the median is reported)")
    p.add_argument("--baseline-upto", type=int, default=0,
                   help="also time the every-shard path for counts up to this (0: never; all must be written)")
    p.add_argument("--late-shards", type=int, default=0,
                   help="real shards for the late-epoch rebuild/resume measurement (0: skip)")
    p.add_argument("--late-at", default="0.01,0.5,0.95", help="positions in the epoch, fractions")
    p.add_argument("--late-batch", type=int, default=64, help="micro-batch of the late-epoch loader")
    p.add_argument("--late-local", action="store_true",
                   help="the late-epoch shards in a local folder (a shared filesystem) instead of moto S3, "
                        "whose Python server is the bottleneck when a reader streams 100k samples")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--loader-only", action="store_true",
                   help="time only the loader's start (built in this process, 2 batches), not pretrain.py")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full results here")
    args = p.parse_args()
    counts = [int(c) for c in args.shards.split(",") if c]
    args.real_shards = args.real_shards or -(-2048 // args.per_shard) + 2
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("1rank", "2ranks", "hosted2") for m in modes):
        raise SystemExit(f"--modes: 1rank, 2ranks or hosted2, got {args.modes}")

    moto, endpoint = start_moto()
    env = dict(os.environ, **S3_ENV, AWS_ENDPOINT_URL=endpoint, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    rows, late, written = [], [], {}
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        import boto3

        from dyntrain.data.pretrain import window
        from dyntrain.data.pretrain.many_shards import write_many_shards

        bucket = f"startup-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        for n in counts:
            t0 = time.perf_counter()
            only = None
            if n > args.real_shards and n >= window.MIN_SHARDS:  # the first of each data rank's share
                only = [s for start in (0, n // 2) for s in range(start, min(n, start + args.real_shards))]
            write_many_shards(f"s3://{bucket}/n{n}", n, args.per_shard, size=args.size, seed=n, only=only)
            written[n] = n if only is None else len(set(only))
            print(f"wrote {written[n]} of {n} shards x {args.per_shard} samples in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        for mode in modes:
            for n in counts:
                rows.append({"mode": mode, "shards": n, "samples": n * args.per_shard, "written": written[n],
                             "runs_s": [], "rss_runs_gb": [], "every_shard_runs_s": []})

        def measure(urls: str, work: Path, mode: str) -> tuple[float, int]:
            if args.loader_only:
                return loader_start(urls), 0
            return time_to_step2(urls, work, env, args.timeout, mode)

        with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
            for r in range(args.repeats):  # rounds over the counts: a busy machine slows all alike
                for row in rows:
                    n, mode, folder = row["shards"], row["mode"], f"s3://{bucket}/n{row['shards']}"
                    took, rss = measure(f"{folder}/*.tar", Path(tmp) / f"w{mode}{n}-{r}", mode)
                    row["runs_s"].append(round(took, 2))
                    row["rss_runs_gb"].append(round(rss / 1e9, 3))
                    if n <= args.baseline_upto and written[n] == n:
                        braces = f"{folder}/shard-{{000000..{n - 1:06d}}}.tar"
                        row["every_shard_runs_s"].append(round(measure(braces, Path(tmp) / f"b{mode}{n}-{r}",
                                                                       mode)[0], 2))
                    print(f"  round {r}: {mode:>8} {n:>6} shards {took:.1f} s to "
                          f"{'2 loader batches' if args.loader_only else 'step 2'}, peak RSS {rss / 1e9:.2f} GB"
                          + (f", {row['every_shard_runs_s'][-1]:.1f} s opening every shard"
                             if row["every_shard_runs_s"] else "")
                          + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
        for row in rows:
            row["now_s"] = statistics.median(row["runs_s"])
            row["peak_rss_gb"] = statistics.median(row["rss_runs_gb"])
            if row["every_shard_runs_s"]:
                row["every_shard_s"] = statistics.median(row["every_shard_runs_s"])
        common.write_json(args.json, {"benchmark": "startup", "partial": "before the late-epoch part",
                                      "rows": rows, "loadavg_before": load})
        if args.late_shards:
            t0 = time.perf_counter()
            folder = (str(Path(tempfile.mkdtemp(prefix="startup-late-")) / f"late{args.late_shards}")
                      if args.late_local else f"s3://{bucket}/late{args.late_shards}")
            write_many_shards(folder, args.late_shards, args.per_shard, size=args.size, seed=7)
            print(f"wrote {args.late_shards} shards x {args.per_shard} samples in "
                  f"{time.perf_counter() - t0:.0f} s (late epoch)", flush=True)
            late = late_epoch(folder, args.late_shards, args.per_shard,
                              [float(f) for f in args.late_at.split(",")], args.late_batch)
            if args.late_local:
                shutil.rmtree(Path(folder).parent, ignore_errors=True)
    finally:
        moto.terminate()
        moto.wait()
    load_after = [round(x, 2) for x in os.getloadavg()]

    if not rows:  # --shards "": the late-epoch part only
        common.write_json(args.json, {"benchmark": "startup", "per_shard": args.per_shard,
                                      "late_store": "local folder" if args.late_local else "moto S3",
                                      "loadavg_before": load, "loadavg_after": load_after, "late_epoch": late})
        common.headline("late_resume_s_at_end_of_share", late[-1]["resume_s"] if late else None)
        return 0
    ratios: dict[str, float] = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        small, large = mine[0], mine[-1]
        ratios[f"{mode}_time_{large['shards']}_to_{small['shards']}"] = large["now_s"] / small["now_s"]
        if small["peak_rss_gb"]:
            ratios[f"{mode}_rss_{large['shards']}_to_{small['shards']}"] = large["peak_rss_gb"] / small["peak_rss_gb"]
    first = [r for r in rows if r["mode"] == modes[0]]
    small, large = first[0], first[-1]
    ratio = large["now_s"] / small["now_s"]
    rss_ratio = large["peak_rss_gb"] / small["peak_rss_gb"] if small["peak_rss_gb"] else None
    print()
    print(f"{'mode':>8} {'shards':>8} {'time s':>8} {'peak RSS GB':>12} {'every-shard s':>14}"
          f"   (medians of {args.repeats} rounds; load average {load} before, {load_after} after)")
    for r in rows:
        print(f"{r['mode']:>8} {r['shards']:>8} {r['now_s']:>8.1f} {r['peak_rss_gb']:>12.2f} "
              f"{common.fmt(r.get('every_shard_s'), '.1f'):>14}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    common.write_json(args.json, {
        "benchmark": "startup", "environment": common.environment(common.resolve_device("cpu")),
        "per_shard": args.per_shard, "size": args.size, "repeats": args.repeats, "real_shards": args.real_shards,
        "loadavg_before": load, "loadavg_after": load_after,
        "what": ("seconds to build the loader and take 2 batches, in process" if args.loader_only else
                 "seconds from process start to the end of step 2 and the peak RSS (VmHWM) of the largest "
                 "process, quickstart model, moto S3; modes: 1rank, 2ranks (deepspeed launcher), hosted2 "
                 "(data.logical_ranks=2 on 1 process)"),
        "rows": rows, "ratio": ratio, "rss_ratio": rss_ratio, "ratios": ratios, "late_epoch": late})
    if rss_ratio is None:
        common.headline(f"startup_ratio_{large['shards']}_to_{small['shards']}", ratio)
    else:
        common.headline(f"rss_ratio_{large['shards']}_to_{small['shards']}", rss_ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
