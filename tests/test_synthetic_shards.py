"""The shards form of the synthetic fine-tuning source: clean patches from pre-training shards
(built by launch/make_shards.py; local and s3://) through the DALI reader, JPEG inside the DALI
pipeline (quality recovered by an independent libjpeg estimate), the other tasks exactly as the
torch degradations, exact resume mid-stream, the config dispatch and its errors."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.config import load_config
from dyntrain.data.finetune.tasks import TaskCurriculum
from dyntrain.data.finetune.degradations import DegradationError, degrade
from dyntrain.data.finetune.degradations.compress import jpeg_bytes
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.data.finetune.synthetic_pairs import build_synthetic_loader, clean_form
from dyntrain.data.finetune.synthetic_shards import ShardCleanLoader

ROOT = Path(__file__).resolve().parents[1]
CROP, BATCH = 32, 4
TASKS = {"jpeg": 2, "noise": 1, "haze": 1, "lowlight": 1, "blur": 1}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("clean_shards")
    write_synthetic_images(base / "images", 3, size=(128, 128), seed=7)
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(base / "images"),
                        "--out", str(base / "shards"), "--patch-size", "64", "--shard-samples", "5",
                        "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return base / "shards"


def loader(urls, seed=0, accum=1, tasks=TASKS) -> ShardCleanLoader:
    return ShardCleanLoader(urls, TaskCurriculum(seed, tasks), "in", CROP, BATCH, seed, 0, 1, accum,
                            "cpu", num_threads=1, prefetch=1, shuffle_buffer=8)


def same(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and a["tasks"] == b["tasks"] and \
        torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])


def libjpeg_qualities(clean: np.ndarray, lq: np.ndarray) -> list[int]:
    """Every IJG quality whose libjpeg encode/decode of ``clean`` (Pillow) gives exactly ``lq``."""
    out = []
    for q in range(1, 101):
        with Image.open(io.BytesIO(jpeg_bytes(clean, q))) as f:
            if np.array_equal(np.asarray(f.convert("RGB")), lq):
                out.append(q)
    return out


def test_tasks_jpeg_in_dali_and_torch_degradations(shard_dir):
    src = loader([str(shard_dir / "shard-{000000..000001}.tar")])
    assert len(src.shards) == 2
    seen_jpeg = 0
    for _ in range(4):
        b = next(src)
        _, tasks, params = src.draw(src.iteration - 1)
        assert b["tasks"] == tasks and set(tasks) <= set(TASKS)
        assert b["input"].shape == b["target"].shape == (BATCH, 3, CROP, CROP)
        clean = (b["target"] * 255).round()
        lq = (b["input"] * 255).round()
        for i, (task, p) in enumerate(zip(tasks, params)):
            if task == "jpeg":   # made by fn.jpeg_compression_distortion inside the pipeline
                found = libjpeg_qualities(clean[i].permute(1, 2, 0).to(torch.uint8).numpy(),
                                          lq[i].permute(1, 2, 0).to(torch.uint8).numpy())
                assert int(p["quality"]) in found and len(found) < 30, (p, found)
                seen_jpeg += 1
            else:                # the torch degradation on the training device, same parameters
                ref = degrade(clean[i:i + 1], [task], [p])
                assert torch.equal(lq[i:i + 1], ref), task
    assert seen_jpeg >= 2
    stats = src.stats()
    assert stats["batches"] == 4 and sum(v for k, v in stats.items() if k.startswith("samples_")) == 16
    assert stats["depth_proxy"] == stats.get("samples_haze", 0)


def test_resume_mid_stream_and_s3_gives_the_same_batches(shard_dir, s3_bucket):
    urls = [str(shard_dir / "*.tar")]
    first = loader(urls, accum=2)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    want = [next(first) for _ in range(3)]            # crosses an epoch boundary (few patches)
    second = loader(urls, accum=2)
    second.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(want, [next(second) for _ in range(3)]))
    assert second.stats()["samples_jpeg"] == first.stats()["samples_jpeg"]
    with pytest.raises(Exception, match="cannot be resumed exactly"):
        loader(urls, accum=1).load_state_dict(state)

    client, bucket = boto3.client("s3"), s3_bucket[len("s3://"):]
    for f in shard_dir.iterdir():
        client.upload_file(str(f), bucket, f"clean/{f.name}")
    cfg = load_config(None, overrides=["data.source=synthetic", f"data.clean_urls=[{s3_bucket}/clean/*.tar]",
                                       f"data.tasks={TASKS}", f"data.crop_size={CROP}", "data.num_threads=1",
                                       f"data.micro_batch_size={BATCH}", "data.shuffle_buffer=8",
                                       "data.prefetch=1", "deepspeed.global_batch_size=8"])
    remote = build_synthetic_loader(cfg, 0, 1, "cpu")
    assert isinstance(remote, ShardCleanLoader) and remote.shards[0].startswith("s3://")
    local = loader(urls, accum=2)
    assert all(same(next(local), next(remote)) for _ in range(2))


def test_clean_urls_forms(shard_dir, tmp_path):
    assert clean_form([str(shard_dir)]) == clean_form(["s3://b/p/*.tar"]) == "shards"
    assert clean_form([str(tmp_path)]) == "folders"
    with pytest.raises(DegradationError, match="mixes shards"):
        clean_form([str(shard_dir / "*.tar"), str(tmp_path)])
    with pytest.raises(DegradationError, match="data.clean_urls"):
        clean_form([])
