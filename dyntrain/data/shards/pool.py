"""The process pool of the shard builder and of the dedup index: results in input order, the same
Pillow pixel limit in every worker, and a worker that dies fails the build naming its image.

``ordered_map(fn, tasks, workers, pixel_limit, path_of)`` is ``map(fn, tasks)`` over
``concurrent.futures.ProcessPoolExecutor`` with a bounded number of tasks in flight (two per
worker). A worker killed by the system (the out-of-memory killer, a segfault in a decoder) breaks
the pool; instead of hanging (``multiprocessing.Pool.imap`` waits for the lost task forever) the
build stops with a ``DataSourceError`` naming the image that worker was processing (each worker
notes its current task in a shared slot; the workers the pool then stops clear theirs on SIGTERM).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Optional, Sequence

from PIL import Image

from dyntrain.data.storage.s3 import DataSourceError


_WORKER: dict[str, Any] = {}
AHEAD = 2  # tasks in flight per worker


def _init(slots: Any, counter: Any, pixel_limit: int, initializer: Optional[Callable], initargs: tuple) -> None:
    with counter.get_lock():
        _WORKER["slot"] = counter.value
        counter.value += 1
    _WORKER["slots"] = slots
    signal.signal(signal.SIGTERM, _stopped)
    Image.MAX_IMAGE_PIXELS = pixel_limit
    if initializer is not None:
        initializer(*initargs)


def _stopped(signum: int, _frame: Any) -> None:
    """Stopped by the pool (another worker died): this worker's task is not the culprit."""
    _WORKER["slots"][_WORKER["slot"]] = 0
    os._exit(128 + signum)


def _call(fn: Callable, pos: int, task: Any) -> Any:
    slots, slot = _WORKER["slots"], _WORKER["slot"]
    slots[slot] = pos + 1  # this worker is on task ``pos`` (0: idle)
    result = fn(task)
    slots[slot] = 0
    return result


def ordered_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, pixel_limit: int,
                path_of: Callable[[Any], str], initializer: Optional[Callable] = None,
                initargs: tuple = (), what: str = "make_shards") -> Iterator[Any]:
    """``fn`` of every task, in order, on ``workers`` processes (in this process when 1); every
    worker (and this process when 1) runs with ``Image.MAX_IMAGE_PIXELS = pixel_limit`` and then
    ``initializer(*initargs)``. ``path_of(task)`` names a task's image in the error of a dead worker."""
    if workers <= 1:  # in this process: Pillow's limit is a global, so it is put back afterwards
        before = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = pixel_limit
            if initializer is not None:
                initializer(*initargs)
            yield from map(fn, tasks)
        finally:
            Image.MAX_IMAGE_PIXELS = before
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    slots, counter = ctx.Array("q", workers, lock=False), ctx.Value("i", 0)
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                  initargs=(slots, counter, pixel_limit, initializer, initargs))
    flight: deque = deque()
    try:
        for pos, task in enumerate(tasks):
            flight.append(pool.submit(_call, fn, pos, task))
            if len(flight) >= AHEAD * workers:
                yield flight.popleft().result()
        while flight:
            yield flight.popleft().result()
    except BrokenProcessPool:
        pool.shutdown(wait=True)  # every other worker stopped (and its slot cleared)
        busy = [path_of(tasks[p - 1]) for p in slots if p > 0]
        names = (busy[0] if len(busy) == 1 else f"one of {', '.join(busy)}") if busy else "an unknown image"
        raise DataSourceError(f"[{what}] a worker process died (killed by the system, e.g. the "
                              f"out-of-memory killer, or crashed) while processing {names}; "
                              f"nothing after it was written: lower --workers or --max-decoded-pixels, "
                              f"or remove the image, and run the build again (it resumes)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
