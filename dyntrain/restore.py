"""Restore users' images with any member of the DyNet family from one weights file.

``load_model`` turns a checkpoint (DeepSpeed folder, exported .pt/.safetensors) into a DyNet in eval
mode; the variant (S, L, or any reuse tuple) is chosen per call. ``restore_paths`` maps a file or a
folder of PNG/JPEG images to outputs, processing large images in overlapping tiles so that the
activations stay within a memory budget, optionally after a Gray-World colour balance (for hazy
photos). Runs on the GPU when there is one, on the CPU otherwise.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from dynet import DyNet
from dynet.inference import gray_world, restore_image
from dyntrain.checkpoint.weights import checkpoint_info
from dyntrain.config import Config, dynet_config_from_dict
from dyntrain.errors import ConfigError
from dyntrain.images import IMAGE_EXTS, list_images, read_image as _decode_image, to_tensor
from dyntrain.interop import read_weights
from dyntrain.logs import get_logger
from dyntrain.progress import progress_bar


MIN_TILE = 64
log = get_logger(__name__)


# --------------------------------------------------------------------------------- loading
def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about its run: {"step", "mlflow_run_id", ...} where known, else {}."""

    try:
        return checkpoint_info(path)
    except Exception:  # a plain state_dict file records nothing
        return {}


def load_model(path: str | Path, device: torch.device | str = "cpu", cfg: Optional[Config] = None,
               strict: bool = True) -> torch.nn.Module:
    """The DyNet stored at ``path``, in eval mode on ``device``. The architecture comes from the
    checkpoint; ``cfg.model`` is used only when the checkpoint carries none."""


    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state, model_cfg = read_weights(path)  # dyntrain's own files or the authors' reference layout
    if model_cfg:
        dyncfg = dynet_config_from_dict(model_cfg, where=f"checkpoint {path}: model")
    elif cfg is not None:
        dyncfg = dynet_config_from_dict(cfg.model.architecture())
    else:
        raise ConfigError(f"checkpoint {path} carries no model config; pass --config with a model section")
    model = DyNet(dyncfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()


# ------------------------------------------------------------------------ memory and tiles
def estimate_bytes_per_pixel(model: torch.nn.Module) -> float:
    """Peak activation bytes per input pixel of an inference forward pass (float32).

    The peak sits in the full-resolution decoder/refinement block (width 2*dim): its residual stream,
    the layer-norm output and the feed-forward's 2*hidden projection and depthwise output, plus the
    gated product — about 40*dim floats per pixel with hidden = 2.66*2*dim — and the skip e1.
    S and L share this figure: a shared block applied again reuses freed memory.
    """
    dim = model.config.dim
    hidden = int(2 * dim * model.config.ffn_expansion)
    floats = 2 * dim * 3 + 4 * hidden + hidden + dim + 12  # residual, LN, skip; GDFN in+dw; gate; images
    return 4.0 * floats * 1.5  # allocator slack and fixed overheads (measured: ~8.7 KB/pixel at dim 48)


@torch.no_grad()
def measure_bytes_per_pixel(model: torch.nn.Module, device: torch.device, variant: str | None = None,
                            side: int = 128) -> Optional[float]:
    """Measured peak CUDA bytes per pixel on a probe image (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model(torch.rand(1, 3, side, side, device=device), variant=variant)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / (side * side)


def tile_for_budget(bytes_per_pixel: float, budget_bytes: float, height: int, width: int,
                    overlap: int, multiple: int = 8) -> Optional[int]:
    """None when the whole image fits the budget, else the largest tile side (a multiple of
    ``multiple``, at least MIN_TILE and more than twice the overlap) that does."""
    if height * width * bytes_per_pixel <= budget_bytes:
        return None
    side = int(math.sqrt(budget_bytes / bytes_per_pixel)) // multiple * multiple
    floor = max(MIN_TILE, (2 * overlap // multiple + 1) * multiple)
    return max(side, floor)


# ------------------------------------------------------------------------------- file I/O
def read_image(path: str | Path) -> np.ndarray:
    try:
        return _decode_image(path)
    except OSError as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc


def write_image(img: np.ndarray, path: str | Path, jpeg_quality: int = 95) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(img).save(path, quality=jpeg_quality, subsampling=0)
    else:
        Image.fromarray(img).save(path)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1) * 255.0).round_().byte().permute(1, 2, 0).cpu().numpy()


@dataclass
class RestoreOptions:
    """Args:
    variant: family member to run ("S", "L", ... from the checkpoint's variants table).
    tile: tile side (multiple of 8); 0 = never tile; None = choose from ``max_memory_mb``.
    overlap: pixels shared by neighbouring tiles.
    max_memory_mb: activation budget used to choose the tile when ``tile`` is None.
    gray_world: Gray-World colour balance of the input before restoration (hazy photos).
    """
    variant: str = "L"
    tile: Optional[int] = None
    overlap: int = 32
    max_memory_mb: float = 4096.0
    gray_world: bool = False


@dataclass(frozen=True)
class TilePlan:
    """How one image is run: ``tile`` (None: whole), the ``overlap`` used, the number of model
    ``passes`` and the pixels of the largest pass (the padded image, or one tile)."""
    tile: Optional[int]
    overlap: int
    passes: int
    pass_pixels: int


def _tiles_along(size: int, tile: int, stride: int) -> int:
    """How many tiles ``dynet.inference.restore_image`` runs along a side of ``size`` pixels."""
    return 1 if size <= tile else -(-(size - tile) // stride) + 1


class Restorer:
    """Restores uint8 images with one model; picks tiles per image from the memory budget.

    ``bytes_per_pixel`` (activation bytes per input pixel) is measured on CUDA, estimated elsewhere,
    unless given (a server measures it once per variant)."""

    def __init__(self, model: torch.nn.Module, options: RestoreOptions, device: torch.device,
                 bytes_per_pixel: Optional[float] = None) -> None:
        if options.variant not in model.variants:
            raise ValueError(f"unknown variant {options.variant!r}; the checkpoint has {sorted(model.variants)}")
        self.model, self.options, self.device = model, options, device
        if bytes_per_pixel is None:
            measured = measure_bytes_per_pixel(model, device, options.variant)
            bytes_per_pixel = measured * 1.1 if measured else estimate_bytes_per_pixel(model)
        self.bytes_per_pixel = bytes_per_pixel

    def tile_for(self, height: int, width: int) -> Optional[int]:
        opt = self.options
        if opt.tile is not None:
            return opt.tile or None
        return tile_for_budget(self.bytes_per_pixel, opt.max_memory_mb * 2 ** 20, height, width, opt.overlap)

    def plan(self, height: int, width: int, multiple: int = 8) -> TilePlan:
        """The tiling of a height x width image, known before it is decoded (what ``__call__`` runs)."""
        tile = self.tile_for(height, width)
        if tile is not None and tile >= max(height, width):
            tile = None  # one tile would cover the whole image
        padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        if tile is None:
            return TilePlan(None, self.options.overlap, 1, padded_h * padded_w)
        overlap = min(self.options.overlap, tile - multiple)
        tile_h, tile_w = min(tile, padded_h), min(tile, padded_w)
        passes = _tiles_along(padded_h, tile_h, tile - overlap) * _tiles_along(padded_w, tile_w, tile - overlap)
        return TilePlan(tile, overlap, passes, tile_h * tile_w)

    @torch.no_grad()
    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, Optional[int]]:
        x = to_tensor(img, self.device)
        if self.options.gray_world:
            x = gray_world(x)
        plan = self.plan(*img.shape[:2])
        y = restore_image(self.model, x, variant=self.options.variant, tile=plan.tile, overlap=plan.overlap)
        return to_uint8(y), plan.tile


def plan_outputs(src: str | Path, dst: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) file pairs: file -> file (or into an existing folder), folder -> folder
    (relative paths kept; outputs keep the input's extension)."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        if dst.is_dir() or str(dst).endswith(("/", "\\")):
            return [(src, dst / src.name)]
        if dst.suffix.lower() not in IMAGE_EXTS:
            raise ValueError(f"output {dst}: use a .png/.jpg/.jpeg file name or an existing folder")
        return [(src, dst)]
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise ValueError(f"input folder {src} holds no PNG/JPEG images")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"output {dst} must be a folder when the input {src} is a folder")
        return [(p, dst / p.relative_to(src)) for p in files]
    raise FileNotFoundError(f"input {src} does not exist")


def restore_paths(model: torch.nn.Module, src: str | Path, dst: str | Path, options: RestoreOptions,
                  device: torch.device, printer: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Restore every image of ``src`` into ``dst``; one line per image to ``printer`` (default: an
    INFO log line) under a progress bar (rank 0, on a terminal); returns the records."""

    say = printer if printer is not None else log.info
    restorer = Restorer(model, options, device)
    records = []
    pairs = plan_outputs(src, dst)
    with progress_bar(len(pairs), f"DyNet-{options.variant}") as bar:
        for inp, out in pairs:
            img = read_image(inp)
            start = time.perf_counter()
            restored, tile = restorer(img)
            seconds = time.perf_counter() - start
            write_image(restored, out)
            rec = {"input": str(inp), "output": str(out), "height": img.shape[0], "width": img.shape[1],
                   "tile": tile, "seconds": seconds}
            records.append(rec)
            say(f"{inp} -> {out}  {img.shape[1]}x{img.shape[0]}  DyNet-{options.variant}  "
                f"{'tiles ' + str(tile) if tile else 'whole image'}  {seconds:.2f}s")
            bar.update()
    return records
