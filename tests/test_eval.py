"""Evaluation protocol: test-set layouts, centre crop, seeded noise, per-task averages, table, MLflow."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dyntrain.eval.evaluate import (EvalDataError, PeriodicEvaluator, centre_crop, evaluate_model, format_table,
                               load_test_sets, log_to_mlflow, metrics_dict)



def _save(arr, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _sets(root: Path, alt: bool = False):
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)  # noqa: E731
    for i in range(2):
        _save(img(), root / "bsd68" / f"{i:03d}.png")
        clean = img()
        rainy_dir, gt_dir = ("input", "target") if alt else ("rainy", "gt")
        _save(clean, root / "rain100l" / gt_dir / (f"{i}.png" if alt else f"norain-{i}.png"))
        _save(np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8),
              root / "rain100l" / rainy_dir / (f"{i}.png" if alt else f"rain-{i}.png"))
        clean = img()
        sots = root / "sots" / ("outdoor" if alt else "")
        _save(clean, sots / "gt" / f"{i:04d}.png")
        _save((clean // 2 + 100).astype(np.uint8), sots / "hazy" / f"{i:04d}_0.8_0.2.png")
    return {"bsd68": str(root / "bsd68"), "rain100l": str(root / "rain100l"), "sots": str(root / "sots")}


class Identity(torch.nn.Module):
    """A 'restorer' that returns its input: the scores must equal those of the degraded inputs."""
    variants = {"S": None, "L": None}

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, reuse=None, variant=None):
        return x * self.scale


def test_centre_crop_matches_the_protocol():
    img = np.arange(37 * 45).reshape(37, 45)
    out = centre_crop(img, 16)
    assert out.shape == (32, 32)
    assert out[0, 0] == img[2, 6] and out[-1, -1] == img[33, 37]  # 5 rows: 2 above, 3 below; 13 cols: 6 / 7


@pytest.mark.parametrize("alt", [False, True])
def test_layouts_seeded_noise_and_pairing(tmp_path, alt):
    sets = _sets(tmp_path, alt)
    pairs = load_test_sets(sets, noise_seed=0)
    assert [p.task for p in pairs] == ["sots"] * 2 + ["rain100l"] * 2 + ["bsd68_s15", "bsd68_s25", "bsd68_s50"] * 2
    for p in pairs:
        assert p.input.shape == p.target.shape == (32, 32, 3) and p.input.dtype == np.uint8
    rain = [p for p in pairs if p.task == "rain100l"]
    assert all(np.array_equal(p.input, np.clip(p.target.astype(int) + 40, 0, 255)) for p in rain)
    sots = [p for p in pairs if p.task == "sots"]
    assert all(np.array_equal(p.input, p.target // 2 + 100) for p in sots)
    again = load_test_sets(sets, noise_seed=0)
    other = load_test_sets(sets, noise_seed=1)
    bsd = [i for i, p in enumerate(pairs) if p.task.startswith("bsd68")]
    assert all(np.array_equal(pairs[i].input, again[i].input) for i in bsd)
    assert not any(np.array_equal(pairs[i].input, other[i].input) for i in bsd)
    s50 = pairs[bsd[2]]
    assert 30 < np.std(s50.input.astype(float) - s50.target) < 50  # clipping shrinks it a little


def test_missing_sets_and_files_are_named(tmp_path):
    sets = _sets(tmp_path)
    with pytest.raises(EvalDataError, match="eval.sets.gopro"):
        load_test_sets({"gopro": str(tmp_path)})
    with pytest.raises(EvalDataError, match="does not exist"):
        load_test_sets({"sots": str(tmp_path / "nowhere")})
    (tmp_path / "sots" / "gt" / "0001.png").unlink()
    with pytest.raises(EvalDataError, match="0001_0.8_0.2.png"):
        load_test_sets(sets)


def test_identity_scores_equal_the_reference_on_degraded_inputs(tmp_path):
    pairs = load_test_sets(_sets(tmp_path))
    results = evaluate_model(Identity(), pairs, ["S", "L"], "cpu")
    for task in ("sots", "rain100l", "bsd68_s25"):
        mine = [p for p in pairs if p.task == task]
        ref_p = np.mean([peak_signal_noise_ratio(p.target / 255.0, p.input / 255.0, data_range=1.0) for p in mine])
        ref_s = np.mean([structural_similarity(p.target / 255.0, p.input / 255.0, channel_axis=-1, data_range=1.0)
                         for p in mine])
        assert abs(results["S"][task]["psnr"] - ref_p) < 1e-4 and abs(results["L"][task]["ssim"] - ref_s) < 1e-4
    avg = results["S"]["average"]
    assert avg["psnr"] == pytest.approx(np.mean([results["S"][t]["psnr"] for t in results["S"] if t != "average"]))
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["variant", "SOTS", "Rain100L"] and "average" in lines[0]
    assert lines[2].startswith("DyNet-S") and lines[3].startswith("DyNet-L")
    assert f"{results['L']['sots']['psnr']:.2f}/{results['L']['sots']['ssim']:.4f}" in lines[3]


def test_metrics_reach_mlflow_run_and_child_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = {"S": {"sots": {"psnr": 20.5, "ssim": 0.7, "images": 2}, "average": {"psnr": 20.5, "ssim": 0.7, "images": 2}}}
    metrics = metrics_dict(results)
    assert metrics == {"eval/S/sots/psnr": 20.5, "eval/S/sots/ssim": 0.7, "eval/S/average/psnr": 20.5,
                       "eval/S/average/ssim": 0.7}
    new_id = log_to_mlflow(metrics, uri, "dyn-eval", step=3, texts={"evaluation/table.txt": "t"})
    client = MlflowClient(uri)
    run = client.get_run(new_id)
    assert run.data.metrics["eval/S/sots/psnr"] == 20.5 and run.info.status == "FINISHED"
    assert client.get_metric_history(new_id, "eval/S/average/ssim")[0].step == 3
    child = log_to_mlflow({"eval/S/sots/psnr": 21.0}, uri, "ignored", run_id=new_id, child=True)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == new_id
    same = log_to_mlflow({"eval/S/sots/psnr": 22.0}, uri, "ignored", run_id=new_id, step=9)
    assert same == new_id and client.get_run(new_id).data.metrics["eval/S/sots/psnr"] == 22.0
    with pytest.raises(ValueError, match="not found"):
        log_to_mlflow({}, uri, "x", run_id="0" * 32)
    mlflow.set_tracking_uri(None)


def test_periodic_evaluator_logs_into_the_tracker(tmp_path):
    from dyntrain.config import load_config

    sets = _sets(tmp_path)
    cfg = load_config(None, ["eval.every=2", f"eval.sets={sets}".replace("'", '"'), "eval.max_images=1"])

    class Tracker:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

    tracker = Tracker()
    ev = PeriodicEvaluator(cfg, tracker, rank=0, printer=lambda s: None)
    assert [s for s in range(7) if ev.due(s)] == [2, 4, 6]
    ev(Identity(), 4)
    step, metrics = tracker.logged[0]
    assert step == 4 and {"eval/S/sots/psnr", "eval/L/bsd68_s50/ssim", "eval/L/average/psnr"} <= set(metrics)
    assert PeriodicEvaluator(cfg, tracker, rank=1)(Identity(), 4) is None
