"""What a record leaves behind once it is made or set aside: its row, its events, its entry.

Why apart from the thread that makes files: the materialiser decides *when*
(in order, per batch, with backoff); this says *what* each outcome writes.  A
made record gets its instance-index row and is handed on as ``Settled`` (where
it is, whether it replaced a file); a refused one gets its quarantine entry, a
``journal.quarantined`` log line and is handed on as set aside (the events
layer makes ``object.stored``, ``object.duplicate`` and ``object.quarantined``
of those: the store builds no DICOM event); an entry
an admin asked to retry is made through the same maker, or kept with its new
reason.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import structlog

from .instance_index import Instance
from .materialise_outcome import MakeFailure, classify
from .object_record import ObjectRecord, Settled

if TYPE_CHECKING:
    from .materialiser import Materialiser

log = structlog.get_logger("dcmrecvd")


def finish(m: Materialiser, records: list[ObjectRecord], replayed: bool = False) -> None:
    """Made records: their rows written and what became of them handed on (``replayed``:
    perhaps handed on before a crash already; the outbox drops what it holds)."""
    rows = []
    settled = []
    for record in records:
        path = record.path or str(record.final_path)
        ident = record.identity
        if ident is not None:
            # A large object's digest was kept on the way, or not at all (""): never the CRC of
            # its record's empty data, which no file matches.
            # A record taken back from the quarantine has no CRC yet: computed, never assumed 0.
            crc = record.crc if record.crc is not None else zlib.crc32(record.data)
            digest = record.digest if record.large else f"crc32:{crc:08x}"
            size = record.size or len(record.data)
            rows.append(
                Instance(
                    ident.called_aet,
                    ident.sop_instance_uid,
                    ident.sop_class_uid,
                    path,
                    size,
                    digest,
                    ident.stored,
                )
            )
        if record.replaced and record.duplicate is None:
            m.replaced()  # output.duplicates = "overwrite" by path: found only now
        if record.event is not None:
            settled.append(Settled(record.event, path, record.duplicate, record.replaced))
    m.index.put(rows)
    if settled and m.events is not None:
        m.events(settled, replayed)
    for record in records:
        record.state = "finished"


def quarantine(m: Materialiser, record: ObjectRecord, outcome: MakeFailure) -> None:
    """Set a record that cannot be made aside, durably and visibly."""
    entry = m.quarantine.put(record.seq, record.as_kept(), record.data, outcome.reason)
    record.state = "quarantined"
    intended = record.intended_path
    log.error(
        "journal.quarantined",
        seq=record.seq,
        reason=outcome.reason,
        entry=entry,
        path=intended,
        sop_instance_uid=record.sop_instance_uid,
    )
    m.quarantined(_short(outcome))
    if m.events is not None and record.event:
        m.events(
            [Settled(record.event, quarantine=entry, intended_path=intended, reason=outcome.reason)], False
        )


def retry_quarantined(m: Materialiser) -> None:
    """Entries an admin asked to try again (``dcmrecvd journal --retry-quarantine``)."""
    for entry in m.quarantine.retry_requested():
        data = entry.data_path.read_bytes() if entry.data_path is not None else b""
        record = ObjectRecord.from_header(dict(entry.header), data, entry.seq)
        result = m.maker.make([record])
        try:
            if record.state == "made":
                finish(m, [record])
                m.index.sync()
                m.persist_events()
                m.quarantine.release(entry)
                log.warning("journal.quarantine_released", entry=entry.id, path=record.path)
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


def _short(outcome: MakeFailure) -> str:
    """The metric label of a quarantine's reason: the errno's name, or ``invalid``."""
    return outcome.reason.split(":", 1)[0] if outcome.errno else "invalid"
