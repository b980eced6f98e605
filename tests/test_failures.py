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

from conftest import start_moto, stop
from dyntrain import checkpoint as ck
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.errors import DyntrainError, cli_main
from helpers import (ENTRY, PRETRAIN, QUICKSTART, S3_ENV, deepspeed_cmd, error_lines, finish_logged,
                     rank0_trace, run_env, start_logged, tiny_overrides, upload_shards, wait_paused)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


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
                        *tiny_overrides(tmp_path, str(missing), tmp_path / "ckpt"))
    # timeout: the first DeepSpeed start on a machine may compile its CPU comm op (minutes under load)
    r = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    lines = error_lines(r.stdout) + error_lines(r.stderr)
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
    r = subprocess.run(base + tiny_overrides(tmp_path, f"{shards}/*.tar", ckpt,
                                             **{"checkpoint.resume": "never"}),
                       cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert str(ckpt) in lines[0] and "step_00000300" in lines[0] and "Traceback" not in r.stderr
    assert [i.tag for i in ck.list_checkpoints(ckpt)] == ["step_00000200", "step_00000300"]
    r = subprocess.run(base + tiny_overrides(tmp_path, f"{shards}/*.tar", tmp_path / "empty",
                                         **{"checkpoint.resume": "step_00000099"}),
                       cwd=tmp_path, env=run_env(DYNTRAIN_TRACEBACK="1"), capture_output=True, text=True,
                       timeout=300)
    lines = error_lines(r.stderr)
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
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert str(empty) in lines[0] and str(small) in lines[0]
    assert "1 image(s) found" in lines[0] and "1 smaller than the patch size 64" in lines[0]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    good = tmp_path / "good"   # usable images whose every patch a filter drops: no data either
    write_synthetic_images(good, 1, size=(128, 128), seed=2)
    r = subprocess.run([PY, str(ROOT / "launch" / "make_shards.py"), "--src", str(good), "--out", str(out),
                        "--patch-size", "64", "--workers", "1", "--max-noise", "0"],
                       capture_output=True, text=True, timeout=120)
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert str(good) in lines[0] and "1 used" in lines[0] and "0 kept" in lines[0] and "quality:noise" in lines[0]


# ------------------------------------------------------------------------------ faults under load
@pytest.mark.slow
def test_s3_outage_mid_run_then_exact_resume(tmp_path, shards):
    """The S3 server stops after step 3 and stays down: past ``data.io_retry_s`` (5 s here) of
    retries the run ends with one error naming the shard URL, the newest checkpoint is intact, and
    with the server back (a new moto, the same shards) the restart resumes to the same weights as an uninterrupted run."""
    bucket, steps = "dyntrain-outage", 10
    urls = f"s3://{bucket}/pre/*.tar"
    server, endpoint = start_moto()
    try:
        upload_shards(shards, bucket, endpoint)
        env = run_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
        runs: list[str] = []

        def run(name: str, *entry: str, env=env) -> subprocess.Popen:
            cmd = [PY, ENTRY, "--cli", "--trace", str(tmp_path / "trace" / name), *entry, PRETRAIN,
                   "--config", QUICKSTART, *tiny_overrides(tmp_path, urls, tmp_path / name,
                                                       **{"run.max_steps": steps, "data.io_retry_s": 5})]
            runs.append(name)
            return start_logged(cmd, tmp_path / f"{name}-{len(runs)}.log", env, tmp_path)

        ref = run("straight")
        err = finish_logged(ref, 600)
        assert ref.returncode == 0, err[-3000:]
        go = tmp_path / "go"
        faulted = run("outage", "--pause-at", f"3@{go}")
        wait_paused(faulted, go)
    finally:
        stop(server)
    t0 = time.monotonic()
    go.write_text("")
    err = finish_logged(faulted, 300)
    failed_after = time.monotonic() - t0
    lines = error_lines(err)
    assert faulted.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"s3://{bucket}/pre/shard-" in lines[0] and "Traceback" not in err
    assert "still failing after" in lines[0] and "data.io_retry_s=5" in lines[0], lines[0]
    assert failed_after < 120, failed_after
    newest = ck.newest_complete(tmp_path / "outage")
    assert newest is not None and newest.step >= 2 and ck.verify_files(newest) is None
    assert (tmp_path / "outage" / ck.LATEST).read_text().strip() == newest.tag

    server, endpoint = start_moto()   # the server is back (moto starts empty: same shards again)
    try:
        upload_shards(shards, bucket, endpoint)
        resumed = run("outage", env=run_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint))
        err = finish_logged(resumed, 600)
    finally:
        stop(server)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {newest.tag} at step {newest.step}" in err
    got, want = rank0_trace(tmp_path / "trace" / "outage"), rank0_trace(tmp_path / "trace" / "straight")
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
                        *tiny_overrides(tmp_path, urls, probe, **{"run.max_steps": 2})],
                       cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
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
        r = subprocess.run([PY, PRETRAIN, "--config", QUICKSTART, *tiny_overrides(tmp_path, urls, ckpt)],
                           cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
        lines = error_lines(r.stderr)
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
               *tiny_overrides(tmp_path, urls, ckpt, **{"run.max_steps": 6})]
        return start_logged(cmd, tmp_path / f"run{n}.log", run_env(), tmp_path)

    full = run(1, "--pause-at", f"3@{go}")
    wait_paused(full, go)
    flag.write_text("")
    go.write_text("")
    log = finish_logged(full, 300)
    lines = error_lines(log)
    assert full.returncode == 2 and len(lines) == 1, log[-3000:]
    assert str(ckpt / "step_00000004") in lines[0] and "No space left on device" in lines[0], lines[0]
    assert "Traceback" not in log
    assert (ckpt / ck.LATEST).read_text().strip() == "step_00000002"
    assert ck.newest_complete(ckpt).tag == "step_00000002"
    flag.unlink()
    log = finish_logged(run(2), 600)
    assert "resumed from step_00000002 at step 2" in log and not error_lines(log), log[-3000:]
    assert (ckpt / ck.LATEST).read_text().strip() == "step_00000006"
    assert ck.verify_files(ck.newest_complete(ckpt)) is None
