"""The model's contract with every tool that calls it (kept exactly; other tools rely on it).

Input: a table with a column ``image`` holding base64-encoded PNG or JPEG bytes, one image per row,
any size within the serving limits (``dyntrain.serving.limits``). Output: a table with a column
``image`` holding the restored image as base64-encoded 8-bit RGB PNG, the same size as the input.
The inference parameters (MLflow's ``params=``) and their defaults are ``PARAMS``;
``options_from_params`` checks them and turns them into ``RestoreOptions``.

Only the standard library, numpy and PIL here: the table itself (pandas) is the caller's.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from dyntrain.errors import DyntrainError
from dyntrain.images import read_image
from dyntrain.restore import MIN_TILE, RestoreOptions
from dyntrain.serving.limits import LimitError, ServingLimits, env_name

IMAGE_COLUMN = "image"
AUTO = "auto"
# the formats a row may hold: PNG and JPEG, recognised by their first bytes
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class ContractError(DyntrainError, ValueError):
    """A request that does not follow the contract (no ``image`` column, a row that is not a base64
    PNG/JPEG, an unknown variant or a bad parameter); the message names the row or parameter."""


@dataclass(frozen=True)
class Param:
    """One inference parameter: its name, MLflow type (``string``, ``long``, ``double``,
    ``boolean``), default and meaning."""
    name: str
    kind: str
    default: Any
    doc: str


def params_table(default_variant: str) -> list[Param]:
    """The inference parameters with the training defaults (``launch/restore.py``'s)."""
    opt = RestoreOptions()
    return [
        Param("variant", "string", default_variant,
              "family member (S, L, ... of the model's variants table), or auto: the logged router chooses"),
        Param("tile", "long", -1, "tile side in pixels (multiple of 8); 0 = never tile; -1 = from max_memory_mb"),
        Param("overlap", "long", opt.overlap, "pixels shared by neighbouring tiles"),
        Param("max_memory_mb", "double", opt.max_memory_mb, "activation budget that decides the tile size"),
        Param("gray_world", "boolean", opt.gray_world, "Gray-World colour balance first (hazy photos)"),
        Param("tolerance_db", "double", 0.05, "auto: cheapest variant predicted within this many dB of the largest"),
    ]


def options_from_params(params: Optional[dict[str, Any]], variants: Sequence[str], default_variant: str,
                        has_router: bool, limits: Optional[ServingLimits] = None) -> tuple[RestoreOptions, float]:
    """(RestoreOptions, tolerance_db) of a request's ``params`` (missing ones take their default).
    ContractError naming the parameter for an unknown name or variant or a bad value; LimitError for
    a value outside ``limits`` (the defaults when None): tile, overlap, max_memory_mb."""
    limits = limits or ServingLimits()
    table = {p.name: p for p in params_table(default_variant)}
    given = dict(params or {})
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise ContractError(f"unknown parameter(s) {unknown}; known: {sorted(table)}")
    value = {name: given.get(name, p.default) for name, p in table.items()}
    variant = str(value["variant"])
    if variant == AUTO and not has_router:
        raise ContractError("variant 'auto' needs a router and this model was logged without one; "
                            f"choose one of {list(variants)}")
    if variant != AUTO and variant not in variants:
        raise ContractError(f"unknown variant {variant!r}; this model has {list(variants)}"
                            + (" and auto" if has_router else ""))
    tile = int(value["tile"])
    if tile < -1 or (tile > 0 and tile % 8):
        raise ContractError(f"parameter tile: a multiple of 8, 0 (never tile) or -1 (from max_memory_mb), got {tile}")
    overlap = int(value["overlap"])
    if overlap < 0:
        raise ContractError(f"parameter overlap >= 0 is required, got {overlap}")
    limits.check_tiling(tile if tile > 0 else None, overlap, MIN_TILE)
    memory_mb = limits.memory_mb(float(value["max_memory_mb"]), table["max_memory_mb"].default)
    options = RestoreOptions(variant=variant, tile=None if tile == -1 else tile, overlap=overlap,
                             max_memory_mb=memory_mb, gray_world=bool(value["gray_world"]))
    return options, float(value["tolerance_db"])


@dataclass(frozen=True)
class RowImage:
    """One row's image file, checked but not decoded: its bytes, format and header size."""
    row: int
    data: bytes
    format: str
    width: int
    height: int


def read_rows(rows: Sequence[Any], limits: Optional[ServingLimits] = None) -> list[RowImage]:
    """The ``image`` cells of a request as checked files, nothing decoded: LimitError for too many
    rows or too much text (before any base64 decoding), then for an image or a request over the
    pixel limits (from the headers); ContractError naming the row for a bad cell."""
    limits = limits or ServingLimits()
    limits.check_rows(len(rows), sum(len(v) for v in rows if isinstance(v, (str, bytes, bytearray))))
    images = [read_row(value, i) for i, value in enumerate(rows)]
    limits.check_pixels([(im.row, im.width, im.height) for im in images])
    return images


def read_row(value: Any, row: int) -> RowImage:
    """One cell of the ``image`` column (base64 text or bytes of a PNG/JPEG) -> its file and the size
    its header gives (Pillow's ``Image.open`` reads the header only)."""
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, (bytes, bytearray)):
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} must hold base64 text, got {type(value).__name__}")
    try:
        raw = base64.b64decode(bytes(value), validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} is not valid base64") from None
    fmt = next((f for magic, f in _MAGIC.items() if raw.startswith(magic)), None)
    if fmt is None:
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} holds {len(raw)} bytes that are neither "
                            "PNG nor JPEG")
    try:
        with Image.open(io.BytesIO(raw), formats=[fmt]) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # over twice Pillow's MAX_IMAGE_PIXELS: refused as ours
        raise LimitError(f"row {row}: refused as a decompression bomb (over {env_name('max_pixels')} and "
                         f"Pillow's own limit): {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ContractError(f"row {row}: the image does not decode: {exc}") from None
    return RowImage(row, raw, fmt, width, height)


def decode_image(image: RowImage) -> np.ndarray:
    """A checked row's image -> (H, W, 3) uint8 RGB; ContractError naming the row if it does not decode."""
    try:
        img = read_image(io.BytesIO(image.data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ContractError(f"row {image.row}: the image does not decode: {exc}") from None
    if img.shape[:2] not in ((image.height, image.width), (image.width, image.height)):  # EXIF may turn it
        raise ContractError(f"row {image.row}: the image decodes to {img.shape[1]}x{img.shape[0]}, not the "
                            f"{image.width}x{image.height} of its header")
    return img


def decode_row(value: Any, row: int, limits: Optional[ServingLimits] = None) -> np.ndarray:
    """One cell of the ``image`` column -> (H, W, 3) uint8 RGB, within ``limits`` (the defaults
    when None): ``read_row``, the pixel limit, then ``decode_image``."""
    image = read_row(value, row)
    (limits or ServingLimits()).check_pixels([(row, image.width, image.height)])
    return decode_image(image)


def encode_png(img: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 text of its PNG (what ``launch/restore.py`` writes to a .png)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_file(data: bytes) -> str:
    """Base64 text of an image file's bytes, for building a request."""
    return base64.b64encode(data).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """The inverse of ``encode_png``: base64 PNG text -> (H, W, 3) uint8."""
    return read_image(io.BytesIO(base64.b64decode(text)))


def image_rows(columns: Iterable[str], column_values) -> list:
    """The ``image`` column's cells, or ContractError naming the columns that were sent."""
    columns = list(columns)
    if IMAGE_COLUMN not in columns:
        raise ContractError(f"the input table needs a column {IMAGE_COLUMN!r} (base64 PNG/JPEG, one image "
                            f"per row); it has {columns}")
    return list(column_values(IMAGE_COLUMN))
