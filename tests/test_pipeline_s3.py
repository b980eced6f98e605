"""End to end against a real S3 server on 127.0.0.1 (moto, see conftest.py): shards built into a
bucket by launch/make_shards.py, streamed through DALI from s3://, ranks, resume, corrupt data,
and the errors for a missing shard, a missing bucket, an unreachable endpoint and bad credentials."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import start_moto, stop
from dyntrain.data.storage import retry, s3
from dyntrain.data.pretrain.degrade import DegradeSpec
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.shards.writer import ShardBuildConfig, build_shards
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.data.storage.urls import expand_urls
from dyntrain.data.shards.wds import parse_index

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CROP, BATCH = 32, 4
SPEC = DegradeSpec(crop_size=CROP, region_block=8)


def loader(urls, rank=0, world=1, seed=0) -> DaliPretrainLoader:
    return DaliPretrainLoader(urls, SPEC, BATCH, rank=rank, world_size=world, device="cpu",
                              seed=seed, num_threads=2, prefetch=2, shuffle_buffer=8)


def put_bytes(url: str, data: bytes) -> None:
    """Write one object (the tests' way to plant a modified shard)."""
    bucket, key = s3.parse_s3_url(url)
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)


def objects(bucket_url: str) -> dict[str, int]:
    return {u[len(bucket_url) + 1:]: size for u, size in s3.list_objects(bucket_url + "/")}


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory) -> dict:
    """Shards built by the CLI straight into s3://<bucket>/pre (one corrupt and one tiny source)."""
    base = tmp_path_factory.mktemp("s3data")
    images = base / "images"
    write_synthetic_images(images, 5, size=(192, 256), seed=21)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "tiny.png")
    bucket = "dyntrain-s3-shards"
    boto3.client("s3").create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/pre"
    cmd = [sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(images), "--out",
           out, "--patch-size", "64", "--shard-samples", "12", "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    manifest = json.loads(s3.read_bytes(out + "/manifest.json"))
    keys = [json.loads(ln)["key"] for ln in s3.read_bytes(out + "/patches.jsonl").decode().splitlines()]
    return {"out": out, "bucket": f"s3://{bucket}", "manifest": manifest, "keys": keys,
            "cmd": cmd, "stderr": r.stderr}


def test_build_into_bucket(s3_shards):
    m, out = s3_shards["manifest"], s3_shards["out"]
    c = m["counts"]
    assert c["images_found"] == 7 and c["images_corrupt"] == 1 and c["images_too_small"] == 1
    assert c["patches_dropped"]["flat"] > 0  # the synthetic photographs have flat regions
    assert [Path(e["path"]).name for e in m["skipped_images"]["corrupt"]] == ["broken.jpg"]
    assert m["num_samples"] == len(s3_shards["keys"]) == c["patches_kept"] > 0
    names = objects(s3_shards["bucket"])
    for s in m["shards"]:
        assert names[f"pre/{s['name']}"] == s["bytes"] and f"pre/{s['index']}" in names
    assert not [n for n in names if ".tmp" in n]
    # the index on S3 describes the shard on S3
    first = m["shards"][0]
    index = parse_index(s3.read_bytes(f"{out}/{first['index']}").decode())
    key, comps = next(iter(index.items()))
    off, size = comps["jpg"]
    with Image.open(io.BytesIO(s3.read_bytes(f"{out}/{first['name']}", off, size))) as im:
        assert im.size == (64, 64)
    # re-running on the same output changes nothing
    before = {n: s for n, s in names.items()}
    r = subprocess.run(s3_shards["cmd"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert objects(s3_shards["bucket"]) == before


def test_stream_from_s3(s3_shards):
    urls = [s3_shards["out"] + "/*.tar"]
    shards = expand_urls(urls)
    assert shards == [f"{s3_shards['out']}/{s['name']}" for s in s3_shards["manifest"]["shards"]]
    # two ranks: disjoint shares that cover the data set
    seen = []
    for rank in range(2):
        ld = loader(urls, rank=rank, world=2, seed=1)
        n = ld.share
        batches = [next(ld) for _ in range(-(-n // BATCH))]
        for b in batches:
            assert b["input"].shape == (BATCH, 3, CROP, CROP) and b["input"].dtype == torch.float32
            assert 0.0 <= float(b["input"].min()) and float(b["input"].max()) <= 1.0
            assert torch.allclose(b["mask"].mean(dim=(1, 2, 3)),
                                  torch.full((BATCH,), SPEC.altered_frac))
        keys = [k for b in batches for k in b["keys"]][:n]
        assert len(set(keys)) == n
        seen.append(set(keys))
        ld.close()
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(s3_shards["keys"])
    # save / restore of the reader state over S3
    a = loader(urls, seed=9)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = loader(urls, seed=9)
    b.load_state_dict(state)
    for w in want:
        got = next(b)
        assert got["keys"] == w["keys"] and torch.equal(got["input"], w["input"])
        assert torch.equal(got["target"], w["target"])
    a.close()
    b.close()


def test_corrupt_sample_in_s3_shard(s3_shards, s3_bucket):
    """Copy the shards to a fresh bucket with one JPEG overwritten inside its shard."""
    src = s3_shards["out"]
    dst = s3_bucket + "/pre"
    for s in s3_shards["manifest"]["shards"]:
        tar = s3.read_bytes(f"{src}/{s['name']}")
        idx = s3.read_bytes(f"{src}/{s['index']}")
        if s is s3_shards["manifest"]["shards"][0]:
            key, comps = list(parse_index(idx.decode()).items())[2]
            off, size = comps["jpg"]
            tar = tar[:off + 100] + b"\x00" * (size - 150) + tar[off + size - 50:]
            bad_key = key
        put_bytes(f"{dst}/{s['name']}", tar)
        put_bytes(f"{dst}/{s['index']}", idx)
    ld = loader([dst + "/"], seed=4)
    keys = []
    for _ in range(-(-ld.share // BATCH) + 1):
        keys += next(ld)["keys"]
    st = ld.stats()
    assert st["corrupt_skipped"] == 1 and st["corrupt_keys"] == [bad_key]
    assert bad_key not in keys
    ld.close()


def test_clear_errors(s3_shards, monkeypatch, tmp_path):
    bucket = s3_shards["bucket"]
    n = s3_shards["manifest"]["num_shards"]
    with pytest.raises(DataSourceError,
                       match=rf"shard not found: {bucket}/pre/shard-{n:06d}.tar \(and {99 - n} more\)"):
        loader([f"{bucket}/pre/shard-{{000000..000099}}.tar"])
    with pytest.raises(DataSourceError, match=r"no shard matches .*/pre/\*\.tgz"):
        expand_urls([f"{bucket}/pre/*.tgz"])
    with pytest.raises(DataSourceError, match="s3://no-such-bucket-x/a.tar.*bucket does not exist"):
        expand_urls(["s3://no-such-bucket-x/a.tar"])
    # an endpoint nobody listens on: retried for data.io_retry_s, then one error naming the URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DYNTRAIN_S3_RETRIES", "1")
    try:
        retry.set_bound(0)
        with pytest.raises(DataSourceError, match=r"s3://b-x/p/\*\.tar.*127.0.0.1:9 is unreachable"):
            expand_urls(["s3://b-x/p/*.tar"])
        retry.set_bound(2)
        before = retry.counters()["io_retries"]
        with pytest.raises(DataSourceError, match=r"s3://b-x/p/\*\.tar.*unreachable.*still failing after \d+ retries"):
            expand_urls(["s3://b-x/p/*.tar"])
        assert retry.counters()["io_retries"] > before
    finally:
        retry.set_bound(retry.DEFAULT_BOUND_S)
    # a server that checks credentials, asked with unknown ones
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        with pytest.raises(DataSourceError, match=r"s3://b-x/shard-0.tar.*rejected the credentials"):
            loader(["s3://b-x/shard-0.tar"])
        src = tmp_path / "src"
        write_synthetic_images(src, 1, size=(64, 64), seed=1)
        with pytest.raises(DataSourceError, match="s3://b-x/out.*rejected the credentials"):
            build_shards([src], "s3://b-x/out", ShardBuildConfig(patch_size=64), progress=False)
    finally:
        stop(proc)


def test_multipart_upload(s3_bucket, tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(17 * 1024 * 1024))  # above the 16 MiB multipart threshold
    url = s3_bucket + "/big.tar"
    s3.upload_file(big, url)
    head = s3.head(url)
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert s3.read_bytes(url, 5, 10) == big.read_bytes()[5:15]
