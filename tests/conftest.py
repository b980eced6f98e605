"""Shared fixtures: a real S3 server on 127.0.0.1 (moto's standalone server).

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
from typing import Iterator, Optional

import pytest

from dyntrain.engine import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (slow time-outs off EC2)
}


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


def start_moto(extra_env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen, str]:
    """Start ``moto.server`` on a free port of 127.0.0.1; returns (process, endpoint URL)."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
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
