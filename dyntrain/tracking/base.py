"""The tracker interface the trainer and the evaluators talk to, and the fan-out over several.

A tracker receives params, metrics, tags, texts and artifacts, plus two training events: the run's
header before the first step (``log_start``) and its end (``log_end``). ``Tracker`` does nothing with
any of them; ``MLflowTracker`` records the data, ``ConsoleTracker`` writes the readable lines.
``TrackerGroup`` hands every call to each of its members, so the trainer talks to one object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class RunHeader:
    """What a training run announces before its first step."""
    schedule_mode: str                # "dynamic" or "fixed"
    probs: dict[str, float]           # variant -> probability (the trained ones)
    world_size: int
    device_type: str
    zero_stage: int
    bf16: bool
    global_batch: int
    start_step: int
    max_steps: int
    run_id: Optional[str] = None      # the MLflow run, when there is one


class Tracker:
    """The interface; every method is a no-op here."""
    run_id: Optional[str] = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: str) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_datasets(self, datasets: list[dict]) -> None: ...
    def log_start(self, header: RunHeader) -> None: ...
    def log_end(self, step: int, stopped_early: bool, metrics: dict[str, float]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def unsent_metrics(self) -> list:
        """Metric values logged but not yet stored, as (key, value, timestamp ms, step); a checkpoint
        carries them (``MLflowTracker``)."""
        return []


class NullTracker(Tracker):
    """The tracker of ranks != 0 and of runs with tracking.enabled=False: does nothing."""


class TrackerGroup(Tracker):
    """Several trackers behind one: each call goes to every member, in order.

    ``run_id`` is the first member's run id that is set (the MLflow run's). A member written to
    an older interface (no ``log_start``/``log_end``) simply misses those calls.
    """

    def __init__(self, *members: Tracker) -> None:
        self.members = [m for m in members if m is not None]

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        return next((m.run_id for m in self.members if getattr(m, "run_id", None)), None)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for member in self.members:
            fn = getattr(member, method, None)
            if fn is not None:
                fn(*args, **kwargs)

    def log_params(self, params: dict) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        self._each("log_metrics", metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        self._each("set_tags", tags)

    def log_artifact(self, path: str) -> None:
        self._each("log_artifact", path)

    def log_text(self, text: str, name: str) -> None:
        self._each("log_text", text, name)

    def log_datasets(self, datasets: list[dict]) -> None:
        self._each("log_datasets", datasets)

    def log_start(self, header: RunHeader) -> None:
        self._each("log_start", header)

    def log_end(self, step: int, stopped_early: bool, metrics: dict[str, float]) -> None:
        self._each("log_end", step, stopped_early, metrics)

    def finish(self, status: str = "FINISHED") -> None:
        self._each("finish", status)

    def unsent_metrics(self) -> list:
        return [m for member in self.members for m in getattr(member, "unsent_metrics", list)()]
