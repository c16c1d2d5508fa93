"""``output.layout``: a relative path template filled from a dataset's header, made safe.

Pure: a template is parsed once (at configuration time, so a bad one is a
configuration error naming the key), and rendered per object from the raw
values the streaming walk captured before the file was opened.

Template syntax: literal text and ``{placeholder[:modifier]...}`` fields, ``/``
between directory levels.  A placeholder is an attribute keyword
(``{PatientID}``), a tag in hex (``{0020000D}``) or a derived value:
``calling_aet``, ``called_aet``, ``received`` (the receive time), ``modality_prefix``
(DCMTK's, as in dcmrecv's file names), ``uuid``.  Modifiers, applied in order:
a ``strftime`` format for DA, DT and TM attributes and for ``received``
(``{StudyDate:%Y/%m}``, where ``/`` is a level of its own), ``upper``, ``lower``,
a slice ``[a:b]``, and ``sha256`` / ``md5`` / ``hash8`` (hex; ``hash8`` is the
first 8 digits of the SHA-256: never a 32-bit string hash).  The last level must
hold ``{SOPInstanceUID}`` or ``{uuid}`` unmodified, so two objects never share a name
by accident.  A date format prints only what the value gives (PS3.5 lets a DT stop
after its year): what it asks beyond that, like an absent value, is ``layout_missing``.

Values made safe, by construction: decoded with the dataset's Specific
Character Set; every character that is not a letter, a digit, a space or one of
``- . _ @`` becomes ``_``; leading and trailing dots and spaces are stripped; a
value longer than ``MAX_VALUE`` characters is cut and given a hash suffix; an empty
value, ``.`` or ``..`` (or an absent attribute) becomes ``output.layout_missing``.
So no component can climb out of the output directory, and ``render`` checks that
once more on the whole path.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dcmrecvd.wire import uids
from dcmrecvd.wire.dataset_walk import SOP_INSTANCE_UID, decoded_text

DERIVED = ("calling_aet", "called_aet", "received", "modality_prefix", "uuid")
PIXEL_DATA = 0x7FE00010
#: The longest one value may get in a path (then cut, with a hash suffix); UIDs fit.
MAX_VALUE = 64
#: The longest path component Linux file systems take, in bytes.
NAME_MAX = 255
#: The longest file name a layout makes: room for a second copy's ``_NNNNN`` (keep-both) and
#: the ``.<seq>`` a name taken by someone else gets after the ack, within NAME_MAX.
FILE_NAME_MAX = NAME_MAX - 32
_FIELD = re.compile(r"\{([^{}]*)\}")
_SLICE = re.compile(r"\[(-?\d*):(-?\d*)\]")
_TOKENS = re.compile(r"\[[^\]]*\]|[^:]+")
_HASHES = {"sha256", "md5", "hash8"}
#: Besides letters and digits, the characters a path component may hold.
_ALLOWED = " -._@"
#: Letters and digits (any script: ``\w`` less nothing else but "_", itself allowed) and _ALLOWED.
_SAFE = re.compile(r"[\w .@-]*")
_UNSAFE = re.compile(r"[^\w .@-]")
_DATE_VRS = {"DA", "DT", "TM"}


class LayoutError(ValueError):
    """A template that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Field:
    name: str  # a derived name, or the attribute's keyword
    tag: int  # 0 for a derived value
    vr: str
    modifiers: tuple[str, ...]

    @property
    def dated(self) -> bool:
        """A date format among the modifiers (its ``/`` may make levels)."""
        return any("%" in m for m in self.modifiers)


Part = str | Field


@dataclass(frozen=True)
class Layout:
    template: str
    levels: tuple[tuple[Part, ...], ...]

    @functools.cached_property
    def tags(self) -> frozenset[int]:
        """The attributes the walk must capture before the object's file is opened."""
        return frozenset(p.tag for level in self.levels for p in level if isinstance(p, Field) and p.tag)

    @property
    def unique(self) -> bool:
        """A {uuid} somewhere: every object gets a path of its own (no two ever collide)."""
        return any(isinstance(p, Field) and p.name == "uuid" for level in self.levels for p in level)

    @property
    def extension(self) -> str:
        """The literal the file name ends with when it looks like an extension ('.dcm'), else ""."""
        last = self.levels[-1][-1]
        return last if isinstance(last, str) and last.startswith(".") and "." not in last[1:] else ""

    @functools.cached_property
    def last_tag(self) -> int:
        """The highest of ``tags`` (the walk holds the object's first bytes until past it)."""
        return max(self.tags | {SOP_INSTANCE_UID})

    def render(
        self,
        captured: Mapping[int, bytes],
        character_set: bytes | None,
        derived: Mapping[str, str],
        received: dt.datetime,
        missing: str,
    ) -> PurePosixPath:
        """The object's path relative to the output directory; LayoutError if none is safe."""
        out: list[str] = []
        for level in self.levels:
            text = "".join(
                p if isinstance(p, str) else _value(p, captured, character_set, derived, received, missing)
                for p in level
            )
            out.extend(_component(piece, missing) for piece in text.split("/"))
        out[-1] = _component(out[-1], missing, FILE_NAME_MAX)
        if any(part in ("", ".", "..") or "/" in part for part in out):  # cannot happen: checked
            raise LayoutError(f"{'/'.join(out)} would leave the output directory")
        return PurePosixPath("/".join(out))


def parse(template: str) -> Layout:
    """A template checked and split into levels; LayoutError naming what is wrong."""
    if not template or template.startswith("/"):
        raise LayoutError("a relative path template, e.g. {PatientID}/{StudyInstanceUID}/{SOPInstanceUID}")
    levels: list[tuple[Part, ...]] = []
    for level in _levels(template):
        if level in ("", ".", ".."):
            raise LayoutError(f"'{level}' is not a directory level")
        parts: list[Part] = []
        pos = 0
        for match in _FIELD.finditer(level):
            if match.start() > pos:
                parts.append(_literal(level[pos : match.start()]))
            parts.append(_field(match.group(1)))
            pos = match.end()
        if pos < len(level):
            parts.append(_literal(level[pos:]))
        levels.append(tuple(parts))
    last = levels[-1]
    unique = [p for p in last if isinstance(p, Field) and p.name in ("SOPInstanceUID", "uuid")]
    if not unique:
        raise LayoutError("the last level (the file name) must hold {SOPInstanceUID} or {uuid}")
    if all(p.modifiers for p in unique):  # a slice or a short hash makes two instances one name
        raise LayoutError(
            "the last level (the file name) must hold {SOPInstanceUID} or {uuid} unmodified: "
            f"{{{unique[0].name}:{':'.join(unique[0].modifiers)}}} does not keep names unique"
        )
    layout = Layout(template, tuple(levels))
    if any(tag >= PIXEL_DATA for tag in layout.tags):
        raise LayoutError("an attribute at or after Pixel Data cannot name the file (it is read before)")
    return layout


def _levels(template: str) -> list[str]:
    """The template split at each ``/`` outside a field (a date format may hold one)."""
    levels, depth, start = [], 0, 0
    for i, c in enumerate(template):
        depth += (c == "{") - (c == "}")
        if c == "/" and depth == 0:
            levels.append(template[start:i])
            start = i + 1
    levels.append(template[start:])
    return levels


def _literal(text: str) -> str:
    if "{" in text or "}" in text:
        raise LayoutError(f"unbalanced brace in '{text}'")
    if not _SAFE.fullmatch(text):
        raise LayoutError(f"'{text}': literal text may hold letters, digits, space and - . _ @ only")
    return text


def _field(spec: str) -> Field:
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise LayoutError(
            f"{{{spec}}}: an empty placeholder (an attribute keyword, a tag or a derived value)"
        )
    modifiers = tuple(_TOKENS.findall(rest)) if rest else ()
    if name in DERIVED:
        tag, vr = 0, "DT" if name == "received" else "LO"
    else:
        tag = _tag(name)
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        name = keyword_for_tag(tag) or name
    for modifier in modifiers:
        if modifier in ("upper", "lower") or modifier in _HASHES or _SLICE.fullmatch(modifier):
            continue
        if "%" in modifier and (vr in _DATE_VRS):
            continue
        raise LayoutError(f"{{{spec}}}: unknown modifier '{modifier}'")
    return Field(name, tag, vr, modifiers)


def _tag(name: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise LayoutError(
            f"{{{name}}} is neither an attribute keyword, a tag (8 hex digits) "
            f"nor one of {', '.join(DERIVED)}"
        )
    return int(tag)


def _value(
    field: Field,
    captured: Mapping[int, bytes],
    character_set: bytes | None,
    derived: Mapping[str, str],
    received: dt.datetime,
    missing: str,
) -> str:
    if field.name == "uuid":
        return _finish(field, uuid.uuid4().hex, received, missing)
    if field.name == "received":
        return _finish(field, received.strftime("%Y%m%d%H%M%S"), received, missing)
    if field.tag == 0:
        return _repeated(field, derived.get(field.name, ""), None, missing)
    if field.tag == SOP_INSTANCE_UID:  # new in every object: nothing to remember
        return _finish(field, _text(field, captured.get(field.tag), None), received, missing)
    return _repeated(field, captured.get(field.tag), character_set, missing)


@functools.lru_cache(maxsize=4096)
def _repeated(field: Field, source: bytes | str | None, character_set: bytes | None, missing: str) -> str:
    """A value's component, remembered: the objects of a study share most of them (patient,
    dates, modality), and decoding, hashing and cleaning each again is most of a render."""
    text = source if isinstance(source, str) else _text(field, source, character_set)
    return _finish(field, text, dt.datetime.min, missing)


def _text(field: Field, raw: bytes | None, character_set: bytes | None) -> str:
    if raw is None:
        return ""
    if field.vr == "UI":
        return raw.decode("ascii", "replace").rstrip(" \x00")
    text = decoded_text(raw, character_set)
    return text.split("\\")[0] if field.vr not in ("LT", "ST", "UT") else text


def _finish(field: Field, text: str, received: dt.datetime, missing: str) -> str:
    for modifier in field.modifiers:
        text = _modify(text, modifier, field, received)
    if field.modifiers and field.dated:  # a date format may make levels: {StudyDate:%Y/%m}
        return "/".join(safe(piece, missing) for piece in text.split("/"))
    return safe(text, missing)


def _modify(text: str, modifier: str, field: Field, received: dt.datetime) -> str:
    if not text and field.name != "received":  # absent or empty stays so: output.layout_missing
        return ""
    if modifier == "upper":
        return text.upper()
    if modifier == "lower":
        return text.lower()
    if modifier == "sha256":
        return hashlib.sha256(text.encode()).hexdigest()
    if modifier == "md5":
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
    if modifier == "hash8":
        return hashlib.sha256(text.encode()).hexdigest()[:8]
    slice_ = _SLICE.fullmatch(modifier)
    if slice_:
        start, stop = (int(x) if x else None for x in slice_.groups())
        return text[start:stop]
    if field.name == "received":
        return received.strftime(modifier)
    parsed = _when(text, field.vr)
    if parsed is None or _needs(modifier) > parsed[1]:
        return ""  # unreadable, or less precise than the format asks: output.layout_missing
    return parsed[0].strftime(modifier)


#: strftime directives and the digits of a DICOM date-time they need (YYYYMMDDHHMMSS).
_PRECISION = {
    **dict.fromkeys("YyCGg", 4),
    **dict.fromkeys("mbBh", 6),
    **dict.fromkeys("djaAuwUWVex", 8),
    **dict.fromkeys("HIpk", 10),
    **dict.fromkeys("MR", 12),
    **dict.fromkeys("STXcsf", 14),
}
_DIRECTIVE = re.compile(r"%(.)")


def _needs(fmt: str) -> int:
    """How many digits of YYYYMMDDHHMMSS a strftime format reads (time values count from HH)."""
    return max((_PRECISION.get(d, 0) for d in _DIRECTIVE.findall(fmt)), default=0)


def _when(text: str, vr: str) -> tuple[dt.datetime, int] | None:
    """A DA, DT or TM value as a datetime, with how many digits of YYYYMMDDHHMMSS it gave
    (None when it does not parse).  DT may stop after any component (PS3.5 6.2: ``2023``,
    ``202301``); a time counts as given from HH on, its date as known."""
    raw = text.strip()
    if vr == "DT":
        raw = re.split(r"[+-]", raw, maxsplit=1)[0]  # the UTC offset is not part of the value
    digits = raw.split(".")[0] if vr != "DA" else raw
    if not digits.isdigit():
        return None
    if vr == "TM":
        if len(digits) < 2 or len(digits) % 2:
            return None
        given = 8 + len(digits[:6])
        digits = "19000101" + digits[:6]
    elif vr == "DA":
        if len(digits) != 8:
            return None
        given = 8
    else:
        if len(digits) < 4 or len(digits) % 2:
            return None
        given = len(digits[:14])
        digits = digits[:14]
    padded = digits + "0101000000"[len(digits) - 4 :] if len(digits) < 14 else digits
    try:
        when = dt.datetime(
            int(padded[0:4]),
            int(padded[4:6]),
            int(padded[6:8]),
            int(padded[8:10]),
            int(padded[10:12]),
            min(int(padded[12:14]), 59),
        )
    except ValueError:
        return None
    return when, given


def safe(value: str, missing: str) -> str:
    """A value as it may stand in a path (see the module docstring)."""
    cleaned = value if _SAFE.fullmatch(value) else _UNSAFE.sub("_", value)
    cleaned = cleaned.strip(" .")
    if len(cleaned) > MAX_VALUE:
        cleaned = cleaned[: MAX_VALUE - 9].rstrip(" .") + "-" + _hash8(value)
    if cleaned in ("", ".", ".."):
        return missing
    return cleaned


def _component(text: str, missing: str, limit: int = NAME_MAX) -> str:
    """One level of the rendered path: never empty, . or .., at most ``limit`` bytes."""
    if text in ("", ".", ".."):
        return missing
    if len(text.encode()) > limit:
        head = text.encode()[: limit - 9].decode("utf-8", "ignore")
        return head + "-" + _hash8(text)
    return text


def _hash8(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def derived_values(calling_aet: str, called_aet: str, sop_class_uid: str) -> dict[str, str]:
    return {
        "calling_aet": calling_aet,
        "called_aet": called_aet,
        "modality_prefix": uids.modality_prefix(sop_class_uid),
    }
