"""Admission: whether an A-ASSOCIATE-RQ becomes an association, and the record of why.

In order: the request is decoded; the called AE title picks the receiver
(``[ae.<TITLE>]`` or the default); its access rules decide on calling AE,
called AE and address; a slot is taken (the server's global and per-peer
limits); the output directory's free-space watermark is asked; then the
presentation contexts are negotiated against the receiver's profile.  The
first "no" is the answer.  The outcome is logged and counted here, before the
driver sends it, so the log is in causal order for anyone who reads it after
hearing the answer.  No I/O but the watermark's ``statvfs``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from structlog.typing import FilteringBoundLogger

from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.serve.receiving import DISK_LOW
from dcmrecvd.serve.runtime import Receiver, Runtime, Stats
from dcmrecvd.wire import negotiation, pdu
from dcmrecvd.wire.upper_layer import ProtocolError


@dataclass(frozen=True)
class Decision:
    """The answer to one A-ASSOCIATE-RQ, and who asked."""

    calling: str
    called: str
    rx: Receiver
    outcome: negotiation.Outcome
    peer_max_pdu: int
    #: The association's logger, bound to calling/called AE and receiver from here on.
    log: FilteringBoundLogger


def decide(
    raw: bytes,
    runtime: Runtime,
    host: str,
    take_slot: Callable[[], bool],
    stats: Stats,
    log: FilteringBoundLogger,
) -> Decision:
    """Decide on ``raw`` (a whole A-ASSOCIATE-RQ PDU), log and count the outcome.

    ``take_slot`` is asked only once access is granted; a caller whose request is
    then rejected (the disk, or ``stats.refusing``: acknowledged objects cannot be made into
    files now) holds a slot it must give back.  Raises ProtocolError
    for a request that cannot be decoded or negotiated at all (an A-ABORT).
    """
    config = runtime.config.network
    try:
        request = negotiation.decode_request(raw)
    except negotiation.BadRequest as exc:
        raise ProtocolError(str(exc), pdu.REASON_INVALID_PARAMETER) from None
    calling, called = request.calling_ae_title, request.called_ae_title
    rx = runtime.receiver_for(called)
    log = log.bind(calling_aet=calling, called_aet=called, ae=rx.name)
    access = rx.access.decide(calling, called, host)
    why = ""
    decided: dict[str, object] = {}
    if not access.allowed:
        why = "access denied"
        decided = {"rule": access.rule or "default", "rule_file": rx.access.source or None}
        outcome = negotiation.reject((0x01, 0x01, access.reason))
    elif not take_slot():
        outcome = negotiation.reject(negotiation.REJECT_LOCAL_LIMIT)
    elif not rx.disk.has_room():
        why = DISK_LOW
        outcome = negotiation.reject(negotiation.REJECT_LOCAL_LIMIT)
    elif rx.mode != "ignore" and (refusing := stats.refusing()):
        why = refusing
        outcome = negotiation.reject(negotiation.REJECT_LOCAL_LIMIT)
    else:
        try:
            outcome = negotiation.negotiate(
                request,
                rx.profile,
                rx.contexts,
                ae_title=rx.title or config.ae_title,
                max_pdu=config.max_pdu,
                window=config.async_window,
            )
        except Exception as exc:  # pynetdicom's codec on a request it cannot handle
            raise ProtocolError(
                f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}: {exc}", pdu.REASON_INVALID_PARAMETER
            ) from None
    if outcome.accepted:
        METRICS.accepted.inc()
        fields: dict[str, object] = {"contexts": len(outcome.contexts)}
        if runtime.config.logging.verbose_pc:
            fields["presentation_contexts"] = [
                f"{c.context_id}:{c.abstract_syntax}:{c.transfer_syntax}" for c in outcome.contexts.values()
            ]
        log.info("assoc.accepted", **fields)
    else:
        assert outcome.reject is not None
        stats.add(rejected=1)
        reason = why or negotiation.REJECT_TEXT.get(outcome.reject, "rejected")
        METRICS.rejected.labels(reason).inc()
        log.warning(
            "assoc.rejected",
            reason=reason,
            **decided,
            result=outcome.reject[0],
            source=outcome.reject[1],
            diagnostic=outcome.reject[2],
        )
    return Decision(calling, called, rx, outcome, request.peer_max_pdu, log)
