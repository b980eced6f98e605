"""The training recipes (dyntrain.train.schedule.recipes): sandwich, in-place distillation, cost-aware draws.

Unit tests check the plans, the losses and their gradients on a tiny DyNet, the cost-aware
probabilities and their table, the account of multi-variant steps and the config's checks; the
2-rank tests run each recipe through ``dyntrain.train.run.run_training`` under the real ``deepspeed``
launcher (ZeRO 0-3, gradient accumulation 2, the cross-rank check at every step). The cost-aware
draw's exact resume is in ``tests/test_resume.py`` (it needs real shards and validation).
"""
from __future__ import annotations

import pytest
import torch

from dynet import DyNet, DyNetConfig
from dyntrain.config import ConfigError, load_config
from dyntrain.train.schedule import cost_aware_probs, plan_loss, restoration_loss
from dyntrain.train.schedule import StepPlan, VariantSchedule
from dyntrain.train.schedule.verify import code_of, label_of
from dyntrain.tracking import GPUHourAccount
from test_engine_multirank import _tail, launch, traces
from helpers import draws  # noqa: E402

SL = {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}
SML = {"S": (1, 1, 1, 1), "M": (1, 2, 1, 2), "L": (2, 2, 2, 2)}


# ------------------------------------------------------------------------------------- plans
def test_sandwich_plan_runs_every_active_variant_largest_first_on_every_step():
    s = VariantSchedule(0, SML, {"S": 1, "M": 0, "L": 1}, mode="sandwich", loss_weights={"S": 2.0})
    plans = {s.plan_at(t) for t in range(50)}
    assert plans == {StepPlan(("L", "S"), (1.0, 2.0))}       # M has probability 0: not in the set
    assert s.variant_at(7) == "L+S" and s.recipe == "sandwich"
    assert label_of(s.names, code_of(s.names, "L+S")) == "L+S" and code_of(s.names, "S") != code_of(s.names, "L+S")
    d = VariantSchedule(0, SML, None, mode="sandwich", teacher="M", distill_weight=0.5)
    assert d.plan_at(3) == StepPlan(("M", "L", "S"), (1.0, 1.0, 1.0), "M", 0.5)   # teacher first
    assert d.recipe == "sandwich_distill"


def test_dynamic_distillation_plans_a_teacher_forward_every_k_steps_on_student_steps():
    s = VariantSchedule(3, SL, {"S": 0.5, "L": 0.5}, teacher="L", distill_weight=0.3, distill_every=3)
    paper = VariantSchedule(3, SL, {"S": 0.5, "L": 0.5})
    for t in range(60):
        plan = s.plan_at(t)
        assert plan.variants == (paper.variant_at(t),)          # the same draw as the paper's recipe
        assert plan.teacher_pass == (plan.variants[0] == "S" and t % 3 == 0)
        assert plan.teacher == ("L" if plan.teacher_pass else None)
    assert s.recipe == "paper_distill"


# ------------------------------------------------------------------------------------ losses
def _model() -> DyNet:
    torch.manual_seed(0)
    return DyNet(DyNetConfig.tiny())


def _batch():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(2, 3, 32, 32, generator=g)
    return (y + 0.2 * torch.randn(y.shape, generator=g)).clamp(0, 1), y


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _close(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a, b))


def test_sandwich_gradient_is_the_weighted_sum_of_each_variants_gradient():
    model, (x, y) = _model(), _batch()
    fwd = lambda inp, reuse: model(inp, reuse=reuse)   # noqa: E731
    per = {v: _grads(model, restoration_loss(model(x, reuse=SL[v]), y)) for v in SL}
    plan = StepPlan(("L", "S"), (1.0, 0.5))
    marks = []
    total, parts = plan_loss(fwd, plan, SL, x, y, marks.append)
    assert marks == ["L", "S"]
    assert total.item() == pytest.approx(parts[0].item() + 0.5 * parts[1].item(), rel=1e-6)
    got = _grads(model, total)
    assert _close(got, [a + 0.5 * b for a, b in zip(per["L"], per["S"])])
    assert not _close(got, per["L"])                      # S really contributes


@pytest.mark.parametrize("teacher_pass", [False, True])
def test_distillation_target_is_detached(teacher_pass):
    """The student's distillation term moves the student only: the gradient equals the one of
    L1(S) + w L1(S, sg(L)) (+ L1(L) in sandwich mode), and differs from the non-detached version."""
    model, (x, y) = _model(), _batch()
    fwd = lambda inp, reuse: model(inp, reuse=reuse)   # noqa: E731
    w = 0.7
    plan = (StepPlan(("S",), (1.0,), "L", w, teacher_pass=True) if teacher_pass
            else StepPlan(("L", "S"), (1.0, 1.0), "L", w))
    marks = []
    total, parts = plan_loss(fwd, plan, SL, x, y, marks.append)
    assert marks == (["teacher", "S"] if teacher_pass else ["L", "S"])
    got = _grads(model, total)

    def reference(detach: bool):
        out_l, out_s = model(x, reuse=SL["L"]), model(x, reuse=SL["S"])
        target = out_l.float().clamp(0, 1)
        target = target.detach() if detach else target
        loss = restoration_loss(out_s, y) + w * torch.nn.functional.l1_loss(out_s.float().clamp(0, 1), target)
        if not teacher_pass:
            loss = loss + restoration_loss(out_l, y)
        return loss

    ref_loss = reference(True)
    assert total.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert _close(got, _grads(model, ref_loss))
    assert not _close(got, _grads(model, reference(False)))       # the detach matters
    # reported per-variant losses are the plain L1 to the target (no distillation term)
    assert parts[-1].item() == pytest.approx(restoration_loss(model(x, reuse=SL["S"]), y).item(), rel=1e-6)


# ------------------------------------------------------------------------------- cost-aware
def test_cost_aware_probabilities_follow_gap_and_cost():
    # gaps: S 1.0 + 0.5 = 1.5, L 0.5 -> time shares 0.75 / 0.25; divided by the cost (S 1, L 2)
    p = cost_aware_probs({"S": 20.0, "L": 21.0}, {"S": 1.0, "L": 2.0}, headroom_db=0.5, min_prob=0.0)
    assert p["S"] == pytest.approx(0.75 / (0.75 + 0.125)) and sum(p.values()) == pytest.approx(1)
    # equal quality: equal GPU-time shares, so the cheap variant is drawn in proportion 1/t
    p = cost_aware_probs({"S": 20.0, "L": 20.0}, {"S": 1.0, "L": 3.0}, 1.0, 0.0)
    assert p == pytest.approx({"S": 0.75, "L": 0.25})
    # the floor
    p = cost_aware_probs({"S": 30.0, "L": 20.0}, {"S": 1.0, "L": 1.0}, 0.1, 0.2)
    assert p["S"] == pytest.approx(0.2) and p["L"] == pytest.approx(0.8)


def test_probability_table_drives_the_draw_and_survives_a_state_round_trip():
    a = VariantSchedule(5, SL, None, probs_policy="cost_aware")
    uniform = draws(a, 0, 400)
    a.set_probs(100, {"S": 0.95, "L": 0.05})
    a.set_probs(250, {"S": 0.05, "L": 0.95})
    seq = draws(a, 0, 400)
    assert seq[:100] == uniform[:100]                          # the past is not redrawn
    assert seq[100:250].count("S") > 120 and seq[250:].count("L") > 120
    assert a.probs_at(120) == pytest.approx({"S": 0.95, "L": 0.05})
    b = VariantSchedule(5, SL, None, probs_policy="cost_aware")
    assert b.describe() == a.describe()                        # the description is the static part
    c = VariantSchedule(5, SL, None, probs_policy="cost_aware")
    c.set_probs(0, {"S": 0.9, "L": 0.1})                      # after the validation before step 0
    assert c.describe() == b.describe() and c.probs_at(0) == pytest.approx({"S": 0.9, "L": 0.1})
    b.load_state_dict(a.state_dict())
    assert draws(b, 0, 400) == seq
    assert [b.variant_at(t) for t in range(399, 99, -1)] == seq[100:][::-1]  # random access
    with pytest.raises(ValueError, match="cost_aware"):  # the config validates the schedule's rules
        load_config(None, ["schedule.mode=sandwich", "schedule.variant_probs=cost_aware"])


# ---------------------------------------------------------------------------------- account
def test_account_splits_sandwich_steps_and_books_teacher_forwards_apart():
    acc = GPUHourAccount(1, ["S", "L"])
    acc.flops_per_sample = {"S": 10.0, "L": 20.0}
    acc.start()
    for _ in range(4):   # 3 s steps: forwards of 1 s (L) and 0.5 s (S) -> 2 s / 1 s
        acc.record_step(["L", "S"], 3.0, {"L": 1.0, "S": 0.5}, samples=2)
    acc.record_step(["S"], 1.5, {"teacher": 0.5, "S": 0.3}, samples=2, teacher="L")
    acc.stop()
    m = acc.metrics()
    assert acc.steps == 5 and acc.count == {"S": 5, "L": 4}
    assert m["step_time_mean_L"] == pytest.approx(2.0)
    assert acc.seconds["S"] == pytest.approx(4 * 1.0 + 1.0)
    assert m["teacher_s_total"] == pytest.approx(0.5) and m["steps_s"] == pytest.approx(13.5)
    assert acc.flops == pytest.approx(4 * 3 * 30 * 2 + (3 * 10 + 20) * 2)
    # "separate" = N x sum_v t_v: a sandwich run does the separate runs' work (saving about 0)
    assert m["gpu_hours_saved_frac_expected"] == pytest.approx(1 - 13.5 / (5 * (2.0 + 1.0)))
    b = GPUHourAccount(1, ["S", "L"])
    b.load_state_dict(acc.state_dict())
    assert (b.steps, b.count, b.teacher_s, b.flops) == (5, acc.count, acc.teacher_s, acc.flops)
    old = {k: v for k, v in acc.state_dict().items() if k not in ("n_steps", "teacher_s", "flops")}
    c = GPUHourAccount(1, ["S", "L"])
    c.load_state_dict(old)                                   # a checkpoint of the previous code
    assert c.steps == 9                                      # one variant per step back then


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["schedule.mode=sandwich", "schedule.variant_probs=cost_aware"], "cost_aware is a draw"),
    (["schedule.distill.teacher=XL"], "schedule.distill.teacher: 'XL' is not in"),
    (["schedule.mode=fixed", "schedule.distill.teacher=L"], "a fixed-variant run has no student"),
    (["schedule.mode=sandwich", "schedule.variant_probs={S: 1, L: 0}", "schedule.distill.teacher=L"],
     "does not run in this sandwich"),
    (["schedule.loss_weights={XL: 1}"], "schedule.loss_weights.XL"),
    (["schedule.distill.every=0"], "schedule.distill.every"),
    (["schedule.variant_probs=costaware"], "schedule.variant_probs"),
])
def test_config_names_the_bad_recipe_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_builds_each_recipe_schedule():
    for overrides, recipe in (([], "paper"), (["schedule.mode=sandwich"], "sandwich"),
                              (["schedule.mode=sandwich", "schedule.distill.teacher=L"], "sandwich_distill"),
                              (["schedule.variant_probs=cost_aware"], "cost_aware"),
                              (["schedule.distill.teacher=L", "schedule.distill.every=4"], "paper_distill")):
        assert VariantSchedule.from_config(load_config(None, overrides)).recipe == recipe


# ------------------------------------------------------------------------- 2 ranks, DeepSpeed
STEPS = 4


def _run(tmp_path, stage: int, *overrides: str):
    proc, _ = launch(tmp_path, [f"run.max_steps={STEPS}", "run.seed=5", f"deepspeed.zero_stage={stage}",
                                "deepspeed.gradient_accumulation_steps=2", "schedule.verify_every=1",
                                "checkpoint.every=2", *overrides], timeout=400)
    assert proc.returncode == 0, _tail(proc)
    t = traces(tmp_path)
    assert t[0]["weights_sha256"] == t[1]["weights_sha256"]          # ranks stay identical
    assert [s["variant"] for s in t[0]["steps"]] == [s["variant"] for s in t[1]["steps"]]
    assert [s["loss"] for s in t[0]["steps"]] == [s["loss"] for s in t[1]["steps"]]
    return t[0]


@pytest.fixture(scope="module")
def sandwich_distill_zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd2")
    trace = _run(out, 2, "schedule.mode=sandwich", "schedule.distill.teacher=L",
                 "schedule.distill.weight=0.5", "tracking.enabled=true",
                 f"tracking.uri=sqlite:///{out / 'mlflow.db'}")
    return {**trace, "mlflow": f"sqlite:///{out / 'mlflow.db'}"}


@pytest.mark.slow
def test_sandwich_distill_on_two_ranks_runs_both_variants_every_step(sandwich_distill_zero2):
    t = sandwich_distill_zero2
    assert [s["variant"] for s in t["steps"]] == ["L+S"] * STEPS
    for s in t["steps"]:
        assert set(s["losses"]) == {"L", "S"}
        assert s["loss"] > s["losses"]["L"] + s["losses"]["S"]      # + the distillation term
        assert len(s["keys"]) == 4                                  # 2 micro-batches of 2
    assert t["account"]["steps_S"] == t["account"]["steps_L"] == STEPS
    assert t["account"]["pflop"] > 0
    # MLflow: per-variant losses and times of the window, the recipe tag, the account
    from mlflow.tracking import MlflowClient

    client = MlflowClient(t["mlflow"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["recipe"] == "sandwich_distill" and run.data.tags["mode"] == "sandwich"
    m = run.data.metrics
    assert {"loss_L", "loss_S", "step_time_L", "step_time_S", "steps_S", "steps_L", "pflop"} <= set(m)
    assert m["loss_S"] == pytest.approx(t["steps"][-1]["losses"]["S"] / 2 + t["steps"][-2]["losses"]["S"] / 2)


@pytest.mark.slow
def test_sandwich_distill_zero3_trains_like_zero2(sandwich_distill_zero2, tmp_path):
    z3 = _run(tmp_path, 3, "schedule.mode=sandwich", "schedule.distill.teacher=L", "schedule.distill.weight=0.5")
    for a, b in zip(sandwich_distill_zero2["steps"], z3["steps"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        for v in ("L", "S"):
            assert b["losses"][v] == pytest.approx(a["losses"][v], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_plain_sandwich_zero0_sums_both_losses(tmp_path):
    t = _run(tmp_path, 0, "schedule.mode=sandwich", "schedule.loss_weights={S: 1.0, L: 1.0}")
    for s in t["steps"]:
        assert s["variant"] == "L+S"
        assert s["loss"] == pytest.approx(s["losses"]["L"] + s["losses"]["S"], rel=1e-6)
    assert t["steps"][-1]["losses"]["S"] != t["steps"][0]["losses"]["S"]


@pytest.mark.slow
def test_dynamic_distillation_zero1_teacher_on_student_steps(tmp_path):
    t = _run(tmp_path, 1, "schedule.distill.teacher=L", "schedule.distill.every=2")
    expected = VariantSchedule(5, SL, {"S": 0.5, "L": 0.5}, teacher="L", distill_every=2)
    for s in t["steps"]:
        plan = expected.plan_at(s["step"])
        assert s["variant"] == plan.variants[0]
        assert s["teacher"] == ("L" if plan.teacher_pass else None)
        if plan.teacher_pass:
            assert s["loss"] > s["losses"]["S"]                     # the distillation term
        else:
            assert s["loss"] == pytest.approx(s["losses"][s["variant"]], rel=1e-6)
    assert any(s["teacher"] for s in t["steps"])                    # seed 5: a teacher pass at step 0


# ---------------------------------------------------------------------- the recipe benchmark
@pytest.mark.slow
def test_quality_saving_bench_compares_recipes_on_both_axes(tmp_path):
    """bench/quality_saving.py at its smallest (S alone, L alone, sandwich and cost_aware, 2 steps
    each, validated every step) and ``launch/compare.py --runs RECIPE S L --x pflop``."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from dyntrain.analysis.compare import val_curves
    from dyntrain.eval.iso_quality import iso_quality

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import quality_saving

    size = dict(quality_saving.CPU, steps=4, eval_every=2, images=4, val_samples=4)
    r = quality_saving.run_recipes(tmp_path, size, 0, "cpu", ["sandwich", "cost_aware"])
    assert set(r["recipes"]) == {"sandwich", "cost_aware"} and r["recipes"]["sandwich"]["steps"] == 2
    client = MlflowClient(r["tracking_uri"])
    sw = r["recipes"]["sandwich"]
    run = client.get_run(sw["run_id"])
    assert run.data.tags["recipe"] == "sandwich"
    assert sw["own_steps"] == {"S": 2.0, "L": 2.0}                  # both variants every step
    ca = client.get_run(r["recipes"]["cost_aware"]["run_id"])
    assert {"schedule/p_S", "schedule/p_L"} <= set(ca.data.metrics)
    # the PFLOP-axis saving, recomputed here from the metric histories
    S, L = r["baseline_runs"]["S"], r["baseline_runs"]["L"]
    mine = iso_quality(val_curves(client, sw["run_id"], ["S", "L"], "pflop"),
                       {"S": val_curves(client, S, ["S"], "pflop")["S"],
                        "L": val_curves(client, L, ["L"], "pflop")["L"]})
    assert mine["iso_quality_saving"] == pytest.approx(sw["iso_quality_saving_pflop"])
    # work: a sandwich step is 3 x (F_S + F_L) x samples, the same as one S step plus one L step
    pf = {k: val_curves(client, i, [v], "pflop")[v][-1][0] for k, i, v in
          (("sw", sw["run_id"], "S"), ("S", S, "S"), ("L", L, "L"))}
    assert pf["sw"] == pytest.approx((pf["S"] + pf["L"]) / 2, rel=1e-9)
    proc = subprocess.run([sys.executable, str(root / "launch" / "compare.py"), "--tracking-uri",
                           r["tracking_uri"], "--runs", sw["run_id"], S, L, "--x", "pflop", "--no-log",
                           "--out", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("iso_quality_saving_pflop=")
    assert float(line.split("=")[1]) == pytest.approx(sw["iso_quality_saving_pflop"])
