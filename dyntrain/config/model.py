"""The ``model`` section: DyNet's architecture itself, plus how this run executes it.

The architecture keys are ``dynet.DyNetConfig``'s own fields, read from that dataclass (names,
types, defaults), never re-declared here, and validated by ``DyNetConfig``'s own checks; the
values are kept in YAML form (lists, not tuples). Two fields differ: ``default_variant`` may stay
null (then "L" if there is one, else the first variant by name), and DyNetConfig's
``checkpoint_blocks`` is the runtime key ``activation_checkpointing``.

``dynet_config_from_dict`` is the one mapping from a stored model dict to a ``DyNetConfig``: it
reads ``DyNetConfig.to_dict()`` (exports, new checkpoints), this section's dict, and the older
section that lacked ``prompt_heads`` and ``default_variant`` (checkpoints and exports written
before issue 10).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from dynet.config import DyNetConfig
from dyntrain.config.typed import ConfigError


# DyNetConfig fields that are not architecture: the config sets them through RUNTIME_FIELDS
_DYNET_RUNTIME = ("checkpoint_blocks",)
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(DyNetConfig) if f.name not in _DYNET_RUNTIME)
# the architecture fields that fix the parameters (variants only name reuse tuples to run)
PARAMETER_FIELDS = tuple(n for n in ARCHITECTURE_FIELDS if n not in ("variants", "default_variant"))


@dataclass
class ModelRuntime:
    """How the model runs (not part of its architecture).

    Args:
        activation_checkpointing: recompute each shared-block application in backward.
        channels_last: channels-last activations.
        compile: compile each block once (no recompile when the variant switches).
    """
    activation_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(ModelRuntime))


class _ModelSection:
    """Behaviour of the generated ``ModelConfig`` dataclass."""

    def __post_init__(self) -> None:
        self.to_dynet()  # DyNetConfig's own validation, errors renamed to model.<key>

    def architecture(self) -> dict[str, Any]:
        """The architecture keys and their values (YAML form)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    def to_dynet(self) -> DyNetConfig:
        """The ``DyNetConfig`` of this section (activation checkpointing as configured)."""
        return dynet_config_from_dict(self.architecture(), checkpoint_blocks=self.activation_checkpointing)


def _architecture_field(f: dataclasses.Field, hints: dict[str, Any], defaults: dict[str, Any]):
    """(name, type, field) of one DyNetConfig field for the config section."""
    if f.name == "default_variant":
        return f.name, Optional[str], dataclasses.field(default=None)
    default = defaults[f.name]
    if isinstance(default, (list, dict)):
        return f.name, hints[f.name], dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
    return f.name, hints[f.name], dataclasses.field(default=default)


def _make_model_config() -> type:
    hints = typing.get_type_hints(DyNetConfig)
    defaults = DyNetConfig().to_dict()
    fields = [_architecture_field(f, hints, defaults) for f in dataclasses.fields(DyNetConfig)
              if f.name in ARCHITECTURE_FIELDS]
    runtime_hints = typing.get_type_hints(ModelRuntime)
    fields += [(f.name, runtime_hints[f.name], dataclasses.field(default=f.default))
               for f in dataclasses.fields(ModelRuntime)]
    cls = dataclasses.make_dataclass("ModelConfig", fields, bases=(_ModelSection,))
    cls.__module__ = __name__
    cls.__doc__ = ("The model section: every architecture field of dynet.DyNetConfig (defaults: the "
                   "paper's model), then ModelRuntime's switches.")
    return cls


ModelConfig = _make_model_config()


def dynet_config_from_dict(stored: Mapping[str, Any], *, checkpoint_blocks: bool = False,
                           where: str = "model") -> DyNetConfig:
    """The ``DyNetConfig`` that a stored model dict describes (any of the forms in the module
    docstring). Runtime keys are ignored, missing architecture keys take DyNetConfig's defaults
    (as the older writers did), a null or missing ``default_variant`` is derived from the variants.
    Raises ``ConfigError`` naming ``where.<key>`` for unknown keys and invalid values."""
    arch = {k: v for k, v in stored.items() if k not in RUNTIME_FIELDS + _DYNET_RUNTIME}
    unknown = sorted(set(arch) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown architecture key {unknown[0]} "
                          f"(known: {', '.join(ARCHITECTURE_FIELDS)})")
    variants = arch.get("variants")
    if arch.get("default_variant") is None:
        arch.pop("default_variant", None)
        if isinstance(variants, Mapping) and variants:
            arch["default_variant"] = "L" if "L" in variants else sorted(variants)[0]
    try:
        return DyNetConfig(**arch, checkpoint_blocks=checkpoint_blocks)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_rename(str(exc), where)) from None


def _rename(message: str, where: str) -> str:
    """DyNetConfig's error text with its field names written as config keys (model.variants.S)."""
    message = message.replace("DyNetConfig.", f"{where}.").replace("DyNetConfig:", f"{where}:")
    return re.sub(r"\.variants\[(['\"])(.*?)\1\]", r".variants.\2", message)
