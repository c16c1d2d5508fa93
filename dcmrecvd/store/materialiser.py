"""Journal records become files, off the ack path: one thread, in record order.

Per batch of records (whatever the journal wrote since the last turn) the files
are made (``making``: one ``syncfs`` and one fsync per directory for the batch,
an outcome per record), then the index rows written and the events handed on;
only after those are durable (``sync``) does the journal's checkpoint pass the
records, which lets their segment be recycled.  After each batch the journal is
told how far files are made (``made_through``): recovery never makes those again.

What a failure means is ``materialise_outcome``'s table.  *Permanent* for one
record: the record goes to the quarantine (its bytes and header, durably) and
the records behind it go on.  *Transient* (the disk): the batch stops at that
record, what was made before it stays made, and the rest is tried again with
backoff; meanwhile ``failing`` says why, and the serving side acknowledges no
new object (the journal never fills with objects that cannot land).

A record's header is made by the serving side and read by ``object_record``
only: each record is parsed once, here when the journal hands it over, or at
replay.  Nothing here knows DICOM: what became of each object goes to
``events`` as ``Settled`` facts, and the events layer builds the bodies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from . import bookkeeping
from .file_ops import REAL, FileOps
from .instance_index import InstanceIndex
from .journal import Journal, Record
from .making import Maker, give_name, write_temp
from .materialise_outcome import MakeFailure, Row, classify, retry_delay
from .object_record import ObjectRecord, Settled
from .quarantine import Quarantine
from .recovery import replay_records
from .storage import Store

__all__ = ["Materialiser", "give_name", "write_temp"]

log = structlog.get_logger("dcmrecvd")

#: How often, at most, the index and events are made durable and the checkpoint moved on
#: while objects keep coming (when idle it happens at once).  Short, because segments are
#: recycled only behind the checkpoint, and what is past it is replayed after a crash; not
#: shorter, because each costs the index's and the outbox's fsyncs on the same disk.
CHECKPOINT_SECONDS = 0.25

#: How long the thread waits for more records before making a batch, unless an association
#: waits for its files (A-RELEASE-RQ) or the batch is big already.
LINGER_SECONDS = 0.02
LINGER_RECORDS = 64

#: Takes what became of objects; the flag says they come from a replay (maybe handed on before).
Events = Callable[[list[Settled], bool], None]


class Materialiser:
    """Turns committed records into files, index rows and events; see the module docstring."""

    def __init__(
        self,
        journal: Journal,
        index: InstanceIndex,
        *,
        events: Events | None = None,
        persist_events: Callable[[], None] = lambda: None,
        ops: FileOps = REAL,
        ordered_journal: bool | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.journal = journal
        self.index = index
        #: Where what became of each object goes (the outbox), and how it makes that durable.
        self.events = events
        self.persist_events = persist_events
        #: Told of each file that replaced an older one of its name (a second copy, counted).
        self.replaced: Callable[[], None] = lambda: None
        #: Told of each record quarantined, with the short reason (the errno's name).
        self.quarantined: Callable[[str], None] = lambda reason: None
        self._stores: dict[str, Store] = {}
        #: The system calls, and what the filesystem promises (None: probed), for its ``Store``s.
        self.ops = ops
        self.ordered_journal = ordered_journal
        self.maker = Maker(ops, self._store)
        self.quarantine = quarantine or Quarantine(journal.directory.parent / "quarantine", ops)
        self._cond = threading.Condition()
        self._queue: list[ObjectRecord] = []
        #: Every record at or below this is under its final name (and has its row and events).
        self.visible_through = journal.done_through
        #: Sequence numbers done beyond ``visible_through`` (a gap before them is not).
        self._done: set[int] = set()
        self._stop = False
        #: Threads in ``wait_visible``: while there are any, batches go at once.
        self._waiting = 0
        self._thread: threading.Thread | None = None
        #: Why records cannot be made now, or passed by the checkpoint (None: they can).
        self._make_failure: MakeFailure | None = None
        self._checkpoint_failure: MakeFailure | None = None
        self._failed_tries = 0
        self._failing_since = 0.0
        self._next_try = 0.0

    @property
    def failing(self) -> MakeFailure | None:
        """Why acknowledged records cannot be made into files, or let go of, now (None: they
        can): read by the serving side, which acknowledges nothing new meanwhile."""
        return self._make_failure or self._checkpoint_failure

    # ------------------------------------------------------------------ intake

    def written(self, records: list[Record], ok: bool) -> None:
        """The journal wrote (``ok``) or failed to write these records, in sequence order."""
        with self._cond:
            if ok:
                self._queue.extend(ObjectRecord.of(r) for r in records)
            else:  # never acknowledged, never to be made: their numbers are simply done
                self._done.update(r.seq for r in records)
                self._advance_locked()
            self._cond.notify_all()

    def wait_visible(self, seq: int, timeout: float) -> bool:
        """Wait until the record ``seq`` (and all before it) is under its final name; False
        at once while records cannot be made (the release is not held for a full disk)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # no lingering while someone waits
            try:
                while self.visible_through < seq:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop or self.failing is not None:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._waiting -= 1

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="materialiser", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Make everything queued (one last try if making fails), checkpoint, end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        last_checkpoint = time.monotonic()
        while True:
            batch, stopping = self._next_batch(last_checkpoint)
            if batch:
                self._apply_and_account(batch)
            elif not stopping:
                bookkeeping.retry_quarantined(self)
            now = time.monotonic()
            # At most every CHECKPOINT_SECONDS, never per object: a lone sender leaves
            # the thread idle between objects, and each checkpoint costs fsyncs.
            due = now - last_checkpoint >= CHECKPOINT_SECONDS or stopping
            if self.visible_through > self.journal.done_through and due:
                self.try_checkpoint()  # a failed one is tried again a period later
                last_checkpoint = now
            with self._cond:
                if stopping and (not self._queue or self.failing is not None):
                    return

    def _next_batch(self, last_checkpoint: float) -> tuple[list[ObjectRecord], bool]:
        """Wait for records (or a checkpoint due, or the next try after a failure)."""
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                if self._queue and now >= self._next_try:
                    break
                unsaid = self.visible_through > self.journal.done_through
                due = last_checkpoint + CHECKPOINT_SECONDS - now
                if unsaid and due <= 0:
                    return [], False  # quiet, with made records not yet checkpointed: now
                waits = [1.0, due if unsaid else 1.0]
                if self._queue:
                    waits.append(self._next_try - now)
                self._cond.wait(max(min(waits), 0.001))
                if not self._queue:
                    return [], False  # an idle turn: quarantine retries, a checkpoint due
            # Linger a little for more: each batch costs two cache flushes however
            # many files it holds, and they compete with the journal's for the disk.
            linger_until = time.monotonic() + LINGER_SECONDS
            while (
                self._queue
                and len(self._queue) < LINGER_RECORDS
                and not self._waiting
                and not self._stop
                and self.failing is None
                and (left := linger_until - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            batch, self._queue = self._queue, []
            return batch, self._stop

    def _apply_and_account(self, batch: list[ObjectRecord]) -> None:
        rest, failure = self.apply(batch)
        passed = batch[: len(batch) - len(rest)]
        with self._cond:
            self._queue[:0] = rest  # tried again; never acknowledged twice, never lost
            self._done.update(r.seq for r in passed)
            self._advance_locked()
            self._note_failure(failure)
            self._cond.notify_all()
        if passed:
            try:  # how far files are made, for recovery (not the checkpoint: rows may lag)
                self.journal.checkpoint(self.journal.done_through, self.visible_through)
            except OSError as exc:
                log.warning("journal.materialise_failed", reason=classify(exc).reason, step="progress")

    def _note_failure(self, failure: MakeFailure | None) -> None:
        """Enter, stay in or leave the failing state (under the lock)."""
        now = time.monotonic()
        if failure is None:
            if self._make_failure is not None:
                log.warning(
                    "journal.materialise_resumed",
                    after_seconds=round(now - self._failing_since, 3),
                    tries=self._failed_tries,
                )
            self._make_failure, self._failed_tries, self._next_try = None, 0, 0.0
            return
        if self.failing is None:
            self._failing_since = now
        if self._make_failure is None or self._make_failure.reason != failure.reason:
            log.error("journal.materialise_failed", reason=failure.reason, waiting=len(self._queue))
        self._make_failure = failure
        self._failed_tries += 1
        self._next_try = now + retry_delay(self._failed_tries)

    def _advance_locked(self) -> None:
        through = self.visible_through
        while through + 1 in self._done:
            through += 1
            self._done.discard(through)
        self.visible_through = through

    def try_checkpoint(self) -> bool:
        """``checkpoint``, its failure said and counted as failing, not raised (True: done)."""
        try:
            self.checkpoint()
        except Exception as exc:  # the index, the outbox or the journal's disk: tried again later
            outcome = classify(exc)
            if self._checkpoint_failure is None or self._checkpoint_failure.reason != outcome.reason:
                log.error("journal.materialise_failed", reason=outcome.reason, step="checkpoint")
            self._checkpoint_failure = MakeFailure(Row.TRANSIENT, outcome.reason, outcome.errno)
            return False
        if self._checkpoint_failure is not None:
            log.warning("journal.materialise_resumed", step="checkpoint")
            self._checkpoint_failure = None
        return True

    def checkpoint(self) -> None:
        """Index rows and events durable, then the journal told: its records are done."""
        through = self.visible_through
        self.index.sync()
        self.persist_events()
        self.journal.checkpoint(through, through)
        self.journal.prepare_spare()

    # ------------------------------------------------------------------ making files

    def apply(
        self, batch: list[ObjectRecord], replayed: bool = False
    ) -> tuple[list[ObjectRecord], MakeFailure | None]:
        """Make what the batch still needs; return the records from the first one that
        could not pass (a transient failure, said in the second value) on."""
        result = self.maker.make(batch)
        failure = result.failure
        stop = len(batch) - len(result.rest)
        for at, record in enumerate(batch[:stop]):
            if record.state == "refused":
                try:
                    bookkeeping.quarantine(self, record, result.refused[record.seq])
                except OSError as exc:  # the last place it can go: wait, never drop it
                    failure = failure or classify(exc)
                    stop = at
                    break
        to_finish = [r for r in batch[:stop] if r.state == "made"]
        try:
            bookkeeping.finish(self, to_finish, replayed)
        except Exception as exc:
            return batch[_first(batch, to_finish) :], failure or classify(exc)
        return batch[stop:], failure

    def _store(self, root: str) -> Store:
        store = self._stores.get(root)
        if store is None:
            store = Store(Path(root), durable=True, ops=self.ops, ordered_journal=self.ordered_journal)
            self._stores[root] = store
        return store

    # ------------------------------------------------------------------ recovery and retries

    def replay(self, records: list[Record]) -> dict[str, int]:
        """At start: make what a crash left undone, verify what exists; counts for the log.
        Never raises for a record: what cannot be made is quarantined, what waits for the
        disk is left queued for the thread (and ``failing`` says why)."""
        counts, rest, failure = replay_records(self, [ObjectRecord.of(r) for r in records])
        with self._cond:
            self._queue[:0] = rest
            self._note_failure(failure)
        counts["waiting"] = len(rest)
        return counts

    def settle_replayed(self, records: list[ObjectRecord], rest: list[ObjectRecord]) -> None:
        """Recovery's bookkeeping: everything before ``rest`` passed, numbers missing from
        the journal (lost to corruption, reported) are passed too, so none blocks progress."""
        first_waiting = rest[0].seq if rest else None
        passed = [r.seq for r in records if first_waiting is None or r.seq < first_waiting]
        with self._cond:
            if records:
                start = self.visible_through + 1
                present = {r.seq for r in records}
                self._done.update(s for s in range(start, records[-1].seq + 1) if s not in present)
            self._done.update(passed)
            self._advance_locked()


def _first(batch: list[ObjectRecord], subset: list[ObjectRecord]) -> int:
    """Where the first record of ``subset`` is in ``batch`` (len(batch) for none)."""
    if not subset:
        return len(batch)
    first = subset[0]
    return next(at for at, record in enumerate(batch) if record is first)
