"""Check an encoded dataset's structure as it streams in, and pick a few values out.

Why: dcmrecvd stores the bytes it receives instead of decoding them (that is
its speed, and it keeps private data untouched), so without this walk it would
acknowledge anything a peer calls a dataset: random bytes, a dataset cut
inside its pixel data, Implicit VR bytes on an Explicit VR context.  dcmrecv
refuses those because it decodes; we refuse them by reading only element
headers (tag, VR, length), item and sequence delimiters and encapsulated
fragments, in the negotiated transfer syntax, and by skipping every value
unread.  A value is looked at only when its top-level tag was asked for
(``capture``): the SOP Class/Instance UIDs for the file meta, the Series Date
for ``+ssd``.

The walker is fed the fragments in arrival order, however they are cut (a
header may span two fragments); ``finish`` then says whether the dataset
ended exactly on an element boundary with every sequence and item closed.
Deflated datasets are inflated as a stream, in bounded pieces, and the
inflated bytes are walked the same way.

What is *not* checked, on purpose: value contents (apart from what is
captured), ascending tag order, even lengths, and the inside of sequences of
defined length in Implicit VR (without a data dictionary they look like any
other value).  Real-world files break those rules and dcmrecv reads them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from dcmrecvd.wire import uids

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
SERIES_DATE = 0x00080021
PATIENT_ID = 0x00100020
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E

#: Every value representation of PS3.5 (2024).
VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM".split()
    + b"UC UI UL UN UR US UT UV".split()
)
#: VRs whose explicit header has a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
#: A captured value longer than this is kept only this far (UIDs and dates are short).
CAPTURE_LIMIT = 1024
#: ...and for output.layout, whose values are hashed whole: an LT's 10,240 characters in
#: UTF-8 fit, and a longer value (none a path is sensibly made of) is read this far.
LAYOUT_CAPTURE_LIMIT = 64 * 1024
#: Inflate at most this much at a time, so a deflate bomb costs time, not memory.
INFLATE_PIECE = 256 * 1024

# Frame kinds: what the bytes inside an open sequence, item or pixel data are.
_ITEMS = 1  # a sequence: items and its delimiter
_FRAGMENTS = 2  # encapsulated pixel data: fragments (items of defined length) and the delimiter
_ELEMENTS = 3  # an item: elements, and its delimiter when of undefined length

_NO_LIMIT = 1 << 62


class Malformed(ValueError):
    """The bytes are not a dataset in the negotiated transfer syntax (short text, for Error Comment)."""


@dataclass(slots=True)
class _Frame:
    kind: int
    end: int  # absolute offset where it ends, or -1 for undefined length
    limit: int  # the nearest enclosing defined end: nothing may go past it
    explicit: bool  # the VR encoding of the elements inside


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class DatasetWalker:
    """Feed a dataset's bytes in order; ``finish`` raises Malformed unless it was well formed.

    ``captured`` holds the raw values of the requested top-level tags seen so
    far; ``past(tag)`` tells whether the walk has gone beyond ``tag`` at the
    top level, i.e. whether its value (if any) is known by now.
    """

    def __init__(
        self, transfer_syntax: str, capture: Iterable[int] = (), capture_limit: int = CAPTURE_LIMIT
    ) -> None:
        little = transfer_syntax != uids.EXPLICIT_BE
        self.explicit = transfer_syntax != uids.IMPLICIT_LE
        self._inflater = zlib.decompressobj(-15) if transfer_syntax == uids.DEFLATED_LE else None
        order = "<" if little else ">"
        self._short = struct.Struct(order + "HH2sH")  # explicit: tag, VR, 16-bit length
        self._plain = struct.Struct(order + "HHI")  # implicit, items, delimiters: tag, 32-bit length
        self._long = struct.Struct(order + "I")
        self._capture = frozenset(capture)
        self._capture_limit = capture_limit
        self.captured: dict[int, bytes] = {}
        self.pos = 0  # absolute offset (in the inflated stream) of the next fed byte
        self.top_tag = -1  # the last top-level tag whose header was read
        self._tag = -1  # the element whose value is being skipped, for messages
        self._skip = 0
        self._carry = b""
        self._stack: list[_Frame] = []
        self._capturing = 0
        self._captured_bytes = bytearray()

    # ------------------------------------------------------------------ public

    def past(self, tag: int) -> bool:
        """True once a top-level element after ``tag`` has begun."""
        return self.top_tag > tag

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Walk the next bytes of the dataset (raises Malformed as soon as it can tell)."""
        inflater = self._inflater
        if inflater is None:
            self._walk(chunk)
            return
        if inflater.eof:  # bytes after the end of the deflate stream: ignored, as DCMTK does
            return
        try:
            self._walk(inflater.decompress(chunk, INFLATE_PIECE))
            # At the stream's end zlib leaves the trailing bytes in unconsumed_tail too.
            while inflater.unconsumed_tail and not inflater.eof:
                self._walk(inflater.decompress(inflater.unconsumed_tail, INFLATE_PIECE))
        except zlib.error as exc:
            raise Malformed(f"deflate stream is corrupt: {exc}") from None

    def finish(self) -> None:
        """The dataset is complete: it must end on an element boundary, everything closed."""
        if self._inflater is not None and not self._inflater.eof:
            try:
                self._walk(self._inflater.flush())
            except zlib.error as exc:
                raise Malformed(f"deflate stream is corrupt: {exc}") from None
            if not self._inflater.eof and not self._skip and not self._carry:
                raise Malformed("deflate stream ends before its final block")
        if self._skip:
            raise Malformed(f"dataset ends inside element {_tag_text(self._tag)}")
        if self._carry:
            raise Malformed(f"dataset ends inside an element header at {self.pos - len(self._carry)}")
        if self._stack:
            what = {_ITEMS: "sequence", _FRAGMENTS: "pixel data", _ELEMENTS: "item"}[self._stack[-1].kind]
            raise Malformed(f"dataset ends inside an unclosed {what}")
        if self.pos == 0:
            raise Malformed("empty dataset")

    # ------------------------------------------------------------------ the walk

    def _walk(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        base = self.pos
        i = 0
        if self._carry:
            i = self._resume(data)
            if i < 0:  # still not a whole header
                return
        stack = self._stack
        while True:
            if self._skip:
                k = min(self._skip, n - i)
                if self._capturing:
                    room = self._capture_limit - len(self._captured_bytes)
                    if room > 0:
                        self._captured_bytes += data[i : i + min(k, room)]
                i += k
                self._skip -= k
                if self._skip:
                    break
                if self._capturing:
                    self.captured[self._capturing] = bytes(self._captured_bytes)
                    self._capturing = 0
            if stack and stack[-1].end == base + i:
                self._close_frames(base + i)
            if i >= n:
                break
            used = self._header(data, i, n, base + i)
            if not used:
                self._carry = bytes(data[i:n])
                i = n
                break
            i += used
        self.pos = base + n

    def _resume(self, data: bytes | bytearray | memoryview) -> int:
        """Finish a header split across fragments; how far into ``data`` it ended (-1: not yet)."""
        carry = self._carry
        joined = carry + bytes(data[:16])
        start = self.pos - len(carry)
        used = self._header(joined, 0, len(joined), start)
        if not used:
            self._carry = carry + bytes(data)
            self.pos += len(data)
            return -1
        self._carry = b""
        return used - len(carry)

    def _close_frames(self, at: int) -> None:
        """Pop the items and sequences of defined length that end at ``at``."""
        stack = self._stack
        while stack and stack[-1].end == at:
            stack.pop()

    def _header(self, data: bytes | bytearray | memoryview, i: int, n: int, at: int) -> int:
        """Read the header at ``data[i]`` (absolute offset ``at``); its size, or 0 if incomplete."""
        if n - i < 8:
            return 0
        stack = self._stack
        frame = stack[-1] if stack else None
        if frame is not None and frame.kind != _ELEMENTS:
            return self._item_header(data, i, at, frame)
        explicit = frame.explicit if frame is not None else self.explicit
        limit = frame.limit if frame is not None else _NO_LIMIT
        if explicit:
            group, element, vr, length = self._short.unpack_from(data, i)
            tag = group << 16 | element
            if group == 0xFFFE:
                return self._delimiter(tag, at, frame)
            if vr in LONG_VRS:
                if n - i < 12:
                    return 0
                length = self._long.unpack_from(data, i + 8)[0]
                size = 12
            elif vr in VRS:
                size = 8
            else:
                raise Malformed(f"invalid VR {bytes(vr)!r} in {_tag_text(tag)} at {at}")
        else:
            group, element, length = self._plain.unpack_from(data, i)
            tag = group << 16 | element
            if group == 0xFFFE:
                return self._delimiter(tag, at, frame)
            vr = b""
            size = 8
        if frame is None:
            self.top_tag = tag
            if tag in self._capture and length != UNDEFINED:
                self._capturing = tag
                self._captured_bytes = bytearray()
                if length == 0:
                    self.captured[tag] = b""
                    self._capturing = 0
        start = at + size
        if length == UNDEFINED:
            if start > limit:
                raise Malformed(f"element {_tag_text(tag)} overruns its item")
            if not explicit or vr == b"SQ":
                stack.append(_Frame(_ITEMS, -1, limit, explicit))
            elif vr == b"UN":  # PS3.5 6.2.2: its content is Implicit VR Little Endian
                stack.append(_Frame(_ITEMS, -1, limit, False))
            elif vr in (b"OB", b"OW"):
                stack.append(_Frame(_FRAGMENTS, -1, limit, explicit))
            else:
                raise Malformed(f"undefined length on VR {vr.decode()} in {_tag_text(tag)}")
            return size
        end = start + length
        if end > limit:
            raise Malformed(f"element {_tag_text(tag)} overruns its item")
        if explicit and vr == b"SQ":
            stack.append(_Frame(_ITEMS, end, end, True))
        else:
            self._tag = tag
            self._skip = length
        return size

    def _item_header(self, data: bytes | bytearray | memoryview, i: int, at: int, frame: _Frame) -> int:
        """Inside a sequence or pixel data: an item (fragment) or the closing delimiter."""
        group, element, length = self._plain.unpack_from(data, i)
        tag = group << 16 | element
        start = at + 8
        if tag == ITEM:
            if length == UNDEFINED:
                if frame.kind == _FRAGMENTS:
                    raise Malformed("pixel data fragment of undefined length")
                if start > frame.limit:
                    raise Malformed("item overruns its sequence")
                self._stack.append(_Frame(_ELEMENTS, -1, frame.limit, frame.explicit))
                return 8
            end = start + length
            if end > frame.limit:
                raise Malformed("item overruns its sequence")
            if frame.kind == _FRAGMENTS:
                self._tag = 0x7FE00010
                self._skip = length
            else:
                self._stack.append(_Frame(_ELEMENTS, end, end, frame.explicit))
            return 8
        if tag == SEQUENCE_END and frame.end == -1:
            self._stack.pop()
            return 8
        raise Malformed(f"{_tag_text(tag)} at {at} where an item was expected")

    def _delimiter(self, tag: int, at: int, frame: _Frame | None) -> int:
        """(FFFE,xxxx) among elements: only an item delimiter closing an item of undefined length."""
        if tag == ITEM_END and frame is not None and frame.end == -1:
            self._stack.pop()
            return 8
        raise Malformed(f"unexpected delimiter {_tag_text(tag)} at {at}")


def text_value(raw: bytes | None) -> str | None:
    """A captured string value without its padding (trailing spaces or one NUL)."""
    if raw is None:
        return None
    return raw.decode("ascii", "replace").rstrip(" ").removesuffix("\x00").rstrip(" ")


def decoded_text(raw: bytes | None, character_set: bytes | None) -> str:
    """A captured text value (LO, SH, PN...) as the dataset's Specific Character Set
    (0008,0005) says to read it, without its padding; "" when absent.

    One character set (ISO_IR 100, ISO_IR 192, GB18030...) is decoded here; values
    with ISO 2022 escape sequences go through pydicom's decoder.  An unknown term
    counts as the default repertoire, and a byte that does not decode becomes
    U+FFFD: a value from the wire is never a reason to fail after the ack.
    """
    if not raw:
        return ""
    from pydicom.charset import convert_encodings, decode_bytes, python_encoding

    terms = [t.strip() for t in (text_value(character_set) or "").split("\\")]
    terms = [t if t in python_encoding else "" for t in terms]
    try:
        if any(t.startswith("ISO 2022") for t in terms):
            text = decode_bytes(raw, convert_encodings(terms), {0x5C})
        else:
            codec = python_encoding[terms[0]]
            text = raw.decode("latin_1" if codec == "iso8859" else codec, "replace")
    except (LookupError, ValueError):
        text = raw.decode("latin_1")
    return text.rstrip(" \x00")
