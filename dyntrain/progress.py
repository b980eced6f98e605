"""Progress bars for long loops outside training (shard building, packing, evaluation, folder restores).

A ``tqdm`` bar on rank 0 when stderr is a terminal, nothing otherwise (logs, CI, tests). While a bar
is shown, the ``dyntrain`` log records are written through it so that they do not tear the bar.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dyntrain.logs import ROOT, env_rank


def bar_wanted() -> bool:
    """True on rank 0 with stderr on a terminal."""
    return env_rank() == 0 and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "image", enabled: bool = True) -> Iterator[tqdm]:
    """``with progress_bar(n, "evaluating") as bar: ... bar.update()`` (a disabled bar when unwanted
    or ``enabled`` is false); the callers log their one summary line at the end either way."""
    shown = enabled and bar_wanted()
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not shown, leave=False, file=sys.stderr)
    redirect = logging_redirect_tqdm([logging.getLogger(ROOT)]) if shown else contextlib.nullcontext()
    try:
        with redirect:
            yield bar
    finally:
        bar.close()
