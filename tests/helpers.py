"""Small helpers shared by the tests (imported as ``from helpers import ...``: pytest puts tests/ on
the path)."""
from __future__ import annotations

import os
import socket
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional


ROOT = Path(__file__).resolve().parents[1]


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
