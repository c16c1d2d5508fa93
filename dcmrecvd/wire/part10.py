"""The DICOM Part 10 file preamble and meta information header.

Written in front of the dataset bytes exactly as they arrived, so that the
stored file is a valid Part 10 file in the transfer syntax it was sent in,
without decoding or re-encoding the dataset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dcmrecvd import __version__

#: Our implementation class UID (a 2.25 UUID-derived root) and version name.
IMPLEMENTATION_CLASS_UID = "2.25.208215127713358470541960236655843930313"
IMPLEMENTATION_VERSION_NAME = ("DCMRECVD_" + __version__.replace(".", ""))[:16]


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def meta_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str = "",
    receiving_ae_title: str = "",
) -> bytes:
    """Preamble, ``DICM`` and group 0002 (Explicit VR Little Endian).

    ``source_ae_title`` (0002,0016) is the calling AE, as dcmrecv writes it;
    ``receiving_ae_title`` (0002,0018) the AE title the sender called.  The file is
    then the one durable place that says which AE an acknowledged object came in
    under: recovery after a crash reads it back (``outbox.body_from_file``).
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        )
    )
    if source_ae_title:
        body += _element(0x0016, b"AE", _padded(source_ae_title.strip(), b" "))
    if receiving_ae_title.strip():
        body += _element(0x0018, b"AE", _padded(receiving_ae_title.strip(), b" "))
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class NotPart10(ValueError):
    """Bytes that do not start like a Part 10 file with a group 0002 of its own."""


@dataclass(frozen=True)
class FileMeta:
    """Where a stored file's dataset starts, and what its meta says of it."""

    dataset_offset: int
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str


#: Explicit VRs with a 4-byte length (PS3.5 7.1.2) that may appear in group 0002.
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def read_meta(head: bytes) -> FileMeta:
    """Parse the preamble and group 0002 (Explicit VR Little Endian, as PS3.10 says) from
    the first bytes of a file (``META_READ`` of them are always enough for ours); the
    dataset is not touched: a sender streams it from the file as it is."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise NotPart10("no DICM prefix")
    values: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(head):
        group, elem, vr = struct.unpack_from("<HH2s", head, pos)
        if group != 0x0002:
            break
        if vr in _LONG:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if pos + length > len(head):
            raise NotPart10("file meta longer than the bytes read")
        values[elem] = head[pos : pos + length]
        pos += length

    def text(elem: int) -> str:
        return values.get(elem, b"").decode("ascii", "replace").rstrip("\x00 ")

    if not text(0x0010):
        raise NotPart10("no Transfer Syntax UID in the file meta")
    return FileMeta(pos, text(0x0010), text(0x0002), text(0x0003))


#: Bytes to read from the start of a file for ``read_meta``.
META_READ = 64 * 1024
