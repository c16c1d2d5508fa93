"""Answering in order, after the work is durable: the asynchronous operations window.

Why here and not per request: a sender that pipelines (a negotiated window
above 1) has several requests in flight; their objects are staged (flushed and
renamed) as they complete and made durable together with one directory fsync
(group commit, ``storage.Writer.sync``), then answered in request order.  A
sender that waits for each answer is answered at once.  A failed sync fails
every object it covered, never one it did not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.serve.receiving import Outcome
from dcmrecvd.store.storage import Writer
from dcmrecvd.wire.status import status_for_error

R = TypeVar("R")


class AnswerWindow(Generic[R]):
    """Requests complete and not yet answered, in order; at most ``size`` of them."""

    def __init__(self, answer: Callable[[R, Outcome], None]) -> None:
        self.answer = answer
        #: Requests the peer may have outstanding: the negotiated window, 1 without one.
        self.size = 1
        #: The writer whose staged objects a flush makes durable (set once accepted).
        self.writer: Writer | None = None
        self._waiting: list[tuple[R, Outcome]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, request: R, outcome: Outcome) -> None:
        """A complete request; answered now if the window is full."""
        self._waiting.append((request, outcome))
        if len(self._waiting) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Make every staged object durable (one directory fsync for all of them), then
        answer the requests in order."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        if self.writer is not None and self.writer.unsynced:
            try:
                self.writer.sync()
            except OSError as exc:
                waiting = [
                    (request, Outcome(status_for_error(exc), str(exc)) if outcome.path else outcome)
                    for request, outcome in waiting
                ]
        now = time.monotonic()
        for request, outcome in waiting:
            if outcome.commit_started:
                METRICS.commit_seconds.observe(now - outcome.commit_started)
            self.answer(request, outcome)
