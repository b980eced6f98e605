"""Export the consolidated weights of a checkpoint: one file that serves every DyNet variant.

    python launch/export.py --checkpoint DIR --out weights.safetensors   # or weights.pt
    python launch/export.py --checkpoint DIR --tag step_00010000 --out weights.pt
    python launch/export.py --checkpoint DIR --universal                 # for a new world size

DIR is a checkpoint directory (its newest complete tag is used unless --tag names one) or one tag
folder. The weights are full fp32 whatever the ZeRO stage and precision of training; the model's
architecture (``DyNetConfig.to_dict()``, from the run's config) travels with them, so
``launch/restore.py --checkpoint FILE`` needs nothing else. ``--universal`` instead converts the
tag into DeepSpeed's universal format in place (``<tag>/universal``), which a resume on a
different number of ranks also does by itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.checkpoint import ensure_universal, resolve_tag_dir  # noqa: E402
from dyntrain.config import dynet_config_from_dict  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.checkpoint.weights import consolidated_weights, save_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or tag folder")
    parser.add_argument("--tag", default=None, help="tag inside --checkpoint (default: newest complete)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="weights file to write: *.safetensors or *.pt")
    out.add_argument("--universal", action="store_true",
                     help="convert the tag to DeepSpeed's universal format instead")
    parser.add_argument("--workers", type=int, default=1, help="processes for --universal")
    args = parser.parse_args(argv)
    if args.universal:
        where = ensure_universal(resolve_tag_dir(args.checkpoint, args.tag), workers=args.workers)
        print(f"universal checkpoint: {where}")
        return 0
    weights, model_cfg, info = consolidated_weights(args.checkpoint, args.tag)
    if model_cfg is None:
        print(f"warning: {args.checkpoint} carries no model config; restore.py will need --config",
              file=sys.stderr)
    else:  # the run's model section (any form) -> DyNetConfig's own dict
        model_cfg = dynet_config_from_dict(model_cfg, where=f"{args.checkpoint}: model").to_dict()
    path = save_weights(args.out, weights, model_cfg, info)
    n = sum(t.numel() for t in weights.values())
    print(f"exported {len(weights)} tensors ({n:,} parameters, fp32) of {info['tag']} "
          f"(step {info['step']}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
