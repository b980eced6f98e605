"""``python -m dyntrain.checkpoint progress --config C [overrides]``: where a run stands, for job scripts.

Prints one machine-readable line on stdout (log lines go to stderr):
``step=<newest complete step or none> max_steps=<M> finished=<0|1> dir=<checkpoint.dir>``, where M is
the run's iterations by its batch plan at the data ranks of that checkpoint (``dyntrain.config.plan``).
Export and universal conversion are ``launch/export.py``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from dyntrain.checkpoint.layout import newest_complete
from dyntrain.config import add_config_arguments, config_from_args
from dyntrain.config.plan import batch_plan
from dyntrain.logs import setup_logging


USAGE = ("usage: python -m dyntrain.checkpoint progress --config C [dotted.key=value ...]\n"
         "(export and universal conversion: python launch/export.py --help)")


def progress(argv: list[str]) -> int:
    """The ``progress`` command (see the module docstring)."""

    parser = argparse.ArgumentParser(prog="python -m dyntrain.checkpoint progress")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    info = newest_complete(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    step = info.step if info else None
    max_steps = cfg.run.max_steps
    readers = int(info.meta.get("data_ranks") or info.meta.get("world_size") or 0) if info else 0
    if readers:  # the run's iterations follow its batch plan, which its data ranks fix
        max_steps = batch_plan(cfg, readers, readers).iterations
    finished = int(step is not None and step >= max_steps)
    print(f"step={step if step is not None else 'none'} max_steps={max_steps} "
          f"finished={finished} dir={cfg.checkpoint.dir}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(stream=sys.stderr)   # stdout is the progress line a job script parses
    if not argv or argv[0] != "progress":
        print(USAGE, file=sys.stderr)
        return 2
    return progress(argv[1:])
