"""Performance work: the model's training optimisations stay exact, and every benchmark runs (small,
on the CPU) and writes a sane JSON report whose headline is its last line.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynet import DyNet, DyNetConfig
from dynet.blocks import TransformerBlock
from helpers import draws  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = re.compile(r"^([A-Za-z0-9_]+)=(-?[0-9.eE+-]+|nan)$")


def tiny(seed: int = 0, **overrides) -> DyNet:
    torch.manual_seed(seed)
    return DyNet(DyNetConfig.tiny(**overrides))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def train_pass(model: DyNet, x: torch.Tensor, target: torch.Tensor, variant: str) -> torch.Tensor:
    out = model(x, variant=variant)
    (out - target).abs().mean().backward()
    return out.detach()


# ------------------------------------------------------------------------ model optimisations
def test_compiled_blocks_never_recompile_on_variant_switch():
    import torch._dynamo

    torch._dynamo.reset()
    plain = tiny()
    compiled = copy.deepcopy(plain).compile_blocks(backend="aot_eager")
    x, target = torch.rand(2, 3, 24, 16), torch.rand(2, 3, 24, 16)
    start = graphs()
    torch.testing.assert_close(train_pass(compiled, x, target, "S"),
                               train_pass(plain, x, target, "S"), rtol=1e-5, atol=1e-5)
    after_s = graphs() - start
    # one graph per distinct block shape (blocks of equal shape share it), at most 8 in DyNet
    assert 1 <= after_s <= 8
    for variant in ("L", "S", "L", "S"):
        out = train_pass(compiled, x, target, variant)
        ref = train_pass(plain, x, target, variant)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert graphs() - start == after_s, "a variant switch recompiled a block"
    # gradients (accumulated over all passes) are the uncompiled model's
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_blocks_keeps_state_dict_and_raises_the_graph_cache():
    import torch._dynamo

    plain = tiny()
    compiled = copy.deepcopy(plain).compile_blocks(backend="eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())  # checkpoints interchange
    n_blocks = sum(isinstance(m, TransformerBlock) for m in compiled.modules())
    assert n_blocks == 11  # 7 shared, 3 inside prompt blocks, 1 refinement
    assert all(m._compiled_call_impl is not None for m in compiled.modules()
               if isinstance(m, TransformerBlock))
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit
    assert limit >= 8 * n_blocks


def test_compiled_model_evaluates_eagerly_at_any_size():
    import torch._dynamo

    compiled = tiny().compile_blocks(backend="eager").eval()
    start = graphs()
    with torch.no_grad():
        for size in ((16, 16), (24, 40), (33, 17)):
            x = torch.rand(1, 3, *size)
            assert compiled(x, variant="L").shape == x.shape
    assert graphs() == start, "evaluation compiled graphs"


@pytest.mark.parametrize("weights_too", [False, True])
def test_channels_last_matches_contiguous(weights_too):
    plain = tiny()
    fast = copy.deepcopy(plain).use_channels_last()
    if weights_too:
        fast = fast.to(memory_format=torch.channels_last)
    inputs = []
    fast.enc1.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    x, target = torch.rand(2, 3, 32, 24), torch.rand(2, 3, 32, 24)
    for variant in ("S", "L"):
        ref = train_pass(plain, x, target, variant)
        out = train_pass(fast, x, target, variant)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert inputs and all(t.is_contiguous(memory_format=torch.channels_last) for t in inputs)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not tiny().channels_last and not fast.use_channels_last(False).channels_last


def plain_weights_changed(model) -> bool:
    return not all(p.is_contiguous() for p in model.parameters())


def test_model_factory_applies_compile_and_channels_last():
    from dyntrain.config import load_config
    from dyntrain.train.model import build_model

    def blocks(model):
        return [m for m in model.modules() if isinstance(m, TransformerBlock)]

    tiny_model = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
                  "model.num_refinement=1"]
    fast = build_model(load_config(None, tiny_model + ["model.compile=true",
                                                       "model.channels_last=true"]))
    assert all(b._compiled_call_impl is not None for b in blocks(fast))
    assert fast.channels_last and not plain_weights_changed(fast)
    plain = build_model(load_config(None, tiny_model))
    assert all(b._compiled_call_impl is None for b in blocks(plain))
    # ZeRO-3 leaves compilation to DeepSpeed's engine.compile()
    zero3 = build_model(load_config(None, tiny_model + ["model.compile=true",
                                                        "deepspeed.zero_stage=3"]))
    assert all(b._compiled_call_impl is None for b in blocks(zero3))


# ------------------------------------------------------------------------------- benchmarks
def run_bench(script: str, tmp_path: Path, *args: str, timeout: int = 240) -> tuple[dict, str]:
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--device", "cpu",
                           "--json", str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    match = HEADLINE.match(last)
    assert match, f"{script}: last line is not name=value: {last!r}"
    return json.loads(out.read_text()), last


def test_train_step_bench_cpu(tmp_path):
    result, last = run_bench("train_step.py", tmp_path, "--dim", "8", "--crop", "32", "--batch",
                             "2", "--steps", "2", "--warmup", "1", "--compile", "eager")
    assert last.startswith("train_step_speedup_L=")
    assert result["benchmark"] == "train_step" and result["device_type"] == "cpu"
    assert (result["dim"], result["crop"], result["batch"]) == (8, 32, 2)
    flops = result["flops_per_step"]
    assert flops["L"] > flops["S"] > 0  # more block applications, more FLOPs
    for recipe in ("baseline", "optimised"):
        rows = result["results"][recipe]["variants"]
        for v in ("S", "L"):
            r = rows[v]
            assert r["step_s"] > 0 and r["n"] == 2 and r["patches_per_s"] > 0
            assert r["patches_per_s"] == pytest.approx(2 / r["step_s"])
            assert r["mfu"] is None  # no peak on a CPU
            assert r["peak_mb"] >= 0 and r["loss"] == r["loss"]
    opt = result["results"]["optimised"]
    assert opt["recipe"]["compile"] == "eager" and opt["recipe"]["bf16_autocast"]
    assert opt["graphs_compiled"] >= 1 and opt["graphs_compiled_by_switching"] == 0
    assert result["results"]["baseline"]["graphs_compiled"] == 0
    speedup = result["speedup"]["L"]
    base, fast = (result["results"][r]["variants"]["L"]["step_s"]
                  for r in ("baseline", "optimised"))
    assert speedup == pytest.approx(base / fast)
    assert float(last.split("=")[1]) == pytest.approx(speedup, rel=1e-3)


def test_train_step_bench_mfu_with_a_given_peak(tmp_path):
    result, _ = run_bench("train_step.py", tmp_path, "--dim", "8", "--crop", "16", "--batch", "1",
                          "--steps", "1", "--warmup", "0", "--variants", "S", "--compile", "none",
                          "--peak-tflops", "1.0")
    r = result["results"]["optimised"]["variants"]["S"]
    assert 0 < r["mfu"] <= 1
    assert r["mfu"] == pytest.approx(r["train_flops_per_step"] / r["step_s"] / 1e12)


@pytest.mark.slow  # ~30 s (a 1-process engine, three phases): in the full tier, so the fast one stays under 6 min
def test_dynamic_vs_separate_bench_cpu(tmp_path):
    # compiled blocks (a quick backend) and channels-last inside the DeepSpeed engine
    result, last = run_bench("dynamic_vs_separate.py", tmp_path, "--dim", "8", "--crop", "32",
                             "--batch", "2", "--steps", "8", "--warmup", "1", "--compile", "on",
                             "--compile-backend", "aot_eager", "--channels-last", "on")
    assert last.startswith("gpu_hours_saved_frac=")
    assert result["benchmark"] == "dynamic_vs_separate" and result["world_size"] == 1
    assert result["compile_backend"] == "aot_eager" and result["channels_last"]
    n = result["steps"]
    assert set(result["wall_s"]) == {"dynamic", "S alone", "L alone"}
    assert all(w > 0 for w in result["wall_s"].values())
    # every phase trained N iterations through the Trainer, in 2 interleaved rounds
    assert result["rounds"] == 2 and result["steps_done"] == {"dynamic": n, "S alone": n,
                                                              "L alone": n}
    accounts = result["accounts"]
    assert [a["steps_S"] for a in accounts["S alone"]] == [n // 2, n - n // 2]
    assert sum(a["steps_L"] for a in accounts["L alone"]) == n
    assert sum(result["draws"].values()) == n
    assert sum(a.get("steps_S", 0) for a in accounts["dynamic"]) == result["draws"]["S"]
    # the rounds continue one draw sequence: the dynamic phase drew the schedule's steps 0..N-1
    from dyntrain.train.schedule import VariantSchedule
    expected = VariantSchedule(0, {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}, {"S": 0.5, "L": 0.5})
    assert [v for v, _ in result["step_records"]["dynamic"]] == draws(expected, 0, n)
    saved = result["gpu_hours_saved_frac"]
    sep = result["gpu_hours"]["S alone"] + result["gpu_hours"]["L alone"]
    assert saved == pytest.approx(1 - result["gpu_hours"]["dynamic"] / sep)
    # p = 0.5: about half, whatever the step times (which a shared CPU makes noisy)
    assert 0.2 < saved < 0.8
    assert 0.2 < result["expected_saved_frac"] < 0.8
    priced = sum(result["draws"][v] * result["step_s_alone"][v] for v in ("S", "L"))
    assert result["switching_overhead_frac"] == pytest.approx(
        result["wall_s"]["dynamic"] / priced - 1)
    assert [v for v, _ in result["step_records"]["dynamic"]].count("S") == result["draws"]["S"]
    assert float(last.split("=")[1]) == pytest.approx(saved, rel=1e-3)


def test_input_pipeline_bench_cpu(tmp_path):
    result, last = run_bench("input_pipeline.py", tmp_path, "--dim", "8", "--crop", "32",
                             "--batch", "2", "--steps", "3", "--warmup", "1",
                             "--loader-batches", "4", "--images", "2", "--patch-size", "64",
                             "--dali-threads", "1", "--compile", "off")
    assert last.startswith("input_wait_frac=")
    assert result["benchmark"] == "input_pipeline" and result["decode"] == "cpu"
    assert result["samples"] > 0 and result["urls"] >= 1
    alone, compute, fed = result["loader_alone"], result["compute_only"], result["fed"]
    assert alone["batches"] == 4 and alone["patches_per_s"] > 0
    assert compute["steps"] == fed["steps"] == 3
    assert compute["patches_per_s"] > 0 and fed["patches_per_s"] > 0
    assert compute["wait_frac"] < 0.2  # batches already in memory: next() is nearly free
    assert 0 <= result["input_wait_frac"] < 1
    assert result["input_wait_frac"] == pytest.approx(fed["wait_frac"])
    assert result["loader_headroom"] == pytest.approx(alone["patches_per_s"] /
                                                      compute["patches_per_s"])
    # warm-up 1 + 4 timed batches alone, then 1 + 3 training steps: it really read the shards
    assert result["loader_stats"]["samples"] == (1 + 4 + 1 + 3) * 2
    assert float(last.split("=")[1]) == pytest.approx(result["input_wait_frac"], rel=1e-3,
                                                      abs=1e-6)


# ------------------------------------------------------------------------------------- GPU
no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@no_gpu
def test_inductor_blocks_bf16_on_cuda_match_eager():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = DyNet(DyNetConfig(dim=16)).cuda().use_channels_last()
    compiled = copy.deepcopy(plain).compile_blocks()
    x, target = torch.rand(2, 3, 64, 64, device="cuda"), torch.rand(2, 3, 64, 64, device="cuda")
    start = None
    for variant in ("S", "L", "S", "L"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = train_pass(plain, x, target, variant)
            out = train_pass(compiled, x, target, variant)
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
        if variant == "L" and start is None:
            start = graphs()
    assert graphs() == start, "a variant switch recompiled a block"
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        assert torch.isfinite(q.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.99, f"{name}: gradient cosine {cos:.4f}"


@pytest.mark.gpu
@no_gpu
def test_train_step_bench_cuda_small(tmp_path):
    env_gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    out = tmp_path / "ts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--device",
                           "cuda", "--dim", "16", "--crop", "64", "--batch", "4", "--steps", "3",
                           "--warmup", "2", "--json", str(out)], cwd=tmp_path,
                          env={**os.environ, **env_gpu}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for recipe in ("baseline", "optimised"):
        for r in result["results"][recipe]["variants"].values():
            if result["peak_tflops"] is not None:
                assert 0 < r["mfu"] <= 1
            assert r["peak_mb"] > 0
    assert result["results"]["optimised"]["graphs_compiled_by_switching"] == 0


def test_curriculum_bench_cpu(tmp_path):
    result, last = run_bench("curriculum.py", tmp_path, "--steps-per-period", "1", "--periods", "3",
                             "--batch", "2", "--train-images", "2", "--test-images", "1")
    arms = result["arms"]
    assert set(arms) == {"mixed", "seq_detail", "seq_luminance"}
    seq = arms["seq_detail"]["samples"]
    assert seq.get("samples_sr", 0) > 0 and "samples_lowlight" not in seq  # 3 periods: sr, blur, noise only
    diff = {v: arms["seq_detail"]["psnr"][v]["mio_in_average"] - arms["mixed"]["psnr"][v]["mio_in_average"]
            for v in ("S", "L")}
    assert last == f"sequential_minus_mixed_db={(diff['S'] + diff['L']) / 2:.4g}"


def test_shared_weights_bench_cpu(tmp_path):
    result, last = run_bench("shared_weights.py", tmp_path, "--steps", "4", "--batch", "2",
                             "--train-images", "2", "--test-images", "1")
    arms = result["arms"]
    assert arms["L_only"]["drawn"] == {"S": 0, "L": 4} and arms["S_only"]["drawn"] == {"S": 4, "L": 0}
    assert arms["dynamic"]["drawn"]["S"] + arms["dynamic"]["drawn"]["L"] == 4
    psnr = arms["L_only"]["psnr"]
    assert last == f"l_trained_as_s_cost_db={psnr['L']['mio_in_average'] - psnr['S']['mio_in_average']:.4g}"


def test_shard_build_bench_cpu(tmp_path):
    out = tmp_path / "shard_build.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "shard_build.py"), "--images", "2",
                           "--size", "384x512", "--patch-size", "128", "--rounds", "1", "--nodes", "1,16",
                           "--json", str(out)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    r = result["results"]
    assert set(r) == {"plain", "plain_crop", "builder_w1", "builder_w2", "parts_2x1", "index_w1"}
    for plain in ("plain", "plain_crop"):  # 12 patches a photo
        assert r[plain]["patches_per_s"] == pytest.approx(12 * r[plain]["images_per_s"])
    assert result["builder_vs_plain_crop_ratio"] == pytest.approx(
        r["builder_w1"]["images_per_s"] / r["plain_crop"]["images_per_s"])
    steps = result["step_ms_per_image"]
    assert set(steps) >= {"decode", "flat detector", "JPEG encode (kept)", "decode check (1 a image)"}
    assert all(ms > 0 for ms in steps.values())
    ratio = r["builder_w1"]["images_per_s"] / r["plain"]["images_per_s"]
    assert proc.stdout.strip().splitlines()[-1] == f"builder_vs_plain_ratio={ratio:.4g}"
    (rnd,) = result["rounds"]  # one round: its load, ratios and CPU seconds are the result's
    assert rnd["load_1min"] >= 0 and rnd["ratio"] == pytest.approx(ratio)
    assert result["builder_vs_plain_cpu_ratio"] == pytest.approx(
        r["plain"]["cpu_seconds"] / r["builder_w1"]["cpu_seconds"], rel=1e-3)
    # the pool workers' CPU is counted (the parent alone only writes the tars: a small part)
    assert r["builder_w2"]["cpu_seconds"] > 0.5 * r["builder_w1"]["cpu_seconds"] > 0
    one, sixteen = result["projection"]
    assert one["build_hours"] == pytest.approx(16 * sixteen["build_hours"])
    assert one["build_hours"] == pytest.approx(
        2.09e6 * 4.0 / (r["builder_w1"]["mpix_per_s_per_worker"] * 32) / 3600)
