"""PSNR / SSIM against scikit-image, the independent reference implementation."""
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dyntrain.eval.metrics import psnr, ssim


def _pairs(seed: int):
    """Random image pairs: unrelated noise, and a clean image with clipped noise (a restoration case)."""
    rng = np.random.default_rng(seed)
    for height, width in [(7, 7), (37, 53), (64, 48), (101, 80)]:
        clean = rng.random((height, width, 3))
        yield clean, rng.random((height, width, 3))
        yield clean, np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
        smooth = np.cumsum(rng.random((height, width, 3)), axis=0)
        smooth /= smooth.max()
        yield smooth, np.clip(smooth + rng.normal(0, 0.02, smooth.shape), 0, 1)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)  # (C, H, W)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_and_ssim_match_scikit_image(seed):
    for a, b in _pairs(seed):
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        ref_ssim = structural_similarity(a, b, channel_axis=-1, data_range=1.0)
        assert abs(psnr(_t(b), _t(a)).item() - ref_psnr) < 1e-4
        assert abs(ssim(_t(b), _t(a)).item() - ref_ssim) < 1e-4


def test_batched_values_equal_per_image_values_and_float32_inputs_work():
    rng = np.random.default_rng(5)
    a = rng.random((3, 3, 40, 48)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    ps, ss = psnr(torch.from_numpy(b), torch.from_numpy(a)), ssim(torch.from_numpy(b), torch.from_numpy(a))
    assert ps.shape == ss.shape == (3,) and ps.dtype == torch.float64
    for i in range(3):
        x, y = a[i].transpose(1, 2, 0).astype(np.float64), b[i].transpose(1, 2, 0).astype(np.float64)
        assert abs(ps[i].item() - peak_signal_noise_ratio(x, y, data_range=1.0)) < 1e-4
        assert abs(ss[i].item() - structural_similarity(x, y, channel_axis=-1, data_range=1.0)) < 1e-4


def test_identical_images_and_errors():
    x = torch.rand(1, 3, 16, 16)
    assert psnr(x, x).item() == float("inf")
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, 1 - x).item() < 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, x[..., :8])
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        ssim(x[..., :6, :], x[..., :6, :])
