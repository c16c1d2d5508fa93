"""DIMSE status codes we send, and the one table that maps failures onto them."""

from __future__ import annotations

from enum import IntEnum

from dcmrecvd.wire.uids import UnsafeIdentifier


class Status(IntEnum):
    """C-STORE, C-ECHO and N-ACTION response statuses (PS3.4 Annex B, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_INSTANCE = 0x0111
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION = 0x0123
    UNRECOGNIZED_OPERATION = 0x0211
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000

    @classmethod
    def _missing_(cls, value: object) -> Status | None:
        """A failure code we have no name for (output.duplicate_status may be any failure a
        C-STORE may carry: 01xx, Axxx, Cxxx): a member made for it, like enum's own pseudo-members."""
        if not isinstance(value, int) or not is_failure_code(value):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"FAILURE_{value:04X}"
        member._value_ = value
        return member

    @property
    def is_failure(self) -> bool:
        """Anything but success (we send no warnings)."""
        return self is not Status.SUCCESS


#: In the 01xx range but warnings (PS3.7 C.4): Attribute List Error, Attribute Value Out of
#: Range. A sender reads them as "stored, with a remark": never a refusal.
WARNING_01XX = frozenset({0x0107, 0x0116})


def is_failure_code(value: int) -> bool:
    """A DIMSE failure status (PS3.7 C.4): 01xx but 0107 and 0116, 02xx, Axxx or Cxxx."""
    if value in WARNING_01XX:
        return False
    return 0x0100 <= value <= 0x02FF or 0xA000 <= value <= 0xAFFF or 0xC000 <= value <= 0xCFFF


class Failure(Exception):
    """One C-STORE cannot succeed, for a reason that names its status class.

    Raised where the reason is known (a refused dataset, a full disk); the
    association answers that one request with ``status`` and goes on.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def status_for_error(exc: BaseException) -> Status:
    """The one map from what went wrong to the status sent: a declared ``Failure`` says
    its own; disk and permission trouble -> 0xA700; data we cannot understand -> 0xC000;
    anything unexpected -> 0xA700 (it is ours, not the sender's)."""
    if isinstance(exc, Failure):
        return exc.status
    if isinstance(exc, UnsafeIdentifier):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, OSError):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, ValueError):
        return Status.CANNOT_UNDERSTAND
    return Status.OUT_OF_RESOURCES
