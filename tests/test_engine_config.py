"""The DeepSpeed JSON generated from the typed config."""
from __future__ import annotations

import math
import os

import pytest
import torch

from dyntrain.config import ConfigError, load_config
from dyntrain.train.engine import build_ds_config, extensions_dir_default, resolve_bf16


def ds(overrides, world=1, device="cpu"):
    return build_ds_config(load_config(None, overrides), world, device)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    c = ds([f"deepspeed.zero_stage={stage}"])
    assert c["zero_optimization"]["stage"] == stage
    if stage == 3:
        z = c["zero_optimization"]
        assert z["stage3_max_reuse_distance"] > 0 and "stage3_prefetch_bucket_size" in z


def test_batch_accumulation_clipping_and_optimizer():
    c = ds(["data.micro_batch_size=4", "deepspeed.gradient_accumulation_steps=3",
            "optim.grad_clip=0.5", "optim.name=adamw", "optim.weight_decay=0.01"], world=2)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"],
            c["gradient_accumulation_steps"]) == (24, 4, 3)
    assert c["gradient_clipping"] == 0.5
    assert c["optimizer"]["type"] == "AdamW"
    assert c["optimizer"]["params"]["adam_w_mode"] is True
    assert c["optimizer"]["params"]["torch_adam"] is True
    plain = ds([])
    assert plain["gradient_clipping"] == 0.0  # explicit even when off
    assert plain["optimizer"]["type"] == "Adam" and plain["optimizer"]["params"]["adam_w_mode"] is False
    assert plain["optimizer"]["params"]["betas"] == [0.9, 0.999]


def test_global_batch_size_derives_accumulation():
    over = ["deepspeed.global_batch_size=32", "data.micro_batch_size=8"]
    assert ds(over, world=1)["gradient_accumulation_steps"] == 4
    assert ds(over, world=4)["gradient_accumulation_steps"] == 1
    # the batch plan (dyntrain.config.plan): 8 GPUs take 4 each, no longer a config error
    eight = ds(over, world=8)
    assert (eight["train_micro_batch_size_per_gpu"], eight["gradient_accumulation_steps"],
            eight["train_batch_size"]) == (4, 1, 32)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(None, over + ["deepspeed.gradient_accumulation_steps=2"])


def test_bf16_auto_is_off_on_cpu_and_explicit_values_win():
    assert ds([])["bf16"]["enabled"] is False  # auto on CPU
    assert ds(["deepspeed.bf16=true"])["bf16"]["enabled"] is True
    cfg = load_config(None, ["deepspeed.bf16=false"])
    assert resolve_bf16(cfg, torch.device("cuda", 0)) is False


def test_offload_needs_zero():
    with pytest.raises(ConfigError, match="offload_optimizer"):
        ds(["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])
    assert ds(["deepspeed.offload_optimizer=true"])["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def _lrs(c, steps):
    """Run DeepSpeed's own scheduler class from the generated JSON on a dummy optimizer."""
    from deepspeed.runtime import lr_schedules

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=c["optimizer"]["params"]["lr"])
    sched = getattr(lr_schedules, c["scheduler"]["type"])(opt, **c["scheduler"]["params"])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step uses
        opt.step()
        sched.step()
    return out


def test_lr_schedules_constant_warmup_and_cosine():
    const = _lrs(ds(["optim.lr=1e-4"]), 5)
    assert const == pytest.approx([1e-4] * 5)
    # DeepSpeed's schedulers: optimizer step k runs at the schedule's value for iteration k - 1
    # (step 0 at the warm-up start)
    cos = _lrs(ds(["optim.lr=1e-3", "optim.lr_schedule=cosine", "optim.warmup_steps=10",
                   "optim.min_lr=1e-5", "run.max_steps=110"]), 112)
    assert cos[0] == 0.0 and cos[6] == pytest.approx(5e-4) and cos[11] == pytest.approx(1e-3, rel=1e-3)
    assert all(b <= a + 1e-15 for a, b in zip(cos[11:], cos[12:]))  # decays after warm-up
    assert cos[61] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 51 / 100)) / 2, rel=1e-6)
    assert cos[111] == pytest.approx(1e-5)
    lin = _lrs(ds(["optim.lr=1e-3", "optim.lr_schedule=linear", "optim.warmup_steps=4",
                   "optim.total_steps=20"]), 22)
    assert lin[5] == pytest.approx(1e-3) and lin[21] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_buckets_sized_for_the_model_and_overlap_only_on_cuda(stage):
    """Buckets small enough that the gradient reduction of a 16.6M-parameter model overlaps the
    backward pass (several buckets per step), overlap_comm on with CUDA and off with gloo on CPU."""
    from dynet import DyNet, DyNetConfig

    with torch.device("meta"):
        params = sum(p.numel() for p in DyNet(DyNetConfig()).parameters())
    z = ds([f"deepspeed.zero_stage={stage}"])["zero_optimization"]
    assert z["overlap_comm"] is False and z["contiguous_gradients"] is True
    assert 4 <= params / z["reduce_bucket_size"] <= 16
    assert ds([f"deepspeed.zero_stage={stage}", "deepspeed.bf16=true"],
              device="cuda")["zero_optimization"]["overlap_comm"] is True
    if stage < 3:
        assert z["allgather_bucket_size"] >= params  # one gather of the updated partitions
    else:
        assert "allgather_bucket_size" not in z
        assert z["stage3_prefetch_bucket_size"] == z["reduce_bucket_size"]
        assert z["stage3_param_persistence_threshold"] == int(1e5)


def test_extensions_dir_defaults_to_the_environments_own_folder(monkeypatch, tmp_path):
    """DeepSpeed's JIT-built ops go to ``<sys.prefix>/torch_extensions`` (where launch/setup.sh builds
    the CPU comm op), not torch's machine-wide ~/.cache; an explicit TORCH_EXTENSIONS_DIR wins, and a
    read-only environment is left to torch's default."""
    import sys

    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions_dir_default() == str(tmp_path / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert extensions_dir_default() == "/elsewhere"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))  # a read-only prefix
    assert extensions_dir_default() is None and "TORCH_EXTENSIONS_DIR" not in os.environ


def test_clipping_norm_is_the_same_bits_however_the_ranks_split_the_gradient():
    """The gradient norm behind clipping (``dyntrain.train.gradnorm``) is the same float64 value
    whether one rank holds the whole gradient or the ranks hold pieces cut anywhere (a parameter
    split at a partition edge included). DeepSpeed's own sum (float64 per rank, rounded to float32,
    the ranks' float32 values added) is not: a 1-rank resume hosting the data ranks clipped its
    steps by a factor a few ulps off the 2-rank run's, and the weights drifted apart."""
    from dyntrain.train.gradnorm import exact_sum_of_squares

    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen) * scale for n, scale in
              ((37, 0.3), (1000, 0.01), (3, 2.0), (4096, 0.02), (517, 0.05), (64, 1e-6))]
    flat = torch.cat(params)
    total = flat.numel()

    def deepspeed_norm(ranks):  # stage_1_and_2.get_grad_norm_direct, the all-reduce in float32
        per_rank = [torch.stack([torch.linalg.vector_norm(g.double()) for g in parts]).pow(2).sum().float()
                    for parts in ranks]
        return float(torch.stack(per_rank).sum().sqrt())

    def cut(edges):  # the flat gradient cut at ``edges`` into ranks, each rank's part per parameter
        bounds, start, ranks = list(edges) + [total], 0, []
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        for end in bounds:
            ranks.append([flat[max(start, a):min(end, b)] for a, b in zip(offsets, offsets[1:])
                          if max(start, a) < min(end, b)])
            start = end
        return ranks

    one = [params]
    splits = [cut([total // 2]), cut([1000]), cut([total // 4, total // 2, 3 * total // 4])]
    splits += [cut([k]) for k in range(101, total, 397)]
    want = exact_sum_of_squares(params, total)
    assert math.isclose(want, float(flat.double().square().sum()), rel_tol=1e-12)
    for ranks in splits:
        assert exact_sum_of_squares([g for parts in ranks for g in parts], total) == want
    assert any(deepspeed_norm(ranks) != deepspeed_norm(one) for ranks in splits)
    bad = flat.clone()
    bad[7] = float("nan")
    assert exact_sum_of_squares([bad], total) is None and exact_sum_of_squares([], total) == 0.0
