"""The project's own error classes share one base, and every launch script runs through ``cli_main``.

``DyntrainError`` is the base of every error whose message already says what is wrong and names the
thing (a config key, a shard URL, a checkpoint folder, a test set, a non-finite loss, ranks that
disagree). Such an error ends a command with one line, ``error: <message>``, on stderr and exit
status 2 (Python's own status for an uncaught exception is 1); a traceback adds nothing for the user. Under a launcher only rank 0 prints
the line; the other ranks exit quietly with the same status. Any other exception is a bug and keeps
its traceback.

``--traceback`` on any launch script's command line (removed before the script parses its
arguments) or ``DYNTRAIN_TRACEBACK=1`` in the environment shows the stack of a ``DyntrainError`` too.

This module imports only the standard library so that every other module may derive from it.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

from dyntrain.redaction import redact_text


TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "DYNTRAIN_TRACEBACK"
EXIT_ERROR = 2          # a DyntrainError, like argparse's bad command line; a bug's traceback exits 1


class DyntrainError(Exception):
    """Base of the errors that end a command with one line naming the thing that is wrong."""


class ConfigError(DyntrainError, ValueError):
    """A config key that does not exist, or a value of the wrong type or range (it names the dotted
    key); raised by ``dyntrain.config`` and by the code that reads a config."""


def _rank() -> int:
    """This process's global rank as the launcher (deepspeed, torchrun, Slurm) set it; 0 alone."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def wants_traceback(argv: list[str]) -> bool:
    return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with " | ")."""
    text = str(exc).strip() or type(exc).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def report(exc: BaseException, show_traceback: bool, rank: Optional[int] = None) -> None:
    """Print ``error: ...`` (rank 0 only), with the stack first when asked for."""
    if (_rank() if rank is None else rank) != 0:
        return
    if show_traceback:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(redact_text(stack), end="", file=sys.stderr)
    print(f"error: {redact_text(one_line(exc))}", file=sys.stderr, flush=True)


def cli_main(fn: Callable[[Optional[list[str]]], Optional[int]],
             argv: Optional[list[str]] = None) -> int:
    """Run a launch script's ``main(argv)``; returns the exit status for ``sys.exit``.

    ``DyntrainError`` -> ``error: <message>`` once (rank 0), status ``EXIT_ERROR``; ``--traceback`` or
    ``DYNTRAIN_TRACEBACK=1`` prints the stack before it. Other exceptions propagate unchanged.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    show = wants_traceback(args)
    args = [a for a in args if a != TRACEBACK_FLAG]
    try:
        status = fn(args)
    except DyntrainError as exc:
        report(exc, show)
        return EXIT_ERROR
    return int(status or 0)
