"""De-duplication across parts: resized (0.5x, 0.75x), re-encoded (JPEG q70) and pixel-identical
copies are dropped, one image kept per group by the stated rule, before the holdout split; crops of
the same scene shifted by 1/8 of the width are kept."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dyntrain.data.shards.build import main
from dyntrain.data.shards.dedup import near_pairs, phash
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.synthetic import synthetic_image


def save(img: np.ndarray, path: Path, **kw) -> str:
    Image.fromarray(img).save(path, **kw)
    return path.name


def resized(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.LANCZOS))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of originals, their copies and look-alikes; copy name -> the original kept."""
    src = tmp_path_factory.mktemp("dedup_src")
    scenes = [synthetic_image(np.random.default_rng([21, i]), 384, 576) for i in range(5)]
    origs = [s[:, :512] for s in scenes]
    for i, img in enumerate(origs):
        save(img, src / f"orig{i}.png")
    # look-alikes: the same scene, crop shifted by 64 px (1/8): distinct images, kept
    save(scenes[0][:, 64:], src / "orig0_shifted.png")
    save(scenes[3][:, 64:], src / "orig3_shifted.png")
    # resized copies sort before their original (the rule keeps the most pixels); same-size copies
    # after it (ties keep the earliest)
    twins = {
        save(resized(origs[0], 0.5), src / "a_half.jpg", quality=95): "orig0.png",
        save(resized(origs[1], 0.75), src / "a_three_quarter.png"): "orig1.png",
        save(origs[2], src / "z_q70.jpg", quality=70): "orig2.png",
        save(origs[4], src / "z_same_pixels.bmp"): "orig4.png",
    }
    return src, twins


def test_phash_threshold_pairs():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=200, dtype=np.uint64)
    h[7] = h[3] ^ np.uint64(0b1011011)      # 5 bits apart: a pair
    h[9] = h[3] ^ np.uint64(0b1111111)      # 7 bits: not within 6
    pairs = near_pairs(h, 6)
    assert (3, 7) in pairs and (3, 9) not in pairs and (7, 9) in pairs  # 7 ^ 9 differ in 2 bits
    brute = {(i, j) for i in range(200) for j in range(i + 1, 200)
             if bin(int(h[i]) ^ int(h[j])).count("1") <= 6}
    assert pairs == brute
    img = synthetic_image(np.random.default_rng(1), 256, 256)
    assert phash(img) == phash(img.copy())


def test_dedup_across_parts_before_holdout(source, tmp_path):
    src, twins = source
    out, val = tmp_path / "train", tmp_path / "val"
    common = ["--src", str(src), "--out", str(out), "--quiet", "--workers", "1"]
    for i in range(3):
        assert main(["index", *common, "--part", f"{i}/3"]) == 0
    index1 = out / "_dedup" / "index-0001-of-0003.jsonl"
    index1.rename(index1.with_suffix(".aside"))
    with pytest.raises(DataSourceError, match="part 1 of 3 has no index"):
        main(["plan", "--out", str(out), "--parts", "3", "--quiet"])
    index1.with_suffix(".aside").rename(index1)
    assert main(["plan", "--out", str(out), "--parts", "3", "--quiet"]) == 0
    plan = json.loads((out / "_dedup" / "plan.json").read_text())
    dropped = {Path(d["path"]).name: (Path(d["kept"]).name, d["reason"]) for d in plan["dropped"]}
    assert dropped == {name: (kept, "exact" if name.endswith(".bmp") else "near")
                       for name, kept in twins.items()}
    assert plan["counts"] == {"exact": 1, "near": 3}
    build = common + ["--patch-size", "64", "--shard-samples", "50", "--dedup", "--holdout", "0.4",
                      "--val-out", str(val)]
    for i in (1, 0, 2):
        assert main(build + ["--part", f"{i}/3"]) == 0
    assert main(["merge", "--out", str(out), "--out", str(val), "--quiet"]) == 0
    train_m = json.loads((out / "manifest.json").read_text())
    val_m = json.loads((val / "manifest.json").read_text())
    train_imgs = {Path(s).name for s in train_m["sources"]}
    val_imgs = {Path(s).name for s in val_m["sources"]}
    assert not train_imgs & val_imgs and val_imgs
    assert train_imgs | val_imgs == {p.name for p in src.iterdir()} - set(twins)
    assert {"orig0_shifted.png", "orig3_shifted.png"} <= train_imgs | val_imgs
    assert train_m["dedup"]["images_dropped"] == {"exact": 1, "near": 3}
    assert train_m["dedup"]["threshold"] == 6
    used = {Path(json.loads(ln)["source"]).name
            for ln in (out / "patches.jsonl").read_text().splitlines()}
    assert used == train_imgs


def test_single_machine_dedup_makes_its_own_plan(source, tmp_path):
    src, twins = source
    out = tmp_path / "one"
    argv = ["--src", str(src), "--out", str(out), "--quiet", "--workers", "2", "--patch-size", "64",
            "--dedup"]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dedup"]["images_dropped"] == {"exact": 1, "near": 3}
    assert {Path(s).name for s in m["sources"]} == {p.name for p in src.iterdir()} - set(twins)
    assert main(argv) == 0   # up to date: the plan is reused, nothing rebuilt
    assert json.loads((out / "manifest.json").read_text())["created"] == m["created"]
