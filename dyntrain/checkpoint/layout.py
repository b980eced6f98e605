"""Tag layout of ``checkpoint.dir`` and the ``COMPLETE`` marker that makes a tag count.

Layout::

    step_00001000/                       one checkpoint ("tag"), written by every rank
        mp_rank_00_model_states.pt       weights, DeepSpeed state and the client state: step,
                                         schedule, MLflow run id, resolved config and EVERY rank's
                                         reader/RNG state (gathered)
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's ZeRO partition
        COMPLETE                         JSON written last, by rank 0 (step, world size, data ranks,
                                         files)
        universal/                       DeepSpeed universal form, made on demand (new world size)
    latest                               the newest complete tag (for humans and DeepSpeed tools)

A tag without ``COMPLETE`` does not exist as far as resuming is concerned; a complete tag is usable
only when every file its marker lists is present with its recorded size (``verify_files``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dyntrain.errors import DyntrainError
from dyntrain.logs import get_logger


log = get_logger(__package__)  # lines read "[time checkpoint] ..."

TAG_PREFIX = "step_"
TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
STATE_KEY = "dyntrain"          # the one key of DeepSpeed's client state that holds ours
FORMAT_VERSION = 1


class CheckpointError(DyntrainError, RuntimeError):
    """A checkpoint that cannot be found, written, read or resumed from (names the path or tag)."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{int(step):08d}"


def step_of_tag(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (expected {TAG_PREFIX}NNNNNNNN)")
    return int(m.group(1))


def owner_rank(name: str) -> int:
    """The rank that writes a DeepSpeed checkpoint file: rank r writes zero_pp_rank_r_*, rank 0
    the rest (data parallelism only, as in dyntrain)."""
    m = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else 0


@dataclass
class CheckpointInfo:
    """One tag folder of a checkpoint directory."""
    tag: str
    step: int
    path: Path
    complete: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> Optional[int]:
        return self.meta.get("world_size")


def read_marker(tag_dir: str | Path) -> Optional[dict[str, Any]]:
    """The ``COMPLETE`` marker of a tag folder, or None when there is none (or it is unreadable)."""
    p = Path(tag_dir, COMPLETE)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def list_checkpoints(ckpt_dir: str | Path) -> list[CheckpointInfo]:
    """Every tag folder in ``ckpt_dir`` (complete or not), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = TAG_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        meta = read_marker(p)
        out.append(CheckpointInfo(p.name, int(m.group(1)), p, meta is not None, meta or {}))
    return sorted(out, key=lambda i: i.step)


def verify_files(info: CheckpointInfo) -> Optional[str]:
    """None when every file the marker lists exists with its recorded size, else what is wrong."""
    for name, size in (info.meta.get("files") or {}).items():
        p = info.path / name
        try:
            actual = p.stat().st_size
        except OSError:
            return f"{p} is missing"
        if actual != size:
            return f"{p} has {actual} bytes, the marker recorded {size}"
    return None


def newest_complete(ckpt_dir: str | Path, verify: bool = True, warn: bool = True) -> Optional[CheckpointInfo]:
    """The complete tag with the highest step (files checked against the marker when ``verify``)."""
    for info in reversed(list_checkpoints(ckpt_dir)):
        if not info.complete:
            continue
        problem = verify_files(info) if verify else None
        if problem is None:
            return info
        if warn:
            log.warning(f"skipping {info.path}: {problem}")
    return None


def resume_tag(ckpt_dir: str | Path, mode: Optional[str], warn: bool = True) -> Optional[str]:
    """The tag ``checkpoint.resume`` = ``mode`` continues from: "auto"/"latest" = the newest complete
    tag (None when there is none), "never" = None, else that tag or step, which must exist, be complete
    and hold every file its marker lists (``CheckpointError`` otherwise). Reads only."""
    mode = (mode or "auto").strip()
    if mode == "never":
        return None
    if mode in ("auto", "latest"):
        info = newest_complete(ckpt_dir, warn=warn)
        return info.tag if info else None
    tag = tag_for_step(int(mode)) if mode.isdigit() else mode
    tag_dir = Path(ckpt_dir, tag)
    available = [i.tag for i in list_checkpoints(ckpt_dir) if i.complete]
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint.resume={mode}: {tag_dir} does not exist "
                              f"(complete checkpoints: {available or 'none'})")
    meta = read_marker(tag_dir)
    if not meta:
        raise CheckpointError(f"checkpoint.resume={mode}: {tag_dir} is incomplete (no {COMPLETE} "
                              f"marker; complete checkpoints: {available or 'none'})")
    problem = verify_files(CheckpointInfo(tag, step_of_tag(tag), tag_dir, True, meta))
    if problem:
        raise CheckpointError(f"checkpoint.resume={mode}: {problem}")
    return tag


def resume_data_ranks(ckpt_dir: Optional[str | Path], mode: Optional[str]) -> Optional[int]:
    """How many data-parallel readers ("data ranks") wrote the checkpoint a resume would continue
    from: the marker's ``data_ranks``, or its ``world_size`` for a checkpoint that predates them; None
    for a fresh start (or a choice ``resume_tag`` refuses: the resume itself reports it). Read (by
    rank 0, ``dyntrain.train.run``) before the engine exists: the gradient accumulation depends on it."""
    if not ckpt_dir:
        return None
    try:
        tag = resume_tag(ckpt_dir, mode, warn=False)
    except CheckpointError:
        return None
    meta = read_marker(Path(ckpt_dir, tag)) if tag else None
    if not meta:
        return None
    return int(meta.get("data_ranks") or meta.get("world_size") or 0) or None
