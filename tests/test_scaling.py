"""bench/scaling.py: the step-time model (fast, no launch) and its 2-rank check against the real
engine on 2 CPU ranks over gloo (slow: two launches of a tiny model)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scaling  # noqa: E402

from dyntrain.config import load_config  # noqa: E402
from dyntrain.train.engine import build_ds_config  # noqa: E402

PROBS = {"S": 0.5, "L": 0.5}
STEP = {"S": 0.020, "L": 0.030}  # seconds on one GPU


def zero_and_shape(stage: int, *overrides: str):
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "deepspeed.bf16=true", *overrides])
    zero = build_ds_config(cfg, 1, "cuda")["zero_optimization"]
    return zero, scaling.model_shape(cfg, zero.get("stage3_param_persistence_threshold", 0))


def mix_time(stage: int, n: int, nodes: int = 1, **zero_changes) -> dict:
    zero, shape = zero_and_shape(stage)
    zero.update(zero_changes)
    link = scaling.gpu_link(n // nodes, nodes, scaling.INTRA_GBPS, scaling.INTER_GBPS)
    return scaling.step_time_s(STEP, PROBS, stage, zero, shape, 2, n, link)


def test_collective_volumes_follow_the_ring():
    link = scaling.Link(0.0, 1e9)
    assert link.collective_s("all_reduce", 1e9, 1) == 0.0
    assert link.collective_s("all_reduce", 1e9, 2) == pytest.approx(1.0)
    assert link.collective_s("all_gather", 1e9, 4) == pytest.approx(0.75)
    assert scaling.Link(1e-5, 1e9).collective_s("all_reduce", 0.0, 1) == 0.0


def test_model_counts_the_papers_parameters_and_uses_the_generated_buckets():
    zero, shape = zero_and_shape(3)
    assert shape["params"] == 16_613_135 and shape["tensors"] == 179
    assert 0 < shape["persistent_params"] < shape["params"]
    # bigger reduce buckets than the generated ones leave less of backward to hide the reduction
    generated = mix_time(2, 64, nodes=8)["mix"]
    assert mix_time(2, 64, nodes=8, reduce_bucket_size=int(5e7))["mix"] > generated
    assert mix_time(2, 64, nodes=8, overlap_comm=False)["mix"] > generated


def test_efficiency_falls_with_nodes_and_differs_per_variant():
    one = mix_time(2, 1)
    assert one["S"] == STEP["S"] and one["L"] == STEP["L"]
    eff = {n: one["mix"] / mix_time(2, n, nodes=max(1, n // 8))["mix"] for n in (8, 16, 64)}
    assert 1.0 > eff[8] > eff[16] > eff[64] > 0.5
    at64 = mix_time(2, 64, nodes=8)
    # the same communication weighs more on the shorter S step
    assert at64["S"] / STEP["S"] > at64["L"] / STEP["L"]


def test_zero3_pays_for_the_invalid_trace_after_a_switch():
    zero, shape = zero_and_shape(3)
    link = scaling.gpu_link(8, 8, scaling.INTRA_GBPS, scaling.INTER_GBPS)
    valid = scaling.exposed_comm_s(3, zero, shape, 2, 64, link, STEP["S"], True)
    invalid = scaling.exposed_comm_s(3, zero, shape, 2, 64, link, STEP["S"], False)
    assert invalid > valid > 0
    assert mix_time(3, 64, nodes=8)["mix"] > mix_time(2, 64, nodes=8)["mix"]


def test_bytes_per_sample_from_a_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": [{"samples": 10, "bytes": 1_000_000},
                                               {"samples": 30, "bytes": 3_000_000}]}))
    assert scaling.bytes_per_sample(str(manifest))[0] == pytest.approx(100_000)
    assert scaling.bytes_per_sample(None)[0] == scaling.DEFAULT_BYTES_PER_SAMPLE


def assert_models_what_it_measured(check: dict, probs: dict, steps: int) -> None:
    """What the machine cannot change in a 2-rank check (``scaling_check.model_check``'s record): the
    gloo link fitted to the run's collectives reproduces its measured gradient all-reduce, and each
    predicted ZeRO-2 step is the measured 1-rank step plus the run's communication (the loss
    all-reduce and the all-gather of the updated partitions exposed, the gradient all-reduce at
    most exposed whole)."""
    assert check["ranks"] == 2 and check["zero_stage"] == 2
    for times in [*check["step_times_s"]["one_rank"], check["step_times_s"]["two_ranks"]]:
        assert {v: len(t) for v, t in times.items()} == {"S": steps, "L": steps}
    col, n = check["collectives_s"], check["ranks"]
    grad_bytes = check["params"] * check["comm_bytes_per_element"]
    assert col["all_reduce_grad_s"] > col["all_reduce_8_bytes_s"] > 0
    link = scaling.Link(check["link"]["latency_s"], check["link"]["busbw_bytes_per_s"])
    assert link.collective_s("all_reduce", grad_bytes, n) == pytest.approx(col["all_reduce_grad_s"], rel=1e-6)
    assert link.collective_s("all_reduce", 8, n) == pytest.approx(col["all_reduce_8_bytes_s"], rel=1e-3)
    gather = link.collective_s("all_gather", grad_bytes, n)
    assert check["modelled_all_gather_s"] == pytest.approx(gather, rel=1e-9)
    one, predicted, measured = check["one_rank_step_s"], check["predicted_step_s"], check["measured_step_s"]
    floor = col["all_reduce_8_bytes_s"] + gather
    for v in ("S", "L"):
        comm = predicted[v] - one[v]
        assert floor * (1 - 1e-3) <= comm <= (floor + col["all_reduce_grad_s"]) * (1 + 1e-3), (v, comm, col)
    for d in (one, predicted, measured):
        assert d["mix"] == pytest.approx(probs["S"] * d["S"] + probs["L"] * d["L"], rel=1e-9)
    assert check["relative_error"] == pytest.approx(abs(predicted["mix"] - measured["mix"]) / measured["mix"],
                                                    rel=1e-9)


def test_the_two_rank_assertions_catch_a_model_that_misses_communication():
    """``model_check`` on made-up measurements (2 ms gradient all-reduce, 0.2 ms latency) passes
    ``assert_models_what_it_measured``; a prediction without the all-gather, or a link that does not
    reproduce the measured all-reduce, fails it."""
    import copy

    import scaling_check

    cfg = scaling_check.check_config([], 4)
    zero = build_ds_config(cfg, 2, "cpu")["zero_optimization"]
    times = {"S": [0.05] * 4, "L": [0.08] * 4}
    ones = [{"step_s": {"S": 0.05, "L": 0.08}, "step_times_s": times}] * 2
    two = {"world_size": 2, "threads": 1, "zero_stage": 2, "zero_optimization": zero, "params": 288_526,
           "comm_bytes": 4, "step_s": {"S": 0.056, "L": 0.087}, "step_times_s": times,
           "collectives": {"all_reduce_grad_s": 2e-3, "all_gather_grad_s": 1.1e-3, "all_reduce_8_bytes_s": 2e-4}}
    check = scaling_check.model_check(ones, two, cfg, PROBS)
    assert_models_what_it_measured(check, PROBS, 4)
    no_gather = copy.deepcopy(check)
    no_gather["predicted_step_s"]["S"] -= check["modelled_all_gather_s"]
    wrong_link = copy.deepcopy(check)
    wrong_link["link"]["busbw_bytes_per_s"] *= 2
    for broken in (no_gather, wrong_link):
        with pytest.raises(AssertionError):
            assert_models_what_it_measured(broken, PROBS, 4)


@pytest.mark.slow
def test_bench_two_rank_check_models_the_step_from_what_it_measured(tmp_path):
    """The 2-rank check end to end (1 rank twice side by side, then 2 ranks under the deepspeed
    launcher). Its error against the measured 2-rank step is the machine's figure: it goes to the
    JSON and bench/RESULTS.md, and a busy machine moves it (35% in a loaded full tier, 3-7% alone),
    so it is not asserted; ``assert_models_what_it_measured`` is."""
    out, steps = tmp_path / "scaling.json", 4
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scaling.py"), "--json", str(out),
         "--check-steps", str(steps), "--check-warmup", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"weak_scaling_64=0\.\d+", last), last
    result = json.loads(out.read_text())
    assert Path(result["plot"]).stat().st_size > 1000
    assert result["s3_read_bytes_per_s"] > 0
    assert float(last.split("=")[1]) == pytest.approx(result["weak_scaling_64"], rel=1e-3)
    check = result["two_rank"]
    assert_models_what_it_measured(check, result["variant_probs"], steps)
    assert len(check["load_average_1min"]) == 3 and check["cpus"] == os.cpu_count()
