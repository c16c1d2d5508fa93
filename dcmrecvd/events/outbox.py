"""The event outbox: every acknowledged object's events, at least once, off the ack path.

The association hands an ``object.stored`` body to ``record`` after its response
is sent; that only appends to an in-memory queue, so nothing after the ack can
delay or fail a C-STORE.  One writer thread moves the queue into SQLite (WAL,
``synchronous=NORMAL``: commits are not fsynced one by one), tracks series and
studies for completion, and emits their events.

Why no fsync per object: the stored file is already the durable record.  Every
few seconds the writer checkpoints the database (which fsyncs it) together with
a mark, *durable_before*: every object whose file was last written before it
has its event on disk.  After a crash the events the outbox lost are rebuilt
from the files themselves: every file newer than the mark that the outbox does
not know (``recover``).  So: at least once; duplicates are possible after a
crash (an event delivered, then lost from the outbox, then rebuilt); never a
missing event for an acknowledged object, provided the gap between an object's
last write and its ack stays under ``SLACK`` seconds.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import structlog

from dcmrecvd.events import body as events
from dcmrecvd.events.body import Body
from dcmrecvd.events.completion import Completion, iso
from dcmrecvd.events.event_store import EventStore

log = structlog.get_logger("dcmrecvd")

#: Seconds allowed between an object's last write and its event being queued (flush,
#: rename, directory fsync, response); the mark stays this far behind the writer.
SLACK = 60.0
#: How long events gather in memory before the writer stores them, in one transaction.
BATCH_SECONDS = 0.05
#: How often the writer makes the outbox durable and moves the mark.
CHECKPOINT_SECONDS = 5.0


class Outbox(EventStore):
    """The event store, its writer thread, completion and recovery."""

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
        if self.meta("clean") is None:
            self._begin()
        #: Files written before this are not the outbox's: the mark never goes below it.
        self.created = float(self.meta("created") or 0.0)
        self.was_clean = self.meta("clean") == "1"
        self.set_meta("clean", "0")

    def _begin(self) -> None:
        """A new outbox starts clean, its mark at its creation, durably: what the output
        directory held before it existed (a site turning hooks or AMQP on) is no event
        of its, and must not be replayed as one by a recovery."""
        now = repr(self.clock())
        for key, value in (("created", now), ("durable_before", now), ("clean", "1")):
            self.set_meta(key, value)
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

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
                    self.checkpoint(began - SLACK)
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

    def checkpoint(self, mark: float) -> None:
        """Make the outbox durable up to now, and say so: files older than ``mark`` are in."""
        with self.lock:
            self.set_meta("durable_before", repr(max(mark, self.created)))
            self.db.execute("PRAGMA wal_checkpoint(FULL)")
            # Delivered events are kept while recovery may still look for their files.
            self.db.execute(
                "DELETE FROM events WHERE created < ? AND id NOT IN (SELECT event_id FROM deliveries)",
                (mark - SLACK,),
            )
            self.completion.forget_old()

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

    # ------------------------------------------------------------------ recovery

    def recover(self, roots: Sequence[tuple[Path, str]], read: Callable[[Path], Body | None]) -> int:
        """After an unclean stop: queue ``object.stored`` for every file newer than the mark
        that the outbox does not know.  ``roots``: (output directory, called AE name);
        ``read`` makes an event body from a file (None: not an object of ours)."""
        mark = self.durable_before() - 1.0  # mtime granularity
        found = 0
        own = {self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"), self.path.parent}
        for root, called in roots:
            for path in _files_since(root, mark, skip=own):
                if self.knows_file(path):
                    continue
                body = read(path)
                if body is None:
                    continue
                # Our files say which AE title they came in under (0002,0018); for one that
                # does not (written before that), the study it belongs to, if the outbox
                # already tracks it, does.
                body.setdefault("called_aet", self.completion.called_for(body) or called)
                self.record({**body, "recovered": 1})
                found += 1
        if found:
            log.info("events.recovered", objects=found, since=iso(mark) if mark > 0 else "the first event")
        return found


def _files_since(root: Path, mark: float, skip: Collection[Path]) -> Iterable[Path]:
    """Final (not hidden) files under ``root`` written since ``mark``.  A file is only
    stat'ed in a directory that changed since then (a rename into it changes it), so
    an archive of old days costs a listing per directory, not a stat per file."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            changed = directory.stat().st_mtime >= mark
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or Path(entry.path) in skip:
                continue  # hidden: temp files, the outbox itself
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif changed and entry.is_file(follow_symlinks=False):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime >= mark:
                        yield Path(entry.path)
                except OSError:
                    continue


def body_from_file(path: Path) -> Body | None:
    """An ``object.stored`` body rebuilt from a stored file (recovery)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError):
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "SOPInstanceUID" not in ds:
        return None
    st = path.stat()
    return {
        "event": events.OBJECT_STORED,
        "calling_aet": str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
        **({"called_aet": called} if (called := _text(meta.get("ReceivingApplicationEntityTitle"))) else {}),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "path": str(path),
        "directory": str(path.parent),
        "size": st.st_size,
        "transfer_syntax": str(meta.get("TransferSyntaxUID", "")),
        "time": iso(st.st_mtime),
    }


def _text(value: object) -> str:
    return str(value or "").strip()
