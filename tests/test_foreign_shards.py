"""A WebDataset shard set made by another tool (tars written with Python's tarfile in the webdataset
layout: no manifest, no DALI index) is given a manifest by ``make_shards manifest``, and a local folder
with a manifest then takes the manifest and window path (window.py) as s3:// does: the same batches as
the loader that lists the folder and opens every shard."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from helpers import same_batch
from PIL import Image

from dyntrain.data.pretrain import window
from dyntrain.data.pretrain.degrade import DegradeSpec
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader
from dyntrain.data.shards.build import main as make_shards
from dyntrain.data.storage.s3 import DataSourceError


SHARDS, PER_SHARD, BATCH = 12, 5, 4
SPEC = DegradeSpec(crop_size=32, region_block=8)


def foreign_shard(path, first: int, n: int, json_too: bool = True) -> None:
    """img2dataset's layout: <key>.jpg, <key>.txt, <key>.json per sample, written by tarfile."""
    rng = np.random.default_rng(first)
    with tarfile.open(path, "w") as tf:
        for k in range(first, first + n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            parts = [("jpg", buf.getvalue()), ("txt", b"a caption")]
            if json_too:
                parts.append(("json", json.dumps({"key": f"{k:09d}"}).encode()))
            for ext, payload in parts:
                info = tarfile.TarInfo(f"{k:09d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def loader(urls, rank, world, windowed, monkeypatch) -> DaliPretrainLoader:
    monkeypatch.setattr(window, "MIN_SHARDS", 4 if windowed else 10**9)
    return DaliPretrainLoader(urls, SPEC, BATCH, rank=rank, world_size=world, device="cpu", seed=1,
                              num_threads=1, prefetch=2, shuffle_buffer=4)


def test_manifest_command_then_the_window_reads_a_local_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    for i in range(SHARDS):
        foreign_shard(folder / f"{i:05d}.tar", i * PER_SHARD, PER_SHARD)
    assert make_shards(["manifest", "--out", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_shards"] == SHARDS and out["num_samples"] == SHARDS * PER_SHARD
    assert out["indices_made"] == SHARDS and not out["up_to_date"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [PER_SHARD] * SHARDS
    assert all((folder / f"{i:05d}.idx").is_file() for i in range(SHARDS))
    assert make_shards(["manifest", "--out", str(folder)]) == 0        # once: a second run does nothing
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["up_to_date"]

    steps = SHARDS * PER_SHARD // 2 // BATCH + 3                       # past the end of the share
    for entry in (str(folder), f"{folder}/*.tar"):
        old = loader([entry], 1, 2, False, monkeypatch)
        try:
            want = [next(old) for _ in range(steps)]
        finally:
            old.close()
        monkeypatch.setattr(window, "expand_urls", lambda *a, **k: pytest.fail("listed the folder"))
        new = loader([entry], 1, 2, True, monkeypatch)
        try:
            assert new._window is not None and new._window.real   # the manifest path, a window
            for w in want:
                same_batch(next(new), w)
        finally:
            new.close()
        monkeypatch.undo()


def test_manifest_command_refuses_samples_the_reader_would_skip(tmp_path):
    folder = tmp_path / "nojson"
    folder.mkdir()
    foreign_shard(folder / "00000.tar", 0, 3, json_too=False)
    with pytest.raises(DataSourceError, match=r"00000\.idx: sample '000000000'.*needs an image"):
        make_shards(["manifest", "--out", str(folder)])
    assert not (folder / "manifest.json").exists()
