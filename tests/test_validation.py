"""Pre-training validation pieces: held-out shards (``make_shards --holdout``), the fixed val set
(built through the real DALI loader) and the per-variant scoring; the compare CLI on real runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyntrain.data.pretrain.degrade import DegradeSpec  # noqa: E402
from dyntrain.eval.validation import (FIELDS, build_val_set, reduce_scores, score_variants,  # noqa: E402
                                 to_metrics)

SPEC = DegradeSpec(crop_size=32, region_block=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dyntrain.data.synthetic import write_synthetic_images

    base = tmp_path_factory.mktemp("holdout")
    write_synthetic_images(base / "images", 4, size=(128, 128), seed=5)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src",
                           str(base / "images"), "--out", str(base / "train"), "--holdout", "0.25",
                           "--val-out", str(base / "val"), "--patch-size", "64", "--shard-samples", "4",
                           "--max-flat-frac", "1.0", "--workers", "1", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["num_samples"] == 12 and lines[1]["num_samples"] == 4 and lines[1]["val_images"] == 1
    return base


def test_holdout_puts_whole_images_into_validation_only(shards):
    train = json.loads((shards / "train" / "manifest.json").read_text())
    val = json.loads((shards / "val" / "manifest.json").read_text())
    assert train["split"] == "train" and val["split"] == "val"
    assert train["holdout"] == val["holdout"] and val["holdout"]["frac"] == 0.25
    held = set(val["holdout"]["val_images"])
    assert set(val["sources"]) == held and not held & set(train["sources"])
    assert len(train["sources"]) + len(held) == 4

    def patch_sources(folder):
        return {json.loads(line)["source"] for line in (folder / "patches.jsonl").read_text().splitlines()}
    assert patch_sources(shards / "val") == held
    assert not patch_sources(shards / "train") & held


def test_val_set_is_fixed_by_seed_and_shards(shards):
    urls = [f"{shards / 'val'}/*.tar"]
    a = build_val_set(urls, SPEC, 8, seed=3)
    b = build_val_set(urls, SPEC, 8, seed=3)
    c = build_val_set(urls, SPEC, 8, seed=4)
    assert len(a) == 4                                   # capped by the 4 held-out patches
    assert a.digest() == b.digest() and a.fingerprint == b.fingerprint
    assert c.fingerprint != a.fingerprint and not torch.equal(c.inputs, a.inputs)
    assert not (a.degraded & a.masked).any()             # disjoint regions
    n_deg, n_mask = SPEC.block_counts
    assert int(a.degraded[0].sum()) == n_deg * 64 and int(a.masked[0].sum()) == n_mask * 64
    assert float(a.inputs[a.masked.expand_as(a.inputs)].abs().max()) == 0.0   # masked = black
    assert not torch.equal(a.inputs, a.targets)


class Echo(torch.nn.Module):
    """Returns its input (the "do nothing" restorer): its scores are the degraded input's."""

    def forward(self, x, reuse):
        return x * (1.0 if reuse[0] == 1 else 0.5)


def test_scores_match_a_direct_computation_and_the_rank_split(shards):
    vs = build_val_set([f"{shards / 'val'}/*.tar"], SPEC, 4, seed=3)
    variants = {"S": (1, 1, 1, 1), "L": (2, 2, 2, 2)}
    one = reduce_scores(score_variants(Echo(), vs, variants, 0, 1, torch.device("cpu"), 3), 1, "cpu")
    halves = [score_variants(Echo(), vs, variants, r, 2, torch.device("cpu"), 1) for r in range(2)]
    summed = {v: [a + b for a, b in zip(halves[0][v], halves[1][v])] for v in variants}
    for v in variants:
        assert summed[v] == pytest.approx(one[v])
    m = to_metrics(one)
    err = (vs.inputs - vs.targets).abs()
    l1_masked = [float(err[i][vs.masked[i].expand(3, -1, -1)].mean()) for i in range(len(vs))]
    assert m["val/S/l1_masked"] == pytest.approx(sum(l1_masked) / len(vs), rel=1e-5)
    mse = ((vs.inputs - vs.targets) ** 2).flatten(1).mean(1)
    assert m["val/S/psnr"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-5)
    assert m["val/L/psnr"] != m["val/S/psnr"]
    assert {k.split("/")[2] for k in m} == {"l1", "psnr", "l1_degraded", "psnr_degraded",
                                            "l1_masked", "psnr_masked"}
    assert len(FIELDS) == 9


@pytest.mark.slow
def test_compare_cli_reproduces_the_saving_from_real_runs(tmp_path):
    """Three real pre-trainings (bench/quality_saving.py at its smallest: dynamic, S alone, L alone,
    3 steps each, validated at every step), then ``launch/compare.py --iso-quality``."""
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_saving
    from mlflow.tracking import MlflowClient

    from dyntrain.analysis.compare import val_curves
    from dyntrain.eval.iso_quality import iso_quality

    size = dict(quality_saving.CPU, steps=3, eval_every=1, images=4, val_samples=4)
    r = quality_saving.run_three(tmp_path, size, 0, "cpu")
    client = MlflowClient(r["tracking_uri"])
    dyn = client.get_run(client.search_runs(
        [client.get_experiment_by_name(r["experiment"]).experiment_id], "tags.mode = 'dynamic'")[0].info.run_id)
    assert dyn.data.metrics["iso_quality_saving"] == pytest.approx(r["iso_quality_saving"])
    # which saving each figure is: tags of the run, and the table printed by compare
    assert dyn.data.tags["iso_quality_saving_basis"] == "equal_validation_quality"
    assert dyn.data.tags["gpu_hours_saved_basis"] == "equal_iterations"

    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"), "--iso-quality",
                               "--tracking-uri", r["tracking_uri"], "--no-log", "--out",
                               str(tmp_path / "p.png"), *args], capture_output=True, text=True, timeout=120)
    proc = cli("--experiment", r["experiment"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = float(proc.stdout.strip().splitlines()[-1].split("=")[1])
    # the same figure from the metric histories, read here independently of the CLI
    runs = {rr.data.tags["mode"]: rr.info.run_id for rr in client.search_runs(
        [dyn.info.experiment_id], "tags.`dyntrain.stage` = 'pretrain'")}
    curves = val_curves(client, runs["dynamic"], ["S", "L"])
    assert sorted(p[0] for p in curves["S"]) == sorted({p[0] for p in curves["S"]})  # 4 evaluations
    assert len(curves["S"]) == 4 and curves["S"][0][0] == 0.0
    expected = iso_quality(curves, {"S": val_curves(client, runs["fixed:S"], ["S"])["S"],
                                    "L": val_curves(client, runs["fixed:L"], ["L"])["L"]})
    assert printed == pytest.approx(expected["iso_quality_saving"], rel=1e-6)
    assert (tmp_path / "p.png").stat().st_size > 0

    # refusals, one line each: a missing baseline, a different validation set
    proc = cli("--runs", runs["dynamic"], runs["fixed:S"])
    assert proc.returncode == 2 and "missing L" in proc.stderr.strip().splitlines()[-1]
    client.set_tag(runs["fixed:L"], "val.fingerprint", "0000")
    proc = cli("--runs", runs["dynamic"], runs["fixed:S"], runs["fixed:L"])
    assert proc.returncode == 2 and "val fingerprints differ" in proc.stderr
