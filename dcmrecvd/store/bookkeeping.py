"""What a record leaves behind once it is made or set aside: its row, its events, its entry.

Why apart from the thread that makes files: the materialiser decides *when*
(in order, per batch, with backoff); this says *what* each outcome writes.  A
made record gets its instance-index row and its ``object.stored`` (and
``object.duplicate``) bodies; a refused one its quarantine entry, a
``journal.quarantined`` log line and an ``object.quarantined`` event; an entry
an admin asked to retry is made through the same maker, or kept with its new
reason.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import structlog

from .instance_index import Instance
from .journal_files import Record
from .making import final_path
from .materialise_outcome import Outcome, classify

if TYPE_CHECKING:
    from .materialiser import Materialiser

log = structlog.get_logger("dcmrecvd")


def finish(m: Materialiser, records: list[Record], replayed: bool = False) -> None:
    """Made records: their rows written and their events handed on (``replayed``: perhaps
    handed on before a crash already; the outbox drops what it holds)."""
    rows = []
    bodies = []
    for record in records:
        header = record.header
        ident = header.get("index") or {}
        path = header.get("path") or str(final_path(header))
        if ident:
            # A large object's digest was kept on the way, or not at all (""): never the CRC of
            # its record's empty data, which no file matches.
            digest = header.get("digest", "") if header.get("file") else f"crc32:{record.crc or 0:08x}"
            rows.append(
                Instance(
                    ident["called_aet"],
                    ident["sop_instance_uid"],
                    ident["sop_class_uid"],
                    path,
                    int(header.get("size") or len(record.data)),
                    digest,
                    ident.get("stored", ""),
                )
            )
        if header.get("replaced") and "duplicate" not in header:
            m.replaced()  # output.duplicates = "overwrite" by path: found only now
            if header.get("event") is not None:
                header["duplicate"] = {
                    **header["event"],
                    "event": "object.duplicate",
                    "policy": "overwrite",
                    "outcome": "replaced",
                    "first_path": path,
                }
        for kind in ("event", "duplicate"):  # object.stored, then object.duplicate if a copy
            event = header.get(kind)
            if event is not None:
                event["path"] = path
                event["directory"] = os.path.dirname(path)
                bodies.append(event)
    m.index.put(rows)
    if bodies and m.events is not None:
        m.events(bodies, replayed)
    for record in records:
        record.state = "finished"


def quarantine(m: Materialiser, record: Record, outcome: Outcome) -> None:
    """Set a record that cannot be made aside, durably and visibly."""
    entry = m.quarantine.put(record.seq, record.header, record.data, outcome.reason)
    record.state = "quarantined"
    header = record.header
    intended = (
        str(final_path(header)) if "invalid" not in header and isinstance(header.get("root"), str) else ""
    )
    event: dict[str, Any] = header["event"] if isinstance(header.get("event"), dict) else {}
    log.error(
        "journal.quarantined",
        seq=record.seq,
        reason=outcome.reason,
        entry=entry,
        path=intended,
        sop_instance_uid=event.get("sop_instance_uid", ""),
    )
    m.quarantined(_short(outcome))
    if m.events is not None and event:
        body = {
            **event,
            "event": "object.quarantined",
            "path": "",
            "directory": "",
            "intended_path": intended,
            "reason": outcome.reason,
            "quarantine": entry,
        }
        m.events([body], False)


def retry_quarantined(m: Materialiser) -> None:
    """Entries an admin asked to try again (``dcmrecvd journal --retry-quarantine``)."""
    for entry in m.quarantine.retry_requested():
        data = entry.data_path.read_bytes() if entry.data_path is not None else b""
        record = Record(dict(entry.header), data, entry.seq)
        result = m.maker.make([record])
        try:
            if record.state == "made":
                finish(m, [record])
                m.index.sync()
                m.persist_events()
                m.quarantine.release(entry)
                log.warning("journal.quarantine_released", entry=entry.id, path=record.header.get("path", ""))
            elif record.state == "refused":
                m.quarantine.keep(entry, result.refused[record.seq].reason)
                log.error("journal.quarantine_kept", entry=entry.id, reason=result.refused[record.seq].reason)
            else:
                m.quarantine.forget_retry_scan()
                reason = result.failure.reason if result.failure else "not made"
                log.warning("journal.quarantine_kept", entry=entry.id, reason=reason, retry="later")
        except Exception as exc:
            m.quarantine.forget_retry_scan()
            log.warning("journal.quarantine_kept", entry=entry.id, reason=classify(exc).reason, retry="later")


def _short(outcome: Outcome) -> str:
    """The metric label of a quarantine's reason: the errno's name, or ``invalid``."""
    return outcome.reason.split(":", 1)[0] if outcome.errno else "invalid"
