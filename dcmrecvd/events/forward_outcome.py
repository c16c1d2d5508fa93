"""What a destination's answer means for the object and for the destination.

The outcome table (README "Forwarding", dcmrecvd.toml(5)); everything not named
here is the nearest row's, and a status we do not know is a dead letter, never a
silent "delivered":

| answer | verdict |
|---|---|
| 0x0000 | delivered |
| 0xBxxx warnings (0xB000, 0xB006, 0xB007, ...) | delivered (``warnings_delivered = false``: dead) |
| 0x0111 duplicate SOP instance | ``duplicate_status``: delivered or dead |
| 0xA7xx out of resources, 0x0213 resource limitation, 0x0110 processing failure | retry |
| connection refused or reset, A-ASSOCIATE-RJ transient, A-ABORT, timeouts | retry (the destination rests) |
| 0xA9xx, 0xCxxx, 0x0122, any other failure status | dead letter (this object only) |
| no accepted context for the object's SOP class and transfer syntax | dead letter (this object only) |
| A-ASSOCIATE-RJ permanent, 0x0124 refused: not authorized | pause the destination |

A retry is a delivery tried again after ``backoff`` seconds, doubling up to
``backoff_max``; past ``give_up_after`` seconds since receipt it is a dead
letter.  A retry for a reason of the connection (refused, reset, rejected for
now, aborted, timed out) makes the whole destination rest for that delay: no
other object is tried meanwhile, so a destination that is down costs one
attempt per interval, not one per object.  A pause stops the destination until
a probe (its oldest object, every ``backoff_max`` seconds) is answered with
anything but a pause.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dcmrecvd.wire.status import Status


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    PAUSE = "pause"


@dataclass(frozen=True)
class Delivery:
    verdict: Verdict
    #: Why, for logs and dead letters (a status and its meaning, or the connection's error).
    reason: str
    #: The connection failed, not the object: the destination rests before the next try.
    connection: bool = False
    #: For the metric: delivered, warning, duplicate, retry, dead, paused.
    label: str = ""
    #: Seconds the destination asked us to wait (HTTP Retry-After); 0: our own backoff.
    retry_after: float = 0.0


DUPLICATE = Status.DUPLICATE_INSTANCE
NOT_AUTHORIZED = 0x0124
_RETRY_STATUSES = {0x0110: "processing failure", 0x0213: "resource limitation"}


def of_status(status: int, comment: str, *, warnings_delivered: bool, duplicate_delivered: bool) -> Delivery:
    """The verdict on a C-STORE response status."""
    text = f"status 0x{status:04X}" + (f" ({comment})" if comment else "")
    if status == 0x0000:
        return Delivery(Verdict.DELIVERED, "status 0x0000: success", label="delivered")
    if status == DUPLICATE:
        verdict = Verdict.DELIVERED if duplicate_delivered else Verdict.DEAD
        return Delivery(verdict, f"{text}: duplicate SOP instance", label="duplicate")
    if status & 0xF000 == 0xB000:
        verdict = Verdict.DELIVERED if warnings_delivered else Verdict.DEAD
        return Delivery(verdict, f"{text}: warning", label="warning" if warnings_delivered else "dead")
    if status == NOT_AUTHORIZED:
        return Delivery(Verdict.PAUSE, f"{text}: refused, not authorized", label="paused")
    if status & 0xFF00 == 0xA700 or status in _RETRY_STATUSES:
        meaning = _RETRY_STATUSES.get(status, "out of resources")
        return Delivery(Verdict.RETRY, f"{text}: {meaning}", label="retry")
    if status & 0xFF00 == 0xA900:
        return Delivery(Verdict.DEAD, f"{text}: data set does not match SOP class", label="dead")
    if status & 0xF000 == 0xC000:
        return Delivery(Verdict.DEAD, f"{text}: cannot understand", label="dead")
    if status == 0x0122:
        return Delivery(Verdict.DEAD, f"{text}: SOP class not supported", label="dead")
    return Delivery(Verdict.DEAD, f"{text}: failure", label="dead")


def of_association(why: str, detail: str, result: int = 0) -> Delivery:
    """The verdict when no association opened (``why``: unreachable, rejected, aborted)."""
    if why == "no-context":  # every pair proposed, this object's among them, was refused
        return no_context(detail)
    if why == "rejected" and result == 1:
        return Delivery(Verdict.PAUSE, f"association rejected permanently ({detail})", True, "paused")
    return Delivery(Verdict.RETRY, f"{why}: {detail}", True, "retry")


def no_context(detail: str) -> Delivery:
    return Delivery(Verdict.DEAD, f"not accepted by the destination: {detail}", label="dead")
