"""Restore your own images with DyNet-S or DyNet-L from one weights file.

    python launch/restore.py --checkpoint PATH --variant S|L INPUT OUTPUT
    python launch/restore.py --model models:/NAME@ALIAS [--tracking-uri URI] --variant S|L|auto INPUT OUTPUT
    python launch/restore.py --checkpoint PATH --variant auto [--tolerance-db 0.05] [--router FILE] INPUT OUTPUT
        [--tile N | --max-memory-mb MB] [--overlap 32] [--gray-world] [--device auto|cpu|cuda]

INPUT/OUTPUT: an image file and an output file (.png/.jpg), or a folder and an output folder.
--model takes the weights (and router) of a model logged in MLflow (models:/NAME@ALIAS,
models:/NAME/VERSION, runs:/RUN_ID/model) where --checkpoint takes a file or folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.config import load_config  # noqa: E402
from dyntrain.devices import choose_device  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.logs import get_logger, setup_logging  # noqa: E402
from dyntrain.redaction import mlflow_uri  # noqa: E402
from dyntrain.restore import RestoreOptions, load_model, restore_paths  # noqa: E402

log = get_logger("restore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder or exported weights file")
    source.add_argument("--model", help="a model logged in MLflow: models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/model")
    parser.add_argument("--tracking-uri", default=None,
                        help="--model: MLflow URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)")
    parser.add_argument("--variant", default="L", help="family member to run (S, L, ...), or auto: the "
                        "router trained by launch/train_router.py chooses per image; default L")
    parser.add_argument("--tolerance-db", type=float, default=0.05, help="auto: the cheapest variant "
                        "predicted within this many dB of the largest (default 0.05)")
    parser.add_argument("--router", default=None, help="auto: router file (default: beside the weights)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side in pixels (multiple of 8); 0 = never tile; default: from --max-memory-mb")
    parser.add_argument("--overlap", type=int, default=32, help="overlap between tiles in pixels")
    parser.add_argument("--max-memory-mb", type=float, default=4096.0,
                        help="activation memory budget that decides the tile size (default 4096)")
    parser.add_argument("--gray-world", action="store_true", help="Gray-World colour balance first (hazy photos)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--config", default=None, help="YAML whose model section describes the network, "
                        "only needed when the checkpoint carries no model config")
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    setup_logging()

    device = choose_device(args.device)
    cfg = load_config(args.config) if args.config else None
    weights, router = args.checkpoint, args.router
    if args.model:
        # lazy: mlflow is imported only when a model is fetched from it
        from dyntrain.serving.source import fetch_model

        fetched = fetch_model(args.model, mlflow_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                                     or "sqlite:///mlflow.db"))
        weights, router = str(fetched.weights), args.router or (str(fetched.router) if fetched.router else None)
    model = load_model(weights, device, cfg)
    options = RestoreOptions(variant=args.variant, tile=args.tile, overlap=args.overlap,
                             max_memory_mb=args.max_memory_mb, gray_world=args.gray_world)
    if args.variant == "auto":
        # lazy: routing only for --variant auto
        from dyntrain.routing.router import RouterError, load_routing
        from dyntrain.routing.evaluate import restore_paths_routed
        try:
            routing = load_routing(weights, model, router, args.tolerance_db)
        except RouterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        records = restore_paths_routed(model, routing, args.input, args.output, options, device)
    else:
        records = restore_paths(model, args.input, args.output, options, device)
    log.info(f"restored {len(records)} image(s) with DyNet-{args.variant} on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
