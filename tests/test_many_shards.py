"""Many shards on a real S3 server (moto on 127.0.0.1): the loader takes the shard list from the
build's manifest and loads a window of real shards ahead of its reader (window.py). The sample order,
exact resume and the split between ranks must be those of the loader that opens every shard."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from helpers import assert_resumes_exactly, same_batch

from dyntrain.data.pretrain import window
from dyntrain.data.pretrain.degrade import DegradeSpec
from dyntrain.data.pretrain.many_shards import write_many_shards
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader
from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SHARDS, PER_SHARD, BATCH = 80, 3, 4
SPEC = DegradeSpec(crop_size=32, region_block=8)


def loader(urls, rank=0, world=1, windowed=True, monkeypatch=None) -> DaliPretrainLoader:
    monkeypatch.setattr(window, "MIN_SHARDS", 8 if windowed else 10**9)
    return DaliPretrainLoader(urls, SPEC, BATCH, rank=rank, world_size=world, device="cpu", seed=3,
                              num_threads=1, prefetch=2, shuffle_buffer=6)


@pytest.fixture(scope="module")
def many(s3_server) -> str:
    name = f"dyntrain-many-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    write_many_shards(f"s3://{name}/pre", SHARDS, PER_SHARD, size=40, seed=5)
    return f"s3://{name}/pre/*.tar"


def take(ld: DaliPretrainLoader, n: int) -> list[dict]:
    try:
        return [next(ld) for _ in range(n)]
    finally:
        ld.close()


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_window_gives_the_same_batches_as_opening_every_shard(many, monkeypatch, rank, world):
    share = SHARDS * PER_SHARD // world
    steps = share // BATCH + 6                                   # past the end of the share
    old = take(loader(many, rank, world, windowed=False, monkeypatch=monkeypatch), steps)
    ld = loader(many, rank, world, monkeypatch=monkeypatch)
    assert ld._window is not None and ld._window.covered < share  # started with a part of it
    new = take(ld, steps)
    assert ld._window.rebuilds >= 1 and ld._window.covered == share
    for got, want in zip(new, old):
        same_batch(got, want)


def test_rank_reads_only_its_own_shards_indices(many, monkeypatch):
    ld = loader(many, rank=2, world=4, monkeypatch=monkeypatch)
    try:
        w = ld._window
        first, last = w.first, w.first + w.share                 # this rank's samples
        mine = {i for i in range(SHARDS) if w.starts[i] < last and w.starts[i + 1] > first}
        assert w.real and w.real <= mine and w.fetched == len(w.real)
        paths, _ = w.dali_paths()
        assert {i for i, p in enumerate(paths) if p.startswith("s3://")} == w.real
        keys = [k for b in take(ld, 4) for k in b["keys"]]
        assert {int(k.split("_")[0]) for k in keys} <= mine
    finally:
        ld.close()


def test_resume_is_exact_across_window_growth(many, monkeypatch):
    straight = take(loader(many, monkeypatch=monkeypatch), 24)
    state = assert_resumes_exactly(lambda: loader(many, monkeypatch=monkeypatch), straight, before=17)
    # an old-style checkpoint (every shard opened) resumes in the window loader, and back
    state_old = assert_resumes_exactly(lambda: loader(many, windowed=False, monkeypatch=monkeypatch),
                                       straight, before=17)
    assert state["shards"] == state_old["shards"]
    resumed = loader(many, monkeypatch=monkeypatch)
    resumed.load_state_dict(state_old)
    for want in straight[17:20]:
        same_batch(next(resumed), want)
    resumed.close()


def test_reading_past_the_window_is_an_error_not_data(many, monkeypatch):
    ld = loader(many, monkeypatch=monkeypatch)
    monkeypatch.setattr(window.ShardWindow, "reach", lambda self, consumed: False)  # never grows
    with pytest.raises(window.ShardWindowError, match="ran past its shard window"):
        take(ld, SHARDS * PER_SHARD // BATCH)


def test_a_stale_manifest_is_named(s3_server, monkeypatch):
    name = f"dyntrain-stale-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    write_many_shards(f"s3://{name}/pre", 10, 2, size=40)
    manifest = json.loads(s3.get_bytes(f"s3://{name}/pre/manifest.json"))
    manifest["shards"][0]["samples"] = 5
    s3.client().put_object(Bucket=name, Key="pre/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(DataSourceError, match=r"shard-000000\.idx.*5 samples the manifest lists"):
        loader(f"s3://{name}/pre/", monkeypatch=monkeypatch)


def test_startup_bench_runs_the_window_through_pretrain(tmp_path):
    """bench/startup.py end to end, small: launch/pretrain.py reaches step 2 on 130 shards (the
    window) and on 8 (every shard opened); JSON rows with the peak RSS and the headline (the RSS
    ratio) as its last line."""
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"), "--shards", "8,130",
                           "--per-shard", "2", "--repeats", "1", "--baseline-upto", "0", "--modes", "1rank",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    name, value = last.split("=")
    assert name == "rss_ratio_130_to_8" and float(value) > 0
    report = json.loads(out.read_text())
    assert [r["shards"] for r in report["rows"]] == [8, 130]
    assert all(r["now_s"] > 0 and len(r["runs_s"]) == 1 and r["peak_rss_gb"] > 0.1 for r in report["rows"])
    assert abs(report["ratio"] - report["rows"][1]["now_s"] / report["rows"][0]["now_s"]) < 1e-9
    assert abs(report["rss_ratio"] - report["rows"][1]["peak_rss_gb"] / report["rows"][0]["peak_rss_gb"]) < 1e-9


@pytest.mark.parametrize("rank,world,epochs", [(1, 3, 1), (0, 1, 2)])
def test_window_holds_only_its_share_and_lets_passed_shards_go(many, monkeypatch, rank, world, epochs):
    """DALI is given only this rank's shards of the window (one reader, its first and last index cut
    to the share: rank 1 of 3 starts and ends inside a shard); at an epoch start a window much
    larger than needed shrinks back (SHRINK_ABOVE lowered here), the batches unchanged."""
    monkeypatch.setattr(window, "SHRINK_ABOVE", 0)
    share = SHARDS * PER_SHARD // world
    steps = epochs * share // BATCH + 8
    old = take(loader(many, rank, world, windowed=False, monkeypatch=monkeypatch), steps)
    ld = loader(many, rank, world, monkeypatch=monkeypatch)
    w = ld._window
    paths, indices = w.reader_paths()
    held = sum(int(Path(i).read_text().split("\n", 1)[0].split()[1]) for i in indices)
    assert held == w.covered + (w.covered < share) and all(p.startswith("s3://") for p in paths[:len(w.span)])
    new = take(ld, steps)
    for got, want in zip(new, old):
        same_batch(got, want)
    if epochs > 1:
        assert w.shrinks >= 1 and w.covered < share
