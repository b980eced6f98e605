"""Paired fine-tuning data: layouts and pairing rules, mixing, paired crops, noise, exact resume."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.config import load_config
from dyntrain.data.finetune.paired import build_finetune_loader
from dyntrain.data.finetune.base import PairedDataError, dihedral, haze_clean_stem, mix, scan_tasks
from dyntrain.data.synthetic import make_demo_data
from helpers import assert_resumes_exactly


def _save(arr, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _textured(rng, h=40, w=48):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def layout(tmp_path):
    """All three layouts; rainy = gt // 2 + 7 and hazy = 255 - clean, so pairs can be checked pixelwise."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for i in range(4):
        _save(np.full((40, 48, 3), 128, np.uint8), root / "Denoise" / "bsd" / f"grey{i}.png")
        gt = _textured(rng)
        _save(gt, root / "Derain" / "gt" / f"norain-{i}.png")
        _save(gt // 2 + 7, root / "Derain" / "rainy" / f"rain-{i}.png")
        clean = _textured(rng)
        _save(clean, root / "Dehaze" / "original" / f"{i:04d}.png")
        _save(255 - clean, root / "Dehaze" / "synthetic" / "part1" / f"{i:04d}_0.8_0.2.png")
    return root


def _cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "data.source=paired", "data.crop_size=16",
                              "data.micro_batch_size=4", "data.num_threads=0", *extra])


def test_layouts_pairing_rules_and_repetition(layout):
    assert haze_clean_stem("0001_0.8_0.2.jpg") == "0001"
    per = scan_tasks(layout, {"denoise": 1, "derain": 3, "dehaze": 1}, [15, 25, 50])
    assert len(per["denoise"]) == 12 and {e.sigma for e in per["denoise"]} == {15, 25, 50}
    assert all(e.input_path == e.target_path for e in per["denoise"])
    assert {Path(e.target_path).name for e in per["derain"]} == {f"norain-{i}.png" for i in range(4)}
    assert all(Path(e.target_path).name == Path(e.input_path).name.split("_")[0] + ".png" for e in per["dehaze"])
    mixed = mix(per, {"denoise": 1, "derain": 3, "dehaze": 1})
    assert Counter(e.task for e in mixed) == {"denoise": 12, "derain": 12, "dehaze": 4}
    single = scan_tasks(layout, {"denoise": 0, "derain": 1, "dehaze": 0}, [15])
    assert list(single) == ["derain"]


def test_missing_folders_and_files_are_named(layout, tmp_path):
    with pytest.raises(PairedDataError, match="data.root"):
        scan_tasks(None, {"derain": 1}, [15])
    with pytest.raises(PairedDataError, match="Dehaze"):
        scan_tasks(tmp_path / "train" / "Derain", {"dehaze": 1}, [15])
    (layout / "Dehaze" / "original" / "0002.png").unlink()
    with pytest.raises(PairedDataError, match="0002_0.8_0.2.png"):
        scan_tasks(layout, {"dehaze": 1}, [15])
    with pytest.raises(PairedDataError, match="unknown tasks"):
        scan_tasks(layout, {"deblur": 1}, [15])


def test_same_crop_and_flip_on_both_images_and_uint8_noise(layout):
    loader = build_finetune_loader(_cfg(layout), rank=0, world_size=1, device="cpu")
    seen = Counter()
    ops = set()
    for _ in range(12):
        batch = next(loader)
        assert batch["input"].shape == batch["target"].shape == (4, 3, 16, 16)
        assert batch["input"].dtype == torch.float32 and len(batch["keys"]) == 4
        for i, key in enumerate(batch["keys"]):
            task = key.split("/")[0]
            seen[task] += 1
            x, y = (batch["input"][i] * 255).round(), (batch["target"][i] * 255).round()
            if task == "derain":
                assert torch.equal(x, torch.div(y, 2, rounding_mode="floor") + 7)
            elif task == "dehaze":
                assert torch.equal(x, 255 - y)
            else:
                sigma = float(key.rsplit("/s", 1)[1])
                assert torch.equal(y, torch.full_like(y, 128.0))
                assert torch.allclose(batch["input"][i] * 255, x, atol=1e-3)  # uint8 values
                assert abs((x - 128).std().item() - sigma) < 0.35 * sigma
            if task != "denoise":  # the crop is a real crop of the file under one of the 8 symmetries
                name = key.split("/")[-1]
                src = np.asarray(Image.open(
                    layout / "Derain" / "gt" / f"no{name}.png" if task == "derain"
                    else next((layout / "Dehaze" / "original").glob(name.split("_")[0] + ".*"))))
                crop = y.permute(1, 2, 0).numpy().astype(np.uint8)
                found = [op for op in range(8) for t in range(25) for l in range(33)
                         if np.array_equal(dihedral(src[t:t + 16, l:l + 16], op), crop)]
                assert found, key
                ops.add(found[0])
    assert set(seen) == {"denoise", "derain", "dehaze"}
    assert len(ops) >= 3  # flips/rotations do vary
    stats = loader.stats()
    assert stats["samples"] == 48 and stats["corrupt_skipped"] == 0 and stats["epoch"] >= 1
    loader.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_deterministic_and_exact_resume(layout, workers):
    cfg = _cfg(layout, f"data.num_threads={workers}")
    a = build_finetune_loader(cfg, 0, 1, "cpu")
    first = [next(a) for _ in range(7)]  # crosses an epoch boundary (20 entries, 4 per batch)
    state = assert_resumes_exactly(lambda: build_finetune_loader(cfg, 0, 1, "cpu"), first, 3, samples=28)
    other = build_finetune_loader(_cfg(layout, "run.seed=1"), 0, 1, "cpu")
    assert [next(other)["keys"] for _ in range(3)] != [f["keys"] for f in first[:3]]
    with pytest.raises(PairedDataError, match="world_size"):
        build_finetune_loader(cfg, 0, 2, "cpu").load_state_dict(state)
    for loader in (a, other):
        loader.close()


def test_ranks_read_disjoint_parts_of_each_epoch(layout):
    cfg = _cfg(layout, "data.tasks={denoise: 0, derain: 1, dehaze: 1}", "data.micro_batch_size=2")
    keys = []
    for rank in range(2):
        loader = build_finetune_loader(cfg, rank, 2, "cpu")
        keys.append([k for _ in range(2) for k in next(loader)["keys"]])  # one epoch: 8 entries / 2 ranks
        loader.close()
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 8


def test_unreadable_file_is_counted_and_replaced(layout):
    (layout / "Derain" / "rainy" / "rain-1.png").write_bytes(b"not a png")
    cfg = _cfg(layout, "data.tasks={denoise: 0, derain: 1, dehaze: 0}", "data.micro_batch_size=2")
    loader = build_finetune_loader(cfg, 0, 1, "cpu")
    keys = [k for _ in range(4) for k in next(loader)["keys"]]
    assert loader.stats()["corrupt_skipped"] == 2 and "derain/rain-1" not in keys
    loader.close()


def test_demo_data_has_every_layout(tmp_path):
    sets = make_demo_data(tmp_path / "demo", train_images=2, test_images=1)
    per = scan_tasks(tmp_path / "demo" / "train", {"denoise": 1, "derain": 1, "dehaze": 1}, [15])
    assert {k: len(v) for k, v in per.items()} == {"denoise": 2, "derain": 2, "dehaze": 4}
    assert set(sets) == {"bsd68", "rain100l", "sots"} and all(Path(p).is_dir() for p in sets.values())
