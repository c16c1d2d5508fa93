"""Storage Commitment transactions, kept until their report is delivered (or given up).

Why SQLite with ``synchronous=FULL``: the N-ACTION-RSP promises a report, so the
request must be on disk before that answer goes out, and survive SIGTERM, kill -9
and power loss; a transaction of 100,000 items is one SQLite transaction (one
WAL fsync), and "which reports are due" is an indexed query.  What is kept is the
request as asked (who, which instances, from where), never a result: whether an
instance is committed is decided afresh at each attempt to report it.

A request repeated with the same Transaction UID by the same AE while the first is
pending is the same transaction when it names the same instances (one report);
with other instances it is refused (``Conflict``): two reports under one UID would
leave the modality unable to tell them apart.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .sqlite_file import open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    called_aet TEXT NOT NULL,
    host TEXT NOT NULL,
    items INTEGER NOT NULL,
    digest TEXT NOT NULL,
    requested REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT NOT NULL DEFAULT '',
    finished REAL
);
CREATE INDEX IF NOT EXISTS due ON transactions (state, next_attempt);
CREATE TABLE IF NOT EXISTS items (
    tx INTEGER NOT NULL,
    n INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (tx, n)
) WITHOUT ROWID;
"""

PENDING, DELIVERED, UNDELIVERABLE = "pending", "delivered", "undeliverable"
#: Finished transactions are kept this long (for logs and questions), then removed.
KEEP_FINISHED_SECONDS = 7 * 86400


class Full(Exception):
    """commitment.max_pending transactions already wait for their report."""


class Conflict(Exception):
    """The Transaction UID is pending for this AE with other instances."""


@dataclass(frozen=True)
class Transaction:
    """One request, as kept."""

    id: int
    uid: str
    calling_aet: str
    called_aet: str
    #: Where the N-ACTION came from (the PROXY header's client when there was one).
    host: str
    items: int
    requested: float
    attempts: int


def digest(items: Iterable[tuple[str, str]]) -> str:
    """What identifies a request's instances: the *set* of them (a modality that asks again
    after a timeout may list them in another order, and it is the same transaction)."""
    return _ordered_digest(sorted(set(items)))


def _ordered_digest(items: Iterable[tuple[str, str]]) -> str:
    """The digest before 0.9 (the items in request order): still matched for pending rows."""
    h = hashlib.sha256()
    for sop_class, sop_instance in items:
        h.update(f"{sop_class}\\{sop_instance}\n".encode())
    return h.hexdigest()


class CommitmentStore:
    """The transactions; every method is safe from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Durable at each commit: the answer waits for it.
        self.db = open_database(path, SCHEMA, synchronous="FULL")

    def add(
        self,
        uid: str,
        calling_aet: str,
        called_aet: str,
        host: str,
        items: list[tuple[str, str]],
        now: float,
        max_pending: int,
    ) -> tuple[int, bool]:
        """Keep a request durably: (its id, True) when new, (the pending one's id, False)
        when the same request is pending already.  Full, Conflict."""
        fingerprint = digest(items)
        with self._lock:
            same = self.db.execute(
                "SELECT id, digest FROM transactions WHERE uid = ? AND calling_aet = ? AND state = ?",
                (uid, calling_aet, PENDING),
            ).fetchone()
            if same is not None:
                if same[1] not in (fingerprint, _ordered_digest(items)):
                    raise Conflict(uid)
                return int(same[0]), False
            pending = self.db.execute(
                "SELECT count(*) FROM transactions WHERE state = ?", (PENDING,)
            ).fetchone()
            if int(pending[0]) >= max_pending:
                raise Full(f"{pending[0]} transactions pending")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute(
                    "INSERT INTO transactions (uid, calling_aet, called_aet, host, items, digest, requested,"
                    " next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (uid, calling_aet, called_aet, host, len(items), fingerprint, now, now),
                )
                tx = int(cur.lastrowid or 0)
                self.db.executemany(
                    "INSERT INTO items VALUES (?, ?, ?, ?)", ((tx, n, c, i) for n, (c, i) in enumerate(items))
                )
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return tx, True

    def due(self, now: float, exclude: Iterable[int] = (), limit: int = 16) -> list[Transaction]:
        """Pending transactions whose next attempt has come, oldest first."""
        skip = set(exclude)
        with self._lock:
            rows = self.db.execute(
                "SELECT id, uid, calling_aet, called_aet, host, items, requested, attempts FROM transactions"
                " WHERE state = ? AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
                (PENDING, now, limit + len(skip)),
            ).fetchall()
        return [Transaction(*row) for row in rows if row[0] not in skip][:limit]

    def next_due(self) -> float | None:
        """When the earliest pending transaction is due (None: none pending)."""
        with self._lock:
            row = self.db.execute(
                "SELECT min(next_attempt) FROM transactions WHERE state = ?", (PENDING,)
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def items(self, tx: int) -> list[tuple[str, str]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT sop_class_uid, sop_instance_uid FROM items WHERE tx = ? ORDER BY n", (tx,)
            ).fetchall()
        return [(str(c), str(i)) for c, i in rows]

    def retry(self, tx: int, at: float, error: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE transactions SET attempts = attempts + 1, next_attempt = ?, last_error = ?"
                " WHERE id = ?",
                (at, error, tx),
            )

    def finish(self, tx: int, state: str, now: float, error: str = "") -> None:
        """Delivered, or given up; its items are no longer needed."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE transactions SET state = ?, finished = ?, attempts = attempts + 1, last_error = ?"
                " WHERE id = ?",
                (state, now, error, tx),
            )
            self.db.execute("DELETE FROM items WHERE tx = ?", (tx,))
            self.db.execute("COMMIT")

    def pending(self) -> tuple[int, float | None]:
        """How many transactions wait for their report, and when the oldest was requested."""
        with self._lock:
            count, oldest = self.db.execute(
                "SELECT count(*), min(requested) FROM transactions WHERE state = ?", (PENDING,)
            ).fetchone()
        return int(count), None if oldest is None else float(oldest)

    def prune(self, now: float) -> None:
        with self._lock:
            self.db.execute(
                "DELETE FROM transactions WHERE state != ? AND finished < ?",
                (PENDING, now - KEEP_FINISHED_SECONDS),
            )

    def close(self) -> None:
        with self._lock:
            self.db.close()
