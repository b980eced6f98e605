"""Resuming on another world size: the data policy and DeepSpeed's universal checkpoint format.

With the same world size every rank gets its own reader/RNG state back (exact resume). With another
world size the ZeRO optimizer partitions no longer fit: rank 0 converts the tag once into
DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``, into ``<tag>/universal``,
atomically) and all ranks load it with ``load_universal``; ZeRO-0 fp32 checkpoints (unpartitioned)
load directly. Weights, Adam moments, LR schedule and step carry over; the data policy (the
interrupted epoch restarts with the new sharding) is ``reshard_rank_states``.
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

    Data policy on a world-size change: a reader state belongs to its rank's 1/W share of the
    samples (DALI ``shard_id``/``num_shards``), so it cannot carry over to a share of another size.
    The new world therefore restarts the interrupted epoch with the new sharding: every rank's
    reader starts its new share from the beginning (``loader: None``). Nothing of the interrupted
    epoch is lost; the samples the old ranks had consumed since the last epoch boundary (at most
    one epoch, reported at resume) are seen a second time. The RNG state of old rank ``rank`` is
    kept where that rank existed; new ranks start from their seeded streams.
    """
    old = saved[rank] if rank < len(saved) else {}
    state: dict[str, Any] = {"rank": rank, "world_size": world_size, "resharded_from": len(saved),
                             "loader": None}
    if old.get("rng") is not None:
        state["rng"] = old["rng"]
    return state


def reshard_note(saved: list[dict[str, Any]], world_size: int) -> str:
    """One line that says what the data policy does to this resume (for the log)."""
    read = []
    for s in saved:
        loader = s.get("loader") or {}
        if "iteration" in loader and "batch_size" in loader:
            read.append(int(loader["iteration"]) * int(loader["batch_size"]))
    told = f" (the old ranks had read {read} samples in all)" if read else ""
    return (f"data: reader positions of {len(saved)} rank(s) do not fit {world_size} rank(s); the "
            f"interrupted epoch restarts with the new sharding: no sample of it is lost, those the "
            f"old ranks consumed since their last epoch boundary are seen again{told}")


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
