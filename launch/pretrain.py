"""Dynamic pre-training of DyNet.

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/pretrain.yaml [dotted.key=value ...]
    python launch/pretrain.py --config configs/quickstart.yaml [...]      # one process, same path
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (defaults: the paper's recipe)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from dyntrain.data.pipeline import build_pretrain_loader
    from dyntrain.run import run_training

    result = run_training(cfg, build_pretrain_loader, mode="pretrain")
    return 0 if result.step >= cfg.run.max_steps or result.stopped_early else 1


if __name__ == "__main__":
    sys.exit(main())
