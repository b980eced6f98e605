"""CheckpointManager with real DeepSpeed engines (tiny model) on 1 and 2 CPU ranks over gloo,
retention and resume selection on real folders, and weights export (safetensors / .pt round trips).

Multi-rank cases run this file as a worker script (``python tests/test_checkpoint.py WORKER ...``)
once per rank, with the env:// variables a launcher would set.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyntrain import checkpoint as ck  # noqa: E402
from dyntrain.checkpoint import weights as wt  # noqa: E402
from dyntrain.config import CheckpointConfig  # noqa: E402
from helpers import free_port, rank_env  # noqa: E402

PY = sys.executable


# =========================================================================== worker side
def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _engine(stage: int, micro: int, bf16: bool = False):
    import deepspeed

    model = _tiny_model()
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 3}},
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
           "steps_per_print": 2**62}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)


def _train_step(engine, step: int, ranks: list[int]) -> None:
    """One optimizer step on the samples that ``ranks`` of a 2-rank world would see at ``step``."""
    xs, ys = zip(*(_batch(step, r) for r in ranks))
    x, y = torch.cat(xs), torch.cat(ys)
    dtype = next(engine.module.parameters()).dtype
    loss = ((engine(x.to(dtype)).float() - y) ** 2).mean()
    engine.backward(loss)
    engine.step()


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _rank_state(step: int, rank: int) -> dict:
    return {"rank": rank, "counter": 10 * step + rank, "rng": torch.get_rng_state()}


def _ckcfg(d: str, **kw) -> SimpleNamespace:
    base = dict(dir=d, every=2, keep=10, milestone_every=0, resume="auto")
    base.update(kw)
    return SimpleNamespace(**base)


def worker(mode: str, out: str, stage: int) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    outp = Path(out)
    d = str(outp / "ckpt")
    report: dict = {"rank": rank, "world": world}

    if mode == "straight":
        # 4 steps with a checkpoint after steps 2 and 4
        engine = _engine(stage, micro=2)
        mgr = ck.CheckpointManager(_ckcfg(d), engine, rank, world)
        for step in range(4):
            _train_step(engine, step, [rank])
            if (step + 1) % 2 == 0:
                mgr.save(step + 1, {"step": step + 1, "note": "tiny"}, _rank_state(step + 1, rank))
        final = _full_weights(engine)
        if rank == 0:
            torch.save(final, outp / "straight_final.pt")
        # exact resume in the same world: a fresh engine with other initial weights loads step 2
        torch.manual_seed(99)
        engine2 = _engine(stage, micro=2)
        with torch.no_grad():
            for p in engine2.module.parameters():
                p.add_(1.0)
        mgr2 = ck.CheckpointManager(_ckcfg(d, resume="step_00000002"), engine2, rank, world)
        tag = mgr2.find_resume()
        client, mine = mgr2.load(tag)
        report.update(tag=tag, client=client, counter=mine["counter"], rank_in_state=mine["rank"],
                      global_steps=engine2.global_steps, resharded=mgr2.resharded)
        for step in range(2, 4):
            _train_step(engine2, step, [rank])
        resumed = _full_weights(engine2)
        report["bitwise"] = all(torch.equal(resumed[k], final[k]) for k in final)
        report["auto"] = ck.CheckpointManager(_ckcfg(d), engine2, rank, world).find_resume()
    elif mode == "reshard":
        # one rank resumes the 2-rank checkpoint of step 2 and trains on both ranks' samples
        engine = _engine(stage, micro=4)
        mgr = ck.CheckpointManager(_ckcfg(d), engine, rank, world)
        client, mine = mgr.load("step_00000002")
        report.update(client=client, resharded=mgr.resharded, state=
                      {k: v for k, v in mine.items() if k != "rng"}, has_rng="rng" in mine,
                      global_steps=engine.global_steps, lr=engine.get_lr()[0])
        for step in range(2, 4):
            _train_step(engine, step, [0, 1])
        torch.save(_full_weights(engine), outp / "reshard_final.pt")
    elif mode == "export":
        # a checkpoint of this stage (bf16 when asked), and the weights it should export
        engine = _engine(stage, micro=2, bf16=os.environ.get("TINY_BF16") == "1")
        mgr = ck.CheckpointManager(_ckcfg(d), engine, rank, world)
        for step in range(2):
            _train_step(engine, step, [rank])
        final = _full_weights(engine)
        client = {"step": 2, "config": {"model": {"dim": 8, "variants": {"S": [1, 1, 1, 1]}}},
                  "mlflow_run_id": "abc123"}
        mgr.save(2, client, _rank_state(2, rank))
        if rank == 0:
            torch.save(final, outp / "export_ref.pt")
    (outp / f"report_{mode}_{rank}.json").write_text(json.dumps(report, default=str))
    from dyntrain.train.engine import shutdown_distributed

    shutdown_distributed()


# ============================================================================ test side
def launch(mode: str, out: Path, world: int, stage: int = 2, extra_env: dict | None = None,
           timeout: float = 240) -> list[int]:
    """Start ``world`` worker processes like a launcher would; returns their exit codes."""
    port = free_port()
    procs = []
    for r in range(world):
        log = open(out / f"log_{mode}_{r}.txt", "w")
        procs.append(subprocess.Popen([PY, __file__, mode, str(out), str(stage)],
                                      env=rank_env(r, world, port, **(extra_env or {})),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    codes: list = [None] * world
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes):     # one died: the others cannot go on
            time.sleep(2)
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        if time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"{mode} workers timed out; logs in {out}")
        time.sleep(0.2)
    return [p.wait() for p in procs]


def _report(out: Path, mode: str, rank: int) -> dict:
    return json.loads((out / f"report_{mode}_{rank}.json").read_text())


def _logs(out: Path, mode: str) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(out.glob(f"log_{mode}_*.txt")))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    codes = launch("straight", out, world=2, stage=2)
    assert codes == [0, 0], _logs(out, "straight")
    return out


def test_two_ranks_save_and_exact_resume(zero2_run):
    out = zero2_run
    for r in range(2):
        rep = _report(out, "straight", r)
        assert rep["tag"] == "step_00000002"
        assert rep["client"] == {"step": 2, "note": "tiny"}
        assert rep["counter"] == 20 + r and rep["rank_in_state"] == r   # its own state, gathered
        assert rep["global_steps"] == 2 and rep["resharded"] is False
        assert rep["bitwise"] is True, "resumed weights differ from the uninterrupted run"
        assert rep["auto"] == "step_00000004"
    d = out / "ckpt"
    assert (d / ck.LATEST).read_text() == "step_00000004"
    stored = ck.read_client_state(d, "step_00000002")
    assert [s["counter"] for s in stored["rank_states"]] == [20, 21]   # every rank's state
    assert stored["world_size"] == 2
    meta = ck.read_marker(d / "step_00000004")
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert set(meta["files"]) >= {"mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def test_export_zero2_matches_trained_weights(zero2_run, tmp_path):
    ref = torch.load(zero2_run / "straight_final.pt")
    weights, model_cfg, info = wt.consolidated_weights(zero2_run / "ckpt")
    assert info["tag"] == "step_00000004" and info["step"] == 4
    assert model_cfg is None    # this tiny client state carries no config
    assert set(weights) == set(ref)
    for k in ref:
        assert torch.equal(weights[k], ref[k]), k
    r = subprocess.run([PY, str(ROOT / "launch" / "export.py"), "--checkpoint", str(zero2_run / "ckpt"),
                        "--out", str(tmp_path / "w.safetensors")], capture_output=True, text=True,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "of step_00000004 (step 4)" in r.stdout
    sd, cfg = wt.load_weights(tmp_path / "w.safetensors")
    assert cfg is None and all(torch.equal(sd[k], ref[k]) for k in ref)
    sd, _ = wt.load_weights(zero2_run / "ckpt" / "step_00000002")     # a tag folder works too
    assert not all(torch.equal(sd[k], ref[k]) for k in ref)


def test_world_size_change_two_to_one(zero2_run):
    out = zero2_run
    codes = launch("reshard", out, world=1, stage=2)
    assert codes == [0], _logs(out, "reshard")
    rep = _report(out, "reshard", 0)
    assert rep["resharded"] is True and rep["client"]["step"] == 2
    assert rep["global_steps"] == 2
    assert rep["state"] == {"rank": 0, "world_size": 1, "resharded_from": 2, "loader": None}
    assert rep["has_rng"]
    assert (out / "ckpt" / "step_00000002" / ck.UNIVERSAL / "zero").is_dir()
    # one rank on both ranks' samples follows the same trajectory (Adam moments came along)
    ref = torch.load(out / "straight_final.pt")
    got = torch.load(out / "reshard_final.pt")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage,world,bf16", [(3, 2, False), (0, 1, True)])
def test_export_other_stages(tmp_path, stage, world, bf16):
    codes = launch("export", tmp_path, world=world, stage=stage,
                   extra_env={"TINY_BF16": "1" if bf16 else "0"})
    assert codes == [0] * world, _logs(tmp_path, "export")
    ref = torch.load(tmp_path / "export_ref.pt")
    weights, model_cfg, info = wt.consolidated_weights(tmp_path / "ckpt")
    assert model_cfg == {"dim": 8, "variants": {"S": [1, 1, 1, 1]}}
    assert info == {"tag": "step_00000002", "step": 2, "mlflow_run_id": "abc123"}
    for k in ref:
        assert weights[k].dtype == torch.float32
        tol = 1e-2 if bf16 else 0.0   # bf16 training: the fp32 master weights vs the bf16 copy
        torch.testing.assert_close(weights[k], ref[k], rtol=tol, atol=tol)
    info2 = wt.checkpoint_info(tmp_path / "ckpt")
    assert info2["step"] == 2 and info2["mlflow_run_id"] == "abc123" and info2["world_size"] == world


# ---------------------------------------------------------- folders without DeepSpeed
def _fake_tag(d: Path, step: int, complete: bool = True, payload: bytes = b"x" * 10) -> Path:
    p = d / ck.tag_for_step(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(payload)
    if complete:
        meta = {"tag": p.name, "step": step, "world_size": 2,
                "files": {"mp_rank_00_model_states.pt": len(payload)}}
        (p / ck.COMPLETE).write_text(json.dumps(meta))
    return p


def test_retention_keeps_newest_and_milestones(tmp_path):
    for s in (100, 200, 300, 400, 500, 600):
        _fake_tag(tmp_path, s)
    _fake_tag(tmp_path, 250, complete=False)   # half-written, older than the newest: goes
    _fake_tag(tmp_path, 700, complete=False)   # half-written, newer: left (it may be re-written)
    mgr = ck.CheckpointManager(_ckcfg(str(tmp_path), keep=2, milestone_every=200), None, 0, 1)
    deleted = mgr.prune()
    assert sorted(deleted) == ["step_00000100", "step_00000250", "step_00000300"]
    left = [i.tag for i in ck.list_checkpoints(tmp_path)]
    assert left == ["step_00000200", "step_00000400", "step_00000500", "step_00000600", "step_00000700"]
    # the folders left the listing at once; their files go in a thread, off the training loop
    mgr.wait_deleted(30)
    assert not list(tmp_path.glob(".trash-*"))


def test_resume_choice(tmp_path):
    cfg = lambda **kw: _ckcfg(str(tmp_path), **kw)  # noqa: E731
    assert ck.CheckpointManager(cfg(), None, 0, 1).find_resume() is None        # empty dir
    _fake_tag(tmp_path, 10)
    _fake_tag(tmp_path, 20)
    _fake_tag(tmp_path, 30, complete=False)
    (tmp_path / ck.LATEST).write_text("step_00000010")   # stale pointer: a crash before it moved
    assert ck.CheckpointManager(cfg(), None, 0, 1).find_resume() == "step_00000020"
    assert (tmp_path / ck.LATEST).read_text() == "step_00000020"  # the pointer follows the resume
    (tmp_path / ck.LATEST).unlink()  # killed between step 20's COMPLETE and its latest
    assert ck.CheckpointManager(cfg(), None, 0, 1).find_resume() == "step_00000020"
    assert (tmp_path / ck.LATEST).read_text() == "step_00000020"
    assert ck.CheckpointManager(cfg(resume="step_00000010"), None, 0, 1).find_resume() == "step_00000010"
    assert ck.CheckpointManager(cfg(resume="10"), None, 0, 1).find_resume() == "step_00000010"
    with pytest.raises(ck.CheckpointError, match="step_00000040 does not exist"):
        ck.CheckpointManager(cfg(resume="step_00000040"), None, 0, 1).find_resume()
    # a file that shrank after the marker was written (lost on the shared filesystem): skipped
    (tmp_path / "step_00000020" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert ck.CheckpointManager(cfg(), None, 0, 1).find_resume() == "step_00000010"


def test_fresh_start_refused_or_overwritten(tmp_path):
    """resume=never into a folder with another run's tags: one error naming the folder and its
    newest tag; checkpoint.overwrite deletes them first, so the new run's tags stand alone."""
    cfg = lambda **kw: _ckcfg(str(tmp_path), resume="never", **kw)  # noqa: E731
    assert ck.CheckpointManager(cfg(), None, 0, 1).find_resume() is None   # empty folder: fine
    for s in (200, 300):
        _fake_tag(tmp_path, s)
    (tmp_path / ck.LATEST).write_text("step_00000300")
    with pytest.raises(ck.CheckpointError) as err:
        ck.CheckpointManager(cfg(), None, 0, 1).find_resume()
    msg = str(err.value)
    assert str(tmp_path) in msg and "step_00000300" in msg and "checkpoint.overwrite=true" in msg
    assert "\n" not in msg and [i.tag for i in ck.list_checkpoints(tmp_path)] == ["step_00000200",
                                                                                "step_00000300"]
    assert ck.CheckpointManager(cfg(overwrite=True), None, 0, 1).find_resume() is None
    assert ck.list_checkpoints(tmp_path) == [] and not (tmp_path / ck.LATEST).exists()
    assert ck.newest_complete(tmp_path) is None   # the next auto-resume cannot pick the old run


def test_config_section_drives_manager(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), every=5, keep=1, milestone_every=0, resume="auto")
    _fake_tag(tmp_path, 5)
    _fake_tag(tmp_path, 10)
    mgr = ck.CheckpointManager(cfg, None, 0, 1)
    assert mgr.find_resume() == "step_00000010"
    assert mgr.prune() == ["step_00000005"]
    with pytest.raises(ck.CheckpointError, match="checkpoint.dir"):
        ck.CheckpointManager(CheckpointConfig(dir=None), None, 0, 1)


def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 4, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).half(),
        # int32, not int64: the safetensors package lays tensors out by alignment first (8-byte
        # dtypes lead), and the layout check below expects a.weight at offset 0
        "d.index": torch.arange(7, dtype=torch.int32),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 3),
        "g.mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "w.safetensors"
    wt.save_weights(path, tensors, {"dim": 8, "variants": {"S": [2, 3, 3, 4]}}, {"step": 7, "tag": "t"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["a.weight"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    assert header["b.bias"]["dtype"] == "BF16"
    assert json.loads(header["__metadata__"]["model_config"])["dim"] == 8
    # the tensor bytes are plain little-endian values at the recorded offsets
    body = raw[8 + n:]
    a = torch.frombuffer(bytearray(body[0:48]), dtype=torch.float32).reshape(3, 4)
    assert torch.equal(a, tensors["a.weight"])
    sd, model_cfg = wt.load_weights(path)
    assert model_cfg == {"dim": 8, "variants": {"S": [2, 3, 3, 4]}}
    assert set(sd) == set(tensors)
    for k, v in tensors.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and torch.equal(sd[k], v), k
    assert wt.checkpoint_info(path) == {"tag": "t", "step": 7}
    wt.save_weights(tmp_path / "i64.safetensors", {"d.index": torch.arange(7, dtype=torch.int64)})
    assert torch.equal(wt.load_weights(tmp_path / "i64.safetensors")[0]["d.index"], torch.arange(7))
    # .pt and a plain state_dict file
    wt.save_weights(tmp_path / "w.pt", tensors, {"dim": 8}, {"step": 7})
    sd2, cfg2 = wt.load_weights(tmp_path / "w.pt")
    assert cfg2 == {"dim": 8} and all(torch.equal(sd2[k], v) for k, v in tensors.items())
    torch.save(tensors, tmp_path / "plain.pt")
    sd3, cfg3 = wt.load_weights(tmp_path / "plain.pt")
    assert cfg3 is None and torch.equal(sd3["a.weight"], tensors["a.weight"])
    # broken files are named in the error
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ck.CheckpointError, match="bad.safetensors"):
        wt.load_weights(tmp_path / "bad.safetensors")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
