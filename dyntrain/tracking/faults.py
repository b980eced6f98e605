"""What faults cost the GPU-hour account (``account.py``, whose docstring defines the causes): steps
computed again after a resume (``replay``), the start-up and warm-up of a resumed segment
(``restart``), steps that waited past a bound (``stall``). ``FaultLedger`` books them for the account;
``account_progress.json`` beside the checkpoints records the furthest step a run reached, so that a
resume from an older checkpoint knows which steps it computes again."""
from __future__ import annotations

import json
import os
import statistics
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

STALL_FACTOR = 3.0        # a step longer than 3 x its typical time ...
STALL_FLOOR_S = 0.5       # ... + 0.5 s is a stall (the floor keeps the jitter of tiny steps out)
STALL_WINDOW = 15         # the typical time: median of the label's last 15 ordinary steps
STALL_MIN_SAMPLES = 3     # judged only once 3 were seen
LOST_CAUSES = ("stall", "replay", "restart")
PROGRESS_FILE = "account_progress.json"


def read_progress(directory) -> tuple[Optional[str], int]:
    """(run key, furthest step) in ``directory``'s ``account_progress.json``; (None, 0) when there is
    none or it cannot be read."""
    try:
        data = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        return str(data["run_key"]), int(data["furthest_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0


def write_progress(directory, run_key: str, step: int) -> None:
    """Record atomically that the run ``run_key`` reached ``step`` (rank 0, after every step)."""
    path = Path(directory) / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"run_key": run_key, "furthest_step": int(step)}))
    os.replace(tmp, path)


class ProgressWriter:
    """``write_progress`` off the training loop: ``update`` keeps the newest step and a daemon thread
    writes it (a write per step on shared storage would make rank 0, and so every rank, wait on the
    file system each step; between writes the steps coalesce). A write that fails ends the writer with
    one warning (``on_error``); the account then cannot tell replays, never worth a stop. ``close``
    writes the last step and waits for it."""

    def __init__(self, directory, on_error=None) -> None:
        self.directory = directory
        self.on_error = on_error
        self._latest: Optional[tuple[str, int]] = None
        self._written: Optional[tuple[str, int]] = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="account-progress", daemon=True)
        self._thread.start()

    def update(self, run_key: str, step: int) -> None:
        with self._wake:
            self._latest = (run_key, int(step))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._latest == self._written and not self._closed:
                    self._wake.wait()
                latest, closed = self._latest, self._closed
            if latest is not None and latest != self._written:
                try:
                    write_progress(self.directory, *latest)
                except OSError as exc:
                    if self.on_error is not None:
                        self.on_error(exc)
                    return
                self._written = latest
            if closed:
                return

    def close(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)


class FaultLedger:
    """The seconds lost by cause (``lost``; ``replay`` holds the replayed steps' own time, their share
    of the time outside steps is added by ``lost_by_cause``), the counts, and what tells a fault: the
    typical time of each step label, the furthest step reached, the labels stepped in this segment."""

    def __init__(self) -> None:
        self.lost = {c: 0.0 for c in LOST_CAUSES}
        self.replayed_steps = 0
        self.stalled_steps = 0
        self.segments = 1
        self.recent: dict[str, list[float]] = {}  # label -> its last ordinary step times
        self.furthest_step = 0   # the furthest step any segment reached
        self.replay_until = 0    # steps below this one are replays (set by a resume)
        self.run_key = uuid.uuid4().hex  # ties account_progress.json to this run
        self._warm: set[str] = set()     # labels stepped in this segment

    @property
    def resumed(self) -> bool:
        """Whether this segment continues an earlier one (a restart)."""
        return self.segments > 1

    def add_startup(self, seconds: float) -> None:
        if self.resumed:
            self.lost["restart"] += seconds

    def continue_after(self, run_key: Optional[str], furthest_step: int) -> None:
        """A resume read ``account_progress.json``: steps below the furthest one an earlier segment of
        this run reached (``run_key`` = this run's) will be replays."""
        if run_key == self.run_key:
            self.furthest_step = max(self.furthest_step, int(furthest_step))
        self.replay_until = self.furthest_step

    def replayed(self, step: Optional[int], label: str, seconds: float) -> bool:
        """Whether step ``step`` (0-based; None: not judged) is a replay; books it if so."""
        if step is None:
            return False
        self.furthest_step = max(self.furthest_step, int(step) + 1)
        if step >= self.replay_until:
            return False
        self._warm.add(label)
        self.lost["replay"] += seconds
        self.replayed_steps += 1
        return True

    def typical_s(self, label: str) -> Optional[float]:
        """The typical time of a step of ``label``: the median of its recent ordinary steps once
        there are STALL_MIN_SAMPLES; before, the largest such median of the other labels (a stall
        early in the run, before a variant was measured, is still one); None before any."""
        medians = {k: statistics.median(v) for k, v in self.recent.items() if len(v) >= STALL_MIN_SAMPLES}
        return medians.get(label, max(medians.values(), default=None))

    def judge(self, label: str, seconds: float) -> float:
        """The productive part of a step of ``label`` that took ``seconds`` (not a replay): books a
        restart's warm-up or a stall's excess as lost and keeps the typical times."""
        typical = self.typical_s(label)
        warm_up = label not in self._warm
        self._warm.add(label)
        if warm_up and self.resumed and typical is not None:
            self.lost["restart"] += max(0.0, seconds - typical)
            return min(seconds, typical)
        if not warm_up and typical is not None and seconds > STALL_FACTOR * typical + STALL_FLOOR_S:
            self.lost["stall"] += seconds - typical
            self.stalled_steps += 1
            return typical
        if not warm_up:
            self.recent[label] = (self.recent.get(label, []) + [float(seconds)])[-STALL_WINDOW:]
        return seconds

    def lost_by_cause(self, total_s: float, step_sum: float) -> dict[str, float]:
        """Seconds lost by cause in a run of ``total_s`` whose productive steps took ``step_sum``: the
        replays with their pro-rata share of the time outside steps."""
        lost = dict(self.lost)
        if lost["replay"] > 0:
            outside = total_s - sum(lost.values()) - step_sum
            lost["replay"] *= 1.0 + max(0.0, outside) / (step_sum + lost["replay"])
        return lost

    def state_dict(self) -> dict[str, Any]:
        return {"lost": dict(self.lost), "replayed_steps": self.replayed_steps,
                "stalled_steps": self.stalled_steps, "segments": self.segments,
                "recent": {k: list(v) for k, v in self.recent.items()},
                "furthest_step": self.furthest_step, "run_key": self.run_key}

    def load_state_dict(self, state: dict[str, Any], scale: float, steps: int) -> None:
        """Continue a checkpoint's ledger in a new segment; ``scale`` converts its seconds to this
        segment's accelerators, ``steps``: the checkpoint's step."""
        self.lost = {c: float(state.get("lost", {}).get(c, 0.0)) * scale for c in LOST_CAUSES}
        self.replayed_steps = int(state.get("replayed_steps", 0))
        self.stalled_steps = int(state.get("stalled_steps", 0))
        self.segments = int(state.get("segments", 1)) + 1
        self.recent = {k: [float(x) * scale for x in v] for k, v in state.get("recent", {}).items()}
        self.furthest_step = max(int(state.get("furthest_step", 0)), steps)
        self.replay_until = self.furthest_step
        self.run_key = str(state.get("run_key") or self.run_key)
        self._warm = set()
