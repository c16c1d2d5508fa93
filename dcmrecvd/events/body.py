"""What happened after the ack, as plain data: event bodies, and how a hook sees them.

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

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dcmrecvd.conf.config import EVENT_FIELDS

#: The kind of an acknowledged object's event; the others (config.EVENT_KINDS) are
#: "<series|study>.<complete|updated>", made by the outbox's completion.
OBJECT_STORED = "object.stored"

Body = dict[str, Any]


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
