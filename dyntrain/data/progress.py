"""Progress bars of the data tools (shard building, packing): tqdm on rank 0, on stderr, and only
when stderr is a terminal; the tools log one summary line at the end either way."""
from __future__ import annotations

import sys

from tqdm import tqdm

from ..logs import env_rank


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over ``total`` items; silent off rank 0, when ``enabled`` is false, or when stderr
    is not a terminal (``disable=None``)."""
    quiet = not enabled or env_rank() != 0
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None, leave=False)
