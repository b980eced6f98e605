"""Transient storage errors: which ones they are, and a bounded wait with backoff while they last.

A short S3 outage or throttling (connection refused or reset, a timeout, HTTP 500/502/503/504,
``SlowDown``/``Throttling``) must not cost a restart: the operation is tried again with exponential
backoff (0.5 s doubling to 10 s, with jitter) until it succeeds or the bound has passed
(``data.io_retry_s``, default 180 s; 0 = fail at once); only then does it fail with one error
naming the URL. botocore's own "standard" retries (a few attempts within seconds) sit underneath.

Every retry is counted (``counters()``: retries, seconds waited, episodes) and each episode is
logged once when it starts and once when it ends, so a run that survived an outage says so.
A missing object, a missing bucket or rejected credentials are not transient and fail at once.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Optional

from dyntrain.logs import get_logger


log = get_logger(__name__)

DEFAULT_BOUND_S = 180.0
FIRST_WAIT_S, MAX_WAIT_S = 0.5, 10.0

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                    "RequestLimitExceeded", "TooManyRequestsException", "500", "502", "503", "504"}

_state = {"bound_s": DEFAULT_BOUND_S, "retries": 0, "wait_s": 0.0, "episodes": 0}
_lock = threading.Lock()


def set_bound(seconds: float) -> None:
    """How long a transient error is retried before it fails (``data.io_retry_s``)."""
    if seconds < 0:
        raise ValueError(f"the retry bound must be >= 0 seconds, got {seconds}")
    _state["bound_s"] = float(seconds)


def bound() -> float:
    return float(_state["bound_s"])


def counters() -> dict[str, float]:
    """Retries so far in this process, the seconds spent waiting, and the episodes (outages)."""
    with _lock:
        return {"io_retries": _state["retries"], "io_retry_wait_s": round(_state["wait_s"], 3),
                "io_retry_episodes": _state["episodes"]}


def is_transient(exc: BaseException) -> bool:
    """Whether a boto3/botocore error is one that passes if tried again later."""
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError,
                                     EndpointConnectionError, HTTPClientError, IncompleteReadError,
                                     ReadTimeoutError, ResponseStreamingError)

    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
                        ReadTimeoutError, ResponseStreamingError, IncompleteReadError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or int(status) >= 500
    return isinstance(exc, (ConnectionError, TimeoutError))


class RetryWindow:
    """One episode of transient errors on one thing (``what``, e.g. a URL): ``wait(exc)`` sleeps the
    next backoff and returns, or returns False once ``bound_s`` has passed since the first error
    (the caller then fails naming the thing). ``done()`` logs the end of an episode that retried."""

    def __init__(self, what: str, bound_s: Optional[float] = None) -> None:
        self.what = what
        self.bound_s = bound() if bound_s is None else float(bound_s)
        self.start: Optional[float] = None
        self.tries = 0
        self._rng = random.Random()

    def wait(self, exc: BaseException) -> bool:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        elapsed = now - self.start
        if elapsed >= self.bound_s:
            return False
        pause = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** self.tries) * (0.5 + 0.5 * self._rng.random())
        pause = min(pause, max(0.0, self.bound_s - elapsed))
        if self.tries == 0:
            log.warning("transient storage error on %s (%s); retrying for up to %.0f s",
                        self.what, _one_line(exc), self.bound_s)
            with _lock:
                _state["episodes"] += 1
        self.tries += 1
        with _lock:
            _state["retries"] += 1
            _state["wait_s"] += pause
        time.sleep(pause)
        return True

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.monotonic() - self.start

    def done(self) -> None:
        if self.tries:
            log.warning("storage is back for %s after %d retries over %.1f s", self.what, self.tries,
                        self.elapsed())

    def gave_up(self) -> str:
        """The clause an error message appends once the bound has passed."""
        return f"still failing after {self.tries} retries over {self.elapsed():.0f} s (data.io_retry_s={self.bound_s:g})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
