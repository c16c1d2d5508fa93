"""One association, start to end, on its own thread: the socket driver of ``upper_layer``.

What is here is I/O and time: reading into the receive buffer, feeding the
protocol core, dispatching its events, sending what it returns, ARTIM and the
DIMSE timeout.  Everything else is delegated: the connection's prelude (PROXY
header, TLS) to ``prelude``; whether it becomes an association to
``admission``; what a request means to its service (``services``); what
happens to a dataset to ``receiving``; the order and durability of answers to
``answer_window``; how a file becomes durable to ``store.storage``.  A response
is sent only after its object is durable.  Any protocol violation aborts the
association, removes the partial object, and touches nothing else.
"""

from __future__ import annotations

import datetime as dt
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from dcmrecvd.serve import admission, prelude, services
from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.answer_window import AnswerWindow
from dcmrecvd.serve.commitment_check import Commitment
from dcmrecvd.serve.receive_buffer import RECEIVE_BUFFERS, PeerClosed, ReceiveBuffer, more_waiting
from dcmrecvd.serve.receiving import Outcome, Sink
from dcmrecvd.serve.runtime import Runtime, Stats
from dcmrecvd.serve.services import Call, Service
from dcmrecvd.store.buffers import BufferPool
from dcmrecvd.store.storage import Writer
from dcmrecvd.wire import dimse, negotiation, pdu
from dcmrecvd.wire.status import Status
from dcmrecvd.wire.upper_layer import (
    Abort,
    AssociateRequest,
    Command,
    Event,
    Pdv,
    ProtocolError,
    ReleaseRequest,
    State,
    UpperLayer,
)

log = structlog.get_logger("dcmrecvd")

_ids = itertools.count(1)
Clock = Callable[[], dt.datetime]


def next_association_id() -> int:
    """Process-wide association numbers, for correlating log lines."""
    return next(_ids)


@dataclass(slots=True)
class Request:
    """A request in progress: the call, the service answering it, where its dataset goes."""

    call: Call
    service: Service
    sink: Sink


class Association:
    """Serves one accepted TCP connection."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        runtime: Runtime,
        stats: Stats,
        *,
        admit: Callable[[str], bool] = lambda host: True,
        release_slot: Callable[[str], None] = lambda host: None,
        negotiated: Callable[[], None] = lambda: None,
        host: str = "",
        buffers: BufferPool = RECEIVE_BUFFERS,
        clock: Clock = dt.datetime.now,
        events: Callable[[dict[str, Any]], None] | None = None,
        ack: AckJournal | None = None,
        commitment: Commitment | None = None,
    ) -> None:
        self.sock = sock
        self.peer = peer
        #: The address access rules and per-peer limits see: the TCP peer's, or the
        #: client's from a PROXY header.
        self.host = host or peer.rsplit(":", 1)[0]
        self.runtime = runtime
        #: The AE this association was called as (chosen at negotiation; the default AE until then).
        self.rx = runtime.receiver_for("")
        self.stats = stats
        self.admit = admit
        self.release_slot = release_slot
        self.negotiated = negotiated
        self.clock = clock
        #: Where an acknowledged object's ``object.stored`` goes (the outbox), if anywhere.
        self.events = events
        #: The ack journal (None: the per-file path): see ``ack_journal``.
        self.ack = ack
        #: Storage Commitment (None: not enabled; its context is then never accepted).
        self.commitment = commitment
        self.id = next_association_id()
        self.core = UpperLayer()
        #: The receive buffer: small until the association is accepted, then a pooled one.
        self.buffer = ReceiveBuffer(buffers)
        self.contexts: dict[int, negotiation.AcceptedContext] = {}
        self.calling = ""
        self.called = ""
        self.request: Request | None = None
        self.writer: Writer | None = None
        #: Requests complete and not yet answered, answered in order once durable.
        self.answers: AnswerWindow[Request] = AnswerWindow(self._answer)
        self.log = log.bind(assoc_id=self.id, peer=peer)
        #: True while this connection holds one of the server's association slots;
        #: released exactly once (``_free_slot``), before the last PDU or in ``run``'s finally.
        self.holds_slot = False
        #: True until negotiation is over (accepted, rejected or failed): the server
        #: bounds how many connections may be in that state; told exactly once.
        self.pending = True
        #: True once accepted: counted in the active associations until the end.
        self.admitted = False
        #: PS3.8's ARTIM: the PROXY header, the TLS handshake and the A-ASSOCIATE-RQ must all
        #: arrive within the ACSE timeout of the connection being accepted.
        self.artim = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until release, abort or error; never raises."""
        outcome = "aborted"
        self.artim = time.monotonic() + self.runtime.config.network.acse_timeout
        try:
            arrival = prelude.arrive(self.sock, self.peer, self.host, self.runtime, self.artim, self.log)
            if arrival is None:
                return
            self.sock, self.peer, self.host, self.log = arrival.sock, arrival.peer, arrival.host, arrival.log
            outcome = self._serve()
        except PeerClosed as exc:
            if self.core.requested:
                self.log.warning("assoc.aborted", reason=f"peer vanished: {exc}")
            else:  # a port probe or health check: connected and closed without a word
                self.log.debug("conn.closed", reason="closed before an A-ASSOCIATE-RQ")
        except TimeoutError:
            if self.core.state is State.ESTABLISHED:
                self.log.warning("assoc.aborted", reason="timeout waiting for the peer")
                self._free_slot()
                self._send_quietly(self.core.abort())
            else:  # ARTIM expired before a whole A-ASSOCIATE-RQ: close, no A-ABORT (PS3.8 AA-2)
                self.log.warning("assoc.aborted", reason="timeout: no complete A-ASSOCIATE-RQ")
        except ProtocolError as exc:
            self.log.warning("assoc.aborted", reason=str(exc))
            self._free_slot()
            self._send_quietly(self.core.abort(exc.reason))
        except OSError as exc:
            self.log.warning("assoc.aborted", reason=f"network error: {exc}")
        except Exception:  # a bug must not take the daemon down
            self.log.exception("assoc.aborted", reason="internal error")
            self._free_slot()
            self._send_quietly(self.core.abort())
        finally:
            self._end_pending()
            self._drop_request()
            self.answers.abandon()
            if self.writer is not None:
                self.writer.close()
            self.buffer.release()  # after the request: no view into the buffer is left
            try:
                self.sock.close()
            except OSError:
                pass
            self._free_slot()
            if outcome == "released":
                self.log.info("assoc.released")

    def _serve(self) -> str:
        """Read, feed the core, act on its events, until the association ends."""
        while True:
            if self.request is not None:
                self.request.sink.flush()  # the views it holds are about to be overwritten
            outcome = self._dispatch(self._feed(self._receive()))
            if outcome:
                return outcome
            if self.answers and not more_waiting(self.sock):
                self.answers.flush()  # a sender that waits is answered at once

    def _feed(self, data: memoryview | bytes) -> list[Event]:
        """The core's events for ``data``; on a violation, first act on those before it."""
        try:
            return self.core.feed(data)
        except ProtocolError as exc:
            self._dispatch(exc.events)
            self.answers.flush()  # what was complete before the violation is still answered
            raise

    def _receive(self) -> memoryview:
        """One read into the receive buffer, under ARTIM before the association exists."""
        if self.core.state is State.AWAITING_REQUEST:
            left = self.artim - time.monotonic()
            if left <= 0:
                raise TimeoutError("ARTIM expired")
            self.sock.settimeout(left)
        return self.buffer.read(self.sock)

    def _dispatch(self, events: list[Event]) -> str:
        """Act on the core's events in order; returns how the association ended, or ""."""
        for event in events:
            if type(event) is Pdv:
                request = self.request
                assert request is not None  # the core allows a dataset only after its command
                request.sink.write(event.data)
                if event.is_last:
                    self.request = None
                    self.answers.add(request, request.sink.finish())
            elif type(event) is Command:
                self._command(event.context_id, event.command)
            elif type(event) is AssociateRequest:
                if not self._negotiate(event.pdu):
                    return "rejected"
                # Bytes that came with the request (a sender that did not wait for the AC).
                outcome = self._dispatch(self._feed(b""))
                if outcome:
                    return outcome
            elif type(event) is ReleaseRequest:
                if self.request is not None:
                    self.log.warning("assoc.release_mid_message")
                    self._drop_request()
                self.answers.flush()
                self.answers.wait_visible(self.log)
                if self.writer is not None:
                    self.writer.close()  # before the peer hears we are done
                self._free_slot()
                self.sock.sendall(self.core.release())
                return "released"
            elif type(event) is Abort:
                self.log.warning("assoc.aborted", reason="aborted by peer")
                return "aborted"
        return ""

    def _take_slot(self) -> bool:
        self.holds_slot = self.admit(self.host)
        return self.holds_slot

    def _free_slot(self) -> None:
        """Give back the slot (and the active count) before the last PDU goes out: once
        the peer has our A-RELEASE-RP, A-ABORT or A-ASSOCIATE-RJ the association no longer
        exists (PS3.8), and a peer that associates again at once must find its slot free."""
        if self.admitted:
            self.admitted = False
            self.stats.add(active=-1)
        if self.holds_slot:
            self.holds_slot = False
            self.release_slot(self.host)

    def _end_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.negotiated()

    def abort(self) -> None:
        """Abort from another thread (drain timeout): the reader wakes with an error."""
        self._send_quietly(pdu.abort_pdu(pdu.SOURCE_USER, 0))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    # ------------------------------------------------------------------ negotiation

    def _negotiate(self, raw: bytes) -> bool:
        """Decide on the A-ASSOCIATE-RQ, log the outcome, then send it; True when accepted."""
        try:
            return self._decide(raw)
        finally:
            self._end_pending()

    def _decide(self, raw: bytes) -> bool:
        decision = admission.decide(raw, self.runtime, self.host, self._take_slot, self.stats, self.log)
        self.calling, self.called, self.rx, self.log = (
            decision.calling,
            decision.called,
            decision.rx,
            decision.log,
        )
        outcome = decision.outcome
        if not outcome.accepted:
            self._free_slot()  # the disk said no after a slot was taken
            self.sock.sendall(self.core.reject(outcome.pdu))
            return False
        self.sock.sendall(self.core.accept(outcome.pdu, outcome.contexts.keys(), decision.peer_max_pdu))
        self.contexts = outcome.contexts
        self.answers.size = outcome.window
        self.answers.writer = self.writer = Writer(decision.rx.store)
        self.answers.ack = self.ack
        self.buffer.grow()
        self.admitted = True
        self.stats.add(active=1, associations=1)
        self.sock.settimeout(self.runtime.config.network.dimse_timeout or None)
        return True

    # ------------------------------------------------------------------ DIMSE

    def _command(self, context_id: int, command: dimse.Command) -> None:
        """A request command: its service gives the sink its dataset streams into; one
        without a dataset is complete at once (answered in request order)."""
        if command.command_field == dimse.C_CANCEL_RQ:
            return  # nothing of ours is cancellable: each request is answered when complete
        call = Call(command, self.contexts[context_id], time.monotonic())
        service = services.for_field(command.command_field)
        request = Request(call, service, service.sink(self, call))
        if command.has_dataset:
            self.request = request
        else:
            self.answers.add(request, request.sink.finish())

    def _answer(self, request: Request, outcome: Outcome) -> None:
        """Let the request's service answer it (its work is complete and durable)."""
        call = request.call

        def send(status: Status, comment: str) -> None:
            response_field = call.command.command_field | 0x8000
            self._respond(call.context, response_field, call.command, status, comment)

        request.service.answer(self, call, outcome, request.sink, send)

    def _respond(
        self,
        context: negotiation.AcceptedContext,
        command_field: int,
        request: dimse.Command,
        status: Status,
        comment: str = "",
    ) -> None:
        if self.core.state is State.CLOSED:
            # The peer aborted in the same bytes as a complete request: its work is done (and
            # durable), but there is no association left to answer on.
            self.log.debug("assoc.unanswered", message_id=request.message_id, status=f"0x{int(status):04X}")
            return
        sop_class, sop_instance, action_type = request.response_fields()
        response = dimse.encode_response(
            command_field, request.message_id, int(status), sop_class, sop_instance, comment, action_type
        )
        self.sock.sendall(self.core.respond(context.context_id, response))

    def _drop_request(self) -> None:
        """Remove the partial object of a request that will never complete."""
        request, self.request = self.request, None
        if request is None:
            return
        request.sink.discard()
        if request.call.command.command_field == dimse.C_STORE_RQ:
            self.log.warning(
                "store.incomplete",
                sop_instance_uid=request.call.command.affected_sop_instance_uid,
                bytes=request.sink.received,
            )
