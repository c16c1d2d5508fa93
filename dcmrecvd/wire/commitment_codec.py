"""Storage Commitment Push Model datasets (PS3.4 Annex J): the N-ACTION request we read,
the N-EVENT-REPORT we write.

Why a codec of our own and not pydicom: a request may name 100,000 instances, and
pydicom builds a Dataset object per sequence item (seconds of CPU and tens of MB for
that many, holding the GIL while other associations wait).  What we need of it is
two UIDs per item and the Transaction UID, in Implicit or Explicit VR Little Endian
(the only syntaxes we accept for this SOP class); anything else in the dataset is
skipped by its length, and a broken length is an error, never a guess.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dcmrecvd.wire import uids

SOP_CLASS = "1.2.840.10008.1.20.1"
#: The well-known SOP instance every Push Model request and report names.
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"

TRANSACTION_UID = 0x00081195
REFERENCED_SOP_SEQUENCE = 0x00081199
FAILED_SOP_SEQUENCE = 0x00081198
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155
FAILURE_REASON = 0x00081197

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
#: Explicit VRs whose length is 4 bytes after 2 reserved ones.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Nesting we follow inside an item before calling the dataset hostile.
MAX_DEPTH = 8

_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


class ActionError(ValueError):
    """An N-ACTION dataset we refuse: ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


#: N-ACTION statuses for a dataset we cannot use (PS3.7 C.4.3, Annex C).
INVALID_ARGUMENT = 0x0115
RESOURCE_LIMITATION = 0x0213


@dataclass(frozen=True)
class ActionRequest:
    """What a Storage Commitment request asks: is each (SOP class, SOP instance) held?"""

    transaction_uid: str
    items: list[tuple[str, str]]


def _text(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip(" \x00")


class _Reader:
    """Element headers of a Little Endian dataset, in either VR encoding."""

    def __init__(self, data: bytes, explicit: bool) -> None:
        self.data = data
        self.explicit = explicit
        #: Where the sequence ``items`` last walked ends.
        self.after = 0

    def header(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", length, where the value starts) of the element at ``pos``."""
        data = self.data
        if pos + 8 > len(data):
            raise ActionError(INVALID_ARGUMENT, "dataset ends inside an element header")
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if group == 0xFFFE or not self.explicit:  # items and delimiters never carry a VR
            return tag, b"", _U32.unpack_from(data, pos + 4)[0], pos + 8
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise ActionError(INVALID_ARGUMENT, "dataset ends inside an element header")
            return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
        return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8

    def value(self, start: int, length: int) -> bytes:
        if length == UNDEFINED or start + length > len(self.data):
            raise ActionError(INVALID_ARGUMENT, "element value beyond the end of the dataset")
        return self.data[start : start + length]

    def skip(self, tag: int, vr: bytes, length: int, start: int, depth: int) -> int:
        """Where the element whose value starts at ``start`` ends."""
        if length != UNDEFINED:
            if start + length > len(self.data):
                raise ActionError(INVALID_ARGUMENT, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
            return start + length
        if vr not in (b"SQ", b"UN", b"") and self.explicit:
            raise ActionError(INVALID_ARGUMENT, f"undefined length on ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        for _ in self.items(start, UNDEFINED, depth + 1):
            pass
        return self.after

    def items(self, start: int, length: int, depth: int) -> Iterator[tuple[int, int]]:
        """(value start, value end) of each item of the sequence whose value starts at
        ``start``; once exhausted, ``self.after`` is where the sequence ends."""
        if depth > MAX_DEPTH:
            raise ActionError(INVALID_ARGUMENT, "sequences nested too deeply")
        end = len(self.data) if length == UNDEFINED else start + length
        if end > len(self.data):
            raise ActionError(INVALID_ARGUMENT, "sequence runs past the end of the dataset")
        pos = start
        while pos < end:
            tag, _, item_length, value = self.header(pos)
            if tag == SEQUENCE_END:
                if length != UNDEFINED:
                    raise ActionError(INVALID_ARGUMENT, "sequence delimiter in a defined-length sequence")
                self.after = value
                return
            if tag != ITEM:
                raise ActionError(
                    INVALID_ARGUMENT, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item belongs"
                )
            if item_length == UNDEFINED:
                item_end = self.dataset_end(value, depth)
                pos = item_end + 8  # past the item delimiter
            else:
                item_end = pos = value + item_length
                if item_end > end:
                    raise ActionError(INVALID_ARGUMENT, "item runs past the end of its sequence")
            yield value, item_end
        if length == UNDEFINED:
            raise ActionError(INVALID_ARGUMENT, "sequence without its delimiter")
        self.after = end

    def dataset_end(self, start: int, depth: int) -> int:
        """Where the undefined-length item starting at ``start`` ends (its delimiter)."""
        pos = start
        while True:
            tag, vr, length, value = self.header(pos)
            if tag == ITEM_END:
                return pos
            pos = self.skip(tag, vr, length, value, depth)

    def elements(self, start: int, end: int, depth: int) -> Iterable[tuple[int, bytes, int, int]]:
        """Each element of the defined stretch [start, end)."""
        pos = start
        while pos < end:
            tag, vr, length, value = self.header(pos)
            if tag == ITEM_END:
                return
            yield tag, vr, length, value
            pos = self.skip(tag, vr, length, value, depth)
            if pos > end:
                raise ActionError(INVALID_ARGUMENT, "element runs past the end of its item")


def parse_action(data: bytes, explicit: bool, max_items: int) -> ActionRequest:
    """The Transaction UID and referenced instances of an N-ACTION-RQ dataset.

    ActionError(0x0115) for a missing or invalid Transaction UID, Referenced SOP
    Sequence or item UID, or a malformed dataset; ActionError(0x0213) for more than
    ``max_items`` items."""
    reader = _Reader(data, explicit)
    transaction = None
    items: list[tuple[str, str]] | None = None
    for tag, vr, length, value in reader.elements(0, len(data), 0):
        if tag == TRANSACTION_UID:
            transaction = _text(reader.value(value, length))
        elif tag == REFERENCED_SOP_SEQUENCE:
            items = _referenced(reader, vr, length, value, max_items)
    if not transaction:
        raise ActionError(INVALID_ARGUMENT, "no Transaction UID (0008,1195)")
    if not uids.is_valid_uid(transaction):
        raise ActionError(INVALID_ARGUMENT, "invalid Transaction UID")
    if not items:
        raise ActionError(INVALID_ARGUMENT, "no Referenced SOP Sequence (0008,1199), or an empty one")
    return ActionRequest(transaction, items)


def _referenced(reader: _Reader, vr: bytes, length: int, start: int, max_items: int) -> list[tuple[str, str]]:
    if reader.explicit and vr not in (b"SQ", b"UN"):
        raise ActionError(INVALID_ARGUMENT, "Referenced SOP Sequence is not a sequence")
    items: list[tuple[str, str]] = []
    for item_start, item_end in reader.items(start, length, 1):
        sop_class = sop_instance = ""
        for tag, _vr, value_length, value in reader.elements(item_start, item_end, 2):
            if tag == REFERENCED_SOP_CLASS_UID:
                sop_class = _text(reader.value(value, value_length))
            elif tag == REFERENCED_SOP_INSTANCE_UID:
                sop_instance = _text(reader.value(value, value_length))
        n = len(items) + 1
        if not (sop_class and sop_instance):
            raise ActionError(INVALID_ARGUMENT, f"item {n} lacks a Referenced SOP Class or Instance UID")
        if not (uids.is_valid_uid(sop_class) and uids.is_valid_uid(sop_instance)):
            raise ActionError(INVALID_ARGUMENT, f"item {n} has an invalid UID")
        if n > max_items:
            raise ActionError(RESOURCE_LIMITATION, f"more than {max_items} items (commitment.max_items)")
        items.append((sop_class, sop_instance))
    return items


# --------------------------------------------------------------------------- the report


def _element(tag: int, vr: bytes, value: bytes, explicit: bool) -> bytes:
    head = _TAG.pack(tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + _U32.pack(len(value)) + value
    if vr in _LONG_VRS:
        return head + vr + b"\x00\x00" + _U32.pack(len(value)) + value
    return head + vr + _U16.pack(len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(body: bytes) -> bytes:
    return _TAG.pack(0xFFFE, 0xE000) + _U32.pack(len(body)) + body


def encode_report(
    transaction_uid: str,
    committed: Iterable[tuple[str, str]],
    failed: Iterable[tuple[str, str, int]],
    explicit: bool,
) -> bytes:
    """The N-EVENT-REPORT-RQ dataset: the Transaction UID, the committed instances in the
    Referenced SOP Sequence, the others with their Failure Reason in the Failed SOP
    Sequence (each sequence present only when it has items; defined lengths throughout)."""

    def ref(sop_class: str, sop_instance: str) -> bytes:
        return _element(REFERENCED_SOP_CLASS_UID, b"UI", _uid(sop_class), explicit) + _element(
            REFERENCED_SOP_INSTANCE_UID, b"UI", _uid(sop_instance), explicit
        )

    good = b"".join(_item(ref(c, i)) for c, i in committed)
    bad = b"".join(
        _item(ref(c, i) + _element(FAILURE_REASON, b"US", _U16.pack(reason), explicit))
        for c, i, reason in failed
    )
    # Elements ascend by tag: (0008,1195) Transaction UID, (0008,1198) Failed, (0008,1199) Referenced.
    out = _element(TRANSACTION_UID, b"UI", _uid(transaction_uid), explicit)
    if bad:
        out += _element(FAILED_SOP_SEQUENCE, b"SQ", bad, explicit)
    if good:
        out += _element(REFERENCED_SOP_SEQUENCE, b"SQ", good, explicit)
    return out
