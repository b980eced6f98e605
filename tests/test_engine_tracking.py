"""GPU-hour account arithmetic and the MLflow tracker against a real sqlite store."""
from __future__ import annotations

import os

import pytest

from dyntrain.config import load_config
from dyntrain.tracking import GPUHourAccount, NullTracker, make_tracker, redact
from helpers import unlabelled_savings


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr("dyntrain.tracking.account.time.perf_counter", c)
    return c


def test_dynamic_account_matches_the_formulas(clock):
    acc = GPUHourAccount(4, ["L", "S"])
    acc.start()
    plan = ["S", "S", "L", "S", "L", "L", "S", "L"]  # 4 S at 1 s, 4 L at 3 s (+0.5 s after a switch)
    previous = None
    for v in plan:
        dt = (1.0 if v == "S" else 3.0) + (0.5 if previous not in (None, v) else 0.0)
        clock.t += dt
        acc.record(v, dt)
        previous = v
    clock.t += 2.0  # time outside steps (logging, a checkpoint)
    acc.add_startup(5.0)  # before the first step: reported, not in gpu_hours
    m = acc.metrics()
    n = len(plan)
    step_sum = sum((1.0 if v == "S" else 3.0) for v in plan) + 0.5 * 5  # 5 switches
    wall = step_sum + 2.0
    t_s, t_l = acc.mean_step_s("S"), acc.mean_step_s("L")
    assert m["gpu_hours"] == pytest.approx(wall * 4 / 3600)
    assert m["gpu_hours_separate"] == pytest.approx(n * (t_s + t_l) * 4 / 3600)
    assert m["gpu_hours_saved_frac"] == pytest.approx(1 - wall / (n * (t_s + t_l)))
    assert m["gpu_hours_saved_frac_expected"] == pytest.approx(1 - step_sum / (n * (t_s + t_l)))
    assert m["overhead_frac"] == pytest.approx(2.0 / wall)
    assert m["gpu_hours_with_startup"] == pytest.approx((wall + 5.0) * 4 / 3600)
    assert m["switch_penalty_s"] == pytest.approx(0.5)
    assert m["steps_S"] == 4 and m["steps_L"] == 4
    assert m["gpu_hours_S"] + m["gpu_hours_L"] == pytest.approx(step_sum * 4 / 3600)


def test_equal_probability_saves_about_half_whatever_the_step_times(clock):
    acc = GPUHourAccount(1, ["S", "L"])
    acc.start()
    for i in range(1000):
        v = "S" if i % 2 else "L"
        dt = 0.2 if v == "S" else 0.7
        clock.t += dt
        acc.record(v, dt)
    m = acc.metrics()
    assert m["gpu_hours_saved_frac"] == pytest.approx(0.5, abs=1e-9)
    assert m["gpu_hours_saved_frac_expected"] == pytest.approx(0.5, abs=1e-9)


def test_fixed_variant_saves_nothing_and_unseen_variants_withhold_separate(clock):
    fixed = GPUHourAccount(2, ["L"])
    fixed.start()
    for _ in range(10):
        clock.t += 3.0
        fixed.record("L", 3.0)
    assert fixed.metrics()["gpu_hours_saved_frac"] == pytest.approx(0.0)
    early = GPUHourAccount(2, ["S", "L"])
    early.start()
    clock.t += 1.0
    early.record("S", 1.0)
    assert "gpu_hours_separate" not in early.metrics() and early.metrics()["gpu_hours"] > 0


def test_account_survives_a_resume(clock):
    acc = GPUHourAccount(2, ["S", "L"])
    acc.start()
    for v, dt in [("S", 1.0), ("L", 2.0)]:
        clock.t += dt
        acc.record(v, dt)
    acc.stop()
    state = acc.state_dict()
    clock.t += 500.0  # down time between the two segments does not count
    again = GPUHourAccount(2, ["S", "L"])
    again.load_state_dict(state)
    again.start()
    clock.t += 1.0
    again.record("S", 1.0)
    m = again.metrics()
    assert m["train_wall_s"] == pytest.approx(4.0) and m["steps_S"] == 2 and m["steps_L"] == 1
    on_four = GPUHourAccount(4, ["S", "L"])  # resumed on more accelerators: the hours carry over
    on_four.load_state_dict(state)
    assert on_four.metrics()["gpu_hours"] == pytest.approx(3.0 * 2 / 3600)


def test_redaction():
    assert redact("tracking.uri", "http://bob:pw@host:5000/x") == "http://***@host:5000/x"
    assert redact("data.train_urls", ["s3://b/a.tar"]) == ["s3://b/a.tar"]
    assert redact("s3.secret_access_key", "abc") == "***"
    assert redact("data.train_urls", ["https://h/a.tar?X-Amz-Signature=zz&n=1"]) == ["https://h/a.tar?X-Amz-Signature=***&n=1"]
    assert redact("schedule.sigma", 3) == 3  # a key merely containing "sig" is not a secret


def test_one_redaction_for_uris_lines_configs_and_mlflow(monkeypatch, capsys):
    from dyntrain.config import load_config
    from dyntrain.errors import DyntrainError, report
    from dyntrain.logs import get_logger, setup_logging
    from dyntrain.redaction import mlflow_uri, redact_text, redact_uri

    assert redact_uri("http://a:pw@h:1/p?token=t&x=1#f") == "http://***@h:1/p?token=***&x=1#f"
    assert redact_uri("sqlite:///m.db") == "sqlite:///m.db"
    assert redact_text("at http://a:pw@h/x and s3://b/k?sig=s end") == "at http://***@h/x and s3://b/k?sig=*** end"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert mlflow_uri("http://alice:p%40ss@h:5000/?token=tk&a=1") == "http://h:5000/?a=1"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"],
            os.environ["MLFLOW_TRACKING_TOKEN"]) == ("alice", "p@ss", "tk")
    cfg = load_config(None, ["tracking.uri=https://bob:hunter2@h/?token=tk2",
                             "data.train_urls=['s3://b/a.tar?X-Amz-Credential=c']"])
    assert cfg.tracking.uri == "https://h/" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"
    assert "X-Amz-Credential=***" in cfg.to_yaml() and "Credential=c'" not in str(cfg.public_dict())
    setup_logging(0)
    get_logger("x").info("store at http://bob:hunter2@h/ ?")
    report(DyntrainError("cannot reach https://h/?password=hunter2"), show_traceback=True, rank=0)
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "http://***@h/" in out.out and "password=***" in out.err


def test_mlflow_tracker_params_metrics_tags_and_status(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=t", "run.name=unit"])
    assert isinstance(make_tracker(cfg, rank=1), NullTracker)
    assert isinstance(make_tracker(load_config(None, ["tracking.enabled=false"]), 0), NullTracker)
    tracker = make_tracker(cfg, rank=0)
    tracker.log_params({**cfg.flatten(), "x.url": "http://u:secret@h/p"})
    tracker.log_metrics({"loss_S": 0.5, "loss/L": 0.25, "bad": float("nan"), "none": None}, step=3)
    tracker.set_tags({"mode": "pretrain", "schedule": "dynamic"})
    tracker.log_text("a: 1\n", "config.yaml")
    tracker.finish("FAILED")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["run.seed"] == "0" and run.data.params["x.url"] == "http://***@h/p"
    assert run.data.metrics["loss_S"] == 0.5 and run.data.metrics["loss/L"] == 0.25
    assert "bad" not in run.data.metrics
    assert run.data.tags["schedule"] == "dynamic"
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts next to the sqlite database
    # a resumed run reopens the same MLflow run and can finish it
    again = make_tracker(cfg, rank=0, run_id=tracker.run_id)
    again.log_metrics({"loss_S": 0.4}, step=4)
    again.finish("FINISHED")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss_S")] == [0.5, 0.4]


def test_console_tracker_lines_and_the_fan_out(caplog):
    from dyntrain.tracking import ConsoleTracker, RunHeader, Tracker, TrackerGroup

    class Recorder(Tracker):
        run_id = "abc"

        def __init__(self):
            self.metrics = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, metrics))

    console, rec = ConsoleTracker("unit", 8), Recorder()
    group = TrackerGroup(rec, console)
    assert group.run_id == "abc"
    window = {"loss": 0.5, "lr": 1e-4, "patches_per_s": 12.34, "step_time_s": 2.0, "data_wait_frac": 0.1,
              "loss_L": 0.6, "step_time_L": 3.0, "loss_S": 0.4, "step_time_S": 1.0, "gpu_hours_saved_frac": 0.25}
    with caplog.at_level("INFO", logger="dyntrain"):
        group.log_start(RunHeader("dynamic", {"S": 0.5, "L": 0.5}, 2, "cpu", 2, False, 8, 0, 8, group.run_id))
        group.log_metrics(window, step=6)
        group.log_metrics({"eval/S/sots/psnr": 20.0}, step=6)  # no progress line for other metrics
        group.log_end(8, True, {"gpu_hours": 0.01, "overhead_frac": 0.02})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "[unit] dynamic training of S=0.50, L=0.50 | world 2 on cpu | ZeRO 2 | bf16 False | global batch 8 | "
        "steps 0->8 | mlflow run abc",
        "[unit] step 6/8 | loss 0.5000 (L 0.6000 S 0.4000) | lr 1.00e-04 | 12.3 patches/s | L 3.000s S 1.000s"
        " | saved 25.0% at equal iterations | ETA 0:00:04",
        "[unit] stopped early at step 8 | gpu_hours 0.01000 | outside steps 2.00%"]
    summary = console.summary_line(8, False, {"gpu_hours": 0.01, "gpu_hours_separate": 0.02,
                                              "gpu_hours_saved_frac": 0.5, "gpu_hours_saved_frac_expected": 0.49})
    assert "saved 50.00% at equal iterations (expected from step times 49.00%)" in summary
    assert unlabelled_savings("\n".join(lines + [summary])) == []
    assert unlabelled_savings("[unit] step 6/8 | saved 25.0% | ETA 0:00:04") != []  # the check can fail
    assert [s for s, _ in rec.metrics] == [6, 6]


def test_device_choice():
    import torch

    from dyntrain.config import ConfigError
    from dyntrain.devices import choose_device

    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="run.device: 'cuda' requested"):
            choose_device("cuda", 1, setting="run.device", error=ConfigError)
    else:
        assert choose_device("cuda", 0).type == "cuda"
