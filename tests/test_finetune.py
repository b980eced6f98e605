"""Fine-tuning through the pre-training machinery: 2 CPU ranks under the deepspeed launcher, from a
tiny pre-training checkpoint, with periodic evaluation into MLflow; single-task / fixed-variant /
from-scratch modes; init-checkpoint errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]", "model.num_refinement=1",
        "data.crop_size=32", "data.micro_batch_size=2", "data.num_threads=0", "run.log_every=2",
        "deepspeed.bf16=false", "optim.warmup_steps=0", "optim.lr_schedule=constant"]


def _free_port() -> int:
    from dyntrain.engine import free_port
    return free_port()


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                DYNTRAIN_TRACE_DIR=str(tmp_path / "trace"))


def _tail(proc) -> str:
    return proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dyntrain.data.paired import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    sets = make_demo_data(root, train_images=4, test_images=1, height=40, width=48)
    return root, sets


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 'pre-trained' DyNet exported as weights + model config."""
    from dyntrain.checkpoint import save_weights
    from dyntrain.config import load_config
    from dyntrain.model_factory import build_model

    cfg = load_config(None, [o for o in TINY if o.startswith("model.")] + ["run.seed=7"])
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("pre") / "tiny_pretrained.pt"
    save_weights(path, model.state_dict(), cfg.to_dict()["model"])  # the exported-weights format
    return path, model


def _common(tmp_path, demo, init):
    root, sets = demo
    return ["--config", str(ROOT / "configs" / "finetune_allinone.yaml"), *TINY,
            f"data.root={root / 'train'}", f"init.checkpoint={init}", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "checkpoint.every=0", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=ft-test",
            "eval.max_images=1", "eval.sets=" + json.dumps(sets), "data.tasks={denoise: 1, derain: 1, dehaze: 1}"]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo, pretrained):
    """One 2-rank fine-tuning run (ZeRO-2, 4 steps, evaluation every 2 steps) shared by the tests."""
    tmp_path = tmp_path_factory.mktemp("ft")
    init_path, _ = pretrained
    args = _common(tmp_path, demo, init_path) + ["run.max_steps=4", "eval.every=2", "deepspeed.zero_stage=2",
                                                 "run.name=ft-2ranks"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), str(ROOT / "launch" / "finetune.py"), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _tail(proc)
    print(f"2-rank fine-tune took {time.monotonic() - t0:.1f}s")
    return tmp_path, proc, args


def test_two_ranks_finetune_from_a_pretraining_checkpoint(finetuned, pretrained):
    from mlflow.tracking import MlflowClient

    from dyntrain.config import load_config
    from dyntrain.data.paired import build_finetune_loader
    from dyntrain.schedule import VariantSchedule
    from dyntrain.trainer import restoration_loss

    tmp_path, proc, args = finetuned
    init_path, init_model = pretrained
    assert "evaluation at step 2" in proc.stdout and "evaluation at step 4" in proc.stdout

    traces = [json.loads((tmp_path / "trace" / f"trace_rank{r}.json").read_text()) for r in range(2)]
    assert traces[0]["weights_sha256"] == traces[1]["weights_sha256"]
    assert [s["variant"] for s in traces[0]["steps"]] == [s["variant"] for s in traces[1]["steps"]]
    for s0, s1 in zip(traces[0]["steps"], traces[1]["steps"]):
        assert not set(s0["keys"]) & set(s1["keys"])  # ranks read different samples

    # the first step's loss is that of the init weights on the loaders' first batches
    cfg = load_config(str(ROOT / "configs" / "finetune_allinone.yaml"), args[2:])
    reuse = VariantSchedule.from_config(cfg).reuse_at(0)
    losses = []
    with torch.no_grad():
        for rank in range(2):
            loader = build_finetune_loader(cfg, rank, 2, "cpu")
            batch = next(loader)
            assert batch["keys"] == traces[rank]["steps"][0]["keys"]
            losses.append(restoration_loss(init_model(batch["input"], reuse=reuse), batch["target"]).item())
            loader.close()
    assert traces[0]["steps"][0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("ft-test")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.mode = 'finetune'")
    assert run.data.params["data.source"] == "paired"
    assert run.data.tags["init_checkpoint"] == str(init_path)
    hist = client.get_metric_history(run.info.run_id, "eval/L/average/psnr")
    assert [m.step for m in hist][:2] == [2, 4]
    for name in ("eval/S/sots/psnr", "eval/S/rain100l/ssim", "eval/L/bsd68_s50/psnr", "loss"):
        assert name in run.data.metrics
    assert (tmp_path / "ckpt" / "step_00000004" / "COMPLETE").is_file()


def test_evaluate_cli_on_the_checkpoint_matches_the_in_training_evaluation(finetuned, demo):
    from mlflow.tracking import MlflowClient

    tmp_path, _, args = finetuned
    _, sets = demo
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint", str(tmp_path / "ckpt"),
           "--variant", "all", f"tracking.uri={uri}", "tracking.experiment=ft-test", "eval.max_images=1",
           "eval.sets=" + json.dumps(sets)]
    proc = subprocess.run(cmd + ["--child"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, _tail(proc)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split()[1:4] == ["SOTS", "Rain100L", "BSD68"]
    assert lines[header + 2].startswith("DyNet-S") and lines[header + 3].startswith("DyNet-L")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ft-test")
    (ft,) = client.search_runs([exp.experiment_id], filter_string="tags.mode = 'finetune'")
    (child,) = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{ft.info.run_id}'")
    assert child.data.tags["dyntrain.stage"] == "evaluation"
    for key, value in child.data.metrics.items():
        if key.startswith("eval/"):  # same weights, same images: same numbers as during training
            assert value == pytest.approx(ft.data.metrics[key], abs=1e-4), key
    assert child.data.metrics["model/L/gflops_224"] > child.data.metrics["model/S/gflops_224"] > 0
    assert f"{child.data.metrics['eval/L/sots/psnr']:.2f}" in lines[header + 3]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/S/average/psnr")] == [4]


def test_single_task_fixed_variant_from_scratch_on_paired_shards(tmp_path, demo):
    """Single-task mode, fixed-variant mode and no pre-training, reading packed shards through DALI."""
    from dyntrain.data.paired import pack_paired_shards

    pack_paired_shards(demo[0] / "train", str(tmp_path / "shards"), shard_samples=3, printer=lambda s: None)
    args = _common(tmp_path, demo, "null") + [
        "run.max_steps=3", "data.tasks={denoise: 0, derain: 2, dehaze: 0}", "schedule.mode=fixed",
        "schedule.fixed_variant=S", "eval.every=0", "deepspeed.zero_stage=0", "tracking.enabled=false",
        "data.source=paired_shards", f"data.train_urls=[{tmp_path / 'shards'}]", "data.shuffle_buffer=4"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *args], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, _tail(proc)
    (trace,) = [json.loads(p.read_text()) for p in (tmp_path / "trace").glob("trace_rank*.json")]
    assert {s["variant"] for s in trace["steps"]} == {"S"}
    assert all(k.startswith("derain/") for s in trace["steps"] for k in s["keys"])


def test_init_checkpoint_errors(tmp_path, pretrained, capsys):
    from dyntrain.config import load_config
    from dyntrain.finetune import InitCheckpointError, adopt_architecture, make_model_builder, read_init_weights

    init_path, _ = pretrained
    cfg = load_config(None, [f"init.checkpoint={tmp_path / 'missing.pt'}"])
    with pytest.raises(InitCheckpointError, match="missing.pt"):
        read_init_weights(cfg)
    cfg = load_config(None, [f"init.checkpoint={init_path}"])
    state, model_cfg = read_init_weights(cfg)
    wrong = load_config(None, [f"init.checkpoint={init_path}", "model.dim=16"])
    with pytest.raises(InitCheckpointError, match="does not fit the model"):
        make_model_builder(wrong, state)(wrong)
    changed = adopt_architecture(wrong, model_cfg)
    assert any(c.startswith("dim: 16 -> 8") for c in changed)
    model = make_model_builder(wrong, state)(wrong)  # the checkpoint's architecture now fits
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    launcher = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "data.source=shards"],
                              capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 2 and "data.source" in launcher.stderr
