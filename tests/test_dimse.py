"""DIMSE command sets, in-process: what we read from requests, what we send back."""

from __future__ import annotations

import struct

import pytest
from peers import command_elements, store_command

from dcmrecvd.wire import dimse

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_a_store_request_is_read() -> None:
    command = dimse.decode(store_command(CT, "1.2.3.4", message_id=9))
    assert (command.command_field, command.message_id) == (dimse.C_STORE_RQ, 9)
    assert (command.affected_sop_class_uid, command.affected_sop_instance_uid) == (CT, "1.2.3.4")
    assert command.has_dataset
    assert not dimse.decode(store_command(CT, "1.2.3.4", has_dataset=False)).has_dataset


def test_a_response_echoes_the_request_and_ascends_by_tag() -> None:
    raw = dimse.encode_response(dimse.C_STORE_RSP, 9, 0xA700, CT, "1.2.3.4", "disk full")
    elements = command_elements(raw)
    tags = [tag for tag, _ in elements]
    assert tags == sorted(tags)
    values = {tag & 0xFFFF: value for tag, value in elements}
    assert struct.unpack("<H", values[0x0120])[0] == 9
    assert struct.unpack("<H", values[0x0900])[0] == 0xA700
    assert values[0x1000].rstrip(b"\x00") == b"1.2.3.4"
    assert values[0x0902].strip() == b"disk full"
    assert all(len(value) % 2 == 0 for _, value in elements)


def test_any_bytes_in_a_uid_come_back_unchanged() -> None:
    """Latin-1 both ways: an invalid UID is refused, and the response names it exactly."""
    odd = b"1.2.\xe9\xffxy"  # as long as the value it replaces
    raw = store_command(CT, "1.2.3.4").replace(b"1.2.3.4\x00", odd)
    command = dimse.decode(raw)
    response = dimse.encode_response(dimse.C_STORE_RSP, 1, 0xC000, CT, command.affected_sop_instance_uid)
    echoed = {tag & 0xFFFF: value for tag, value in command_elements(response)}[0x1000]
    assert echoed == odd


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("<HHI", 0, 0x0100, 2), "bad length"),
        (b"\x00\x00\x00\x01", "truncated"),
        (struct.pack("<HHI", 8, 0x0016, 0), "outside the command group"),
        (struct.pack("<HHIH", 0, 0x0800, 2, 0x0101), "missing or malformed"),
    ],
)
def test_broken_command_sets_are_errors(raw: bytes, message: str) -> None:
    with pytest.raises(dimse.CommandError, match=message):
        dimse.decode(raw)
