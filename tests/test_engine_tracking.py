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


# ------------------------------------------------------------------ faults do not bend the account
def _steps(acc, clock, steps, overhead=0.2, slow=None):
    """Steps ``steps`` (0-based indices) of an S/L run (S 1 s, L 3 s; step ``i`` is L when i % 3 == 0),
    ``overhead`` s outside each step, ``slow``: {index: extra seconds inside that step}."""
    for i in steps:
        v = "L" if i % 3 == 0 else "S"
        dt = (3.0 if v == "L" else 1.0) + (slow or {}).get(i, 0.0)
        clock.t += dt + overhead
        acc.record_step([v], dt, step=i)


def _identity(m):
    assert m["gpu_hours_productive"] + m["gpu_hours_lost"] == pytest.approx(m["gpu_hours"], rel=1e-12)
    assert m["gpu_hours_lost"] == pytest.approx(sum(m[f"gpu_hours_lost_{c}"] for c in ("stall", "replay", "restart")))


def _clean(clock, n=40):
    acc = GPUHourAccount(2, ["S", "L"])
    acc.add_startup(10.0)
    acc.start()
    _steps(acc, clock, range(n), slow={0: 2.0})   # the first step of a run warms up
    acc.stop()
    return acc.metrics()


def test_a_stalled_step_is_lost_time_not_step_time(clock):
    clean = _clean(clock)
    acc = GPUHourAccount(2, ["S", "L"])
    acc.start()
    _steps(acc, clock, range(40), slow={0: 2.0, 20: 29.7})   # step 20 (S) waited 29.7 s on S3
    acc.stop()
    m = acc.metrics()
    _identity(m)
    assert m["stalled_steps"] == 1 and m["gpu_hours_lost_stall"] == pytest.approx(29.7 * 2 / 3600)
    assert m["step_time_mean_S"] == pytest.approx(clean["step_time_mean_S"])   # t_S did not swell
    assert m["gpu_hours_saved_frac"] == pytest.approx(clean["gpu_hours_saved_frac"], abs=1e-12)
    assert m["gpu_hours_lost_replay"] == m["gpu_hours_lost_restart"] == 0 and m["restarts"] == 0
    # a stall before its variant was measured is judged against the other variants' typical time
    early = GPUHourAccount(2, ["S", "L"])
    early.start()
    _steps(early, clock, range(9), slow={0: 2.0, 6: 23.0})   # L: step 0 (warm-up), 3, then 6 stalls
    assert early.metrics()["stalled_steps"] == 1
    assert early.metrics()["gpu_hours_lost_stall"] == pytest.approx((3.0 + 23.0 - 1.0) * 2 / 3600)
    # within the bound (3 x typical + 0.5 s) a slow step is an ordinary one
    from dyntrain.tracking.faults import STALL_FACTOR, STALL_FLOOR_S
    acc.start()
    _steps(acc, clock, [41], slow={41: (STALL_FACTOR - 1) * 1.0 + STALL_FLOOR_S - 0.01})
    assert acc.metrics()["stalled_steps"] == 1


def test_the_step_reached_is_written_off_the_training_loop(tmp_path):
    """ProgressWriter: the newest step is on disk after close; a folder it cannot write ends it with
    one warning, and update() never raises."""
    from dyntrain.tracking.faults import ProgressWriter, read_progress

    w = ProgressWriter(tmp_path / "ck")
    for step in range(1, 200):
        w.update("run-a", step)
    w.close()
    assert read_progress(tmp_path / "ck") == ("run-a", 199)
    blocker = tmp_path / "file"
    blocker.write_text("")
    errors = []
    w = ProgressWriter(blocker / "ck", on_error=errors.append)
    for step in range(1, 5):
        w.update("run-b", step)
    w.close()
    assert len(errors) == 1 and isinstance(errors[0], OSError)


def test_replayed_steps_and_restarts_are_lost_time_and_the_saving_holds(clock, tmp_path):
    from dyntrain.tracking.faults import read_progress, write_progress

    clean = _clean(clock)
    first = GPUHourAccount(2, ["S", "L"])
    first.add_startup(10.0)
    first.start()
    _steps(first, clock, range(16), slow={0: 2.0})
    checkpoint = first.state_dict()          # the checkpoint of step 16
    _steps(first, clock, range(16, 22))       # ... then kill -9 after step 22: its 6 steps are lost
    write_progress(tmp_path, first.faults.run_key, first.faults.furthest_step)
    # the resumed segment, on 1 rank hosting both readers: each step takes twice the wall time
    second = GPUHourAccount(1, ["S", "L"])
    second.load_state_dict(checkpoint)
    second.faults.continue_after(*read_progress(tmp_path))
    assert read_progress(tmp_path / "missing") == (None, 0) and second.faults.replay_until == 22
    second.add_startup(8.0)                   # a restart's start-up: restart cost
    second.start()
    for i in range(16, 40):
        v = "L" if i % 3 == 0 else "S"
        dt = 2 * ((3.0 if v == "L" else 1.0) + (1.5 if i == 16 else 0.0))   # 16 warms up
        clock.t += dt + 2 * 0.2
        second.record_step([v], dt, step=i)   # 16-21 replayed
    second.stop()
    m = second.metrics()
    _identity(m)
    assert m["replayed_steps"] == 6 and m["restarts"] == 1 and m["stalled_steps"] == 0
    assert m["steps_S"] + m["steps_L"] == 40                 # every step is in the final weights ...
    replay = 2 * (3.0 + 1.5 + 1.0 + 1.0 + 3.0 + 1.0 + 1.0)
    # ... the replays are lost, with their share of the time outside steps (0.4 s a step here)
    outside = (m["gpu_hours_productive"] * 3600 - m["steps_s"]) / m["steps_s"]
    assert m["gpu_hours_lost_replay"] == pytest.approx(replay * (1 + outside) / 3600)
    assert m["gpu_hours_lost_restart"] == pytest.approx(8.0 / 3600)    # the restart's start-up
    assert m["step_time_mean_S"] == pytest.approx(2 * clean["step_time_mean_S"])  # on 1 accelerator
    assert abs(m["gpu_hours_saved_frac"] - clean["gpu_hours_saved_frac"]) < 0.001, (m, clean)
    # stopped at step 40 (SIGUSR1, no replay), resumed on 2 ranks: the first step of each variant
    # warms up (L 4 s over its typical 3 s) and costs the restart, not t_L
    third = GPUHourAccount(2, ["S", "L"])
    third.load_state_dict(second.state_dict())
    third.faults.continue_after("another-run", 50)                  # another run's progress file: ignored
    assert third.faults.replay_until == 40
    third.add_startup(3.0)
    third.start()
    _steps(third, clock, range(40, 46), slow={40: 4.0})
    third.stop()
    m3 = third.metrics()
    _identity(m3)
    assert m3["restarts"] == 2 and m3["replayed_steps"] == 6
    assert m3["gpu_hours_lost_restart"] == pytest.approx((8.0 + (3.0 + 4.0) * 2) / 3600)
    assert m3["step_time_mean_L"] == pytest.approx(clean["step_time_mean_L"])


def test_an_account_of_an_older_checkpoint_loads_with_nothing_lost(clock):
    acc = GPUHourAccount(2, ["S", "L"])
    acc.start()
    _steps(acc, clock, range(6))
    acc.stop()
    old = {k: v for k, v in acc.state_dict().items()
           if k in ("accelerators", "variants", "n_steps", "count", "seconds", "same", "switched", "wall_s")}
    again = GPUHourAccount(2, ["S", "L"])
    again.load_state_dict(old)
    m = again.metrics()
    _identity(m)
    assert m["gpu_hours_lost"] == 0 and m["gpu_hours_saved_frac"] == pytest.approx(acc.metrics()["gpu_hours_saved_frac"])


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
