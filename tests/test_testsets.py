"""MiO test sets: deterministic generation with a manifest, depth maps beside the images, and the
evaluation's per-task / per-preset results on them."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from dyntrain.errors import cli_main
from dyntrain.eval.evaluate import evaluate_model, format_table, load_test_sets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import make_testsets  # noqa: E402

from test_eval import Identity  # noqa: E402


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def test_generation_is_deterministic_with_manifest_and_depth(tmp_path, capsys):
    src = tmp_path / "clean"
    src.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        base = rng.integers(60, 200, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(base).resize((48, 40), Image.BICUBIC).save(src / f"{name}.jpg", quality=95)
    np.save(src / "a.npy", np.tile(np.linspace(1, 10, 48, dtype=np.float32), (40, 1)))
    depth16 = np.tile(np.linspace(100, 60000, 40).astype(np.uint16)[:, None], (1, 48))
    Image.fromarray(depth16).save(src / "b.png")  # 16-bit PNG beside b.jpg: its depth map
    args = ["--src", str(src), "--seed", "3"]
    assert make_testsets.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert "(2 haze images used the depth proxy)" in capsys.readouterr().out  # c, in both presets
    assert make_testsets.main(args + ["--out", str(tmp_path / "two")]) == 0
    assert make_testsets.main(["--src", str(src), "--seed", "4", "--out", str(tmp_path / "three")]) == 0
    assert digest(tmp_path / "one") == digest(tmp_path / "two") != digest(tmp_path / "three")
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["clean_images"] == 3 and manifest["depth_proxy"] == 2  # c, in both presets
    assert len(manifest["images"]) == 3 * 7 * 2
    assert {e["depth"] for e in manifest["images"] if e["task"] == "haze" and e["name"] != "c"} == {"file"}
    assert sorted(p.name for p in (tmp_path / "one" / "in" / "noise" / "lq").iterdir()) == ["a.png", "b.png", "c.png"]
    for entry in manifest["images"]:
        if entry["task"] == "noise":  # the file's residual matches the recorded sigma
            d = tmp_path / "one" / entry["preset"] / "noise"
            lq = np.asarray(Image.open(d / "lq" / "a.png"), dtype=float) if entry["name"] == "a" else None
            if lq is not None:
                gt = np.asarray(Image.open(d / "gt" / "a.png"), dtype=float)
                assert abs((lq - gt).std() - entry["params"]["sigma"]) < 0.1 * entry["params"]["sigma"]


def test_bad_input_is_named(tmp_path, capsys):
    src = tmp_path / "clean"
    src.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(src / "x.png")

    def run(*args: str) -> str:  # through cli_main, as the script runs: one error line, exit 2
        assert cli_main(make_testsets.main, ["--src", str(src), "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--tasks: unknown tasks ['fog']" in run("--tasks", "sr,fog")
    assert "--preset: unknown preset 'mid'" in run("--preset", "mid")
    np.save(src / "x.npy", np.ones((10, 24), np.float32))
    err = run("--tasks", "haze")
    assert "x.npy" in err and "does not match its image (20x24)" in err
    src = tmp_path / "none"
    assert "--src: folder" in run()


def test_evaluation_reports_per_task_and_preset(tmp_path):
    src = tmp_path / "clean"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
    assert make_testsets.main(["--src", str(src), "--out", str(tmp_path / "mio"), "--tasks", "noise,lowlight"]) == 0
    pairs = load_test_sets({"mio": str(tmp_path / "mio")})
    results = evaluate_model(Identity(), pairs, ["S"], "cpu")["S"]
    assert list(results) == ["mio_in_noise", "mio_in_lowlight", "mio_out_noise", "mio_out_lowlight",
                             "average", "mio_in_average", "mio_out_average"]
    mine = [p for p in pairs if p.task == "mio_out_noise"]
    ref = np.mean([peak_signal_noise_ratio(p.target, p.input, data_range=255) for p in mine])
    assert results["mio_out_noise"]["psnr"] == pytest.approx(ref, abs=1e-4)
    assert results["mio_out_noise"]["psnr"] < results["mio_in_noise"]["psnr"]  # Out-Dis is harder
    assert results["mio_in_average"]["psnr"] == pytest.approx(
        (results["mio_in_noise"]["psnr"] + results["mio_in_lowlight"]["psnr"]) / 2)
    assert "MiO-out noise" in format_table({"S": results})
    (tmp_path / "mio" / "in" / "fog").mkdir()
    with pytest.raises(ValueError, match="unknown tasks"):
        load_test_sets({"mio": str(tmp_path / "mio")})
