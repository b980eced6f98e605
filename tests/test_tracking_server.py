"""The MLflow tracker against a real ``mlflow server`` on 127.0.0.1: a server that goes away mid-run and
comes back, one that is down at start, one that never comes, and a store that lacks the checkpoint's run.

Each test drives ``make_tracker`` the way ``run_training`` does (params, config text, metrics every
step, ``finish``) against the session's server (``conftest.mlflow_server``), which the outage test
stops and starts again on the same port with the same store. The 2-rank pre-training and the fine-tune /
evaluate / compare path against the session server are in ``test_engine_multirank.py`` and
``test_finetune.py``; the resume into a new store is also run end to end in ``test_resume.py``.
The exactly-once test kills tracker processes with SIGKILL, as a node failure would.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from dyntrain.config import load_config
from dyntrain.tracking import make_tracker
from helpers import free_port


def _cfg(uri: str, experiment: str, *extra: str):
    return load_config(None, [f"tracking.uri={uri}", f"tracking.experiment={experiment}", "run.name=t",
                              "tracking.retry_max_s=1", *extra])


def _log_steps(tracker, steps) -> float:
    """Log a loss per step as the trainer does; returns the slowest call (s)."""
    slowest = 0.0
    for step in steps:
        t0 = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        slowest = max(slowest, time.perf_counter() - t0)
    return slowest


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """caplog with the project's warnings in it (``setup_logging``, run by other tests of the session,
    stops the ``dyntrain`` logger from propagating to the root logger where caplog listens)."""
    monkeypatch.setattr(logging.getLogger("dyntrain"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="dyntrain"):
        yield caplog


def _wait(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_server_outage_mid_run_and_at_start_the_runs_end_finished_with_every_metric(mlflow_server, warnings_seen):
    """Run A logs steps 0-4, the server is killed, A logs on (5-14) and run B starts while it is down;
    the server comes back on the same port with the same store; both runs end FINISHED with every
    metric, and logging never waited for the server."""
    from mlflow.tracking import MlflowClient

    server, uri = mlflow_server, mlflow_server.uri
    cfg = _cfg(uri, "outage")
    a = make_tracker(cfg, rank=0)
    assert a.run_id is not None
    a.log_params(cfg.flatten())
    a.log_text(cfg.to_yaml(), "config.yaml")
    _log_steps(a, range(0, 5))
    _wait(lambda: a.sender.pending == 0)
    server.stop()
    try:
        slowest = _log_steps(a, range(5, 10))
        _wait(lambda: a.sender.down)
        slowest = max(slowest, _log_steps(a, range(10, 15)))
        t0 = time.perf_counter()
        b = make_tracker(_cfg(uri, "late"), rank=0)  # down at start
        assert b.run_id is None and time.perf_counter() - t0 < 5
        b.log_params(cfg.flatten())
        slowest = max(slowest, _log_steps(b, range(4)))
        assert slowest < 0.05  # training never waits for the store
        outage = [r.getMessage() for r in warnings_seen.records if "unreachable" in r.getMessage()]
        assert len(outage) == 2 and all(uri in line for line in outage)  # one per run
    finally:
        server.start()  # same port, same backend store
    a.finish("FINISHED")
    b.finish("FINISHED")
    client = MlflowClient(uri)
    for tracker, steps in ((a, 15), (b, 4)):
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(steps))
        assert run.data.params["run.seed"] == "0"
        assert tracker.sender.lost == 0
    (late,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert late.info.run_id == b.run_id
    assert list((server.root / "artifacts").rglob("config.yaml"))  # artifacts in the server's store


@pytest.mark.slow
def test_runs_that_end_during_an_outage_keep_their_metrics_for_the_next_start_or_sync(mlflow_server, tmp_path,
                                                                                         warnings_seen):
    """Runs A and B log steps 0-4 (stored), the server goes down, they log 5-9 and end (flush time-out
    1 s): the 10 unsent values of each wait in its checkpoint folder and the end line says so. The
    server is back: A's are delivered by the next start there (a resume, which replays 5-9), B's by
    ``python -m dyntrain.tracking sync``; every step is in each run exactly once, a second sync sends
    nothing."""
    from mlflow.tracking import MlflowClient

    from dyntrain.tracking.pending import PENDING_FILE

    uri = mlflow_server.uri
    cfgs = [_cfg(uri, "end-outage", "tracking.flush_timeout_s=1", f"checkpoint.dir={tmp_path / name}")
            for name in ("a", "b")]
    runs = [make_tracker(cfg, rank=0) for cfg in cfgs]
    for tracker in runs:
        _log_steps(tracker, range(5))
        _wait(lambda: tracker.sender.pending == 0)
    mlflow_server.stop()
    try:
        for tracker in runs:
            _log_steps(tracker, range(5, 10))
            tracker.finish("FINISHED")
        ends = [r.getMessage() for r in warnings_seen.records if "metric values wait in" in r.getMessage()]
        assert len(ends) == 2 and all(f"10 metric values wait in {tmp_path / n / PENDING_FILE}" in line
                                      for line, n in zip(ends, "ab")), ends
        assert all("dyntrain.tracking sync" in line for line in ends)
    finally:
        mlflow_server.start()
    a, b = (t.run_id for t in runs)
    resumed = make_tracker(cfgs[0], rank=0, run_id=a)   # the next start in A's folder: a resume
    _log_steps(resumed, range(5, 10))                   # that replays steps 5-9 (an earlier checkpoint)
    _wait(lambda: resumed.sender.pending == 0)
    resumed.finish("FINISHED")
    assert not (tmp_path / "a" / PENDING_FILE).exists()
    sync = [sys.executable, "-m", "dyntrain.tracking", "sync", str(tmp_path / "b"), "--uri", uri]
    out = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "sync: 10 of 10 metric values sent" in out.stdout, out.stdout + out.stderr
    again = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing waits" in again.stdout, again.stdout + again.stderr
    client = MlflowClient(uri)
    for run_id in (a, b):
        for key in ("loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(10)), key
    bad = subprocess.run([sys.executable, "-m", "dyntrain.tracking", "sync", str(tmp_path / "none"), "--uri", uri],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no folder" in bad.stderr + bad.stdout


def test_server_never_up_the_job_ends_with_a_warning_and_a_count(warnings_seen):
    cfg = _cfg(f"http://bob:hunter2@127.0.0.1:{free_port()}", "never", "tracking.flush_timeout_s=1",
               "tracking.buffer_records=20")
    tracker = make_tracker(cfg, rank=0, run_id=None)
    _log_steps(tracker, range(30))  # 60 values into a buffer of 20 (the run's creation kept)
    t0 = time.perf_counter()
    tracker.finish("FINISHED")  # never raises
    assert time.perf_counter() - t0 < 10
    text = "\n".join(r.getMessage() for r in warnings_seen.records)
    assert "hunter2" not in text and "http://127.0.0.1" in text  # moved to MLFLOW_TRACKING_PASSWORD
    assert "buffer" in text and "is full" in text
    lost = [r.getMessage() for r in warnings_seen.records if "tracking records were lost" in r.getMessage()]
    assert len(lost) == 1 and "never created" in lost[0]
    assert tracker.sender.lost == 60 + 1 + 1  # every metric value, the run's creation and its end
    assert f"{tracker.sender.lost} tracking records were lost" in lost[0]


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_resume_into_a_store_without_the_run_starts_a_new_run(backend, tmp_path, request):
    from mlflow.tracking import MlflowClient

    uri = request.getfixturevalue("mlflow_server").uri if backend == "server" else f"sqlite:///{tmp_path}/m.db"
    cfg = _cfg(uri, f"moved-{backend}-{tmp_path.name}")
    missing = "0123456789abcdef0123456789abcdef"  # the run id a checkpoint from elsewhere carries
    tracker = make_tracker(cfg, rank=0, run_id=missing)
    assert tracker.run_id not in (None, missing) and not tracker.resumed
    tracker.set_tags({"resumed_from": "step_00000006"})
    tracker.log_metrics({"loss": 0.5}, step=7)
    tracker.finish("FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert run.data.tags["previous_run_id"] == missing and run.data.tags["resumed_from"] == "step_00000006"
    assert run.data.params["run.name"] == "t"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the run that does exist is reopened, not replaced
    again = make_tracker(cfg, rank=0, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id and again.resumed
    again.finish("KILLED")
    assert client.get_run(tracker.run_id).info.status == "KILLED"


_JOB = """
import json, sys, time
from dyntrain.config import load_config
from dyntrain.tracking import make_tracker
uri, exp, state, first, ckpt_at, last, out = sys.argv[1:8]
prev = json.load(open(state)) if state != "-" else {}
cfg = load_config(None, [f"tracking.uri={uri}", f"tracking.experiment={exp}", "run.name=t",
                         "tracking.retry_max_s=1", "tracking.system_metrics=false"])
t = make_tracker(cfg, 0, run_id=prev.get("run_id"), carried=prev.get("unsent"))
for step in range(int(first), int(last) + 1):
    t.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    if step == int(ckpt_at):  # the trainer's checkpoint: run id and unsent values
        json.dump({"run_id": t.run_id, "unsent": t.unsent_metrics()}, open(out, "w"))
    if step == int(first) + 5 and prev == {}:  # the first job: steps 0-5 stored, then the outage
        while t.sender.pending:
            time.sleep(0.05)
        print("SENT", flush=True)
        sys.stdin.readline()
while t.sender.pending and not t.sender.down:
    time.sleep(0.05)
print("READY", t.sender.down, flush=True)
if out.endswith("final.json"):
    t.finish("FINISHED")
else:
    time.sleep(600)  # killed here
"""


def _job(uri: str, exp: str, state, first: int, ckpt_at: int, last: int, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _JOB, uri, exp, str(state), str(first), str(ckpt_at),
                             str(last), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, word: str, kill: bool = True) -> str:
    """Wait for the job's line starting with ``word``; SIGKILL it after its READY line (``kill``)."""
    line = proc.stdout.readline()
    assert line.startswith(word), line
    if word == "READY" and kill:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    return line


@pytest.mark.timeout(600)
def test_kills_during_an_outage_and_resumes_log_every_step_exactly_once(mlflow_server, tmp_path):
    """Job A logs steps 0-5 (stored), the server goes down, A logs 6-11 with a checkpoint at 9 and is
    killed -9 with them buffered; the server is back and B resumes from 9 (the checkpoint's unsent
    6-9 sent again), logs 10-13 with a checkpoint at 11 and is killed once 12-13 are stored; C
    resumes from 11 (replaying 12-13) to 15. Every step's metrics are in the run exactly once."""
    from mlflow.tracking import MlflowClient

    uri, exp = mlflow_server.uri, f"exactly-once-{tmp_path.name}"
    a = _job(uri, exp, "-", 0, 9, 11, tmp_path / "ckpt9.json")
    _kill_when(a, "SENT")
    mlflow_server.stop()
    try:
        a.stdin.write("go\n")
        a.stdin.flush()
        assert _kill_when(a, "READY").split() == ["READY", "True"]  # killed with the outage's records
    finally:
        mlflow_server.start()
    ckpt9 = json.loads((tmp_path / "ckpt9.json").read_text())
    assert sorted({s for _, _, _, s in ckpt9["unsent"]}) == [6, 7, 8, 9]
    b = _job(uri, exp, tmp_path / "ckpt9.json", 10, 11, 13, tmp_path / "ckpt11.json")
    assert _kill_when(b, "READY").split() == ["READY", "False"]  # 6-13 stored, then killed
    c = _job(uri, exp, tmp_path / "ckpt11.json", 12, 13, 15, tmp_path / "final.json")
    _kill_when(c, "READY", kill=False)
    assert c.wait(60) == 0
    client = MlflowClient(uri)
    run = client.get_run(ckpt9["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for key in ("loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(16)), key


def test_config_rejects_bad_tracking_values():
    from dyntrain.config import ConfigError

    for bad in ("tracking.buffer_records=0", "tracking.flush_timeout_s=-1", "tracking.request_timeout_s=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
