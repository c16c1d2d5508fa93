"""DIMSE command sets: the few fields we read, the responses we send.

Command sets are always Implicit VR Little Endian and small, so a direct
codec is both simpler and far cheaper than building pydicom datasets for
every message (that cost dominated pynetdicom's per-object time).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_ACTION_RQ = 0x0130
NO_DATASET = 0x0101

_TAG_LEN = struct.Struct("<HHI")
_US = struct.Struct("<H")


class CommandError(ValueError):
    """A command set we cannot decode."""


@dataclass(frozen=True)
class Command:
    """The fields of a request command set that a storage SCP needs."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_dataset: bool
    #: N-ACTION (and other N-services): the SOP class and instance acted on.
    requested_sop_class_uid: str = ""
    requested_sop_instance_uid: str = ""
    #: N-ACTION's Action Type ID; None when the command has none.
    action_type_id: int | None = None

    def response_fields(self) -> tuple[str, str, int | None]:
        """What a response echoes: (affected SOP class, affected SOP instance, action type).

        An N-ACTION-RSP carries the requested UIDs as its affected ones (PS3.7 10.1.4.1)
        and its Action Type ID; a C-service response the request's affected UIDs."""
        if self.command_field == N_ACTION_RQ:
            return self.requested_sop_class_uid, self.requested_sop_instance_uid, self.action_type_id
        return self.affected_sop_class_uid, self.affected_sop_instance_uid, None


def _text(value: bytes) -> str:
    """Latin-1, so that any bytes decode and encode back unchanged: a response echoes the
    request's UIDs exactly, even invalid ones (which are refused, never stored)."""
    return value.decode("latin-1").rstrip(" \x00")


def _elements(buf: bytes) -> dict[int, bytes]:
    """Element number -> value of an Implicit VR Little Endian command set."""
    values: dict[int, bytes] = {}
    pos = 0
    end = len(buf)
    while pos < end:
        if pos + 8 > end:
            raise CommandError("truncated command element header")
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) outside the command group")
        if length == 0xFFFFFFFF or pos + length > end:
            raise CommandError(f"bad length for (0000,{elem:04X})")
        values[elem] = buf[pos : pos + length]
        pos += length
    return values


def decode(data: bytes | bytearray | memoryview) -> Command:
    """Parse an Implicit VR Little Endian request command set."""
    values = _elements(bytes(data))

    def us(elem: int, default: int | None = None) -> int:
        raw = values.get(elem)
        if raw is None or len(raw) != 2:
            if default is None:
                raise CommandError(f"missing or malformed (0000,{elem:04X})")
            return default
        return int(_US.unpack(raw)[0])

    command_field = us(0x0100)
    message_id = us(0x0110, 0) if command_field & 0x8000 else us(0x0110)
    return Command(
        command_field=command_field,
        message_id=message_id,
        affected_sop_class_uid=_text(values.get(0x0002, b"")),
        affected_sop_instance_uid=_text(values.get(0x1000, b"")),
        has_dataset=us(0x0800, NO_DATASET) != NO_DATASET,
        requested_sop_class_uid=_text(values.get(0x0003, b"")),
        requested_sop_instance_uid=_text(values.get(0x1001, b"")),
        action_type_id=us(0x1008) if len(values.get(0x1008, b"")) == 2 else None,
    )


def _element(elem: int, value: bytes) -> bytes:
    return _TAG_LEN.pack(0x0000, elem, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("latin-1", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
    error_comment: str = "",
    action_type_id: int | None = None,
) -> bytes:
    """A response command set (no dataset), with its group length."""
    body = b""
    if sop_class_uid:
        body += _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, _US.pack(command_field))
    body += _element(0x0120, _US.pack(message_id))
    body += _element(0x0800, _US.pack(NO_DATASET))
    body += _element(0x0900, _US.pack(status))
    if error_comment:  # (0000,0902) before (0000,1000): command elements ascend by tag
        comment = error_comment.encode("ascii", "replace")[:64]
        body += _element(0x0902, comment + (b" " if len(comment) % 2 else b""))
    if sop_instance_uid:
        body += _element(0x1000, _uid(sop_instance_uid))
    if action_type_id is not None:
        body += _element(0x1008, _US.pack(action_type_id))
    return _element(0x0000, struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class Response:
    """The fields of a response command set that a requestor needs."""

    command_field: int
    responding_to: int
    status: int
    error_comment: str


def decode_response(data: bytes | bytearray | memoryview) -> Response:
    """Parse a response command set (Implicit VR Little Endian)."""
    values = _elements(bytes(data))
    field, responding_to, status = (values.get(e) for e in (0x0100, 0x0120, 0x0900))
    if field is None or responding_to is None or status is None or not len(field) == len(status) == 2:
        raise CommandError("response without command field, message ID or status")
    return Response(
        int(_US.unpack(field)[0]),
        int(_US.unpack(responding_to[:2])[0]),
        int(_US.unpack(status)[0]),
        _text(values.get(0x0902, b"")),
    )


def encode_request(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str = "",
    has_dataset: bool = False,
    priority: int = 0,
    event_type_id: int | None = None,
) -> bytes:
    """A request command set (C-STORE-RQ, C-ECHO-RQ, N-EVENT-REPORT-RQ...), with its group length."""
    body = _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, _US.pack(command_field))
    body += _element(0x0110, _US.pack(message_id))
    if command_field == C_STORE_RQ:
        body += _element(0x0700, _US.pack(priority))
    body += _element(0x0800, _US.pack(0x0000 if has_dataset else NO_DATASET))
    if sop_instance_uid:
        body += _element(0x1000, _uid(sop_instance_uid))
    if event_type_id is not None:
        body += _element(0x1002, _US.pack(event_type_id))
    return _element(0x0000, struct.pack("<I", len(body))) + body
