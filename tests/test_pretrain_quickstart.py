"""The quickstart end to end: launch/quickstart.sh builds shards from generated images, trains 2 CPU
ranks under the deepspeed launcher through launch/pretrain.py on real DALI shards, and leaves an
MLflow run with per-variant losses, the GPU-hour account and checkpoints. Plus the single-process
path (``python launch/pretrain.py``) in fixed-variant mode."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import unlabelled_savings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd, cwd, timeout, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]
    return proc


def _only_run(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_quickstart_script_end_to_end(tmp_path):
    work = tmp_path / "qs"
    env = dict(_env(), DYNTRAIN_QUICKSTART_DIR=str(work))
    proc = _run(["bash", str(ROOT / "launch" / "quickstart.sh"), "run.max_steps=30", "run.log_every=10",
                 "checkpoint.every=15", "schedule.verify_every=5",
                 # a 30-step run can end before MLflow's default 10 s system-metrics sample
                 "tracking.system_metrics_interval_s=1"], cwd=tmp_path, timeout=600, env=env)
    assert list((work / "data" / "quickstart" / "shards").glob("*.tar"))
    assert "step 30/30" in proc.stdout and "patches/s" in proc.stdout

    client, run = _only_run(f"sqlite:///{work / 'mlflow.db'}", "dynet-quickstart")
    assert run.info.status == "FINISHED"
    m, tags, params = run.data.metrics, run.data.tags, run.data.params
    for key in ("loss", "loss_S", "loss_L", "lr", "patches_per_s", "step_time_S", "step_time_L",
                "gpu_hours", "gpu_hours_separate", "gpu_hours_saved_frac",
                "gpu_hours_saved_frac_expected", "overhead_frac"):
        assert key in m, f"metric {key} missing from the MLflow run"
    assert 0.2 < m["gpu_hours_saved_frac"] < 0.8  # ~50% for equiprobable S and L
    assert any(k.startswith("system/") for k in m), sorted(m)  # MLflow system metrics
    assert m["steps_S"] + m["steps_L"] == 30
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 3  # logged during the run
    assert len(client.get_metric_history(run.info.run_id, "gpu_hours")) >= 3
    assert tags["dyntrain.stage"] == "pretrain" and tags["mode"] == "dynamic" and tags["variants"] == "L,S"
    # every saving printed or logged names its basis: the progress and final lines, and the run's tags
    assert "saved" in proc.stdout and unlabelled_savings(proc.stdout + proc.stderr) == []
    assert re.search(r"saved \d+\.\d% at equal iterations \|", proc.stdout)
    assert tags["gpu_hours_saved_basis"] == "equal_iterations"
    note = tags["mlflow.note.content"]
    assert "equal iterations" in note and "--iso-quality" in note and "iso_quality_saving" in note
    assert params["model.dim"] == "8" and params["data.crop_size"] == "48"
    assert params["run.max_steps"] == "30"  # overrides recorded, not the YAML value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed_config.json"} <= artifacts

    ckpt = work / "runs" / "quickstart" / "checkpoints"
    assert (ckpt / "step_00000015" / "COMPLETE").is_file() and (ckpt / "step_00000030" / "COMPLETE").is_file()
    from dyntrain.checkpoint import read_client_state
    client_state = read_client_state(ckpt, "step_00000030")["client"]
    assert client_state["config"]["model"]["dim"] == 8  # resolved config saved with the checkpoint
    assert client_state["mlflow_run_id"] == run.info.run_id


def test_single_process_fixed_variant_baseline(tmp_path):
    """``python launch/pretrain.py`` without a launcher, fixed variant S (a paper baseline)."""
    from dyntrain.data.synthetic import write_synthetic_images

    images = tmp_path / "images"
    write_synthetic_images(images, 6, size=(512, 1024), seed=1)
    _run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(images), "--out",
          str(tmp_path / "shards"), "--shard-samples", "4", "--holdout", "0.34", "--quiet"],
         cwd=tmp_path, timeout=300)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = _run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
                 str(ROOT / "configs" / "quickstart.yaml"), f"data.train_urls=[{tmp_path}/shards/*.tar]",
                 "run.max_steps=8", "run.log_every=4", "schedule.mode=fixed", "schedule.fixed_variant=S",
                 f"tracking.uri={uri}", "tracking.experiment=baseline", "checkpoint.dir=null",
                 "data.crop_size=32", f"data.val_urls=[{tmp_path}/shards-val/*.tar]", "eval.val_samples=4"],
                cwd=tmp_path, timeout=300, env=env)
    assert "step 8/8" in proc.stdout
    client, run = _only_run(uri, "baseline")
    # the data sets as MLflow dataset inputs (the runs table's Datasets column), the fingerprint of the data
    from dyntrain.analysis.compare import collect_runs, format_tables
    from dyntrain.data.shards.describe import describe

    inputs = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset
              for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    for context, folder in (("training", "shards"), ("validation", "shards-val")):
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        d = inputs[context]
        want = describe([f"{tmp_path}/{folder}/*.tar"], context)
        assert d.name == folder and d.digest == want["digest"][:16] and d.source_type == "local"
        assert json.loads(d.source)["uri"] == str(tmp_path / folder)
        assert json.loads(d.profile)["num_samples"] == manifest["num_samples"] > 0
    assert run.data.tags["dyntrain.data_fingerprint"] == inputs["training"].digest
    assert "shards@" + inputs["training"].digest[:8] in format_tables(*collect_runs(uri, ["baseline"]))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "fixed:S" and run.data.tags["world_size"] == "1"
    m = run.data.metrics
    assert "loss_S" in m and "loss_L" not in m and m["steps_S"] == 8
    # "separate" of a fixed run is its own step time: nothing saved, only the time outside steps lost
    assert -0.5 < m["gpu_hours_saved_frac"] <= 1e-9
    # saved = -overhead / (1 - overhead) for the values of one account snapshot (logged in one batch,
    # so at one (step, timestamp)); the latest value of each key alone may come from two snapshots that
    # share a step and a millisecond (MLflow then keeps the larger of each), so the check pairs them
    snap: dict = {}
    for key, f in (("gpu_hours_saved_frac", lambda v: v), ("overhead_frac", lambda v: -v / (1 - v))):
        for h in client.get_metric_history(run.info.run_id, key):
            snap.setdefault((h.step, h.timestamp), {}).setdefault(key, []).append(f(h.value))
    both = [v for v in snap.values() if len(v) == 2]
    assert both and all(sorted(v["gpu_hours_saved_frac"]) == pytest.approx(sorted(v["overhead_frac"]))
                        for v in both)
