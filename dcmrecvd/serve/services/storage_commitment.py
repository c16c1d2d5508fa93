"""Storage Commitment Push Model, SCP (N-ACTION): keep the request durably, answer at once.

The report is always asynchronous (``commitment_reports``), so answering an N-ACTION is
only: is this a request we take (the command, the requesting AE, room to keep it), can
its dataset be read (``wire.commitment_codec``), and is it on disk (``CommitmentStore``,
one fsync'ed SQLite transaction) before the 0x0000 goes out.

Refusals (PS3.7 C.4.3): not the Storage Commitment SOP class 0x0118 (or 0x0122 on
another SOP class's context), not its well-known instance 0x0117, an Action Type other
than 1 0x0123, no dataset / no Transaction UID / no or an empty Referenced SOP Sequence
/ an item without valid UIDs 0x0115, a calling AE without ``[[commitment.peer]]``
0x0110 with an Error Comment, too many items, pending transactions or a disk below
``output.min_free`` 0x0213.  The dataset is held in memory while it arrives, bounded by
``commitment.max_items`` (``MAX_ITEM_BYTES`` each).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from dcmrecvd.events import body
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.serve.commitment_check import Commitment
from dcmrecvd.serve.receiving import Drained, Outcome, Sink
from dcmrecvd.serve.services import Call, Peer, Send
from dcmrecvd.store.commitment_store import Conflict, Full
from dcmrecvd.wire import commitment_codec as codec
from dcmrecvd.wire import dimse, uids
from dcmrecvd.wire.status import Status

#: The most one item may take in the dataset (two 64-character UIDs, headers, and room
#: for an optional element or two): the bound on what an N-ACTION's dataset is allowed.
MAX_ITEM_BYTES = 256
#: ...plus the Transaction UID and whatever else the top level holds.
MAX_OVERHEAD_BYTES = 64 * 1024


class ActionSink:
    """Collects an N-ACTION's dataset (bounded), then reads and keeps the request."""

    def __init__(self, commitment: Commitment, peer: Peer, explicit: bool) -> None:
        self.commitment = commitment
        self.peer = peer
        self.explicit = explicit
        settings = commitment.runtime().config.commitment
        self.max_items = settings.max_items
        self.max_pending = settings.max_pending
        self.cap = settings.max_items * MAX_ITEM_BYTES + MAX_OVERHEAD_BYTES
        self.data = bytearray()
        self.received = 0
        self.too_big = False
        #: Once kept: the request, and whether it is new (not a repeat of a pending one).
        self.request: codec.ActionRequest | None = None
        self.new = False

    def write(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.too_big:
            return
        if len(self.data) + len(chunk) > self.cap:
            self.too_big, self.data = True, bytearray()  # drained from now on: memory stays bounded
            return
        self.data += chunk

    def flush(self) -> None:
        pass

    def finish(self) -> Outcome:
        if self.too_big:
            return Outcome(
                Status.RESOURCE_LIMITATION, f"more than {self.max_items} items (commitment.max_items)"
            )
        data, self.data = bytes(self.data), bytearray()
        try:
            request = codec.parse_action(data, self.explicit, self.max_items)
        except codec.ActionError as exc:
            return Outcome(Status(exc.status), str(exc))
        del data
        peer = self.peer
        try:
            _tx, self.new = self.commitment.store.add(
                request.transaction_uid,
                peer.calling,
                peer.called,
                peer.host,
                request.items,
                time.time(),
                self.max_pending,
            )
        except Full:
            return Outcome(
                Status.RESOURCE_LIMITATION, "too many transactions pending (commitment.max_pending)"
            )
        except Conflict:
            return Outcome(Status.PROCESSING_FAILURE, "Transaction UID pending with other instances")
        except (sqlite3.Error, OSError) as exc:
            return Outcome(Status.PROCESSING_FAILURE, f"cannot keep the request: {exc}")
        self.request = request
        return Outcome(Status.SUCCESS)

    def discard(self) -> None:
        self.data = bytearray()


class StorageCommitment:
    command_fields = frozenset({dimse.N_ACTION_RQ})

    def sink(self, peer: Peer, call: Call) -> Sink:
        context = call.context
        commitment = peer.commitment
        refusal = _refusal(peer, call)
        if refusal is not None:
            return refusal
        assert commitment is not None  # _refusal says so otherwise
        return ActionSink(commitment, peer, context.transfer_syntax != uids.IMPLICIT_LE)

    def answer(self, peer: Peer, call: Call, outcome: Outcome, sink: Sink, send: Send) -> None:
        status = outcome.status
        send(status, outcome.error if status.is_failure else "")
        METRICS.commitment_requests.labels(
            "accepted" if status == Status.SUCCESS else f"0x{int(status):04X}"
        ).inc()
        request = sink.request if isinstance(sink, ActionSink) else None
        if status != Status.SUCCESS or request is None:
            peer.log.warning(
                "commitment.refused", status=f"0x{int(status):04X}", reason=outcome.error, bytes=sink.received
            )
            return
        assert isinstance(sink, ActionSink) and peer.commitment is not None
        peer.log.info(
            "commitment.requested",
            transaction_uid=request.transaction_uid,
            items=len(request.items),
            repeated=not sink.new,
        )
        if sink.new:
            if peer.events is not None:
                peer.events(_event(peer, request))
            peer.commitment.wake()


def _refusal(peer: Peer, call: Call) -> Drained | None:
    """The answer to an N-ACTION known from its command alone (None: read its dataset)."""
    command, context = call.command, call.context
    if context.abstract_syntax != codec.SOP_CLASS:
        return Drained(Status.SOP_CLASS_NOT_SUPPORTED, "N-ACTION on a context that is not Storage Commitment")
    if command.requested_sop_class_uid != codec.SOP_CLASS:
        return Drained(
            Status.NO_SUCH_SOP_CLASS, "Requested SOP Class UID is not Storage Commitment Push Model"
        )
    if command.requested_sop_instance_uid != codec.SOP_INSTANCE:
        return Drained(
            Status.INVALID_OBJECT_INSTANCE, f"Requested SOP Instance UID must be {codec.SOP_INSTANCE}"
        )
    if command.action_type_id != 1:
        return Drained(Status.NO_SUCH_ACTION, "Action Type ID must be 1 (request storage commitment)")
    if not command.has_dataset:
        return Drained(Status.INVALID_ARGUMENT_VALUE, "N-ACTION without its dataset")
    commitment = peer.commitment
    if commitment is None:
        return Drained(Status.PROCESSING_FAILURE, "Storage Commitment unavailable here (no ack journal)")
    if commitment.peer(peer.calling) is None:
        peer.log.warning("commitment.unknown_peer", calling_aet=peer.calling)
        return Drained(Status.PROCESSING_FAILURE, f"AE '{peer.calling}' has no [[commitment.peer]] here")
    if not peer.rx.disk.has_room(fresh=True):  # a promise: not on a sample a second old
        return Drained(Status.RESOURCE_LIMITATION, "disk below output.min_free")
    return None


def _event(peer: Peer, request: codec.ActionRequest) -> dict[str, Any]:
    tx = body.TransactionFacts(
        peer.called, peer.calling, peer.host, request.transaction_uid, len(request.items)
    )
    return body.commitment_requested(tx, peer.clock())


SERVICE = StorageCommitment()
