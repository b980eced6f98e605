"""A variant family beyond S and L (XS, S, L): the GPU-hour account, the comparison of fixed-variant
baselines and the FLOP summary all take N variants."""
import json

import pytest

from dynet.summary import main as summary_main
from dyntrain.analysis.compare import PretrainRun, separate_vs_dynamic
from dyntrain.tracking import GPUHourAccount

STEP_S = {"XS": 1.0, "S": 2.0, "L": 4.0}


def test_gpu_hour_account_with_three_variants():
    acc = GPUHourAccount(2, list(STEP_S))
    plan = ["XS", "S", "L", "L", "S", "XS", "L", "S", "XS"]
    for v in plan:
        acc.record(v, STEP_S[v])
    acc.prior_wall_s = sum(STEP_S[v] for v in plan) + 3.0  # + time outside steps
    m = acc.metrics()
    per_iter_separate = sum(STEP_S.values())  # one iteration of each variant alone
    assert m["gpu_hours_separate"] == pytest.approx(len(plan) * per_iter_separate * 2 / 3600)
    assert m["gpu_hours_saved_frac"] == pytest.approx(1 - acc.prior_wall_s / (len(plan) * per_iter_separate))
    assert m["gpu_hours_saved_frac_expected"] == pytest.approx(
        1 - sum(STEP_S[v] for v in plan) / (len(plan) * per_iter_separate))
    assert {m["steps_XS"], m["steps_S"], m["steps_L"]} == {3.0}


def test_comparison_sums_three_fixed_baselines():
    def run(name, mode, hours, steps):
        metrics = {"gpu_hours": hours, **{f"steps_{v}": steps / 3 for v in STEP_S}}
        return PretrainRun(name, name, "exp", mode, "FINISHED", metrics)

    runs = [run(f"fixed-{v}", f"fixed:{v}", STEP_S[v] * 30 / 3600, 30) for v in STEP_S]
    runs.append(run("dynamic", "dynamic", 2.5 * 30 / 3600, 30))
    saving = separate_vs_dynamic(runs)
    assert saving["baselines"] == ["fixed-L", "fixed-S", "fixed-XS"]
    assert saving["separate_gpu_hours"] == pytest.approx(7.0 * 30 / 3600)
    assert saving["saved_frac"] == pytest.approx(1 - 2.5 / 7.0)


def test_summary_lists_a_named_family_and_the_router(capsys, tmp_path):
    out = tmp_path / "summary.json"
    summary_main(["--size", "64", "--dim", "8", "--variants", "XS=1,1,1,1", "S", "M=3,4,4,6", "L",
                  "--json", str(out)])
    text = capsys.readouterr().out
    assert "XS" in text and "M " in text and "variant router:" in text
    rows = json.loads(out.read_text())["variants"]
    assert [r["variant"] for r in rows] == ["XS", "S", "M", "L"]
    gflops = [r["gflops_paper"] for r in rows]
    assert gflops == sorted(gflops) and len(set(gflops)) == 4
