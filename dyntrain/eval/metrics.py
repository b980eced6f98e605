"""PSNR and SSIM, as the all-in-one restoration papers report them.

Both take RGB tensors in [0, 1] of shape (B, C, H, W) (or (C, H, W)) and return one value per image.
No border shave, no Y-channel conversion. SSIM uses a 7x7 uniform window with the sample covariance
(N / (N - 1)), K1 = 0.01, K2 = 0.03 and data range 1, averaged over the "valid" window positions
(those lying wholly inside the image) and then over channels. This is the definition behind
scikit-image's ``structural_similarity(a, b, channel_axis=-1, data_range=1.0)`` with its defaults,
which the tests use as the independent reference. Everything runs in float64 on the inputs' device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _as_batch(pred, "pred"), _as_batch(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE); inf for identical images.

    Returns a float64 tensor of shape (B,).
    """
    pred, target = _check_pair(pred, target)
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image with a uniform ``win_size`` window.

    Returns a float64 tensor of shape (B,). Images must be at least ``win_size`` on each side.
    """
    pred, target = _check_pair(pred, target)
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"ssim: win_size must be odd and >= 3, got {win_size}")
    height, width = pred.shape[-2:]
    if height < win_size or width < win_size:
        raise ValueError(f"ssim: image {height}x{width} is smaller than the {win_size}x{win_size} window")

    batch, channels = pred.shape[:2]
    # Stack the five quantities whose local means SSIM needs, then pool them in one call.
    stack = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    means = F.avg_pool2d(stack, win_size, stride=1)  # (B, 5C, H-w+1, W-w+1), valid windows only
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = means.split(channels, dim=1)

    n = win_size * win_size
    cov_norm = n / (n - 1)  # unbiased (sample) covariance
    var_x = cov_norm * (mean_xx - mu_x * mu_x)
    var_y = cov_norm * (mean_yy - mu_y * mu_y)
    cov_xy = cov_norm * (mean_xy - mu_x * mu_y)

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).reshape(batch)  # per-channel mean, then over channels
