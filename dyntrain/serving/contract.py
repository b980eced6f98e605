"""The model's contract with every tool that calls it (kept exactly; other tools rely on it).

Input: a table with a column ``image`` holding base64-encoded PNG or JPEG bytes, one image per row,
any size. Output: a table with a column ``image`` holding the restored image as base64-encoded 8-bit
RGB PNG, the same size as the input. The inference parameters (MLflow's ``params=``) and their
defaults are ``PARAMS``; ``options_from_params`` checks them and turns them into ``RestoreOptions``.

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
from dyntrain.restore import RestoreOptions

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
                        has_router: bool) -> tuple[RestoreOptions, float]:
    """(RestoreOptions, tolerance_db) of a request's ``params`` (missing ones take their default).
    ContractError naming the parameter for an unknown name or variant, or a value out of range."""
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
    if int(value["overlap"]) < 0 or float(value["max_memory_mb"]) <= 0:
        raise ContractError("parameters overlap >= 0 and max_memory_mb > 0 are required, got "
                            f"{value['overlap']} and {value['max_memory_mb']}")
    options = RestoreOptions(variant=variant, tile=None if tile == -1 else tile, overlap=int(value["overlap"]),
                             max_memory_mb=float(value["max_memory_mb"]), gray_world=bool(value["gray_world"]))
    return options, float(value["tolerance_db"])


def decode_row(value: Any, row: int) -> np.ndarray:
    """One cell of the ``image`` column (base64 text or bytes of a PNG/JPEG) -> (H, W, 3) uint8 RGB."""
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, (bytes, bytearray)):
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} must hold base64 text, got {type(value).__name__}")
    try:
        raw = base64.b64decode(bytes(value), validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} is not valid base64") from None
    if not any(raw.startswith(magic) for magic in _MAGIC):
        raise ContractError(f"row {row}: column {IMAGE_COLUMN!r} holds {len(raw)} bytes that are neither "
                            "PNG nor JPEG")
    try:
        return read_image(io.BytesIO(raw))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ContractError(f"row {row}: the image does not decode: {exc}") from None


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
