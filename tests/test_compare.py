"""launch/compare.py against a real MLflow sqlite store with runs written by the project's own tracker."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyntrain.analysis.compare import collect_runs, format_tables, separate_vs_dynamic
from dyntrain.config import load_config
from dyntrain.eval.evaluate import log_to_mlflow

ROOT = Path(__file__).resolve().parents[1]


def _pretrain_run(uri, name, mode, step_s, steps=20):
    """A pre-training run as the trainer records it: flattened config params + GPU-hour account."""
    from dyntrain.tracking import GPUHourAccount, make_tracker

    overrides = [f"tracking.uri={uri}", "tracking.experiment=dyn-pre", f"run.name={name}",
                 f"schedule.mode={mode[0]}", "data.source=shards"]
    if mode[0] == "fixed":
        overrides += [f"schedule.fixed_variant={mode[1]}"]
    cfg = load_config(None, overrides)
    tracker = make_tracker(cfg, rank=0)
    tracker.log_params(cfg.flatten())
    variants = ["S", "L"] if mode[0] == "dynamic" else [mode[1]]
    account = GPUHourAccount(1, variants)
    for i in range(steps):
        v = variants[i % len(variants)]
        account.record(v, step_s[v])
    account.prior_wall_s = sum(step_s[variants[i % len(variants)]] for i in range(steps)) * 1.02
    tracker.log_metrics({**account.metrics(), "loss": 0.1}, step=steps)
    tracker.finish()
    return tracker.run_id


def test_compare_reads_runs_prints_tables_and_logs_the_plot(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    times = {"S": 0.1, "L": 0.2}
    _pretrain_run(uri, "dynamic", ("dynamic",), times)
    _pretrain_run(uri, "fixed-S", ("fixed", "S"), times)
    _pretrain_run(uri, "fixed-L", ("fixed", "L"), times)
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=dyn-ft", "run.name=ft",
                             "data.source=paired"])
    from dyntrain.tracking import make_tracker
    ft = make_tracker(cfg, 0)
    ft.log_params(cfg.flatten())
    ft.set_tags({"dyntrain.stage": "finetune"})
    ft.finish()
    metrics = {"eval/S/sots/psnr": 25.0, "eval/S/sots/ssim": 0.9, "eval/S/average/psnr": 25.0,
               "eval/S/average/ssim": 0.9, "eval/L/sots/psnr": 26.0, "eval/L/sots/ssim": 0.92,
               "eval/L/average/psnr": 26.0, "eval/L/average/ssim": 0.92,
               "model/S/gflops_224": 166.4, "model/L/gflops_224": 242.3}
    log_to_mlflow(metrics, uri, "dyn-ft", run_id=ft.run_id)

    pretrain, results = collect_runs(uri, ["dyn-pre", "dyn-ft"])
    assert [r.mode for r in pretrain] == ["dynamic", "fixed:S", "fixed:L"]
    assert [r.name for r in results] == ["ft"] and results[0].gflops == {"S": 166.4, "L": 242.3}
    saving = separate_vs_dynamic(pretrain)
    # dynamic: 10 S + 10 L steps = 3 s (x1.02); separately: 20 S + 20 L steps = 6 s (x1.02)
    assert saving["saved_frac"] == pytest.approx(0.5, abs=1e-6)

    out = tmp_path / "cmp.png"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"), "--experiment", "dyn-pre",
                           "--experiment", "dyn-ft", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Pre-training runs" in text and "fixed:L" in text and "saved 50.0%" in text
    assert "26.00/0.9200" in text and "242.30" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dynet-comparison")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["dyntrain.stage"] == "comparison"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cmp.png", "comparison.txt"} <= names
    # a second comparison does not count the first one as a run to compare
    assert len(collect_runs(uri)[0]) == 3
    assert "none found" in format_tables([], [])
    with pytest.raises(ValueError, match="nope"):
        collect_runs(uri, ["nope"])


def test_the_client_registers_into_its_own_store_whatever_the_environment_says(monkeypatch, tmp_path):
    """mlflow.set_registry_uri leaves MLFLOW_REGISTRY_URI in the environment (a fetch of a model does
    it in-process, and job processes inherit it): the promotion's client must not follow it."""
    from dyntrain.tracking.store import open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:9/")
    assert open_client(uri)._registry_uri == uri
