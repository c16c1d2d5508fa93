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

import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from dcmrecvd import events
from dcmrecvd.events import Body

log = structlog.get_logger("dcmrecvd")

#: Seconds allowed between an object's last write and its event being queued (flush,
#: rename, directory fsync, response); the mark stays this far behind the writer.
SLACK = 60.0
#: How long events gather in memory before the writer stores them, in one transaction.
BATCH_SECONDS = 0.05
#: How often the writer makes the outbox durable and moves the mark.
CHECKPOINT_SECONDS = 5.0
#: Pending deliveries a consumer looks at per round (the oldest ones).
WINDOW = 100
#: Completed series and studies are remembered this long, for late arrivals.
KEEP_GROUPS_SECONDS = 7 * 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, created REAL NOT NULL,
    study_key TEXT NOT NULL, path TEXT, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_path ON events(path);
CREATE TABLE IF NOT EXISTS deliveries(
    event_id INTEGER NOT NULL, consumer TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0, dead INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY(event_id, consumer));
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(consumer, dead, event_id);
CREATE TABLE IF NOT EXISTS groups(
    key TEXT PRIMARY KEY, level TEXT NOT NULL, body TEXT NOT NULL, first REAL NOT NULL,
    last REAL NOT NULL, objects INTEGER NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: The fields of an object's event that its series and study events carry on.
_GROUP_FIELDS = ("called_aet", "calling_aet", "peer", "study_uid", "patient_id", "directory")


@dataclass(frozen=True)
class Due:
    """An event a consumer should handle now."""

    event_id: int
    study_key: str
    body: Body


class Outbox:
    """The SQLite outbox and its writer thread."""

    def __init__(
        self,
        path: Path,
        *,
        stable_seconds: float,
        max_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.stable, self.cap = stable_seconds, max_seconds
        self.clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Body] = queue.SimpleQueue()
        #: consumer name -> the event kinds it takes (hooks; set by ``hooks.Hooks``).
        self.consumers: dict[str, frozenset[str]] = {}
        #: Set after each write: consumers wait on it instead of polling the database.
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.was_clean = self._meta("clean") == "1"
        self._set_meta("clean", "0")

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
            with self._lock, self._transaction():
                for body in batch:
                    self._insert(body)
                    self._track(body)
        except sqlite3.Error:
            for body in batch:  # not lost: tried again on the next turn
                self._queue.put(body)
            raise
        self._notify()
        return len(batch)

    def _insert(self, body: Body) -> int:
        kind = str(body["event"])
        cursor = self._db.execute(
            "INSERT INTO events(kind, created, study_key, path, body) VALUES (?, ?, ?, ?, ?)",
            (kind, self.clock(), events.study_key(body), body.get("path"), events.to_json(body)),
        )
        event_id = int(cursor.lastrowid or 0)
        self._db.executemany(
            "INSERT INTO deliveries(event_id, consumer) VALUES (?, ?)",
            [(event_id, name) for name, kinds in self.consumers.items() if kind in kinds],
        )
        return event_id

    def _track(self, body: Body) -> None:
        """An object extends its series and its study; one after completion reopens it as
        an update (a late arrival), never as a second completion."""
        if body["event"] != events.OBJECT_STORED:
            return
        now = self.clock()
        summary = {k: body.get(k, "") for k in _GROUP_FIELDS}
        for level, key, extra in (
            ("series", events.series_key(body), {"series_uid": body.get("series_uid", "")}),
            ("study", events.study_key(body), {}),
        ):
            row = self._db.execute("SELECT state FROM groups WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO groups VALUES (?, ?, ?, ?, ?, 1, 'open')",
                    (key, level, events.to_json({**summary, **extra}), now, now),
                )
            elif row[0] == "complete":
                self._db.execute(
                    "UPDATE groups SET state = 'updating', first = ?, last = ?, objects = objects + 1"
                    " WHERE key = ?",
                    (now, now, key),
                )
            else:
                self._db.execute(
                    "UPDATE groups SET last = ?, objects = objects + 1 WHERE key = ?", (now, key)
                )

    def complete_due(self, force: bool = False) -> int:
        """Emit the completions that are due: no new object for ``stable`` seconds, or
        ``cap`` seconds since the first; every pending one when ``force``."""
        now = self.clock()
        with self._lock, self._transaction():
            rows = self._db.execute(
                "SELECT key, level, body, objects, state FROM groups WHERE state != 'complete'"
                " AND (? OR last <= ? OR first <= ?) ORDER BY level, first",
                (force, now - self.stable, now - self.cap),
            ).fetchall()  # series before their study ("series" sorts before "study")
            for key, level, body, objects, state in rows:
                kind = f"{level}.{'complete' if state == 'open' else 'updated'}"
                self._insert({**events.from_json(body), "event": kind, "objects": objects, "time": _iso(now)})
                self._db.execute("UPDATE groups SET state = 'complete', objects = 0 WHERE key = ?", (key,))
        if rows:
            self._notify()
        return len(rows)

    def checkpoint(self, mark: float) -> None:
        """Make the outbox durable up to now, and say so: files older than ``mark`` are in."""
        with self._lock:
            self._set_meta("durable_before", repr(mark))
            self._db.execute("PRAGMA wal_checkpoint(FULL)")
            # Delivered events are kept while recovery may still look for their files.
            self._db.execute(
                "DELETE FROM events WHERE created < ? AND id NOT IN (SELECT event_id FROM deliveries)",
                (mark - SLACK,),
            )
            self._db.execute(
                "DELETE FROM groups WHERE state = 'complete' AND last < ?",
                (self.clock() - KEEP_GROUPS_SECONDS,),
            )

    def stop(self, *, complete: bool = False) -> None:
        """Drain, optionally complete everything pending, make it durable, mark it clean."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.drain()
        if complete:
            self.complete_due(force=True)
        self.checkpoint(self.clock())
        with self._lock:
            self._set_meta("clean", "1")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (the connection is in autocommit mode, so ``with db:`` alone
        would commit each statement by itself: an event without its deliveries after a kill)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ recovery

    def durable_before(self) -> float:
        value = self._meta("durable_before")
        return float(value) if value else 0.0

    def recover(self, roots: Sequence[tuple[Path, str]], read: Callable[[Path], Body | None]) -> int:
        """After an unclean stop: queue ``object.stored`` for every file newer than the mark
        that the outbox does not know.  ``roots``: (output directory, called AE name);
        ``read`` makes an event body from a file (None: not an object of ours)."""
        mark = self.durable_before() - 1.0  # mtime granularity
        found = 0
        for root, called in roots:
            own = {self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"), self.path.parent}
            for path in _files_since(root, mark, skip=own):
                with self._lock:
                    known = self._db.execute(
                        "SELECT 1 FROM events WHERE path = ? AND kind = ? LIMIT 1",
                        (str(path), events.OBJECT_STORED),
                    ).fetchone()
                if known:
                    continue
                body = read(path)
                if body is None:
                    continue
                # A file does not say which called title it came in under; the study it
                # belongs to, if the outbox already tracks it, does.
                body["called_aet"] = self._called_for(body) or called
                self.record({**body, "recovered": 1})
                found += 1
        if found:
            log.info("events.recovered", objects=found, since=_iso(mark) if mark > 0 else "the first event")
        return found

    def _called_for(self, body: Body) -> str | None:
        suffix = "\x1f" + "\x1f".join((str(body.get("calling_aet", "")), str(body.get("study_uid", ""))))
        with self._lock:
            row = self._db.execute(
                "SELECT key FROM groups WHERE level = 'study' AND substr(key, -length(?)) = ?"
                " ORDER BY last DESC LIMIT 1",
                (suffix, suffix),
            ).fetchone()
        return None if row is None else str(row[0])[: -len(suffix)]

    # ------------------------------------------------------------------ consumers

    def due(self, consumer: str, busy: Collection[str], limit: int) -> tuple[list[Due], float | None]:
        """Up to ``limit`` events for ``consumer``: per study its oldest pending one, if that
        is due and its study not ``busy`` (in order per study); and the earliest retry time
        seen (when to look again).  Reads the oldest ``WINDOW`` pending deliveries only:
        scanning from the oldest, a study's first row is its oldest pending event."""
        now = self.clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT e.id, e.study_key, d.next_try FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0 ORDER BY d.event_id LIMIT ?",
                (consumer, WINDOW),
            ).fetchall()
        chosen: list[tuple[int, str]] = []
        seen: set[str] = set()
        retry: float | None = None
        for event_id, key, next_try in rows:
            if key in seen:
                continue
            seen.add(key)
            if next_try > now:
                retry = next_try if retry is None else min(retry, next_try)
            elif key not in busy:
                chosen.append((int(event_id), str(key)))
                if len(chosen) >= limit:
                    break
        out: list[Due] = []
        with self._lock:  # the bodies of the chosen ones only
            for event_id, key in chosen:
                body = self._db.execute("SELECT body FROM events WHERE id = ?", (event_id,)).fetchone()[0]
                out.append(Due(event_id, key, events.from_json(body)))
        return out, retry

    def due_in_order(self, consumer: str, limit: int) -> list[Due]:
        """Up to ``limit`` of ``consumer``'s due events, oldest first (a publisher keeps
        the order of the log, not per study)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.id, e.study_key, e.body FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0 AND d.next_try <= ? ORDER BY e.id LIMIT ?",
                (consumer, self.clock(), limit),
            ).fetchall()
        return [Due(int(i), str(k), events.from_json(b)) for i, k, b in rows]

    def done(self, event_id: int, consumer: str) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM deliveries WHERE event_id = ? AND consumer = ?", (event_id, consumer)
            )

    def attempts(self, event_id: int, consumer: str) -> int:
        """Failed runs of this delivery so far."""
        with self._lock:
            row = self._db.execute(
                "SELECT attempts FROM deliveries WHERE event_id = ? AND consumer = ?", (event_id, consumer)
            ).fetchone()
        return int(row[0]) if row else 0

    def failed(self, event_id: int, consumer: str, error: str, retry_at: float | None) -> None:
        """Count a failed run: tried again at ``retry_at``, or (None) dead-lettered."""
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, error = ?, next_try = ?, dead = ?"
                " WHERE event_id = ? AND consumer = ?",
                (error[-500:], retry_at or 0.0, retry_at is None, event_id, consumer),
            )

    def forget(self, consumers: Iterable[str]) -> None:
        """Consumers removed by a reload: their pending deliveries go."""
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM deliveries WHERE consumer = ?", [(c,) for c in consumers])

    def counts(self) -> dict[str, int]:
        """Pending and dead-lettered deliveries, and events not yet written (for STATUS)."""
        with self._lock:
            pending, dead = self._db.execute(
                "SELECT COALESCE(SUM(dead = 0), 0), COALESCE(SUM(dead = 1), 0) FROM deliveries"
            ).fetchone()
        return {"pending": int(pending), "dead": int(dead), "queued": self._queue.qsize()}

    def all_events(self) -> list[Body]:
        """Every event still in the outbox, oldest first (tests, inspection)."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM events ORDER BY id").fetchall()
        return [events.from_json(r[0]) for r in rows]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1e6):06d}"


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
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "path": str(path),
        "directory": str(path.parent),
        "size": st.st_size,
        "transfer_syntax": str(meta.get("TransferSyntaxUID", "")),
        "time": _iso(st.st_mtime),
    }
