"""Resume of the real pre-training path (``launch/pretrain.py`` under the ``deepspeed`` launcher, 2 CPU
ranks over gloo, DALI reading real shards, MLflow in sqlite) after kill -9, after a kill during a
checkpoint write, and on another world size (2 -> 1 -> 2).

Every run goes through ``tests/rank_entry.py``, which runs ``launch/pretrain.py`` with the trainer's
trace switched on (``--trace``: per-step variant, loss and sample keys per rank, SHA-256 of the final
fp32 weights) and, for the faulted run, a checkpoint fault (``--ckpt-fault``). Evidence comes from
those traces and from the checkpoint folders.

Timeline (N = 4 steps, 2N = 8; each rank's share of the 16 samples is 8 = 4 steps of 2):
    straight     2 ranks, steps 0..7, checkpoints every 2                      -> reference trace
    interrupted  2 ranks, checkpoints every 4, kill -9 (whole launcher group) once step 4 is saved
    faulted      resume (auto, from 4), checkpoints every 2, SIGKILL while writing step 6
    resumed      resume (auto: step 6 is incomplete -> step 4) to step 8     -> compared with straight
    resharded    1 rank resumes the straight run's step 2, hosting both data ranks, reader 1 replays
                 batch 3 (its I/O failure path)                                  -> bit-identical
    back         2 ranks resume the resharded run's 1-rank checkpoint of step 4  -> bit-identical
    ca_*         the cost-aware draw: straight, killed after step 4, resumed (same comparison)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dyntrain import checkpoint as ck
from dyntrain.train.schedule import VariantSchedule
from dyntrain.train.state import read_trace
from helpers import deepspeed_cmd, draws, free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ENTRY = str(ROOT / "tests" / "rank_entry.py")
N = 4
SAMPLES = 16


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


class Setup:
    def __init__(self, base: Path):
        self.base = base
        self.shards = base / "shards"
        self.uri = f"sqlite:///{base / 'mlflow.db'}"
        self.ports: dict[str, int] = {}

    def overrides(self, ckpt_dir: Path, **kw) -> list[str]:
        o = {
            "run.max_steps": 2 * N, "run.log_every": 2, "run.deterministic": "true", "run.seed": 7,
            "model.dim": 8, "model.prompt_dims": "[8,8,16]", "model.prompt_sizes": "[16,8,4]",
            "model.num_refinement": 1, "data.train_urls": f"[{self.shards}/*.tar]",
            "data.crop_size": 32, "data.micro_batch_size": 2, "data.num_threads": 1,
            "data.shuffle_buffer": 4, "data.decode": "cpu", "schedule.verify_every": 0,
            # below the tiny model's gradient norm: every step clips (a 1-rank resume must clip alike)
            "optim.grad_clip": 0.05,
            "deepspeed.zero_stage": 2, "deepspeed.bf16": "false", "tracking.uri": self.uri,
            "tracking.experiment": "resume", "checkpoint.dir": str(ckpt_dir), "checkpoint.every": 2,
            "checkpoint.keep": 10, "checkpoint.resume": "auto",
            "data.val_urls": f"[{self.base / 'val'}/*.tar]", "eval.every": 2, "eval.val_samples": 4,
        }
        o.update(kw)
        return [f"{k}={v}" for k, v in o.items()]

    def start(self, name: str, ranks: int, ckpt_dir: Path, entry_args: list[str] | None = None,
              port: int | None = None, **kw):
        trace = self.base / "trace" / name
        log = open(self.base / f"{name}.log", "w")
        self.ports[name] = port = port or free_port()
        cmd = deepspeed_cmd(ranks, ENTRY, "--trace", trace, *(entry_args or []), ROOT / "launch" / "pretrain.py",
                            "--config", ROOT / "configs" / "quickstart.yaml", *self.overrides(ckpt_dir, **kw),
                            port=port)
        return subprocess.Popen(cmd, cwd=self.base, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, name: str, ranks: int, ckpt_dir: Path, timeout: float = 300, **kw) -> int:
        proc = self.start(name, ranks, ckpt_dir, **kw)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{name} timed out:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text()[-6000:]

    def trace(self, name: str, rank: int) -> dict:
        return json.loads((self.base / "trace" / name / f"trace_rank{rank}.json").read_text())


def _shm(port: int) -> list[str]:
    """DeepSpeed's shared-memory all-reduce buffers of the world on ``port`` (this user's)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _steps(trace: dict) -> dict[int, dict]:
    return {s["step"]: s for s in trace["steps"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dyntrain.data.synthetic import write_synthetic_images

    base = tmp_path_factory.mktemp("resume")
    write_synthetic_images(base / "images", 4, size=(128, 128), seed=3)
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(base / "images"),
                    "--out", str(base / "shards"), "--patch-size", "64", "--shard-samples", "4",
                    "--max-flat-frac", "1.0", "--quiet"], check=True, timeout=120)
    manifest = json.loads((base / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == SAMPLES
    write_synthetic_images(base / "val_images", 1, size=(128, 128), seed=4)   # held out: validation
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(base / "val_images"),
                    "--out", str(base / "val"), "--patch-size", "64", "--max-flat-frac", "1.0", "--quiet"],
                   check=True, timeout=120)
    s = Setup(base)
    rc = s.run("straight", 2, base / "ck_straight")
    assert rc == 0, s.log("straight")
    assert _shm(s.ports["straight"]) == []      # a clean exit leaves no buffer in /dev/shm
    return s


def test_exact_resume_after_kill9_and_kill_during_write(setup):
    s = setup
    d = s.base / "ck_interrupted"
    # 1. kill -9 the whole job (launcher and both ranks) as soon as step N's checkpoint is complete
    proc = s.start("interrupted", 2, d, **{"checkpoint.every": N})
    deadline = time.time() + 300
    while not (d / ck.tag_for_step(N) / ck.COMPLETE).exists():
        assert proc.poll() is None, f"run ended before step {N} was saved:\n{s.log('interrupted')}"
        assert time.time() < deadline, s.log("interrupted")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (d / ck.tag_for_step(2 * N)).exists(), "the run finished before it was killed"
    assert "resumed from" not in s.log("interrupted")
    port = s.ports["interrupted"]
    assert _shm(port) == []         # nor does kill -9: the names went once every rank had mapped them
    # the killed segment's trace: every step it read, as it happened, the straight run's
    for rank in range(2):
        killed, ref = read_trace(s.base / "trace" / "interrupted", rank), _steps(s.trace("straight", rank))
        assert killed["killed"] and killed["weights_sha256"] is None
        assert [t["step"] for t in killed["steps"]] == list(range(len(killed["steps"])))
        assert len(killed["steps"]) >= N, killed
        for t in killed["steps"]:
            assert (t["variant"], t["keys"], t["loss"]) == tuple(ref[t["step"]][k] for k in ("variant", "keys", "loss"))

    # 2. restart on the same port, where a run killed during its start-up (3 ranks) left its buffers
    # (which the next start removes before its ranks create theirs); every rank is SIGKILLed while
    # writing the checkpoint of step N+2
    for r in range(3):
        (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}").write_bytes(b"stale")
    rc = s.run("faulted", 2, d, entry_args=["--ckpt-fault", f"before_complete@{N + 2}"], port=port)
    assert _shm(port) == [], s.log("faulted")
    assert rc != 0, s.log("faulted")
    assert "resumed from step_00000004 at step 4" in s.log("faulted")
    half = d / ck.tag_for_step(N + 2)
    assert half.is_dir() and not (half / ck.COMPLETE).exists()       # written, never completed
    assert (d / ck.LATEST).read_text() == ck.tag_for_step(N)

    # 3. restart again: resumes from step N (the newest COMPLETE one) and finishes
    rc = s.run("resumed", 2, d)
    assert rc == 0, s.log("resumed")
    log = s.log("resumed")
    assert "resumed from step_00000004 at step 4" in log and "step 8/8" in log
    assert (d / ck.tag_for_step(2 * N) / ck.COMPLETE).exists()
    assert (half / ck.COMPLETE).exists()            # re-written completely this time

    # the resumed run is the straight run, step for step
    for rank in range(2):
        ref, got = s.trace("straight", rank), s.trace("resumed", rank)
        ref_steps, got_steps = _steps(ref), _steps(got)
        assert sorted(got_steps) == list(range(N, 2 * N))
        for t in range(N, 2 * N):
            assert got_steps[t]["variant"] == ref_steps[t]["variant"], f"variant of step {t}"
            assert got_steps[t]["keys"] == ref_steps[t]["keys"], f"samples of step {t}, rank {rank}"
            assert got_steps[t]["loss"] == ref_steps[t]["loss"], f"loss of step {t}"
        assert got["weights_sha256"] == ref["weights_sha256"], "final weights differ"
        assert len({ref_steps[t]["variant"] for t in range(2 * N)}) == 2   # both variants trained

    # one MLflow run across the three processes, marked as resumed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(s.uri)
    exp = client.get_experiment_by_name("resume")
    stored = ck.read_client_state(d, ck.tag_for_step(2 * N))["client"]
    run = client.get_run(stored["mlflow_run_id"])
    assert run.data.tags.get("resumed_from") == ck.tag_for_step(N)
    assert run.info.status == "FINISHED"
    first = ck.read_client_state(d, ck.tag_for_step(N))["client"]["mlflow_run_id"]
    assert first == run.info.run_id
    ids = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert len(ids) == 2       # the straight run and the interrupted one, nothing else

    # validation: the resumed chain reports the straight run's val figures at every evaluation
    # (steps 0, 2, 4 before the kill, 6 twice, 8), built from the same inputs
    straight = client.get_run(ck.read_client_state(s.base / "ck_straight", ck.tag_for_step(2 * N))
                              ["client"]["mlflow_run_id"])
    assert run.data.tags["val.inputs_sha256"] == straight.data.tags["val.inputs_sha256"]
    assert run.data.params["val.fingerprint"] == straight.data.params["val.fingerprint"]
    keys = [k for k in straight.data.metrics if k.startswith("val/") and k.split("/")[-1] in (
        "l1", "psnr", "psnr_degraded", "psnr_masked", "l1_masked", "own_steps")]
    assert {k.split("/")[1] for k in keys} == {"S", "L"} and len(keys) == 12
    for key in keys:
        ref = {m.step: m.value for m in client.get_metric_history(straight.info.run_id, key)}
        assert sorted(ref) == [0, 2, 4, 6, 8], key
        for m in client.get_metric_history(run.info.run_id, key):
            assert m.value == ref[m.step], f"{key} at step {m.step}"


def test_world_size_change_two_to_one_and_back(setup):
    """One rank resumes the two-rank run's step 2 and hosts both data ranks: the same samples per
    step (rank 0's micro-batch, then rank 1's, as gradient accumulation), the same draws, and final
    weights bit-identical to the uninterrupted two-rank run's, although hosted reader 1 takes batch
    3 through its failure path (replayed from the last good DALI checkpoint, as after an I/O error:
    ``rank_entry.py --replay-batch``). Two ranks then resume that run's 1-rank checkpoint of step 4
    and end the same, every step of each rank equal to the two-rank run's (the chaos soak's path:
    1 rank hosting 2 readers, a retry on reader 1, a kill, a resume on 2 ranks)."""
    s = setup
    d = s.base / "ck_reshard"
    d.mkdir()
    tag, mid = ck.tag_for_step(2), ck.tag_for_step(N)   # mid-epoch: each rank had read 2 of its 4 batches
    shutil.copytree(s.base / "ck_straight" / tag, d / tag)
    # moved to "another cluster": a new MLflow store that does not know the checkpoint's run
    moved = f"sqlite:///{s.base / 'moved.db'}"
    proc = s.start("resharded", 1, d, entry_args=["--replay-batch", "1@3"], **{"tracking.uri": moved})
    assert proc.wait(timeout=300) == 0, s.log("resharded")
    _assert_new_run_continues(s, moved, tag)
    log = s.log("resharded")
    assert "written by 2 rank(s), this run has 1" in log and "each hosts 2 readers" in log
    assert "the 2 data ranks of the checkpoint continue on 1 rank(s)" in log
    assert (d / tag / ck.UNIVERSAL / "zero").is_dir()
    got = s.trace("resharded", 0)
    assert got["loader_stats"]["recoveries"] >= 1, got["loader_stats"]
    steps = _steps(got)
    assert sorted(steps) == list(range(2, 2 * N))
    ref = [_steps(s.trace("straight", r)) for r in range(2)]
    for t in range(2, 2 * N):
        assert steps[t]["variant"] == ref[0][t]["variant"]
        assert steps[t]["keys"] == ref[0][t]["keys"] + ref[1][t]["keys"], f"samples of step {t}"
    want = s.trace("straight", 0)["weights_sha256"]
    assert got["weights_sha256"] == want, "final weights differ from the 2-rank run's"
    # the checkpoints it writes are 1-rank checkpoints of the same 2 data ranks
    meta = ck.read_marker(d / ck.tag_for_step(2 * N))
    assert meta["world_size"] == 1 and meta["data_ranks"] == 2

    back = s.base / "ck_back"
    back.mkdir()
    shutil.copytree(d / mid, back / mid)
    assert s.run("back", 2, back, **{"tracking.uri": moved}) == 0, s.log("back")
    assert "written by 1 rank(s), this run has 2" in s.log("back")
    assert "continue on 2 rank(s), every reader from its saved position" in s.log("back")
    for r in range(2):
        again = _steps(s.trace("back", r))
        assert sorted(again) == list(range(N, 2 * N))
        for t in range(N, 2 * N):
            assert (again[t]["keys"], again[t]["variant"], again[t]["loss"]) == \
                (ref[r][t]["keys"], ref[r][t]["variant"], ref[r][t]["loss"]), f"rank {r} step {t}"
    assert s.trace("back", 0)["weights_sha256"] == want, "weights differ after the 1 -> 2 resume"


def _assert_new_run_continues(s, moved: str, tag: str) -> None:
    """The resumed job logged into a new run of the new store that names the old one."""
    from mlflow.tracking import MlflowClient

    old = MlflowClient(s.uri)
    old_ids = {r.info.run_id for r in old.search_runs([old.get_experiment_by_name("resume").experiment_id])}
    client = MlflowClient(moved)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["previous_run_id"] in old_ids and run.info.run_id not in old_ids
    assert run.data.tags["resumed_from"] == tag
    assert run.data.params["model.dim"] == "8" and run.data.metrics["loss"] > 0
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_cost_aware_draw_resumes_exactly_and_agrees_across_ranks(setup):
    """``schedule.variant_probs=cost_aware``: the probabilities change after each validation (every
    2 steps) from all-reduced figures; a run killed -9 after step N's checkpoint and resumed draws,
    trains and ends exactly like the uninterrupted run, on both ranks."""
    s = setup
    ca = {"schedule.variant_probs": "cost_aware", "schedule.cost_aware.min_prob": 0.05,
          "schedule.cost_aware.headroom_db": 0.05, "run.seed": 3}
    assert s.run("ca_straight", 2, s.base / "ck_ca_straight", **ca) == 0, s.log("ca_straight")
    d = s.base / "ck_ca"
    proc = s.start("ca_killed", 2, d, **ca, **{"checkpoint.every": N})
    deadline = time.time() + 300
    while not (d / ck.tag_for_step(N) / ck.COMPLETE).exists():
        assert proc.poll() is None, s.log("ca_killed")
        assert time.time() < deadline, s.log("ca_killed")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert s.run("ca_resumed", 2, d, **ca) == 0, s.log("ca_resumed")
    assert "resumed from step_00000004 at step 4" in s.log("ca_resumed")

    straight = ck.read_client_state(s.base / "ck_ca_straight", ck.tag_for_step(2 * N))["client"]
    resumed = ck.read_client_state(d, ck.tag_for_step(2 * N))["client"]
    table = straight["schedule_state"]["table"]
    assert resumed["schedule_state"]["table"] == table
    assert len(table) >= 2 and [e[0] for e in table] == sorted({e[0] for e in table})
    assert any(abs(p["S"] - 0.5) > 0.01 for _, p in table[1:])      # the draw really changed
    assert f"cost-aware draw from step {table[-1][0]}" in s.log("ca_straight")
    for rank in range(2):
        ref, got = _steps(s.trace("ca_straight", rank)), _steps(s.trace("ca_resumed", rank))
        for t in range(N, 2 * N):
            assert (got[t]["variant"], got[t]["loss"]) == (ref[t]["variant"], ref[t]["loss"]), t
        assert s.trace("ca_resumed", rank)["weights_sha256"] == s.trace("ca_straight", rank)["weights_sha256"]
    v0 = [x["variant"] for x in s.trace("ca_straight", 0)["steps"]]
    assert v0 == [x["variant"] for x in s.trace("ca_straight", 1)["steps"]]
    sched = VariantSchedule(3, {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}, None, probs_policy="cost_aware")
    sched.load_state_dict(straight["schedule_state"])
    assert v0 == draws(sched, 0, 2 * N)                  # the logged table explains every draw
