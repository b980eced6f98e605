"""The trainer's hot path: no host read of a step's (loss, stop) flags until the next step is queued,
NaN and stop guarantees kept, logged losses unchanged.

A plain-torch stand-in plays the DeepSpeed engine (forward with a reuse tuple, backward, step with
gradient accumulation) so that the order of device work and host reads can be recorded in one fast
process; the stop test and the test of the logged data counters (the run's totals) run two real
ranks over gloo. The real engine paths are covered by
tests/test_engine_multirank.py (NaN at step 3 under ZeRO-1) and tests/test_resume.py (exact resume).
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Optional

import pytest
import torch

from dyntrain.config import load_config
from dyntrain.data.loader import LoaderBase
from dyntrain.tracking import NullTracker
from dyntrain.train.callbacks import OnEveryStep
from dyntrain.train.schedule import VariantSchedule
from dyntrain.train.trainer import NonFiniteLossError, Trainer, restoration_loss
from helpers import free_port, spawn_ranks

TINY = ["run.name=hot", "run.seed=3", "run.log_every=1000", "checkpoint.every=0",
        "model.variants={S: [1, 1, 1, 1], L: [2, 2, 2, 2]}", "schedule.variant_probs={S: 0.5, L: 0.5}"]


class StandInEngine:
    """Forward applies one 3x3 conv ``reuse[0]`` times; ``step`` updates every ``accum`` micro-batches."""

    def __init__(self, accum: int = 1, events: Optional[list] = None) -> None:
        torch.manual_seed(0)
        self.module = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.05)
        self.accum, self.micro, self.events = accum, 0, events
        self.device = torch.device("cpu")
        self.forwards = 0

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def get_lr(self) -> list[float]:
        return [0.05]

    def __call__(self, x: torch.Tensor, reuse) -> torch.Tensor:
        if self.events is not None:
            self.events.append(("forward", self.forwards // self.accum))
        self.forwards += 1
        for _ in range(reuse[0]):
            x = self.module(x)
        return x

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            self.opt.step()
            self.opt.zero_grad()


class Batches(LoaderBase):
    """Seeded 2x3x8x8 batches; NaN inputs from batch ``nan_at``; ``on_batch(i)`` before batch i."""

    def __init__(self, seed: int = 0, nan_at: Optional[int] = None, on_batch=None) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.i, self.nan_at, self.on_batch = 0, nan_at, on_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.on_batch is not None:
            self.on_batch(self.i)
        x = torch.rand(2, 3, 8, 8, generator=self.gen)
        y = torch.rand(2, 3, 8, 8, generator=self.gen)
        if self.nan_at is not None and self.i >= self.nan_at:
            x = torch.full_like(x, float("nan"))
        self.i += 1
        return {"input": x, "target": y}


class Saves:
    """Checkpoint manager stand-in: records the steps saved."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def save(self, step, client_state, rank_state) -> str:
        self.steps.append(step)
        return f"step_{step:08d}"

    def find_resume(self):
        return None


def make_trainer(overrides: list[str], engine, loader, rank: int = 0, world: int = 1,
                 manager=None) -> Trainer:
    cfg = load_config(None, TINY + overrides)
    return Trainer(cfg, engine, loader, VariantSchedule.from_config(cfg), None, rank, world,
                   checkpoint_manager=manager)


def test_flags_of_a_step_are_read_only_after_the_next_step_was_queued(monkeypatch):
    events: list = []
    original_cpu = torch.Tensor.cpu

    def recording_cpu(self, *args, **kwargs):  # every host copy the trainer makes
        events.append(("host_read",))
        return original_cpu(self, *args, **kwargs)

    trainer = make_trainer(["run.max_steps=6"], StandInEngine(events=events), Batches())
    monkeypatch.setattr(torch.Tensor, "cpu", recording_cpu)
    result = trainer.train()
    monkeypatch.undo()
    assert result.step == 6
    reads = [i for i, e in enumerate(events) if e == ("host_read",)]
    forwards = {e[1]: i for i, e in enumerate(events) if e[0] == "forward"}
    assert len(reads) == 6, events  # one host read per step, not one per micro-batch
    for t in range(5):  # step t's flags reach the host after step t+1's forward was issued
        assert forwards[t + 1] < reads[t] < forwards.get(t + 2, len(events)), (t, events)
    assert reads[5] > forwards[5]  # the last step is read before train() returns


@pytest.mark.parametrize("nan_at,every,saved", [(3, 4, []), (5, 4, [4]), (7, 0, [])])
def test_nan_loss_raises_naming_its_step_before_any_later_save(nan_at, every, saved):
    engine, saves = StandInEngine(), Saves()
    trainer = make_trainer(["run.max_steps=8", f"checkpoint.every={every}"], engine,
                           Batches(nan_at=nan_at), manager=saves)
    variant = trainer.schedule.variant_at(nan_at)
    with pytest.raises(NonFiniteLossError, match=f"at step {nan_at} \\(variant {variant},"):
        trainer.train()
    assert saves.steps == saved
    assert engine.forwards <= nan_at + 2  # raised at the latest one step later


def test_logged_losses_are_the_per_step_values_of_a_plain_loop():
    accum, steps = 2, 7
    trainer = make_trainer([f"run.max_steps={steps}", "run.log_every=3"], StandInEngine(accum),
                           Batches(seed=5))
    logged: list[tuple[int, str, float]] = []
    trainer.add_callback(OnEveryStep(lambda ctx: logged.append((ctx.step, ctx.metrics["variant"],
                                                                ctx.metrics["loss"]))))
    trainer.train()
    # the same steps by hand: mean over micro-batches of each micro-batch's loss read at once
    engine, batches, schedule = StandInEngine(accum), Batches(seed=5), trainer.schedule
    expected = []
    for t in range(steps):
        variant, total = schedule.variant_at(t), 0.0
        for _ in range(accum):
            b = next(batches)
            loss = restoration_loss(engine(b["input"], reuse=schedule.variants[variant]), b["target"])
            total += float(loss.detach().float())
            engine.backward(loss)
            engine.step()
        expected.append((t + 1, variant, total / accum))
    assert logged == expected
    counts = {v: sum(1 for _, w, _ in expected if w == v) for v in schedule.variants}
    assert {v: trainer.account.count.get(v, 0) for v in counts} == counts


def test_stop_request_stops_after_the_next_step_single_rank():
    saves = Saves()
    holder: dict = {}
    loader = Batches(on_batch=lambda i: i == 5 and holder["trainer"].request_checkpoint())
    trainer = make_trainer(["run.max_steps=20"], StandInEngine(), loader, manager=saves)
    holder["trainer"] = trainer
    result = trainer.train()
    # step 5 carries the request; it is read after step 6 was queued, so the run ends after step 6
    assert result.stopped_early and result.step == 7 and saves.steps == [7]


def _stop_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        saves, holder = Saves(), {}
        # only rank 1 is asked to stop (as by a signal that reached one process)
        loader = Batches(seed=rank, on_batch=lambda i: rank == 1 and i == 4
                         and holder["trainer"].request_checkpoint())
        trainer = make_trainer(["run.max_steps=30"], StandInEngine(), loader, rank, 2, saves)
        holder["trainer"] = trainer
        result = trainer.train()
        queue.put((rank, result.step, result.stopped_early, saves.steps))
    finally:
        dist.destroy_process_group()


def test_stop_request_on_one_rank_stops_both_after_the_same_step():
    queue = mp.get_context("spawn").Queue()
    exitcodes = spawn_ranks(_stop_rank, 2, free_port(), queue, timeout=150)
    results = sorted(queue.get(timeout=30) for _ in exitcodes)
    assert exitcodes == [0, 0]
    assert results == [(0, 6, True, [6]), (1, 6, True, [6])]


def test_gpu_suite_names_the_fastest_zero_stage_for_pretrain_yaml():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_stages import fastest_zero_stage

    measured = {"2": {"S": 10.0, "L": 20.0, "dynamic": 16.0}, "0": {"S": 9.0, "L": 19.0, "dynamic": 15.5},
                "1": {"S": 9.5, "L": 21.0, "dynamic": 16.5}}
    assert fastest_zero_stage(measured) == 0
    assert fastest_zero_stage({"2": measured["2"]}) == 2
    with pytest.raises(ValueError, match="no ZeRO stage"):
        fastest_zero_stage({})


class CountingBatches(Batches):
    """Batches whose reader reports ``corrupt_skipped`` and ``io_retries`` of its own."""

    def __init__(self, seed: int, corrupt: int, retries: int) -> None:
        super().__init__(seed=seed)
        self.counts = {"corrupt_skipped": corrupt, "io_retries": retries}

    def stats(self) -> dict:
        return {"epoch": 0, **self.counts}


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, dict(metrics)))


def _counts_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        recorder = Recorder() if rank == 0 else None     # rank 0 alone holds the MLflow tracker
        cfg = load_config(None, TINY + ["run.max_steps=4", "run.log_every=2"])
        loader = CountingBatches(rank, corrupt=rank + 1, retries=10 * rank + 1)
        Trainer(cfg, StandInEngine(), loader, VariantSchedule.from_config(cfg), recorder, rank, 2).train()
        queue.put((rank, [(step, m["corrupt_skipped"], m["io_retries"]) for step, m in recorder.logged
                          if "corrupt_skipped" in m] if recorder else []))
    finally:
        dist.destroy_process_group()


def test_logged_data_counters_are_the_runs_totals_over_ranks():
    """Rank 0 logs ``corrupt_skipped`` and ``io_retries`` for the whole run: rank 1's reader skipped 2
    samples and retried 11 reads, rank 0's 1 and 1, so each log step shows 3 and 12, not 1 and 1."""
    queue = mp.get_context("spawn").Queue()
    exitcodes = spawn_ranks(_counts_rank, 2, free_port(), queue, timeout=150)
    results = dict(queue.get(timeout=30) for _ in exitcodes)
    assert exitcodes == [0, 0]
    assert results == {0: [(2, 3.0, 12.0), (4, 3.0, 12.0)], 1: []}
