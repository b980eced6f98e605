"""Resuming on another world size: the data policy and DeepSpeed's universal checkpoint format.

With the same world size every rank gets its own reader/RNG state back (exact resume). With another
world size the ZeRO optimizer partitions no longer fit: rank 0 converts the tag once into
DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``, into ``<tag>/universal``,
atomically) and all ranks load it with ``load_universal``; ZeRO-0 fp32 checkpoints (unpartitioned)
load directly. Weights, Adam moments, LR schedule and step carry over; ``reshard_rank_states``
hands every saved reader state to the new ranks, and the data policy is the loader's
(``dyntrain.data.logical``: the same data ranks hosted on fewer processes, exact).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from dyntrain.checkpoint.files import fsync_dir, fsync_file
from dyntrain.checkpoint.layout import UNIVERSAL, CheckpointError


def reshard_rank_states(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """The state rank ``rank`` of a new world of ``world_size`` ranks resumes with, given the
    rank states of the ``len(saved)`` ranks that wrote the checkpoint.

    The RNG state of old rank ``rank`` is kept where that rank existed (new ranks start from their
    seeded streams). The data is the loader's business: a reader state belongs to one of the data
    ranks the checkpoint's run had (its 1/N share of the samples), so every saved reader state is
    handed over under ``saved_loaders`` (with the rank, world size and data ranks of the process
    that saved it) and the loader decides: ``dyntrain.data.logical.LogicalRanks`` hosts the same
    data ranks on fewer processes and resumes each exactly, or restarts the interrupted epoch with
    the new sharding when they cannot be hosted. ``loader`` is None: no state of this process's own.
    """
    old = saved[rank] if rank < len(saved) else {}
    state: dict[str, Any] = {"rank": rank, "world_size": world_size, "resharded_from": len(saved),
                             "loader": None}
    if old.get("rng") is not None:
        state["rng"] = old["rng"]
    if any(s.get("loader") is not None for s in saved):
        state["saved_loaders"] = [
            {"rank": int(s.get("rank", i)), "world_size": int(s.get("world_size", len(saved))),
             "data_ranks": s.get("data_ranks"), "loader": s.get("loader")} for i, s in enumerate(saved)]
    return state


def ensure_universal(tag_dir: str | Path, workers: int = 1) -> Path:
    """Convert a ZeRO checkpoint tag into DeepSpeed's universal format at ``<tag>/universal``
    (once; atomically: a temporary folder renamed when the conversion finished)."""
    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL
    if (out / "zero").is_dir():
        return out
    for stale in tag_dir.glob(f".{UNIVERSAL}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tag_dir / f".{UNIVERSAL}.tmp{os.getpid()}"
    # lazy: deepspeed is slow to import and unused by inference
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp),
                              num_extract_workers=workers, num_merge_workers=workers,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not convert {tag_dir} to DeepSpeed's universal format: "
                              f"{exc}") from exc
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(tag_dir)
    return out
