"""UID names and modality prefixes: DCMTK's tables, shipped as package data.

DCMTK's symbolic names (``LittleEndianExplicit``, ``CTImageStorage``...) are
what existing asconfig files use; pydicom keywords and numeric UIDs are
accepted too.  Pure lookups, loaded once.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from importlib import resources

from pydicom._uid_dict import UID_dictionary

#: A UID safe for a path: digits and dots, no empty component (leading zeros,
#: which some modalities send, are tolerated: they are harmless in a name).
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"


class UnsafeIdentifier(ValueError):
    """A UID from the wire is not fit to be part of a file name."""


def is_valid_uid(value: str) -> bool:
    """True for digits and dots, at most 64 characters, no empty component."""
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _rows(name: str) -> list[list[str]]:
    text = resources.files("dcmrecvd.data").joinpath(name).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


@cache
def name_table() -> dict[str, str]:
    """Symbolic name or keyword -> UID (DCMTK names take precedence)."""
    table: dict[str, str] = {}
    for uid, entry in UID_dictionary.items():
        if entry[4]:
            table[entry[4]] = uid
    for uid, keyword, dcmtk in _rows("uid_names.tsv"):
        table.setdefault(keyword, uid)
        table[dcmtk] = uid
    little = sys.byteorder == "little"
    table["LocalEndianExplicit"] = EXPLICIT_LE if little else EXPLICIT_BE
    table["OppositeEndianExplicit"] = EXPLICIT_BE if little else EXPLICIT_LE
    return table


def resolve(name: str) -> str | None:
    """A UID for a symbolic name, keyword or numeric UID; None if unknown."""
    if name and name[0].isdigit():
        return name if is_valid_uid(name) else None
    return name_table().get(name)


def is_transfer_syntax(uid: str) -> bool:
    """Known transfer syntax, or a numeric UID we must take on trust (private)."""
    entry = UID_dictionary.get(uid)
    return entry is None or entry[1] == "Transfer Syntax"


@cache
def modality_prefixes() -> dict[str, str]:
    """SOP Class UID -> DCMTK's short modality prefix for file names."""
    return {uid: prefix for uid, prefix in _rows("modality_prefixes.tsv")}


def modality_prefix(sop_class_uid: str, unknown: str = "UNKNOWN") -> str:
    """The prefix DCMTK uses in file names for this SOP class."""
    return modality_prefixes().get(sop_class_uid, unknown)
