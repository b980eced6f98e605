"""Train the per-image variant router of a fine-tuned DyNet checkpoint.

    python launch/train_router.py --checkpoint CKPT --config configs/finetune_X.yaml [dotted.key=value ...]
        [--out FILE] [--epochs 60] [--lr 2e-3] [--crop 64] [--samples 2] [--tolerance-db 0.05]
        [--cache DIR] [--device auto|cpu|cuda (default: run.device)]

Labels come from running every variant of CKPT over the degraded training inputs of data.root (the
fine-tuning config's paired data) and are cached (--cache, default: router_labels/ beside the router).
The router is saved beside the weights (dynet.safetensors -> dynet.router.pt, a checkpoint folder ->
FOLDER/router.pt) unless --out says otherwise; metrics go to MLflow (tracking.*), stage "router".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.config import add_config_arguments, config_from_args  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.logs import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arguments(parser, "YAML with data.root/tasks/sigmas and tracking (the fine-tuning config)")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder or exported weights")
    parser.add_argument("--out", default=None, help="router file (default: beside the weights)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop", type=int, default=64, help="side of the labelled crops (default 64)")
    parser.add_argument("--samples", type=int, default=2, help="crops per training pair (default 2)")
    parser.add_argument("--tolerance-db", type=float, default=0.05,
                        help="the policy's tolerance, for the reported agreement with the oracle")
    parser.add_argument("--cache", default=None, help="label cache folder")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="where labels are made and the router trains (default: run.device)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()

    from dyntrain.routing.train import run_train_router

    result = run_train_router(args.checkpoint, cfg, args.out, args.epochs, args.lr, args.crop, args.samples,
                              args.tolerance_db, args.cache, args.device or cfg.run.device)
    print(f"router: {result['router']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
