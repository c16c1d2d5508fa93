"""Recovery: what a crash left past the journal's checkpoint, made or verified, never crashed on.

Why its own module: recovery decides per record from durable facts only, and
each fact has its rule.  A record at or below ``made_through`` had its file
made (or was quarantined) before the crash: it is not made again, whatever is
on disk now (a consumer may have taken the file away; that is final), only
its row and events are redone.  A quarantined record stays where it is.  Of
several records under one replacing name, only the last is a file.  Any other
record is verified (the same bytes under its name, or under ``<name>.<seq>``)
or made, through the materialiser's own batches and outcome table: a record
that cannot be made is quarantined and start-up goes on; one that waits for
the disk is left queued, and the daemon starts with ``failing`` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .materialise_outcome import MakeFailure
from .object_record import ObjectRecord

if TYPE_CHECKING:
    from .materialiser import Materialiser

log = structlog.get_logger("dcmrecvd")

#: Records made into files at once during recovery.
REPLAY_BATCH = 256


def replay_records(
    m: Materialiser, records: list[ObjectRecord]
) -> tuple[dict[str, int], list[ObjectRecord], MakeFailure | None]:
    """Counts for the log, the records left waiting, and why they wait."""
    counts = {"records": len(records), "made": 0, "verified": 0, "missing": 0, "passed": 0, "quarantined": 0}
    made_through = m.journal.made_through
    last_for: dict[Path, int] = {}
    for record in records:
        if not record.invalid and record.replace and not record.large:
            last_for[record.final_path] = record.seq
    to_make: list[ObjectRecord] = []
    held = m.quarantine.held_seqs()
    for record in records:
        label = _decide(record, made_through, last_for, held)
        if label == "make":
            to_make.append(record)
        else:
            counts[label] += 1
    rest: list[ObjectRecord] = []
    failure: MakeFailure | None = None
    for start in range(0, len(records), REPLAY_BATCH):
        chunk = records[start : start + REPLAY_BATCH]
        rest, failure = m.apply(chunk, replayed=True)
        if failure is not None:
            rest = rest + records[start + REPLAY_BATCH :]
            break
    waiting = {id(r) for r in rest}
    counts["made"] = sum(1 for r in to_make if r.state in ("made", "finished") and id(r) not in waiting)
    counts["quarantined"] += sum(1 for r in to_make if r.state == "quarantined")
    m.settle_replayed(records, rest)
    if records and m.visible_through > m.journal.done_through:
        m.try_checkpoint()
    return counts, rest, failure


def _decide(record: ObjectRecord, made_through: int, last_for: dict[Path, int], held: set[int]) -> str:
    """What recovery does with one record: a count's name, or "make"."""
    if record.seq in held:
        record.state = "finished"  # nothing of it is made, counted, or said again
        return "quarantined"
    if record.invalid:
        return "make"  # the maker refuses it: quarantined with its bytes
    final = record.final_path
    if record.seq <= made_through:
        record.path = str(_where(final, record))
        record.state = "made"
        return "passed"
    if record.replace and not record.large and last_for.get(final) != record.seq:
        record.path = str(final)  # superseded by a later object under its name
        record.state = "made"
        return "verified"
    if record.large:
        record.state = "made"
        if final.is_file() and final.stat().st_size == record.size:
            return "verified"
        log.error("journal.file_missing", path=str(final), seq=record.seq)
        return "missing"
    for candidate in (final, final.with_name(f"{final.name}.{record.seq}")):
        try:
            if candidate.read_bytes() == record.data:
                record.path = str(candidate)
                record.state = "made"
                return "verified"
        except OSError:
            continue
    return "make"


def _where(final: Path, record: ObjectRecord) -> Path:
    """The name a made record's file got (``<name>.<seq>`` when its own was taken)."""
    if not record.replace:
        beside = final.with_name(f"{final.name}.{record.seq}")
        if beside.exists() and not final.exists():
            return beside
    return final
