"""Shared fixtures: a real S3 server on 127.0.0.1 (moto's standalone server), and a real MLflow
tracking server on 127.0.0.1 (``mlflow server``, sqlite backend, artifacts served from a local folder).

The server runs as a subprocess (``python -m moto.server``), not as ``ThreadedMotoServer`` inside
the test process: DALI's S3 reads run while the test thread sits in ``Pipeline.run()``, and an
in-process server thread then never gets to answer (the reads time out). One server serves the whole
session because DALI creates its S3 client once per process from ``AWS_ENDPOINT_URL``; every test
gets a fresh bucket.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest
from helpers import S3_ENV, free_port

from dyntrain.train.engine import extensions_dir_default

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed's CPU comm op: the venv's own build (launch/setup.sh made it there), also for what the
# tests start without going through init_distributed. Ranks inherit the setting.
extensions_dir_default()

# Every process a test starts inherits this mark (tests build child environments from os.environ);
# the servers that outlive a test on purpose (the session's moto and MLflow, the Slurm daemons) are
# started without it (``server_env``). What still carries it after a test's teardown was left behind.
SESSION_MARK = "DYNTRAIN_TEST_SESSION"
os.environ[SESSION_MARK] = str(os.getpid())
_SESSION_START = time.time()


def server_env(env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``env`` (default: this process's environment) without the session mark: for a server a
    fixture keeps running beyond one test."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != SESSION_MARK}


# multiprocessing's own helpers of this pytest process: started at the first use of a semaphore or
# shared memory (a DataLoader worker, a process pool), they live as long as the process that
# started them, by design, and take no CPU while idle
PROCESS_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def left_running() -> list:
    """This session's processes (the mark, this pytest's pid) that are still alive, zombies aside."""
    import psutil

    mine, found = str(os.getpid()), []
    for p in psutil.process_iter(["create_time"]):
        if p.pid == os.getpid() or (p.info["create_time"] or 0) < _SESSION_START - 1:
            continue
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(SESSION_MARK) == mine \
                    and not any(helper in " ".join(p.cmdline()) for helper in PROCESS_HELPERS):
                found.append(p)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture(autouse=True)
def _leaves_nothing_running(request) -> Iterator[None]:
    """A test leaves no process running: a rank, launcher, server or pipeline worker that outlives
    its test holds a core while later tests run (a DeepSpeed CPU rank whose peer died spins in its
    shared-memory wait forever), and the timing a later test takes is then the leftover's. After the
    teardown (this fixture is set up first, so it is torn down last) leftovers get 10 s to exit;
    what remains is killed and the test errors, naming each process."""
    import psutil

    yield
    left = left_running()
    if not left:
        return
    _, alive = psutil.wait_procs(left, timeout=10)
    if not alive:
        return
    names = []
    for p in alive:
        try:
            names.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=10)
    if names:
        pytest.fail(f"{request.node.nodeid} left {len(names)} process(es) running (now killed):\n"
                    + "\n".join(names), pytrace=False)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """In-process tests use tiny tensors that gain nothing from threads, and on a busy 2-core
    machine torch's default threading makes them crawl (15 s vs 0.08 s seen for one tiny step).
    Subprocess tests set OMP_NUM_THREADS themselves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _mlflow_credentials_stay_in_their_test(monkeypatch) -> None:
    """``load_config`` moves credentials of a ``tracking.uri`` into MLflow's environment variables
    (``dyntrain.redaction.mlflow_uri``), and ``mlflow.set_registry_uri`` leaves ``MLFLOW_REGISTRY_URI``
    there for every later child process (a job would register into that test's server): undo both
    after each test."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)


def start_moto(extra_env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen, str]:
    """Start ``moto.server`` on a free port of 127.0.0.1; returns (process, endpoint URL)."""
    port = free_port()
    env = server_env(dict(os.environ, **(extra_env or {})))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto.server exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto.server did not start within 30 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server for the session, with AWS_ENDPOINT_URL and dummy credentials exported."""
    proc, endpoint = start_moto()
    env = dict(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket: returns ``s3://<name>``."""
    import boto3

    name = f"dyntrain-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def start_mlflow_server(root: Path, port: Optional[int] = None, timeout: float = 90
                        ) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on 127.0.0.1 with its backend store ``root/mlflow.db`` and artifacts
    in ``root/artifacts`` (served over HTTP: clients upload through the server). Returns (process,
    tracking URI) once ``/health`` answers. The same ``root`` and ``port`` restart the same server."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with (root / "server.log").open("ab") as out:
        # without MLflow 3's job execution: its seven huey consumers and job runner take about 15
        # CPU-seconds in the half minute after each start and poll for ever after (about 1% of a core
        # measured idle, against 0.2% without); no test submits an MLflow job
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=server_env(dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")))
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(proc, uri, root / "server.log", timeout, "mlflow server")
    return proc, uri


def wait_healthy(proc: subprocess.Popen, uri: str, log: Path, timeout: float, what: str) -> None:
    """Wait until the MLflow server ``proc`` answers ``uri/health``; RuntimeError with the tail of
    ``log`` if it exits, or (the server killed) if it does not answer within ``timeout`` s."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}: " + log.read_text()[-2000:])
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    stop_mlflow_server(proc)
    raise RuntimeError(f"{what} did not answer on {uri} within {timeout:.0f} s")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Kill the server and its workers (it runs in its own process group)."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class MlflowServer:
    """A running ``mlflow server`` (see ``start_mlflow_server``) that a test may stop and start again
    on the same port with the same store (an outage); ``uri`` stays the same."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        self.proc, _ = start_mlflow_server(self.root, self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_mlflow_server(self.proc)
            self.proc = None


class AuthMlflowServer:
    """``launch/tracking_server.sh`` (MLflow's basic-auth app) on 127.0.0.1, its admin
    ``username``/``password`` (``env`` holds them as the jobs take them)."""

    def __init__(self, root: Path, timeout: float = 120) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.username, self.password = "admin-test", f"pw-{uuid.uuid4().hex}"
        self.env = {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}
        root.mkdir(parents=True, exist_ok=True)
        cmd = ["bash", str(ROOT / "launch" / "tracking_server.sh"), "--host", "127.0.0.1", "--port", str(self.port),
               "--root", str(root / "store"), "--workers", "1"]
        with (root / "server.log").open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env, "DYNTRAIN_PYTHON": sys.executable})
        wait_healthy(self.proc, self.uri, root / "server.log", timeout, "tracking_server.sh")

    def stop(self) -> None:
        stop_mlflow_server(self.proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One MLflow tracking server for the session (``.uri`` is ``http://127.0.0.1:PORT``). Tests use
    their own experiment names: the store is shared. A test that stops it starts it again."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()
