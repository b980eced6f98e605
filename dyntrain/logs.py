"""One logging setup for the whole system: rank-aware, one format.

Library modules take a logger with ``log = get_logger(__name__)`` and never configure logging; the
entry points (``run_training``, the CLIs) call :func:`setup_logging` once. Under a launcher every
rank runs the same code: rank 0 logs from INFO up, the other ranks only warnings and errors (each
line then names its rank), so a progress line appears once per job, not once per rank.

Format: ``HH:MM:SS [name] message`` where ``name`` is the logger's last component (``trainer``,
``checkpoint``, ``shards``, ...); a message that carries its own tag (``[<run name>] step 8/8 ...``,
``[make_shards] images 2/2 ...``) is not tagged twice. On ranks other than 0 the time is followed by
``rank R``.
Records below WARNING go to stdout and the rest to stderr, unless ``stream`` sends all of them to one
stream (a CLI whose stdout is its machine-readable result logs to stderr).

Every line goes through ``dyntrain.redaction.redact_text``: the user-info and secret query values
of any URL in it are masked.

The CLIs keep printing their results (a table, a JSON line) with ``print``: those are output, not log.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import IO, Optional

from dyntrain.redaction import redact_text


ROOT = "dyntrain"
_HANDLER_MARK = "_dyntrain_handler"


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (pass ``__name__``), under the ``dyntrain`` root."""
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside a launcher)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


class _Format(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__(datefmt="%H:%M:%S")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        when = self.formatTime(record, self.datefmt) + (f" rank {self.rank}" if self.rank else "")
        if message.startswith("["):  # the message names its own source (a run, a tool)
            text = f"{when} {message}"
        else:
            text = f"{when} [{record.name.rsplit('.', 1)[-1]}] {message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact_text(text)  # no credential of a URL reaches a log line


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(rank: Optional[int] = None, *, level: int = logging.INFO,
                  stream: Optional[IO[str]] = None) -> logging.Logger:
    """Install the one handler pair on the ``dyntrain`` logger (idempotent: a second call replaces it).

    Args:
        rank: global rank (default: from ``RANK``/``SLURM_PROCID``); ranks > 0 log WARNING and up.
        level: the level on rank 0.
        stream: send every record here instead of splitting stdout (INFO) / stderr (WARNING+).
    """
    rank = env_rank() if rank is None else int(rank)
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    fmt = _Format(rank)
    if stream is not None:
        handlers = [logging.StreamHandler(stream)]
    else:
        out = logging.StreamHandler(sys.stdout)
        out.addFilter(_Below(logging.WARNING))
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        handlers = [out, err]
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    root.propagate = False
    return root
