"""The DALI pre-training loader on local shards: batch contract, regions and degradations, rank
sharding, exact resume, corrupt samples inside a shard, clear errors."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.config import ConfigError, load_config
from dyntrain.data.pretrain.degrade import DegradeSpec, batch_params, region_masks
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader, build_pretrain_loader
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.shards.writer import ShardBuildConfig, build_shards
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.data.shards.wds import parse_index

CROP, BLOCK, BATCH = 32, 8, 4
SPEC = DegradeSpec(crop_size=CROP, region_block=BLOCK)


def make_loader(urls, rank=0, world=1, seed=0, shuffle=16, **kw) -> DaliPretrainLoader:
    return DaliPretrainLoader(urls, kw.pop("spec", SPEC), kw.pop("batch", BATCH), rank=rank,
                              world_size=world, device=kw.pop("device", "cpu"), seed=seed,
                              num_threads=2, prefetch=2, shuffle_buffer=shuffle, **kw)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in ("input", "target", "mask"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("pipeline")
    write_synthetic_images(base / "images", 6, size=(192, 256), seed=11)
    manifest = build_shards([base / "images"], str(base / "shards"),
                            ShardBuildConfig(patch_size=64, shard_samples=16, workers=2),
                            progress=False)
    keys = [json.loads(line)["key"] for line in (base / "shards" / "patches.jsonl").read_text().splitlines()]
    return {"dir": base / "shards", "urls": [str(base / "shards" / "*.tar")],
            "manifest": manifest, "keys": keys}


def stored_patch(shard_dir: Path, key: str) -> np.ndarray:
    for idx in shard_dir.glob("*.idx"):
        comps = parse_index(idx.read_text()).get(key)
        if comps:
            off, size = comps["jpg"]
            data = idx.with_suffix(".tar").read_bytes()[off:off + size]
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    raise KeyError(key)


def test_batches_follow_the_contract(shards):
    loader = make_loader(shards["urls"], seed=3)
    assert loader.total_samples == shards["manifest"]["num_samples"] == len(shards["keys"])
    kinds_seen = set()
    for it in range(6):
        b = next(loader)
        for name in ("input", "target"):
            x = b[name]
            assert x.shape == (BATCH, 3, CROP, CROP) and x.dtype == torch.float32
            assert x.device.type == "cpu" and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert b["mask"].shape == (BATCH, 1, CROP, CROP)
        assert set(b["mask"].unique().tolist()) <= {0.0, 1.0}
        assert len(b["keys"]) == BATCH and set(b["keys"]) <= set(shards["keys"])
        # the altered fraction of every input is the configured total, at block granularity
        altered = b["mask"].mean(dim=(1, 2, 3))
        assert torch.allclose(altered, torch.full((BATCH,), SPEC.altered_frac))
        assert abs(SPEC.altered_frac - (SPEC.degrade_frac + SPEC.mask_frac)) <= 1 / 16
        # regions and kinds are the pure function of (seed, rank, batch index)
        params = batch_params(SPEC, 3, 0, it, BATCH)
        gen = torch.Generator().manual_seed(params["region_seed"])
        deg, msk = region_masks(SPEC, BATCH, gen, torch.device("cpu"))
        assert torch.equal(b["mask"].bool(), deg | msk)
        inp, tgt = b["input"], b["target"]
        assert torch.all(inp.masked_select(msk) == 0)  # masked pixels are black
        keep = ~(deg | msk)
        assert torch.equal(inp.masked_select(keep.expand_as(inp)), tgt.masked_select(keep.expand_as(tgt)))
        for i in range(BATCH):
            region = deg[i].expand(3, -1, -1)
            diff = (inp[i] - tgt[i])[region]
            kind = SPEC.kinds[int(params["kind"][i])]
            kinds_seen.add(kind)
            assert float(diff.abs().max()) > 0, (kind, it, i)  # the degraded region changed
            if kind == "gaussian":
                sigma = float(params["sigma"][i]) / 255
                assert 0.5 * sigma < float(diff.std()) < 1.3 * sigma
            if kind == "random":
                px = inp[i][:, deg[i][0]]  # (3, pixels) of the degraded region
                black_white = ((px == 0).all(0) | (px == 1).all(0)).float().mean()
                assert float(black_white) == pytest.approx(float(params["sp_frac"][i]), abs=0.12)
        # the target is a crop of the stored patch of that key
        for i in range(BATCH):
            patch = stored_patch(shards["dir"], b["keys"][i]).astype(np.int16)
            crop = (tgt[i].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
            best = min(np.abs(patch[y:y + CROP, x:x + CROP] - crop).max()
                       for y in range(64 - CROP + 1) for x in range(64 - CROP + 1))
            assert best <= 2
    assert kinds_seen == {"jpeg", "gaussian", "random"}
    stats = loader.stats()
    assert stats["samples"] == 6 * BATCH and stats["corrupt_skipped"] == 0 and stats["epoch"] == 0
    loader.close()


def test_two_ranks_read_disjoint_shares(shards):
    seen = []
    for rank in range(2):
        loader = make_loader(shards["urls"], rank=rank, world=2, seed=5)
        n = loader.share
        keys = [k for _ in range(-(-n // BATCH)) for k in next(loader)["keys"]][:n]
        assert len(set(keys)) == n  # one epoch of a rank: each of its samples once
        seen.append(set(keys))
        loader.close()
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(shards["keys"])


def test_resume_reproduces_the_next_batches(shards):
    a = make_loader(shards["urls"], seed=7)
    epoch_batches = a.share // BATCH
    take(a, epoch_batches - 2)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    expected = take(a, 5)  # crosses the epoch boundary
    assert a.stats()["epoch"] == 1
    b = make_loader(shards["urls"], seed=7)
    next(b)  # a loader that already moved on is rewound too
    b.load_state_dict(state)
    for want in expected:
        assert same(next(b), want)
    assert b.stats()["samples"] == a.stats()["samples"]
    other = make_loader(shards["urls"], seed=8)
    with pytest.raises(DataSourceError, match="seed"):
        other.load_state_dict(state)
    for x in (a, b, other):
        x.close()


def corrupt_sample(shard_dir: Path, key: str) -> None:
    """Overwrite the JPEG of ``key`` inside its shard with garbage of the same length."""
    for idx in shard_dir.glob("*.idx"):
        comps = parse_index(idx.read_text()).get(key)
        if comps:
            off, size = comps["jpg"]
            tar = idx.with_suffix(".tar")
            data = bytearray(tar.read_bytes())
            garbage = (b"\x00garbage" * (size // 8 + 1))[: size - 300]
            data[off + 200: off + 200 + len(garbage)] = garbage
            tar.write_bytes(bytes(data))
            return
    raise KeyError(key)


def test_corrupt_sample_is_skipped_counted_and_replayed(shards, tmp_path):
    shard_dir = tmp_path / "shards"
    shutil.copytree(shards["dir"], shard_dir)
    bad_key = shards["keys"][5]
    corrupt_sample(shard_dir, bad_key)
    urls = [str(shard_dir / "shard-{000000..000003}.tar")]
    a = make_loader(urls, seed=2)
    states, batches = [], []
    for _ in range(2 * a.share // BATCH + 2):  # two epochs and a bit: the bad sample comes twice
        states.append(a.state_dict())
        batches.append(next(a))
    stats = a.stats()
    assert stats["corrupt_skipped"] == 2 and stats["corrupt_keys"] == [bad_key, bad_key]
    assert stats["epoch"] == 2 and stats["recoveries"] >= 2
    recovered = [i for i, b in enumerate(batches) if len(set(b["keys"])) < BATCH]
    assert len(recovered) == 2  # the bad slot holds a copy of a good sample of its batch
    assert all(bad_key not in b["keys"] for b in batches)
    for b in batches:
        assert torch.isfinite(b["input"]).all() and b["input"].shape[0] == BATCH
    # resuming just before a recovered batch replays it (and what follows) exactly
    i = recovered[0]
    b = make_loader(urls, seed=2)
    b.load_state_dict(states[i])
    for want in batches[i:i + 3]:
        assert same(next(b), want)
    assert b.stats()["corrupt_skipped"] == 1
    a.close()
    b.close()


def test_missing_shards_and_indices(shards, tmp_path):
    missing = tmp_path / "nowhere" / "shard-{000000..000001}.tar"
    with pytest.raises(DataSourceError, match="shard-000000.tar"):
        make_loader([str(missing)])
    # a shard without its index still works (DALI indexes it itself), with a warning
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(shards["dir"] / "shard-000000.tar", lone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader([str(lone / "shard-000000.tar")], shuffle=0)
    assert any("index" in str(w.message) for w in caught)
    assert next(loader)["input"].shape == (BATCH, 3, CROP, CROP)
    loader.close()
    with pytest.raises(DataSourceError, match="smaller than data.crop_size 128"):
        make_loader(shards["urls"], spec=DegradeSpec(crop_size=128))


def test_build_pretrain_loader_from_config(shards):
    cfg = load_config(None, [f"data.train_urls=[{shards['urls'][0]}]", f"data.crop_size={CROP}",
                             "data.region_block=8", "data.micro_batch_size=2", "data.num_threads=1",
                             "data.shuffle_buffer=8", "data.degradations=[gaussian]", "run.seed=4"])
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    b = next(loader)
    assert b["input"].shape == (2, 3, CROP, CROP)
    assert set(loader.stats()) >= {"samples", "corrupt_skipped", "epoch"}
    loader.close()
    bad = load_config(None, ["data.source=paired", "data.root=x"])
    with pytest.raises(ConfigError, match="data.source"):
        build_pretrain_loader(bad, 0, 1, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_decode_on_gpu(shards, tmp_path):
    """nvJPEG decoding: same samples and crops as the CPU loader, batches on the GPU, corrupt
    samples recovered the same way."""
    shard_dir = tmp_path / "shards"
    shutil.copytree(shards["dir"], shard_dir)
    bad_key = shards["keys"][3]
    corrupt_sample(shard_dir, bad_key)
    urls = [str(shard_dir / "*.tar")]
    gpu = make_loader(urls, seed=3, device="cuda", decode="mixed")
    cpu = make_loader(urls, seed=3)
    assert gpu.decode == "mixed" and cpu.decode == "cpu"
    for _ in range(cpu.share // BATCH + 1):
        g, c = next(gpu), next(cpu)
        assert g["input"].device.type == "cuda" and g["target"].device.type == "cuda"
        assert g["keys"] == c["keys"]
        assert float((g["target"].cpu() - c["target"]).abs().max()) <= 4 / 255
        assert torch.equal(g["mask"].cpu(), c["mask"])
    assert gpu.stats()["corrupt_keys"] == cpu.stats()["corrupt_keys"] == [bad_key]
    state = gpu.state_dict()
    want = next(gpu)
    again = make_loader(urls, seed=3, device="cuda", decode="mixed")
    again.load_state_dict(state)
    got = next(again)
    assert got["keys"] == want["keys"] and torch.equal(got["input"], want["input"])
