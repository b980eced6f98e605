"""Variant router: it learns to route by degradation from constructed labels, the policy picks the
cheapest adequate variant, its FLOPs are counted and tiny, and a router for another model is refused."""
import numpy as np
import pytest
import torch

from dynet import DyNet, DyNetConfig, count_flops, count_router_flops
from dynet.router import RouterConfig, VariantRouter, choose_variant, oracle_variant
from dyntrain.data.synthetic import synthetic_haze, synthetic_image
from dyntrain.routing.router import RouterError, Routing, load_router, router_path_for, save_router
from dyntrain.routing.train import LabelSet, train_router

THREE = {"XS": (1, 1, 1, 1), "S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}
COSTS = {"XS": 1.0, "S": 2.0, "L": 3.0}


def test_policy_picks_the_cheapest_adequate_variant_else_the_largest():
    names = ["L", "XS", "S"]  # order of the predictions need not be the cost order
    assert choose_variant([0.0, 0.01, 0.02], names, COSTS, 0.05) == "XS"
    assert choose_variant([0.0, 0.30, 0.02], names, COSTS, 0.05) == "S"
    assert choose_variant([0.0, 0.30, 0.20], names, COSTS, 0.05) == "L"
    assert choose_variant([0.1, 0.30, 0.20], names, COSTS, 0.05) == "L"  # nobody confident: largest
    assert choose_variant(torch.tensor([0.0, 0.3, 0.2]), names, COSTS, 0.25) == "S"
    assert oracle_variant({"XS": 30.0, "S": 30.96, "L": 31.0}, COSTS, 0.05) == "S"
    assert oracle_variant({"XS": 31.2, "S": 30.0, "L": 31.0}, COSTS, 0.05) == "XS"  # best need not be L


def _kind(rng, kind):
    clean = synthetic_image(rng, 48, 48)
    if kind == "noise":
        return np.clip(np.round(clean + rng.standard_normal(clean.shape) * 25), 0, 255).astype(np.uint8)
    return synthetic_haze(clean, float(rng.uniform(0.75, 0.95)), float(rng.uniform(0.4, 0.8)))


def _set(rng, n):
    kinds = ["noise", "haze"] * n
    images = torch.stack([torch.from_numpy(_kind(rng, k)).permute(2, 0, 1) for k in kinds])
    # constructed labels: S is adequate on noise (0.01 dB lost), not on haze (0.6 dB); XS never
    table = {"noise": [0.35, 0.01, 0.0], "haze": [1.2, 0.6, 0.0]}
    losses = torch.tensor([table[k] for k in kinds]) + 0.005 * torch.randn(len(kinds), 3)
    return LabelSet(images, kinds, list(THREE), -losses, losses)


def test_router_learns_to_route_by_degradation():
    rng = np.random.default_rng(0)
    labels = _set(rng, 24)
    router = train_router(labels, COSTS, THREE, epochs=60, lr=3e-3, batch_size=8, seed=0)
    test = _set(np.random.default_rng(1), 8)
    with torch.no_grad():
        pred = router(test.inputs.float() / 255)
    picks = [choose_variant(p, list(THREE), COSTS, 0.05) for p in pred]
    by_kind = {k: [p for p, t in zip(picks, test.tasks) if t == k] for k in ("noise", "haze")}
    print(by_kind)
    assert by_kind["noise"].count("S") >= 7, by_kind
    assert by_kind["haze"].count("L") >= 7, by_kind


@pytest.mark.parametrize("size", [16, 97, 224, 1024, 4096])
def test_router_costs_well_under_one_percent_of_dynet_s(size):
    model = DyNet(DyNetConfig())
    router = VariantRouter(RouterConfig(variants=model.variants))
    share = count_router_flops(router, size, size).paper / count_flops(model, size, size, variant="S").paper
    assert 0 < share < 1e-3


def test_router_file_belongs_to_one_model_and_variant_set(tmp_path):
    tiny = DyNet(DyNetConfig.tiny(variants=THREE))
    router = VariantRouter(RouterConfig(variants=tiny.variants))
    path = save_router(router_path_for(tmp_path / "dynet.safetensors"), router, tiny)
    assert path.name == "dynet.router.pt" and router_path_for(tmp_path) == tmp_path / "router.pt"
    loaded = load_router(path, tiny)
    x = torch.rand(1, 3, 40, 36)
    assert torch.equal(loaded(x), router(x))
    routing = Routing(loaded, tiny, 0.05)
    name, predicted = routing.choose(x)
    assert name in THREE and set(predicted) == set(THREE)
    expected = (count_flops(tiny, 40, 36, variant="S").paper + count_router_flops(router, 40, 36).paper) / 1e9
    assert routing.gflops("S", 40, 36) == pytest.approx(expected)
    with pytest.raises(RouterError, match=r"another model config: dim 8 \(router\) vs 16"):
        load_router(path, DyNet(DyNetConfig.tiny(dim=16, variants=THREE)))
    with pytest.raises(RouterError, match="another variant set"):
        load_router(path, DyNet(DyNetConfig.tiny(variants={"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)})))
    with pytest.raises(RouterError, match="train one with: python launch/train_router.py"):
        load_router(tmp_path / "none.router.pt", tiny)
