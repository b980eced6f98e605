"""Failures a user meets, end to end: one ``error:`` line instead of a traceback (also under the
deepspeed launcher), a fresh start into another run's checkpoints, a shard build with no usable
image, the S3 server stopping in the middle of pre-training (and an exact resume once it is back),
and a checkpoint disk that fills during a save.

The S3 outage runs on one rank (two would double its cost; the error path is per rank and the
launcher case is covered by the missing-shard test)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import S3_ENV, start_moto, stop
from dyntrain import checkpoint as ck
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.errors import DyntrainError, cli_main
from helpers import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
ENTRY = str(ROOT / "tests" / "rank_entry.py")
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _env(**extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
              "DYNTRAIN_TRACEBACK"):
        if k not in extra:
            env.pop(k, None)
    return env


def _overrides(base: Path, urls: str, ckpt: Path, **kw) -> list[str]:
    """A tiny pre-training run (dim 8, 32 px crops, batches of 2, fp32, deterministic)."""
    o = {"run.max_steps": 4, "run.log_every": 2, "run.deterministic": "true", "run.seed": 3,
         "model.dim": 8, "model.prompt_dims": "[8,8,16]", "model.prompt_sizes": "[16,8,4]",
         "model.num_refinement": 1, "data.train_urls": f"[{urls}]", "data.crop_size": 32,
         "data.micro_batch_size": 2, "data.num_threads": 1, "data.shuffle_buffer": 4,
         "data.decode": "cpu", "schedule.verify_every": 0, "optim.lr_schedule": "constant",
         "deepspeed.zero_stage": 2, "deepspeed.bf16": "false", "tracking.enabled": "false",
         "checkpoint.dir": str(ckpt), "checkpoint.every": 2, "checkpoint.resume": "auto",
         "checkpoint.overwrite": "false"}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Local shards: 2 generated photographs cut into 64 px patches, 4 per shard."""
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards

    base = tmp_path_factory.mktemp("fail_shards")
    write_synthetic_images(base / "images", 2, size=(192, 256), seed=11)
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=4, workers=1), progress=False)
    return base / "shards"


# ------------------------------------------------------------------------------ one-line errors
def test_cli_main_one_line_rank0_traceback(capsys, monkeypatch):
    def fails(argv):
        raise ck.CheckpointError("cannot read /x/step_00000002\nsecond line")

    monkeypatch.delenv("DYNTRAIN_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert cli_main(fails, []) == 2
    err = capsys.readouterr().err
    assert err == "error: cannot read /x/step_00000002 | second line\n"
    monkeypatch.setenv("RANK", "1")              # other ranks: same status, nothing printed
    assert cli_main(fails, []) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    seen = []
    assert cli_main(lambda argv: seen.append(argv) or 0, ["--traceback", "a=1"]) == 0
    assert seen == [["a=1"]]                      # the flag never reaches the script's parser
    assert cli_main(fails, ["--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("second line")
    monkeypatch.setenv("DYNTRAIN_TRACEBACK", "1")
    assert cli_main(fails, []) == 2 and "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):                 # a bug keeps its traceback
        cli_main(lambda argv: {}["missing"], [])
    from dyntrain.config import ConfigError
    from dyntrain.data.storage.s3 import DataSourceError
    from dyntrain.eval.testdata import EvalDataError
    from dyntrain.train.schedule import VariantMismatchError
    from dyntrain.data.finetune.degradations.registry import DegradationError
    from dyntrain.routing.router import RouterError
    from dyntrain.train.trainer import NonFiniteLossError
    for cls in (ConfigError, DataSourceError, EvalDataError, VariantMismatchError, NonFiniteLossError,
                ck.CheckpointError, RouterError, DegradationError):
        assert issubclass(cls, DyntrainError), cls


def test_missing_shard_one_line_under_launcher(tmp_path):
    """2 ranks under the deepspeed launcher: one ``error:`` line naming the URL, no traceback, and
    the launcher's own exit status non-zero."""
    missing = tmp_path / "nowhere" / "shard-000000.tar"
    cmd = deepspeed_cmd(2, PRETRAIN, "--config", QUICKSTART,
                        *_overrides(tmp_path, str(missing), tmp_path / "ckpt"))
    # timeout: the first DeepSpeed start on a machine may compile its CPU comm op (minutes under load)
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    lines = _errors(r.stdout) + _errors(r.stderr)
    assert len(lines) == 1 and str(missing) in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_fresh_start_refused_then_missing_checkpoint(tmp_path, shards):
    """resume=never into another run's folder: one line naming the folder and its newest tag; a
    missing checkpoint likewise; DYNTRAIN_TRACEBACK=1 shows the stack."""
    ckpt = tmp_path / "ckpt"
    for step in (200, 300):   # another run's tags (a marker and the file it lists)
        tag = ckpt / ck.tag_for_step(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / ck.COMPLETE).write_text(json.dumps({"tag": tag.name, "step": step, "world_size": 1,
                                                   "files": {"mp_rank_00_model_states.pt": 1}}))
    base = [PY, PRETRAIN, "--config", QUICKSTART]
    r = subprocess.run(base + _overrides(tmp_path, f"{shards}/*.tar", ckpt, **{"checkpoint.resume": "never"}),
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    lines = _errors(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert str(ckpt) in lines[0] and "step_00000300" in lines[0] and "Traceback" not in r.stderr
    assert [i.tag for i in ck.list_checkpoints(ckpt)] == ["step_00000200", "step_00000300"]
    r = subprocess.run(base + _overrides(tmp_path, f"{shards}/*.tar", tmp_path / "empty",
                                         **{"checkpoint.resume": "step_00000099"}),
                       cwd=tmp_path, env=_env(DYNTRAIN_TRACEBACK="1"), capture_output=True, text=True,
                       timeout=300)
    lines = _errors(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "step_00000099" in lines[0], r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr


def test_quickstart_configs_can_run_twice():
    """The quickstart starts fresh each time, so it must replace its previous run's checkpoints."""
    from dyntrain.config import load_config

    for name in ("quickstart.yaml", "finetune_quickstart.yaml"):
        c = load_config(ROOT / "configs" / name).checkpoint
        assert c.resume == "never" and c.overwrite is True, name


def test_make_shards_without_usable_image(tmp_path):
    empty, small = tmp_path / "empty", tmp_path / "small"
    empty.mkdir()
    write_synthetic_images(small, 1, size=(40, 48), seed=1)   # smaller than one patch
    out = tmp_path / "out"
    r = subprocess.run([PY, str(ROOT / "launch" / "make_shards.py"), "--src", str(empty), "--src",
                        str(small), "--out", str(out), "--patch-size", "64", "--workers", "1"],
                       capture_output=True, text=True, timeout=120)
    lines = _errors(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert str(empty) in lines[0] and str(small) in lines[0]
    assert "1 image(s) found" in lines[0] and "1 smaller than the patch size 64" in lines[0]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    good = tmp_path / "good"   # usable images whose every patch a filter drops: no data either
    write_synthetic_images(good, 1, size=(128, 128), seed=2)
    r = subprocess.run([PY, str(ROOT / "launch" / "make_shards.py"), "--src", str(good), "--out", str(out),
                        "--patch-size", "64", "--workers", "1", "--max-noise", "0"],
                       capture_output=True, text=True, timeout=120)
    lines = _errors(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert str(good) in lines[0] and "1 used" in lines[0] and "0 kept" in lines[0] and "quality:noise" in lines[0]


# ------------------------------------------------------------------------------ faults under load
def _finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for a run started by ``_start``; returns its log. A run that overstays is killed (a
    hang must not outlive the test)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[:4]} still running after {timeout} s:\n"
                             f"{proc.log.read_text()[-3000:]}") from None
    return proc.log.read_text()


def _start(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """A run whose stdout and stderr go to ``log`` (a pipe nobody reads could fill and block it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _trace(d: Path) -> dict:
    return json.loads((d / "trace_rank0.json").read_text())


def _upload(folder: Path, bucket: str, endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                      region_name=S3_ENV["AWS_REGION"])
    s3.create_bucket(Bucket=bucket)
    for p in sorted(folder.iterdir()):
        s3.upload_file(str(p), bucket, f"pre/{p.name}")


@pytest.mark.slow
def test_s3_outage_mid_run_then_exact_resume(tmp_path, shards):
    """The S3 server stops after step 3 and stays down: past ``data.io_retry_s`` (5 s here) of
    retries the run ends with one error naming the shard URL, the newest checkpoint is intact, and
    with the server back (a new moto, the same shards) the restart resumes to the same weights as an uninterrupted run."""
    bucket, steps = "dyntrain-outage", 10
    urls = f"s3://{bucket}/pre/*.tar"
    server, endpoint = start_moto()
    try:
        _upload(shards, bucket, endpoint)
        env = _env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
        runs: list[str] = []

        def run(name: str, *entry: str, env=env) -> subprocess.Popen:
            cmd = [PY, ENTRY, "--cli", "--trace", str(tmp_path / "trace" / name), *entry, PRETRAIN,
                   "--config", QUICKSTART, *_overrides(tmp_path, urls, tmp_path / name,
                                                       **{"run.max_steps": steps, "data.io_retry_s": 5})]
            runs.append(name)
            return _start(cmd, tmp_path / f"{name}-{len(runs)}.log", env, tmp_path)

        ref = run("straight")
        err = _finish(ref, 600)
        assert ref.returncode == 0, err[-3000:]
        go = tmp_path / "go"
        faulted = run("outage", "--pause-at", f"3@{go}")
        deadline = time.monotonic() + 600
        while not Path(f"{go}.waiting").exists():
            if faulted.poll() is not None or time.monotonic() > deadline:
                if faulted.poll() is None:
                    faulted.kill()
                faulted.wait()
                raise AssertionError(f"the run never paused at step 3: {faulted.log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        stop(server)
    t0 = time.monotonic()
    go.write_text("")
    err = _finish(faulted, 300)
    failed_after = time.monotonic() - t0
    lines = _errors(err)
    assert faulted.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"s3://{bucket}/pre/shard-" in lines[0] and "Traceback" not in err
    assert "still failing after" in lines[0] and "data.io_retry_s=5" in lines[0], lines[0]
    assert failed_after < 120, failed_after
    newest = ck.newest_complete(tmp_path / "outage")
    assert newest is not None and newest.step >= 2 and ck.verify_files(newest) is None
    assert (tmp_path / "outage" / ck.LATEST).read_text().strip() == newest.tag

    server, endpoint = start_moto()   # the server is back (moto starts empty: same shards again)
    try:
        _upload(shards, bucket, endpoint)
        resumed = run("outage", env=_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint))
        err = _finish(resumed, 600)
    finally:
        stop(server)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {newest.tag} at step {newest.step}" in err
    got, want = _trace(tmp_path / "trace" / "outage"), _trace(tmp_path / "trace" / "straight")
    ref_steps = {s["step"]: s for s in want["steps"]}
    assert [s["step"] for s in got["steps"]] == list(range(newest.step, steps))
    for s in got["steps"]:
        assert s["keys"] == ref_steps[s["step"]]["keys"] and s["variant"] == ref_steps[s["step"]]["variant"]
    assert got["weights_sha256"] == want["weights_sha256"], "resumed weights differ"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a tmpfs needs root")
def test_checkpoint_disk_full(tmp_path, shards):
    """A tmpfs with room for one checkpoint and a half: the save of step 4 fails with one error
    naming the path, ``latest`` still names step 2, and step 2 still loads (export)."""
    urls = f"{shards}/*.tar"
    probe = tmp_path / "probe"
    r = subprocess.run([PY, PRETRAIN, "--config", QUICKSTART,
                        *_overrides(tmp_path, urls, probe, **{"run.max_steps": 2})],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    size = sum(p.stat().st_size for p in (probe / "step_00000002").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 1024 + 8}k", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        ckpt = disk / "ckpt"
        r = subprocess.run([PY, PRETRAIN, "--config", QUICKSTART, *_overrides(tmp_path, urls, ckpt)],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        lines = _errors(r.stderr)
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert str(ckpt / "step_00000004") in lines[0] and "Traceback" not in r.stderr
        assert (ckpt / ck.LATEST).read_text().strip() == "step_00000002"
        newest = ck.newest_complete(ckpt)
        assert newest is not None and newest.tag == "step_00000002"
        exported = tmp_path / "w.safetensors"
        r = subprocess.run([PY, str(ROOT / "launch" / "export.py"), "--checkpoint", str(ckpt), "--out",
                            str(exported)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "step_00000002" in r.stdout, r.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_disk_full_mid_save_keeps_latest_and_resumes(tmp_path, shards):
    """No root needed: the checkpoint writer meets ENOSPC after 4 KiB of a file in the save of
    step 4 (``rank_entry.py --disk-full FLAG``, the flag written from outside while the run is held
    after step 3): one error naming the checkpoint, ``latest`` still names step 2, and the restart
    (disk free again) resumes from step 2 to the end."""
    urls, flag, go, ckpt = f"{shards}/*.tar", tmp_path / "full.flag", tmp_path / "go", tmp_path / "ckpt"

    def run(n: int, *entry: str) -> subprocess.Popen:
        cmd = [PY, ENTRY, "--cli", "--disk-full", str(flag), *entry, PRETRAIN, "--config", QUICKSTART,
               *_overrides(tmp_path, urls, ckpt, **{"run.max_steps": 6})]
        return _start(cmd, tmp_path / f"run{n}.log", _env(), tmp_path)

    full = run(1, "--pause-at", f"3@{go}")
    deadline = time.monotonic() + 600
    while not Path(f"{go}.waiting").exists():
        assert full.poll() is None and time.monotonic() < deadline, full.log.read_text()[-3000:]
        time.sleep(0.1)
    flag.write_text("")
    go.write_text("")
    log = _finish(full, 300)
    lines = _errors(log)
    assert full.returncode == 2 and len(lines) == 1, log[-3000:]
    assert str(ckpt / "step_00000004") in lines[0] and "No space left on device" in lines[0], lines[0]
    assert "Traceback" not in log
    assert (ckpt / ck.LATEST).read_text().strip() == "step_00000002"
    assert ck.newest_complete(ckpt).tag == "step_00000002"
    flag.unlink()
    log = _finish(run(2), 600)
    assert "resumed from step_00000002 at step 2" in log and not _errors(log), log[-3000:]
    assert (ckpt / ck.LATEST).read_text().strip() == "step_00000006"
    assert ck.verify_files(ck.newest_complete(ckpt)) is None
