"""The event outbox: every acknowledged object's events, at least once, off the ack path.

An ``object.stored`` body arrives through ``record`` (from the ack journal's
materialiser once the object's file is made, or, on the per-file path, from
the association after its response); that only appends to an in-memory
queue, so nothing after the ack can delay or fail a C-STORE.  One writer
thread moves the queue into SQLite (WAL, ``synchronous=NORMAL``: commits are
not fsynced one by one), tracks series and studies for completion, and emits
their events.

Why no fsync per object: the ack journal is the durable record.  Its
checkpoint passes an object's record only after ``persist`` has made the
object's event durable here; a crash before that leaves the record past the
checkpoint, and replay at start hands the event on again.  So: at least
once; duplicates are possible after a crash (an event delivered, then
handed on again by the replay); never a missing event for an acknowledged
object.  On the per-file path (journal off or unusable) an event queued but
not yet written when the process dies is lost: the journal is what makes
events crash-proof.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from dcmrecvd.events.body import Body
from dcmrecvd.events.completion import Completion
from dcmrecvd.events.event_store import EventStore

log = structlog.get_logger("dcmrecvd")

#: How long delivered events are kept (inspection; a replay may hand one on again meanwhile).
KEEP_DELIVERED_SECONDS = 3600.0
#: How long events gather in memory before the writer stores them, in one transaction.
BATCH_SECONDS = 0.05
#: How often the writer makes the outbox durable (and forgets old delivered events).
CHECKPOINT_SECONDS = 5.0


class Outbox(EventStore):
    """The event store, its writer thread and completion."""

    def __init__(
        self,
        path: Path,
        *,
        stable_seconds: float,
        max_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, clock)
        self.completion = Completion(self, stable_seconds, max_seconds)
        self._queue: queue.SimpleQueue[Body] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.set_meta("clean", "0")

    # ------------------------------------------------------------------ the ack side

    def record(self, body: Body) -> None:
        """Queue an acknowledged object's event; never blocks, never raises."""
        self._queue.put(body)

    # ------------------------------------------------------------------ the writer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_checkpoint = self.clock() + CHECKPOINT_SECONDS
        next_completion = 0.0
        while not self._stop.is_set():
            # Batched: one transaction every BATCH_SECONDS, not one wake-up per object (the
            # association threads would pay for each in GIL switches).
            self._stop.wait(BATCH_SECONDS)
            began = self.clock()
            try:
                self.drain()
                if began >= next_completion:  # completion has a resolution of a second
                    self.complete_due()
                    next_completion = began + 1.0
                if self.clock() >= next_checkpoint:
                    self.checkpoint(began)
                    next_checkpoint = self.clock() + CHECKPOINT_SECONDS
            except sqlite3.Error as exc:  # a full or broken disk: events wait in the queue
                log.error("events.unavailable", reason=str(exc), database=str(self.path))
                self._stop.wait(1.0)

    def drain(self, wait: float = 0.0) -> int:
        """Move everything queued into the database, in one transaction."""
        batch: list[Body] = []
        try:
            batch.append(self._queue.get(timeout=wait) if wait else self._queue.get_nowait())
            while True:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not batch:
            return 0
        try:
            with self.lock, self.transaction():
                for body in batch:
                    self.insert(body)
                    self.completion.track(body)
        except sqlite3.Error:
            for body in batch:  # not lost: tried again on the next turn
                self._queue.put(body)
            raise
        self.notify()
        return len(batch)

    def complete_due(self, force: bool = False) -> int:
        """Emit the series and study completions that are due (``completion``)."""
        return self.completion.complete_due(force)

    def checkpoint(self, now: float) -> None:
        """Make the outbox durable, and forget delivered events older than an hour."""
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(FULL)")
            self.db.execute(
                "DELETE FROM events WHERE created < ? AND id NOT IN (SELECT event_id FROM deliveries)",
                (now - KEEP_DELIVERED_SECONDS,),
            )
            self.completion.forget_old()

    def persist(self) -> None:
        """Everything recorded so far durably in the outbox (the ack journal's checkpoint
        waits for this before it lets go of the records these events came from)."""
        self.drain()
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def stop(self, *, complete: bool = False) -> None:
        """Drain, optionally complete everything pending, make it durable, mark it clean."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.drain()
        if complete:
            self.complete_due(force=True)
        self.checkpoint(self.clock())
        with self.lock:
            self.set_meta("clean", "1")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def counts(self) -> dict[str, int]:
        """Pending and dead-lettered deliveries, and events not yet written (for STATUS)."""
        pending, dead = self.pending_and_dead()
        return {"pending": pending, "dead": dead, "queued": self._queue.qsize()}
