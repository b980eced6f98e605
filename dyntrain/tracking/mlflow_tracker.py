"""Experiment tracking in MLflow (rank 0 only).

``make_tracker(cfg, rank, run_id=None)`` returns an ``MLflowTracker`` on rank 0 when
``tracking.enabled`` (``tracking.uri`` defaults to ``sqlite:///mlflow.db``; any MLflow server URI
works), and a ``NullTracker`` with the same methods everywhere else. A new run gets the flattened
config as params (credentials never: URL user-info and secret-looking keys are redacted); a resumed
run (``run_id`` from the checkpoint) is reopened and logs on; when the store does not know that run
(checkpoints moved, a new server, a lost mlflow.db) a new run takes over with tag ``previous_run_id``.
``finish("FAILED")`` marks a crash. Nothing here stalls or stops training: records go through a
bounded buffer and a sender thread (``sender.py``) that waits out an unreachable store.

Every step's metrics reach the run exactly once across kills and resumes: a checkpoint carries the
metric values still unsent when it was written (``unsent_metrics``; a kill -9 during an MLflow outage
loses the buffer, not those), the resumed tracker sends them again (``carried``), and a reopened run
sends only the (metric, step) pairs its history lacks, read once when it is reopened (steps replayed
after the checkpoint, or carried values that did reach the store before the kill, are not logged twice).
``experiment_id_for`` is the one get-or-create of an experiment (training, evaluation, comparison).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from dyntrain.logs import get_logger
from dyntrain.redaction import mlflow_uri, redact, redact_uri
from dyntrain.tracking.base import NullTracker, Tracker
from dyntrain.tracking.pending import count_pending, keep_pending, read_pending, sync_pending
from dyntrain.tracking.sender import Record, Sender


log = get_logger(__name__)

_MAX_PARAM_LEN = 6000


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
    """MLflow run of this training job (rank 0). Args as ``make_tracker``.

    Every call queues its records for the sender thread (``sender.py``) and returns at once, so an
    unreachable or slow store never stalls training. The run is opened by the first queued record:
    ``run_id`` stays None until then (a server that is down at start gets the run when it is back).
    ``wait_s``: how long the constructor waits for the first attempt to open it (default
    ``tracking.request_timeout_s``). ``carried``: (key, value, timestamp ms, step) tuples the
    checkpoint kept unsent (``unsent_metrics`` of the run that wrote it), sent after the run is open.
    """

    def __init__(self, cfg, run_id: Optional[str] = None, wait_s: Optional[float] = None,
                 carried: Optional[list] = None) -> None:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.tracking import MlflowClient

        t = cfg.tracking
        self.cfg = cfg
        if t.uri.startswith(("http://", "https://")):
            _short_http_requests(t.request_timeout_s, t.request_retries)
        self.mlflow_uri = mlflow_uri(t.uri)  # credentials in the URI go to MLflow's environment
        self.uri = redact_uri(self.mlflow_uri)
        self.client = MlflowClient(tracking_uri=self.mlflow_uri)
        self.previous_run_id = run_id
        self.run_id: Optional[str] = None
        self.resumed = False            # True once the checkpoint's run was found and reopened
        self.replaced_run_id: Optional[str] = None  # the checkpoint's run when the store lacks it
        self._config_due = False
        self._monitor = None
        self._finished = False
        self._logged: Optional[set] = None  # (key, step) pairs the reopened run had (read once)
        self.sender = Sender(self.uri, t.buffer_records, t.retry_max_s)
        opened = self.sender.submit(Record("the run's creation", 1, self._open))
        if carried:
            self._submit_metrics(_metrics_of(carried), "metrics carried from the checkpoint")
        self._deliver_waiting()
        opened.tried.wait(t.request_timeout_s if wait_s is None else wait_s)

    # ---------------------------------------------------------------- sender-thread side
    def _open(self, _merged=None) -> None:
        """Reopen the checkpoint's run, or create one. When the store does not know the checkpoint's
        run (checkpoints moved to another cluster, a new server, a lost mlflow.db), a new run gets
        tag ``previous_run_id``, the config's params and config.yaml. Safe to retry: each part is
        skipped once done."""
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.exceptions import MlflowException

        prev = self.previous_run_id
        if self.run_id is None and prev is not None:
            try:
                self.client.get_run(prev)
            except MlflowException as exc:
                if exc.get_http_status_code() != 404:
                    raise
                log.warning("MLflow run %s is not in %s (checkpoints moved, or a new store): "
                            "logging to a new run with tag previous_run_id", prev, self.uri)
                self._create(tags={"previous_run_id": prev})
                self.replaced_run_id, self._config_due = prev, True
            else:
                self.client.update_run(prev, status="RUNNING")
                self.run_id, self.resumed = prev, True
        elif self.run_id is None:
            self._create(tags={})
        if self._logged is None:
            self._logged = _logged_pairs(self.client, self.run_id) if self.resumed else set()
        if self._config_due:
            self._send_params(_clean_params(self.cfg.flatten()))
            self.client.log_text(self.run_id, self.cfg.to_yaml(), "config.yaml")  # redacted
            self._config_due = False
        self._start_system_metrics()

    def _deliver_waiting(self) -> None:
        """What an earlier run in this checkpoint folder could not send before it ended
        (``dyntrain.tracking.pending``): delivered by the sender thread, after the carried metrics."""
        folder = self.cfg.checkpoint.dir
        try:
            waiting = count_pending(folder) if folder else 0
        except ValueError as exc:
            log.warning("%s; left as it is", exc)
            return
        if waiting:
            log.info("tracking: %d metric values of an earlier run wait in %s; sending them", waiting, folder)
            self.sender.submit(Record(f"the metrics waiting in {folder}", waiting,
                                      lambda _m: self._send_waiting(folder)))

    def _send_waiting(self, folder: str) -> None:
        """Sender thread: deliver the folder's waiting values; those of this very run (a resume) join
        the pairs it holds, so the steps the resume replays are not logged a second time."""
        rows = read_pending(folder)
        sync_pending(folder, self.client)
        if self._logged is not None and self.run_id in rows:
            self._logged.update((str(k), int(step)) for k, _v, _ts, step in rows[self.run_id])

    def _create(self, tags: dict) -> None:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.tracking.context.registry import resolve_tags

        t = self.cfg.tracking
        experiment_id = experiment_id_for(self.client, t.experiment, self.mlflow_uri, t.artifact_location)
        run = self.client.create_run(experiment_id, run_name=self.cfg.run.name,
                                       tags={k: redact(k, v) for k, v in resolve_tags(tags).items()})
        self.run_id = run.info.run_id

    def _run(self) -> str:
        """The open run's id (records behind a run that could not be created are rejected)."""
        if self.run_id is None:
            raise ValueError("no MLflow run: it could not be created")
        return self.run_id

    def _send_params(self, params: dict) -> None:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.entities import Param

        run_id = self._run()
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _start_system_metrics(self) -> None:
        t = self.cfg.tracking
        if self._monitor is not None or not t.system_metrics or not _system_metrics_available():
            return
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=t.system_metrics_interval_s,
                                             resume_logging=self.resumed, tracking_uri=self.mlflow_uri)
        self._monitor.start()

    # -------------------------------------------------------------- training-thread side
    def log_params(self, params: dict) -> None:
        clean = _clean_params(params)
        if clean:
            self.sender.submit(Record("params", len(clean), lambda _m: self._send_params(clean)))

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
        self._submit_metrics(clean, "metrics")

    def _submit_metrics(self, metrics: list, what: str) -> None:
        if metrics:
            self.sender.submit(Record(what, len(metrics), self._send_metrics, metrics=metrics))

    def _send_metrics(self, merged: Optional[list]) -> None:
        if self._logged:  # log-if-absent on a reopened run
            merged = [m for m in merged or () if (m.key, m.step) not in self._logged]
        if merged:
            self.client.log_batch(self._run(), metrics=merged)

    def unsent_metrics(self) -> list[tuple[str, float, int, int]]:
        """(key, value, timestamp ms, step) of every metric value not yet sent, for the checkpoint."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.sender.unsent_metrics()]

    def set_tags(self, tags: dict) -> None:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.entities import RunTag

        items = [RunTag(k, str(redact(k, v))) for k, v in tags.items()]
        if items:
            self.sender.submit(Record("tags", len(items),
                                      lambda _m: self.client.log_batch(self._run(), tags=items)))

    def log_artifact(self, path: str) -> None:
        self.sender.submit(Record(f"artifact {path}", 1,
                                  lambda _m: self.client.log_artifact(self._run(), str(path))))

    def log_datasets(self, datasets: list[dict]) -> None:
        """The run's data sets (``dyntrain.data.shards.describe``) as MLflow dataset inputs: name, digest,
        source (the first folder; every URL in the profile), sample count, and the
        ``mlflow.data.context`` tag (training / validation): the runs table's Datasets column."""
        if datasets:
            self.sender.submit(Record("dataset inputs", 1, lambda _m: self.client.log_inputs(
                self._run(), datasets=[dataset_input(d) for d in datasets])))

    def log_text(self, text: str, name: str) -> None:
        self.sender.submit(Record(name, 1, lambda _m: self.client.log_text(self._run(), text, name)))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` after sending what is buffered (up to
        ``tracking.flush_timeout_s``); never raises. What could not be sent is counted in a warning."""
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:  # noqa: BLE001 - system metrics are best effort
                log.warning("MLflow system metrics did not stop cleanly: %s", exc)
        self.sender.submit(Record(f"the run's end ({status})", 1,
                                  lambda _m: self.client.set_terminated(self._run(), status)))
        unsent = self.sender.close(self.cfg.tracking.flush_timeout_s)
        kept = self.sender.unsent_at_close
        run_id, folder = self.run_id or self.previous_run_id, self.cfg.checkpoint.dir
        if kept and run_id and folder:
            try:
                path = keep_pending(folder, run_id, [(m.key, m.value, m.timestamp, m.step) for m in kept])
            except (OSError, ValueError) as exc:
                log.warning("MLflow at %s: %d metric values could not be kept in %s: %s",
                            self.uri, len(kept), folder, exc)
            else:
                self.sender.lost -= len(kept)
                unsent -= len(kept)
                log.warning("MLflow at %s was unreachable when the run ended: %d metric values wait in %s; "
                            "the next start or resume there sends them, or: python -m dyntrain.tracking "
                            "sync %s", self.uri, len(kept), path, folder)
        if self.sender.lost:
            where = f"run {self.run_id}" if self.run_id else "no run (it was never created)"
            log.warning("MLflow at %s: %d tracking records were lost (%d unsent when the run ended after "
                        "%.0f s of waiting); %s", self.uri, self.sender.lost, unsent,
                        self.cfg.tracking.flush_timeout_s, where)


def dataset_input(d: dict):
    """An MLflow ``DatasetInput`` of one data set description (``dyntrain.data.shards.describe``)."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    first = redact("source", d["folders"][0])
    profile = {"num_samples": d.get("num_samples"), "num_shards": d.get("num_shards"),
               "manifest": d.get("manifest"), "sha256": d["digest"],
               "sources": [redact("source", u) for u in d["sources"]][:100]}
    dataset = Dataset(name=d["name"], digest=d["digest"][:16],
                      source_type="s3" if first.startswith("s3://") else "local",
                      source=json.dumps({"uri": first}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])


def _metrics_of(carried: list) -> list:
    """MLflow metrics of (key, value, timestamp ms, step) tuples."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.entities import Metric

    return [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in carried]


def _logged_pairs(client, run_id: str) -> set[tuple[str, int]]:
    """Every (metric key, step) run ``run_id`` holds: one history request per key."""
    keys = client.get_run(run_id).data.metrics
    return {(key, int(m.step)) for key in keys for m in client.get_metric_history(run_id, key)}


def _clean_params(params: dict) -> dict[str, str]:
    """Redacted, stringified, cut to MLflow's length limit."""
    clean = {}
    for k, v in params.items():
        text = str(redact(k, v))
        clean[k] = text if len(text) <= _MAX_PARAM_LEN else text[:_MAX_PARAM_LEN - 3] + "..."
    return clean


def _short_http_requests(timeout_s: int, retries: int) -> None:
    """MLflow's HTTP defaults (120 s time-out, 7 retries with exponential back-off) can hold one
    request for minutes; the sender retries on its own, so each request is kept short. A value the
    user exported already wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))


def _system_metrics_available() -> bool:
    try:
        # lazy: psutil is optional: memory figures only
        import psutil  # noqa: F401  (MLflow's system-metrics monitor needs it)
    except ImportError:
        return False
    return True


def make_tracker(cfg, rank: int, run_id: Optional[str] = None, carried: Optional[list] = None):
    """MLflow on rank 0 when ``tracking.enabled``; a ``NullTracker`` otherwise. ``carried``: the
    checkpoint's unsent metric values (``MLflowTracker``)."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return MLflowTracker(cfg, run_id=run_id, carried=carried)
