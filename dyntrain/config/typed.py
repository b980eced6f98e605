"""Type-checked building of the config tree from plain YAML data.

``build(tp, value, key)`` checks ``value`` against the annotation ``tp`` (dataclasses recursively,
Optional/Union, Literal, list/tuple, dict, bool/int/float/str) and returns the converted value;
every failure is a ``ConfigError`` that names the dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from dyntrain.errors import ConfigError


def positive(key: str, value: int) -> None:
    """Fail unless ``value`` is a positive integer (``key`` names it in the error)."""
    if value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value}")


def build(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (dataclasses recursively)."""
    label = key or "<config>"
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, label)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return build(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{label}: {value!r} matches none of {str(tp).replace('typing.', '')}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{label}: expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{label}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        return [build(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {build(kt, k, f"{key}.{k}"): build(vt, v, f"{key}.{k}") for k, v in value.items()}
    return _build_scalar(tp, value, label)


def _build_dataclass(tp: Any, value: Any, key: str, label: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    known = {f.name for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - known)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {name: build(hints[name], v, f"{key}.{name}" if key else name) for name, v in value.items()}
    try:
        return tp(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _build_scalar(tp: Any, value: Any, label: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{label}: unsupported type {tp}")  # pragma: no cover - schema bug
