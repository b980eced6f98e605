"""Data ranks ("logical ranks"): the data stream of a run is split into ``D`` readers, each with its
own share of the samples, seeds and resumable state, and the ``W`` processes of the world host
``D / W`` of them each. Process ``r`` hosts data ranks ``r * D/W ... (r + 1) * D/W - 1``.

``D`` is fixed when a run first starts (``data.logical_ranks``, 0 = its world size) and recorded in
every checkpoint (``data_ranks`` in the ``COMPLETE`` marker and the client state). A resume on fewer
processes keeps it: each process hosts several readers and takes their micro-batches in turn, a
block of ``A`` (the per-reader accumulation) from each, as gradient accumulation; the engine's
accumulation is ``A * D / W`` (``Config.gradient_accumulation``), so the global batch and the
samples of every step are those of the original run. The gradient is the same sum: DeepSpeed
scales each micro-batch's loss by 1 / (its accumulation) and averages over ranks, and for two data
ranks on one process ``g0 / 2 + g1 / 2`` equals the all-reduced ``(g0 + g1) / 2`` bit for bit in
fp32 (halving is exact), and so does a clipped step (the clipping norm is the same bits on any world
size: ``dyntrain.train.gradnorm``). With more readers per process, or more micro-batches per reader,
the sums are added in another order than the all-reduce's, so the weights agree to rounding while
the data, draws and steps are exactly the original run's.

When the saved data ranks cannot be hosted (a world that does not divide them, or a reader state
missing), the data is resharded: every reader starts its share of the new sharding from the
beginning of the epoch (no sample of the interrupted epoch is lost; those read since the epoch
began are seen again), and the log says so.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from dyntrain.data.loader import LoaderBase
from dyntrain.logs import get_logger


log = get_logger(__name__)

HOSTED = "data_ranks_hosted"   # the key of a multi-reader loader state


def hosted(rank: int, world_size: int, data_ranks: int) -> range:
    """The data ranks process ``rank`` of ``world_size`` hosts."""
    if data_ranks % world_size:
        raise ValueError(f"{data_ranks} data ranks cannot be spread evenly over {world_size} ranks")
    k = data_ranks // world_size
    return range(rank * k, (rank + 1) * k)


def choose_data_ranks(configured: int, saved: Optional[int], world_size: int) -> tuple[int, str]:
    """The data ranks of this start and a line for the log ("" when there is nothing to say).

    ``configured`` is ``data.logical_ranks`` (0 = automatic), ``saved`` the checkpoint's (None on a
    fresh start). An explicit setting wins; otherwise the checkpoint's, else the world size. A number
    the world size does not divide falls back to the world size (the data is resharded)."""
    wanted = configured or saved or world_size
    if wanted % world_size:
        source = "data.logical_ranks" if configured else "the checkpoint"
        return world_size, (f"data: {wanted} data ranks ({source}) cannot be spread evenly over "
                            f"{world_size} ranks: one reader per rank, the data is resharded")
    if wanted != world_size:
        return wanted, (f"data: {wanted} data ranks on {world_size} rank(s): each hosts "
                        f"{wanted // world_size} readers and takes their micro-batches in turn")
    return wanted, ""


class LogicalRanks(LoaderBase):
    """The loader of one process: the readers of its hosted data ranks (``factory(l)`` builds data
    rank ``l``'s), ``per_reader`` micro-batches from each in turn per optimizer step.

    With one reader it is transparent: batches, ``state_dict`` and ``stats`` are the reader's own.
    """

    def __init__(self, factory: Callable[[int], Any], rank: int, world_size: int, data_ranks: int,
                 accumulation: int) -> None:
        self.rank, self.world_size, self.data_ranks = int(rank), int(world_size), int(data_ranks)
        self.ranks = list(hosted(self.rank, self.world_size, self.data_ranks))
        if accumulation % len(self.ranks):
            raise ValueError(f"an accumulation of {accumulation} micro-batches cannot be split over "
                             f"{len(self.ranks)} readers")
        self.per_reader = accumulation // len(self.ranks)
        self.readers: dict[int, Any] = {}
        try:
            for data_rank in self.ranks:
                self.readers[data_rank] = factory(data_rank)
        except BaseException:
            self.close()
            raise
        self._iters = [iter(self.readers[r]) for r in self.ranks]
        self.position = 0   # micro-batches handed out in the current optimizer step

    def __iter__(self) -> "LogicalRanks":
        return self

    def __next__(self) -> dict[str, Any]:
        # the position moves only once the reader handed its batch over: a read that raises leaves
        # it on the same reader (a state saved then, or a caller that tries again, sees no gap)
        which = self.position // self.per_reader
        batch = next(self._iters[which])
        self.position = (self.position + 1) % (self.per_reader * len(self.ranks))
        return batch

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> Optional[dict[str, Any]]:
        """One reader: its own state (the format of a checkpoint without data ranks); several:
        ``{HOSTED: {data rank: state}, "data_ranks": D, "position": p}``."""
        if len(self.ranks) == 1:
            return self.readers[self.ranks[0]].state_dict()
        return {HOSTED: {r: self.readers[r].state_dict() for r in self.ranks},
                "data_ranks": self.data_ranks, "position": self.position}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """A state of this same hosting (what ``state_dict`` returned)."""
        if state is None:
            return
        if len(self.ranks) == 1 and HOSTED not in state:
            self.readers[self.ranks[0]].load_state_dict(state)
            return
        self.load_rank_state({"rank": self.rank, "world_size": self.world_size,
                              "data_ranks": self.data_ranks, "loader": state})

    def load_rank_state(self, rank_state: dict[str, Any]) -> None:
        """Resume from a checkpoint's state for this process: its own rank state, or after a
        world-size change the readers of every saved process (``saved_loaders``, see
        ``dyntrain.checkpoint.reshard_rank_states``). Each hosted data rank continues exactly from its
        saved reader; if the saved data ranks differ or one is missing, the data is resharded."""
        entries = rank_state.get("saved_loaders") or [rank_state]
        states, saved_ranks, read = saved_readers(entries)
        if not states:
            return
        if saved_ranks == {self.data_ranks} and all(r in states for r in self.ranks):
            for r in self.ranks:
                self.readers[r].load_state_dict(states[r])
            own = rank_state.get("loader") or {}
            self.position = int(own.get("position", 0)) if HOSTED in own else 0
            if "saved_loaders" in rank_state and self.rank == 0:
                log.info(f"data: the {self.data_ranks} data ranks of the checkpoint continue on "
                         f"{self.world_size} rank(s), every reader from its saved position (exact)")
            return
        if self.rank == 0:
            told = f" (the old readers had read {read} samples in all)" if read else ""
            log.info(f"data: the reader positions of {sorted(saved_ranks)} data rank(s) do not fit "
                     f"{self.data_ranks} on {self.world_size} rank(s); the interrupted epoch restarts "
                     f"with the new sharding: no sample of it is lost, those the old readers consumed "
                     f"since their last epoch boundary are seen again{told}")

    def stats(self) -> dict[str, Any]:
        """One reader: its stats; several: counts summed, ``epoch`` the lowest, named samples joined."""
        parts = [self.readers[r].stats() for r in self.ranks]
        if len(parts) == 1:
            return parts[0]
        out: dict[str, Any] = {}
        for key in parts[0]:
            values = [p.get(key) for p in parts]
            if key == "epoch":
                out[key] = min(values)
            elif key == "total_samples" or isinstance(values[0], (bool, str)):
                out[key] = values[0]
            elif all(isinstance(v, (int, float)) for v in values):
                out[key] = sum(values)
            elif all(isinstance(v, list) for v in values):
                out[key] = [x for v in values for x in v][-100:]
            else:
                out[key] = values[0]
        return out

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def saved_readers(entries: list[dict[str, Any]]) -> tuple[dict[int, Any], set[int], int]:
    """The reader states of saved processes by data rank, the data-rank counts they were saved with,
    and the samples they had read (for the log)."""
    states: dict[int, Any] = {}
    counts: set[int] = set()
    read = 0
    for entry in entries:
        loader = entry.get("loader")
        if loader is None:
            continue
        if isinstance(loader, dict) and HOSTED in loader:
            counts.add(int(loader["data_ranks"]))
            states.update({int(r): s for r, s in loader[HOSTED].items()})
        else:   # one reader per process, as in every checkpoint before data ranks
            counts.add(int(entry.get("data_ranks") or entry["world_size"]))
            states[int(entry["rank"])] = loader
    for s in states.values():
        if isinstance(s, dict) and "iteration" in s and "batch_size" in s:
            read += int(s["iteration"]) * int(s["batch_size"])
    return states, counts, read
