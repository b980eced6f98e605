"""The statistics over seeds and the downstream saving, on constructed data with known answers."""
from __future__ import annotations

import random

import pytest

from dyntrain.analysis.downstream import cost_shares, equal_iterations, saving_at_equal_quality
from dyntrain.analysis.stats import format_ci, mean_ci95, paired_difference, t_quantile, with_bound


@pytest.mark.parametrize("df,expected", [(1, 12.706), (3, 3.182), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_t_quantile_tends_to_the_normal_one():
    assert t_quantile(0.975, 2000) == pytest.approx(1.960, abs=2e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=2e-3)


def _coverage(k: int, trials: int, interval) -> float:
    rng = random.Random(1234)
    hits = 0
    for _ in range(trials):
        xs = [rng.gauss(3.0, 2.0) for _ in range(k)]
        lo, hi = interval(xs)
        hits += lo <= 3.0 <= hi
    return hits / trials


def test_interval_covers_the_mean_95_percent_of_the_time_with_four_seeds():
    cov = _coverage(4, 4000, lambda xs: mean_ci95(xs)["ci95"])
    assert 0.935 <= cov <= 0.965, cov


def test_a_normal_quantile_with_four_seeds_would_undercover():
    """The check above can fail: the same draws with 1.96 instead of t(0.975, 3) cover far less."""
    def z_interval(xs):
        m = sum(xs) / len(xs)
        sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
        return m - 1.96 * sd / len(xs) ** 0.5, m + 1.96 * sd / len(xs) ** 0.5
    assert _coverage(4, 4000, z_interval) < 0.90


def test_missing_seeds_are_left_out_and_counted():
    s = mean_ci95([1.0, None, 3.0, float("nan")])
    assert s["mean"] == 2.0 and s["n"] == 2 and s["missing"] == 2
    assert s["ci95"][0] < 2.0 < s["ci95"][1]
    one = mean_ci95([5.0])
    assert one["mean"] == 5.0 and one["ci95"] == [None, None]
    assert mean_ci95([None])["mean"] is None
    assert format_ci(mean_ci95([None])) == "n/a"


def test_paired_difference_removes_the_seed_luck():
    """Two arms whose seeds swing by several units but differ by ~0.1 on each seed: their own
    intervals overlap, the paired one excludes 0."""
    luck = [0.0, 3.0, -2.0, 5.0, 1.0]
    a = [x + 0.10 for x in luck]
    b = [x + (0.01 if i % 2 else -0.01) for i, x in enumerate(luck)]
    ia, ib = mean_ci95(a)["ci95"], mean_ci95(b)["ci95"]
    assert ia[0] < ib[1] and ib[0] < ia[1]
    d = paired_difference(a, b)
    assert d["significant"] and 0.05 < d["mean"] < 0.15
    assert not paired_difference(b, b)["significant"]
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(a, b[:-1])


def _line(costs, psnrs, steps=None):
    steps = steps or [10 * (i + 1) for i in range(len(costs))]
    return [(c, s, q) for c, s, q in zip(costs, steps, psnrs)]


def test_downstream_saving_interpolates_the_separate_curve():
    # D spends 4 units (half on each variant); S alone reaches D's 22.5 dB at 3.5, L alone at 6.0
    dyn = {"S": _line([1, 2, 3, 4], [20, 21, 22, 22.5]), "L": _line([1, 2, 3, 4], [21, 22, 23, 24])}
    sep = {"S": _line([1, 2, 3, 4], [20, 21, 22, 23]), "L": _line([2, 4, 6, 8], [20, 22, 24, 26])}
    r = saving_at_equal_quality(dyn, sep, {"S": 0.5, "L": 0.5}, scratch=None)
    s, l_ = r["per_variant"]["S"], r["per_variant"]["L"]
    assert s["cost_to_match"] == pytest.approx(3.5) and s["reached"] and not s["bound"]
    assert s["saving"] == pytest.approx(1 - 2 / 3.5)
    assert l_["cost_to_match"] == pytest.approx(6.0) and l_["saving"] == pytest.approx(1 - 2 / 6)
    assert r["family_saving"] == pytest.approx(1 - 4 / 9.5) and not r["family_bound"]
    assert s["separate_psnr_at_dynamic_cost"] == pytest.approx(23.0)
    assert l_["separate_psnr_at_dynamic_share"] == pytest.approx(20.0)
    assert s["equal_iterations"][-1]["dynamic_minus_separate_db"] == pytest.approx(-0.5)


def test_a_target_never_reached_gives_a_bound():
    dyn = {"S": _line([1, 2], [20, 25])}
    sep = {"S": _line([1, 2, 3], [19, 20, 21])}
    r = saving_at_equal_quality(dyn, sep, {"S": 1.0})
    s = r["per_variant"]["S"]
    assert not s["reached"] and s["bound"] and s["cost_to_match"] == 3
    assert s["saving"] == pytest.approx(1 - 2 / 3) and r["family_bound"]
    summary = with_bound([s["saving"], 0.1], [s["bound"], False])
    assert summary["bound"] and summary["bound_seeds"] == 1
    assert format_ci(summary).endswith("(bound)")


def test_scratch_start_matching_the_target_makes_the_saving_undefined():
    dyn = {"S": _line([1, 2], [20, 21])}
    sep = {"S": _line([1, 2], [22, 23])}
    r = saving_at_equal_quality(dyn, sep, {"S": 1.0}, scratch={"S": 21.5})
    assert r["per_variant"]["S"]["cost_to_match"] == 0 and r["per_variant"]["S"]["saving"] is None
    # from scratch below the target: the crossing is found between the start (cost 0) and the first checkpoint
    r = saving_at_equal_quality(dyn, sep, {"S": 1.0}, scratch={"S": 19.0})
    assert r["per_variant"]["S"]["cost_to_match"] == pytest.approx(1 * (21 - 19) / (22 - 19))


def test_shares_and_equal_iterations():
    assert cost_shares({"S": 1.0, "L": 3.0}) == {"S": 0.25, "L": 0.75}
    assert cost_shares({"S": 0.0, "L": 0.0}) == {"S": 0.5, "L": 0.5}
    rows = equal_iterations(_line([1, 2], [20, 21], [5, 10]), _line([3, 4], [19, 22], [10, 20]))
    assert rows == [{"iterations": 10, "dynamic": 21, "separate": 19, "dynamic_minus_separate_db": 2}]
    with pytest.raises(ValueError, match="no separate run for variant"):
        saving_at_equal_quality({"L": _line([1], [1])}, {"S": _line([1], [1])}, {"L": 1.0})


# ------------------------------------------------------------- compare --iso-quality --over-seeds
def _log_run(client, exp_id, seed, mode, recipe, curves):
    """A pre-training run as ``launch/pretrain.py`` leaves it, with the given validation curves
    ({variant: [(gpu_hours, own_steps, psnr)]})."""
    from mlflow.entities import Metric, Param

    tags = {"dyntrain.stage": "pretrain", "mode": mode, "recipe": recipe, "val.fingerprint": "abc",
            "variants": ",".join(curves)}
    run = client.create_run(exp_id, run_name=f"{recipe}-{seed}", tags=tags).info.run_id
    metrics = []
    for v, pts in curves.items():
        for step, (gh, own, q) in enumerate(pts):
            metrics += [Metric("val/gpu_hours", gh, 0, step), Metric(f"val/{v}/own_steps", own, 0, step),
                        Metric(f"val/{v}/psnr", q, 0, step)]
    client.log_batch(run, metrics=metrics, params=[Param("run.seed", str(seed))])
    client.set_terminated(run)
    return run


def test_iso_quality_over_seeds_from_mlflow_runs(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT
    from mlflow.tracking import MlflowClient

    from dyntrain.analysis.over_seeds import iso_quality_over_seeds
    from dyntrain.eval.iso_quality import iso_quality

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("seeds", artifact_location=str(tmp_path / "art"))
    expected = {"paper": [], "sandwich": []}
    for seed in range(4):
        sep = {"S": [(0, 0, 10), (1, 10, 12), (2, 20, 14), (3, 30, 16)],
               "L": [(0, 0, 10), (2, 10, 12), (4, 20, 14), (6, 30, 16)]}
        _log_run(client, exp, seed, "fixed:S", "fixed:S", {"S": sep["S"]})
        _log_run(client, exp, seed, "fixed:L", "fixed:L", {"L": sep["L"]})
        for recipe, lift in (("paper", 0.3 * seed), ("sandwich", 0.3 * seed + 0.2)):
            dyn = {v: [(0, 0, 10), (2.5, 15, 12 + lift), (5, 30, 14 + lift)] for v in ("S", "L")}
            _log_run(client, exp, seed, "dynamic" if recipe == "paper" else "sandwich", recipe, dyn)
            expected[recipe].append(iso_quality(dyn, sep)["iso_quality_saving"])
    # a seed without its L baseline is skipped and named, not filled in from another seed
    _log_run(client, exp, 9, "dynamic", "paper", {"S": [(0, 0, 10), (1, 10, 11)], "L": [(0, 0, 10), (1, 10, 11)]})
    _log_run(client, exp, 9, "fixed:S", "fixed:S", {"S": [(0, 0, 10), (1, 10, 12)]})

    r = iso_quality_over_seeds(uri, "seeds")
    paper = r["recipes"]["paper"]
    assert paper["seeds"] == ["0", "1", "2", "3"]
    assert paper["per_seed"] == pytest.approx(expected["paper"])
    assert paper["mean"] == pytest.approx(sum(expected["paper"]) / 4)
    assert paper["ci95"] == pytest.approx(mean_ci95(expected["paper"])["ci95"])
    assert len(r["skipped"]) == 1 and r["skipped"][0].startswith("seed 9, paper") and "missing L" in r["skipped"][0]
    d = r["paired"]["sandwich"]
    assert d["mean"] == pytest.approx(sum(a - b for a, b in zip(expected["sandwich"], expected["paper"])) / 4)
    assert d["significant"] == paired_difference(expected["sandwich"], expected["paper"])["significant"]

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"), "--iso-quality", "--over-seeds",
                           "--experiment", "seeds", "--tracking-uri", uri], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1].split("=")[1]) == pytest.approx(paper["mean"])
    assert "paired sandwich - paper" in proc.stdout


def _bench(name):
    import importlib
    import sys

    from helpers import ROOT
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


def test_quality_saving_seed_summary_on_constructed_results():
    qs = _bench("quality_saving")

    def seed(k, paper, sandwich, bound=False):
        rec = {"iso_quality_saving": paper, "iso_quality_saving_is_bound": bound,
               "iso_quality_saving_pflop": paper + 0.01, "iso_quality_saving_pflop_is_bound": False}
        return {"seed": k, "recipes": {"paper": rec, "sandwich": dict(
            rec, iso_quality_saving=sandwich, iso_quality_saving_pflop=sandwich + 0.01, iso_quality_saving_is_bound=False)}}
    papers, sandwiches = [0.20, 0.35, 0.05, 0.30], [0.28, 0.44, 0.12, 0.41]
    s = qs.seed_summary([seed(k, p, w, bound=(k == 2)) for k, (p, w) in enumerate(zip(papers, sandwiches))])
    assert s["seeds"] == [0, 1, 2, 3]
    assert s["recipes"]["paper"]["gpu_hours"]["ci95"] == pytest.approx(mean_ci95(papers)["ci95"])
    assert s["recipes"]["paper"]["gpu_hours"]["bound"] and not s["recipes"]["paper"]["pflop"]["bound"]
    d = s["paired_vs_first"]["sandwich"]["pflop"]
    assert d["mean"] == pytest.approx(0.0875) and d["significant"]
    assert "paired sandwich - paper (PFLOP)" in s["text"] and "(bound)" in s["text"]


@pytest.mark.slow
def test_downstream_bench_end_to_end(tmp_path):
    """One seed at the smallest size through the real path: three pre-trainings with two checkpoints
    each, ten fine-tunes, the comparison recomputed here from the points the bench recorded, and the
    MLflow runs tagged with arm and seed under a parent that holds the table and the plot."""
    ds = _bench("downstream_saving")
    from mlflow.tracking import MlflowClient

    size = dict(ds.CPU, steps=4, fractions=2, ft_steps=2, images=4, val_samples=4, ft_images=2, test_images=1)
    r = ds.run(tmp_path, size, [0], "cpu", ["paper"])
    seed = r["per_seed_results"][0]
    arms = seed["arms"]
    assert [p["step"] for p in arms["paper"]["checkpoints"]] == [2, 4] == [p["step"] for p in arms["S"]["checkpoints"]]
    assert set(arms["paper"]["checkpoints"][0]["finetuned"]) == {"S", "L"}
    assert set(arms["L"]["checkpoints"][0]["finetuned"]) == {"L"}
    assert seed["finetunes"] == 10
    # the saving of S on the PFLOP axis, from the recorded points
    pts = {a: [(p["pflop"], p["step"], p["finetuned"]["S"]) for p in arms[a]["checkpoints"]] for a in ("paper", "S")}
    share = seed["recipes"]["paper"]["shares"]["pflop"]
    mine = saving_at_equal_quality({"S": pts["paper"]}, {"S": pts["S"]}, {"S": share["S"]}, {"S": seed["scratch"]["S"]})
    assert r["downstream_saving"]["S"]["pflop"]["per_seed"] == [pytest.approx(mine["per_variant"]["S"]["saving"])] \
        if mine["per_variant"]["S"]["saving"] is not None else [None]
    gain = arms["paper"]["checkpoints"][-1]["finetuned"]["L"] - seed["scratch"]["L"]
    assert r["pretraining_gain_db"]["L"]["per_seed"] == [pytest.approx(gain)]
    for key in ("downstream_saving", "proxy_saving"):
        assert set(r[key]) == {"S", "L"} and set(r[key]["S"]) == {"gpu_hours", "pflop"}
        assert {"mean", "ci95", "per_seed", "bound"} <= set(r[key]["L"]["gpu_hours"])
    client = MlflowClient(r["tracking_uri"])
    pre = client.get_run(arms["S"]["run_id"]).data.tags
    assert pre["arm"] == "S" and pre["seed"] == "0" and pre["mlflow.parentRunId"] == r["parent_run"]
    parent = client.get_run(r["parent_run"]).data
    assert parent.tags["downstream_saving_basis"] == "equal_finetuned_quality"
    assert parent.tags["proxy_saving_basis"] == "equal_validation_quality"
    assert parent.metrics["pretraining_gain_db_L_mean"] == pytest.approx(gain)
    arts = {a.path for a in client.list_artifacts(r["parent_run"])}
    assert {"downstream_saving.md", "downstream_saving.png"} <= arts
    children = client.search_runs([client.get_run(r["parent_run"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{r['parent_run']}' and tags.seed = '0'")
    assert len(children) == 3 + 10
