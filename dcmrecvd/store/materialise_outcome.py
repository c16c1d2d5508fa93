"""What a failure to make an acknowledged object's file means: wait, or quarantine.

Once a C-STORE is answered 0x0000 from the ack journal, its record must become a
file or be set aside visibly; nothing in between may last.  So every error the
materialiser meets is put in one of two rows, as forwarding's outcome table does
for a destination's answers:

========================  ==================================================  ===========
row                       errors                                              what happens
========================  ==================================================  ===========
transient (the disk)      ENOSPC, EDQUOT, EACCES, EPERM, EROFS, EIO, and any  the record waits, retried
                          error this table does not name                      with backoff; new objects
                                                                              are refused until it passes
permanent (this record)   ENAMETOOLONG, ENOTDIR, EISDIR, ELOOP, EEXIST (no    the record is quarantined;
                          free name), EINVAL, EFBIG, an invalid record        later records go on
========================  ==================================================  ===========

Why an unknown error is transient: waiting loses nothing and says why (logs,
``/readyz``, refused objects); quarantining on a guess would take an object
away from where the admin expects it.  Why EACCES is transient although a
retry alone will not heal it: the admin fixes the directory, and the objects
then land where they belong, not in a side area.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from .backoff import backoff

#: Errors that say "this record can never be made as it stands" (its name, its place).
PERMANENT_ERRNOS = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EEXIST,
        errno.EINVAL,
        errno.EFBIG,
    }
)

#: Backoff between tries of a record that waits: first, factor, cap (seconds).
BACKOFF_FIRST = 0.1
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 5.0


class Row(Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class InvalidRecord(ValueError):
    """A record whose header cannot be made into a file (missing or unsafe fields)."""


@dataclass(frozen=True)
class MakeFailure:
    """A failure classified: its row, and the words the log, events and ``/readyz`` use."""

    row: Row
    reason: str
    errno: int = 0

    @property
    def permanent(self) -> bool:
        return self.row is Row.PERMANENT


def classify(exc: BaseException) -> MakeFailure:
    """The row of an error met while making (or recovering) one record."""
    if isinstance(exc, (InvalidRecord, KeyError, TypeError, ValueError)) and not isinstance(exc, OSError):
        return MakeFailure(Row.PERMANENT, f"invalid record: {exc}")
    if isinstance(exc, OSError):
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        words = f"{name}: {exc.strerror or exc}"
        if getattr(exc, "filename", None):
            words += f": {exc.filename}"
        if code in PERMANENT_ERRNOS:
            return MakeFailure(Row.PERMANENT, words, code)
        return MakeFailure(Row.TRANSIENT, words, code)
    return MakeFailure(Row.TRANSIENT, f"{type(exc).__name__}: {exc}")


def retry_delay(tries: int) -> float:
    """Seconds before the next try after ``tries`` failed ones (1, 2, ...)."""
    return backoff(tries, BACKOFF_FIRST, BACKOFF_CAP, BACKOFF_FACTOR)
