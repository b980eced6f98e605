"""Dynamic pre-training of DyNet.

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/pretrain.yaml [dotted.key=value ...]
    python launch/pretrain.py --config configs/quickstart.yaml [...]      # one process, same path
    python launch/pretrain.py --config configs/pretrain.yaml --dry-run --world-size 64 [...]
        # batch plan + pre-flight, no GPU; last line: the DeepSpeed config as one JSON object
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.config import training_command  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, dry_world = training_command(argv, __doc__, "YAML config (defaults: the paper's recipe)")
    if dry_world is not None:
        from dyntrain.jobs.dryrun import dry_run

        return dry_run(cfg, dry_world)

    from dyntrain.jobs.pretrain import run_pretrain

    result = run_pretrain(cfg)
    return 0 if result.step >= cfg.run.max_steps or result.stopped_early else 1


if __name__ == "__main__":
    sys.exit(cli_main(main))
