"""The instance index: (called AE, SOP Instance UID) -> where the object is and what it is.

Why: Storage Commitment ("do you hold it?"), a duplicate policy and forwarding
need to know what was acknowledged without walking the output directory, and
the answer must never lag the acknowledgement.  The index is written after the
object's file is durable (``materialiser``) and made durable before the
journal's checkpoint passes the object's record; a crash in between loses
nothing, because replay writes the rows again from the journal.  So every
acknowledged object has its row once recovery is over.

One row per (called AE, SOP Instance UID): an object received again replaces
its row (the newest copy is the one the index points to).  Rows are never
removed by dcmrecvd: a file that someone else moved or deleted keeps its row
(what was received, and when), and ``path_exists`` tells.  About 250 bytes a
row; see docs/ARCHITECTURE.md for growth and pruning.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .sqlite_file import open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    called_aet TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    stored TEXT NOT NULL,
    PRIMARY KEY (called_aet, sop_instance_uid)
) WITHOUT ROWID;
"""

#: UIDs per query in ``get_many`` (SQLite allows 32,766 parameters; smaller keeps the lock short).
_BATCH = 500


@dataclass(frozen=True)
class Instance:
    """One acknowledged object: its row in the index."""

    called_aet: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    size: int
    #: "crc32:<8 hex digits>": the stored file's CRC-32, which the ack path computes anyway
    #: for an object in its journal record; "" for a larger object (streamed to its own
    #: file: hashing it on the way would cost the bandwidth path CPU).  A cryptographic
    #: digest, where a policy needs one (the duplicate policy), is computed then, from the file.
    digest: str
    #: When it was acknowledged (ISO 8601, local time with offset).
    stored: str

    @property
    def path_exists(self) -> bool:
        return Path(self.path).is_file()


class InstanceIndex:
    """SQLite in WAL mode; ``put`` from the materialiser, ``sync`` before a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.db = open_database(path, SCHEMA, synchronous="NORMAL")  # durable at ``sync``

    def put(self, rows: Iterable[Instance]) -> None:
        """Add or replace rows, in one transaction (not yet durable: see ``sync``)."""
        values = [
            (r.called_aet, r.sop_instance_uid, r.sop_class_uid, r.path, r.size, r.digest, r.stored)
            for r in rows
        ]
        if not values:
            return
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def sync(self) -> None:
        """Make every row put so far durable (a full WAL checkpoint fsyncs the database)."""
        with self._lock:
            self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def get(self, called_aet: str, sop_instance_uid: str) -> Instance | None:
        with self._lock:
            row = self.db.execute(
                "SELECT * FROM instances WHERE called_aet = ? AND sop_instance_uid = ?",
                (called_aet, sop_instance_uid),
            ).fetchone()
        return Instance(*row) if row else None

    def get_many(self, called_aet: str, sop_instance_uids: Iterable[str]) -> dict[str, Instance]:
        """The rows of many instances at once (a commitment of 100,000 items is 200 queries,
        not 100,000 round trips through the lock)."""
        uids = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, Instance] = {}
        for start in range(0, len(uids), _BATCH):
            chunk = uids[start : start + _BATCH]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self.db.execute(
                    f"SELECT * FROM instances WHERE called_aet = ? AND sop_instance_uid IN ({marks})",
                    (called_aet, *chunk),
                ).fetchall()
            found.update((row[1], Instance(*row)) for row in rows)
        return found

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM instances").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self.db.close()
