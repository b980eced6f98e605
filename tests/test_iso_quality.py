"""The equal-quality comparison (``dyntrain.eval.iso_quality``) on hand-made curves with known answers."""
from __future__ import annotations

import math

import pytest

from dyntrain.eval.iso_quality import as_metrics, format_result, hours_to_reach, interpolate, iso_quality

# (gpu_hours, own_steps, psnr)
DYN = {"S": [(0.0, 0, 10.0), (1.0, 50, 20.0), (2.0, 100, 24.0)],
       "L": [(0.0, 0, 10.0), (1.0, 50, 21.0), (2.0, 100, 26.0)]}
SEP_S = [(0.0, 0, 10.0), (1.0, 100, 20.0), (2.0, 200, 30.0)]
SEP_L = [(0.0, 0, 10.0), (1.0, 100, 20.0), (3.0, 300, 28.0)]


def test_known_answer():
    r = iso_quality(DYN, {"S": SEP_S, "L": SEP_L})
    assert r["gh_dynamic"] == 2.0
    assert r["gh_separate_to_match"]["S"] == pytest.approx(1.4)      # 20 -> 30 over 1 h: 24 at 1.4
    assert r["gh_separate_to_match"]["L"] == pytest.approx(2.5)      # 20 -> 28 over 2 h: 26 at 2.5
    assert r["reached"] == {"S": True, "L": True}
    assert r["iso_quality_saving"] == pytest.approx(1 - 2.0 / 3.9)
    assert not r["iso_quality_saving_is_bound"]
    # equal budget: separate S at 2.0 GPU h reached 30 dB; at S's own 100 steps it had 20 dB
    assert r["psnr_separate_same_gpu_hours"]["S"] == pytest.approx(30.0)
    assert r["psnr_separate_same_own_steps"]["S"] == pytest.approx(20.0)
    assert r["psnr_separate_same_gpu_hours"]["L"] == pytest.approx(24.0)
    m = as_metrics(r)
    assert m["iso_quality_saving"] == pytest.approx(r["iso_quality_saving"])
    assert m["iso/L/gh_separate_to_match"] == pytest.approx(2.5)
    assert "iso_quality_saving=0.4872 at equal validation quality" in format_result(r)


def test_not_reached_is_a_marked_lower_bound():
    flat_l = [(0.0, 0, 10.0), (1.5, 150, 25.0), (3.0, 300, 25.5)]      # never reaches 26
    r = iso_quality(DYN, {"S": SEP_S, "L": flat_l})
    assert r["reached"] == {"S": True, "L": False}
    assert r["gh_separate_to_match"]["L"] == 3.0                       # its whole budget
    assert r["iso_quality_saving_is_bound"]
    assert r["iso_quality_saving"] == pytest.approx(1 - 2.0 / 4.4)
    assert "not reached" in format_result(r) and "lower bound" in format_result(r)
    # a dynamic run that is worse than the start of the baselines costs them nothing: negative saving
    worse = {"S": [(0.0, 0, 5.0), (2.0, 100, 9.0)], "L": [(0.0, 0, 5.0), (2.0, 100, 9.0)]}
    r = iso_quality(worse, {"S": SEP_S, "L": SEP_L})
    assert r["gh_separate_to_match"] == {"S": 0.0, "L": 0.0} and r["iso_quality_saving"] is None


def test_helpers_and_errors():
    assert interpolate([0, 2], [0, 10], 1) == 5
    assert interpolate([0, 2], [0, 10], 3) is None
    assert hours_to_reach(SEP_S, 15.0) == (pytest.approx(0.5), True)
    assert math.isclose(hours_to_reach(SEP_S, 99.0)[0], 2.0)
    with pytest.raises(ValueError, match="variant\\(s\\) L"):
        iso_quality(DYN, {"S": SEP_S})
