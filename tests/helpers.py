"""Small helpers shared by the tests (imported as ``from helpers import ...``: pytest puts tests/ on
the path)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional


ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
ENTRY = str(ROOT / "tests" / "rank_entry.py")
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (slow time-outs off EC2)
}


def draws(schedule, start: int, count: int) -> list[str]:
    """The variants a schedule draws for steps ``start .. start + count - 1``."""
    return [schedule.variant_at(t) for t in range(start, start + count)]


# ------------------------------------------------------------------------------ starting ranks
# The one way tests start ranks: ``deepspeed_cmd`` (the real launcher), ``rank_env`` (one process per
# rank started by hand, with what a launcher would export) and ``spawn_ranks`` (a function on every
# rank of a spawned world). Every port comes from ``free_port``.

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (MASTER_PORT, test servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(ranks: int, script, *args, port: Optional[int] = None) -> list[str]:
    """The ``deepspeed`` launcher's command line: ``ranks`` local ranks of ``script`` with ``args``
    (a free MASTER_PORT unless ``port``). The caller sets the environment (DS_ACCELERATOR=cpu ...)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port or free_port()), str(script), *map(str, args)]


def rank_env(rank: int, world_size: int, port: int, base: Optional[dict] = None, **extra: str) -> dict:
    """The environment of rank ``rank`` of a one-node world started by hand: the env:// variables a
    launcher exports, gloo on CPU, one thread, the repository on PYTHONPATH; ``base`` (default: this
    process's environment) underneath, ``extra`` on top."""
    env = dict(os.environ if base is None else base)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
               WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def spawn_ranks(fn: Callable, world_size: int, *args, timeout: Optional[float] = None) -> list[int]:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes (``torch.multiprocessing``'s
    ``start_processes``, start method spawn) and wait for all of them, as ``join=True`` does: a rank
    that raises or dies makes this raise (the others are ended). ``timeout``: seconds after which the
    ranks still running are killed and this raises. Returns the exit codes (all 0)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
        if deadline is not None and time.monotonic() >= deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            for p in context.processes:
                p.join()
            raise AssertionError(f"{getattr(fn, '__name__', fn)}: ranks still running after {timeout} s")
    return [p.exitcode for p in context.processes]


# ------------------------------------------------------------------ runs with faults from outside
# A tiny pre-training run started as a process of its own (``rank_entry.py --cli``: one ``error:``
# line, a trace), its output in a log file, held at a step boundary with ``--pause-at STEP@FILE``
# while a fault is set up from outside (tests/test_failures.py, tests/test_transient_faults.py).

def run_env(**extra: str) -> dict:
    """This environment for one CPU rank, without a launcher's or tracking's variables (unless in
    ``extra``)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
              "DYNTRAIN_TRACEBACK"):
        if k not in extra:
            env.pop(k, None)
    return env


def tiny_overrides(base: Path, urls: str, ckpt: Path, **kw) -> list[str]:
    """A tiny pre-training run (dim 8, 32 px crops, batches of 2, fp32, deterministic)."""
    o = {"run.max_steps": 4, "run.log_every": 2, "run.deterministic": "true", "run.seed": 3,
         "model.dim": 8, "model.prompt_dims": "[8,8,16]", "model.prompt_sizes": "[16,8,4]",
         "model.num_refinement": 1, "data.train_urls": f"[{urls}]", "data.crop_size": 32,
         "data.micro_batch_size": 2, "data.num_threads": 1, "data.shuffle_buffer": 4,
         "data.decode": "cpu", "schedule.verify_every": 0, "optim.lr_schedule": "constant",
         "deepspeed.zero_stage": 2, "deepspeed.bf16": "false", "tracking.enabled": "false",
         "checkpoint.dir": str(ckpt), "checkpoint.every": 2, "checkpoint.resume": "auto",
         "checkpoint.overwrite": "false"}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def error_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("error: ")]


def start_logged(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """A run whose stdout and stderr go to ``log`` (a pipe nobody reads could fill and block it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish_logged(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for a run started by ``start_logged``; returns its log. A run that overstays is killed (a
    hang must not outlive the test)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[:4]} still running after {timeout} s:\n"
                             f"{proc.log.read_text()[-3000:]}") from None
    return proc.log.read_text()


def wait_paused(proc: subprocess.Popen, go: Path, timeout: float = 600) -> None:
    """Wait until a run started with ``--pause-at STEP@go`` holds at its step (``go.waiting``
    exists). A run that ends or overstays first is killed and this raises with its log."""
    deadline = time.monotonic() + timeout
    while not Path(f"{go}.waiting").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise AssertionError(f"the run never paused ({go.name}): {proc.log.read_text()[-3000:]}")
        time.sleep(0.1)


def rank0_trace(folder: Path) -> dict:
    return json.loads((folder / "trace_rank0.json").read_text())


def upload_shards(folder: Path, bucket: str, endpoint: str) -> None:
    """Every file of ``folder`` to ``s3://bucket/pre/`` on the S3 server at ``endpoint``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                      region_name=S3_ENV["AWS_REGION"])
    s3.create_bucket(Bucket=bucket)
    for p in sorted(folder.iterdir()):
        s3.upload_file(str(p), bucket, f"pre/{p.name}")


# ------------------------------------------------------------------------- fine-tuning loaders
def same_batch(got: dict, want: dict) -> None:
    """Two loader batches are the same: sample keys, input and target tensors."""
    import torch

    assert got["keys"] == want["keys"]
    assert torch.equal(got["input"], want["input"]) and torch.equal(got["target"], want["target"])


def assert_resumes_exactly(make_loader: Callable, straight: list, before: int,
                           same: Callable[[dict, dict], None] = same_batch,
                           samples: Optional[int] = None) -> dict:
    """Exact resume of a loader: ``straight`` holds the batches of an uninterrupted run of
    ``make_loader()``. A fresh loader takes ``before`` batches and gives its ``state_dict``; another
    fresh loader loads it and must give ``straight[before:]`` next (``same(got, want)`` asserts, by
    default ``same_batch``); ``samples``: what its ``stats()["samples"]`` says afterwards. Both loaders
    are closed; returns the state."""
    interrupted = make_loader()
    try:
        for _ in range(before):
            next(interrupted)
        state = interrupted.state_dict()
    finally:
        interrupted.close()
    resumed = make_loader()
    try:
        resumed.load_state_dict(state)
        for want in straight[before:]:
            same(next(resumed), want)
        if samples is not None:
            assert resumed.stats()["samples"] == samples
    finally:
        resumed.close()
    return state


SAVING_BASES = ("at equal iterations", "at equal validation quality", "at equal fine-tuned quality")


def unlabelled_savings(text: str) -> list[str]:
    """Lines of ``text`` that print a saving ("saved 49.1%", "iso_quality_saving=0.2 ...") without
    naming its basis (``dyntrain.tracking.savings``)."""
    import re

    shows = re.compile(r"\bsaved -?\d|\bsaving[ =]+-?\d", re.I)
    return [line for line in text.splitlines() if shows.search(line) and not any(b in line for b in SAVING_BASES)]


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """A WebDataset shard as {key: {component: payload}}."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out
