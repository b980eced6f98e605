"""Experiment tracking in MLflow (rank 0 only).

``make_tracker(cfg, rank, run_id=None)`` returns an ``MLflowTracker`` on rank 0 when
``tracking.enabled`` (``tracking.uri`` defaults to ``sqlite:///mlflow.db``; any MLflow server URI
works), and a ``NullTracker`` with the same methods everywhere else. A new run gets the flattened
config as params (credentials never: URL user-info and secret-looking keys are redacted); a resumed
run (``run_id`` from the checkpoint) is reopened and logs on. ``finish("FAILED")`` marks a crash.
``experiment_id_for`` is the one get-or-create of an experiment (training, evaluation, comparison).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from .base import NullTracker, Tracker

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|credential|api_?key|access_?key)", re.I)
_MAX_PARAM_LEN = 6000


def redact(key: str, value: Any) -> Any:
    """Hide credentials: secret-looking keys, and user:password@ in URLs."""
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return _redact_url(value)
    if isinstance(value, list):
        return [_redact_url(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    return value


def _redact_url(text: str) -> str:
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password is None and parts.username is None:
        return text
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def metric_key(name: str) -> str:
    """MLflow allows letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def default_artifact_location(uri: str) -> Optional[str]:
    """For ``sqlite:///path/x.db`` keep artifacts next to the database (``path/mlartifacts``)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


def experiment_id_for(client, name: str, tracking_uri: str, artifact_location: Optional[str] = None) -> str:
    """The id of MLflow experiment ``name``, created when missing (artifacts by default next to a
    sqlite database, see ``default_artifact_location``). Another process creating it at the same
    moment is fine: its experiment is used."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location or default_artifact_location(tracking_uri))
    except Exception:  # created concurrently by another run: use theirs
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class MLflowTracker(Tracker):
    """MLflow run of this training job (rank 0). Args as ``make_tracker``."""

    def __init__(self, cfg, run_id: Optional[str] = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        t = cfg.tracking
        self._mlflow = mlflow
        mlflow.set_tracking_uri(t.uri)
        self.client = MlflowClient(tracking_uri=t.uri)
        self.resumed = run_id is not None
        if run_id is None:
            experiment_id = experiment_id_for(self.client, t.experiment, t.uri, t.artifact_location)
            kwargs: dict[str, Any] = {"experiment_id": experiment_id, "run_name": cfg.run.name}
        else:
            kwargs = {"run_id": run_id}
        if t.system_metrics and _system_metrics_available():
            mlflow.set_system_metrics_sampling_interval(t.system_metrics_interval_s)
            kwargs["log_system_metrics"] = True
        if mlflow.active_run() is not None:  # never nest into a run someone else left open
            mlflow.end_run()
        self.run = mlflow.start_run(**kwargs)
        self.run_id: Optional[str] = self.run.info.run_id
        self._finished = False

    def log_params(self, params: dict) -> None:
        clean = {}
        for k, v in params.items():
            text = str(redact(k, v))
            clean[k] = text if len(text) <= _MAX_PARAM_LEN else text[:_MAX_PARAM_LEN - 3] + "..."
        items = list(clean.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        clean = {metric_key(k): float(v) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str) -> None:
        self._mlflow.log_artifact(str(path))

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def finish(self, status: str = "FINISHED") -> None:
        if not self._finished:
            self._finished = True
            self._mlflow.end_run(status=status)


def _system_metrics_available() -> bool:
    try:
        import psutil  # noqa: F401  (MLflow's system-metrics monitor needs it)
    except ImportError:
        return False
    return True


def make_tracker(cfg, rank: int, run_id: Optional[str] = None):
    """MLflow on rank 0 when ``tracking.enabled``; a ``NullTracker`` otherwise."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return MLflowTracker(cfg, run_id=run_id)
