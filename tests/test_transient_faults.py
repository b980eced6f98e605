"""Transient storage faults cost nothing: pre-training from S3 shards through a fault proxy
(``bench/s3_fault_proxy.py``: refused connections, resets, 503 SlowDown) in front of a real moto
server. While the faults last less than ``data.io_retry_s`` the run retries and carries on: no
restart, no sample skipped or replaced, the same sample keys and variants at every step and the same
final weights as an uninterrupted run. The bound itself (a fault that outlasts it ends the run with
one error naming the URL) is ``tests/test_failures.py::test_s3_outage_mid_run_then_exact_resume``.
Opening the pipeline during an outage (a requeued job resuming while S3 is away) waits for the storage
in the same way."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import S3_ENV, start_moto, stop
from dyntrain.data.synthetic import write_synthetic_images
from helpers import free_port
from test_failures import ENTRY, PRETRAIN, QUICKSTART, _env, _errors, _finish, _overrides, _start, _upload

ROOT = Path(__file__).resolve().parents[1]
PROXY = str(ROOT / "bench" / "s3_fault_proxy.py")


def start_proxy(target: str, mode_file: Path) -> tuple[subprocess.Popen, str]:
    """The fault proxy in front of ``target``; returns (process, its endpoint URL)."""
    mode_file.write_text("pass")
    port = free_port()
    ready = mode_file.with_suffix(".ready")
    proc = subprocess.Popen([sys.executable, PROXY, "--port", str(port), "--target", target,
                             "--mode-file", str(mode_file), "--ready", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the fault proxy did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3_behind_proxy(tmp_path_factory):
    """Shards (4 photographs, 64 px patches, 4 per shard) in a bucket of a fresh moto server, and a
    fault proxy in front of it: yields (proxy endpoint, mode file, shard glob)."""
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards

    base = tmp_path_factory.mktemp("transient")
    write_synthetic_images(base / "images", 4, size=(192, 256), seed=11)
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=4, workers=1), progress=False)
    server, endpoint = start_moto()
    proxy = None
    try:
        _upload(base / "shards", "dyntrain-transient", endpoint)
        proxy, via = start_proxy(endpoint, base / "mode")
        yield via, base / "mode", "s3://dyntrain-transient/pre/*.tar"
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        stop(server)


def _trace(d: Path) -> dict:
    return json.loads((d / "trace_rank0.json").read_text())


@pytest.mark.slow
def test_transient_s3_faults_cost_no_restart_and_no_sample(tmp_path, s3_behind_proxy):
    """Refused connections (6 s), 503 SlowDown (5 s) and resets (4 s) in a row while the run
    reads: exit 0 in one go, the retries logged, nothing skipped, the trace equal to a clean run."""
    endpoint, mode, urls = s3_behind_proxy
    env = _env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
    steps = 12

    def run(name: str, *entry: str) -> subprocess.Popen:
        cmd = [sys.executable, ENTRY, "--cli", "--trace", str(tmp_path / "trace" / name), *entry, PRETRAIN,
               "--config", QUICKSTART, *_overrides(tmp_path, urls, tmp_path / name,
                                                   **{"run.max_steps": steps, "data.io_retry_s": 60})]
        return _start(cmd, tmp_path / f"{name}.log", env, tmp_path)

    clean = run("clean")
    log = _finish(clean, 600)
    assert clean.returncode == 0, log[-3000:]
    go = tmp_path / "go"
    faulted = run("faulted", "--pause-at", f"3@{go}")
    deadline = time.monotonic() + 600
    while not Path(f"{go}.waiting").exists():
        assert faulted.poll() is None and time.monotonic() < deadline, faulted.log.read_text()[-3000:]
        time.sleep(0.1)
    try:
        for fault, seconds in (("down", 6), ("503", 5), ("reset", 4)):
            mode.write_text(fault)
            if fault == "down":
                go.write_text("")
            time.sleep(seconds)
    finally:
        mode.write_text("pass")
    log = _finish(faulted, 600)
    assert faulted.returncode == 0 and not _errors(log), log[-3000:]
    assert "transient storage error" in log and "storage is back" in log, log[-3000:]
    got, want = _trace(tmp_path / "trace" / "faulted"), _trace(tmp_path / "trace" / "clean")
    assert got["loader_stats"]["io_retries"] > 0, got["loader_stats"]
    assert got["loader_stats"]["corrupt_skipped"] == 0 and got["loader_stats"]["corrupt_keys"] == []
    assert [s["step"] for s in got["steps"]] == list(range(steps))
    for g, w in zip(got["steps"], want["steps"]):
        assert g["keys"] == w["keys"] and g["variant"] == w["variant"], g["step"]
    assert got["weights_sha256"] == want["weights_sha256"], "weights differ from the clean run"


# run in a process of its own: DALI's S3 client keeps the endpoint of the first S3 pipeline a process
# built, so in the pytest process it could still point at an earlier test's moto server
OPEN_DURING_OUTAGE = """
import json, sys, threading, time
from pathlib import Path
from dyntrain.config import load_config
from dyntrain.data.pretrain.degrade import DegradeSpec
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader

urls, mode = sys.argv[1], Path(sys.argv[2])
data = load_config(None, ["data.crop_size=32"]).data
loader = DaliPretrainLoader(urls, DegradeSpec.from_config(data), 2, decode="cpu", num_threads=1,
                            shuffle_buffer=4, io_retry_s=60)
next(loader)
state = loader.state_dict()
want = next(loader)["keys"]
mode.write_text("down")
back = threading.Timer(8, lambda: mode.write_text("pass"))
back.start()
try:
    t0 = time.monotonic()
    loader.load_state_dict(state)
    waited = time.monotonic() - t0
finally:
    back.join()
got = next(loader)["keys"]
print(json.dumps({"retries": loader.io_retries, "waited": waited, "want": list(want), "got": list(got)}))
loader.close()
"""


def test_pipeline_opened_during_an_outage_waits_for_the_storage(s3_behind_proxy):
    """The loader's pipeline rebuilt from a resumed state while S3 refuses connections (8 s): it
    waits, counts the retries, and hands out the batch the uninterrupted loader did."""
    endpoint, mode, urls = s3_behind_proxy
    env = _env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        proc = subprocess.run([sys.executable, "-c", OPEN_DURING_OUTAGE, urls, str(mode)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        mode.write_text("pass")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["retries"] > 0 and r["waited"] > 5, r
    assert r["got"] == r["want"]
