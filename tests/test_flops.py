"""FLOP counter and summary CLI: the paper's Table 5 figures, and hand-computed block costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynet import DyNet, DyNetConfig, count_flops, count_parameters
from dynet.blocks import PromptBlock
from dynet.summary import main as summary_main

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"L": (242.35, 22.3), "S": (166.38, 15.4)}  # GFLOPs at 1x3x224x224; attention extra


@pytest.fixture(scope="module")
def model() -> DyNet:
    with torch.device("meta"):
        return DyNet()


@pytest.mark.parametrize("variant", ["L", "S"])
def test_paper_gflops_at_224(model, variant):
    paper, attention = PAPER[variant]
    flops = count_flops(model, 224, 224, variant=variant)
    assert flops.conv_linear / 1e9 == pytest.approx(paper, rel=0.01)
    assert flops.attention / 1e9 == pytest.approx(attention, rel=0.02)
    assert flops.total == flops.conv_linear + flops.attention
    # with one FLOP per GELU element the count reproduces the printed figure to the digit
    assert abs(flops.paper / 1e9 - paper) < 0.006


def tb_flops(c: int, heads: int, hw: int) -> tuple[int, int]:
    """Hand-computed (conv, attention) FLOPs of one TransformerBlock application."""
    hidden = int(c * 2.66)
    macs_per_pixel = c * 3 * c + 3 * c * 9 + c * c + c * 2 * hidden + 2 * hidden * 9 + hidden * c
    return 2 * hw * macs_per_pixel, 4 * c * c * hw // heads


def test_one_more_application_costs_one_block(model):
    hw = 64 * 48
    base = count_flops(model, 64, 48, reuse=(1, 1, 1, 1))
    more = count_flops(model, 64, 48, reuse=(2, 1, 1, 1))  # one more enc1 (48) and dec1 (96)
    conv48, attn48 = tb_flops(48, 1, hw)
    conv96, attn96 = tb_flops(96, 1, hw)
    assert more.conv_linear - base.conv_linear == conv48 + conv96
    assert more.attention - base.attention == attn48 + attn96
    latent = count_flops(model, 64, 48, reuse=(1, 1, 1, 2))
    assert latent.conv_linear - base.conv_linear == tb_flops(384, 8, hw // 64)[0]


def test_counting_scales_and_pads(model):
    one = count_flops(model, 32, 32, variant="S")
    two = count_flops(model, 32, 32, variant="S", batch=2)
    assert two.conv_linear == 2 * one.conv_linear and two.attention == 2 * one.attention
    assert count_flops(model, 17, 23, variant="S") == count_flops(model, 24, 24, variant="S")
    assert (count_flops(model, 32, 32, reuse=(1, 1, 1, 1)).total < one.total
            < count_flops(model, 32, 32, variant="L").total)


def test_count_flops_on_a_real_model_matches_meta():
    torch.manual_seed(0)
    real = DyNet(DyNetConfig.tiny())
    with torch.device("meta"):
        meta = DyNet(DyNetConfig.tiny())
    assert count_flops(real, 40, 24, variant="L") == count_flops(meta, 40, 24, variant="L")
    assert real.patch_embed.weight.device.type == "cpu"  # the model itself is left alone


def test_parameter_counts(model):
    assert count_parameters(model) == 16_613_135
    share = count_parameters(model, PromptBlock) / count_parameters(model)
    assert share == pytest.approx(0.68, abs=0.01)


def test_summary_default_prints_table(capsys, tmp_path):
    summary_main(["--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "(2, 3, 3, 4)" in out and "(4, 6, 6, 8)" in out
    assert "242.35" in out and "166.38" in out and "16.613" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert [v["variant"] for v in data["variants"]] == ["S", "L"]
    assert data["params"] == 16_613_135


def test_summary_cli_subprocess():
    cmd = [sys.executable, "-m", "dynet.summary", "--dim", "8", "--height", "40", "--width",
           "24", "--variants", "S", "L", "1,1,1,1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert {"S", "L", "1,1,1,1"} <= set(rows)


def test_summary_rejects_unknown_variant(capsys):
    with pytest.raises(SystemExit) as exc:
        summary_main(["--dim", "8", "--size", "16", "--variants", "XL"])
    assert exc.value.code != 0 and "'XL'" in capsys.readouterr().err
