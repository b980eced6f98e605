"""The README's path after pre-training, in a fresh folder: a short real pre-training run (quickstart
config, DALI shards, DeepSpeed checkpoint folder) -> generated all-in-one data -> fine-tuning on 2 CPU
ranks under the deepspeed launcher with periodic evaluation -> launch/evaluate.py on the checkpoint ->
export -> launch/restore.py with S and L from one file -> launch/compare.py over the real MLflow runs.
Tracking goes to the production backend: a real ``mlflow server`` on 127.0.0.1 (``conftest.mlflow_server``),
whose store receives the runs, the metrics and the artifacts (config, DeepSpeed JSON, comparison plot).
Plus single-task / fixed-variant / from-scratch fine-tuning on packed shards, init errors, and
multiple-in-one fine-tuning (synthetic pairs, sequential curriculum, MiO test sets)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "tests/rank_entry.py"  # runs a launch script with a trace (--trace DIR)
PRETRAIN_CKPT = "runs/quickstart/checkpoints"
FINETUNE_CKPT = "runs/quickstart-finetune/checkpoints"
pytestmark = pytest.mark.slow


def _env(work: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd, cwd: Path, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(cwd), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]
    print(f"{' '.join(str(c) for c in cmd[:3])}: {time.monotonic() - t0:.1f}s")
    return proc


@pytest.fixture(scope="module")
def uri(mlflow_server) -> str:
    return mlflow_server.uri


@pytest.fixture(scope="module")
def work(tmp_path_factory, uri):
    """A fresh folder with the quickstart's pre-training checkpoint and the generated fine-tune data."""
    from dyntrain.data.synthetic import write_synthetic_images

    work = tmp_path_factory.mktemp("work")
    write_synthetic_images(work / "data/quickstart/images", 3, size=(256, 256), seed=0)
    _run([sys.executable, ROOT / "launch/make_shards.py", "--src", "data/quickstart/images",
          "--out", "data/quickstart/shards", "--patch-size", "128", "--shard-samples", "6", "--quiet"], work)
    _run([sys.executable, ROOT / "launch/pretrain.py", "--config", ROOT / "configs/quickstart.yaml",
          "run.max_steps=2", "run.log_every=1", "schedule.verify_every=0", f"tracking.uri={uri}"], work)
    assert (work / PRETRAIN_CKPT / "step_00000002" / "COMPLETE").is_file()
    _run([sys.executable, "-m", "dyntrain.data.finetune.paired", "demo", "--out", "data/finetune_demo",
          "--train-images", "4", "--test-images", "1", "--height", "40", "--width", "48"], work)
    return work


FT_ARGS = ["run.max_steps=4", "eval.every=2", "eval.max_images=1", "checkpoint.every=0", "run.log_every=2",
           "data.tasks={denoise: 1, derain: 1, dehaze: 1}",  # unique keys per epoch for the rank check
           "deepspeed.zero_stage=3"]  # partitioned weights: the periodic evaluation must gather them


@pytest.fixture(scope="module")
def finetuned(work, uri):
    """The README's fine-tuning command, shortened: 2 CPU ranks, ZeRO-3, 4 steps, evaluation every 2."""
    proc = _run(deepspeed_cmd(2, ENTRY, "--trace", work / "trace", ROOT / "launch/finetune.py",
                              "--config", ROOT / "configs/finetune_quickstart.yaml", *FT_ARGS,
                              f"tracking.uri={uri}"), work)
    return proc


def test_two_ranks_finetune_from_the_pretraining_checkpoint(work, finetuned, uri):
    from mlflow.tracking import MlflowClient

    from dyntrain.config import load_config
    from dyntrain.data.finetune.paired import build_finetune_loader
    from dyntrain.config import dynet_config_from_dict
    from dyntrain.train.schedule import VariantSchedule
    from dyntrain.train.trainer import restoration_loss
    from dyntrain.checkpoint.weights import load_weights
    from dynet import DyNet

    assert "evaluation at step 2" in finetuned.stdout and "evaluation at step 4" in finetuned.stdout
    assert "model architecture taken from init.checkpoint" in finetuned.stdout
    traces = [json.loads((work / "trace" / f"trace_rank{r}.json").read_text()) for r in range(2)]
    assert traces[0]["weights_sha256"] == traces[1]["weights_sha256"]
    assert [s["variant"] for s in traces[0]["steps"]] == [s["variant"] for s in traces[1]["steps"]]
    for s0, s1 in zip(traces[0]["steps"], traces[1]["steps"]):
        assert not set(s0["keys"]) & set(s1["keys"])  # ranks read different samples

    # the first step's loss is that of the pre-trained weights on the loaders' first batches
    state, model_cfg = load_weights(work / PRETRAIN_CKPT)
    init_model = DyNet(dynet_config_from_dict(model_cfg))
    init_model.load_state_dict(state)
    cfg = load_config(ROOT / "configs/finetune_quickstart.yaml",
                      FT_ARGS + [f"data.root={work / 'data/finetune_demo/train'}"])  # it ran in work/
    schedule = VariantSchedule.from_config(cfg)
    reuse = schedule.variants[schedule.variant_at(0)]
    losses = []
    with torch.no_grad():
        for rank in range(2):
            loader = build_finetune_loader(cfg, rank, 2, "cpu")
            batch = next(loader)
            assert batch["keys"] == traces[rank]["steps"][0]["keys"]
            losses.append(restoration_loss(init_model(batch["input"], reuse=reuse), batch["target"]).item())
            loader.close()
    assert traces[0]["steps"][0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dynet-quickstart-finetune")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`dyntrain.stage` = 'finetune'")
    assert run.data.params["data.source"] == "paired" and run.data.params["model.dim"] == "8"
    assert run.data.tags["init_checkpoint"] == PRETRAIN_CKPT
    assert {"config.yaml", "deepspeed_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # the batch plan in the params, and the DeepSpeed JSON the run handed to deepspeed.initialize is
    # the one its dry run prints for world size 2 (which also states the resume it would make now)
    assert (run.data.params["plan.world_size"], run.data.params["plan.global_batch"],
            run.data.params["plan.micro_batch"], run.data.params["plan.accumulation"]) == ("2", "8", "4", "1")
    used = json.loads(Path(client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(work))).read_text())
    dry = _run([sys.executable, ROOT / "launch/finetune.py", "--config", ROOT / "configs/finetune_quickstart.yaml",
                *FT_ARGS, f"tracking.uri={uri}", "--dry-run", "--world-size", "2"], work)
    assert json.loads(dry.stdout.splitlines()[-1]) == used
    assert "starts fresh (checkpoint.resume=never)" in dry.stdout
    dry = _run([sys.executable, ROOT / "launch/finetune.py", "--config", ROOT / "configs/finetune_quickstart.yaml",
                *FT_ARGS, f"tracking.uri={uri}", "checkpoint.resume=auto", "--dry-run", "--world-size", "1"], work)
    assert json.loads(dry.stdout.splitlines()[-1])["gradient_accumulation_steps"] == 2  # 2 readers on 1 rank
    assert "resumes from step_00000004" in dry.stdout and f"tracking server {uri} answers" in dry.stdout
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/L/average/psnr")] == [2, 4]
    for name in ("eval/S/sots/psnr", "eval/S/rain100l/ssim", "eval/L/bsd68_s50/psnr", "loss"):
        assert name in run.data.metrics
    assert (work / FINETUNE_CKPT / "step_00000004" / "COMPLETE").is_file()


def test_evaluate_cli_on_the_checkpoint_matches_the_in_training_evaluation(work, finetuned, uri):
    from mlflow.tracking import MlflowClient

    proc = _run([sys.executable, ROOT / "launch/evaluate.py", "--checkpoint", FINETUNE_CKPT, "--variant", "all",
                 "--config", ROOT / "configs/finetune_quickstart.yaml", "--child", "eval.max_images=1", f"tracking.uri={uri}"], work)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split()[1:4] == ["SOTS", "Rain100L", "BSD68"] and lines[header].endswith("average")
    assert lines[header + 2].startswith("DyNet-S") and lines[header + 3].startswith("DyNet-L")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dynet-quickstart-finetune")
    (ft,) = client.search_runs([exp.experiment_id], filter_string="tags.`dyntrain.stage` = 'finetune'")
    (child,) = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{ft.info.run_id}'")
    assert child.data.tags["dyntrain.stage"] == "evaluation"
    evals = {k: v for k, v in child.data.metrics.items() if k.startswith("eval/")}
    assert len(evals) == 2 * 6 * 2  # 2 variants x (5 tasks + average) x (psnr, ssim)
    for key, value in evals.items():  # same weights, same images: the numbers of the last in-training eval
        assert value == pytest.approx(ft.data.metrics[key], abs=1e-4), key
    assert child.data.metrics["model/L/gflops_224"] > child.data.metrics["model/S/gflops_224"] > 0
    assert f"{child.data.metrics['eval/L/sots/psnr']:.2f}" in lines[header + 3]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/S/average/psnr")] == [4]


def test_export_restore_both_variants_and_compare(work, finetuned, uri):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    _run([sys.executable, ROOT / "launch/export.py", "--checkpoint", FINETUNE_CKPT,
          "--out", "runs/quickstart-finetune/dynet.safetensors"], work)
    hazy = work / "data/finetune_demo/test/sots/outdoor/hazy"
    outs = {}
    for variant in ("S", "L"):
        proc = _run([sys.executable, ROOT / "launch/restore.py", "--checkpoint",
                     "runs/quickstart-finetune/dynet.safetensors", "--variant", variant, "--gray-world",
                     hazy, f"restored/{variant}"], work)
        assert f"with DyNet-{variant}" in proc.stdout
        (out,) = (work / "restored" / variant).glob("*.jpg")
        outs[variant] = np.asarray(Image.open(out))
        assert outs[variant].shape == np.asarray(Image.open(hazy / out.name)).shape
    assert not np.array_equal(outs["S"], outs["L"])

    proc = _run([sys.executable, ROOT / "launch/compare.py", "--out", "runs/comparison.png",
                 "--tracking-uri", uri], work)
    text = proc.stdout
    assert "quickstart" in text and "dynamic" in text  # the pre-training run and its GPU hours
    assert "quickstart-finetune" in text and "evaluation" in text
    assert (work / "runs/comparison.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(uri)
    (cmp_run,) = client.search_runs([client.get_experiment_by_name("dynet-comparison").experiment_id])
    assert "comparison.png" in {a.path for a in client.list_artifacts(cmp_run.info.run_id)}


def test_single_task_fixed_variant_from_scratch_on_paired_shards(work, tmp_path):
    """Single-task mode, fixed-variant mode and no pre-training, reading packed shards through DALI."""
    from dyntrain.data.finetune.paired_shards import pack_paired_shards

    pack_paired_shards(work / "data/finetune_demo/train", str(tmp_path / "shards"), shard_samples=3,
                       printer=lambda s: None)
    _run([sys.executable, ENTRY, "--trace", tmp_path / "trace", ROOT / "launch/finetune.py",
          "--config", ROOT / "configs/finetune_quickstart.yaml", "init.checkpoint=null", "model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
          "model.num_refinement=1", "run.max_steps=3", "data.tasks={denoise: 0, derain: 2, dehaze: 0}",
          "schedule.mode=fixed", "schedule.fixed_variant=S", "eval.every=0", "deepspeed.zero_stage=0",
          "tracking.enabled=false", f"checkpoint.dir={tmp_path / 'ckpt'}", "data.source=paired_shards",
          f"data.train_urls=[{tmp_path / 'shards'}]", "data.shuffle_buffer=4"], tmp_path,
         env=_env(tmp_path))
    (trace,) = [json.loads(p.read_text()) for p in (tmp_path / "trace").glob("trace_rank*.json")]
    assert {s["variant"] for s in trace["steps"]} == {"S"}
    assert all(k.startswith("derain/") for s in trace["steps"] for k in s["keys"])


def test_init_checkpoint_errors(work, tmp_path):
    from dyntrain.config import load_config
    from dyntrain.jobs.finetune import InitCheckpointError, adopt_architecture, make_model_builder, read_init_weights

    cfg = load_config(None, [f"init.checkpoint={tmp_path / 'missing.pt'}"])
    with pytest.raises(InitCheckpointError, match="missing.pt"):
        read_init_weights(cfg)
    wrong = load_config(None, [f"init.checkpoint={work / PRETRAIN_CKPT}", "model.dim=16"])
    state, model_cfg = read_init_weights(wrong)  # the DeepSpeed folder's consolidated weights
    with pytest.raises(InitCheckpointError, match="does not fit the model"):
        make_model_builder(wrong, state)(wrong)
    changed = adopt_architecture(wrong, model_cfg)
    assert any(c.startswith("dim: 16 -> 8") for c in changed)
    model = make_model_builder(wrong, state)(wrong)  # the checkpoint's architecture now fits
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    launcher = subprocess.run([sys.executable, str(ROOT / "launch/finetune.py"), "data.source=shards"],
                              capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 2 and "data.source" in launcher.stderr


MIO_CKPT = "runs/mio/checkpoints"


def test_sequential_finetune_on_synthetic_pairs_then_mio_evaluation(work):
    """Multiple-in-one fine-tuning end to end on 2 CPU ranks: the pre-training checkpoint -> MiO test
    sets (launch/make_testsets.py) -> sequential fine-tuning on synthetic pairs under the deepspeed
    launcher (LR restarts, periods, active tasks into MLflow) -> launch/evaluate.py on the MiO sets,
    per task and preset -> compare's table."""
    from mlflow.tracking import MlflowClient

    from dyntrain.data.synthetic import write_synthetic_images

    first = write_synthetic_images(work / "data/mio/clean", 3, size=(40, 48), seed=4)[0]
    np.save(first.with_suffix(".npy"), np.linspace(1, 2, 40 * 48, dtype=np.float32).reshape(40, 48))
    _run([sys.executable, ROOT / "launch/make_testsets.py", "--src", "data/mio/clean", "--out", "data/mio/test",
          "--tasks", "noise,rain,haze"], work)
    args = ["run.max_steps=6", "run.log_every=1", "data.crop_size=32", "data.micro_batch_size=2",
            "deepspeed.global_batch_size=null", "data.clean_urls=[data/mio/clean]",
            "data.tasks={noise: 1, rain: 1, haze: 1}", "schedule.tasks.order=[noise, rain, haze]",
            "schedule.tasks.period_steps=2", "schedule.tasks.periods=3", "optim.lr=1e-3", "optim.min_lr=1e-5",
            f"init.checkpoint={PRETRAIN_CKPT}", f"checkpoint.dir={MIO_CKPT}", "checkpoint.every=0",
            "eval.sets={mio: data/mio/test}", "eval.every=6", "eval.max_images=1",
            "tracking.experiment=mio-e2e", "schedule.verify_every=1"]
    _run(deepspeed_cmd(2, ROOT / "tests/rank_entry.py", "--trace", work / "mio_trace", ROOT / "launch/finetune.py",
                       "--config", ROOT / "configs/finetune_mio.yaml", *args), work, timeout=600)
    traces = [json.loads((work / f"mio_trace/trace_rank{r}.json").read_text()) for r in range(2)]
    steps = [t["steps"] for t in traces]
    assert [s["variant"] for s in steps[0]] == [s["variant"] for s in steps[1]]  # S/L together, same draw
    assert {s["variant"] for s in steps[0]} <= {"S", "L"}

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("mio-e2e").experiment_id])[0]
    # "lr" logged at step s is the LR step s - 1 trained with
    lr = {m.step - 1: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lr[0] == pytest.approx(1e-3) and lr[2] == pytest.approx(1e-3) and lr[4] == pytest.approx(1e-3)
    assert lr[1] < lr[0] and lr[3] < lr[2] and lr[5] < lr[4]  # cosine within a period, restart after
    period = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "curriculum/period")}
    assert period == {0: 1.0, 2: 2.0, 4: 3.0}
    assert run.data.tags["active_tasks"] == "noise,rain,haze"
    assert "data/samples_noise" in run.data.metrics and "data/depth_proxy" in run.data.metrics
    assert "eval/S/mio_in_average/psnr" in run.data.metrics and "eval/L/mio_out_haze/ssim" in run.data.metrics

    _run([sys.executable, ROOT / "launch/evaluate.py", "--checkpoint", MIO_CKPT, "--child", "--config",
          ROOT / "configs/finetune_mio.yaml", "eval.sets={mio: data/mio/test}", "tracking.experiment=mio-e2e"], work)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    metrics = children[0].data.metrics
    for preset in ("in", "out"):
        for task in ("noise", "rain", "haze", "average"):
            assert np.isfinite(metrics[f"eval/S/mio_{preset}_{task}/psnr"])
    from dyntrain.analysis.compare import collect_runs, format_tables
    shown = format_tables(*collect_runs(f"sqlite:///{work}/mlflow.db", ["mio-e2e"]))  # launch/compare.py's table
    assert "mio_in_noise" in shown and "mio_out_average" in shown
