"""The outbox's durable half: events and their deliveries in SQLite, and what consumers ask of it.

Why SQLite (stdlib): one file, transactions, WAL so that readers (hooks, the
publisher) never wait for the writer; ``synchronous=NORMAL``, because the
ack journal is the durable record and ``checkpoint`` makes the database
durable every few seconds and whenever the ack journal checkpoints (see ``outbox``).

An event is one row; a delivery is (event, consumer): each consumer (a hook,
the AMQP publisher) takes the kinds it asked for, in order per study, with
retries and a dead letter.  Completion's table (``groups``) lives in the same
file and transactions, but is ``completion``'s to use.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dcmrecvd.events import body as events
from dcmrecvd.events.body import Body
from dcmrecvd.store.sqlite_file import open_database

#: Pending deliveries a consumer looks at per round (the oldest ones).
WINDOW = 100
#: ``deliveries.dead`` of a held delivery (0: pending, 1: dead-lettered).
HELD = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, created REAL NOT NULL,
    study_key TEXT NOT NULL, path TEXT, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_path ON events(path);
CREATE INDEX IF NOT EXISTS events_study ON events(study_key, id);
CREATE TABLE IF NOT EXISTS deliveries(
    event_id INTEGER NOT NULL, consumer TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0, dead INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY(event_id, consumer));
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(consumer, dead, event_id);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Due:
    """An event a consumer should handle now."""

    event_id: int
    study_key: str
    body: Body
    #: When the outbox took the event (its clock): how long a delivery has been trying.
    created: float = 0.0


class EventStore:
    """Events, deliveries and marks in one SQLite file; safe to share between threads
    (one lock around the connection)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.db = open_database(path, _SCHEMA, synchronous="NORMAL")
        columns = {str(row[1]) for row in self.db.execute("PRAGMA table_info(deliveries)")}
        if "since" not in columns:  # 0.9: a re-queued delivery's give_up_after counts from then
            self.db.execute("ALTER TABLE deliveries ADD COLUMN since REAL NOT NULL DEFAULT 0")
        self.lock = threading.Lock()
        #: consumer name -> the event kinds it takes (set by the lifecycle from the config).
        self.consumers: dict[str, frozenset[str]] = {}
        #: consumer name -> kinds whose deliveries are held (``dead = 2``) until ``release``:
        #: a forward destination sending whole series or studies holds their objects.
        self.held: dict[str, frozenset[str]] = {}
        #: Notified after each write: consumers wait on it instead of polling the database;
        #: ``generation`` counts the notifications (a waiter that read it before looking
        #: at the database waits only if nothing happened since: no lost wake-up).
        self.changed = threading.Condition()
        self.generation = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction, under the caller's ``lock`` (the connection is in autocommit
        mode, so ``with db:`` alone would commit each statement by itself: an event
        without its deliveries after a kill)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def notify(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def insert(self, body: Body) -> int:
        """One event and a delivery per consumer of its kind (inside a transaction)."""
        kind = str(body["event"])
        cursor = self.db.execute(
            "INSERT INTO events(kind, created, study_key, path, body) VALUES (?, ?, ?, ?, ?)",
            (kind, self.clock(), events.study_key(body), body.get("path"), events.to_json(body)),
        )
        event_id = int(cursor.lastrowid or 0)
        self.db.executemany(
            "INSERT INTO deliveries(event_id, consumer, dead) VALUES (?, ?, ?)",
            [
                (event_id, name, HELD if kind in self.held.get(name, ()) else 0)
                for name, kinds in self.consumers.items()
                if kind in kinds
            ],
        )
        return event_id

    def knows_event(self, body: Body) -> bool:
        """Is this very ``object.stored`` or ``object.duplicate`` (same object, same path, same
        ack time) in already?  (A replay after kill -9 hands on events the outbox may have
        written before.)"""
        with self.lock:
            rows = self.db.execute(
                "SELECT body FROM events WHERE path = ? AND kind = ?",
                (body.get("path"), body.get("event", events.OBJECT_STORED)),
            ).fetchall()
        for (text,) in rows:
            known = json.loads(text)
            if known.get("time") == body.get("time") and known.get("sop_instance_uid") == body.get(
                "sop_instance_uid"
            ):
                return True
        return False

    # ------------------------------------------------------------------ consumers

    def due(
        self,
        consumer: str,
        busy: Collection[str],
        limit: int,
        waiting: dict[str, float] | None = None,
    ) -> tuple[list[Due], float | None]:
        """Up to ``limit`` events for ``consumer``: per study its oldest pending one, if that
        is due and its study not ``busy`` (in order per study); and the earliest retry time
        seen (when to look again).  Reads ``WINDOW`` pending deliveries, oldest first:
        scanning from the oldest, a study's first row is its oldest pending event.

        ``waiting`` (the caller's, kept across calls): study -> when its oldest event is due
        again.  Those studies, and the busy ones, are left out of the scan itself, so a study
        with a long backlog whose head waits for a retry never fills the window and holds the
        others back (one object retried for hours must not stop every other study)."""
        now = self.clock()
        waiting = {} if waiting is None else waiting
        for key in [k for k, t in waiting.items() if t <= now]:
            del waiting[key]
        skip = json.dumps(sorted(set(busy) | set(waiting)))
        with self.lock:
            rows = self.db.execute(
                "SELECT e.id, e.study_key, d.next_try FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0"
                " AND e.study_key NOT IN (SELECT value FROM json_each(?)) ORDER BY d.event_id LIMIT ?",
                (consumer, skip, WINDOW),
            ).fetchall()
        chosen: list[tuple[int, str]] = []
        seen: set[str] = set()
        for event_id, key, next_try in rows:
            if key in seen:
                continue
            seen.add(key)
            if next_try > now:
                waiting[str(key)] = float(next_try)
            else:
                chosen.append((int(event_id), str(key)))
                if len(chosen) >= limit:
                    break
        retry = min(waiting.values()) if waiting else None
        out: list[Due] = []
        with self.lock:  # the bodies of the chosen ones only
            for event_id, key in chosen:
                body, created = self.db.execute(
                    "SELECT e.body, max(e.created, d.since) FROM events e JOIN deliveries d"
                    " ON d.event_id = e.id WHERE e.id = ? AND d.consumer = ?",
                    (event_id, consumer),
                ).fetchone()
                out.append(Due(event_id, key, events.from_json(body), float(created)))
        return out, retry

    def following(self, consumer: str, study_key: str, after: int, limit: int) -> list[Due]:
        """``consumer``'s pending, due deliveries of one study after event ``after``, in order
        (what may join that event in one batch)."""
        now = self.clock()
        with self.lock:
            rows = self.db.execute(
                "SELECT e.id, e.body, max(e.created, d.since), d.next_try FROM deliveries d JOIN events e"
                " ON e.id = d.event_id WHERE d.consumer = ? AND d.dead = 0 AND e.study_key = ?"
                " AND e.id > ? ORDER BY e.id LIMIT ?",
                (consumer, study_key, after, limit),
            ).fetchall()
        out = []
        for event_id, body, created, next_try in rows:
            if next_try > now:  # not due: nothing after it may overtake it
                break
            out.append(Due(int(event_id), study_key, events.from_json(body), float(created)))
        return out

    def due_in_order(self, consumer: str, limit: int) -> list[Due]:
        """Up to ``limit`` of ``consumer``'s due events, oldest first (a publisher keeps
        the order of the log, not per study)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT e.id, e.study_key, e.body FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0 AND d.next_try <= ? ORDER BY e.id LIMIT ?",
                (consumer, self.clock(), limit),
            ).fetchall()
        return [Due(int(i), str(k), events.from_json(b)) for i, k, b in rows]

    def done(self, event_id: int, consumer: str) -> None:
        with self.lock, self.transaction():
            self.db.execute(
                "DELETE FROM deliveries WHERE event_id = ? AND consumer = ?", (event_id, consumer)
            )

    def attempts(self, event_id: int, consumer: str) -> int:
        """Failed runs of this delivery so far."""
        with self.lock:
            row = self.db.execute(
                "SELECT attempts FROM deliveries WHERE event_id = ? AND consumer = ?", (event_id, consumer)
            ).fetchone()
        return int(row[0]) if row else 0

    def failed(self, event_id: int, consumer: str, error: str, retry_at: float | None) -> None:
        """Count a failed run: tried again at ``retry_at``, or (None) dead-lettered."""
        with self.lock, self.transaction():
            self.db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, error = ?, next_try = ?, dead = ?"
                " WHERE event_id = ? AND consumer = ?",
                (error[-500:], retry_at or 0.0, retry_at is None, event_id, consumer),
            )

    def expire(self, consumer: str, before: float, why: str) -> list[tuple[int, str, Body]]:
        """Dead-letter ``consumer``'s pending deliveries received (or re-queued) before
        ``before``, tried or not (a destination down or paused tries none but one): (event
        id, reason, body) of each."""
        with self.lock, self.transaction():
            rows = self.db.execute(
                "SELECT d.event_id, d.error, e.body FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0 AND max(e.created, d.since) < ?",
                (consumer, before),
            ).fetchall()
            expired = [
                (int(i), f"{why}: {err or 'never tried (the destination was down or paused)'}", b)
                for i, err, b in rows
            ]
            self.db.executemany(
                "UPDATE deliveries SET dead = 1, error = ? WHERE event_id = ? AND consumer = ?",
                [(reason[-500:], event_id, consumer) for event_id, reason, _ in expired],
            )
        return [(event_id, reason, events.from_json(body)) for event_id, reason, body in expired]

    def forget(self, consumers: Iterable[str]) -> None:
        """Consumers removed by a reload: their pending deliveries go."""
        with self.lock, self.transaction():
            self.db.executemany("DELETE FROM deliveries WHERE consumer = ?", [(c,) for c in consumers])

    def pending_and_dead(self) -> tuple[int, int]:
        """Deliveries waiting, and dead-lettered ones."""
        with self.lock:
            pending, dead = self.db.execute(
                "SELECT COALESCE(SUM(dead = 0), 0), COALESCE(SUM(dead = 1), 0) FROM deliveries"
            ).fetchone()
        return int(pending), int(dead)

    def release(self, consumer: str, study_key: str, series_uid: str | None, before: int) -> int:
        """Make ``consumer``'s held deliveries of one study (one series of it, when given)
        received before event ``before`` due, in their order; how many."""
        series = " AND json_extract(e.body, '$.series_uid') = ?" if series_uid is not None else ""
        with self.lock, self.transaction():
            cursor = self.db.execute(
                "UPDATE deliveries SET dead = 0 WHERE consumer = ? AND dead = ? AND event_id IN"
                f" (SELECT e.id FROM events e WHERE e.study_key = ? AND e.id < ?{series})",
                (consumer, HELD, study_key, before, *(() if series_uid is None else (series_uid,))),
            )
        return int(cursor.rowcount)

    def release_all(self, consumer: str) -> None:
        with self.lock, self.transaction():
            self.db.execute(
                "UPDATE deliveries SET dead = 0 WHERE consumer = ? AND dead = ?", (consumer, HELD)
            )

    def backlog(self, consumer: str) -> tuple[int, float | None]:
        """A consumer's deliveries waiting, and when the oldest one's event came in."""
        with self.lock:
            count, oldest = self.db.execute(
                "SELECT count(*), min(e.created) FROM deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.consumer = ? AND d.dead = 0",
                (consumer,),
            ).fetchone()
        return int(count), None if oldest is None else float(oldest)

    def dead_letters(self, consumers: Collection[str]) -> list[tuple[str, int, int, str, Body]]:
        """(consumer, event id, attempts, error, body) of each dead delivery of ``consumers``."""
        marks = ",".join("?" * len(consumers))
        with self.lock:
            rows = self.db.execute(
                "SELECT d.consumer, e.id, d.attempts, d.error, e.body FROM deliveries d"
                f" JOIN events e ON e.id = d.event_id WHERE d.dead = 1 AND d.consumer IN ({marks})"
                " ORDER BY d.consumer, e.id",
                tuple(consumers),
            ).fetchall()
        return [(str(c), int(i), int(a), str(err), events.from_json(b)) for c, i, a, err, b in rows]

    def requeue_dead(self, consumer: str) -> int:
        """Dead deliveries of ``consumer`` become due again, with their attempts reset."""
        with self.lock, self.transaction():
            cursor = self.db.execute(
                "UPDATE deliveries SET dead = 0, attempts = 0, next_try = 0, error = '', since = ?"
                " WHERE consumer = ? AND dead = 1",
                (self.clock(), consumer),
            )
        self.notify()
        return int(cursor.rowcount)

    def all_events(self) -> list[Body]:
        """Every event still in the outbox, oldest first (tests, inspection)."""
        with self.lock:
            rows = self.db.execute("SELECT body FROM events ORDER BY id").fetchall()
        return [events.from_json(r[0]) for r in rows]
