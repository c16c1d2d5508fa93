"""Garbage is never acknowledged: against the daemon, from a raw socket and from pynetdicom,
every malformed dataset gets 0xC000 with a reason and leaves no file; the file meta takes the
dataset's own SOP UIDs."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from conftest import Daemon, DaemonFactory
from malformed import (
    INSTANCE_UID,
    NOT_WELL_FORMED,
    base_dataset,
    encode,
    malformed_cases,
    with_sop_instance_uid,
)
from peers import RawClient, send_file
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from dcmrecvd.wire import pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
RELEASE_RQ = bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def store(
    client: RawClient, data: bytes, instance: str = INSTANCE_UID, fragment: int = 16000
) -> tuple[int, str]:
    """One C-STORE on an open association; (status, Error Comment)."""
    client.send_pdv(client.store_command(CT, instance), command=True, last=True)
    if not data:
        client.send_pdv(b"", command=False, last=True)
    for start in range(0, len(data), fragment):
        client.send_pdv(data[start : start + fragment], command=False, last=start + fragment >= len(data))
    fields = client.response()
    comment = fields.get(0x0902, b"").decode().rstrip(" \x00")
    return int(struct.unpack("<H", fields[0x0900])[0]), comment


def store_once(port: int, data: bytes, instance: str = INSTANCE_UID) -> tuple[int, str]:
    client = RawClient(port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        result = store(client, data, instance)
        client.sock.sendall(RELEASE_RQ)
        assert client.read_pdu()[0] == pdu.A_RELEASE_RP
        return result
    finally:
        client.close()


def files_in(daemon: Daemon) -> list[Path]:
    return [p for p in daemon.output.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts]


def test_every_malformed_dataset_gets_0xC000_with_a_reason_and_leaves_no_file(daemons: DaemonFactory) -> None:
    d = daemons.start()
    for name, (data, words) in malformed_cases().items():
        status, comment = store_once(d.port, data)
        assert status == 0xC000, f"{name}: status 0x{status:04X}"
        assert comment.startswith(("malformed dataset", "dataset has", "no SOP Instance UID")), (
            name,
            comment,
        )
        assert words in comment, (name, comment)
        assert files_in(d) == [], f"{name} left {files_in(d)}"
    assert "store.failed" in d.log()
    # The refusals cost nothing to the next, well-formed object.
    assert store_once(d.port, encode(base_dataset())) == (0x0000, "")
    assert len(files_in(d)) == 1


def test_a_refused_dataset_leaves_the_association_usable(daemons: DaemonFactory) -> None:
    d = daemons.start()
    good = encode(base_dataset())
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        for _ in range(3):
            assert store(client, good)[0] == 0x0000
            assert store(client, good[:-7])[0] == 0xC000  # cut: refused, its temp file removed
        client.sock.sendall(RELEASE_RQ)
        assert client.read_pdu()[0] == pdu.A_RELEASE_RP
    finally:
        client.close()
    assert [p.name for p in files_in(d)] == [f"CT.{INSTANCE_UID}"]


@pytest.mark.parametrize(
    "bad_uid",
    [b"../../x", b"1" * 65, b"1.2.3\x004", b"1.2.3\n", b"1..2", b"", b"1.2.3 4"],
    ids=["path", "65 digits", "NUL inside", "newline", "empty component", "empty", "space inside"],
)
def test_a_dataset_whose_sop_instance_uid_is_invalid_is_refused(
    daemons: DaemonFactory, bad_uid: bytes
) -> None:
    d = daemons.start()
    status, comment = store_once(d.port, with_sop_instance_uid(bad_uid))
    assert status == 0xC000
    assert "SOP Instance UID" in comment
    assert files_in(d) == []


def test_a_dataset_without_sop_instance_uid_is_refused(daemons: DaemonFactory) -> None:
    d = daemons.start()
    ds = base_dataset()
    del ds.SOPInstanceUID
    assert store_once(d.port, encode(ds)) == (0xC000, "dataset has no SOP Instance UID")
    assert files_in(d) == []


def test_file_meta_follows_the_dataset_and_the_name_follows_the_command(daemons: DaemonFactory) -> None:
    d = daemons.start("+ssd")
    ds = base_dataset()
    ds.SOPInstanceUID = "1.2.3.99"
    ds.SeriesDate = "20210305"
    assert store_once(d.port, encode(ds), instance=INSTANCE_UID) == (0x0000, "")
    (path,) = files_in(d)
    assert path.relative_to(d.output).as_posix() == f"data/2021/03/05/CT.{INSTANCE_UID}"
    meta = pydicom.dcmread(path).file_meta
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.99"
    assert meta.MediaStorageSOPClassUID == CT
    log = d.log()
    assert "store.uid_mismatch" in log
    assert "1.2.3.99" in log and INSTANCE_UID in log


def test_ignore_mode_walks_too(daemons: DaemonFactory) -> None:
    d = daemons.start("--ignore")
    assert store_once(d.port, encode(base_dataset())[:-3])[0] == 0xC000
    assert store_once(d.port, encode(base_dataset()))[0] == 0x0000
    assert files_in(d) == []


def test_pydicoms_corpus_sent_by_pynetdicom_is_all_accepted(daemons: DaemonFactory) -> None:
    """The walk refuses no well-formed dataset: sequences, encapsulated pixel data, big endian,
    deflate, private tags, as pynetdicom sends them."""
    d = daemons.start()
    sent = 0
    for path in sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")):
        if path.name in NOT_WELL_FORMED:
            continue
        try:
            status = send_file(d.port, path)
        except (AssertionError, ValueError, AttributeError, KeyError, InvalidDicomError):
            continue  # pynetdicom cannot send it, or no context for its transfer syntax
        assert status == 0x0000, f"{path.name}: 0x{status:04X}"
        sent += 1
    assert sent > 40
    assert "store.failed" not in d.log()
