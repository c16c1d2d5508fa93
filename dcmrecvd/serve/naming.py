"""Where a received object goes: (identifiers, scheme) -> relative directory and name.

Pure.  Every UID that can reach a path is validated here, so nothing from the
wire can name a file outside the output directory.  The schemes and prefixes
are dcmrecv's (see its man page, "Filename Generation").
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.uid import generate_uid

from dcmrecvd.wire import uids
from dcmrecvd.wire.layout import Layout
from dcmrecvd.wire.uids import UnsafeIdentifier

Clock = Callable[[], dt.datetime]

_DATE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")


@dataclass(frozen=True)
class NamingScheme:
    """The output options that decide directory and file name."""

    subdirectory: str = "none"  # none | series-date
    filenames: str = "default"  # default | unique | short-unique | system-time
    extension: str = ""
    #: output.layout, parsed (None: dcmrecv's naming above), and what an absent value becomes.
    layout: Layout | None = None
    layout_missing: str = "UNKNOWN"

    @property
    def overwrites(self) -> bool:
        """Only default names replace an earlier file of the same name."""
        return self.filenames == "default"

    @property
    def repeats(self) -> bool:
        """Names made from the instance alone: a second copy gets the first one's name."""
        return self.overwrites and (self.layout is None or not self.layout.unique)

    @property
    def file_extension(self) -> str:
        """What file names end with (output.extension, or the layout's '.dcm'), for keep-both."""
        return self.layout.extension if self.layout is not None else self.extension

    @property
    def needs_series_date(self) -> bool:
        """True when the dataset must be read (a little) before the file is opened."""
        return self.subdirectory == "series-date"


def check_uid(value: str, what: str) -> str:
    """``value`` if it is a safe UID, else UnsafeIdentifier."""
    if not uids.is_valid_uid(value):
        raise UnsafeIdentifier(f"invalid {what} {value[:80]!r}")
    return value


def parse_series_date(value: str | None) -> dt.date | None:
    """A DICOM DA value (first of several; old YYYY.MM.DD tolerated) or None."""
    if not value:
        return None
    first = value.split("\\")[0].strip(" \x00")
    match = _DATE.match(first)
    if not match:
        return None
    try:
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def directory_for(scheme: NamingScheme, series_date: str | None, today: dt.date) -> PurePosixPath:
    """``.``, ``data/YYYY/MM/DD`` or ``undef/YYYYMMDD`` relative to the output directory."""
    if scheme.subdirectory != "series-date":
        return PurePosixPath(".")
    date = parse_series_date(series_date)
    if date is None:
        return PurePosixPath("undef", today.strftime("%Y%m%d"))
    return PurePosixPath("data", f"{date.year:04d}", f"{date.month:02d}", f"{date.day:02d}")


def file_name(
    scheme: NamingScheme,
    sop_class_uid: str,
    sop_instance_uid: str,
    now: dt.datetime,
) -> str:
    """A file name by the scheme; call again for a fresh one after a collision."""
    check_uid(sop_class_uid, "SOP Class UID")
    check_uid(sop_instance_uid, "SOP Instance UID")
    ext = scheme.extension
    if scheme.filenames == "unique":
        return f"{uids.modality_prefix(sop_class_uid)}.X.{generate_uid(prefix=None)}{ext}"
    if scheme.filenames == "short-unique":
        return f"{uids.modality_prefix(sop_class_uid, 'XX')}_{secrets.token_hex(8)}{ext}"
    if scheme.filenames == "system-time":
        stamp = now.strftime("%Y%m%d%H%M%S")
        return f"{stamp}.{now.microsecond:06d}.{uids.modality_prefix(sop_class_uid)}{ext}"
    return f"{uids.modality_prefix(sop_class_uid)}.{sop_instance_uid}{ext}"


def check_extension(extension: str) -> str:
    """An extension may not turn a name into a path."""
    if "/" in extension or "\x00" in extension:
        raise UnsafeIdentifier(f"file name extension may not contain '/': {extension!r}")
    return extension
