"""Tracking records sent off the training thread: a bounded buffer and one sender thread.

The training thread only appends to the buffer (``submit`` never blocks and never raises); one daemon
thread sends the records in order. When the tracking store cannot be reached (connection refused,
time-out, HTTP 5xx or 429), the record at the head stays where it is and is tried again after a
back-off (1 s doubling up to ``retry_max_s``), so a server that goes away and comes back receives
everything that was kept, in the order it was logged. One warning names the URI when an outage
starts and one info line when it ends.

The buffer holds at most ``capacity`` records (a metric value, a param, a tag, a text or an
artifact each count one). When it is full the oldest metric batches are dropped first (the run's
creation, params, tags and texts are kept); a record the store rejects for good (HTTP 4xx: invalid
value, unknown run) is dropped with a warning. Both are counted in ``lost``. Consecutive metric
batches are merged into one request of up to 1000 values (MLflow's ``log_batch`` limit), so a
backlog drains quickly once the server is back.
"""
from __future__ import annotations

import collections
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dyntrain.logs import get_logger


log = get_logger(__name__)

METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit on metrics
MAX_REJECTION_WARNINGS = 5


@dataclass
class Record:
    """One unit of work for the sender: ``send(metrics)`` performs it (``metrics`` is the merged list
    for metric records, None otherwise); ``count`` is how many records it stands for."""
    what: str
    count: int
    send: Callable[[Optional[list]], None]
    metrics: Optional[list] = None
    done: threading.Event = field(default_factory=threading.Event)   # sent, dropped or given up
    tried: threading.Event = field(default_factory=threading.Event)  # at least one attempt made


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the store is unreachable or overloaded (worth retrying), False when
    it rejected the request itself."""
    try:
        # lazy: mlflow is needed only where tracking is on (the GPU image has none)
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - MLflow is a dependency
        MlflowException = ()  # type: ignore[assignment]
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, (OSError, TimeoutError))  # requests' ConnectionError is an OSError


class Sender:
    """The buffer and its thread. Args:
        where: the (redacted) URI, for the log lines.
        capacity: most records kept while the store is away.
        retry_max_s: longest wait between two attempts during an outage.
    """

    def __init__(self, where: str, capacity: int, retry_max_s: float = 30.0) -> None:
        self.where, self.capacity, self.retry_max_s = where, capacity, retry_max_s
        self.lost = 0                 # records dropped (buffer full, or rejected by the store)
        self.sent = 0
        self.rejections = 0
        self.unsent_at_close: list = []   # the metric values ``close`` gave up on (for the caller to keep)
        self.down = False
        self._queue: collections.deque[Record] = collections.deque()
        self._pending = 0             # records in the queue
        self._cond = threading.Condition()
        self._closing = False
        self._hurry = False           # a flush is waiting: retry often
        self._warned_full = False
        self._inflight = 0            # records at the head of the queue being sent now
        self._thread = threading.Thread(target=self._loop, name="dyntrain-tracking", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def unsent_metrics(self) -> list:
        """The metric values still in the buffer (in flight included), oldest first: what a checkpoint
        carries so that a resumed run sends them (``MLflowTracker.unsent_metrics``)."""
        with self._cond:
            return [m for rec in self._queue if rec.metrics is not None for m in rec.metrics]

    def submit(self, record: Record) -> Record:
        """Queue ``record`` (never blocks); drops the oldest metric batches when the buffer is full."""
        with self._cond:
            if self._closing:
                self.lost += record.count
                record.done.set()
                return record
            self._queue.append(record)
            self._pending += record.count
            if self._pending > self.capacity:
                self._drop_oldest_metrics()
            self._cond.notify_all()
        return record

    def _drop_oldest_metrics(self) -> None:
        kept: collections.deque[Record] = collections.deque()
        dropped = 0
        for i, rec in enumerate(self._queue):  # never those in flight, nor the run's creation
            if i >= max(self._inflight, 1) and rec.metrics is not None and self._pending > self.capacity:
                self._pending -= rec.count
                dropped += rec.count
                rec.tried.set()
                rec.done.set()
            else:
                kept.append(rec)
        self._queue = kept
        self.lost += dropped
        if dropped and not self._warned_full:
            self._warned_full = True
            log.warning("tracking buffer for %s is full (%d records): dropping the oldest metrics; "
                        "the count of dropped records is logged at the end", self.where, self.capacity)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the buffer to drain (retrying often meanwhile); True if it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
            self._hurry = False
            return not self._queue

    def close(self, timeout: float) -> int:
        """Flush, then stop the thread; returns the records still unsent (counted as lost)."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            unsent = self._pending
            self.lost += unsent
            self.unsent_at_close = [m for rec in self._queue if rec.metrics is not None for m in rec.metrics]
            for rec in self._queue:
                rec.tried.set()
                rec.done.set()
            self._queue.clear()
            self._pending = 0
            self._cond.notify_all()
        self._thread.join(timeout=5)
        return unsent

    # ------------------------------------------------------------------------- the thread
    def _next_batch(self) -> tuple[list[Record], Optional[list]]:
        """The head record, merged with the metric records right behind it (under the lock)."""
        head = self._queue[0]
        if head.metrics is None:
            return [head], None
        batch, merged = [], []
        for rec in self._queue:
            if rec.metrics is None or (merged and len(merged) + len(rec.metrics) > METRICS_PER_REQUEST):
                break
            batch.append(rec)
            merged.extend(rec.metrics)
        return batch, merged

    def _loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch, merged = self._next_batch()
                self._inflight = len(batch)
            try:
                batch[0].send(merged)
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or counted
                if is_transient(exc):
                    self._outage(exc)
                    batch[0].tried.set()
                    with self._cond:
                        self._inflight = 0
                        self._cond.wait(0.5 if self._hurry else backoff)
                    backoff = min(backoff * 2, self.retry_max_s)
                    continue
                self._rejected(batch, exc)
                self._finish(batch, sent=False)
                continue
            backoff = 1.0
            if self.down:
                self.down = False
                log.info("tracking store %s is reachable again; sending %d buffered records",
                         self.where, self.pending)
            self._finish(batch, sent=True)

    def _rejected(self, batch: list[Record], exc: BaseException) -> None:
        self.rejections += 1
        if self.rejections <= MAX_REJECTION_WARNINGS:
            last = self.rejections == MAX_REJECTION_WARNINGS
            more = "; further ones are only counted" if last else ""
            log.warning("tracking store %s: %s could not be recorded (%d records dropped): %s%s", self.where,
                        batch[0].what, sum(r.count for r in batch), _short(exc), more)

    def _outage(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            log.warning("tracking store %s is unreachable (%s); training goes on, up to %d records "
                        "are kept and sent when it is back", self.where, _short(exc), self.capacity)

    def _finish(self, batch: list[Record], sent: bool) -> None:
        with self._cond:
            self._inflight = 0
            for rec in batch:
                if self._queue and self._queue[0] is rec:
                    self._queue.popleft()
                    self._pending -= rec.count
                    if sent:
                        self.sent += rec.count
                    else:
                        self.lost += rec.count
                rec.tried.set()
                rec.done.set()
            self._cond.notify_all()


def _short(exc: BaseException, limit: int = 300) -> Any:
    """One line for the log, with any user:password@ of a URL hidden."""
    text = re.sub(r"//[^/@\s]+@", "//***@", f"{type(exc).__name__}: {exc}".replace("\n", " "))
    return text if len(text) <= limit else text[:limit - 3] + "..."
