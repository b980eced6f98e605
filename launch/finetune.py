"""All-in-one fine-tuning of the DyNet family (denoise + derain + dehaze), S and L together.

    deepspeed [--num_gpus N] launch/finetune.py --config configs/finetune_allinone.yaml [dotted.key=value ...]
    python launch/finetune.py --config configs/finetune_allinone.yaml [...]      # one process, same path
    python launch/finetune.py --config configs/finetune_allinone.yaml --dry-run --world-size 64 [...]
        # batch plan + pre-flight, no GPU; last line: the DeepSpeed config as one JSON object

Key settings: data.root (holds Denoise/, Derain/, Dehaze/), init.checkpoint (pre-training checkpoint
folder or exported weights; null = from scratch), data.tasks (repetition per task; 0 drops one:
single-task mode), schedule.mode=fixed + schedule.fixed_variant (fixed-variant mode), eval.every/eval.sets.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.config import ConfigError, training_command  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, dry_world = training_command(argv, __doc__, "YAML config (e.g. configs/finetune_allinone.yaml)")
    if cfg.data.source not in ("paired", "paired_shards", "synthetic"):
        raise ConfigError(f"data.source: fine-tuning reads 'paired' (task folders under data.root), "
                          f"'paired_shards' or 'synthetic', got {cfg.data.source!r}")

    if dry_world is not None:
        from dyntrain.jobs.dryrun import dry_run
        from dyntrain.jobs.finetune import brings_lr_scheduler

        return dry_run(cfg, dry_world, custom_scheduler=brings_lr_scheduler(cfg))
    from dyntrain.jobs.finetune import run_finetune

    result = run_finetune(cfg)
    return 0 if result.step >= cfg.run.max_steps or result.stopped_early else 1


if __name__ == "__main__":
    sys.exit(cli_main(main))
