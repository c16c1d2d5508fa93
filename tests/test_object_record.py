"""The typed journal record: a header round-trips, an unreadable one is a record marked
invalid (never an exception), and segments written by the previous release, with its
untyped header dicts (``meta_len`` and all), replay into files, rows and events."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dcmrecvd.events import body
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal, Record
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.store.object_record import Identity, ObjectRecord
from dcmrecvd.store.quarantine import Quarantine

pytestmark = pytest.mark.inprocess

SEGMENT = 1 << 20


def previous_release_header(out: Path, name: str, uid: str, **more: Any) -> dict[str, Any]:
    """A header exactly as the previous release's ``receiving.journal_header`` wrote it (keys and nesting)."""
    event = {
        "event": "object.stored",
        "called_aet": "STORE",
        "calling_aet": "CT1",
        "peer": "127.0.0.1:4000",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": uid,
        "study_uid": "1.2.3",
        "series_uid": "1.2.3.4",
        "patient_id": "P1",
        "path": str(out / name),
        "directory": str(out),
        "size": 24,
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "time": "2026-12-01T10:00:00.000001",
    }
    return {
        "root": str(out),
        "dir": ".",
        "name": name,
        "replace": True,
        "meta_len": 4,
        "size": 24,
        "index": {
            "called_aet": "STORE",
            "sop_instance_uid": uid,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "stored": event["time"],
        },
        "event": event,
        **more,
    }


def test_a_header_round_trips() -> None:
    record = ObjectRecord(
        "/srv/out",
        "CT/x",
        "a.dcm",
        replace=True,
        size=10,
        large=True,
        digest="crc32:0000abcd",
        identity=Identity("AE", "1.2", "1.2.3", "t"),
        event={"event": "object.stored"},
        duplicate={"event": "object.duplicate"},
    )
    again = ObjectRecord.from_header(record.to_header())
    assert again.to_header() == record.to_header()
    assert again.final_path == Path("/srv/out/CT/x/a.dcm") and not again.invalid


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({"invalid": "header is not JSON: x"}, "header is not JSON"),
        ({"root": "relative", "dir": ".", "name": "a"}, "root is not an absolute path"),
        ({"root": "/o", "dir": "/abs", "name": "a"}, "dir is not a relative path"),
        ({"root": "/o", "dir": "a/../../b", "name": "a"}, "dir leaves the output directory"),
        ({"root": "/o", "dir": ".", "name": "a/b"}, "not a file name"),
        ({"root": "/o", "dir": ".", "name": "a", "index": {"called_aet": 1}}, "index is not"),
    ],
)
def test_an_unreadable_header_is_a_record_marked_invalid(header: dict[str, Any], why: str) -> None:
    record = ObjectRecord.from_header(header, b"bytes", 7)
    assert why in record.invalid
    assert record.as_kept() == header and record.data == b"bytes" and record.seq == 7
    assert record.intended_path == ""


def test_segments_of_the_previous_release_replay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "large").write_bytes(b"L" * 5000)  # a large object: durable under its name already
    headers = [
        previous_release_header(out, "small", "1.2.1"),
        previous_release_header(out, "large", "1.2.2", file=True, digest="crc32:12345678", size=5000),
        previous_release_header(out, "copy", "1.2.3"),
    ]
    copy = headers[2]  # a second copy stored beside the first: its duplicate body rides along
    copy["duplicate"] = {
        **copy["event"],
        "event": "object.duplicate",
        "policy": "keep-both",
        "outcome": "beside",
    }
    journal = Journal(tmp_path / "state" / "journal", segment_size=SEGMENT, segments=4)
    journal.open()
    journal.commit([Record(h, b"DICM" + bytes(20) if not h.get("file") else b"") for h in headers])
    journal.close()  # a crash: nothing made

    again = Journal(tmp_path / "state" / "journal", segment_size=SEGMENT, segments=4)
    records = again.open()
    index = InstanceIndex(tmp_path / "state" / "instances.sqlite")
    seen: list[dict[str, Any]] = []
    m = Materialiser(
        again,
        index,
        events=lambda settled, replayed: seen.extend(b for s in settled for b in body.settled(s)),
        quarantine=Quarantine(tmp_path / "state" / "quarantine"),
    )
    counts = m.replay(records)
    assert counts["made"] == 2 and counts["verified"] == 1 and counts["quarantined"] == 0
    assert (out / "small").read_bytes() == b"DICM" + bytes(20)
    assert (out / "copy").read_bytes() == b"DICM" + bytes(20)
    index.sync()
    with sqlite3.connect(tmp_path / "state" / "instances.sqlite") as db:
        rows = dict(db.execute("SELECT sop_instance_uid, digest FROM instances"))
    assert rows["1.2.2"] == "crc32:12345678"  # a large object's digest as it was kept
    assert set(rows) == {"1.2.1", "1.2.2", "1.2.3"}
    kinds = [(b["event"], b["sop_instance_uid"], b["path"]) for b in seen]
    assert ("object.stored", "1.2.1", str(out / "small")) in kinds
    assert ("object.duplicate", "1.2.3", str(out / "copy")) in kinds
    again.close()
    index.close()
