"""Metric values a run could not deliver before it ended, kept on disk beside its checkpoints.

When a run ends while the tracking store is away past ``tracking.flush_timeout_s``, the metric values
still buffered are written to ``<checkpoint.dir>/tracking_unsent.json`` (by MLflow run id; a later
run's are merged in). They are delivered by the next start or resume in that folder (on its sender
thread, so an absent store never stalls it) or by ``python -m dyntrain.tracking sync DIR``. Delivery
is log-if-absent: the (key, step) pairs the run already holds are skipped and the file goes only once
everything was sent, so each value reaches the store exactly once even when a delivery is
interrupted and repeated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

PENDING_FILE = "tracking_unsent.json"


def pending_path(directory: str | Path) -> Path:
    return Path(directory) / PENDING_FILE


def read_pending(directory: str | Path) -> dict[str, list]:
    """{run id: [(key, value, timestamp ms, step), ...]} waiting in ``directory`` ({} if none)."""
    path = pending_path(directory)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(run): [tuple(row) for row in rows] for run, rows in data["runs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a file of unsent tracking records ({exc})") from exc


def count_pending(directory: str | Path) -> int:
    return sum(len(rows) for rows in read_pending(directory).values())


def keep_pending(directory: str | Path, run_id: str, rows: list) -> Path:
    """Add ``rows`` ((key, value, timestamp ms, step) of run ``run_id``) to the file in ``directory``,
    written atomically; returns its path."""
    runs = read_pending(directory)
    have = set(runs.get(run_id, []))
    runs.setdefault(run_id, []).extend(r for r in map(tuple, rows) if r not in have)
    path = pending_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"runs": runs}))
    os.replace(tmp, path)
    return path


def sync_pending(directory: str | Path, client) -> Optional[int]:
    """Send what waits in ``directory`` through MLflow ``client``, log-if-absent, then remove the
    file; returns how many values were sent (None: nothing waited). Raises what the store raises (the
    file stays: a later sync sends only what is still missing)."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.entities import Metric

    runs = read_pending(directory)
    if not runs:
        return None
    sent = 0
    for run_id, rows in runs.items():
        history = client.get_run(run_id).data.metrics
        logged = {(key, int(m.step)) for key in history for m in client.get_metric_history(run_id, key)}
        todo = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in rows
                if (str(k), int(step)) not in logged]
        for i in range(0, len(todo), 1000):  # MLflow's log_batch limit
            client.log_batch(run_id, metrics=todo[i:i + 1000])
        sent += len(todo)
    pending_path(directory).unlink()
    return sent
