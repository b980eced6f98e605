"""Routing end to end on CPU: three-variant dynamic fine-tuning (XS, S, L) -> export -> router training
(labels cached) -> restore and evaluate with --variant auto -> the routing benchmark; plus the one-line
errors for a missing router and a router of another variant set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]", "model.num_refinement=1"]
THREE = ["model.variants={XS: [1,1,1,1], S: [2,3,3,4], L: [4,6,6,8]}",
         "schedule.variant_probs={XS: 0.3, S: 0.3, L: 0.4}"]
DATA = ["data.root=data/demo/train", "data.tasks={denoise: 1, derain: 1, dehaze: 1}",
        "eval.sets={sots: data/demo/test/sots, rain100l: data/demo/test/rain100l, bsd68: data/demo/test/bsd68}"]
CONFIG = ["--config", str(ROOT / "configs/finetune_quickstart.yaml")]


def _run(cmd, cwd: Path, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("routing")
    _run([sys.executable, "-m", "dyntrain.data.finetune.paired", "demo", "--out", "data/demo", "--train-images", "3",
          "--test-images", "1", "--height", "40", "--width", "48"], work)
    ft = _run([sys.executable, ROOT / "launch/finetune.py", *CONFIG, "init.checkpoint=null", *TINY, *THREE, *DATA,
               "run.max_steps=6", "run.log_every=2", "eval.every=0", "checkpoint.every=0",
               "checkpoint.dir=runs/ft/checkpoints"], work)
    assert "dynamic training of L=0.40, S=0.30, XS=0.30" in ft.stdout
    _run([sys.executable, ROOT / "launch/export.py", "--checkpoint", "runs/ft/checkpoints",
          "--out", "runs/ft/dynet.safetensors"], work)
    return work


def test_auto_without_a_router_says_how_to_train_one(work):
    proc = _run([sys.executable, ROOT / "launch/restore.py", "--checkpoint", "runs/ft/dynet.safetensors",
                 "--variant", "auto", "data/demo/test/sots", "out/none"], work, ok=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "python launch/train_router.py --checkpoint" in err[0], proc.stderr


def test_train_router_then_restore_evaluate_and_bench_with_auto(work):
    import torch

    from dynet import count_flops, count_router_flops
    from dyntrain.config import load_config
    from dyntrain.eval.evaluate import run_evaluation
    from dyntrain.restore import load_model
    from dyntrain.routing.router import load_router
    from dyntrain.routing.evaluate import run_routed_evaluation

    train = [sys.executable, ROOT / "launch/train_router.py", "--checkpoint", "runs/ft/dynet.safetensors",
             *CONFIG, *DATA, "--epochs", "5", "--samples", "1"]
    first = _run(train, work)
    assert "cached in" in first.stdout and (work / "runs/ft/dynet.router.pt").is_file()
    assert "from the cache" in _run(train, work).stdout  # labels are not recomputed

    proc = _run([sys.executable, ROOT / "launch/restore.py", "--checkpoint", "runs/ft/dynet.safetensors",
                 "--variant", "auto", "--tolerance-db", "0.1", "data/demo/test/rain100l/input", "out/auto"], work)
    lines = [line for line in proc.stdout.splitlines() if " -> " in line]
    assert len(lines) == 1 and any(f"DyNet-{v} (auto: " in lines[0] for v in ("XS", "S", "L")), proc.stdout
    assert len(list((work / "out/auto").iterdir())) == 1

    proc = _run([sys.executable, ROOT / "launch/restore.py", "--checkpoint", "runs/ft/dynet.safetensors",
                 "--variant", "XS", "data/demo/test/rain100l/input", "out/xs"], work)
    assert "DyNet-XS" in proc.stdout and len(list((work / "out/xs").iterdir())) == 1  # a fixed third variant

    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config(str(ROOT / "configs/finetune_quickstart.yaml"), DATA + ["tracking.experiment=routing"])
        fixed = run_evaluation("runs/ft/dynet.safetensors", cfg, "all", "cpu")
        assert list(fixed["results"]) == ["XS", "S", "L"]
        out = run_routed_evaluation("runs/ft/dynet.safetensors", cfg, "cpu")
        model = load_model("runs/ft/dynet.safetensors")
        router = load_router("runs/ft/dynet.router.pt", model)
    finally:
        os.chdir(cwd)
    table, records = out["results"]["auto"], out["records"]
    assert [r["task"] for r in records].count("bsd68_s25") == 1 and len(records) == 5
    for r in records:  # the project's counter: chosen variant + router, at the image's size
        expected = (count_flops(model, r["height"], r["width"], variant=r["variant"]).paper
                    + count_router_flops(router, r["height"], r["width"]).paper) / 1e9
        assert r["gflops"] == pytest.approx(expected, rel=1e-9)
        assert table[r["task"]]["gflops"] == pytest.approx(expected, rel=1e-9)  # one image per task
    assert table["average"]["gflops"] == pytest.approx(sum(r["gflops"] for r in records) / 5)
    from mlflow.tracking import MlflowClient
    run = MlflowClient(f"sqlite:///{work}/mlflow.db").get_run(out["run_id"])
    assert run.data.metrics["eval/auto/average/gflops"] == pytest.approx(table["average"]["gflops"])
    shares = [run.data.metrics[f"eval/auto/all/chosen_{v}"] for v in ("XS", "S", "L")]
    assert sum(shares) == pytest.approx(1.0) and "eval/auto/sots/psnr" in run.data.metrics

    bench = _run([sys.executable, ROOT / "bench/routing.py", "--checkpoint", "runs/ft/dynet.safetensors",
                  *CONFIG, *DATA, "--tolerances", "0", "0.5", "--out", "out/bench", "--json", "out/bench.json"], work)
    assert bench.stdout.strip().splitlines()[-1].startswith("gflops_saved_vs_largest_at_0.05db=")
    result = json.loads((work / "out/bench.json").read_text())
    avg = result["curves"]["average"]
    assert [p["tolerance_db"] for p in avg["router"]] == [0.0, 0.05, 0.5]
    assert set(avg["fixed"]) == {"XS", "S", "L"} and (work / "out/bench/routing.png").is_file()
    assert all(abs(p["regret_db"]) < 100 for p in avg["router"])

    # a router trained for another variant set is refused, naming the mismatch
    other = torch.load(work / "runs/ft/dynet.router.pt", weights_only=True)
    other["variants"] = {"S": [2, 3, 3, 4], "L": [4, 6, 6, 8]}
    torch.save(other, work / "other.router.pt")
    proc = _run([sys.executable, ROOT / "launch/evaluate.py", "--checkpoint", "runs/ft/dynet.safetensors",
                 "--variant", "auto", "--router", "other.router.pt", *CONFIG, *DATA], work, ok=False)
    assert proc.returncode == 2 and "another variant set" in proc.stderr, proc.stderr
