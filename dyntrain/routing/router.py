"""Per-image variant routing at inference time: the router file, its compatibility check, the policy
and the FLOP account of a routed forward pass.

A router is saved beside the weights it was trained for: ``dynet.safetensors`` -> ``dynet.router.pt``,
a checkpoint folder ``ckpts/`` -> ``ckpts/router.pt``. The file holds the router's config and weights,
the model config and the variant set of the DyNet it belongs to; loading it for another model config
or variant set fails, naming the mismatch.

Training the router (labels from the fine-tuned model, MLflow) lives in ``dyntrain.routing.train``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dynet.flops import count_flops, count_router_flops
from dynet.router import RouterConfig, VariantRouter, choose_variant
from dyntrain.errors import DyntrainError
from dyntrain.logs import get_logger


log = get_logger(__name__)

ROUTER_FORMAT = "dyntrain-router-1"
# what identifies "the same model" for a router: the architecture, not how it is run
_NOT_ARCH = ("variants", "default_variant", "checkpoint_blocks")
HOW_TO_TRAIN = ("train one with: python launch/train_router.py --checkpoint CKPT --config "
                "configs/finetune_X.yaml (it is saved beside the weights), or pass --router FILE")


class RouterError(DyntrainError, ValueError):
    """A router file that is missing, unreadable, or belongs to another model or variant set."""


def router_path_for(checkpoint: str | Path) -> Path:
    """Where the router of ``checkpoint`` lives: beside a weights file, inside a checkpoint folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / "router.pt"
    return checkpoint.with_suffix(".router.pt")


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The model-config fields a router is tied to (everything but the variant table and run knobs)."""
    return {k: v for k, v in model.config.to_dict().items() if k not in _NOT_ARCH}


def variant_costs(model: torch.nn.Module, size: int = 224) -> dict[str, float]:
    """FLOPs (the paper's convention) of every named variant at size x size: the policy's order."""

    return {v: float(count_flops(model, size, size, variant=v).paper) for v in model.variants}


def save_router(path: str | Path, router: torch.nn.Module, model: torch.nn.Module,
                info: Optional[dict[str, Any]] = None) -> Path:
    """Write ``router`` with the model config and variant set of ``model`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": ROUTER_FORMAT, "router_config": router.config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in router.state_dict().items()},
               "architecture": architecture(model),
               "variants": {k: list(v) for k, v in model.variants.items()}, "info": dict(info or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def check_compatible(payload: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Raise RouterError naming the first difference between the router's model and ``model``."""
    want = {k: list(v) for k, v in model.variants.items()}
    if payload["variants"] != want:
        raise RouterError(f"router {source} was trained for another variant set: router "
                          f"{payload['variants']}, checkpoint {want}")
    have = architecture(model)
    diffs = [f"{k} {payload['architecture'].get(k)!r} (router) vs {have.get(k)!r} (checkpoint)"
             for k in sorted(set(have) | set(payload["architecture"]))
             if payload["architecture"].get(k) != have.get(k)]
    if diffs:
        raise RouterError(f"router {source} was trained for another model config: " + "; ".join(diffs))


def load_router(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """The router at ``path``, checked against ``model``, in eval mode on the model's device."""

    path = Path(path)
    if not path.is_file():
        raise RouterError(f"no router at {path}; {HOW_TO_TRAIN}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RouterError(f"router {path} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ROUTER_FORMAT:
        raise RouterError(f"{path} is not a dyntrain router file (format {ROUTER_FORMAT})")
    check_compatible(payload, model, str(path))
    router = VariantRouter(RouterConfig(**payload["router_config"]))
    router.load_state_dict(payload["state_dict"])
    device = next(model.parameters()).device
    return router.to(device).eval()


@dataclass
class Routing:
    """A loaded router with its policy: ``choose(x)`` -> (variant, predicted dB lost per variant).

    Args:
        router: a VariantRouter over ``model``'s variants.
        model: the DyNet it routes for (its FLOP counts give the policy's cost order).
        tolerance_db: largest predicted loss against the largest variant that is accepted.
    """
    router: torch.nn.Module
    model: torch.nn.Module
    tolerance_db: float = 0.05
    costs: dict[str, float] = field(default_factory=dict)
    _flops: dict[tuple, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.costs:
            self.costs = variant_costs(self.model)

    @property
    def names(self) -> list[str]:
        return list(self.router.config.variants)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] -> predicted dB lost by each variant, (V,)."""
        return self.router(x.float())[0].cpu()

    def choose(self, x: torch.Tensor) -> tuple[str, dict[str, float]]:
        predicted = self.predict(x)
        name = choose_variant(predicted, self.names, self.costs, self.tolerance_db)
        return name, {n: float(p) for n, p in zip(self.names, predicted)}

    def gflops(self, variant: str, height: int, width: int) -> float:
        """GFLOPs of routing one height x width image and running ``variant`` on it (paper convention)."""

        key = (variant, height, width)
        if key not in self._flops:
            dynet = count_flops(self.model, height, width, variant=variant).paper
            self._flops[key] = (dynet + count_router_flops(self.router, height, width).paper) / 1e9
        return self._flops[key]


def load_routing(checkpoint: str | Path, model: torch.nn.Module, router_path: Optional[str | Path] = None,
                 tolerance_db: float = 0.05) -> Routing:
    """``--variant auto``: the router of ``checkpoint`` (or ``router_path``) with its policy."""
    path = Path(router_path) if router_path else router_path_for(checkpoint)
    if not path.is_file():
        raise RouterError(f"--variant auto needs a router and there is none at {path}; {HOW_TO_TRAIN}")
    routing = Routing(load_router(path, model), model, tolerance_db)
    log.info("router %s: variants %s, tolerance %.3f dB", path, routing.names, tolerance_db)
    return routing
