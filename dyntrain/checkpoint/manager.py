"""``CheckpointManager``: atomic saves, retention, resume selection and loading for one run.

Atomicity. All ranks gather their rank states (DeepSpeed stores the client state of one writer
only), call ``engine.save_checkpoint(dir, tag, save_latest=False)``, fsync the files they wrote and
meet at a barrier; only then does rank 0 write ``COMPLETE`` (temp file + fsync + ``os.replace``) and
replace ``latest`` the same way. A tag without ``COMPLETE`` does not exist as far as resuming is
concerned, so a run killed while writing leaves the previous checkpoint as the newest usable one.
Resuming picks the complete tag with the highest step (not blindly ``latest``) and checks that
every file the marker lists is present with its recorded size. A fresh start into a folder that
holds tags is refused (or, with ``checkpoint.overwrite``, clears them first): two runs' tags never mix.

Retention (rank 0, after each save): keep the newest ``checkpoint.keep`` complete tags plus every
tag whose step is a multiple of ``checkpoint.milestone_every``; delete older complete tags and
half-written tags older than the newest complete one. A tag loses its ``COMPLETE`` marker before
any of its files is removed, so a crash while deleting never leaves a "complete" partial tag.

A world-size change at ``load`` goes through ``reshard`` (universal format, data policy).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dyntrain.checkpoint.collective import all_gather, barrier, broadcast
from dyntrain.checkpoint.files import (PRIVATE_DIR, PRIVATE_FILE, atomic_write_text, fsync_dir, fsync_file,
                                      remove_tag, retire_tag)
from dyntrain.checkpoint.layout import (COMPLETE, FORMAT_VERSION, LATEST, STATE_KEY, UNIVERSAL,
                                        CheckpointError, CheckpointInfo, list_checkpoints, owner_rank,
                                        read_marker, resume_tag, step_of_tag, tag_for_step)
from dyntrain.checkpoint.reshard import ensure_universal, reshard_rank_states
from dyntrain.checkpoint.unpickle import SafeCheckpointEngine, check_tag_files
from dyntrain.errors import one_line
from dyntrain.logs import get_logger


log = get_logger(__package__)  # lines read "[time checkpoint] ..."

BeforeCommit = Callable[[int, Path], None]


class CheckpointManager:
    """Saves and loads the checkpoints of one run (every rank makes one).

    Args:
        cfg: the run's ``CheckpointConfig`` (dir, every, keep, milestone_every, resume).
        engine: the DeepSpeed engine.
        rank, world_size: this process in the data-parallel world.
        verbose: log one line per save/resume (rank 0's INFO).
        before_commit: optional ``fn(step, tag_dir)``, called on every rank in ``save`` after
            DeepSpeed wrote the tag's files and before they are made durable and marked
            ``COMPLETE``: an extension point to inspect or mirror the files, or to find out what a
            crash at the worst moment of a save leaves behind.
    """

    def __init__(self, cfg, engine, rank: int, world_size: int, verbose: bool = True,
                 before_commit: Optional[BeforeCommit] = None) -> None:
        if not cfg.dir:
            raise CheckpointError("checkpoint.dir is not set: no place to write checkpoints")
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self.verbose = verbose
        self.before_commit = before_commit
        self.loaded: Optional[CheckpointInfo] = None   # what load() restored
        self.resharded = False                         # load() crossed a world-size change
        self._deleting: list[threading.Thread] = []   # retention's deletions under way

    def _say(self, msg: str) -> None:
        if self.verbose:
            log.info(msg)

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
        rank_states = all_gather(rank_state, self.world_size)
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"cannot create checkpoint.dir {self.dir}: {exc}") from None
            if tag_dir.exists():  # a half-written leftover, or a tag of an abandoned timeline
                self._say(f"replacing existing {tag_dir}")
                remove_tag(tag_dir)
            tag_dir.mkdir(mode=PRIVATE_DIR)  # readable by the owner only (docs/security.md)
            os.chmod(tag_dir, PRIVATE_DIR)
        barrier()
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
            raise CheckpointError(f"DeepSpeed could not write checkpoint {tag_dir}: "
                                  f"{one_line(exc)}{_free_space(self.dir)}") from exc
        if ok is False:
            raise CheckpointError(f"DeepSpeed could not write checkpoint {tag_dir}{_free_space(self.dir)}")
        if self.before_commit is not None:
            self.before_commit(int(step), tag_dir)
        try:
            for p in sorted(tag_dir.iterdir()):   # make what this rank wrote durable
                if p.is_file() and owner_rank(p.name) == self.rank:
                    fsync_file(p)
            barrier()
            if self.rank == 0:
                self._commit(step, tag_dir, int(client_state.get("data_ranks") or self.world_size))
        except OSError as exc:   # a full or failing disk; `latest` still names the previous tag
            raise CheckpointError(f"cannot complete checkpoint {tag_dir}: {exc}"
                                  f"{_free_space(self.dir)}") from exc
        barrier()
        self._say(f"saved {tag_dir} ({self.world_size} rank(s), {time.perf_counter() - t0:.1f} s)")
        return tag

    def _commit(self, step: int, tag_dir: Path, data_ranks: int) -> None:
        """Rank 0, once every rank's files are durable: the marker, ``latest``, retention."""
        for p in tag_dir.iterdir():
            if p.is_file():
                os.chmod(p, PRIVATE_FILE)
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        if not files:
            raise CheckpointError(f"DeepSpeed wrote no files into {tag_dir}")
        fsync_dir(tag_dir)
        meta = {
            "tag": tag_dir.name, "step": int(step), "world_size": self.world_size, "data_ranks": data_ranks,
            "zero_stage": int(self.engine.zero_optimization_stage()),
            "bf16": bool(self.engine.bfloat16_enabled()),
            "deepspeed": _ds_version(), "format": FORMAT_VERSION,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
        }
        atomic_write_text(tag_dir / COMPLETE, json.dumps(meta, indent=1))
        atomic_write_text(self.dir / LATEST, tag_dir.name)
        self.prune()

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
        trash = [retire_tag(i.path) for i in doomed]
        # and deletions a crash interrupted; the files go in a thread, off the training loop (a
        # checkpoint of many files, e.g. with the universal copy of a resume on another world size,
        # took 1.6 s to delete on the test machine, minutes on a loaded shared filesystem). Not a
        # daemon: the process waits for it at exit; a kill leaves .trash-* for the next prune.
        trash += [p for p in self.dir.glob(".trash-*") if p not in trash]
        if trash:
            thread = threading.Thread(target=_delete, args=(trash,), name="checkpoint-retention")
            thread.start()
            self._deleting = [t for t in self._deleting if t.is_alive()] + [thread]
        return [i.tag for i in doomed]

    def wait_deleted(self, timeout: Optional[float] = None) -> None:
        """Wait for the folders retention is deleting (``prune`` deletes them in a thread)."""
        for thread in self._deleting:
            thread.join(timeout)

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
        choice = broadcast(choice, self.rank)
        if isinstance(choice, Exception):
            raise choice
        return choice

    def _choose(self) -> Optional[str]:
        mode = (self.cfg.resume or "auto").strip()
        if mode == "never":
            self._clear_for_fresh_start()
            return None
        tag = resume_tag(self.dir, mode)
        if tag is not None and mode in ("auto", "latest"):
            self._point_latest_at(tag)
        return tag

    def _point_latest_at(self, tag: str) -> None:
        """Rank 0, resuming from the newest complete ``tag``: a job killed between a tag's
        ``COMPLETE`` and ``latest`` (or a tag whose files failed their check) leaves ``latest``
        missing or naming another tag; it names the tag the run continues from again."""
        path = self.dir / LATEST
        current = path.read_text().strip() if path.is_file() else None
        if current != tag:
            atomic_write_text(path, tag)
            self._say(f"{LATEST} named {current or 'nothing'}; it now names {tag}, the newest complete checkpoint")

    def _clear_for_fresh_start(self) -> None:
        """Rank 0, before a fresh start (``checkpoint.resume=never``): tags already in
        ``checkpoint.dir`` belong to another run, and the new run's tags would mix with them (its
        step 200 replacing theirs while their step 300 stays the newest). Refused, naming the folder
        and its newest tag, unless ``checkpoint.overwrite`` is set: then they are deleted first."""
        others = list_checkpoints(self.dir)
        if not others:
            return
        newest = others[-1]
        held = (f"{len(others)} checkpoint(s) of another run, newest {newest.tag}"
                + ("" if newest.complete else " (incomplete)"))
        if not getattr(self.cfg, "overwrite", False):
            raise CheckpointError(
                f"checkpoint.dir {self.dir} holds {held}: a fresh start (checkpoint.resume=never) would "
                f"mix its tags with them; resume it (checkpoint.resume=auto), choose another "
                f"checkpoint.dir, or set checkpoint.overwrite=true to delete them first")
        log.warning(f"checkpoint.overwrite=true: deleting {held} from {self.dir}")
        for info in others:
            remove_tag(info.path)
        (self.dir / LATEST).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def load(self, tag: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """Restore weights, optimizer and LR schedule from ``tag`` (all ranks); returns
        ``(client_state, this_rank_state)``. Across a world-size change the optimizer comes from the
        universal form and ``this_rank_state`` from ``reshard_rank_states`` (the loader decides what
        its readers resume: ``dyntrain.data.logical``)."""
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
        check_tag_files(tag_dir)  # DeepSpeed unpickles what it loads: refuse foreign objects first
        if self.resharded and partitioned:
            if self.rank == 0:
                self._say(f"{tag} was written by {saved_world} rank(s), this run has {self.world_size}: "
                          f"loading it through DeepSpeed's universal checkpoint format")
                ensure_universal(tag_dir)
            barrier()
            load_tag = f"{tag}/{UNIVERSAL}"
        ours = self._engine_load(load_tag, universal=load_tag != tag)
        if int(ours["step"]) != step_of_tag(tag):
            raise CheckpointError(f"{tag_dir}: the client state says step {ours['step']}")
        rank_states = ours["rank_states"]
        if self.resharded:
            rank_state = reshard_rank_states(rank_states, self.rank, self.world_size)
        else:
            rank_state = rank_states[self.rank]
        self.loaded = CheckpointInfo(tag, step_of_tag(tag), tag_dir, True, meta)
        self._say(f"resumed from {tag_dir} (step {ours['step']}, written by {saved_world} rank(s)"
                  f"{', resharded to %d' % self.world_size if self.resharded else ''}; "
                  f"{time.perf_counter() - t0:.1f} s)")
        return ours["client"], rank_state

    def _engine_load(self, load_tag: str, universal: bool) -> dict[str, Any]:
        """``engine.load_checkpoint`` of ``load_tag`` (weights, optimizer, LR schedule); returns our
        part of the client state."""
        engine = self.engine
        # DeepSpeed 0.19 reads checkpoint.load_universal only inside load_checkpoint, so the flag
        # is switched for this one load instead of being fixed in the engine's JSON
        universal_before = engine._config.load_universal_checkpoint
        engine._config.load_universal_checkpoint = universal
        reader = engine.checkpoint_engine  # its files read with weights_only=True (unpickle.py)
        engine.checkpoint_engine = SafeCheckpointEngine(reader)
        try:
            path, stored = engine.load_checkpoint(str(self.dir), tag=load_tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception as exc:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.dir / load_tag}: "
                                  f"{exc}") from exc
        finally:
            engine._config.load_universal_checkpoint = universal_before
            engine.checkpoint_engine = reader
        if path is None or not stored or STATE_KEY not in stored:
            raise CheckpointError(f"{self.dir / load_tag} holds no dyntrain client state")
        return stored[STATE_KEY]


def _delete(folders: list[Path]) -> None:
    """Delete retired checkpoint folders (a thread of ``prune``); one that cannot go is said once."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning(f"warning: could not delete {folder} (retention); delete it by hand")


def _free_space(path: Path) -> str:
    """" (N MiB free on its filesystem)" for an error message; empty when unknown."""
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.1f} MiB free on its filesystem)"
    except OSError:
        return ""


def _ds_version() -> str:
    try:
        # lazy: deepspeed is slow to import and unused by inference
        import deepspeed
        return deepspeed.__version__
    except Exception:  # pragma: no cover - deepspeed is part of the fixed stack
        return "unknown"
