"""Storage (C-STORE): the request's dataset is walked, written and made durable by its
sink (``receiving``); the answer goes out only then, and the event after it (from the
ack journal once the object's file is made, when the journal is in use).

The durability order lives in ``storage.Writer``; what a dataset may be, in
``receiving``.  Here: which sink a C-STORE gets, and what answering it means
(metrics before the response, so a scrape right after it sees the object; the
log line and the ``object.stored`` event after it, so neither delays it).
"""

from __future__ import annotations

import time
from typing import Any

from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.serve.receiving import Destination, Drained, Outcome, Sink, sink_for
from dcmrecvd.serve.services import Call, Peer, Send
from dcmrecvd.wire import dimse
from dcmrecvd.wire.status import Status


class Storage:
    command_fields = frozenset({dimse.C_STORE_RQ})

    def sink(self, peer: Peer, call: Call) -> Sink:
        command, context = call.command, call.context
        if not command.has_dataset:
            return Drained(Status.CANNOT_UNDERSTAND, "C-STORE without dataset")
        assert peer.writer is not None  # an accepted association has one
        rx = peer.rx
        ack = peer.ack if rx.store.durable and rx.mode != "ignore" else None
        destination = Destination(
            peer.writer,
            rx.scheme,
            rx.disk,
            peer.calling,
            peer.clock,
            peer.called,
            peer.peer,
            ack,
            rx.duplicates,
            owner=peer.writer,
            settle=peer.answers.flush,
        )
        return sink_for(
            command, context.abstract_syntax, context.transfer_syntax, rx.mode, destination, peer.log
        )

    def answer(self, peer: Peer, call: Call, outcome: Outcome, sink: Sink, send: Send) -> None:
        command = call.command
        received = sink.received
        status = outcome.status
        elapsed = time.monotonic() - call.started
        rx = peer.rx
        # Counted before the response goes out: a scrape right after it sees the object.
        METRICS.objects.labels(f"0x{int(status):04X}", rx.name if rx.name != "*" else "any").inc()
        METRICS.received.inc(received)
        METRICS.store_seconds.observe(elapsed)
        duplicate = outcome.duplicate
        if duplicate is not None:
            METRICS.duplicates.labels(duplicate["outcome"]).inc()
        send(status, outcome.error if status.is_failure else "")
        fields = {
            "sop_class_uid": command.affected_sop_class_uid,
            "sop_instance_uid": command.affected_sop_instance_uid,
            "status": f"0x{int(status):04X}",
            "bytes": received,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if duplicate is not None:
            _duplicate_seen(peer, outcome, duplicate, fields)
        if status != Status.SUCCESS:
            peer.stats.add(failed=1)
            if duplicate is None:
                peer.log.error("store.failed", reason=outcome.error, **fields)
            return
        peer.stats.add(stored=1, bytes=received)
        if rx.title:
            peer.stats.stored_for(rx.title)
        peer.log.info("store.completed", path=outcome.path or None, **fields)
        # After the response: never delays it.  An object acknowledged through the journal has
        # its event handed on from the journal once its file is made (``store.materialiser``).
        if peer.events is not None and outcome.event is not None and outcome.record is None:
            peer.events(outcome.event)


def _duplicate_seen(peer: Peer, outcome: Outcome, body: dict[str, Any], fields: dict[str, Any]) -> None:
    """A second copy of an instance: logged, and its ``object.duplicate`` handed on (from the
    journal with the object's own event when the copy was stored through it)."""
    details = {
        "policy": body["policy"],
        "outcome": body["outcome"],
        "first_path": body["first_path"],
        "path": body["path"] or None,
        **fields,
    }
    if body["outcome"] in ("rejected", "replaced"):  # a sender refused, or a file replaced
        peer.log.warning("store.duplicate", **details)
    else:
        peer.log.info("store.duplicate", **details)
    if peer.events is not None and outcome.record is None:
        peer.events(body)


SERVICE = Storage()
