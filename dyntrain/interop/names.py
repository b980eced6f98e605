"""The name table between dyntrain's DyNet and the authors' reference code (``DyNet_large`` /
``DyNet_small`` with ``decoder=True``; both classes register the same parameters).

The two models hold the same weights under other names:

    dyntrain                      reference
    patch_embed.weight            patch_embed.proj.weight
    enc1 / enc2 / enc3 / latent   encoder_level1 / encoder_level2 / encoder_level3 / latent
    down1 / down2 / down3 .0      down1_2 / down2_3 / down3_4 .body.0
    prompt_latent .gen/.block/.proj    prompt3 / noise_level3 / reduce_noise_level3
    prompt3 (on e3)  .gen/.block/.proj  prompt2 / noise_level2 / reduce_noise_level2
    prompt2 (on e2)  .gen/.block/.proj  prompt1 / noise_level1 / reduce_noise_level1
    up_latent / up3 / up2 .0      up4_3 / up3_2 / up2_1 .body.0
    reduce3 / reduce2             reduce_chan_level3 / reduce_chan_level2
    dec3 / dec2 / dec1            decoder_level3 / decoder_level2 / decoder_level1
    refinement.N, output          the same

inside every transformer block ``normK.weight|bias`` is ``normK.body.weight|bias``, ``attn.qkv_dw``
is ``attn.qkv_dwconv`` and ``attn.proj`` is ``attn.project_out``; inside a prompt generator
``prompt`` (L, D, S, S) is ``prompt_param`` (1, L, D, S, S), ``linear`` is ``linear_layer`` and
``conv`` is ``conv3x3``. The one change of shape is that leading 1 of the prompts.

The reference also registers three 1x1 convolutions its forward never calls
(``reduce_noise_channel_1..3``): they are reported and dropped on import, and written as zeros on
export so that the authors' strict loader finds every name it expects.

The table is derived from the keys of a dyntrain model, so it covers any architecture the config
allows (the tests check it against the reference's own names and shapes).
"""
from __future__ import annotations

import re
from typing import Iterable

from dynet import DyNetConfig


# dyntrain prefix -> (reference prefix, kind of module under it)
_TOP: tuple[tuple[str, str, str], ...] = (
    ("patch_embed.", "patch_embed.proj.", "plain"),
    ("enc1.", "encoder_level1.", "block"),
    ("enc2.", "encoder_level2.", "block"),
    ("enc3.", "encoder_level3.", "block"),
    ("latent.", "latent.", "block"),
    ("down1.0.", "down1_2.body.0.", "plain"),
    ("down2.0.", "down2_3.body.0.", "plain"),
    ("down3.0.", "down3_4.body.0.", "plain"),
    ("prompt_latent.gen.", "prompt3.", "gen"),
    ("prompt_latent.block.", "noise_level3.", "block"),
    ("prompt_latent.proj.", "reduce_noise_level3.", "plain"),
    ("up_latent.0.", "up4_3.body.0.", "plain"),
    ("prompt3.gen.", "prompt2.", "gen"),
    ("prompt3.block.", "noise_level2.", "block"),
    ("prompt3.proj.", "reduce_noise_level2.", "plain"),
    ("reduce3.", "reduce_chan_level3.", "plain"),
    ("dec3.", "decoder_level3.", "block"),
    ("up3.0.", "up3_2.body.0.", "plain"),
    ("prompt2.gen.", "prompt1.", "gen"),
    ("prompt2.block.", "noise_level1.", "block"),
    ("prompt2.proj.", "reduce_noise_level1.", "plain"),
    ("reduce2.", "reduce_chan_level2.", "plain"),
    ("dec2.", "decoder_level2.", "block"),
    ("up2.0.", "up2_1.body.0.", "plain"),
    ("dec1.", "decoder_level1.", "block"),
    ("refinement.", "refinement.", "refinement"),
    ("output.", "output.", "plain"),
)

# renames inside one module, dyntrain -> reference
_INSIDE = {
    "block": {"norm1.weight": "norm1.body.weight", "norm1.bias": "norm1.body.bias",
              "norm2.weight": "norm2.body.weight", "norm2.bias": "norm2.body.bias",
              "attn.qkv_dw.weight": "attn.qkv_dwconv.weight", "attn.proj.weight": "attn.project_out.weight"},
    "gen": {"prompt": "prompt_param", "linear.weight": "linear_layer.weight", "linear.bias": "linear_layer.bias",
            "conv.weight": "conv3x3.weight"},
}

# parameters the reference registers and never uses: name -> shape as a function of dim
UNUSED_PREFIX = "reduce_noise_channel_"


def unused_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the reference's three dead 1x1 convolutions for level-1 width ``dim``."""
    return {f"{UNUSED_PREFIX}{i}.weight": (w, w + extra, 1, 1)
            for i, (w, extra) in enumerate(((dim, 64), (2 * dim, 128), (4 * dim, 256)), start=1)}


def is_unused(name: str) -> bool:
    return name.startswith(UNUSED_PREFIX)


def is_prompt(ours: str) -> bool:
    """True for a stored prompt tensor: (L, D, S, S) here, (1, L, D, S, S) in the reference."""
    return ours.endswith(".gen.prompt")


def reference_name(ours: str) -> str:
    """The reference's name for dyntrain parameter ``ours``; KeyError when there is none."""
    for prefix, ref_prefix, kind in _TOP:
        if not ours.startswith(prefix):
            continue
        rest = ours[len(prefix):]
        if kind == "refinement":  # refinement.N.<block parameter>
            m = re.fullmatch(r"(\d+)\.(.+)", rest)
            if m is None:
                break
            index, rest = m.group(1) + ".", m.group(2)
            return ref_prefix + index + _INSIDE["block"].get(rest, rest)
        return ref_prefix + _INSIDE.get(kind, {}).get(rest, rest)
    raise KeyError(f"no reference name for DyNet parameter {ours!r}")


def name_table(our_names: Iterable[str]) -> dict[str, str]:
    """{dyntrain name: reference name} for every given dyntrain name; the map is one to one."""
    table = {ours: reference_name(ours) for ours in our_names}
    if len(set(table.values())) != len(table):
        raise AssertionError("the reference name table maps two DyNet parameters to one name")
    return table


# The architecture the authors' code builds (its widths of the prompt path are constants there).
REFERENCE_ARCHITECTURE = {
    "in_channels": 3, "out_channels": 3, "dim": 48, "heads": [1, 2, 4, 8], "ffn_expansion": 2.66,
    "num_refinement": 4, "prompt_len": 5, "prompt_dims": [64, 128, 320], "prompt_sizes": [64, 32, 16],
    "prompt_heads": 4,
}


def architecture_differences(config: DyNetConfig) -> list[str]:
    """How ``config`` differs from the model the reference code builds ("key: ours vs reference")."""
    ours = config.to_dict()
    return [f"{k}: {ours[k]} vs {v}" for k, v in REFERENCE_ARCHITECTURE.items() if ours[k] != v]
