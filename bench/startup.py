"""Training start-up against the shard count: time from process start to the end of step 2 of
``launch/pretrain.py`` (1 rank, CPU, the quickstart model) reading 20, 2,000 and 8,000 shards from a
local S3 server (moto on 127.0.0.1, as the S3 tests use), side by side in one run.

The shards are small (``--per-shard`` samples of ``--size`` px JPEGs each, so that 8,000 of them are
written in a couple of minutes) and each folder has the builder's ``manifest.json``. The loader
reads the shard list from it and opens a window of shards ahead of its reader
(``dyntrain/data/pretrain/window.py``). ``--baseline-upto N`` also times, for the counts up to N,
the path that opens every shard (the shards named one by one with a brace pattern, which lists the
folder and gives DALI every shard and index, as before the window).

Headline: ``startup_ratio_8000_to_20`` (the start-up at the largest count over the smallest).

    .venv/bin/python bench/startup.py --json bench/results/startup_cpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
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


def time_to_step2(urls: str, work: Path, env: dict, timeout: float) -> float:
    """Seconds from starting ``launch/pretrain.py`` to its 'step 2/2' line."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"data.train_urls=['{urls}']", "run.max_steps=2", "run.log_every=1", "checkpoint.dir=null",
           f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=startup",
           "tracking.system_metrics=false"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 2/2" in line:
                elapsed = time.perf_counter() - t0
                proc.wait(timeout=timeout)
                return elapsed
            if time.perf_counter() - t0 > timeout:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise SystemExit("startup: no 'step 2/2' from launch/pretrain.py:\n" + "".join(lines[-30:]))


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="20,2000,8000", help="shard counts, comma-separated")
    p.add_argument("--per-shard", type=int, default=4, help="samples per shard")
    p.add_argument("--size", type=int, default=64, help="patch side in pixels (>= the quickstart crop 48)")
    p.add_argument("--repeats", type=int, default=2, help="runs per count (the median is reported)")
    p.add_argument("--baseline-upto", type=int, default=2000,
                   help="also time the every-shard path for counts up to this (0: never)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--loader-only", action="store_true",
                   help="time only the loader's start (built in this process, 2 batches), not pretrain.py")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full results here")
    args = p.parse_args()
    counts = [int(c) for c in args.shards.split(",")]

    moto, endpoint = start_moto()
    env = dict(os.environ, **S3_ENV, AWS_ENDPOINT_URL=endpoint, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    rows = []
    try:
        import boto3

        from dyntrain.data.pretrain.many_shards import write_many_shards

        bucket = f"startup-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        for n in counts:
            t0 = time.perf_counter()
            write_many_shards(f"s3://{bucket}/n{n}", n, args.per_shard, size=args.size, seed=n)
            rows.append({"shards": n, "samples": n * args.per_shard, "write_s": round(time.perf_counter() - t0, 1),
                         "runs_s": [], "every_shard_runs_s": []})
            print(f"wrote {n} shards x {args.per_shard} samples in {rows[-1]['write_s']:.0f} s", flush=True)
        def measure(urls: str, work: Path) -> float:
            return loader_start(urls) if args.loader_only else time_to_step2(urls, work, env, args.timeout)

        with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
            for r in range(args.repeats):  # rounds over the counts: a busy machine slows all alike
                for row in rows:
                    n, folder = row["shards"], f"s3://{bucket}/n{row['shards']}"
                    row["runs_s"].append(round(measure(f"{folder}/*.tar", Path(tmp) / f"w{n}-{r}"), 2))
                    if n <= args.baseline_upto:
                        braces = f"{folder}/shard-{{000000..{n - 1:06d}}}.tar"
                        row["every_shard_runs_s"].append(round(measure(braces, Path(tmp) / f"b{n}-{r}"), 2))
                    print(f"  round {r}: {n:>6} shards {row['runs_s'][-1]:.1f} s to "
                          f"{'2 loader batches' if args.loader_only else 'step 2'}"
                          + (f", {row['every_shard_runs_s'][-1]:.1f} s opening every shard"
                             if row["every_shard_runs_s"] else ""), flush=True)
        for row in rows:
            row["now_s"] = statistics.median(row["runs_s"])
            if row["every_shard_runs_s"]:
                row["every_shard_s"] = statistics.median(row["every_shard_runs_s"])
    finally:
        moto.terminate()
        moto.wait()

    small, large = rows[0], rows[-1]
    ratio = large["now_s"] / small["now_s"]
    print()
    print(f"{'shards':>8} {'now s':>10} {'every-shard s':>14}   (medians of {args.repeats} rounds)")
    for r in rows:
        print(f"{r['shards']:>8} {r['now_s']:>10.1f} {common.fmt(r.get('every_shard_s'), '.1f'):>14}")
    print(f"start-up at {large['shards']} shards / at {small['shards']}: {ratio:.2f}x (target <= 1.3x)")
    common.write_json(args.json, {
        "benchmark": "startup", "environment": common.environment(common.resolve_device("cpu")),
        "per_shard": args.per_shard, "size": args.size, "repeats": args.repeats,
        "what": ("seconds to build the loader and take 2 batches, in process" if args.loader_only else
                 "seconds from process start to the end of step 2, 1 rank, quickstart model, moto S3"),
        "rows": rows, "ratio": ratio})
    common.headline(f"startup_ratio_{large['shards']}_to_{small['shards']}", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
