"""Evaluate a checkpoint on the all-in-one test sets (the paper's Table 1 protocol).

    python launch/evaluate.py --checkpoint PATH [--variant S|L|all|auto] [--config X.yaml] [dotted.key=value ...]
    python launch/evaluate.py --model models:/NAME@ALIAS [...]     # a model logged in MLflow (tracking.uri)
        [--run-id ID] [--child] [--device auto|cpu|cuda] [--tolerance-db 0.05] [--router FILE]

--variant auto evaluates per-image routing (launch/train_router.py): PSNR/SSIM per task, mean GFLOPs per
image (router included) and how often each variant was chosen.

Test-set folders come from eval.sets (e.g. eval.sets={bsd68: data/test/bsd68, rain100l: data/test/rain100l,
sots: data/test/sots}); metrics go to MLflow (tracking.uri): into --run-id, else the training run the
checkpoint records (for --model: the run that logged the model), else a new run in tracking.experiment;
--child writes a child run instead.
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder or exported weights file")
    source.add_argument("--model", help="a model logged in MLflow (models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/model), fetched from tracking.uri")
    parser.add_argument("--variant", default=None, help="S, L, ..., all or auto (default: eval.variants)")
    parser.add_argument("--tolerance-db", type=float, default=0.05, help="auto: the policy's tolerance")
    parser.add_argument("--router", default=None, help="auto: router file (default: beside the weights)")
    parser.add_argument("--run-id", default=None, help="MLflow run to log into")
    parser.add_argument("--child", action="store_true", help="log into a child run of the evaluated run")
    parser.add_argument("--step", type=int, default=None, help="metric step (default: the checkpoint's step)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_config_arguments(parser, "YAML with eval.sets and tracking (e.g. the fine-tuning config)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    checkpoint, router = args.checkpoint, args.router
    if args.model:
        # lazy: mlflow is imported only when a model is fetched from it
        from dyntrain.serving.source import fetch_model

        fetched = fetch_model(args.model, cfg.tracking.uri)
        checkpoint, router = str(fetched.weights), router or (str(fetched.router) if fetched.router else None)

    if args.variant == "auto":
        # lazy: routing only for --variant auto
        from dyntrain.routing.router import RouterError
        from dyntrain.routing.evaluate import run_routed_evaluation
        try:
            run_routed_evaluation(checkpoint, cfg, args.device, router, args.tolerance_db,
                                  run_id=args.run_id, child=args.child, step=args.step)
        except RouterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    from dyntrain.eval.evaluate import run_evaluation

    run_evaluation(checkpoint, cfg, args.variant or cfg.eval.variants, args.device,
                   run_id=args.run_id, child=args.child, step=args.step)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
