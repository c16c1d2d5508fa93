"""Series and study completion: which objects belong together, and when a unit is done.

DICOM has no "end of study" message, so completion is a policy: a series or
study is complete ``stable`` seconds after its last object, or ``cap`` seconds
after its first at the latest; an object after that reopens it as an update
(``series.updated`` / ``study.updated``), never a second completion.  Groups
are keyed per (called AE, calling AE, Study Instance UID) and kept in the
outbox's database (``groups``), inside the outbox's transactions, so pending
completions survive a restart.
"""

from __future__ import annotations

from dcmrecvd.events import body as events
from dcmrecvd.events.body import Body
from dcmrecvd.events.event_store import EventStore

#: Completed series and studies are remembered this long, for late arrivals.
KEEP_GROUPS_SECONDS = 7 * 86400.0
#: The fields of an object's event that its series and study events carry on.
_GROUP_FIELDS = ("called_aet", "calling_aet", "peer", "study_uid", "patient_id", "directory")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups(
    key TEXT PRIMARY KEY, level TEXT NOT NULL, body TEXT NOT NULL, first REAL NOT NULL,
    last REAL NOT NULL, objects INTEGER NOT NULL, state TEXT NOT NULL);
"""


class Completion:
    """Tracks open series and studies in ``store`` and emits their completions."""

    def __init__(self, store: EventStore, stable_seconds: float, max_seconds: float) -> None:
        self.store = store
        self.stable, self.cap = stable_seconds, max_seconds
        store.db.executescript(_SCHEMA)

    def track(self, body: Body) -> None:
        """An object extends its series and its study (call inside the store's transaction);
        one after completion reopens it as an update (a late arrival)."""
        if body["event"] != events.OBJECT_STORED:
            return
        db, now = self.store.db, self.store.clock()
        summary = {k: body.get(k, "") for k in _GROUP_FIELDS}
        for level, key, extra in (
            ("series", events.series_key(body), {"series_uid": body.get("series_uid", "")}),
            ("study", events.study_key(body), {}),
        ):
            row = db.execute("SELECT state FROM groups WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO groups VALUES (?, ?, ?, ?, ?, 1, 'open')",
                    (key, level, events.to_json({**summary, **extra}), now, now),
                )
            elif row[0] == "complete":
                db.execute(
                    "UPDATE groups SET state = 'updating', first = ?, last = ?, objects = objects + 1"
                    " WHERE key = ?",
                    (now, now, key),
                )
            else:
                db.execute("UPDATE groups SET last = ?, objects = objects + 1 WHERE key = ?", (now, key))

    def complete_due(self, force: bool = False) -> int:
        """Emit the completions that are due: no new object for ``stable`` seconds, or
        ``cap`` seconds since the first; every pending one when ``force``."""
        store = self.store
        now = store.clock()
        with store.lock, store.transaction():
            rows = store.db.execute(
                "SELECT key, level, body, objects, state FROM groups WHERE state != 'complete'"
                " AND (? OR last <= ? OR first <= ?) ORDER BY level, first",
                (force, now - self.stable, now - self.cap),
            ).fetchall()  # series before their study ("series" sorts before "study")
            for key, level, body, objects, state in rows:
                kind = f"{level}.{'complete' if state == 'open' else 'updated'}"
                store.insert(events.group(kind, events.from_json(body), objects, now))
                store.db.execute("UPDATE groups SET state = 'complete', objects = 0 WHERE key = ?", (key,))
        if rows:
            store.notify()
        return len(rows)

    def forget_old(self) -> None:
        """Completed groups no late arrival has touched for ``KEEP_GROUPS_SECONDS`` go
        (call under the store's lock)."""
        self.store.db.execute(
            "DELETE FROM groups WHERE state = 'complete' AND last < ?",
            (self.store.clock() - KEEP_GROUPS_SECONDS,),
        )
