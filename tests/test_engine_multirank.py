"""The engine on 2 CPU ranks under the real ``deepspeed`` launcher (gloo).

This file is also the rank entry point the launcher starts (``__main__`` below): it runs
``dyntrain.jobs.pretrain.run_pretrain`` — the code path of ``launch/pretrain.py`` — with an in-memory loader
that obeys the data contract, and a checkpoint manager that only records what it was asked to save.
Every rank writes its trace (``--trace``, see ``tests/rank_entry.py``) and the tests compare the ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import deepspeed_cmd, draws  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
        "model.num_refinement=1", "data.crop_size=32", "data.micro_batch_size=2",
        "run.log_every=2", "deepspeed.bf16=false", "tracking.enabled=false"]


# ------------------------------------------------------------------------- rank entry point
class SyntheticLoader:
    """Deterministic batches from (seed, rank, index); NaN inputs at batch SYNTH_NAN_AT (test hook)."""

    def __init__(self, cfg, rank, world_size, device):
        import torch
        self.torch, self.cfg, self.rank, self.device = torch, cfg, rank, device
        self.index = 0
        self.nan_at = int(os.environ.get("SYNTH_NAN_AT", "-1"))

    def __iter__(self):
        return self

    def __next__(self):
        torch, b, s = self.torch, self.cfg.data.micro_batch_size, self.cfg.data.crop_size
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.rank * 7919 + self.index)
        target = torch.rand(b, 3, s, s, generator=g)
        inp = (target + 0.1 * torch.randn(b, 3, s, s, generator=g)).clamp(0, 1)
        if self.index == self.nan_at:
            inp[0, 0, 0, 0] = float("nan")
        keys = [f"r{self.rank}-{self.index}-{i}" for i in range(b)]
        self.index += 1
        return {"input": inp.to(self.device), "target": target.to(self.device), "keys": keys}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]

    def stats(self):
        return {"samples": self.index * self.cfg.data.micro_batch_size, "corrupt_skipped": 0, "epoch": 0}

    def close(self):
        pass


class RecordingCheckpoints:
    """Stands in for CheckpointManager: records each save in <dir>/saves_rank<r>.jsonl."""

    def __init__(self, cfg, engine, rank, world_size):
        self.path = Path(cfg.checkpoint.dir) / f"saves_rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, step, client_state, rank_state):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "client_keys": sorted(client_state)}) + "\n")
        return f"step_{step:08d}"

    def find_resume(self):
        return None

    def load(self, tag):  # pragma: no cover - never resumes
        raise AssertionError("no resume in these tests")


def _rank_main() -> int:
    import argparse

    from rank_entry import corrupt_draw

    from dyntrain.config import load_config
    from dyntrain.jobs.pretrain import run_pretrain

    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--trace", default=None, help="trace folder (Trainer.enable_trace)")
    p.add_argument("--corrupt-draw", default=None, help="RANK@STEP: that rank draws differently")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    factory = RecordingCheckpoints if cfg.checkpoint.dir else (lambda *args: None)
    hooks = {}
    if a.trace:
        hooks["trace_dir"] = a.trace
    if a.corrupt_draw:
        rank, start = a.corrupt_draw.split("@")
        hooks["schedule_hook"] = corrupt_draw(int(rank), int(start))
    run_pretrain(cfg, SyntheticLoader, checkpoint_factory=factory, **hooks)
    return 0


# ---------------------------------------------------------------------------------- helpers
def launch(tmp_path: Path, overrides: list[str], env_extra: dict | None = None, ranks: int = 2,
           timeout: float = 240, entry_args: list[str] | None = None
           ) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    cmd = deepspeed_cmd(ranks, Path(__file__).resolve(), "--trace", tmp_path / "trace", *(entry_args or []),
                        f"checkpoint.dir={tmp_path / 'ckpt'}", *TINY, *overrides)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def traces(tmp_path: Path, ranks: int = 2) -> list[dict]:
    out = []
    for r in range(ranks):
        path = tmp_path / "trace" / f"trace_rank{r}.json"
        out.append({**json.loads(path.read_text()), "trace_dir": str(path.parent)})
    return out


def _tail(proc) -> str:
    return (proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:])


# ------------------------------------------------------------------------------------ tests
pytestmark = pytest.mark.slow


VARIANTS3 = {"S": [1, 1, 1, 1], "M": [1, 2, 1, 2], "L": [2, 2, 2, 2]}
PROBS3 = {"S": 0.3, "M": 0.3, "L": 0.4}
STEPS, SEED = 8, 11


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """Held-out validation shards (5 patches of 64x64) for the pre-training validation."""
    from dyntrain.data.shards.patches import ShardBuildConfig
    from dyntrain.data.shards.writer import build_shards
    from dyntrain.data.synthetic import write_synthetic_images

    base = tmp_path_factory.mktemp("val")
    write_synthetic_images(base / "images", 2, size=(64, 192), seed=9)
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=4, max_flat_frac=1.0, workers=1),
                 progress=False)
    return f"{base / 'shards'}/*.tar"


def _three_variant_run(out: Path, stage: int, val_urls: str):
    """8 steps, 3 variants, gradient accumulation 2, the draw checked at every step; validation of
    every variant at steps 0, 4 and 8 into an MLflow run."""
    out.mkdir()
    proc, _ = launch(out, [
        f"run.max_steps={STEPS}", f"run.seed={SEED}", f"deepspeed.zero_stage={stage}",
        "deepspeed.gradient_accumulation_steps=2", "schedule.verify_every=1",
        "model.variants={S: [1,1,1,1], M: [1,2,1,2], L: [2,2,2,2]}",
        "schedule.variant_probs={S: 0.3, M: 0.3, L: 0.4}", "checkpoint.every=3",
        f"data.val_urls=[{val_urls}]", "eval.every=4", "eval.val_samples=5", "eval.val_batch_size=2",
        "tracking.enabled=true", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"], timeout=400)
    assert proc.returncode == 0, _tail(proc)
    return proc, traces(out)


def val_history(out: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} of the val/ metrics of the only MLflow run in ``out``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
            for k in run.data.metrics if k.startswith("val/")}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, val_shards):
    return _three_variant_run(tmp_path_factory.mktemp("zero2") / "run", 2, val_shards)


def test_two_ranks_draw_the_same_variants_and_keep_identical_weights(zero2_run):
    """ZeRO-2, gradient accumulation 2, three variants, verify_every=1."""
    from dyntrain.train.schedule import VariantSchedule

    proc, (t0, t1) = zero2_run
    seq0 = [s["variant"] for s in t0["steps"]]
    seq1 = [s["variant"] for s in t1["steps"]]
    assert seq0 == seq1 == draws(VariantSchedule(SEED, VARIANTS3, PROBS3), 0, STEPS)
    assert len(set(seq0)) >= 2  # the draw really switches in these 8 steps
    assert t0["weights_sha256"] == t1["weights_sha256"]
    assert [s["loss"] for s in t0["steps"]] == [s["loss"] for s in t1["steps"]]  # all-reduced
    # each rank saw its own data: 2 micro-batches of 2 samples per step
    assert t0["steps"][0]["keys"] == ["r0-0-0", "r0-0-1", "r0-1-0", "r0-1-1"]
    assert t1["steps"][0]["keys"][0] == "r1-0-0"
    run_dir = Path(t0["trace_dir"]).parent
    saves = [json.loads(l)["step"] for l in (run_dir / "ckpt" / "saves_rank0.jsonl").read_text().splitlines()]
    assert saves == [3, 6, 8]
    assert "step 8/8" in proc.stdout and "patches/s" in proc.stdout and "ETA" in proc.stdout


def test_zero3_with_switching_variants_matches_zero2(zero2_run, tmp_path, val_shards):
    """ZeRO-3 sees the module call pattern change whenever the variant does (its prefetch trace is
    invalidated and re-recorded); it must train like ZeRO-2 and keep the ranks identical. Validation
    (weights gathered, the 5 crops split 3/2 over the ranks and reduced) gives every variant's
    figures at steps 0, 4, 8, the same under both stages."""
    _, z2 = zero2_run
    _, z3 = _three_variant_run(tmp_path / "z3", 3, val_shards)
    assert z3[0]["weights_sha256"] == z3[1]["weights_sha256"]
    assert [s["variant"] for s in z3[0]["steps"]] == [s["variant"] for s in z2[0]["steps"]]
    for a, b in zip(z2[0]["steps"], z3[0]["steps"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    h2 = val_history(Path(z2[0]["trace_dir"]).parent)
    h3 = val_history(tmp_path / "z3")
    for v in VARIANTS3:               # every variant, trained or not, at the configured steps
        for name in ("l1", "psnr", "psnr_degraded", "psnr_masked", "l1_masked", "own_steps"):
            assert sorted(h2[f"val/{v}/{name}"]) == [0, 4, 8], (v, name)
            for step, value in h2[f"val/{v}/{name}"].items():
                assert h3[f"val/{v}/{name}"][step] == pytest.approx(value, rel=1e-4), (v, name, step)
        assert h2[f"val/{v}/psnr"][8] != h2[f"val/{v}/psnr"][0]          # training moved them
    assert h2["val/S/own_steps"][8] + h2["val/M/own_steps"][8] + h2["val/L/own_steps"][8] == STEPS
    assert sorted(h2["val/gpu_hours"]) == [0, 4, 8] and h2["val/gpu_hours"][8] > h2["val/gpu_hours"][4]


def test_verify_every_catches_an_injected_disagreement_quickly(tmp_path):
    """Rank 1 draws differently from step 2 on (a schedule hook); the check must fail, not hang."""
    proc, elapsed = launch(
        tmp_path, ["run.max_steps=50", "schedule.verify_every=1", "schedule.verify_timeout_s=20",
                   "deepspeed.zero_stage=3"],
        entry_args=["--corrupt-draw", "1@2"],
        timeout=180)
    assert proc.returncode != 0, _tail(proc)
    out = proc.stdout + proc.stderr
    assert "VariantMismatchError" in out and "step 2: ranks [1] disagree" in out, _tail(proc)
    assert elapsed < 150
    assert not (tmp_path / "trace" / "trace_rank0.json").exists()


def test_nan_loss_stops_with_step_and_variant_and_saves_nothing_after(tmp_path, monkeypatch):
    """Against the production tracking backend, ``launch/tracking_server.sh`` (a real ``mlflow
    server`` with MLflow's basic-auth app), whose store receives the run (marked FAILED), its metrics
    and its artifacts (config, DeepSpeed JSON) from ranks given the credentials in their environment;
    a request without them gets 401. A sqlite store gets no second 2-rank run of its own: the stop
    does not depend on the backend, a 2-rank job logs into sqlite in ``zero2_run`` and a FAILED status
    reaches sqlite in ``test_engine_tracking.py::test_mlflow_tracker_params_metrics_tags_and_status``."""
    import urllib.error
    import urllib.request

    import psutil
    from conftest import AuthMlflowServer
    from mlflow.tracking import MlflowClient

    server = AuthMlflowServer(tmp_path / "server")
    try:
        uri = server.uri
        # the server alone: no MLflow job runner or huey consumers (and no queue left in /dev/shm)
        kids = [" ".join(k.cmdline()) for k in psutil.Process(server.proc.pid).children(recursive=True)]
        assert not [k for k in kids if "huey" in k or "_job_runner" in k], kids
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        experiment = f"nan-server-{tmp_path.name}"
        proc, _ = launch(tmp_path, ["run.max_steps=20", "checkpoint.every=2", "deepspeed.zero_stage=1",
                                    "tracking.enabled=true", f"tracking.uri={uri}",
                                    f"tracking.experiment={experiment}"],
                         env_extra={"SYNTH_NAN_AT": "3", **server.env})  # batch 3 = step 3 (no accumulation)
        assert proc.returncode != 0, _tail(proc)
        out = proc.stdout + proc.stderr
        assert "NonFiniteLossError" in out and "at step 3 (variant " in out, _tail(proc)
        assert server.password not in out
        for r in range(2):
            saves = [json.loads(l)["step"] for l in
                     (tmp_path / "ckpt" / f"saves_rank{r}.jsonl").read_text().splitlines()]
            assert saves == [2]
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.status == "FAILED"
        assert run.data.metrics["loss"] > 0  # logged up to step 2
        assert run.data.tags["world_size"] == "2" and run.data.params["model.dim"] == "8"
        assert {"config.yaml", "deepspeed_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        # uploaded through the server into its artifact store
        stored = {p.name for p in (server.root / "store" / "artifacts").rglob("*") if run.info.run_id in str(p)}
        assert {"config.yaml", "deepspeed_config.json"} <= stored
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(_rank_main())
