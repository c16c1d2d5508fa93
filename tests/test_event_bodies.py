"""Event bodies, the consumer-facing contract: every kind from its one constructor, with
``version`` and ``time`` in one format; what the store hands on becomes the right bodies."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from dcmrecvd.conf.config import EVENT_FIELDS, EVENT_KINDS
from dcmrecvd.events import body
from dcmrecvd.store.object_record import Settled

pytestmark = pytest.mark.inprocess

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d")


def stored(path: str = "/out/a.dcm") -> dict[str, Any]:
    return body.object_stored(
        called="STORE",
        calling="CT1",
        peer="127.0.0.1:4000",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        tags={"study_uid": "1.2.3", "series_uid": "1.2.3.4", "patient_id": "P1"},
        path=path,
        size=10,
        transfer_syntax="1.2.840.10008.1.2.1",
        when=dt.datetime(2026, 12, 8, 9, 30),  # naive: local time
    )


def every_kind() -> list[dict[str, Any]]:
    tx = body.TransactionFacts("STORE", "CT1", "127.0.0.1:4000", "1.2.9", 3)
    first = stored()
    return [
        first,
        body.object_duplicate(first, "keep-both", "/out/b.dcm", "beside"),
        body.object_quarantined(first, "/out/a.dcm", "ENAMETOOLONG: x", "000000000001-abcdef"),
        *(
            body.group(kind, first, 2, 1_700_000_000.25)
            for kind in EVENT_KINDS
            if kind[:6] in ("series", "study.")
        ),
        body.commitment_requested(tx, dt.datetime.now()),
        body.commitment_reported(tx, 2, 1),
        body.commitment_undeliverable(tx, "unreachable"),
    ]


def test_every_kind_has_a_constructor_a_version_and_one_time_format() -> None:
    bodies = every_kind()
    assert sorted({b["event"] for b in bodies}) == sorted(EVENT_KINDS)
    for b in bodies:
        assert b["version"] == body.BODY_VERSION == 1
        assert TIME.fullmatch(b["time"]), b
        assert set(b) <= set(EVENT_FIELDS), set(b) - set(EVENT_FIELDS)
    assert bodies[0]["time"].startswith("2026-12-08T09:30:00.000000")


def test_what_the_store_hands_on_becomes_its_bodies() -> None:
    first = stored("/out/a.dcm")
    made = body.settled(Settled(first, "/out/a.dcm.7"))
    assert [(b["event"], b["path"], b["directory"]) for b in made] == [
        ("object.stored", "/out/a.dcm.7", "/out")
    ]
    replaced = body.settled(Settled(first, "/out/a.dcm", replaced=True))
    assert [b["event"] for b in replaced] == ["object.stored", "object.duplicate"]
    assert replaced[1]["outcome"] == "replaced" and replaced[1]["first_path"] == "/out/a.dcm"
    dup = body.object_duplicate(first, "keep-both", "/out/b.dcm", "beside")
    beside = body.settled(Settled(first, "/out/a_1.dcm", duplicate=dup))
    assert [b["path"] for b in beside] == ["/out/a_1.dcm", "/out/a_1.dcm"]
    aside = body.settled(Settled(first, quarantine="e1", intended_path="/out/a.dcm", reason="EIO"))
    assert [(b["event"], b["path"], b["intended_path"]) for b in aside] == [
        ("object.quarantined", "", "/out/a.dcm")
    ]
