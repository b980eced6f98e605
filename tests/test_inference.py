"""Inference helpers: pad/crop, overlapping tiled restoration, Gray-World balance."""

from __future__ import annotations

import pytest
import torch

from dynet import DyNet, DyNetConfig, crop_to, gray_world, pad_to_multiple, restore_image


class Pointwise(torch.nn.Module):
    """A local 'restorer' (per-pixel affine map): tiling must reproduce it exactly."""

    def forward(self, x, reuse=None, variant=None):
        return 2 * x + 1


@pytest.fixture(scope="module")
def tiny() -> DyNet:
    torch.manual_seed(0)
    return DyNet(DyNetConfig.tiny()).eval()


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (40, 25), (3, 5), (1, 1)])
def test_pad_crop_round_trip(size):
    x = torch.rand(2, 3, *size)
    padded, original = pad_to_multiple(x, 8)
    assert original == size
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert padded.shape[-2] - size[0] < 8 and padded.shape[-1] - size[1] < 8
    assert torch.equal(crop_to(padded, original), x)


def test_pad_reflects():
    x = torch.arange(6.0).reshape(1, 1, 1, 6).expand(1, 1, 8, 6)
    padded, _ = pad_to_multiple(x, 8)
    assert padded[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 4, 3]


def test_tiling_blends_exactly_for_a_local_model():
    x = torch.rand(2, 3, 45, 37)
    out = restore_image(Pointwise(), x, tile=16, overlap=4)
    torch.testing.assert_close(out, 2 * x + 1)


def test_one_big_tile_equals_untiled(tiny):
    x = torch.rand(1, 3, 30, 21)
    whole = restore_image(tiny, x, variant="S")
    torch.testing.assert_close(restore_image(tiny, x, variant="S", tile=64), whole,
                               atol=1e-5, rtol=1e-5)


def test_tiled_close_to_untiled_on_tiny_dynet(tiny):
    # DyNet pools globally (prompt mixing, channel attention), so tiles agree closely, not exactly
    torch.manual_seed(1)
    x = torch.rand(1, 3, 150, 141)  # not a multiple of 8, several tiles each way
    whole = restore_image(tiny, x, reuse=(1, 1, 1, 1))
    tiled = restore_image(tiny, x, reuse=(1, 1, 1, 1), tile=64, overlap=32)
    assert tiled.shape == whole.shape == x.shape
    diff = (tiled - whole).abs()
    assert diff.mean() < 0.1 * (whole - x).abs().mean()  # << what the network changes
    assert diff.max() < 0.1


def test_tile_arguments_are_checked(tiny):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        restore_image(tiny, x, tile=20)
    with pytest.raises(ValueError, match="overlap"):
        restore_image(tiny, x, tile=16, overlap=16)


def test_restore_under_bf16_autocast(tiny):
    x = torch.rand(1, 3, 40, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = restore_image(tiny, x, variant="S", tile=24, overlap=8)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_gray_world_equalises_channel_means():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 48) * torch.tensor([0.9, 0.5, 0.3]).view(1, 3, 1, 1)
    y = gray_world(x)
    means = y.mean(dim=(-2, -1))  # (B, 3)
    torch.testing.assert_close(means, means.mean(dim=1, keepdim=True).expand_as(means))
    torch.testing.assert_close(means.mean(dim=1), x.mean(dim=(1, 2, 3)))  # grey level kept
    assert y.min() >= 0 and y.max() <= 1


def test_gray_world_clamps_and_checks_shape():
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 1.0
    x[:, 1, 0, 0] = 0.5  # green very dark on average: scaled far above 1 at that pixel
    y = gray_world(x)
    assert y.max() <= 1 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        gray_world(torch.rand(3, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiled_restore_on_cuda_bf16():
    torch.manual_seed(0)
    model = DyNet().cuda().eval()
    x = torch.rand(1, 3, 300, 257, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = restore_image(model, x, variant="L", tile=128, overlap=32)
    assert out.shape == x.shape and out.device == x.device and torch.isfinite(out).all()
