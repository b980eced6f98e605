"""What a ``Trainer`` saves, restores and traces (a mixin of ``dyntrain.train.trainer.Trainer``).

Checkpoint state: the global client state (step, schedule description and state - the cost-aware
probability table -, GPU-hour account, MLflow run id and the metric values not yet sent to it,
resolved config, world size, data ranks) plus ``rank_state`` (this rank's torch/numpy/python/CUDA
RNG and loader state), which makes a resume exact with the same number of ranks, and with fewer
ranks that host the same data ranks (``dyntrain.data.logical``).

Trace (debugging, tests): after ``enable_trace(directory)`` every rank appends each step's record
(variant, loss, sample keys) to ``trace_rank<r>.steps.jsonl`` there as the step is read, flushed at
once, so a segment killed with SIGKILL still shows its steps; at the end of ``train`` it writes
``trace_rank<r>.json`` (the steps, a SHA-256 of the full fp32 weights, the account, the loader's
stats). ``read_trace`` reads either. ``run_training(trace_dir=...)`` switches it on; one folder per
process run (a second run in the same folder starts both files afresh).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dyntrain.logs import get_logger


log = get_logger(__name__)


class TrainerStateMixin:
    """Needs the trainer's ``cfg``, ``engine``, ``loader``, ``schedule``, ``account``, ``tracker``,
    ``checkpoint_manager``, ``rank``, ``world_size``, ``device``, ``step``, ``stopped_early``,
    ``mlflow_run_id``, ``_last_saved_step``, ``_trace``, ``_trace_dir`` and ``_trace_file``."""

    # ---------------------------------------------------------------------------- resume
    def restore(self, tag: str, state: dict[str, Any]) -> None:
        """Continue from checkpoint ``tag`` whose state ``load_resume_state`` read."""
        self.load_state_dict(state)
        self._last_saved_step = self.step
        log.info(f"[{self.cfg.run.name}] resumed from {tag} at step {self.step}")

    def state_dict(self) -> dict[str, Any]:
        """Global client state plus ``rank_state`` (this rank's RNG and loader state)."""
        return {
            "step": self.step,
            "schedule": self.schedule.describe(),
            "schedule_state": self.schedule.state_dict(),
            "account": self.account.state_dict(),
            "mlflow_run_id": self.tracker.run_id or self.mlflow_run_id,
            "tracking_unsent": self.tracker.unsent_metrics(),  # sent again by the resumed run
            "config": self.cfg.public_dict(),  # credentials redacted; a resume uses its own config
            "world_size": self.world_size,
            "data_ranks": self.data_ranks,
            "rank_state": self.rank_state(),
        }

    def rank_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rank": self.rank, "world_size": self.world_size, "data_ranks": self.data_ranks, "rng": rng,
                "loader": self.loader.state_dict()}

    @property
    def data_ranks(self) -> int:
        """The readers the data is split into (``dyntrain.data.logical``; one per rank by default)."""
        return int(getattr(self.loader, "data_ranks", self.world_size))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if state.get("schedule") and state["schedule"] != self.schedule.describe() and self.rank == 0:
            log.warning(f"[{self.cfg.run.name}] warning: the variant schedule differs from the checkpoint's "
                        f"({state['schedule']} -> {self.schedule.describe()}); the draw sequence after "
                        f"step {self.step} is not the one the original run would have drawn")
        if state.get("schedule_state"):
            self.schedule.load_state_dict(state["schedule_state"])  # the cost-aware probability table
        if state.get("account"):
            self.account.load_state_dict(state["account"])
        self.mlflow_run_id = state.get("mlflow_run_id") or self.mlflow_run_id
        rank_state = state.get("rank_state")
        if rank_state is None:
            if self.rank == 0:
                log.warning(f"[{self.cfg.run.name}] warning: no per-rank state for rank {self.rank} in the "
                            f"checkpoint; RNG and reader positions start fresh (resume is not exact)")
            return
        rng = rank_state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.loader.load_rank_state(rank_state)  # data ranks: it picks its readers' states

    # ----------------------------------------------------------------------------- trace
    def enable_trace(self, directory: str | Path) -> None:
        """Record every step (variant, loss, sample keys) and write ``<directory>/trace_rank<r>.json``
        with the final weights' SHA-256 when ``train`` ends (call on every rank: the digest is
        collective under ZeRO-3)."""
        self._trace_dir = Path(directory)
        if self._trace is None:
            self._trace = []
        self._trace_dir.mkdir(parents=True, exist_ok=True)
        self._trace_file = open(self._trace_dir / f"trace_rank{self.rank}.steps.jsonl", "w")

    def _trace_step(self, record: dict[str, Any]) -> None:
        """Keep one step's trace record and append it to the steps file now (survives kill -9)."""
        self._trace.append(record)
        if self._trace_file is not None:
            self._trace_file.write(json.dumps(record) + "\n")
            self._trace_file.flush()

    def weights_digest(self) -> str:
        """SHA-256 of the full fp32 weights (collective under ZeRO-3: call on all ranks)."""
        # lazy: deepspeed is slow to import and unused by inference
        import deepspeed

        params = list(self.engine.module.parameters())
        stage3 = self.cfg.deepspeed.zero_stage == 3
        h = hashlib.sha256()
        with deepspeed.zero.GatheredParameters(params, enabled=stage3):
            for name, p in self.engine.module.named_parameters():
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _write_trace(self) -> None:
        trace_dir = self._trace_dir
        if trace_dir is None or self._trace is None:
            return
        digest = self.weights_digest()
        trace_dir.mkdir(parents=True, exist_ok=True)
        out = {"rank": self.rank, "world_size": self.world_size, "final_step": self.step,
               "stopped_early": self.stopped_early, "steps": self._trace, "weights_sha256": digest,
               "account": self.account.metrics(), "loader_stats": self.loader.stats()}
        (trace_dir / f"trace_rank{self.rank}.json").write_text(json.dumps(out))
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None


def read_trace(directory: str | Path, rank: int = 0) -> Optional[dict[str, Any]]:
    """Rank ``rank``'s trace in ``directory``: the end-of-run ``trace_rank<r>.json``, or for a run that
    did not reach its end (killed) the steps it recorded, with ``killed: True`` and no weights digest
    (a record cut short by the kill is left out). None when the rank traced nothing there."""
    directory = Path(directory)
    final = directory / f"trace_rank{rank}.json"
    if final.exists():
        return {**json.loads(final.read_text()), "killed": False}
    steps_file = directory / f"trace_rank{rank}.steps.jsonl"
    if not steps_file.exists():
        return None
    steps = []
    for line in steps_file.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:   # the last line, half written when the process died
            break
    return {"rank": rank, "steps": steps, "final_step": steps[-1]["step"] + 1 if steps else None,
            "weights_sha256": None, "killed": True}


def load_resume_state(manager) -> Optional[tuple[str, dict[str, Any]]]:
    """(tag, trainer state) of the checkpoint ``manager.find_resume()`` names; None for a fresh start
    (or no manager). Read before the trainer exists, so that the tracker can rejoin the MLflow run
    the checkpoint records."""
    if manager is None:
        return None
    tag = manager.find_resume()
    if tag is None:
        return None
    client_state, rank_state = manager.load(tag)
    return tag, {**client_state, "rank_state": rank_state}
