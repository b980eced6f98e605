"""Shard builder on local folders: flat detector, quality scores, shards/index/manifest, skips of
corrupt and small images, idempotent re-runs, URL expansion."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from dyntrain.data.shards import quality
from dyntrain.data.shards.build import main
from dyntrain.data.shards.patches import (ShardBuildConfig, check_decodes, check_jpeg_structure,
                                         encode, init_worker, patch_grid, process_image)
from dyntrain.data.shards.wds import make_index, parse_index
from dyntrain.data.shards.writer import build_shards
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.storage.urls import expand_urls, index_url
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.images import read_image
from helpers import read_tar


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as ``expand_urls`` applies it (the ``braceexpand`` package)."""
    return list(braceexpand(pattern, escape=False))

ROOT = Path(__file__).resolve().parents[1]


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def half_flat(rng: np.random.Generator, size: int, flat_cols: int, block: int,
              kind: str = "constant") -> np.ndarray:
    """A size x size patch whose left flat_cols cell columns are flat, the rest textured."""
    img = texture(rng, size, size)
    w = flat_cols * block
    if kind == "constant":
        img[:, :w] = (90, 140, 200)
    elif kind == "ramp":  # a smooth illumination gradient: 1 level per pixel
        ramp = np.clip(np.add.outer(np.arange(size), np.arange(w)) * 0.5 + 40, 0, 255)
        img[:, :w] = ramp[..., None].astype(np.uint8)
    elif kind == "noise":  # flat surface with mild sensor noise (sigma 1)
        img[:, :w] = np.clip(128 + rng.normal(0, 1.0, size=(size, w, 3)), 0, 255).astype(np.uint8)
    return img


# ------------------------------------------------------------------------------- flat detector
@pytest.mark.parametrize("kind", ["constant", "ramp", "noise"])
def test_flat_fraction_matches_known_layout(kind):
    rng = np.random.default_rng(0)
    block, n = 8, 8
    for flat_cols in range(n + 1):
        patch = half_flat(rng, block * n, flat_cols, block, kind)
        assert quality.flat_fraction(patch, block=block) == pytest.approx(flat_cols / n), flat_cols


def test_flat_fraction_edges_do_not_leak_and_texture_is_not_flat():
    rng = np.random.default_rng(1)
    # a hard edge exactly on a cell border: both sides stay flat
    patch = np.zeros((64, 64, 3), np.uint8)
    patch[:, 32:] = 255
    assert quality.flat_fraction(patch, block=16) == 1.0
    # an edge inside a cell makes that cell non-flat
    patch = np.zeros((64, 64, 3), np.uint8)
    patch[:, 24:] = 255
    assert quality.flat_fraction(patch, block=16) == pytest.approx(12 / 16)
    # strong noise (sigma 10) is texture, not flat
    noisy = np.clip(128 + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert quality.flat_fraction(noisy, block=16) == 0.0


def test_quality_scores():
    rng = np.random.default_rng(2)
    clean = np.full((128, 128, 3), 120, np.uint8)
    noisy = np.clip(120 + rng.normal(0, 10, (128, 128, 3)), 0, 255).astype(np.uint8)
    # Immerkaer's estimate on a flat image with noise sigma 10 (luma of independent channels:
    # sigma * sqrt(0.299^2 + 0.587^2 + 0.114^2) = 6.7)
    assert quality.noise_sigma(noisy) == pytest.approx(10 * 0.6686, rel=0.1)
    assert quality.noise_sigma(clean) == 0.0
    sharp = texture(rng, 128, 128)
    blurred = np.asarray(Image.fromarray(sharp).resize((32, 32)).resize((128, 128), Image.BILINEAR))
    assert quality.sharpness(sharp) > 10 * quality.sharpness(blurred)
    qf = quality.QualityFilter(minimum={"sharpness": 50.0}, maximum={"noise": 5.0})
    assert qf.check(qf.scores(sharp)) == "noise"
    assert qf.check(qf.scores(blurred)) == "sharpness"
    assert qf.check(qf.scores(clean)) == "sharpness"
    ok = quality.QualityFilter(minimum={"sharpness": 1.0})
    assert ok.check(ok.scores(sharp)) is None


def hook_scores(rgb: np.ndarray) -> dict:
    """A quality hook for the builder test: mean red level."""
    return {"red": float(rgb[..., 0].mean())}


# ----------------------------------------------------------------------------------- builder
def write(path: Path, img: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, fmt)
    return path


def test_patch_grid_is_centred_and_non_overlapping():
    grid = patch_grid(300, 200, 64)
    assert len(grid) == 4 * 3
    ys = sorted({y for _, _, y, _ in grid})
    xs = sorted({x for _, _, _, x in grid})
    assert ys == [22, 86, 150, 214] and xs == [4, 68, 132]


def test_build_local(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    # 256x256, patch 64: the left half is flat -> 8 of 16 patches dropped
    left_flat = texture(rng, 256, 256)
    left_flat[:, :128] = 77
    write(src / "a_left_flat.png", left_flat)
    write(src / "b_texture.png", texture(rng, 256, 256))
    write(src / "c_small.png", texture(rng, 40, 300))          # smaller than one patch
    (src / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = io.BytesIO()
    Image.fromarray(texture(rng, 256, 256)).save(good, "JPEG", quality=90)
    (src / "e_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    manifest = build_shards([src], str(out), ShardBuildConfig(patch_size=64, shard_samples=10,
                                                               flat_block=8, workers=2),
                            progress=False)
    c = manifest["counts"]
    assert c["images_found"] == 5
    assert c["images_used"] == 2 and c["images_too_small"] == 1 and c["images_corrupt"] == 2
    assert c["patches_total"] == 32 and c["patches_kept"] == 24
    assert c["patches_dropped"] == {"flat": 8}
    corrupt = {Path(e["path"]).name for e in manifest["skipped_images"]["corrupt"]}
    assert corrupt == {"d_corrupt.jpg", "e_truncated.jpg"}
    assert [Path(e["path"]).name for e in manifest["skipped_images"]["too_small"]] == ["c_small.png"]
    # shards: 24 samples in shards of 10
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["num_samples"] == 24
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json", "patches.jsonl"] + [s["name"] for s in manifest["shards"]]
                           + [s["index"] for s in manifest["shards"]])
    keys = []
    for s in manifest["shards"]:
        tar = out / s["name"]
        content = read_tar(tar)
        assert len(content) == s["samples"]
        for key, comps in content.items():
            assert "." not in key and set(comps) == {"jpg", "json"}
            meta = json.loads(comps["json"])
            assert meta["key"] == key and meta["patch_size"] == 64
            assert (meta["image_width"], meta["image_height"]) == (256, 256)
            assert Path(meta["source"]).name in ("a_left_flat.png", "b_texture.png")
            if Path(meta["source"]).name == "a_left_flat.png":
                assert meta["col"] in (2, 3)  # the flat left half was dropped
            with Image.open(io.BytesIO(comps["jpg"])) as im:
                assert im.size == (64, 64) and im.format == "JPEG"
            keys.append(key)
        # the index: same text as DALI's own wds2idx, offsets point at the members
        index_text = (out / s["index"]).read_text()
        assert index_text == make_index(tar)
        parsed = parse_index(index_text)
        data = tar.read_bytes()
        # hashed and counted while written (write_tar), not read back
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
        for key, comps in parsed.items():
            off, size = comps["jpg"]
            assert data[off:off + size] == content[key]["jpg"]
        wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
        if Path(wds2idx).exists():
            ref = tmp_path / "ref.idx"
            subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True)
            assert ref.read_text() == index_text
    assert len(set(keys)) == 24
    lines = (out / "patches.jsonl").read_text().splitlines()
    assert sorted(json.loads(ln)["key"] for ln in lines) == sorted(keys)


def test_png_is_lossless_and_quality_filter(tmp_path):
    rng = np.random.default_rng(4)
    img = texture(rng, 128, 192)
    write(tmp_path / "src" / "x.png", img)
    m = build_shards([tmp_path / "src"], str(tmp_path / "png"),
                     ShardBuildConfig(patch_size=64, image_format="png", workers=1), progress=False)
    content = read_tar(tmp_path / "png" / m["shards"][0]["name"])
    for comps in content.values():
        meta = json.loads(comps["json"])
        patch = np.asarray(Image.open(io.BytesIO(comps["png"])))
        assert np.array_equal(patch, img[meta["y"]:meta["y"] + 64, meta["x"]:meta["x"] + 64])
    # every patch is noisy texture: a noise ceiling drops them all, a hook score is recorded
    cfg = ShardBuildConfig(patch_size=64, quality_max={"noise": 5.0}, workers=1)
    m = build_shards([tmp_path / "src"], str(tmp_path / "q"), cfg, progress=False)
    assert m["counts"]["patches_dropped"] == {"quality:noise": 6} and m["num_shards"] == 0
    cfg = ShardBuildConfig(patch_size=64, quality_min={"red": 0.0},
                           quality_hook="test_shards:hook_scores", workers=2)
    m = build_shards([tmp_path / "src"], str(tmp_path / "hook"), cfg, progress=False)
    assert m["counts"]["patches_kept"] == 6
    meta = json.loads(next(iter(read_tar(tmp_path / "hook" / m["shards"][0]["name"]).values()))["json"])
    assert set(meta["scores"]) == {"sharpness", "noise", "red"}


def die_on_red(rgb: np.ndarray) -> dict:
    """A quality hook that kills its worker process (as the OOM killer would) on a red patch."""
    if rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60:
        os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_worker_killed_mid_build_fails_the_build_naming_its_image(tmp_path):
    """multiprocessing.Pool.imap waited forever for the lost task; the build now stops at once."""
    import time

    rng = np.random.default_rng(5)
    for i in range(6):
        write(tmp_path / "src" / f"img{i}.png", texture(rng, 128, 128))
    red = texture(rng, 128, 128)
    red[..., 0], red[..., 1] = 230, red[..., 1] // 8
    write(tmp_path / "src" / "img3_red.png", red)
    cfg = ShardBuildConfig(patch_size=64, shard_samples=4, max_flat_frac=1.0, workers=2,
                           quality_hook="test_shards:die_on_red")
    t0 = time.monotonic()
    with pytest.raises(DataSourceError, match=r"a worker process died .* while processing \S*img3_red.png;"):
        build_shards([tmp_path / "src"], str(tmp_path / "out"), cfg, progress=False)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rerun_is_idempotent_and_cleans_up(tmp_path):
    src = tmp_path / "src"
    write_synthetic_images(src, 4, size=(192, 256), seed=5)
    out = tmp_path / "out"
    common = ["--src", str(src), "--out", str(out), "--patch-size", "64", "--quiet", "--workers", "2"]
    argv = common + ["--shard-samples", "5"]
    assert main(argv) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["num_shards"] >= 3
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    # a leftover of a killed run is ignored and removed; an up-to-date output is left alone
    (out / ".shard-000000.tar.tmp-999").write_bytes(b"half")
    (out / ".someone-else.tmp-1").write_bytes(b"not ours")
    assert main(argv) == 0
    (out / ".someone-else.tmp-1").unlink()  # left alone
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    # --force rebuilds byte-identical shards (deterministic content and names)
    assert main(argv + ["--force"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    # fewer, larger shards: the shards of the earlier build are removed after the new manifest
    assert main(common + ["--shard-samples", "1000"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_shards"] == 1
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.idx", "shard-000000.tar"]
    assert m["num_samples"] == first["num_samples"]


def test_cli_script(tmp_path):
    src = tmp_path / "src"
    write_synthetic_images(src, 2, size=(128, 192), seed=6)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(src),
                        "--out", str(out), "--patch-size", "64", "--shard-samples", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == json.loads((out / "manifest.json").read_text())["num_samples"]
    assert "[make_shards] images 2/2" in r.stderr  # progress
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src",
                        str(tmp_path / "missing"), "--out", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and str(tmp_path / "missing") in r.stderr


# -------------------------------------------------------------------------------------- URLs
def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{8..10}") == ["a/x8", "a/x9", "a/x10", "b/x8", "b/x9", "b/x10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert index_url("s3://b/p/shard-000001.tar") == "s3://b/p/shard-000001.idx"


def test_expand_local_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    names = [tmp_path / f"shard-{i:06d}.tar" for i in range(3)]
    assert expand_urls([str(tmp_path / "shard-{000000..000002}.tar")]) == [str(n) for n in names]
    assert expand_urls([str(tmp_path / "*.tar"), str(names[0])]) == [str(n) for n in names]
    assert expand_urls([str(tmp_path)]) == [str(n) for n in names]
    with pytest.raises(DataSourceError, match="shard-000003.tar"):
        expand_urls([str(tmp_path / "shard-{000000..000003}.tar")])
    with pytest.raises(DataSourceError, match=r"no shard matches .*\*\.tgz"):
        expand_urls([str(tmp_path / "*.tgz")])
    with pytest.raises(DataSourceError, match="empty"):
        expand_urls([])


# ------------------------------------------------- the fast per-patch path against the slow one
def luma_by_formula(rgb: np.ndarray) -> np.ndarray:
    """The 8-bit luma of quality.py's docstring, in int64."""
    x = rgb.astype(np.int64)
    return (19595 * x[..., 0] + 38470 * x[..., 1] + 7471 * x[..., 2] + 32768) >> 16


def plain_measures(lum: np.ndarray, block: int, threshold: float) -> tuple:
    """(flat fraction, sharpness, noise) of a luma, term by term in int64 and exact rationals."""
    from fractions import Fraction
    f = lum.astype(np.int64)
    h, w = f.shape
    nh, nw = h // block, w // block
    cells = f[: nh * block, : nw * block].reshape(nh, block, nw, block)
    energy = ((np.diff(cells, axis=3) ** 2).sum(axis=(1, 3))
              + (np.diff(cells, axis=1) ** 2).sum(axis=(1, 3)))
    n_diff = block * (block - 1)
    flat = sum(Fraction(int(e), n_diff) < Fraction(threshold) ** 2 for e in energy.ravel()) / energy.size
    lap = f[:-2, 1:-1] + f[2:, 1:-1] + f[1:-1, :-2] + f[1:-1, 2:] - 4 * f[1:-1, 1:-1]
    n = lap.size
    var = Fraction(n * int((lap * lap).sum()) - int(lap.sum()) ** 2, n * n)
    r = (f[:-2, :-2] - 2 * f[:-2, 1:-1] + f[:-2, 2:] - 2 * f[1:-1, :-2] + 4 * f[1:-1, 1:-1]
         - 2 * f[1:-1, 2:] + f[2:, :-2] - 2 * f[2:, 1:-1] + f[2:, 2:])
    noise = math.sqrt(math.pi / 2.0) * int(np.abs(r).sum()) / (6.0 * n)
    return float(flat), float(var), noise


def reference_patches(rgb: np.ndarray, index: int, cfg: ShardBuildConfig) -> list[tuple]:
    """The builder's per-patch work written the plain way: a contiguous copy per patch, the luma
    by its formula, the flat detector and both scores term by term (plain_measures), a full decode
    of every encoded patch. (key, flat, scores, bytes) of the kept patches."""
    p, out = cfg.patch_size, []
    for row, col, y, x in patch_grid(rgb.shape[0], rgb.shape[1], p):
        patch = np.ascontiguousarray(rgb[y:y + p, x:x + p])
        lum = luma_by_formula(patch)
        flat, sharp, noise = plain_measures(lum, cfg.flat_block, cfg.flat_threshold)
        if flat > cfg.max_flat_frac:
            continue
        buf = io.BytesIO()
        Image.fromarray(patch).save(buf, "JPEG", quality=cfg.jpeg_quality, subsampling=0)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            im.load()
        out.append((f"{index:07d}_{row:03d}_{col:03d}", round(flat, 4),
                    {"sharpness": round(sharp, 4), "noise": round(noise, 4)}, buf.getvalue()))
        # the unrounded numbers too (rounding to 4 decimals would hide a last-bit difference)
        assert np.array_equal(quality.luma8(patch), lum), (row, col)
        assert quality.flat_fraction(patch, cfg.flat_block, cfg.flat_threshold) == flat, (row, col)
        assert quality.sharpness(patch) == sharp, (row, col)
        assert quality.noise_sigma(patch) == noise, (row, col)
    return out


@pytest.mark.parametrize("patch_size,block", [(96, 16), (100, 12)])
def test_builder_patches_equal_the_plain_reference(tmp_path, monkeypatch, patch_size, block):
    """process_image (Pillow's crops and luma, the int16 differences, the block sums, the structure
    check with one full decode per image) gives the same patches, bytes and numbers as the plain
    per-patch code, on photographs, noise, half-flat and grey images, with a block that does not
    divide the patch."""
    rng = np.random.default_rng(7)
    paths = [str(p) for p in write_synthetic_images(tmp_path, 2, size=(230, 330), seed=11)]
    for name, img in (("noise.png", texture(rng, 200, 310)),
                      ("half.png", half_flat(rng, 200, 6, 16, "noise")),
                      ("grey.png", rng.integers(0, 256, (210, 205), dtype=np.uint8))):
        Image.fromarray(img).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    # a camera JPEG's metadata (a comment, an ICC profile, EXIF) must not follow the pixels
    exif = Image.Exif()
    exif[0x010F] = "a camera"
    Image.fromarray(texture(rng, 220, 300)).save(tmp_path / "camera.jpg", quality=90, comment=b"a note",
                                                 icc_profile=b"\0" * 300, exif=exif)
    paths.append(str(tmp_path / "camera.jpg"))
    cfg = ShardBuildConfig(patch_size=patch_size, flat_block=block, max_flat_frac=0.3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # init_worker sets it
    init_worker(cfg)
    kept = 0
    for i, path in enumerate(paths):
        res = process_image((i, path, {}))
        fast = [(key, meta["flat_frac"], meta["scores"], data) for key, data, meta in res["patches"]]
        assert fast == reference_patches(read_image(path), i, cfg), path
        kept += len(fast)
    assert 0 < kept < sum(len(patch_grid(*read_image(p).shape[:2], patch_size)) for p in paths)


def float_luma_measures(rgb: np.ndarray, block: int, threshold: float) -> tuple:
    """The measures as they were defined before (float32 BT.601 luma, float sums)."""
    f = rgb.astype(np.float64)
    lum = (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])
    h, w = lum.shape
    cells = lum[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
    rms = np.sqrt((np.diff(cells, axis=3) ** 2).mean(axis=(1, 3))
                  + (np.diff(cells, axis=1) ** 2).mean(axis=(1, 3)))
    lap = lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] - 4 * lum[1:-1, 1:-1]
    r = (lum[:-2, :-2] - 2 * lum[:-2, 1:-1] + lum[:-2, 2:] - 2 * lum[1:-1, :-2] + 4 * lum[1:-1, 1:-1]
         - 2 * lum[1:-1, 2:] + lum[2:, :-2] - 2 * lum[2:, 1:-1] + lum[2:, 2:])
    noise = math.sqrt(math.pi / 2.0) * np.abs(r).sum() / (6.0 * r.size)
    return float((rms < threshold).mean()), float(lap.var()), float(noise)


def test_the_8_bit_luma_keeps_the_patches_the_float_luma_kept(tmp_path):
    """The change of definition (8-bit luma, exact sums, for speed and for the same numbers on every
    machine) against the float BT.601 luma it replaced, on synthetic photographs at the paper's
    patch size: the same patches are kept, flat fractions move by a few cells at most, and the
    scores by what rounding the luma to 8 bits adds (quantisation noise of 1/12 level^2)."""
    paths = write_synthetic_images(tmp_path, 6, size=(1024, 1536), seed=5)
    cfg = ShardBuildConfig()
    kept_old, kept_new, n = [], [], 0
    for path in paths:
        rgb = read_image(path)
        for row, col, y, x in patch_grid(rgb.shape[0], rgb.shape[1], cfg.patch_size):
            patch = rgb[y:y + cfg.patch_size, x:x + cfg.patch_size]
            flat0, sharp0, noise0 = float_luma_measures(patch, cfg.flat_block, cfg.flat_threshold)
            flat1 = quality.flat_fraction(patch, cfg.flat_block, cfg.flat_threshold)
            sharp1, noise1 = quality.sharpness(patch), quality.noise_sigma(patch)
            kept_old.append(flat0 <= cfg.max_flat_frac)
            kept_new.append(flat1 <= cfg.max_flat_frac)
            n += 1
            assert abs(flat1 - flat0) <= 4 / 1024, (path, row, col, flat0, flat1)
            assert abs(sharp1 - sharp0) <= 0.01 * sharp0, (path, row, col, sharp0, sharp1)
            assert abs(noise1 - noise0) <= 0.1, (path, row, col, noise0, noise1)
    assert kept_new == kept_old
    assert 0 < sum(kept_new) < n  # some patches are dropped as flat, most are kept


def test_luma_is_pillows_and_the_sums_do_not_overflow():
    """luma8 is Pillow's convert("L") bit for bit (the builder takes Pillow's); the int16
    differences and the block sums stay exact at the extremes (a 0/255 checkerboard gives the
    largest Laplacian and Immerkaer response there are) and on odd shapes."""
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (123, 457, 3), dtype=np.uint8)
    assert np.array_equal(quality.luma8(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    assert np.array_equal(quality.luma8(rgb), luma_by_formula(rgb))
    board = (np.indices((130, 97)).sum(axis=0) % 2 * 255).astype(np.uint8)
    for lum, block, t in ((board, 16, 4.0), (rng.integers(0, 256, (77, 131), dtype=np.uint8), 8, 30.0),
                          (np.full((19, 19), 9, np.uint8), 3, 0.5), (board[:3, :3], 2, 1.0)):
        flat, sharp, noise = plain_measures(lum, block, t)
        assert quality.flat_fraction(lum, block, t) == flat
        assert quality.sharpness(lum) == sharp
        assert quality.noise_sigma(lum) == noise
    with pytest.raises(TypeError, match="8-bit"):
        quality.luma8(rgb.astype(np.float32))


@pytest.mark.parametrize("threshold", [0.0, 0.5, 2.0, 3.3, 4.0, 4.01, 16.5, 100.0])
def test_flat_cells_decide_exactly_at_any_threshold(threshold):
    """rms < threshold is decided on integers (flat_energy_bound), so a cell's verdict does not
    depend on float rounding, even for cells right at the threshold."""
    from fractions import Fraction
    rng = np.random.default_rng(int(threshold * 10))
    block = 8
    n = block * (block - 1)
    lum = np.clip(128 + rng.normal(0, threshold / 2 + 0.5, (96, 80)), 0, 255).astype(np.uint8)
    energy = quality.cell_gradient_energy(lum, block)
    expect = np.array([[Fraction(int(e), n) < Fraction(threshold) ** 2 for e in row] for row in energy])
    assert np.array_equal(quality.flat_cells(lum, block, threshold), expect)
    # a cell whose energy is exactly threshold^2 * n is not flat; one level less is
    bound = quality.flat_energy_bound(block, threshold)
    assert bound == math.ceil(Fraction(threshold) ** 2 * n)


def test_decode_checks_reject_what_a_full_decode_rejects():
    """The structure check (every JPEG patch) and the decode check (a JPEG at 1/8 scale: one patch
    per image) reject a truncated, cut or overwritten stream; the structure check also a stray
    marker in the scan and a frame of another size. A PNG is always decoded whole."""
    rng = np.random.default_rng(3)
    for fmt in ("jpg", "png"):
        data = encode(texture(rng, 64, 48), fmt, 95)
        check_decodes(data)
        bads = [data[: len(data) // 2], data[:20] + bytes(50) + data[70:]]
        for bad in bads:
            with pytest.raises(OSError):
                check_decodes(bad)
            with pytest.raises(OSError), Image.open(io.BytesIO(bad)) as im:
                im.load()
            if fmt == "jpg":
                with pytest.raises(OSError):
                    check_jpeg_structure(bad, 48, 64)
            with pytest.raises(OSError):
                encode_checked_bytes(bad, fmt)
    data = encode(texture(rng, 64, 48), "jpg", 95, full_check=False)
    check_jpeg_structure(data, 48, 64)
    with pytest.raises(OSError, match="frame"):
        check_jpeg_structure(data, 64, 48)
    mid = len(data) // 2
    with pytest.raises(OSError, match="unstuffed"):
        check_jpeg_structure(data[:mid] + b"\xff\xd9" + data[mid:], 48, 64)
    with pytest.raises(OSError, match="SOI|EOI"):
        check_jpeg_structure(data[:-1], 48, 64)


def encode_checked_bytes(data: bytes, fmt: str) -> None:
    """The checks encode() runs, on given bytes."""
    if fmt == "jpg":
        check_jpeg_structure(data, 48, 64)
    check_decodes(data)


def test_read_image_orientation_and_modes_without_copies(tmp_path):
    """read_image (the builder's decode, transposing in place and converting only what is not RGB)
    gives what the copying form gives: EXIF orientation applied, 16-bit grey scaled, palette and
    RGBA converted."""
    from PIL import ImageOps

    def copying(path):
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "I;16":
                img = Image.fromarray(np.clip(np.asarray(img, np.float32) / 257.0 + 0.5, 0, 255)
                                      .astype(np.uint8), mode="L")
            return np.asarray(img.convert("RGB"))

    rng = np.random.default_rng(5)
    rgb = texture(rng, 20, 30)
    cases = []
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(rgb).save(path, exif=exif)
        cases.append(path)
    Image.fromarray(rng.integers(0, 65536, (12, 9), dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    cases += [tmp_path / "g16.png", tmp_path / "pal.png", tmp_path / "rgba.png"]
    for path in cases:
        assert np.array_equal(read_image(path), copying(path)), path
    assert read_image(cases[2]).shape == (30, 20, 3)  # orientation 6: rotated a quarter turn
    assert np.array_equal(read_image(cases[0]), rgb)
