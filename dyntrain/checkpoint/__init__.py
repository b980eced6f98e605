"""Checkpoints on shared storage: atomic saves, retention, auto-resume, world-size change.

One concern per module:

    layout      tag names, the ``COMPLETE`` marker and ``latest``; listing, verifying, choosing tags
    files       fsync, atomic text files, marker-first deletion of a tag
    collective  the gather/broadcast/barrier a save and a resume need (no-ops without a group)
    manager     ``CheckpointManager``: save, retention, resume choice, load
    reshard     another world size: DeepSpeed's universal format, the saved reader states
    reading     engine-free reading: ``resolve_tag_dir``, ``model_states_file``, ``read_client_state``
    cli         ``python -m dyntrain.checkpoint progress --config C`` for job scripts

Every public name is importable from ``dyntrain.checkpoint``. Exporting the weights of a checkpoint
is ``dyntrain.checkpoint.weights``.
"""
from dyntrain.checkpoint.collective import all_gather, barrier, broadcast, dist_on
from dyntrain.checkpoint.files import atomic_write_text, fsync_dir, fsync_file, remove_tag
from dyntrain.checkpoint.layout import (COMPLETE, FORMAT_VERSION, LATEST, STATE_KEY, TAG_PREFIX, TAG_RE,
                                        UNIVERSAL, CheckpointError, CheckpointInfo, list_checkpoints,
                                        newest_complete, owner_rank, read_marker, resume_data_ranks,
                                        resume_tag, step_of_tag, tag_for_step, verify_files)
from dyntrain.checkpoint.manager import BeforeCommit, CheckpointManager
from dyntrain.checkpoint.reading import model_states_file, read_client_state, resolve_tag_dir
from dyntrain.checkpoint.reshard import ensure_universal, reshard_rank_states


__all__ = [
    "COMPLETE", "FORMAT_VERSION", "LATEST", "STATE_KEY", "TAG_PREFIX", "TAG_RE", "UNIVERSAL",
    "BeforeCommit", "CheckpointError", "CheckpointInfo", "CheckpointManager",
    "all_gather", "atomic_write_text", "barrier", "broadcast", "dist_on", "ensure_universal",
    "fsync_dir", "fsync_file", "list_checkpoints", "model_states_file", "newest_complete",
    "owner_rank", "read_client_state", "read_marker", "remove_tag", "reshard_rank_states",
    "resolve_tag_dir", "resume_data_ranks", "resume_tag", "step_of_tag", "tag_for_step", "verify_files",
]
