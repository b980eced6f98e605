"""Compare MLflow runs: pre-training GPU hours (dynamic vs fixed-variant baselines) and fine-tuned
PSNR/SSIM per variant and task. Prints the tables, writes a PNG and logs both to a "comparison" run.

    python launch/compare.py [--experiment NAME ...] [--tracking-uri URI | --config X.yaml]
                             [--out runs/comparison.png] [--log-experiment dynet-comparison] [--no-log]
    python launch/compare.py --iso-quality --experiment NAME [--runs DYN_ID S_ID L_ID] [--out X.png]
                             [--x gpu_hours|pflop]
    python launch/compare.py --iso-quality --over-seeds --experiment NAME [--x gpu_hours|pflop]
    python launch/compare.py --promote RUN_ID --alias production [--name NAME]

--iso-quality: the GPU-hour saving at equal validation quality of a dynamic run against its
fixed-variant baselines (dyntrain.eval.iso_quality): table, plot, and metrics logged to the dynamic run.
With --over-seeds: every seed's comparison in the experiment (runs grouped by their run.seed), then
per recipe the mean saving with a 95% interval over seeds and the paired difference against the
paper's recipe on the same seeds (dyntrain.analysis.over_seeds); nothing is logged.

--promote: after a comparison, point a Model Registry alias (@candidate, @production ...) at the
registered version of that run's model (registering it as --name first when it was logged but not
registered); refused, naming the run, when the run's model was never logged.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.analysis.compare import (ComparisonError, collect_runs, compare_iso_quality,  # noqa: E402
                              format_tables, log_comparison)
from dyntrain.analysis.over_seeds import iso_quality_over_seeds  # noqa: E402
from dyntrain.analysis.plot import plot  # noqa: E402
from dyntrain.config import load_config  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.logs import setup_logging  # noqa: E402
from dyntrain.redaction import mlflow_uri, redact_uri  # noqa: E402
from dyntrain.tracking.store import promote_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", default=None,
                        help="experiment to read (repeatable; default: every experiment)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: --config's tracking.uri, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)")
    parser.add_argument("--config", default=None, help="a run's YAML, for its tracking.uri")
    parser.add_argument("--out", default="runs/comparison.png", help="where to write the plot")
    parser.add_argument("--log-experiment", default="dynet-comparison",
                        help="experiment of the comparison run that stores plot and tables")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    parser.add_argument("--iso-quality", action="store_true",
                        help="equal-quality saving of a dynamic run vs its fixed-variant baselines")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID",
                        help="the dynamic run (any recipe: paper, sandwich, ...) and its baselines "
                             "(implies --iso-quality)")
    parser.add_argument("--x", choices=("gpu_hours", "pflop"), default="gpu_hours",
                        help="iso-quality cost axis: GPU hours (wall time, the default) or PFLOP of "
                             "training work (independent of the machine's speed and load)")
    parser.add_argument("--over-seeds", action="store_true",
                        help="--iso-quality over several runs per arm: mean and 95%% interval over seeds")
    parser.add_argument("--promote", default=None, metavar="RUN_ID",
                        help="point --alias at the registered version of this run's model")
    parser.add_argument("--alias", default=None, help="--promote: the alias (candidate, production ...)")
    parser.add_argument("--name", default=None, help="--promote: the registered model's name")
    args = parser.parse_args(argv)
    setup_logging()

    uri = mlflow_uri(args.tracking_uri or (load_config(args.config).tracking.uri if args.config else None)
                     or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    if args.promote:
        if not args.alias:
            parser.error("--promote needs --alias (e.g. --alias production)")
        name, version = promote_run(uri, args.promote, args.alias, args.name)
        print(f"{name}@{args.alias} -> version {version} (run {args.promote})")
        return 0
    if args.over_seeds:
        if not args.experiment:
            parser.error("--over-seeds needs --experiment NAME")
        try:
            result = iso_quality_over_seeds(uri, args.experiment[-1], args.x)
        except ComparisonError as exc:
            print(f"compare: error: {exc}", file=sys.stderr)
            return 2
        print(result["text"])
        first = result["recipes"][result["reference"]]
        suffix = "" if args.x == "gpu_hours" else f"_{args.x}"
        print(f"iso_quality_saving{suffix}_mean={first['mean']}")
        return 0
    if args.iso_quality or args.runs:
        out = Path(args.out if args.out != parser.get_default("out") else "runs/iso_quality.png")
        try:
            result = compare_iso_quality(uri, (args.experiment or [None])[-1], args.runs, out,
                                         log=not args.no_log, x=args.x)
        except ComparisonError as exc:
            print(f"compare: error: {exc}", file=sys.stderr)
            return 2
        print(result["text"])
        print(f"plot written to {out}")
        suffix = "" if args.x == "gpu_hours" else f"_{args.x}"
        print(f"iso_quality_saving{suffix}={result['iso_quality_saving']}")
        return 0
    pretrain, results = collect_runs(uri, args.experiment)
    text = format_tables(pretrain, results)
    print(text)
    png = plot(pretrain, results, args.out)
    print(f"plot written to {png}")
    if not args.no_log:
        run_id = log_comparison(uri, args.log_experiment, png, text,
                                [r.run_id for r in pretrain] + [r.run_id for r in results])
        print(f"logged to MLflow run {run_id} (experiment {args.log_experiment}, {redact_uri(uri)})")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
