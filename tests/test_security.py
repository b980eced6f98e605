"""A shared cluster is not a trusted place (docs/security.md): no secret leaves the process, checkpoints
are read without unpickling and are private to their owner.

The end-to-end run is one process of ``launch/pretrain.py`` on real shards against the session's
``mlflow server`` (``conftest.mlflow_server``), with a password and a token in ``tracking.uri``; it
writes a checkpoint, then resumes from it. Everything the two runs wrote (checkpoint bytes, the
server's store and artifacts, stdout, stderr) is searched for the secrets. The others run in this
process: a checkpoint holding a foreign pickled object, a logged model's weights reference, the Slurm
output's redaction. The authenticated server (401 without credentials, a 2-rank run with them) is
in ``test_engine_multirank.py``, a worker killed mid-build in ``test_shards.py``.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSWORD, TOKEN = "Pw-s3cr3t-4711", "Tk-0815-secret"


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _pretrain(tmp_path: Path, uri: str, experiment: str, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"data.train_urls=[{tmp_path}/shards/*.tar]", f"run.max_steps={steps}", "run.log_every=1",
           "checkpoint.every=2", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto",
           "checkpoint.overwrite=false", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
           "tracking.system_metrics=false", "data.crop_size=32", "data.micro_batch_size=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from dyntrain.data.shards.patches import ShardBuildConfig
    from dyntrain.data.shards.writer import build_shards
    from dyntrain.data.synthetic import write_synthetic_images

    base = tmp_path_factory.mktemp("sec-shards")
    write_synthetic_images(base / "images", 2, size=(64, 192), seed=3)
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=4, max_flat_frac=1.0, workers=1), progress=False)
    return base / "shards"


@pytest.mark.slow
def test_a_password_and_token_in_tracking_uri_reach_no_artifact_param_tag_checkpoint_or_line(
        tmp_path, shards, mlflow_server):
    from mlflow.tracking import MlflowClient

    (tmp_path / "shards").symlink_to(shards)
    port = mlflow_server.uri.rsplit(":", 1)[1]
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}/?token={TOKEN}"
    experiment = f"secrets-{tmp_path.name}"
    first = _pretrain(tmp_path, uri, experiment, steps=2)
    again = _pretrain(tmp_path, uri, experiment, steps=4)  # resumes from the checkpoint's redacted config
    assert "resumed from" in again.stdout + again.stderr

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["steps_S"] + run.data.metrics["steps_L"] == 4
    assert run.data.params["tracking.uri"] == f"http://127.0.0.1:{port}/"
    texts = [str(run.data.params), str(run.data.tags)]
    artifacts = mlflow_server.root / "artifacts"
    config_yaml = next(p for p in artifacts.rglob("config.yaml") if run.info.run_id in str(p))
    assert f"uri: http://127.0.0.1:{port}/" in config_yaml.read_text()
    ckpt = tmp_path / "ckpt"
    files = [p for p in [*ckpt.rglob("*"), *mlflow_server.root.rglob("*")] if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and config_yaml in files
    for secret in (PASSWORD, TOKEN):
        found = [str(p) for p in files if secret.encode() in p.read_bytes()]
        found += [i for i, t in enumerate([first.stdout, first.stderr, again.stdout, again.stderr, *texts])
                  if secret in t]
        assert found == [], secret

    # checkpoints are private to their owner
    for tag in (ckpt / "step_00000002", ckpt / "step_00000004"):
        assert stat.S_IMODE(tag.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tag.glob("*.pt"))


class _Boom:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do (with worse code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_with_a_foreign_pickled_object_is_refused_naming_the_file_unless_trusted(tmp_path):
    import numpy as np
    import torch

    from dyntrain.checkpoint import CheckpointError, read_client_state
    from dyntrain.checkpoint.unpickle import check_tag_files, safe_load
    from dyntrain.checkpoint.weights import load_weights

    def tag(name: str, extra: dict) -> Path:
        folder = tmp_path / name / "step_00000001"
        folder.mkdir(parents=True)
        state = {"step": 1, "client": {"config": {"model": {}}}, "rank_states": [{"rng": {"numpy": np.random.get_state()}}]}
        torch.save({"module": {"w": torch.ones(2)}, "dyntrain": {**state, **extra}}, folder / "mp_rank_00_model_states.pt")
        return folder

    good = tag("good", {})
    assert read_client_state(good)["rank_states"][0]["rng"]["numpy"][0] == "MT19937"  # numpy's RNG state is allowed
    check_tag_files(good)
    marker = tmp_path / "unpickled"
    bad = tag("bad", {"hparams": _Boom(marker)})
    target = str(bad / "mp_rank_00_model_states.pt")
    for read in (read_client_state, load_weights, check_tag_files, safe_load):
        with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt holds Python objects beyond tensors") as err:
            read(bad if read is not safe_load else target)
        assert target in str(err.value) and "builtins.getattr, pathlib.Path" in str(err.value)
    assert not marker.exists()  # refused without running it
    safe_load(target, trust=True)  # --trust: unpickled, and its code ran
    assert marker.exists()


def test_a_logged_models_weights_reference_is_read_inside_the_model_unless_allowed(tmp_path, monkeypatch):
    import json

    from dyntrain.checkpoint import CheckpointError
    from dyntrain.checkpoint.weights import referenced_checkpoint

    model, shared = tmp_path / "model" / "artifacts", tmp_path / "shared"
    model.mkdir(parents=True)
    ref = model / "weights_ref.json"
    monkeypatch.delenv("DYNTRAIN_CHECKPOINT_ROOTS", raising=False)
    for named, inside in (("ckpt/step_1", True), (str(shared / "step_1"), False), ("../../shared/step_1", False)):
        ref.write_text(json.dumps({"checkpoint": named}))
        if inside:
            assert referenced_checkpoint(ref) == model / "ckpt" / "step_1"
            continue
        with pytest.raises(CheckpointError, match="weights_ref.json names the checkpoint .* outside the model.*"
                                                  "DYNTRAIN_CHECKPOINT_ROOTS"):
            referenced_checkpoint(ref)
    monkeypatch.setenv("DYNTRAIN_CHECKPOINT_ROOTS", f"/nonexistent{os.pathsep}{shared}")
    assert referenced_checkpoint(ref) == shared / "step_1"


def test_the_slurm_output_redacts_user_info_and_query_secrets():
    """``slurm/_launch.sh`` echoes the overrides into the job's output file through its ``redact``."""
    funcs = "\n".join(line for line in (ROOT / "slurm" / "_launch.sh").read_text().splitlines()
                      if line.startswith(("redact() ", "log() ")))
    line = ("launch/pretrain.py --config c.yaml tracking.uri=http://alice:Pw-1@h:5000/?token=Tk-2&x=1 "
            "data.train_urls=[https://b/a.tar?X-Amz-Signature=Sg-3] run.name=sigma")
    out = subprocess.run(["bash", "-c", f'{funcs}\nlog "$1"', "-", line], capture_output=True, text=True).stdout
    assert "tracking.uri=http://***@h:5000/?token=***&x=1" in out
    assert "X-Amz-Signature=***] run.name=sigma" in out
    assert not any(s in out for s in ("Pw-1", "Tk-2", "Sg-3"))
