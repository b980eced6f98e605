"""Transient storage faults cost nothing: pre-training from S3 shards through a fault proxy
(``bench/s3_fault_proxy.py``: refused connections, resets, 503 SlowDown) in front of a real moto
server. While the faults last less than ``data.io_retry_s`` the run retries and carries on: no
restart, no sample skipped or replaced, the same sample keys and variants at every step and the same
final weights as an uninterrupted run. The bound itself (a fault that outlasts it ends the run with
one error naming the URL) is ``tests/test_failures.py::test_s3_outage_mid_run_then_exact_resume``.
Opening the pipeline during an outage (a job starting, or a requeued job resuming, while S3 is away)
waits for the storage in the same way, in the pre-training and the paired-shard fine-tuning loader."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import server_env, start_moto, stop
from dyntrain.data.synthetic import make_demo_data, write_synthetic_images
from helpers import (ENTRY, PRETRAIN, QUICKSTART, S3_ENV, error_lines, finish_logged, free_port, rank0_trace,
                     run_env, start_logged, tiny_overrides, upload_shards, wait_paused)

ROOT = Path(__file__).resolve().parents[1]
PROXY = str(ROOT / "bench" / "s3_fault_proxy.py")


def start_proxy(target: str, mode_file: Path) -> tuple[subprocess.Popen, str]:
    """The fault proxy in front of ``target``; returns (process, its endpoint URL)."""
    mode_file.write_text("pass")
    port = free_port()
    ready = mode_file.with_suffix(".ready")
    proc = subprocess.Popen([sys.executable, PROXY, "--port", str(port), "--target", target,
                             "--mode-file", str(mode_file), "--ready", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env())
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the fault proxy did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3_behind_proxy(tmp_path_factory):
    """Pre-training shards (4 photographs, 64 px patches, 4 per shard) and paired fine-tuning shards
    (the demo task folders, 2 pairs per shard) in buckets of a fresh moto server, and a fault proxy in
    front of it: yields (proxy endpoint, mode file, {"pretrain": shard glob, "paired_shards": prefix})."""
    from dyntrain.data.finetune.paired_shards import pack_paired_shards
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards

    base = tmp_path_factory.mktemp("transient")
    write_synthetic_images(base / "images", 4, size=(192, 256), seed=11)
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=4, workers=1), progress=False)
    make_demo_data(base / "demo", train_images=2, test_images=1)
    pack_paired_shards(base / "demo" / "train", str(base / "paired"), shard_samples=2, progress=False)
    server, endpoint = start_moto()
    proxy = None
    try:
        upload_shards(base / "shards", "dyntrain-transient", endpoint)
        upload_shards(base / "paired", "dyntrain-transient-paired", endpoint)
        proxy, via = start_proxy(endpoint, base / "mode")
        yield via, base / "mode", {"pretrain": "s3://dyntrain-transient/pre/*.tar",
                                   "paired_shards": "s3://dyntrain-transient-paired/pre"}
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        stop(server)


@pytest.mark.slow
def test_transient_s3_faults_cost_no_restart_and_no_sample(tmp_path, s3_behind_proxy):
    """Refused connections (6 s), 503 SlowDown (5 s) and resets (4 s) in a row while the run
    reads: exit 0 in one go, the retries logged, nothing skipped, the trace equal to a clean run."""
    endpoint, mode, urls = s3_behind_proxy
    urls = urls["pretrain"]
    env = run_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
    steps = 12

    def run(name: str, *entry: str) -> subprocess.Popen:
        cmd = [sys.executable, ENTRY, "--cli", "--trace", str(tmp_path / "trace" / name), *entry, PRETRAIN,
               "--config", QUICKSTART, *tiny_overrides(tmp_path, urls, tmp_path / name,
                                                   **{"run.max_steps": steps, "data.io_retry_s": 60})]
        return start_logged(cmd, tmp_path / f"{name}.log", env, tmp_path)

    clean = run("clean")
    log = finish_logged(clean, 600)
    assert clean.returncode == 0, log[-3000:]
    go = tmp_path / "go"
    faulted = run("faulted", "--pause-at", f"3@{go}")
    wait_paused(faulted, go)
    try:
        for fault, seconds in (("down", 6), ("503", 5), ("reset", 4)):
            mode.write_text(fault)
            if fault == "down":
                go.write_text("")
            time.sleep(seconds)
    finally:
        mode.write_text("pass")
    log = finish_logged(faulted, 600)
    assert faulted.returncode == 0 and not error_lines(log), log[-3000:]
    assert "transient storage error" in log and "storage is back" in log, log[-3000:]
    got, want = rank0_trace(tmp_path / "trace" / "faulted"), rank0_trace(tmp_path / "trace" / "clean")
    assert got["loader_stats"]["io_retries"] > 0, got["loader_stats"]
    assert got["loader_stats"]["corrupt_skipped"] == 0 and got["loader_stats"]["corrupt_keys"] == []
    assert [s["step"] for s in got["steps"]] == list(range(steps))
    for g, w in zip(got["steps"], want["steps"]):
        assert g["keys"] == w["keys"] and g["variant"] == w["variant"], g["step"]
    assert got["weights_sha256"] == want["weights_sha256"], "weights differ from the clean run"


# run in a process of its own: DALI's S3 client keeps the endpoint of the first S3 pipeline a process
# built, so in the pytest process it could still point at an earlier test's moto server. The storage
# is away (refused connections) for outage_s seconds while the loader opens its pipeline: the first
# batch of the paired-shard loader, and the first batch after load_state_dict of either loader.
OPEN_DURING_OUTAGE = """
import json, sys, threading, time
from pathlib import Path
from dyntrain.config import load_config

kind, urls, mode, outage_s = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])

def make():
    if kind == "pretrain":
        from dyntrain.data.pretrain.degrade import DegradeSpec
        from dyntrain.data.pretrain.pipeline import DaliPretrainLoader
        data = load_config(None, ["data.crop_size=32"]).data
        return DaliPretrainLoader(urls, DegradeSpec.from_config(data), 2, decode="cpu", num_threads=1,
                                  shuffle_buffer=4, io_retry_s=60)
    from dyntrain.data.finetune.paired_shards import PairedShardLoader
    cfg = load_config(None, ["data.source=paired_shards", f"data.train_urls=[{urls}]", "data.crop_size=16",
                             "data.micro_batch_size=2", "data.num_threads=1", "data.shuffle_buffer=4",
                             "data.io_retry_s=60"])
    return PairedShardLoader(cfg, 0, 1, "cpu")

def during_outage(step):
    mode.write_text("down")
    back = threading.Timer(outage_s, lambda: mode.write_text("pass"))
    back.start()
    time.sleep(0.3)  # the proxy reads its mode file every 0.1 s
    try:
        t0 = time.monotonic()
        out = step()
        return out, time.monotonic() - t0
    finally:
        back.join()

def resume():
    loader.load_state_dict(state)
    return next(loader)

loader = make()
if kind == "paired_shards":  # opens its pipeline at the first batch
    first, waited_first = during_outage(lambda: next(loader))
else:  # opened it in the constructor, after listing the shards (which waits in storage.s3)
    first, waited_first = next(loader), None
retries_first = loader.io_retries
state = loader.state_dict()
want = next(loader)["keys"]
got, waited_resume = during_outage(resume)
clean = make()
r = {"retries_first": retries_first, "retries": loader.io_retries, "waited_first": waited_first,
     "waited_resume": waited_resume, "first": list(first["keys"]), "clean_first": list(next(clean)["keys"]),
     "want": list(want), "got": list(got["keys"])}
loader.close()
clean.close()
print(json.dumps(r))
"""


@pytest.mark.parametrize("kind", ["pretrain", "paired_shards"])
def test_pipeline_opened_during_an_outage_waits_for_the_storage(s3_behind_proxy, kind):
    """The loader's pipeline opened while S3 refuses connections (4 s each time: the paired-shard
    loader's first batch, either loader's first batch after a resume): it waits, counts the retries,
    and hands out the batches an uninterrupted loader does (both loaders open through
    ``recovery.CorruptRecovery._reopen``)."""
    endpoint, mode, urls = s3_behind_proxy
    env = run_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
    outage = 4.0
    try:
        proc = subprocess.run([sys.executable, "-c", OPEN_DURING_OUTAGE, kind, urls[kind], str(mode), str(outage)],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        mode.write_text("pass")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if kind == "paired_shards":
        assert r["retries_first"] > 0 and r["waited_first"] > outage - 1, r
    assert r["retries"] > r["retries_first"] and r["waited_resume"] > outage - 1, r
    assert r["first"] == r["clean_first"] and r["got"] == r["want"], r


# run in a process of its own (see OPEN_DURING_OUTAGE). The seed-3 soak's path at the loader level:
# one process hosts data ranks 0 and 1 (resumed from 2 ranks' reader states), the storage goes away
# as hosted reader 1 reads batch FAULT (its DALI run fails and the replay retries through the outage),
# the process's state is taken after the recovery (what its 1-rank checkpoint records) and two
# processes of a 2-rank world resume from it. Every batch is compared whole with the uninterrupted
# 2-rank readers': keys and the bytes of input, target and mask (keys alone miss a crop window, a
# degradation or a region mask drawn for another batch index).
HOSTED_RETRY = """
import hashlib, json, sys, threading, time
from pathlib import Path
from dyntrain.config import load_config
from dyntrain.data.logical import HOSTED, LogicalRanks
from dyntrain.data.pretrain.pipeline import build_pretrain_loader

urls, mode, outage_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
cfg = load_config(None, [f"data.train_urls=[{urls}]", "data.crop_size=32", "data.micro_batch_size=2",
                         "data.num_threads=1", "data.shuffle_buffer=4", "data.decode=cpu", "data.io_retry_s=60",
                         "deepspeed.global_batch_size=4", "run.seed=3"])
START, FAULT, SAVE, END = 3, 5, 7, 14   # steps; END is past each reader's epoch boundary

def reader(data_rank):
    return build_pretrain_loader(cfg, data_rank, 2, "cpu")

def digest(batch):
    h = hashlib.sha256()
    for key in ("input", "target", "mask"):
        h.update(batch[key].contiguous().numpy().tobytes())
    return [h.hexdigest(), list(batch["keys"])]

want, at_start = {}, {}
for r in (0, 1):
    clean = reader(r)
    for step in range(END):
        if step == START:
            at_start[r] = clean.state_dict()
        want[f"{step}/{r}"] = digest(next(clean))
    clean.close()

one = LogicalRanks(reader, 0, 1, 2, 2)          # 1 rank hosting both data ranks, resumed from 2 ranks
one.load_rank_state({"rank": 0, "world_size": 1, "saved_loaders": [
    {"rank": r, "world_size": 2, "data_ranks": 2, "loader": at_start[r]} for r in (0, 1)]})
hosted1 = one.readers[1]
plain_run = type(hosted1)._run_batch

def outage_at_fault(it):
    if it != FAULT:
        return plain_run(hosted1, it)
    mode.write_text("down")                      # S3 away: the DALI run of this batch fails ...
    threading.Timer(outage_s, lambda: mode.write_text("pass")).start()
    time.sleep(0.3)                              # (the proxy reads its mode file every 0.1 s)
    return hosted1._recover(RuntimeError("Critical error in pipeline: S3 read failed"), it)
hosted1._run_batch = outage_at_fault

got = {}
for step in range(START, SAVE):
    for r in (0, 1):
        got[f"{step}/{r}"] = digest(next(one))
saved = one.state_dict()                          # what the 1-rank checkpoint records
for step in range(SAVE, END):
    for r in (0, 1):
        got[f"{step}/{r}"] = digest(next(one))
retries, recoveries = hosted1.io_retries, hosted1.recoveries
one.close()
for r in (0, 1):                                  # the 1-rank checkpoint resumed on 2 ranks
    two = LogicalRanks(reader, r, 2, 2, 1)
    two.load_rank_state({"rank": r, "world_size": 2, "resharded_from": 1, "loader": None,
                         "saved_loaders": [{"rank": 0, "world_size": 1, "data_ranks": 2, "loader": saved}]})
    for step in range(SAVE, END):
        got[f"resumed {step}/{r}"] = digest(next(two))
    two.close()
print(json.dumps({"want": want, "got": got, "retries": retries, "recoveries": recoveries,
                  "saved_position": saved["position"]}))
"""


@pytest.mark.slow
def test_retry_on_a_hosted_reader_then_its_one_rank_state_on_two_ranks(s3_behind_proxy):
    """The storage goes away (3 s) as hosted reader 1 of a 1-rank process reads: its batch is
    replayed through the outage (retries counted), every batch of both readers before and after it
    is the 2-rank run's, byte for byte, and so is every batch of the two ranks that resume from the
    state taken after the recovery (past the readers' epoch boundary)."""
    endpoint, mode, urls = s3_behind_proxy
    env = run_env(**S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        proc = subprocess.run([sys.executable, "-c", HOSTED_RETRY, urls["pretrain"], str(mode), "3"],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        mode.write_text("pass")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["retries"] > 0 and r["recoveries"] > 0 and r["saved_position"] == 0, r
    for name, batch in r["got"].items():
        assert batch == r["want"][name.split()[-1]], f"batch {name} differs from the 2-rank run's"
    assert len(r["got"]) == 2 * (14 - 3) + 2 * (14 - 7)
