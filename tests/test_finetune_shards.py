"""Paired WebDataset shards: pack the task folders, read them back through DALI (data.source=paired_shards)."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.config import load_config
from dyntrain.data.finetune.paired import build_finetune_loader
from dyntrain.data.finetune.base import PairedDataError, dihedral
from dyntrain.data.finetune.paired_shards import pack_paired_shards
from helpers import assert_resumes_exactly


def _save(arr, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Layouts whose pairs can be checked pixelwise (rainy = gt // 2 + 7, hazy = 255 - clean), packed."""
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("packed")
    root = tmp / "train"
    for i in range(5):
        _save(np.full((40, 48, 3), 128, np.uint8), root / "Denoise" / f"grey{i}.png")
        gt = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        _save(gt, root / "Derain" / "gt" / f"norain-{i}.png")
        _save(gt // 2 + 7, root / "Derain" / "rainy" / f"rain-{i}.png")
        clean = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
        _save(clean, root / "Dehaze" / "original" / f"{i:04d}.png")
        _save(255 - clean, root / "Dehaze" / "synthetic" / f"{i:04d}_0.8_0.2.png")
    manifest = pack_paired_shards(root, str(tmp / "shards"), shard_samples=2, progress=False)
    return root, tmp / "shards", manifest


def _cfg(shards, *extra):
    return load_config(None, ["data.source=paired_shards", f"data.train_urls=[{shards}]", "data.crop_size=16",
                              "data.micro_batch_size=4", "data.num_threads=1", "data.shuffle_buffer=8", *extra])


def test_pack_writes_paired_samples_indices_and_manifest(packed):
    root, shards, manifest = packed
    assert {t: v["samples"] for t, v in manifest["tasks"].items()} == {"denoise": 5, "derain": 5, "dehaze": 5}
    assert json.loads((shards / "manifest.json").read_text())["tasks"]["derain"]["shards"][0]["name"] == "derain-000000.tar"
    with tarfile.open(shards / "derain-000000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("derain_0000000.json").read())
    assert names[:3] == ["derain_0000000.input.png", "derain_0000000.target.png", "derain_0000000.json"]
    assert meta == {"task": "derain", "key": "derain/rain-0", "input": "Derain/rainy/rain-0.png",
                    "target": "Derain/gt/norain-0.png"}
    assert all((shards / n.replace(".tar", ".idx")).is_file() for n in (p.name for p in shards.glob("*.tar")))
    assert (shards / "denoise-000000.idx").read_text().startswith("v1.2 2\n")


def test_dali_reads_consistent_pairs_with_noise_and_resumes_exactly(packed):
    root, shards, _ = packed
    cfg = _cfg(shards)
    loader = build_finetune_loader(cfg, 0, 1, "cpu")
    batches = [next(loader) for _ in range(6)]
    tasks, ops = set(), set()
    for batch in batches:
        assert batch["input"].shape == batch["target"].shape == (4, 3, 16, 16)
        for i, key in enumerate(batch["keys"]):
            task = key.split("/")[0]
            tasks.add(task)
            x, y = (batch["input"][i] * 255).round(), (batch["target"][i] * 255).round()
            if task == "derain":
                assert torch.equal(x, torch.div(y, 2, rounding_mode="floor") + 7), key
                src = np.asarray(Image.open(root / "Derain" / "gt" / f"no{key.split('/')[1]}.png"))
                crop = y.permute(1, 2, 0).numpy().astype(np.uint8)
                found = [op for op in range(8) for t in range(25) for l in range(33)
                         if np.array_equal(dihedral(src[t:t + 16, l:l + 16], op), crop)]
                assert found, key
                ops.add(found[0])
            elif task == "dehaze":
                assert torch.equal(x, 255 - y), key
            else:
                sigma = float(key.rsplit("/s", 1)[1])
                assert sigma in (15, 25, 50) and torch.equal(y, torch.full_like(y, 128.0))
                assert abs((x - 128).std().item() - sigma) < 0.35 * sigma
    assert tasks == {"denoise", "derain", "dehaze"} and len(ops) >= 2
    assert_resumes_exactly(lambda: build_finetune_loader(cfg, 0, 1, "cpu"), batches, 2, samples=24)
    loader.close()


def test_repetition_ranks_and_errors(packed):
    _, shards, _ = packed
    cfg = _cfg(shards, "data.tasks={denoise: 0, derain: 3, dehaze: 1}")
    seen = []
    for rank in range(2):
        loader = build_finetune_loader(cfg, rank, 2, "cpu")
        seen.append([k for _ in range(2) for k in next(loader)["keys"]])  # 8 of the rank's 10 per epoch
        loader.close()
    counts = {t: sum(k.startswith(t) for ks in seen for k in ks) for t in ("derain", "dehaze")}
    assert counts["derain"] > counts["dehaze"]  # 15 derain vs 5 dehaze samples per epoch
    with pytest.raises(PairedDataError, match="pack the task folders first"):
        build_finetune_loader(_cfg(shards.parent / "nowhere"), 0, 1, "cpu")


@pytest.mark.slow
def test_pack_to_s3_and_stream_pairs_from_s3(packed, s3_bucket):
    """The same DALI path at scale: shards packed into a bucket of a real S3 server and read from s3://."""
    import subprocess
    import sys

    import boto3

    root, _, _ = packed
    prefix = f"{s3_bucket}/paired"
    proc = subprocess.run([sys.executable, "-m", "dyntrain.data.finetune.paired", "pack", "--root", str(root), "--out", prefix,
                           "--shard-samples", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data.train_urls=[{prefix}]" in proc.stdout
    bucket = s3_bucket[len("s3://"):]
    names = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"paired/manifest.json", "paired/derain-000000.tar", "paired/derain-000000.idx"} <= names

    cfg = _cfg(prefix, "data.tasks={denoise: 0, derain: 1, dehaze: 1}", "data.micro_batch_size=2")
    keys = []
    for rank in range(2):
        loader = build_finetune_loader(cfg, rank, 2, "cpu")
        batches = [next(loader) for _ in range(2)]  # 4 of the rank's 5 samples
        for batch in batches:
            for i, key in enumerate(batch["keys"]):
                x, y = (batch["input"][i] * 255).round(), (batch["target"][i] * 255).round()
                expect = torch.div(y, 2, rounding_mode="floor") + 7 if key.startswith("derain") else 255 - y
                assert torch.equal(x, expect), key
        keys.append({k for b in batches for k in b["keys"]})
        state = loader.state_dict()
        want = next(loader)
        loader.close()
        resumed = build_finetune_loader(cfg, rank, 2, "cpu")
        resumed.load_state_dict(state)
        got = next(resumed)
        assert got["keys"] == want["keys"] and torch.equal(got["input"], want["input"])
        resumed.close()
    assert not keys[0] & keys[1]  # each rank streams its own share
    with pytest.raises(PairedDataError, match="paired-missing"):
        build_finetune_loader(_cfg(f"{s3_bucket}/paired-missing"), 0, 1, "cpu")


def _corrupt(shard_dir: Path, key: str, component: str) -> None:
    """Overwrite the middle of one image of ``key`` inside its shard with garbage of the same length
    (the tar and its index stay valid: only the image no longer decodes)."""
    from dyntrain.data.shards.wds import parse_index

    for idx in shard_dir.glob("*.idx"):
        comps = parse_index(idx.read_text()).get(key)
        if comps:
            off, size = comps[component]
            tar = idx.with_suffix(".tar")
            data = bytearray(tar.read_bytes())
            data[off + 40: off + size - 20] = (b"\x00garbage" * size)[: size - 60]
            tar.write_bytes(bytes(data))
            return
    raise KeyError(key)


def test_corrupt_pair_is_skipped_counted_named_and_resumes_exactly(packed, tmp_path):
    """A pair whose target no longer decodes (damaged after packing): the batch is replayed without
    it, its slot holds a copy of a good pair, it is counted and named; every other batch is what the
    undamaged shards give, and a resume just before a recovered batch replays it exactly."""
    import shutil

    from helpers import same_batch

    _, shards, _ = packed
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    _corrupt(damaged, "derain_0000001", "target.png")
    extra = ("data.tasks={denoise: 0, derain: 1, dehaze: 0}", "data.micro_batch_size=2")
    cfg = _cfg(damaged, *extra)
    loader = build_finetune_loader(cfg, 0, 1, "cpu")
    states, batches = [], []
    for _ in range(6):  # 12 samples: the 5 derain pairs twice and a bit, so the bad one comes twice
        states.append(loader.state_dict())
        batches.append(next(loader))
    stats = loader.stats()
    loader.close()
    assert stats["corrupt_skipped"] == 2 and stats["corrupt_keys"] == ["derain/rain-1"] * 2, stats
    assert all("derain/rain-1" not in b["keys"] for b in batches)
    recovered = [i for i, b in enumerate(batches) if len(set(b["keys"])) < 2]
    assert len(recovered) == 2, [b["keys"] for b in batches]
    for b in batches:
        for i, key in enumerate(b["keys"]):  # a copied slot is still a consistent pair
            x, y = (b["input"][i] * 255).round(), (b["target"][i] * 255).round()
            assert torch.equal(x, torch.div(y, 2, rounding_mode="floor") + 7), key
    clean = build_finetune_loader(_cfg(shards, *extra), 0, 1, "cpu")
    for i in range(6):
        want = next(clean)
        if i not in recovered:
            same_batch(batches[i], want)
    clean.close()
    resumed = build_finetune_loader(cfg, 0, 1, "cpu")
    resumed.load_state_dict(states[recovered[0]])
    for want in batches[recovered[0]:]:
        same_batch(next(resumed), want)
    assert resumed.stats()["corrupt_skipped"] == 2
    resumed.close()
