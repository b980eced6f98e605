"""``python -m dyntrain.checkpoint progress --config C [overrides]``: where a run stands, for job scripts.

Prints one machine-readable line on stdout (log lines go to stderr):
``step=<newest complete step or none> max_steps=<M> finished=<0|1> dir=<checkpoint.dir>``, where M is
the run's iterations by its batch plan at the data ranks of that checkpoint (``dyntrain.config.plan``);
with ``--run`` also `` tag=<its tag or none> run=<the MLflow run id it records, or none>`` (this reads
the checkpoint's client state: slurm/paper.sh's evaluation finds the fine-tuning run this way).
Export and universal conversion are ``launch/export.py``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from dyntrain.checkpoint.layout import newest_complete
from dyntrain.checkpoint.reading import read_client_state
from dyntrain.config import add_config_arguments, config_from_args
from dyntrain.config.plan import batch_plan
from dyntrain.logs import setup_logging


USAGE = ("usage: python -m dyntrain.checkpoint progress --config C [dotted.key=value ...]\n"
         "(export and universal conversion: python launch/export.py --help)")


def progress(argv: list[str]) -> int:
    """The ``progress`` command (see the module docstring)."""

    parser = argparse.ArgumentParser(prog="python -m dyntrain.checkpoint progress")
    add_config_arguments(parser)
    parser.add_argument("--run", action="store_true", help="also the newest checkpoint's tag and MLflow run id")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    info = newest_complete(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    step = info.step if info else None
    max_steps = cfg.run.max_steps
    readers = int(info.meta.get("data_ranks") or info.meta.get("world_size") or 0) if info else 0
    if readers:  # the run's iterations follow its batch plan, which its data ranks fix
        max_steps = batch_plan(cfg, readers, readers).iterations
    finished = int(step is not None and step >= max_steps)
    line = (f"step={step if step is not None else 'none'} max_steps={max_steps} "
            f"finished={finished} dir={cfg.checkpoint.dir}")
    if args.run:
        run_id = read_client_state(cfg.checkpoint.dir, info.tag).get("client", {}).get("mlflow_run_id") if info else None
        line += f" tag={info.tag if info else 'none'} run={run_id or 'none'}"
    print(line)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(stream=sys.stderr)   # stdout is the progress line a job script parses
    if not argv or argv[0] != "progress":
        print(USAGE, file=sys.stderr)
        return 2
    return progress(argv[1:])
