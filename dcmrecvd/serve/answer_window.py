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

from structlog.typing import FilteringBoundLogger

from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.duplicates import CLAIMS, Claim
from dcmrecvd.serve.receiving import Outcome
from dcmrecvd.store.storage import Writer, take_back
from dcmrecvd.wire.status import Status, status_for_error

R = TypeVar("R")


class AnswerWindow(Generic[R]):
    """Requests complete and not yet answered, in order; at most ``size`` of them."""

    def __init__(self, answer: Callable[[R, Outcome], None]) -> None:
        self.answer = answer
        #: Requests the peer may have outstanding: the negotiated window, 1 without one.
        self.size = 1
        #: The writer whose staged objects a flush makes durable (set once accepted).
        self.writer: Writer | None = None
        #: The ack journal the records of stored objects go to before their answers.
        self.ack: AckJournal | None = None
        #: The last journal record committed for this association (0: none).
        self.last_seq = 0
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
        claimed = [o.claim for _, o in waiting]
        if self.writer is not None and self.writer.unsynced:
            try:
                self.writer.sync()
            except OSError as exc:
                waiting = [
                    (request, Outcome(status_for_error(exc), str(exc)) if outcome.path else outcome)
                    for request, outcome in waiting
                ]
        if self.ack is not None:
            waiting = self._commit(self.ack, waiting)
        if any(claimed):
            self._release(claimed, waiting)
        now = time.monotonic()
        for request, outcome in waiting:
            if outcome.commit_started:
                METRICS.commit_seconds.observe(now - outcome.commit_started)
            self.answer(request, outcome)

    def _release(self, claimed: list[Claim | None], waiting: list[tuple[R, Outcome]]) -> None:
        """Each object's claim on its identity: its work is durable now (in its journal
        record, if it has one), or failed (its outcome was replaced by the failure)."""
        for claim, (_, outcome) in zip(claimed, waiting, strict=True):
            if claim is None:
                continue
            outcome.claim = None
            record = outcome.record
            seq = record.seq if record is not None and outcome.status == Status.SUCCESS else 0
            CLAIMS.release(claim, seq, self.ack)

    def abandon(self) -> None:
        """The association ends with objects never answered: files already named are made
        durable anyway (a copy of their instance may be decided against them), and their
        claims released; nothing is answered."""
        waiting, self._waiting = self._waiting, []
        if self.writer is not None and self.writer.unsynced:
            try:
                self.writer.sync()
            except OSError:
                pass  # their names are taken back: no copy finds them
        for _, outcome in waiting:
            if outcome.claim is not None:
                CLAIMS.release(outcome.claim)
                outcome.claim = None

    def wait_visible(self, log: FilteringBoundLogger) -> None:
        """Every object answered here under its final name (before A-RELEASE-RP: a script run
        when storescu returns finds them all, as with dcmrecv)."""
        seq = self.last_seq
        if self.ack is not None and seq and not self.ack.wait_visible(seq):
            log.warning("journal.behind", seq=seq)

    def _commit(self, ack: AckJournal, waiting: list[tuple[R, Outcome]]) -> list[tuple[R, Outcome]]:
        """The records of the objects stored, durable in one commit (with other associations')."""
        records = [o.record for _, o in waiting if o.record is not None and o.status == Status.SUCCESS]
        if not records:
            return waiting
        try:
            ack.commit(records)
        except OSError as exc:  # none of them is acknowledged: a file already named goes again
            for record in records:
                # A file that replaced another copy of its name stays: it is complete and durable,
                # and taking it back would leave no copy at all.
                if record.large and not record.replace:
                    take_back(ack.journal.ops, record.final_path)
            failed = Outcome(status_for_error(exc), str(exc))
            return [
                (r, failed if o.record is not None and o.status == Status.SUCCESS else o) for r, o in waiting
            ]
        self.last_seq = records[-1].seq
        return waiting
