"""DyNet: one weight-shared image-restoration network serving a family of reuse variants."""

from .config import DyNetConfig
from .flops import FlopCount, count_flops, count_parameters
from .inference import crop_to, gray_world, pad_to_multiple, restore_image
from .model import DyNet

__all__ = [
    "DyNet",
    "DyNetConfig",
    "FlopCount",
    "count_flops",
    "count_parameters",
    "crop_to",
    "gray_world",
    "pad_to_multiple",
    "restore_image",
]
