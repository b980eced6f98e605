"""Convert state_dicts between the reference layout and dyntrain's, strictly and exactly.

``from_reference`` takes a reference state_dict (prefixes such as Lightning's ``net.`` or DDP's
``module.`` already stripped, see ``strip_prefixes``), reads the architecture off its shapes, and
returns dyntrain's state_dict, that architecture and the unused parameters it dropped. Every other
name must map and every shape must fit: the first problems are named in one error and nothing is
returned half done. ``to_reference`` is the inverse; it adds the three unused convolutions as zeros.
Tensors are moved, never recomputed (the prompts only gain or lose a leading axis of 1), so a round
trip gives the same bits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from dynet import DyNet, DyNetConfig
from dyntrain.checkpoint import CheckpointError
from dyntrain.interop.names import is_prompt, is_unused, name_table, unused_shapes


# prefixes that wrappers put in front of the model's own names, outermost first
WRAPPER_PREFIXES = ("module.", "net.", "model.")
# names only the reference layout has (dyntrain calls them enc1.norm1.weight, patch_embed.weight)
_REFERENCE_MARKERS = ("encoder_level1.norm1.body.weight", "patch_embed.proj.weight")


class ReferenceFormatError(CheckpointError):
    """A reference-layout file that cannot be converted; the message names the key."""


@dataclass
class Imported:
    """A converted reference state_dict and what the conversion found."""

    state_dict: dict[str, torch.Tensor]
    config: DyNetConfig
    dropped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unused parameter -> shape
    prefix: str = ""  # wrapper prefix that was stripped ("net.", "module.net.", ...)

    def dropped_note(self) -> str:
        names = ", ".join(f"{k} {tuple(v)}" for k, v in sorted(self.dropped.items()))
        return (f"dropped {len(self.dropped)} parameters the reference model registers but never uses: {names}"
                if self.dropped else "no unused reference parameters found")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove wrapper prefixes shared by every key (``module.``, ``net.``, ``model.``, nested)."""
    state, stripped = dict(state), ""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, stripped


def looks_like_reference(names: Iterable[str]) -> bool:
    """Whether these (prefix-stripped) names are the reference layout rather than dyntrain's."""
    names = set(names)
    return any(marker in names for marker in _REFERENCE_MARKERS)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ReferenceFormatError(f"{source}: reference key {key!r} is missing (it fixes the architecture); "
                                   "is this DyNet with decoder=True?")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ReferenceFormatError(f"{source}: reference key {key!r} has shape {shape}, expected {ndim} axes")
    return shape


def infer_config(state: Mapping[str, torch.Tensor], source: str = "reference state_dict") -> DyNetConfig:
    """The dyntrain architecture of a reference state_dict, read off its shapes (the reuse variants
    are the paper's S and L, which the reference classes hard-code)."""
    embed = _shape(state, "patch_embed.proj.weight", source, 4)
    out = _shape(state, "output.weight", source, 4)
    heads = tuple(_shape(state, f"{name}.attn.temperature", source, 3)[0]
                  for name in ("encoder_level1", "encoder_level2", "encoder_level3", "latent"))
    prompts = [_shape(state, f"prompt{i}.prompt_param", source, 5) for i in (1, 2, 3)]
    refinement = {int(m.group(1)) for k in state if (m := re.match(r"refinement\.(\d+)\.", k))}
    try:
        return DyNetConfig(
            in_channels=embed[1], out_channels=out[0], dim=embed[0], heads=heads,
            num_refinement=len(refinement), prompt_len=prompts[0][1],
            prompt_dims=tuple(p[2] for p in prompts), prompt_sizes=tuple(p[3] for p in prompts),
            prompt_heads=_shape(state, "noise_level1.attn.temperature", source, 3)[0])
    except ValueError as exc:
        raise ReferenceFormatError(f"{source}: the shapes describe no valid DyNet: {exc}") from exc


def _expected_shapes(config: DyNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DyNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _problem_line(source: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{source}: " + "; ".join(problems[:3]) + more


def from_reference(state: Mapping[str, torch.Tensor], source: str = "reference state_dict",
                   config: DyNetConfig | None = None) -> Imported:
    """dyntrain's state_dict for a reference one (wrapper prefixes are stripped here too)."""
    state, prefix = strip_prefixes(state)
    config = config or infer_config(state, source)
    expected = _expected_shapes(config)
    table = name_table(expected)  # ours -> reference
    by_ref = {ref: ours for ours, ref in table.items()}
    dropped = {k: tuple(v.shape) for k, v in state.items() if is_unused(k)}
    problems = [f"key {k!r} {tuple(v.shape)} has no counterpart in DyNet" for k, v in state.items()
                if k not in by_ref and not is_unused(k)]
    problems += [f"key {ref!r} (DyNet's {ours!r}, shape {expected[ours]}) is missing"
                 for ours, ref in table.items() if ref not in state]
    out: dict[str, torch.Tensor] = {}
    for ours, ref in table.items():
        if ref not in state:
            continue
        tensor = state[ref]
        if is_prompt(ours) and tensor.dim() == len(expected[ours]) + 1 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tuple(tensor.shape) != expected[ours]:
            problems.append(f"key {ref!r} has shape {tuple(state[ref].shape)}, DyNet's {ours!r} needs "
                            f"{expected[ours]}")
        out[ours] = tensor
    if problems:
        raise ReferenceFormatError(_problem_line(source, problems))
    return Imported(out, config, dropped, prefix)


def to_reference(state: Mapping[str, torch.Tensor], config: DyNetConfig,
                 source: str = "DyNet state_dict") -> dict[str, torch.Tensor]:
    """The reference layout of a dyntrain state_dict (plus the unused convolutions, as zeros)."""
    expected = _expected_shapes(config)
    table = name_table(expected)
    problems = [f"key {k!r} is not a parameter of DyNet" for k in state if k not in table]
    problems += [f"key {k!r} is missing" for k in table if k not in state]
    problems += [f"key {k!r} has shape {tuple(state[k].shape)}, the config needs {expected[k]}"
                 for k in table if k in state and tuple(state[k].shape) != expected[k]]
    if problems:
        raise ReferenceFormatError(_problem_line(source, problems))
    out = {}
    for ours, ref in table.items():
        tensor = state[ours]
        out[ref] = tensor.unsqueeze(0) if is_prompt(ours) else tensor
    dtype = next(iter(state.values())).dtype if state else torch.float32
    for name, shape in unused_shapes(config.dim).items():
        out[name] = torch.zeros(shape, dtype=dtype)
    return out
