"""Experiment tracking: the tracker interface, MLflow and console trackers, the GPU-hour account.

- ``base``: ``Tracker`` (the interface), ``NullTracker``, ``TrackerGroup`` (fan-out), ``RunHeader``;
- ``mlflow_tracker``: ``MLflowTracker``, ``make_tracker``, ``experiment_id_for`` (``redact`` is
  ``dyntrain.redaction``'s, re-exported here);
- ``sender``: the bounded buffer and sender thread that keep tracking off the training thread;
- ``console``: ``ConsoleTracker`` (header, progress and summary lines, rank 0);
- ``account``: ``GPUHourAccount`` (the formulas are in its module docstring);
- ``store``: MLflow outside a training run (finding runs, metric histories, evaluation, comparison
  and router runs), imported as ``from dyntrain.tracking import store``.
"""
from dyntrain.tracking.account import GPUHourAccount
from dyntrain.tracking.base import NullTracker, RunHeader, Tracker, TrackerGroup
from dyntrain.tracking.console import ConsoleTracker
from dyntrain.tracking.mlflow_tracker import (MLflowTracker, default_artifact_location, experiment_id_for,
                                              make_tracker, metric_key, redact)


__all__ = ["GPUHourAccount", "NullTracker", "RunHeader", "Tracker", "TrackerGroup", "ConsoleTracker",
           "MLflowTracker", "default_artifact_location", "experiment_id_for", "make_tracker", "metric_key",
           "redact"]
