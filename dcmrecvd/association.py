"""One association, start to end, on its own thread: the socket driver of ``upper_layer``.

What is here is I/O and time: the PROXY header, the TLS handshake, ARTIM and
the DIMSE timeout, ``recv_into`` one receive buffer, feeding the protocol core,
sending what it returns.  The protocol rules are in ``upper_layer``; what
happens to a dataset is in ``receiving``; how a file becomes durable is in
``storage``.  The C-STORE response is sent only after its object is durable.
Any protocol violation aborts the association, removes the partial object,
and touches nothing else.
"""

from __future__ import annotations

import datetime as dt
import itertools
import mmap
import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from dcmrecvd import dimse, negotiation, pdu, proxy_protocol, tls
from dcmrecvd.buffers import BufferPool
from dcmrecvd.metrics import METRICS
from dcmrecvd.receiving import DISK_LOW, Destination, Drained, Outcome, Sink, sink_for
from dcmrecvd.runtime import Runtime, Stats
from dcmrecvd.status import Status, status_for_error
from dcmrecvd.storage import Writer
from dcmrecvd.upper_layer import (
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

#: The receive buffer of an established association: many PDUs per read.
BUFFER_SIZE = 1 << 20
#: The buffer of a connection that has not negotiated yet: enough for a usual
#: A-ASSOCIATE-RQ (a larger one is read in pieces), so that idle or hostile
#: connections cost a few KiB, not a MiB each.
INITIAL_BUFFER_SIZE = 16 * 1024
_ids = itertools.count(1)
#: Receive buffers of established associations, shared by all of them.
RECEIVE_BUFFERS = BufferPool(BUFFER_SIZE, keep=8)

Clock = Callable[[], dt.datetime]


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


def _handshake_by(sock: ssl.SSLSocket, deadline: float) -> None:
    """Complete a TLS handshake before ``deadline`` (monotonic), else TimeoutError."""
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake not complete within the ACSE timeout")
            poller = select.poll()
            poller.register(sock.fileno(), events)
            poller.poll(left * 1000)
    finally:
        sock.setblocking(True)


def next_association_id() -> int:
    """Process-wide association numbers, for correlating log lines."""
    return next(_ids)


@dataclass(slots=True)
class Request:
    """A request whose dataset is arriving: what to answer, and where its bytes go."""

    command: dimse.Command
    context: negotiation.AcceptedContext
    started: float
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
        self.buffers = buffers
        self.clock = clock
        #: Where an acknowledged object's ``object.stored`` goes (the outbox), if anywhere.
        self.events = events
        self.id = next_association_id()
        self.core = UpperLayer()
        #: The receive buffer: small until the association is accepted, then a pooled one.
        self._buffer: bytearray | memoryview = bytearray(INITIAL_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._pooled: mmap.mmap | None = None
        self._quickack = hasattr(socket, "TCP_QUICKACK")
        self.contexts: dict[int, negotiation.AcceptedContext] = {}
        self.calling = ""
        self.called = ""
        self.request: Request | None = None
        self.writer: Writer | None = None
        #: Requests complete and not yet answered, in order; answered together once their
        #: objects are durable (see ``_answer_all``).  At most ``window`` of them.
        self.answers: list[tuple[Request, Outcome]] = []
        #: Requests the peer may have outstanding: the negotiated asynchronous operations
        #: window, 1 without one.
        self.window = 1
        self.log = log.bind(assoc_id=self.id, peer=peer)
        #: True while this connection holds one of the server's association slots;
        #: released exactly once, in ``run``'s finally, whatever path ends it.
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
            if self.runtime.config.network.proxy_protocol != "off" and not self._proxy_header():
                return
            if self.runtime.tls is not None and not self._handshake(self.runtime.tls):
                return
            outcome = self._serve()
        except PeerClosed as exc:
            if self.core.requested:
                self.log.warning("assoc.aborted", reason=f"peer vanished: {exc}")
            else:  # a port probe or health check: connected and closed without a word
                self.log.debug("conn.closed", reason="closed before an A-ASSOCIATE-RQ")
        except TimeoutError:
            if self.core.state is State.ESTABLISHED:
                self.log.warning("assoc.aborted", reason="timeout waiting for the peer")
                self._send_quietly(self.core.abort())
            else:  # ARTIM expired before a whole A-ASSOCIATE-RQ: close, no A-ABORT (PS3.8 AA-2)
                self.log.warning("assoc.aborted", reason="timeout: no complete A-ASSOCIATE-RQ")
        except ProtocolError as exc:
            self.log.warning("assoc.aborted", reason=str(exc))
            self._send_quietly(self.core.abort(exc.reason))
        except OSError as exc:
            self.log.warning("assoc.aborted", reason=f"network error: {exc}")
        except Exception:  # a bug must not take the daemon down
            self.log.exception("assoc.aborted", reason="internal error")
            self._send_quietly(self.core.abort())
        finally:
            self._end_pending()
            self._drop_request()
            if self.writer is not None:
                self.writer.close()
            self._release_buffer()  # after the request: no view into the buffer is left
            try:
                self.sock.close()
            except OSError:
                pass
            if self.admitted:
                self.stats.add(active=-1)
            if self.holds_slot:
                self.holds_slot = False
                self.release_slot(self.host)
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
            if self.answers and not self._more_to_read():
                self._answer_all()

    def _feed(self, data: memoryview | bytes) -> list[Event]:
        """The core's events for ``data``; on a violation, first act on those before it."""
        try:
            return self.core.feed(data)
        except ProtocolError as exc:
            self._dispatch(exc.events)
            self._answer_all()  # what was complete before the violation is still answered
            raise

    def _more_to_read(self) -> bool:
        """Has the peer already sent more (a pipelining sender)?  Then its requests are
        made durable and answered together; a sender that waits is answered at once."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _receive(self) -> memoryview:
        """One read into the receive buffer, under ARTIM before the association exists."""
        if self.core.state is State.AWAITING_REQUEST:
            left = self.artim - time.monotonic()
            if left <= 0:
                raise TimeoutError("ARTIM expired")
            self.sock.settimeout(left)
        try:
            got = self.sock.recv_into(self._view)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise PeerClosed(str(exc)) from None
        if got == 0:
            raise PeerClosed("connection closed by peer")
        if self._quickack:
            self._rearm_quickack()
        return self._view[:got]

    def _rearm_quickack(self) -> None:
        """ACK at once what we just read, instead of up to 40 ms later.

        Why: a sender with Nagle on (DCMTK's tools unless TCP_NODELAY=1 is in
        their environment) holds its last small segment of a message until its
        previous data is acknowledged, and Linux delays that ACK; each C-STORE
        then waits for the delayed-ACK timer.  The kernel leaves quick-ACK mode
        by itself, so it is re-armed after every read (one setsockopt, ~1 us;
        cheaper than knowing which read ends a message).
        """
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # not TCP (a socketpair in tests): nothing to re-arm
            self._quickack = False

    def _dispatch(self, events: list[Event]) -> str:
        """Act on the core's events in order; returns how the association ended, or ""."""
        for event in events:
            if type(event) is Pdv:
                request = self.request
                assert request is not None  # the core allows a dataset only after its command
                request.sink.write(event.data)
                if event.is_last:
                    self.request = None
                    self._queue_answer(request, request.sink.finish())
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
                self._answer_all()
                if self.writer is not None:
                    self.writer.close()  # before the peer hears we are done
                self.sock.sendall(self.core.release())
                return "released"
            elif type(event) is Abort:
                self.log.warning("assoc.aborted", reason="aborted by peer")
                return "aborted"
        return ""

    def _release_buffer(self) -> None:
        """Give the large buffer back; every view of it must be dropped by now."""
        pooled, self._pooled = self._pooled, None
        self._view.release()
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        if pooled is not None:
            self.buffers.give(pooled)

    def _take_slot(self) -> bool:
        self.holds_slot = self.admit(self.host)
        return self.holds_slot

    def _proxy_header(self) -> bool:
        """Read the PROXY header the balancer must send first; False: connection refused."""
        network = self.runtime.config.network
        if not self.runtime.trusts_proxy(self.host):
            self.log.warning("conn.proxy_rejected", reason=f"{self.host} is not in network.trusted_proxies")
            return False
        try:
            proxied = proxy_protocol.read_header(self.sock, network.proxy_protocol, self.artim)
        except proxy_protocol.ClosedBeforeHeader:  # a port probe or a TCP health check
            self.log.debug("conn.closed", reason="closed before a PROXY header")
            return False
        except proxy_protocol.ProxyHeaderError as exc:
            self.log.warning("conn.proxy_rejected", reason=str(exc))
            return False
        except TimeoutError:
            self.log.warning("conn.proxy_rejected", reason="no complete PROXY header within the ACSE timeout")
            return False
        if proxied.host is not None:
            balancer = self.peer
            self.host = proxied.host
            self.peer = (
                f"[{proxied.host}]:{proxied.port}"
                if ":" in proxied.host
                else f"{proxied.host}:{proxied.port}"
            )
            self.log = self.log.bind(peer=self.peer, proxy=balancer)
        return True

    def _end_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.negotiated()

    def _handshake(self, context: ssl.SSLContext) -> bool:
        """TLS handshake on this thread; the ACSE timeout bounds it as a whole, like ARTIM.

        Why not a socket timeout: that bounds each read, and a peer trickling its
        ClientHello a byte at a time would hold the connection for ever.
        """
        try:
            wrapped = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            _handshake_by(wrapped, self.artim)
        except (ssl.SSLError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            self.log.warning("tls.handshake_failed", reason=reason)
            return False
        self.sock = wrapped
        self.log = self.log.bind(**tls.describe_peer(wrapped))
        return True

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
        config = self.runtime.config.network
        try:
            request = negotiation.decode_request(raw)
        except negotiation.BadRequest as exc:
            raise ProtocolError(str(exc), pdu.REASON_INVALID_PARAMETER) from None
        self.calling, self.called = request.calling_ae_title, request.called_ae_title
        self.rx = rx = self.runtime.receiver_for(self.called)
        self.log = self.log.bind(calling_aet=self.calling, called_aet=self.called, ae=rx.name)
        decision = rx.access.decide(self.calling, self.called, self.host)
        why = ""
        decided: dict[str, object] = {}
        if not decision.allowed:
            why = "access denied"
            decided = {"rule": decision.rule or "default", "rule_file": rx.access.source or None}
            outcome = negotiation.reject((0x01, 0x01, decision.reason))
        elif not self._take_slot():
            outcome = negotiation.reject(negotiation.REJECT_LOCAL_LIMIT)
        elif not rx.disk.has_room():
            why = DISK_LOW
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
        # Logged before the answer goes out, so that the log is in causal order for anyone
        # who reads it after hearing the answer.
        if not outcome.accepted:
            assert outcome.reject is not None
            self.stats.add(rejected=1)
            reason = why or negotiation.REJECT_TEXT.get(outcome.reject, "rejected")
            METRICS.rejected.labels(reason).inc()
            self.log.warning(
                "assoc.rejected",
                reason=reason,
                **decided,
                result=outcome.reject[0],
                source=outcome.reject[1],
                diagnostic=outcome.reject[2],
            )
            self.sock.sendall(self.core.reject(outcome.pdu))
            return False
        METRICS.accepted.inc()
        fields: dict[str, object] = {"contexts": len(outcome.contexts)}
        if self.runtime.config.logging.verbose_pc:
            fields["presentation_contexts"] = [
                f"{c.context_id}:{c.abstract_syntax}:{c.transfer_syntax}" for c in outcome.contexts.values()
            ]
        self.log.info("assoc.accepted", **fields)
        self.sock.sendall(self.core.accept(outcome.pdu, outcome.contexts.keys(), request.peer_max_pdu))
        self.contexts = outcome.contexts
        self.window = outcome.window
        self._grow_buffer()
        self.writer = Writer(rx.store)
        self.admitted = True
        self.stats.add(active=1, associations=1)
        timeout = config.dimse_timeout
        self.sock.settimeout(timeout or None)
        return True

    def _grow_buffer(self) -> None:
        """Move to a large pooled buffer: the small one held nothing that is still needed
        (the core copies what it keeps across reads)."""
        self._view.release()
        self._pooled = self.buffers.take()
        self._buffer = memoryview(self._pooled)
        self._view = self._buffer

    # ------------------------------------------------------------------ DIMSE

    def _command(self, context_id: int, command: dimse.Command) -> None:
        context = self.contexts[context_id]
        started = time.monotonic()
        field = command.command_field
        if field == dimse.C_ECHO_RQ:
            self._answer_all()  # responses keep request order
            self._respond(context, dimse.C_ECHO_RSP, command, Status.SUCCESS)
            self.log.info("echo", msg_id=command.message_id)
            if command.has_dataset:  # not ours to read: drained, not answered again
                self.request = Request(command, context, started, Drained())
            return
        if field == dimse.C_CANCEL_RQ:
            return
        sink: Sink
        if field != dimse.C_STORE_RQ:
            sink = Drained(Status.UNRECOGNIZED_OPERATION, f"unsupported command 0x{field:04X}")
        elif not command.has_dataset:
            sink = Drained(Status.CANNOT_UNDERSTAND, "C-STORE without dataset")
        else:
            assert self.writer is not None
            destination = Destination(self.writer, self.rx.scheme, self.rx.disk, self.calling, self.clock)
            sink = sink_for(
                command, context.abstract_syntax, context.transfer_syntax, self.rx.mode, destination, self.log
            )
        request = Request(command, context, started, sink)
        if command.has_dataset:
            self.request = request
        else:
            self._queue_answer(request, sink.finish())

    def _queue_answer(self, request: Request, outcome: Outcome) -> None:
        self.answers.append((request, outcome))
        if len(self.answers) >= self.window:
            self._answer_all()

    def _answer_all(self) -> None:
        """Make every staged object durable (one directory fsync for all of them), then
        answer the requests in order.  A failed sync fails each object it covered."""
        answers, self.answers = self.answers, []
        if not answers:
            return
        if self.writer is not None and self.writer.unsynced:
            try:
                self.writer.sync()
            except OSError as exc:
                answers = [
                    (request, Outcome(status_for_error(exc), str(exc)) if outcome.path else outcome)
                    for request, outcome in answers
                ]
        now = time.monotonic()
        for request, outcome in answers:
            if outcome.commit_started:
                METRICS.commit_seconds.observe(now - outcome.commit_started)
            self._answer(request, outcome)

    def _answer(self, request: Request, outcome: Outcome) -> None:
        """Send the response of a request whose dataset is complete (and durable, if stored)."""
        command = request.command
        if command.command_field == dimse.C_ECHO_RQ:
            return
        received = request.sink.received
        status = outcome.status
        elapsed = time.monotonic() - request.started
        # Counted before the response goes out: a scrape right after it sees the object.
        METRICS.objects.labels(f"0x{int(status):04X}", self.rx.name if self.rx.name != "*" else "any").inc()
        METRICS.received.inc(received)
        METRICS.store_seconds.observe(elapsed)
        comment = outcome.error if status.is_failure else ""
        self._respond(request.context, command.command_field | 0x8000, command, status, comment)
        fields = {
            "sop_class_uid": command.affected_sop_class_uid,
            "sop_instance_uid": command.affected_sop_instance_uid,
            "status": f"0x{int(status):04X}",
            "bytes": received,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if status == Status.SUCCESS:
            self.stats.add(stored=1, bytes=received)
            if self.rx.title:
                self.stats.stored_for(self.rx.title)
            self.log.info("store.completed", path=outcome.path or None, **fields)
            if self.events is not None and outcome.path:  # after the response: never delays it
                self.events(self._stored_event(request, outcome))
        else:
            self.stats.add(failed=1)
            self.log.error("store.failed", reason=outcome.error, **fields)

    def _stored_event(self, request: Request, outcome: Outcome) -> dict[str, Any]:
        command = request.command
        return {
            "event": "object.stored",
            "called_aet": self.called,
            "calling_aet": self.calling,
            "peer": self.peer,
            "sop_class_uid": command.affected_sop_class_uid,
            "sop_instance_uid": command.affected_sop_instance_uid,
            **outcome.tags,
            "path": outcome.path,
            "directory": os.path.dirname(outcome.path),
            "size": outcome.size,
            "transfer_syntax": request.context.transfer_syntax,
            "time": self.clock().isoformat(timespec="microseconds"),
        }

    def _respond(
        self,
        context: negotiation.AcceptedContext,
        command_field: int,
        request: dimse.Command,
        status: Status,
        comment: str = "",
    ) -> None:
        response = dimse.encode_response(
            command_field,
            request.message_id,
            int(status),
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            comment,
        )
        self.sock.sendall(self.core.respond(context.context_id, response))

    def _drop_request(self) -> None:
        """Remove the partial object of a request that will never complete."""
        request, self.request = self.request, None
        if request is None:
            return
        request.sink.discard()
        if request.command.command_field == dimse.C_STORE_RQ:
            self.log.warning(
                "store.incomplete",
                sop_instance_uid=request.command.affected_sop_instance_uid,
                bytes=request.sink.received,
            )
