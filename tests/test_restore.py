"""launch/restore.py: one weights file serves S and L; odd image sizes; tiles within a memory budget."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.data.synthetic import synthetic_haze, synthetic_image
from dyntrain.eval.metrics import psnr
from dyntrain.restore import (RestoreOptions, Restorer, estimate_bytes_per_pixel, load_model, plan_outputs,
                              tile_for_budget)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]", "model.num_refinement=1"]



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny DyNet whose residual branch is small, as in a trained restorer (output = input + small
    correction), saved as one weights file with its model config."""
    from dyntrain.config import load_config
    from dyntrain.train.model import build_model
    from dyntrain.checkpoint.weights import save_weights

    cfg = load_config(None, TINY + ["run.seed=3"])
    model = build_model(cfg)
    with torch.no_grad():
        model.output.weight.mul_(0.1)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(path, model.state_dict(), cfg.to_dict()["model"])  # the exported-weights format
    return path


def _t(img):
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255


def test_both_variants_from_one_file_odd_sizes_tiled_and_untiled(weights):
    model = load_model(weights)
    img = synthetic_image(np.random.default_rng(0), 101, 75)  # neither side a multiple of 8
    out = {}
    for variant in ("S", "L"):
        whole, tile = Restorer(model, RestoreOptions(variant=variant, tile=0), torch.device("cpu"))(img)
        assert tile is None and whole.shape == img.shape and whole.dtype == np.uint8
        tiled, tile = Restorer(model, RestoreOptions(variant=variant, tile=64, overlap=16),
                               torch.device("cpu"))(img)
        assert tile == 64 and tiled.shape == img.shape
        agreement = psnr(_t(tiled), _t(whole)).item()
        print(f"{variant}: tiled vs untiled {agreement:.1f} dB")
        assert agreement > 35.0, f"{variant}: tiled vs untiled only {agreement:.1f} dB"
        out[variant] = whole
    assert not np.array_equal(out["S"], out["L"])  # the variant really changes the computation
    with pytest.raises(ValueError, match="unknown variant 'XL'"):
        Restorer(model, RestoreOptions(variant="XL"), torch.device("cpu"))


def test_tile_size_follows_the_memory_budget(weights):
    model = load_model(weights)
    bpp = estimate_bytes_per_pixel(model)
    assert tile_for_budget(bpp, 100 * 100 * bpp, 90, 90, overlap=16) is None
    tile = tile_for_budget(bpp, 64 * 64 * bpp + 1, 300, 200, overlap=16)
    assert tile == 64
    assert tile_for_budget(bpp, 1.0, 300, 200, overlap=32) == 72  # never below 2 x overlap + 8
    opts = RestoreOptions(variant="S", tile=None, max_memory_mb=80 * 80 * bpp / 2 ** 20)
    assert Restorer(model, opts, torch.device("cpu")).tile_for(120, 90) == 80


def test_cli_files_and_folders_png_and_jpeg_gray_world(weights, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    hazy = synthetic_haze(synthetic_image(rng, 90, 130), 0.9, 0.8)
    Image.fromarray(hazy).save(src / "a.png")
    Image.fromarray(synthetic_image(rng, 50, 37)).save(src / "sub" / "b.jpg", quality=95)

    def run(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "restore.py"), "--checkpoint", str(weights),
                               *args], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    text = run("--variant", "S", "--max-memory-mb", "2", str(src), str(tmp_path / "out"))
    assert "restored 2 image(s) with DyNet-S" in text
    assert "a.png  130x90  DyNet-S  tiles 72" in text and "b.jpg  37x50  DyNet-S  whole image" in text
    a = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    b = Image.open(tmp_path / "out" / "sub" / "b.jpg")
    assert a.shape == (90, 130, 3) and b.size == (37, 50) and b.format == "JPEG"
    run("--variant", "L", "--tile", "0", str(src / "a.png"), str(tmp_path / "aL.png"))
    run("--variant", "L", "--tile", "0", "--gray-world", str(src / "a.png"), str(tmp_path / "aLg.png"))
    a_l, a_lg = np.asarray(Image.open(tmp_path / "aL.png")), np.asarray(Image.open(tmp_path / "aLg.png"))
    assert not np.array_equal(a_l, a) and not np.array_equal(a_l, a_lg)
    means = a_lg.reshape(-1, 3).mean(0)  # Gray-World then a near-identity restorer: balanced channels
    assert means.max() - means.min() < 0.5 * np.ptp(hazy.reshape(-1, 3).mean(0)) + 2
    with pytest.raises(ValueError, match="output"):
        plan_outputs(src / "a.png", tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plan_outputs(tmp_path / "nowhere", tmp_path / "o")


def test_inference_bench_reports_both_variants(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "inference.py"), "--dim", "8", "--sizes", "32",
                           "--iters", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("s_vs_l_speedup=") and float(last.split("=")[1]) > 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["size"]) for r in rows} == {("S", 32), ("L", 32)}
    by = {r["variant"]: r for r in rows}
    assert by["L"]["gflops"] > by["S"]["gflops"] and all(r["images_per_s"] > 0 for r in rows)


def test_the_plan_counts_the_passes_restore_image_runs(weights):
    """``Restorer.plan`` (what the server checks before decoding) matches the tiles actually run (a
    whole image counts padded to a multiple of 8, as the model pads it)."""
    from dynet.inference import restore_image

    model = load_model(weights)
    seen = []

    def counting(x, reuse=None, variant=None):
        seen.append(x.shape[-2] * x.shape[-1])
        return x

    for (height, width), tile, overlap in [((101, 75), 64, 16), ((300, 200), 64, 0), ((300, 200), 96, 24),
                                           ((37, 45), 0, 32), ((130, 70), 64, 56), ((300, 200), None, 32)]:
        opts = RestoreOptions(variant="S", tile=tile, overlap=overlap, max_memory_mb=0.05)
        plan = Restorer(model, opts, torch.device("cpu"), bytes_per_pixel=100.0).plan(height, width)
        seen.clear()
        restore_image(counting, torch.zeros(1, 3, height, width), tile=plan.tile, overlap=plan.overlap)
        largest = max(seen) if plan.tile else (-(-height // 8) * 8) * (-(-width // 8) * 8)
        assert (plan.passes, plan.pass_pixels) == (len(seen), largest), (height, width, tile, overlap)
        assert plan.tile is None or plan.passes > 1
