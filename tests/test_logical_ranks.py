"""Data ranks hosted on fewer processes (``dyntrain.data.logical``): which readers a process hosts,
the order of their micro-batches, the state a checkpoint keeps, and what a resume on another world
size does with the saved readers (continue each exactly, or reshard and say so). The end-to-end
2 -> 1 resume with bit-identical weights is ``test_resume.py::test_world_size_change_two_to_one_and_back``."""
from __future__ import annotations

import logging

import pytest

from dyntrain.checkpoint import reshard_rank_states
from dyntrain.config import load_config
from dyntrain.data.logical import HOSTED, LogicalRanks, choose_data_ranks, hosted
from dyntrain.errors import ConfigError


class Counter:
    """A reader of data rank ``rank``: batch i is ``(rank, i)``; its state is the next i."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.i, self.closed = rank, world, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return {"keys": [(self.rank, self.i - 1)]}

    def state_dict(self):
        return {"iteration": self.i, "batch_size": 1, "rank": self.rank, "world_size": self.world}

    def load_state_dict(self, state):
        assert (state["rank"], state["world_size"]) == (self.rank, self.world), state
        self.i = state["iteration"]

    def stats(self):
        return {"samples": self.i, "epoch": self.i // 4, "corrupt_keys": [f"k{self.rank}"], "total_samples": 8,
                "kind": "counter"}

    def close(self):
        self.closed = True


def host(rank, world, data_ranks, accumulation):
    return LogicalRanks(lambda r: Counter(r, data_ranks), rank, world, data_ranks, accumulation)


def keys(loader, n):
    return [next(loader)["keys"][0] for _ in range(n)]


def test_hosting_and_the_order_of_micro_batches():
    assert list(hosted(1, 2, 4)) == [2, 3] and list(hosted(0, 1, 2)) == [0, 1]
    with pytest.raises(ValueError):
        hosted(0, 3, 4)
    one = host(0, 1, 2, accumulation=4)      # 2 readers, 2 micro-batches each per step
    assert one.ranks == [0, 1] and one.per_reader == 2
    assert keys(one, 8) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    alone = host(1, 2, 2, accumulation=2)    # one reader: transparent
    assert keys(alone, 3) == [(1, 0), (1, 1), (1, 2)]
    assert alone.state_dict() == {"iteration": 3, "batch_size": 1, "rank": 1, "world_size": 2}
    assert alone.stats()["corrupt_keys"] == ["k1"]
    with pytest.raises(ValueError, match="cannot be split over 2 readers"):
        host(0, 1, 2, accumulation=3)


def test_a_read_that_raises_leaves_the_turn_on_its_reader():
    """A hosted reader whose read raises (data rank 1's, as an I/O failure past its own retries
    would) keeps its turn: the state saved then and the next read are those of that reader."""
    class Flaky(Counter):
        fail = False

        def __next__(self):
            if self.fail:
                self.fail = False
                raise OSError("storage away")
            return super().__next__()

    one = LogicalRanks(lambda r: Flaky(r, 2), 0, 1, 2, 2)
    assert keys(one, 1) == [(0, 0)]
    one.readers[1].fail = True
    with pytest.raises(OSError):
        next(one)
    assert one.state_dict()["position"] == 1
    assert keys(one, 3) == [(1, 0), (0, 1), (1, 1)]


def test_state_round_trip_and_merged_stats():
    a = host(0, 1, 2, accumulation=2)
    keys(a, 6)
    state = a.state_dict()
    assert state["data_ranks"] == 2 and sorted(state[HOSTED]) == [0, 1]
    b = host(0, 1, 2, accumulation=2)
    b.load_state_dict(state)
    assert keys(b, 4) == keys(a, 4)
    stats = a.stats()
    assert stats["samples"] == 10 and stats["epoch"] == 1 and stats["total_samples"] == 8
    assert stats["corrupt_keys"] == ["k0", "k1"] and stats["kind"] == "counter"
    a.close()
    assert all(r.closed for r in a.readers.values())


def two_rank_checkpoint(steps):
    """The rank states two processes (one reader each) save after ``steps`` steps."""
    saved = []
    for r in range(2):
        reader = host(r, 2, 2, accumulation=1)
        keys(reader, steps)
        saved.append({"rank": r, "world_size": 2, "data_ranks": 2, "rng": {"r": r},
                      "loader": reader.state_dict()})
    return saved


def test_two_to_one_continues_every_reader_exactly():
    saved = two_rank_checkpoint(3)
    straight = [host(r, 2, 2, accumulation=1) for r in range(2)]
    for s in straight:
        keys(s, 3)
    # the original run's next steps: rank 0's micro-batch, then rank 1's
    expected = [k for _ in range(2) for s in straight for k in keys(s, 1)]
    state = reshard_rank_states(saved, 0, 1)
    assert state["loader"] is None and state["rng"] == {"r": 0} and len(state["saved_loaders"]) == 2
    one = host(0, 1, 2, accumulation=2)
    one.load_rank_state(state)
    assert keys(one, 4) == expected
    # ... and back on two processes from the one-process checkpoint
    again = reshard_rank_states([{"rank": 0, "world_size": 1, "data_ranks": 2, "loader": one.state_dict()}], 1, 2)
    two = host(1, 2, 2, accumulation=1)
    two.load_rank_state(again)
    assert keys(two, 1) == [(1, 5)]


def test_old_checkpoints_without_data_ranks_resume_exactly():
    saved = two_rank_checkpoint(2)
    for s in saved:
        del s["data_ranks"]          # a checkpoint written before data ranks existed
    one = host(0, 1, 2, accumulation=2)
    one.load_rank_state(reshard_rank_states(saved, 0, 1))
    assert keys(one, 2) == [(0, 2), (1, 2)]


def test_data_ranks_that_do_not_fit_reshard_and_say_so(caplog):
    saved = two_rank_checkpoint(3)
    four = host(0, 1, 4, accumulation=4)     # e.g. data.logical_ranks=4 set by hand
    with caplog.at_level(logging.INFO):
        four.load_rank_state(reshard_rank_states(saved, 0, 1))
    assert "the interrupted epoch restarts with the new sharding" in caplog.text
    assert "had read 6 samples in all" in caplog.text
    assert keys(four, 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]   # every reader from the start
    missing = reshard_rank_states(saved[:1], 0, 1)            # a saved reader is missing
    one = host(0, 1, 2, accumulation=2)
    one.load_rank_state(missing)
    assert keys(one, 2) == [(0, 0), (1, 0)]


def test_choosing_the_data_ranks_and_the_accumulation():
    assert choose_data_ranks(0, None, 2) == (2, "")               # fresh start: the world size
    n, note = choose_data_ranks(0, 2, 1)                          # resume on fewer ranks
    assert n == 2 and "each hosts 2 readers" in note
    n, note = choose_data_ranks(0, 2, 4)                          # on more: resharded
    assert n == 4 and "cannot be spread evenly" in note and "the checkpoint" in note
    assert choose_data_ranks(8, 2, 4)[0] == 8                     # an explicit setting wins
    cfg = load_config(None, ["data.micro_batch_size=2", "deepspeed.global_batch_size=8"])
    assert cfg.gradient_accumulation(2) == 2 and cfg.gradient_accumulation(1, 2) == 4
    cfg = load_config(None, ["deepspeed.gradient_accumulation_steps=3"])
    assert cfg.gradient_accumulation(1, 4) == 12 and cfg.gradient_accumulation(2, 2) == 3
    with pytest.raises(ConfigError):
        cfg.gradient_accumulation(3, 4)
    with pytest.raises(ConfigError, match="data.logical_ranks"):
        load_config(None, ["data.logical_ranks=-1"])


def test_the_loader_protocol_declares_the_rank_state_and_a_plain_loader_takes_its_entry():
    """The trainer hands every loader its rank state (no probing for the capability): a loader that
    hosts data ranks picks its readers' states, one that does not (``LoaderBase``'s default) takes
    the ``loader`` entry."""
    import inspect

    from dyntrain.data.loader import Loader, LoaderBase
    from dyntrain.train import state

    assert "load_rank_state" in vars(Loader)
    assert isinstance(host(0, 1, 2, accumulation=2), Loader)
    assert "hasattr" not in inspect.getsource(state)

    class Plain(LoaderBase):
        i = 0

        def load_state_dict(self, s):
            self.i = s["i"]

    plain = Plain()
    plain.load_rank_state({"rank": 0, "rng": {}, "loader": None})   # no reader state: untouched
    assert plain.i == 0
    plain.load_rank_state({"rank": 0, "rng": {}, "loader": {"i": 3}})
    assert plain.i == 3 and isinstance(plain, Loader)
