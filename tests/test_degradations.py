"""The seven MiOIR degradations: each output checked against its parameters by an independent
estimate (noise sigma from the residual, gamma from a log fit, blur sigma from the spectrum, JPEG
quality from the file's quantisation tables, haze A and beta from the scattering model with a known
depth, rain angle from the streaks' structure tensor, SR from the spectrum's cut-off)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.data.finetune.degradations import TABLE, DegradationError, degrade, draw_params
from dyntrain.data.finetune.degradations.compress import jpeg_bytes
from dyntrain.data.finetune.degradations.registry import sample_params


def p(**kw):
    return {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in kw.items()}


def noise_image(size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, size, size), generator=g).mul(255).round()


def test_noise_sigma_from_residual():
    x = torch.full((1, 3, 64, 64), 128.0)
    for sigma in (15.0, 37.0):
        y = TABLE["noise"].fn(x, p(sigma=sigma, seed=7))
        assert torch.equal(y, y.round()) and y.min() >= 0 and y.max() <= 255
        est = float((y - x).std())
        assert abs(est - sigma) / sigma < 0.04, (est, sigma)


def test_lowlight_gamma_from_log_fit():
    j = torch.linspace(40, 250, 64).view(1, 1, 1, 64).expand(1, 3, 8, 64).contiguous()
    for gamma in (1.7, 3.5):
        y = TABLE["lowlight"].fn(j, p(gamma=gamma))
        keep = y > 10  # where rounding does not dominate
        lj, ly = torch.log(j[keep] / 255), torch.log(y[keep] / 255)
        est = float((lj * ly).sum() / (lj * lj).sum())
        assert abs(est - gamma) < 0.05, (est, gamma)


def test_blur_sigma_from_spectrum():
    x = noise_image()
    for sigma in (1.5, 2.5):
        y = TABLE["blur"].fn(x, p(sigma=sigma, ksize=23))
        fx, fy = torch.fft.fft2(x[0, 0].double()), torch.fft.fft2(y[0, 0].double())
        f = torch.fft.fftfreq(96, dtype=torch.float64)
        f2 = f.view(-1, 1) ** 2 + f.view(1, -1) ** 2
        band = (f2 > 0) & (f2 < 0.12 ** 2)
        gain = (fy[band] / fx[band]).real.clamp_min(1e-3)
        # H(f) = exp(-2 pi^2 sigma^2 |f|^2): least squares on log H against |f|^2
        est = math.sqrt(float(-(torch.log(gain) * f2[band]).sum() / (f2[band] ** 2).sum()) / (2 * math.pi ** 2))
        assert abs(est - sigma) / sigma < 0.08, (est, sigma)


IJG_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
            14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
            49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


def quality_from_table(table) -> int:
    """The IJG quality whose scaled standard luminance table equals ``table`` (as a multiset, so the
    storage order does not matter)."""
    want = sorted(int(v) for v in table)
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        if sorted(min(255, max(1, (b * scale + 50) // 100)) for b in IJG_LUMA) == want:
            return q
    return -1


def test_jpeg_quality_from_quantisation_tables():
    x = noise_image(64)
    img = x[0].permute(1, 2, 0).to(torch.uint8).numpy()
    errors = []
    for q in (12, 35, 64):
        data = jpeg_bytes(img, q)
        with Image.open(io.BytesIO(data)) as f:
            assert quality_from_table(f.quantization[0]) == q
            decoded = np.asarray(f.convert("RGB"))
        y = TABLE["jpeg"].fn(x, p(quality=q))
        assert np.array_equal(y[0].permute(1, 2, 0).numpy().astype(np.uint8), decoded)
        errors.append(float((y - x).abs().mean()))
    assert errors[0] > errors[1] > errors[2]


def test_haze_parameters_from_scattering_model():
    h = w = 48
    depth = torch.linspace(0.1, 1.0, h).view(1, 1, h, 1).expand(2, 1, h, w) * \
        torch.linspace(0.6, 1.0, w).view(1, 1, 1, w)
    j = torch.stack([torch.full((3, h, w), 40.0), torch.full((3, h, w), 200.0)])
    a, beta = 0.87, 1.6
    params = {"A": torch.tensor([a, a]), "beta": torch.tensor([beta, beta])}
    y = TABLE["haze"].fn(j, params, depth)
    t = (y[1] - y[0]) / (j[1] - j[0])                       # I2 - I1 = (J2 - J1) t
    est_beta = float((-torch.log(t.clamp_min(1e-3)) / depth[0]).median())
    est_a = float(((y[0] - j[0] * t) / (1 - t).clamp_min(1e-3)).median()) / 255
    assert abs(est_beta - beta) < 0.05 and abs(est_a - a) < 0.02, (est_beta, est_a)
    nan = torch.full_like(depth, float("nan"))
    assert torch.equal(TABLE["haze"].fn(j, params, nan), TABLE["haze"].fn(j, params, None))


def test_rain_angle_from_structure_tensor():
    x = torch.zeros((1, 3, 96, 96))
    for angle in (-30.0, 20.0):
        y = TABLE["rain"].fn(x, p(density=80, length=35, angle=angle, width=5, seed=3))
        assert float(y.max()) == 255.0 and torch.equal(y[0, 0], y[0, 2])
        r = y[0, 0].double()
        gy, gx = r[1:, :-1] - r[:-1, :-1], r[:-1, 1:] - r[:-1, :-1]
        tensor = torch.tensor([[(gx * gx).sum(), (gx * gy).sum()], [(gx * gy).sum(), (gy * gy).sum()]])
        vals, vecs = torch.linalg.eigh(tensor)
        vx, vy = vecs[:, 0].tolist()                         # streak direction: least gradient
        est = math.degrees(math.atan2(vx, vy))
        est = (est + 90) % 180 - 90
        assert abs(est - angle) < 6, (est, angle)
    mid = torch.full((1, 3, 64, 64), 100.0)
    assert bool((TABLE["rain"].fn(mid, p(density=60, length=25, angle=0, width=3, seed=1)) >= mid).all())


@pytest.mark.parametrize("scale", [4, 6])
def test_sr_removes_frequencies_above_the_low_resolution_nyquist(scale):
    x = noise_image()
    y = TABLE["sr"].fn(x, p(scale=scale))
    f = torch.fft.fftfreq(96)
    fmax = torch.maximum(f.abs().view(-1, 1), f.abs().view(1, -1))
    high = fmax > 1.3 / (2 * scale)
    power = lambda img: float((torch.fft.fft2(img[0, 0] - img[0, 0].mean()).abs() ** 2)[high].sum())
    assert power(y) < 0.05 * power(x)


def test_params_are_in_range_and_a_pure_function_of_the_key():
    for task, row in TABLE.items():
        for preset in ("in", "out"):
            draws = [sample_params(task, preset, 0, 5, 1, i) for i in range(40)]
            for name, (lo, hi, kind) in row.ranges[preset].items():
                vals = [d[name] for d in draws]
                assert all(lo <= v <= hi for v in vals), (task, preset, name)
                if kind == "odd":
                    assert all(int(v) % 2 == 1 for v in vals)
                if lo < hi:
                    assert len(set(vals)) > 5
    assert draw_params(["noise", "rain"], "in", 1, 7, 0) == draw_params(["noise", "rain"], "in", 1, 7, 0)
    assert draw_params(["noise"], "in", 1, 7, 0) != draw_params(["noise"], "in", 1, 7, 1)


def test_batched_degrade_equals_one_sample_at_a_time():
    x = noise_image(32).repeat(4, 1, 1, 1)
    tasks = ["noise", "jpeg", "noise", "rain"]
    params = draw_params(tasks, "in", 3, 2, 0)
    batch = degrade(x, tasks, params)
    for i in range(4):
        assert torch.equal(batch[i:i + 1], degrade(x[i:i + 1], tasks[i:i + 1], params[i:i + 1]))


def test_unknown_task_or_preset_names_key_and_known_values():
    with pytest.raises(DegradationError, match=r"data.tasks: unknown tasks \['fog'\].*sr"):
        degrade(torch.zeros(1, 3, 8, 8), ["fog"], [{}])
    with pytest.raises(DegradationError, match=r"data.preset: unknown preset 'mid'.*'in', 'out'"):
        sample_params("noise", "mid", 0)
