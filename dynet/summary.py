"""Print the DyNet family's parameters and FLOPs, like the paper's Table 5.

    python -m dynet.summary [--size 224] [--height H --width W] [--variants S L 3,4,4,6 XS=1,1,1,1]
                            [--dim 48] [--json PATH]

A variant is a name from the config's variants table, an explicit reuse tuple "f1,f2,f3,f4", or a
named one "NAME=f1,f2,f3,f4" (e.g. a family XS=1,1,1,1 S M=3,4,4,6 L). One line gives the cost
of the per-image variant router (dynet.router) at the same size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Container, Sequence

from .blocks import PromptBlock
from .config import DyNetConfig
from .flops import count_flops, count_parameters, count_router_flops
from .model import DyNet
from .router import RouterConfig, VariantRouter


def _parse_variant(model: DyNet, spec: str) -> tuple[str, tuple[int, ...]]:
    """A variant name, "f1,f2,f3,f4" or "NAME=f1,f2,f3,f4" -> (label, reuse tuple)."""
    if "=" in spec:
        name, _, tuple_spec = spec.partition("=")
        return name, _parse_variant(model, tuple_spec)[1]
    if "," in spec:
        try:
            reuse = tuple(int(v) for v in spec.split(","))
        except ValueError:
            raise ValueError(f"cannot parse reuse tuple {spec!r}; expected e.g. 3,4,4,6") from None
        return spec, model.resolve_reuse(reuse=reuse)
    return spec, model.resolve_reuse(variant=spec)


def summarize(config: DyNetConfig, height: int, width: int,
              variants: Sequence[str] | None = None) -> dict[str, Any]:
    """Parameter and FLOP figures of each requested variant of one weight-shared model."""
    model = DyNet(config)
    params = count_parameters(model)
    prompt_params = count_parameters(model, PromptBlock)
    rows = []
    for spec in variants or list(model.variants):
        label, reuse = _parse_variant(model, spec)
        flops = count_flops(model, height, width, reuse=reuse)
        rows.append({
            "variant": label,
            "reuse": list(reuse),
            "params": params,
            "gflops_conv_linear": flops.conv_linear / 1e9,
            "gflops_paper": flops.paper / 1e9,
            "gflops_attention": flops.attention / 1e9,
            "gflops_total": flops.total / 1e9,
        })
    router = VariantRouter(RouterConfig(variants={r["variant"]: tuple(r["reuse"]) for r in rows}
                                        if len(rows) > 1 else model.variants))
    router_gflops = count_router_flops(router, height, width).paper / 1e9
    return {"height": height, "width": width, "dim": config.dim, "params": params,
            "router_gflops": router_gflops, "router_params": count_parameters(router),
            "prompt_params": prompt_params, "prompt_share": prompt_params / params,
            "variants": rows}


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
               right_aligned: Container[int] = ()) -> str:
    """A plain-text table: header row, a rule of dashes, the rows; columns two spaces apart and as
    wide as their widest cell, left-aligned except the column indices in ``right_aligned``; no
    trailing blanks. (The one table formatter of the project: dyntrain's reports use it too.)"""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right_aligned else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text aligned table of a summarize() result."""
    header = ["variant", "reuse", "params (M)", "GFLOPs conv+lin", "+GELU (paper)",
              "+attention"]
    body = [[r["variant"], "(" + ", ".join(map(str, r["reuse"])) + ")",
             f"{r['params'] / 1e6:.3f}", f"{r['gflops_conv_linear']:.2f}",
             f"{r['gflops_paper']:.2f}", f"{r['gflops_total']:.2f}"]
            for r in summary["variants"]]
    lines = [f"DyNet (dim {summary['dim']}) at 1x3x{summary['height']}x{summary['width']}",
             text_table(header, body, right_aligned=range(2, len(header))), "",
             f"parameters: {summary['params']:,} shared by every variant; prompt path "
             f"{summary['prompt_params']:,} ({100 * summary['prompt_share']:.1f}%)",
             f"variant router: {summary['router_gflops']:.4f} GFLOPs, "
             f"{summary['router_params']:,} parameters (added to a routed image's figure)",
             "GFLOPs = 2 x MACs of the conv and linear layers.",
             "'+GELU (paper)' adds 1 FLOP per GELU element: the paper's Table 5 convention.",
             "'+attention' adds the channel-attention products q k^T and attn v to conv+lin:",
             "the figure to use for FLOP utilisation."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynet.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="square input side (default 224)")
    parser.add_argument("--height", type=int, help="input height (overrides --size)")
    parser.add_argument("--width", type=int, help="input width (overrides --size)")
    parser.add_argument("--variants", nargs="+", help="variant names or f1,f2,f3,f4 tuples "
                        "(default: every named variant)")
    parser.add_argument("--dim", type=int, default=48, help="level-1 width (default 48)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    height = args.height or args.size
    width = args.width or args.size
    try:
        summary = summarize(DyNetConfig(dim=args.dim), height, width, args.variants)
    except ValueError as err:
        parser.error(str(err))
    print(format_table(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
