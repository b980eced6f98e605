"""The batch plan (dyntrain.config.plan): the shipped configs plan at every GPU count, the paper's
batch and lr hold on 8 GPUs, a batch that cannot be split grows with the samples budget kept, a
resume on fewer ranks keeps the original plan, and the planned config plans to itself."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from dyntrain.config import ConfigError, load_config
from dyntrain.config.plan import batch_plan
from dyntrain.train.engine import build_ds_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["pretrain.yaml", "finetune_allinone.yaml", "finetune_mio.yaml", "quickstart.yaml",
           "finetune_quickstart.yaml"]
WORLDS = [1, 2, 4, 8, 32, 64, 256, 1024]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_plan_at_every_gpu_count(name):
    cfg = load_config(ROOT / "configs" / name)
    budget = cfg.run.max_steps * (cfg.deepspeed.global_batch_size or 0)
    for world in WORLDS:
        plan = batch_plan(cfg, world)
        ds = build_ds_config(cfg, world)
        assert ds["train_batch_size"] == plan.global_batch == plan.micro_batch * plan.accumulation * world
        assert 1 <= plan.micro_batch <= cfg.data.micro_batch_size
        if cfg.deepspeed.global_batch_size:  # the budget in samples is kept (to one batch)
            assert budget <= plan.samples < budget + plan.global_batch
            assert plan.global_batch == max(cfg.deepspeed.global_batch_size, world)  # powers of two
        else:  # a fixed per-GPU batch: nothing scaled
            assert plan.iterations == cfg.run.max_steps and plan.lr == cfg.optim.lr


def test_pretrain_yaml_on_8_gpus_is_the_papers_batch_and_lr():
    cfg = load_config(ROOT / "configs/pretrain.yaml")
    plan = batch_plan(cfg, 8)
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (32, 4, 1)
    assert (plan.lr, plan.iterations, plan.samples, plan.grown) == (1e-4, 1_000_000, 32_000_000, False)
    ds = build_ds_config(cfg, 8)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["scheduler"]["params"]["warmup_max_lr"] == 1e-4


@pytest.mark.parametrize("rule, factor", [("sqrt", math.sqrt(2)), ("linear", 2.0), ("none", 1.0)])
def test_at_64_gpus_the_batch_grows_lr_scales_and_the_samples_are_kept(rule, factor):
    cfg = load_config(ROOT / "configs/pretrain.yaml", [f"optim.lr_scaling={rule}", "optim.warmup_steps=1000",
                                                        "optim.lr_schedule=cosine", "optim.min_lr=1e-6"])
    plan = batch_plan(cfg, 64)
    assert (plan.global_batch, plan.micro_batch, plan.accumulation, plan.grown) == (64, 1, 1, True)
    assert plan.iterations == 500_000 and plan.samples == 32_000_000
    assert plan.lr == pytest.approx(1e-4 * factor) and plan.min_lr == pytest.approx(1e-6 * factor)
    assert plan.warmup_steps == 500
    ds = build_ds_config(cfg, 64)
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-4 * factor)
    assert ds["scheduler"]["params"]["total_num_steps"] == 500_000
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 500
    planned = plan.apply(cfg)
    assert planned.checkpoint.every == 2500 and planned.checkpoint.milestone_every == 50_000
    assert any("grown from 32" in line and "sqrt" in line or rule != "sqrt" for line in plan.lines())


def test_finetune_step_counts_follow_the_grown_batch():
    cfg = load_config(ROOT / "configs/finetune_allinone.yaml")
    planned = batch_plan(cfg, 64).apply(cfg)   # 32 -> 64: half the steps, the same epochs
    assert (planned.run.max_steps, planned.optim.warmup_steps, planned.optim.total_steps) == (209_217, 26_149, 261_492)
    assert (planned.checkpoint.every, planned.eval.every) == (1744, 17_435)
    mio = load_config(ROOT / "configs/finetune_mio.yaml")
    planned = batch_plan(mio, 32).apply(mio)   # 16 -> 32
    assert planned.schedule.tasks.period_steps == 50_000 and planned.run.max_steps == 500_000
    assert planned.optim.lr == pytest.approx(2e-4 * math.sqrt(2))


def test_a_planned_config_plans_to_itself():
    for name in CONFIGS:
        cfg = load_config(ROOT / "configs" / name)
        for world in (1, 3, 8, 64, 1024):
            plan = batch_plan(cfg, world)
            again = batch_plan(plan.apply(cfg), world)
            assert (again.global_batch, again.micro_batch, again.accumulation, again.iterations, again.lr,
                    again.warmup_steps, again.total_steps) == (plan.global_batch, plan.micro_batch,
                                                               plan.accumulation, plan.iterations, plan.lr,
                                                               plan.warmup_steps, plan.total_steps)
            assert build_ds_config(plan.apply(cfg), world) == build_ds_config(cfg, world)


def test_a_resume_on_fewer_ranks_keeps_the_original_plan():
    cfg = load_config(ROOT / "configs/pretrain.yaml")
    first = batch_plan(cfg, 64)                  # the run started on 64 GPUs (grown to 64)
    resumed = batch_plan(cfg, 16, data_ranks=64)  # resumed on 16: 4 readers each
    assert (resumed.global_batch, resumed.micro_batch, resumed.reader_accumulation) == (64, 1, 1)
    assert resumed.accumulation == 4 and (resumed.lr, resumed.iterations) == (first.lr, first.iterations)
    with pytest.raises(ConfigError, match="cannot be spread evenly"):
        batch_plan(cfg, 3, data_ranks=4)


def test_configs_that_ran_before_plans_derive_what_they_had():
    """Checkpoints written before the plan still resume: every setting that started before
    (global = micro x accumulation x world) derives the same micro-batch and accumulation."""
    for micro, glob in ((8, 32), (2, 8), (4, 16), (2, 4)):
        cfg = load_config(None, [f"data.micro_batch_size={micro}", f"deepspeed.global_batch_size={glob}"])
        for world in (1, 2, 4, 8):
            if glob % (micro * world) == 0:
                ds = build_ds_config(cfg, world)
                assert ds["train_micro_batch_size_per_gpu"] == micro
                assert ds["gradient_accumulation_steps"] == glob // (micro * world)
    cfg = load_config(None, ["deepspeed.gradient_accumulation_steps=3"])   # the fixed per-GPU form
    assert cfg.gradient_accumulation(1, 4) == 12 and batch_plan(cfg, 2, 2).global_batch == 32 * 3 * 2


def test_budget_in_samples_and_bad_values():
    cfg = load_config(None, ["deepspeed.global_batch_size=48", "data.micro_batch_size=16",
                             "run.max_samples=1000"])
    plan = batch_plan(cfg, 5)                    # 48 -> 50 over 5 ranks: 10 each, micro 10
    assert (plan.global_batch, plan.micro_batch, plan.accumulation, plan.iterations) == (50, 10, 1, 20)
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(None, ["optim.lr_scaling=cubic"])
    with pytest.raises(ConfigError, match="run.max_samples"):
        load_config(None, ["run.max_samples=0"])


def test_a_resume_that_would_grow_the_batch_is_refused():
    from dyntrain.config.plan import check_resume_plan

    cfg = load_config(ROOT / "configs/pretrain.yaml")
    check_resume_plan(cfg, batch_plan(cfg, 16), 8)      # 8 -> 16 GPUs: resharded, still 32
    check_resume_plan(cfg, batch_plan(cfg, 4, 8), 8)    # 8 -> 4: two readers each
    with pytest.raises(ConfigError, match="checkpoint.dir: the run was written by 8 data ranks at global batch 32"):
        check_resume_plan(cfg, batch_plan(cfg, 64), 8)
    fixed = load_config(ROOT / "configs/quickstart.yaml")   # a fixed per-GPU batch: as before
    check_resume_plan(fixed, batch_plan(fixed, 4), 2)


def test_progress_of_a_grown_run_counts_its_planned_iterations(tmp_path, capsys):
    """``python -m dyntrain.checkpoint progress`` (the Slurm requeue decision): a run of pretrain.yaml
    written by 64 data ranks is finished at 500k steps (32M samples at batch 64), not 1M."""
    import json

    from dyntrain.checkpoint import layout as ck
    from dyntrain.checkpoint.cli import main

    tag = tmp_path / ck.tag_for_step(500_000)
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag / ck.COMPLETE).write_text(json.dumps({"tag": tag.name, "step": 500_000, "world_size": 64, "data_ranks": 64,
                                               "files": {"mp_rank_00_model_states.pt": 1}}))
    assert main(["progress", "--config", str(ROOT / "configs/pretrain.yaml"), f"checkpoint.dir={tmp_path}"]) == 0
    assert capsys.readouterr().out.startswith("step=500000 max_steps=500000 finished=1")
