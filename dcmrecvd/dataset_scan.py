"""Read one top-level element from the start of an encoded dataset, lazily.

+ssd needs the Series Date before the file can be opened in its directory,
and nothing else: we walk element headers from the first bytes that arrived,
skipping values (and nested sequences) without decoding them, and stop at
the first tag past the one we want.  Pixel data is never reached.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from dcmrecvd import uids

SERIES_DATE = (0x0008, 0x0021)
UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)


class NeedMore(Exception):
    """The bytes so far end inside the region we must read."""


class Malformed(Exception):
    """The bytes cannot be a dataset in the negotiated transfer syntax."""


@dataclass
class _Walker:
    data: bytes
    explicit: bool
    little: bool
    pos: int = 0
    _h: struct.Struct = field(init=False)
    _l16: struct.Struct = field(init=False)
    _l32: struct.Struct = field(init=False)

    def __post_init__(self) -> None:
        e = "<" if self.little else ">"
        self._h = struct.Struct(e + "HH")
        self._l16 = struct.Struct(e + "H")
        self._l32 = struct.Struct(e + "I")

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise NeedMore

    def header(self) -> tuple[tuple[int, int], bytes, int]:
        """(tag, VR or b'', value length) of the element at pos; advances past the header."""
        self.need(8)
        tag = self._h.unpack_from(self.data, self.pos)
        if tag[0] == 0xFFFE or not self.explicit:
            length = self._l32.unpack_from(self.data, self.pos + 4)[0]
            self.pos += 8
            return tag, b"", length
        vr = self.data[self.pos + 4 : self.pos + 6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise Malformed(f"bad VR {vr!r} at offset {self.pos}")
        if vr in _LONG_VRS:
            self.need(12)
            length = self._l32.unpack_from(self.data, self.pos + 8)[0]
            self.pos += 12
        else:
            length = self._l16.unpack_from(self.data, self.pos + 6)[0]
            self.pos += 8
        return tag, vr, length

    def skip_undefined(self, vr: bytes) -> None:
        """Skip a sequence (or UN/SQ of undefined length) up to its delimiter."""
        inner_explicit = self.explicit and vr != b"UN"
        saved = self.explicit
        self.explicit = inner_explicit
        try:
            while True:
                tag, _, length = self.header()
                if tag == _SEQ_END:
                    return
                if tag != _ITEM:
                    raise Malformed(f"unexpected tag {tag} inside a sequence")
                if length == UNDEFINED:
                    self.skip_item()
                else:
                    self.need(length)
                    self.pos += length
        finally:
            self.explicit = saved

    def skip_item(self) -> None:
        while True:
            tag, vr, length = self.header()
            if tag == _ITEM_END:
                return
            self.skip_value(vr, length)

    def skip_value(self, vr: bytes, length: int) -> None:
        if length == UNDEFINED:
            self.skip_undefined(vr)
        else:
            self.need(length)
            self.pos += length


def find_element(data: bytes, transfer_syntax: str, tag: tuple[int, int], *, complete: bool) -> bytes | None:
    """Raw value of top-level ``tag`` or None if absent.

    Raises NeedMore when ``data`` is only a prefix and the answer lies beyond
    it (pass ``complete=True`` once the whole dataset has arrived, and an
    unfinished walk then means the element is absent).
    """
    little = transfer_syntax != uids.EXPLICIT_BE
    explicit = transfer_syntax != uids.IMPLICIT_LE
    walker = _Walker(data, explicit, little)
    try:
        while walker.pos < len(data):
            found, vr, length = walker.header()
            if found > tag:
                return None
            if found == tag:
                if length == UNDEFINED:
                    return None
                walker.need(length)
                return data[walker.pos : walker.pos + length]
            walker.skip_value(vr, length)
    except NeedMore:
        if complete:
            return None
        raise
    return None


class SeriesDateProbe:
    """Feed dataset bytes as they arrive; ``result`` is set once the answer is known."""

    #: Give up looking after this much (Series Date sits in the first few hundred bytes).
    LIMIT = 1 << 20

    def __init__(self, transfer_syntax: str) -> None:
        self.transfer_syntax = transfer_syntax
        self._inflater = zlib.decompressobj(-15) if transfer_syntax == uids.DEFLATED_LE else None
        self._plain = bytearray()
        self.done = False
        self.value: str | None = None

    def feed(self, chunk: bytes | memoryview, *, last: bool) -> bool:
        """Add bytes; True once the Series Date (or its absence) is known."""
        if self.done:
            return True
        if self._inflater is not None:
            try:
                self._plain += self._inflater.decompress(bytes(chunk), self.LIMIT)
            except zlib.error:
                self._finish(None)
                return True
        else:
            self._plain += chunk
        complete = last or len(self._plain) >= self.LIMIT
        try:
            raw = find_element(bytes(self._plain), self.transfer_syntax, SERIES_DATE, complete=complete)
        except NeedMore:
            return False
        except Malformed:
            raw = None
        self._finish(raw)
        return True

    def _finish(self, raw: bytes | None) -> None:
        self.done = True
        self._plain = bytearray()
        self.value = raw.decode("ascii", "replace") if raw is not None else None
