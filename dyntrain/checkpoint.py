"""Checkpoints on shared storage: atomic saves, retention, auto-resume, world-size change.

Layout of ``checkpoint.dir``::

    step_00001000/                       one checkpoint ("tag"), written by every rank
        mp_rank_00_model_states.pt       weights, DeepSpeed state and the client state: step,
                                         schedule, MLflow run id, resolved config and EVERY rank's
                                         reader/RNG state (gathered, see below)
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's ZeRO partition
        COMPLETE                         JSON written last, by rank 0 (step, world size, files)
        universal/                       DeepSpeed universal form, made on demand (new world size)
    latest                               the newest complete tag (for humans and DeepSpeed tools)

Atomicity. All ranks gather their rank states (DeepSpeed stores the client state of one writer
only), call ``engine.save_checkpoint(dir, tag, save_latest=False)``, fsync the files they wrote and
meet at a barrier; only then does rank 0 write ``COMPLETE`` (temp file + fsync + ``os.replace``) and
replace ``latest`` the same way. A tag without ``COMPLETE`` does not exist as far as resuming is
concerned, so a run killed while writing leaves the previous checkpoint as the newest usable one.
Resuming picks the complete tag with the highest step (not blindly ``latest``) and checks that
every file the marker lists is present with its recorded size.

Retention (rank 0, after each save): keep the newest ``checkpoint.keep`` complete tags plus every
tag whose step is a multiple of ``checkpoint.milestone_every``; delete older complete tags and
half-written tags older than the newest complete one. A tag loses its ``COMPLETE`` marker before
any of its files is removed, so a crash while deleting never leaves a "complete" partial tag.

World-size change. With the same world size every rank gets its own reader/RNG state back (exact
resume). With another world size the ZeRO optimizer partitions no longer fit: rank 0 converts the
tag once into DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``, into
``<tag>/universal``, atomically) and all ranks load it with ``load_universal``; ZeRO-0 fp32
checkpoints (unpartitioned) load directly. Weights, Adam moments, LR schedule and step carry over;
the data policy (the interrupted epoch restarts with the new sharding) is ``reshard_rank_states``.

Reading without an engine. ``resolve_tag_dir`` finds the tag folder a path means and
``read_client_state`` returns its dyntrain client state. Exporting the weights of a checkpoint
(consolidated fp32, ``.pt`` or ``.safetensors``) and loading them back is ``dyntrain.weights``.

Test hook: ``DYNTRAIN_CKPT_FAULT=before_complete@<step>`` makes every rank SIGKILL itself in the
save of ``step`` after DeepSpeed wrote its files and before the ``COMPLETE`` marker. It exists only
so tests can kill a run in the middle of a checkpoint; nothing happens when the variable is unset.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

TAG_PREFIX = "step_"
TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
STATE_KEY = "dyntrain"          # the one key of DeepSpeed's client state that holds ours
FORMAT_VERSION = 1
FAULT_ENV = "DYNTRAIN_CKPT_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, written, read or resumed from (names the path or tag)."""


# ------------------------------------------------------------------------------------ tags
def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{int(step):08d}"


def step_of_tag(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (expected {TAG_PREFIX}NNNNNNNN)")
    return int(m.group(1))


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


def newest_complete(ckpt_dir: str | Path, verify: bool = True) -> Optional[CheckpointInfo]:
    """The complete tag with the highest step (files checked against the marker when ``verify``)."""
    for info in reversed(list_checkpoints(ckpt_dir)):
        if not info.complete:
            continue
        problem = verify_files(info) if verify else None
        if problem is None:
            return info
        print(f"[checkpoint] skipping {info.path}: {problem}", file=sys.stderr, flush=True)
    return None


# ----------------------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the whole new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _owner_rank(name: str) -> int:
    """The rank that writes a DeepSpeed checkpoint file: rank r writes zero_pp_rank_r_*, rank 0
    the rest (data parallelism only, as in dyntrain)."""
    m = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else 0


def remove_tag(tag_dir: str | Path) -> None:
    """Delete a tag folder: marker first (it stops being a checkpoint), then the files."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    if marker.exists():
        marker.unlink()
        _fsync_dir(tag_dir)
    trash = tag_dir.with_name(f".trash-{tag_dir.name}-{os.getpid()}")
    try:
        os.replace(tag_dir, trash)
    except OSError:
        trash = tag_dir
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        raise CheckpointError(f"could not delete checkpoint folder {tag_dir}")


def _fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}@{step}":
        print(f"[checkpoint] {FAULT_ENV}={spec}: killing rank {os.environ.get('RANK', '0')} "
              f"(pid {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------- distributed glue
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    if not _dist_on() or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, rank: int) -> Any:
    if not _dist_on():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves and loads the checkpoints of one run (every rank makes one).

    Args:
        cfg: the run's ``CheckpointConfig`` (dir, every, keep, milestone_every, resume).
        engine: the DeepSpeed engine.
        rank, world_size: this process in the data-parallel world.
        verbose: print one line per save/resume on rank 0.
    """

    def __init__(self, cfg, engine, rank: int, world_size: int, verbose: bool = True) -> None:
        if not cfg.dir:
            raise CheckpointError("checkpoint.dir is not set: no place to write checkpoints")
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self.verbose = verbose
        self.loaded: Optional[CheckpointInfo] = None   # what load() restored
        self.resharded = False                         # load() crossed a world-size change

    def _say(self, msg: str) -> None:
        if self.verbose and self.rank == 0:
            print(f"[checkpoint] {msg}", flush=True)

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Write checkpoint ``step_%08d`` (all ranks call this); returns the tag.

        ``client_state`` is the same on every rank (step, schedule, run id, config, ...);
        ``rank_state`` is this rank's (reader position, RNG). Every rank's ``rank_state`` is gathered
        into the saved client state. The tag becomes visible only when complete.
        """
        t0 = time.perf_counter()
        tag = tag_for_step(step)
        tag_dir = self.dir / tag
        rank_states = _all_gather(rank_state, self.world_size)
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"cannot create checkpoint.dir {self.dir}: {exc}") from None
            if tag_dir.exists():  # a half-written leftover, or a tag of an abandoned timeline
                self._say(f"replacing existing {tag_dir}")
                remove_tag(tag_dir)
        _barrier()
        stored = {STATE_KEY: {
            "format": FORMAT_VERSION,
            "step": int(step),
            "world_size": self.world_size,
            "client": client_state,
            "rank_states": rank_states,
        }}
        try:
            ok = self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=stored,
                                             save_latest=False)
        except Exception as exc:
            raise CheckpointError(f"DeepSpeed could not write checkpoint {tag_dir}: {exc}") from exc
        if ok is False:
            raise CheckpointError(f"DeepSpeed could not write checkpoint {tag_dir}")
        _fault("before_complete", step)
        for p in sorted(tag_dir.iterdir()):   # make what this rank wrote durable
            if p.is_file() and _owner_rank(p.name) == self.rank:
                _fsync_file(p)
        _barrier()
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
            if not files:
                raise CheckpointError(f"DeepSpeed wrote no files into {tag_dir}")
            _fsync_dir(tag_dir)
            meta = {
                "tag": tag, "step": int(step), "world_size": self.world_size,
                "zero_stage": int(self.engine.zero_optimization_stage()),
                "bf16": bool(self.engine.bfloat16_enabled()),
                "deepspeed": _ds_version(), "format": FORMAT_VERSION,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
            }
            atomic_write_text(tag_dir / COMPLETE, json.dumps(meta, indent=1))
            atomic_write_text(self.dir / LATEST, tag)
            self.prune()
        _barrier()
        self._say(f"saved {tag_dir} ({self.world_size} rank(s), {time.perf_counter() - t0:.1f} s)")
        return tag

    # ------------------------------------------------------------------------- retention
    def prune(self) -> list[str]:
        """Apply checkpoint.keep / milestone_every (rank 0); returns the deleted tags."""
        infos = list_checkpoints(self.dir)
        complete = [i for i in infos if i.complete]
        if not complete:
            return []
        newest = complete[-1].step
        keep = {i.tag for i in complete[-self.cfg.keep:]}
        if self.cfg.milestone_every > 0:
            keep |= {i.tag for i in complete if i.step % self.cfg.milestone_every == 0}
        doomed = [i for i in complete if i.tag not in keep]
        doomed += [i for i in infos if not i.complete and i.step < newest]
        for i in doomed:
            remove_tag(i.path)
        for leftover in self.dir.glob(".trash-*"):   # deletions a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        return [i.tag for i in doomed]

    # ---------------------------------------------------------------------------- resume
    def find_resume(self) -> Optional[str]:
        """The tag to resume from per ``checkpoint.resume``: "auto" = the newest complete tag in
        ``checkpoint.dir`` (None when there is none), "never" = None, else that tag (which must
        exist and be complete). Rank 0 decides; every rank gets the same answer."""
        choice: Any = None
        if self.rank == 0:
            try:
                choice = self._choose()
            except CheckpointError as exc:
                choice = exc
        choice = _broadcast(choice, self.rank)
        if isinstance(choice, Exception):
            raise choice
        return choice

    def _choose(self) -> Optional[str]:
        mode = (self.cfg.resume or "auto").strip()
        if mode == "never":
            return None
        if mode in ("auto", "latest"):
            info = newest_complete(self.dir)
            return info.tag if info else None
        tag = tag_for_step(int(mode)) if mode.isdigit() else mode
        tag_dir = self.dir / tag
        available = [i.tag for i in list_checkpoints(self.dir) if i.complete]
        if not tag_dir.is_dir():
            raise CheckpointError(f"checkpoint.resume={mode}: {tag_dir} does not exist "
                                  f"(complete checkpoints: {available or 'none'})")
        info = CheckpointInfo(tag, step_of_tag(tag), tag_dir, False, read_marker(tag_dir) or {})
        if not info.meta:
            raise CheckpointError(f"checkpoint.resume={mode}: {tag_dir} is incomplete (no {COMPLETE} "
                                  f"marker; complete checkpoints: {available or 'none'})")
        problem = verify_files(CheckpointInfo(tag, info.step, tag_dir, True, info.meta))
        if problem:
            raise CheckpointError(f"checkpoint.resume={mode}: {problem}")
        return tag

    def load(self, tag: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """Restore weights, optimizer and LR schedule from ``tag`` (all ranks); returns
        ``(client_state, this_rank_state)``. Across a world-size change the optimizer comes from the
        universal form and ``this_rank_state`` from ``reshard_rank_states``."""
        t0 = time.perf_counter()
        tag_dir = self.dir / tag
        meta = read_marker(tag_dir)
        if meta is None:
            raise CheckpointError(f"cannot resume from {tag_dir}: no {COMPLETE} marker (incomplete or "
                                  f"not a dyntrain checkpoint)")
        saved_world = int(meta["world_size"])
        partitioned = bool(glob.glob(str(tag_dir / "*_optim_states.pt")))
        self.resharded = saved_world != self.world_size
        load_tag = tag
        if self.resharded and partitioned:
            if self.rank == 0:
                self._say(f"{tag} was written by {saved_world} rank(s), this run has {self.world_size}: "
                          f"loading it through DeepSpeed's universal checkpoint format")
                ensure_universal(tag_dir)
            _barrier()
            load_tag = f"{tag}/{UNIVERSAL}"
        engine = self.engine
        # DeepSpeed 0.19 reads checkpoint.load_universal only inside load_checkpoint, so the flag
        # is switched for this one load instead of being fixed in the engine's JSON
        universal_before = engine._config.load_universal_checkpoint
        engine._config.load_universal_checkpoint = load_tag != tag
        try:
            path, stored = engine.load_checkpoint(str(self.dir), tag=load_tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception as exc:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.dir / load_tag}: "
                                  f"{exc}") from exc
        finally:
            engine._config.load_universal_checkpoint = universal_before
        if path is None or not stored or STATE_KEY not in stored:
            raise CheckpointError(f"{self.dir / load_tag} holds no dyntrain client state")
        ours = stored[STATE_KEY]
        if int(ours["step"]) != step_of_tag(tag):
            raise CheckpointError(f"{tag_dir}: the client state says step {ours['step']}")
        rank_states = ours["rank_states"]
        if self.resharded:
            rank_state = reshard_rank_states(rank_states, self.rank, self.world_size)
            self._say(_reshard_note(rank_states, self.world_size))
        else:
            rank_state = rank_states[self.rank]
        self.loaded = CheckpointInfo(tag, step_of_tag(tag), tag_dir, True, meta)
        self._say(f"resumed from {tag_dir} (step {ours['step']}, written by {saved_world} rank(s)"
                  f"{', resharded to %d' % self.world_size if self.resharded else ''}; "
                  f"{time.perf_counter() - t0:.1f} s)")
        return ours["client"], rank_state


# ------------------------------------------------------------------- world-size change
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


def _reshard_note(saved: list[dict[str, Any]], world_size: int) -> str:
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
            _fsync_file(p)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    _fsync_dir(tag_dir)
    return out



# ---------------------------------------------------------------------- reading a checkpoint
def resolve_tag_dir(path: str | Path, tag: Optional[str] = None) -> Path:
    """The tag folder meant by ``path``: a tag folder itself, or a checkpoint directory (then
    ``tag``, or its newest complete tag)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if tag is not None:
        path = path / tag
        if not path.is_dir():
            raise CheckpointError(f"checkpoint tag folder {path} does not exist")
    if glob.glob(str(path / "*_model_states.pt")):
        return path
    info = newest_complete(path)
    if info is None:
        found = [i.tag for i in list_checkpoints(path)]
        raise CheckpointError(f"{path} holds no complete checkpoint (tags found: {found or 'none'})")
    return info.path


def model_states_file(tag_dir: Path) -> Path:
    """The DeepSpeed ``*_model_states.pt`` file of a tag folder (weights and client state)."""
    files = sorted(glob.glob(str(tag_dir / "mp_rank_*_model_states.pt")))
    files = files or sorted(glob.glob(str(tag_dir / "zero_pp_rank_0_mp_rank_*_model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed *_model_states.pt file")
    return Path(files[0])


def read_client_state(path: str | Path, tag: Optional[str] = None) -> dict[str, Any]:
    """The dyntrain client state of a checkpoint (step, world size, client dict, rank states)
    without building an engine."""
    tag_dir = resolve_tag_dir(path, tag)
    sd = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)
    ours = sd.get(STATE_KEY)
    if ours is None:
        raise CheckpointError(f"{tag_dir} holds no dyntrain client state")
    return ours


def _ds_version() -> str:
    try:
        import deepspeed
        return deepspeed.__version__
    except Exception:  # pragma: no cover - deepspeed is part of the fixed stack
        return "unknown"


# ------------------------------------------------------------------------------------ CLI
def _progress(argv: list[str]) -> int:
    """``progress --config C [overrides]``: where the run of that config stands, for job scripts:
    ``step=<newest complete step or none> max_steps=<M> finished=<0|1> dir=<checkpoint.dir>``."""
    from .config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m dyntrain.checkpoint progress")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    info = newest_complete(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    step = info.step if info else None
    finished = int(step is not None and step >= cfg.run.max_steps)
    print(f"step={step if step is not None else 'none'} max_steps={cfg.run.max_steps} "
          f"finished={finished} dir={cfg.checkpoint.dir}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "progress":
        print("usage: python -m dyntrain.checkpoint progress --config C [dotted.key=value ...]\n"
              "(export and universal conversion: python launch/export.py --help)", file=sys.stderr)
        return 2
    return _progress(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
