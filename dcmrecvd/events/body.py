"""What happened after the ack, as plain data: event bodies, and how a hook sees them.

Every body is built here, one constructor per kind, so that a consumer (a
hook, AMQP, the outbox) sees one contract: ``version`` (``BODY_VERSION``; it
changes only when a field's meaning or format does), ``event`` (the kind),
and ``time`` always in one format (``stamp``: local time with its UTC
offset, to the microsecond, e.g. ``2026-12-08T09:30:00.123456+01:00``).

An event is a flat mapping of strings and integers (``config.EVENT_FIELDS``),
the same for the outbox (JSON), a hook's stdin (JSON), its environment
(``DCMRECVD_<FIELD>``) and its argv placeholders (``{field}``).  Values from
the wire (AE titles, patient IDs) are only ever *values*: each placeholder
becomes part of one argv item, never split, never given to a shell.

Control characters: no text value DICOM allows in these fields holds one (ESC
of ISO 2022 is gone once decoded), yet the wire can carry anything, and argv
and the environment cannot carry a NUL at all.  So in argv and environment
values every C0 control character and DEL becomes U+FFFD (one character for
one, so lengths and positions stay); the JSON (stdin, the outbox, AMQP) keeps
the exact value, escaped as JSON escapes it (``\u0000``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcmrecvd.conf.config import EVENT_FIELDS
from dcmrecvd.store.object_record import Settled

#: The version of the bodies' contract (README "Event bodies", dcmrecvd(8) EVENTS).
BODY_VERSION = 1

#: The kind of an acknowledged object's event; the others (config.EVENT_KINDS) are
#: "<series|study>.<complete|updated>", made by the outbox's completion.
OBJECT_STORED = "object.stored"

Body = dict[str, Any]


def stamp(when: dt.datetime | float) -> str:
    """The one time format of every body (a naive datetime is local time)."""
    if not isinstance(when, dt.datetime):
        when = dt.datetime.fromtimestamp(when)
    return when.astimezone().isoformat(timespec="microseconds")


def object_stored(
    *,
    called: str,
    calling: str,
    peer: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    tags: Mapping[str, str],
    path: str,
    size: int,
    transfer_syntax: str,
    when: dt.datetime,
) -> Body:
    """An acknowledged object (``tags``: its study, series and patient)."""
    return {
        "version": BODY_VERSION,
        "event": OBJECT_STORED,
        "called_aet": called,
        "calling_aet": calling,
        "peer": peer,
        "sop_class_uid": sop_class_uid,
        "sop_instance_uid": sop_instance_uid,
        **tags,
        "path": path,
        "directory": os.path.dirname(path),
        "size": size,
        "transfer_syntax": transfer_syntax,
        "time": stamp(when),
    }


def object_duplicate(
    stored: Mapping[str, Any], policy: str, first_path: str, outcome: str, path: str | None = None
) -> Body:
    """A second copy of an instance, from its own ``object.stored`` body: ``path`` is where
    the instance now is (the new copy's, or the first copy's when the new one was not kept)."""
    where = str(stored.get("path", "")) if path is None else path
    return {
        **stored,
        "version": BODY_VERSION,
        "event": "object.duplicate",
        "policy": policy,
        "outcome": outcome,
        "first_path": first_path,
        "path": where,
        "directory": os.path.dirname(where),
    }


def object_quarantined(stored: Mapping[str, Any], intended_path: str, reason: str, entry: str) -> Body:
    """An acknowledged object whose file cannot be made, kept in the quarantine."""
    return {
        **stored,
        "version": BODY_VERSION,
        "event": "object.quarantined",
        "path": "",
        "directory": "",
        "intended_path": intended_path,
        "reason": reason,
        "quarantine": entry,
    }


def settled(what: Settled) -> list[Body]:
    """The bodies of what became of an acknowledged object (``store.object_record``)."""
    if what.quarantine:
        return [object_quarantined(what.event, what.intended_path, what.reason, what.quarantine)]
    stored = at_path(what.event, what.path)
    if what.duplicate is not None:  # a second copy stored (known before the ack)
        return [stored, at_path(what.duplicate, what.path)]
    if what.replaced:  # overwrite by path: the rename found the name taken
        return [stored, object_duplicate(stored, "overwrite", what.path, "replaced")]
    return [stored]


def at_path(body: Mapping[str, Any], path: str) -> Body:
    """A body with the path its object finally got (``<name>.<seq>`` when its own was taken)."""
    return {**body, "path": path, "directory": os.path.dirname(path)}


def group(kind: str, last: Mapping[str, Any], objects: int, when: float) -> Body:
    """``series.*``/``study.*``: the group's last ``object.stored`` body, counted and stamped."""
    return {**last, "version": BODY_VERSION, "event": kind, "objects": objects, "time": stamp(when)}


@dataclass(frozen=True)
class TransactionFacts:
    """What every ``commitment.*`` body says of its transaction."""

    called: str
    calling: str
    peer: str
    transaction_uid: str
    items: int


def commitment_requested(tx: TransactionFacts, when: dt.datetime) -> Body:
    """An N-ACTION accepted: its report will follow."""
    return _commitment("commitment.requested", tx, when)


def commitment_reported(tx: TransactionFacts, committed: int, failed: int) -> Body:
    """Its report delivered (``objects`` committed, ``failed`` not)."""
    return _commitment("commitment.reported", tx, dt.datetime.now(), objects=committed, failed=failed)


def commitment_undeliverable(tx: TransactionFacts, reason: str) -> Body:
    """Its report given up after ``commitment.give_up_after``."""
    return _commitment("commitment.undeliverable", tx, dt.datetime.now(), reason=reason)


def _commitment(kind: str, tx: TransactionFacts, when: dt.datetime, **extra: Any) -> Body:
    return {
        "version": BODY_VERSION,
        "event": kind,
        "called_aet": tx.called,
        "calling_aet": tx.calling,
        "peer": tx.peer,
        "transaction_uid": tx.transaction_uid,
        "items": tx.items,
        "time": stamp(when),
        **extra,
    }


def study_key(body: Mapping[str, Any]) -> str:
    """Completion is per (called AE, calling AE, Study Instance UID)."""
    return "\x1f".join(
        (str(body.get("called_aet", "")), str(body.get("calling_aet", "")), str(body.get("study_uid", "")))
    )


def series_key(body: Mapping[str, Any]) -> str:
    return study_key(body) + "\x1f" + str(body.get("series_uid", ""))


def to_json(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def from_json(text: str) -> Body:
    loaded = json.loads(text)
    assert isinstance(loaded, dict)
    return loaded


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def for_exec(value: object) -> str:
    """A value as argv and the environment carry it (see the module docstring)."""
    return _CONTROL.sub("\ufffd", str(value))


class _Fields(dict[str, str]):
    """Placeholder values: every known field, "" when this event has none."""

    def __missing__(self, key: str) -> str:
        return ""


def argv(template: Sequence[str], body: Mapping[str, Any]) -> list[str]:
    """A hook's argv with {placeholders} replaced: one item in, one item out."""
    fields = _Fields({k: for_exec(v) for k, v in body.items() if k in EVENT_FIELDS})
    return [item.format_map(fields) for item in template]


def environment(body: Mapping[str, Any]) -> dict[str, str]:
    """``DCMRECVD_<FIELD>`` for every field of the event (``DCMRECVD_EVENT`` is its kind)."""
    return {f"DCMRECVD_{k.upper()}": for_exec(v) for k, v in body.items() if k in EVENT_FIELDS}
