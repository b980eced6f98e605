"""Typed configuration of the DyNet architecture.

One ``DyNetConfig`` describes the whole weight-shared family: the module shapes (dim, heads, prompt
sizes ...) fix the parameters, while ``variants`` only names reuse tuples that the forward pass may
be asked to run. S and L therefore share one state_dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

Reuse = tuple[int, int, int, int]


def _default_variants() -> dict[str, Reuse]:
    return {"S": (2, 3, 3, 4), "L": (4, 6, 6, 8)}


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _as_int_tuple(label: str, value: Any, length: int) -> tuple[int, ...]:
    """Coerce a sequence (YAML gives lists) to a tuple of `length` positive ints, or fail loudly."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{label} must be a sequence of {length} ints, got {value!r}")
    out = tuple(value)
    if len(out) != length or not all(_is_pos_int(v) for v in out):
        raise ValueError(f"{label} must be {length} positive ints, got {value!r}")
    return out


def validate_reuse(reuse: Any, what: str = "reuse") -> Reuse:
    """Return `reuse` as a 4-tuple of positive ints (one reuse frequency per level) or raise."""
    return _as_int_tuple(what, reuse, 4)  # type: ignore[return-value]


@dataclass
class DyNetConfig:
    """Architecture of the DyNet family (defaults: the paper's model, 16,613,135 parameters).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image (must equal in_channels: global residual).
        dim: width of level 1; levels 1..4 are dim * (1, 2, 4, 8) wide.
        heads: attention heads of the transformer blocks on levels 1..4 (decoder level 1 and the
            refinement blocks use heads[0]).
        ffn_expansion: GDFN expansion factor gamma; hidden width is int(C * gamma).
        num_refinement: distinct (unshared) transformer blocks after decoder level 1.
        prompt_len: number L of learnable prompt components mixed by each PromptGen.
        prompt_dims: prompt widths D of the prompt blocks on (e2, e3, latent).
        prompt_sizes: spatial size S of the learnable prompts on (e2, e3, latent).
        prompt_heads: heads of the transformer block inside each prompt block.
        variants: named reuse tuples (f1, f2, f3, f4); any other 4-tuple also runs.
        default_variant: variant used when forward() gets neither reuse nor variant.
        checkpoint_blocks: recompute each shared-block application in backward
            (non-reentrant activation checkpointing) to save memory.
    """

    in_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion: float = 2.66
    num_refinement: int = 4
    prompt_len: int = 5
    prompt_dims: tuple[int, int, int] = (64, 128, 320)
    prompt_sizes: tuple[int, int, int] = (64, 32, 16)
    prompt_heads: int = 4
    variants: dict[str, Reuse] = field(default_factory=_default_variants)
    default_variant: str = "L"
    checkpoint_blocks: bool = False

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "dim", "num_refinement", "prompt_len",
                     "prompt_heads"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"DyNetConfig.{name} must be a positive int, "
                                 f"got {getattr(self, name)!r}")
        if self.in_channels != self.out_channels:
            raise ValueError("DyNetConfig: out_channels must equal in_channels "
                             f"(global residual), got {self.in_channels} and {self.out_channels}")
        # tuples may arrive as lists (YAML); store tuples
        self.heads = _as_int_tuple("DyNetConfig.heads", self.heads, 4)  # type: ignore
        self.prompt_dims = _as_int_tuple(  # type: ignore
            "DyNetConfig.prompt_dims", self.prompt_dims, 3)
        self.prompt_sizes = _as_int_tuple(  # type: ignore
            "DyNetConfig.prompt_sizes", self.prompt_sizes, 3)
        gamma = self.ffn_expansion
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
            raise ValueError(f"DyNetConfig.ffn_expansion must be > 0, got {self.ffn_expansion!r}")
        if not isinstance(self.checkpoint_blocks, bool):
            raise ValueError("DyNetConfig.checkpoint_blocks must be a bool, "
                             f"got {self.checkpoint_blocks!r}")
        if not isinstance(self.variants, Mapping) or not self.variants:
            raise ValueError("DyNetConfig.variants must be a non-empty mapping, "
                             f"got {self.variants!r}")
        self.variants = {str(k): validate_reuse(v, f"DyNetConfig.variants[{k!r}]")
                         for k, v in self.variants.items()}
        if self.default_variant not in self.variants:
            raise ValueError(f"DyNetConfig.default_variant {self.default_variant!r} is not one of "
                             f"the variants {sorted(self.variants)}")
        self._check_widths()

    def _check_widths(self) -> None:
        w = self.widths
        checks = [(f"encoder level {i + 1}", w[i], self.heads[i]) for i in range(4)]
        checks.append(("decoder level 1 / refinement", 2 * w[0], self.heads[0]))
        for name, c_in, d in zip(("e2", "e3", "latent"), (w[1], w[2], w[3]), self.prompt_dims):
            checks.append((f"prompt block on {name}", c_in + d, self.prompt_heads))
        for name, width, heads in checks:
            if width % heads:
                raise ValueError(f"DyNetConfig: {name} width {width} is not divisible by its "
                                 f"{heads} attention heads")

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Channel widths of levels 1..4."""
        return (self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python view (lists for tuples) fit for YAML/JSON; DyNetConfig(**d) round-trips."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["variants"] = {k: list(v) for k, v in self.variants.items()}
        return d

    @classmethod
    def tiny(cls, **overrides: Any) -> "DyNetConfig":
        """A small config for tests: dim 8, short prompts, 1 refinement block (same topology)."""
        kw: dict[str, Any] = dict(dim=8, prompt_dims=(8, 8, 16), prompt_sizes=(16, 8, 4),
                                  num_refinement=1)
        kw.update(overrides)
        return cls(**kw)
