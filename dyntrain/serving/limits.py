"""The serving limits: what one request to the served model may ask for, checked before it costs
memory or time.

A request is refused (``LimitError``; MLflow's scoring server answers 400 with the message, which names
the limit and its environment variable) when it has too many rows, too much image text, an image
over the pixel limit (read from the file's header, before it is decoded), too many pixels in all,
a parameter out of range, or a tiling that needs more model passes or more activation memory than
allowed. The limits are read from the environment of the server (``DYNTRAIN_SERVE_<NAME>``, the
field name in upper case) when the model is loaded; ``docs/tracking.md#serving-limits`` lists them.

Only the standard library here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from dyntrain.errors import DyntrainError

ENV_PREFIX = "DYNTRAIN_SERVE_"
OVERLAP_FRACTION = 4     # an explicit tile shares at most tile // 4 pixels with its neighbour
MB = 2 ** 20


class LimitError(DyntrainError, ValueError):
    """A request over a serving limit; the message names the limit (its environment variable)."""


@dataclass(frozen=True)
class ServingLimits:
    """Args (each settable as ``DYNTRAIN_SERVE_<NAME>``):
    max_pixels: pixels of one image (its header's width x height); 4096 x 4096 by default.
    max_request_pixels: pixels of all the images of one request together.
    max_rows: images (rows) in one request.
    max_request_mb: MB of base64 text in the ``image`` column of one request.
    max_memory_mb: the server's activation budget; a request's ``max_memory_mb`` may not exceed it,
        and one model pass (a tile, or the whole image with ``tile=0``) must fit the request's.
    max_tile: largest explicit ``tile``.
    max_overlap: largest ``overlap`` (an explicit tile also bounds it to tile // 4).
    max_tiles: model passes (tiles) of one request, over all its images.
    concurrency: requests a server process restores at the same time; the others wait for a slot
        (at most MLflow's request timeout, then 503).
    """
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 2 * 4096 * 4096
    max_rows: int = 16
    max_request_mb: float = 128.0
    max_memory_mb: float = 4096.0
    max_tile: int = 2048
    max_overlap: int = 128
    max_tiles: int = 1024
    concurrency: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LimitError(f"serving limit {env_name(f.name)} must be a positive number, got {value!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "ServingLimits":
        """The defaults, overridden by ``DYNTRAIN_SERVE_<NAME>`` variables; LimitError naming the
        variable for a value that is not a positive number."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            text = environ.get(env_name(f.name))
            if text is None or not text.strip():
                continue
            kind = int if f.type in (int, "int") else float
            try:
                values[f.name] = kind(text)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise LimitError(f"serving limit {env_name(f.name)}={text!r} is not {what}") from None
        return cls(**values)

    def check_rows(self, rows: int, text_bytes: int) -> None:
        """Rows and image text of one request, before any row is decoded."""
        if rows > self.max_rows:
            raise LimitError(f"the request has {rows} rows (images), over {env_name('max_rows')}={self.max_rows}")
        if text_bytes > self.max_request_mb * MB:
            raise LimitError(f"the request's image column holds {text_bytes / MB:.1f} MB, over "
                             f"{env_name('max_request_mb')}={self.max_request_mb:g} MB")

    def check_pixels(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        """(row, width, height) of each image, read from its header: per image, then the request's sum."""
        for row, width, height in sizes:
            if width * height > self.max_pixels:
                raise LimitError(f"row {row}: the image is {width}x{height} = {width * height} pixels, over "
                                 f"{env_name('max_pixels')}={self.max_pixels}")
        total = sum(w * h for _, w, h in sizes)
        if total > self.max_request_pixels:
            raise LimitError(f"the request's images hold {total} pixels together, over "
                             f"{env_name('max_request_pixels')}={self.max_request_pixels}")

    def memory_mb(self, requested: float, default: float) -> float:
        """A request's ``max_memory_mb``: at most the server's budget. The signature's default
        (MLflow fills it in when the parameter is not sent) stands for the server's budget when
        that is smaller; any other value over it is refused."""
        if not requested > 0:  # also NaN
            raise LimitError(f"parameter max_memory_mb must be > 0, got {requested}")
        if requested <= self.max_memory_mb:
            return requested
        if requested == default:
            return self.max_memory_mb
        raise LimitError(f"parameter max_memory_mb={requested:g} is over this server's budget "
                         f"{env_name('max_memory_mb')}={self.max_memory_mb:g}")

    def check_tiling(self, tile: Optional[int], overlap: int, min_tile: int) -> None:
        """``tile`` (None: from max_memory_mb; 0: whole image) and ``overlap`` within their ranges."""
        if tile and not min_tile <= tile <= self.max_tile:
            raise LimitError(f"parameter tile={tile} is out of [{min_tile}, {self.max_tile}] (the upper end is "
                             f"{env_name('max_tile')}); 0 = never tile, -1 = from max_memory_mb")
        if overlap > self.max_overlap:
            raise LimitError(f"parameter overlap={overlap} is over {env_name('max_overlap')}={self.max_overlap}")
        if tile and overlap > tile // OVERLAP_FRACTION:
            raise LimitError(f"parameter overlap={overlap} is over a quarter of tile={tile} "
                             f"(at most {tile // OVERLAP_FRACTION})")

    def check_passes(self, plans: Sequence[tuple[int, int, Optional[int]]], bytes_per_pixel: float,
                     memory_mb: float, tile: Optional[int]) -> None:
        """The tiling of each image, before it is decoded: ``plans`` holds (passes, pixels of the
        largest pass, tile used) per row, for the requested ``tile`` (None: from ``memory_mb``).
        One pass's activations (``bytes_per_pixel`` x its pixels) must fit ``memory_mb``; the
        passes of all rows together stay within ``max_tiles``."""
        for row, (_, pass_pixels, used) in enumerate(plans):
            need = pass_pixels * bytes_per_pixel / MB
            if need <= memory_mb:
                continue
            if tile == 0:
                what, fix = "the whole image (tile=0)", "use tile=-1 (the default) to tile it"
            elif tile:
                what, fix = f"one tile of {tile} px", "use a smaller tile, or tile=-1 (the default)"
            else:
                what, fix = f"the smallest tile ({used} px)", "raise max_memory_mb"
            raise LimitError(f"row {row}: {what} needs about {need:.0f} MB of activations, over max_memory_mb="
                             f"{memory_mb:g} (this server's budget: {env_name('max_memory_mb')}="
                             f"{self.max_memory_mb:g}); {fix}")
        total = sum(passes for passes, _, _ in plans)
        if total > self.max_tiles:
            raise LimitError(f"the request needs {total} model passes (tiles), over {env_name('max_tiles')}="
                             f"{self.max_tiles}; use a larger tile or max_memory_mb, or a smaller overlap")


def env_name(field: str) -> str:
    """The environment variable of a limit: ``max_pixels`` -> ``DYNTRAIN_SERVE_MAX_PIXELS``."""
    return ENV_PREFIX + field.upper()
