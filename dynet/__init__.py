"""DyNet: one weight-shared image-restoration network serving a family of reuse variants."""

from .config import DyNetConfig
from .flops import FlopCount, count_flops, count_parameters, count_router_flops
from .inference import crop_to, gray_world, pad_to_multiple, restore_image
from .model import DyNet
from .router import RouterConfig, VariantRouter, choose_variant

__all__ = [
    "DyNet",
    "DyNetConfig",
    "RouterConfig",
    "VariantRouter",
    "choose_variant",
    "FlopCount",
    "count_flops",
    "count_parameters",
    "count_router_flops",
    "crop_to",
    "gray_world",
    "pad_to_multiple",
    "restore_image",
]
