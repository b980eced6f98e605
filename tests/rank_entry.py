"""Rank entry point for subprocess tests that need a trace or a fault: runs a real launch script
(``launch/pretrain.py``, ``launch/finetune.py``) with test hooks added to its ``run_training`` call.

    deepspeed --num_gpus 2 tests/rank_entry.py [--trace DIR] [--ckpt-fault before_complete@STEP]
        [--disk-full FLAG] [--corrupt-draw RANK@STEP] launch/pretrain.py --config C [dotted.key=value ...]
    python tests/rank_entry.py --trace DIR launch/finetune.py --config C [...]   # one process

The launch script's own ``main`` parses its arguments and builds the run exactly as for a user; the
only difference is that ``dyntrain.train.run.run_training`` receives the extension-point arguments below
in addition to the job's own (nothing under dyntrain/ or launch/ knows about tests):

    --trace DIR          ``trace_dir``: ``Trainer.enable_trace(DIR)`` on every rank (variant, loss,
                         sample keys per step; SHA-256 of the final fp32 weights)
    --ckpt-fault before_complete@STEP
                         ``checkpoint_factory``: the manager's ``before_commit`` SIGKILLs every rank
                         in the save of STEP, after DeepSpeed wrote its files and before COMPLETE
    --disk-full FLAG     ``checkpoint_factory``: while the file FLAG exists (written from outside),
                         every checkpoint file DeepSpeed writes stops after 4 KiB with ENOSPC, as
                         on a full disk (the real writer's error path, without root)
    --corrupt-draw RANK@STEP
                         ``schedule_hook``: rank RANK draws the next variant (sorted order) from
                         STEP on, so that the cross-rank check (``schedule.verify_every``) must fail
    --replay-batch DATA_RANK@ITERATION
                         ``loader_factory``: data rank DATA_RANK's reader takes batch ITERATION through
                         its failure path (``recovery.CorruptRecovery._recover``: as if DALI's run of
                         it failed, the batch is replayed from the last good DALI checkpoint), also
                         when the process hosts that reader beside others
    --pause-at STEP@FILE ``callbacks``: after step STEP every rank writes FILE.waiting and waits
                         (at most 300 s) until FILE exists, so that a test can break something
                         (stop the S3 server) at a known point of the run
    --cli                run the script's ``main`` through ``dyntrain.errors.cli_main``, as its
                         ``__main__`` block does (one ``error:`` line and status 2 for the project's
                         errors); without it the project's errors keep their traceback

The hook builders are importable for entry points that call ``run_training`` themselves
(``tests/test_engine_multirank.py``).
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dyntrain.train.callbacks import CallbackBase, StepContext  # noqa: E402
from dyntrain.train.schedule import VariantSchedule  # noqa: E402


# ------------------------------------------------------------------------------------- hooks


class CorruptedSchedule(VariantSchedule):
    """The schedule of ``base`` except that from step ``start`` on it draws the next variant in
    sorted order (same ``describe()``, so a checkpoint sees no change)."""

    def __init__(self, base: VariantSchedule, start: int) -> None:
        self.__dict__.update(base.__dict__)
        self._corrupt_from = start

    def variant_at(self, step: int) -> str:
        name = super().variant_at(step)
        if step < self._corrupt_from or len(self.names) < 2:
            return name
        return self.names[(self.names.index(name) + 1) % len(self.names)]


def corrupt_draw(target_rank: Optional[int], start: int = 0) -> Callable:
    """``schedule_hook``: rank ``target_rank`` (None: no rank) gets a ``CorruptedSchedule``."""

    def hook(schedule: VariantSchedule, rank: int) -> VariantSchedule:
        if target_rank is None or rank != target_rank:
            return schedule
        return CorruptedSchedule(schedule, start)

    return hook


def kill_before_complete(step: int) -> Callable[[int, Path], None]:
    """``before_commit`` callback: SIGKILL this rank in the save of ``step``."""

    def before_commit(saved_step: int, tag_dir: Path) -> None:
        if saved_step == step:
            print(f"[rank_entry] killing rank {os.environ.get('RANK', '0')} (pid {os.getpid()}) "
                  f"before {tag_dir} is complete", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return before_commit


def with_before_commit(factory: Callable, before_commit: Callable[[int, Path], None]) -> Callable:
    """A ``checkpoint_factory`` whose managers (from ``factory``) call ``before_commit``."""

    def make(cfg, engine, rank, world_size):
        manager = factory(cfg, engine, rank, world_size)
        if manager is not None:
            manager.before_commit = before_commit
        return manager

    return make


def with_disk_full(factory: Callable, flag: str | Path) -> Callable:
    """A ``checkpoint_factory`` whose engines' checkpoint writer fails with ENOSPC after writing
    4 KiB of a file, while ``flag`` exists."""

    def make(cfg, engine, rank, world_size):
        manager = factory(cfg, engine, rank, world_size)
        writer = engine.checkpoint_engine
        save = writer.save

        def full_disk_save(state_dict, path):
            if not Path(flag).exists():
                return save(state_dict, path)
            with open(path, "wb") as out:  # the part that fitted
                out.write(b"\0" * 4096)
            print(f"[rank_entry] disk full while writing {path}", file=sys.stderr, flush=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        writer.save = full_disk_save
        return manager

    return make


def with_replay(factory: Callable, data_rank: int, iteration: int) -> Callable:
    """``factory`` whose reader of ``data_rank`` replays batch ``iteration`` (``--replay-batch``)."""

    def make(cfg, rank, world_size, device):
        loader = factory(cfg, rank, world_size, device)  # rank: the data rank of this reader
        if rank == data_rank:
            plain = loader._run_batch

            def run_batch(it: int):
                if it != iteration:
                    return plain(it)
                failure = RuntimeError(f"rank_entry: --replay-batch {data_rank}@{iteration}")
                return loader._recover(failure, it)
            loader._run_batch = run_batch
        return loader
    return make


class PauseAt(CallbackBase):
    """Holds the run after ``step`` until ``go_file`` exists (every rank; at most 300 s)."""

    def __init__(self, step: int, go_file: str | Path) -> None:
        self.step, self.go = step, Path(go_file)

    def on_step(self, ctx: StepContext) -> None:
        if ctx.step != self.step:
            return
        Path(f"{self.go}.waiting").write_text(str(ctx.step))
        deadline = time.monotonic() + 300
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _at(spec: str, what: str) -> tuple[str, int]:
    head, sep, tail = spec.partition("@")
    if not sep or not tail.isdigit():
        raise SystemExit(f"rank_entry: {what} wants X@STEP, got {spec!r}")
    return head, int(tail)


# ------------------------------------------------------------------------------------- entry
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--ckpt-fault", default=None)
    parser.add_argument("--disk-full", default=None)
    parser.add_argument("--corrupt-draw", default=None)
    parser.add_argument("--pause-at", default=None)
    parser.add_argument("--replay-batch", default=None)
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("script", help="launch script whose main() runs the job")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    a = parser.parse_args(argv)

    import dyntrain.train.run as run_module

    extra: dict = {}
    added: list = []
    if a.trace:
        extra["trace_dir"] = a.trace
    if a.pause_at:
        step, _, go_file = a.pause_at.partition("@")
        if not step.isdigit() or not go_file:
            raise SystemExit(f"rank_entry: --pause-at wants STEP@FILE, got {a.pause_at!r}")
        added.append(PauseAt(int(step), go_file))
    if a.corrupt_draw:
        rank, start = _at(a.corrupt_draw, "--corrupt-draw")
        extra["schedule_hook"] = corrupt_draw(int(rank), start)
    fault_step = None
    if a.ckpt_fault:
        point, fault_step = _at(a.ckpt_fault, "--ckpt-fault")
        if point != "before_complete":
            raise SystemExit(f"rank_entry: unknown checkpoint fault point {point!r}")
    replay = _at(a.replay_batch, "--replay-batch") if a.replay_batch else None
    original = run_module.run_training

    def run_training(cfg, loader_factory, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks", ())) + added
        factory = kwargs.get("checkpoint_factory", run_module.default_checkpoint_manager)
        if fault_step is not None:
            factory = with_before_commit(factory, kill_before_complete(fault_step))
        if a.disk_full:
            factory = with_disk_full(factory, a.disk_full)
        kwargs["checkpoint_factory"] = factory
        if replay is not None:
            loader_factory = with_replay(loader_factory, int(replay[0]), replay[1])
        return original(cfg, loader_factory, **{**kwargs, **extra})

    run_module.run_training = run_training  # what the launch script imports when it runs
    spec = importlib.util.spec_from_file_location("launch_script", a.script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if a.cli:
        from dyntrain.errors import cli_main
        return cli_main(script.main, a.args)
    return script.main(a.args)


if __name__ == "__main__":
    sys.exit(main())
