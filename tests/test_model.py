"""DyNet model tests: shapes, gradients, weight sharing across variants, reuse counts."""

from __future__ import annotations

import copy

import pytest
import torch

from dynet import DyNet, DyNetConfig
from dynet.blocks import PromptBlock, TransformerBlock

SHARED = ("enc1", "enc2", "enc3", "latent", "dec3", "dec2", "dec1")


def tiny_model(seed: int = 0, **overrides) -> DyNet:
    torch.manual_seed(seed)
    return DyNet(DyNetConfig.tiny(**overrides))


def test_default_parameter_count_is_exact():
    with torch.device("meta"):
        model = DyNet()
    assert sum(p.numel() for p in model.parameters()) == 16_613_135


def test_transformer_block_parameter_formula():
    for c, h in [(48, 1), (96, 2), (192, 4), (384, 8)]:
        hidden = int(c * 2.66)
        expected = 4 * c * c + 31 * c + 3 * c * hidden + 18 * hidden + h
        assert sum(p.numel() for p in TransformerBlock(c, h, 2.66).parameters()) == expected


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (40, 24), (3, 5)])
def test_output_shape_equals_input(size):
    model = tiny_model().eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = model(x, variant="S")
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("variant", ["S", "L"])
def test_every_parameter_gets_a_gradient(variant):
    model = tiny_model()
    x, target = torch.rand(2, 3, 24, 16), torch.rand(2, 3, 24, 16)
    (model(x, variant=variant) - target).abs().mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient under {variant}: {missing}"


def test_variants_share_one_state_dict():
    model = tiny_model()
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        model(x, variant="S")
        model(x, variant="L")
        model(x, reuse=(3, 4, 4, 6))
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.data_ptr() == before[k][0], k
        assert torch.equal(v, before[k][1]), k
    assert [id(p) for p in model.parameters()] == params_before


def test_forward_l_after_s_equals_fresh_l():
    model = tiny_model().eval()
    fresh = copy.deepcopy(model)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        model(x, variant="S")
        after_s = model(x, variant="L")
        reference = fresh(x, variant="L")
        small = model(x, variant="S")
    assert torch.equal(after_s, reference)
    assert not torch.allclose(small, reference)  # the variants really differ


def count_calls(model: DyNet, **kwargs) -> dict[str, int]:
    names = SHARED + tuple(f"refinement.{i}" for i in range(len(model.refinement)))
    calls = dict.fromkeys(names, 0)
    prompt_calls = []
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(*_):
            calls[name] += 1
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    handles += [m.register_forward_hook(lambda *_: prompt_calls.append(1))
                for m in model.modules() if isinstance(m, PromptBlock)]
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16), **kwargs)
    for h in handles:
        h.remove()
    calls["prompt_blocks"] = len(prompt_calls)
    return calls


@pytest.mark.parametrize("reuse", [(1, 2, 3, 4), (3, 4, 4, 6), (1, 1, 1, 1)])
def test_block_reuse_counts_match_tuple(reuse):
    model = tiny_model(num_refinement=2)
    calls = count_calls(model, reuse=reuse)
    f1, f2, f3, f4 = reuse
    expected = dict(zip(SHARED, (f1, f2, f3, f4, f3, f2, f1)))
    expected.update({"refinement.0": 1, "refinement.1": 1, "prompt_blocks": 3})
    assert calls == expected


def test_named_variants_and_default():
    model = tiny_model()
    assert model.variants == {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}
    assert model.resolve_reuse(variant="S") == (2, 3, 3, 4)
    assert model.resolve_reuse() == (4, 6, 6, 8)
    assert model.resolve_reuse(reuse=[1, 1, 1, 1]) == (1, 1, 1, 1)
    assert count_calls(model)["latent"] == 8  # default is L


def test_bad_variants_fail_loudly():
    model = tiny_model()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="'XL'"):
        model(x, variant="XL")
    for bad in [(1, 2, 3), (0, 1, 1, 1), (1, 1, 1, 1.5), "1111"]:
        with pytest.raises(ValueError, match="reuse"):
            model(x, reuse=bad)
    with pytest.raises(ValueError, match="not both"):
        model(x, reuse=(1, 1, 1, 1), variant="S")


def test_activation_checkpointing_matches():
    plain = tiny_model()
    ckpt = DyNet(DyNetConfig.tiny(checkpoint_blocks=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 16, 24)
    outs = []
    for model in (plain, ckpt):
        calls = []
        handle = model.enc1.register_forward_pre_hook(lambda *_: calls.append(1))
        out = model(x, reuse=(2, 1, 1, 1))
        out.square().mean().backward()
        handle.remove()
        outs.append(out)
        assert len(calls) == (4 if model is ckpt else 2)  # recomputed in backward
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bf16_autocast_cpu():
    model = tiny_model()
    x = torch.rand(1, 3, 24, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, variant="S")
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_config_validation_and_round_trip():
    cfg = DyNetConfig(heads=[1, 2, 4, 8], variants={"M": [3, 4, 4, 6], "L": (4, 6, 6, 8)})
    assert cfg.heads == (1, 2, 4, 8) and cfg.variants["M"] == (3, 4, 4, 6)
    assert DyNetConfig(**cfg.to_dict()) == cfg
    bad = [dict(dim=0), dict(heads=(1, 2, 4)), dict(heads=(1, 2, 5, 8)), dict(dim=9),
           dict(prompt_dims=(64, 128, 322)), dict(variants={"S": (2, 3, 3)}),
           dict(default_variant="XL"), dict(ffn_expansion=-1.0), dict(out_channels=1)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            DyNetConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_cuda_bf16_forward_backward(checkpoint_blocks):
    torch.manual_seed(0)
    model = DyNet(DyNetConfig(checkpoint_blocks=checkpoint_blocks)).cuda()
    x = torch.rand(2, 3, 64, 72, device="cuda")
    for variant in ("S", "L"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x, variant=variant)
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y.float() - x).abs().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
