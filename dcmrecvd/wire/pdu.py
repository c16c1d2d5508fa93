"""Upper-layer PDU constants and the small PDUs we encode (PS3.8 9.3).

The rules of when a PDU may arrive are in ``upper_layer``; negotiation PDUs are
encoded and decoded by pynetdicom (see ``negotiation``).
"""

from __future__ import annotations

import struct

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: A-ABORT sources and provider reasons (PS3.8 9.3.8).
SOURCE_USER = 0x00
SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
#: An A-ASSOCIATE-RQ larger than this is not a real one.
MAX_ASSOCIATE_RQ = 1 << 20


def abort_pdu(source: int = SOURCE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU."""
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


def release_rp_pdu() -> bytes:
    """An A-RELEASE-RP PDU."""
    return PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def command_pdu(context_id: int, command: bytes, peer_max_pdu: int = 0) -> bytes:
    """P-DATA-TF PDUs carrying one complete command set.

    One PDV normally; split into as many PDUs as a peer that announced a tiny
    maximum PDU length (``peer_max_pdu``, 0 = unlimited) needs.
    """
    room = peer_max_pdu - 6 if peer_max_pdu else len(command)
    room = max(room, 1)
    out = bytearray()
    for start in range(0, max(len(command), 1), room):
        piece = command[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command) else 0)
        pdv = PDV_HEADER.pack(len(piece) + 2, context_id, control) + piece
        out += PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv
    return bytes(out)
