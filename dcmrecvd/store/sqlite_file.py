"""One way to open our SQLite files: the instance index, commitment transactions, the outbox.

Why one: each is a WAL database in the state directory, shared between threads
under its owner's lock, and three openers had already drifted (one made its
directory world-readable).  Durability differs on purpose and is said by the
caller: ``NORMAL`` where a checkpoint or an explicit sync makes rows durable,
``FULL`` where an answer waits for each commit.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

#: The state directory's mode when it is made here (the daemon's group may read it).
DIRECTORY_MODE = 0o750


def open_database(path: Path, schema: str, *, synchronous: Literal["NORMAL", "FULL"]) -> sqlite3.Connection:
    """The database at ``path`` (made with ``schema`` if new), in WAL mode, autocommit."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db
