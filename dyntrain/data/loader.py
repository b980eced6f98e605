"""What the trainer asks of a data source: the ``Loader`` protocol, and ``LoaderBase``, its defaults.

Every loader (the DALI pre-training stream, the paired folders and shards, the synthetic pairs, and
the stand-ins of tests and benchmarks) is an iterator of batch dicts::

    {"input": (B, 3, H, W) float in [0, 1], "target": same, optional "mask", "keys", "tasks"}

and says what the checkpoint needs to resume it exactly (``state_dict``/``load_state_dict``; None
from ``state_dict`` = no reader state, the resume is exact only if the source is stateless), what it
counted (``stats``: samples, corrupt samples skipped, epoch, per-task counts ...) and how to let go
of its workers and files (``close``). A class that lacks a method gets ``LoaderBase``'s.

At a resume the trainer hands the loader of a process its whole rank state (``load_rank_state``: the
checkpoint's entry for this rank, or after a world-size change every saved process's readers under
``saved_loaders``). A loader that hosts data ranks (``dyntrain.data.logical.LogicalRanks``) picks
its readers' states from it; the default takes the ``loader`` entry (``load_state_dict``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Loader(Protocol):
    def __iter__(self) -> "Loader": ...

    def __next__(self) -> dict[str, Any]: ...

    def state_dict(self) -> Optional[dict[str, Any]]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def load_rank_state(self, rank_state: dict[str, Any]) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# ``(cfg, rank, world_size, device) -> Loader``: what an entry point hands to ``run_training``
LoaderFactory = Callable[[Any, int, int, torch.device], Loader]


class LoaderBase:
    """The protocol's defaults: no reader state, the rank state's ``loader`` entry at a resume,
    nothing counted, nothing to close."""

    def __iter__(self) -> "LoaderBase":
        return self

    def __next__(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Optional[dict[str, Any]]:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def load_rank_state(self, rank_state: dict[str, Any]) -> None:
        """This process's reader state from its rank state (a loader that hosts no data ranks)."""
        if rank_state.get("loader") is not None:
            self.load_state_dict(rank_state["loader"])

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None
