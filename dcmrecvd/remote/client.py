"""One outgoing association: the socket driver of ``wire.requestor``.

Connect (under ``connect_timeout``), TLS with our client certificate, the
A-ASSOCIATE-RQ and its answer (under ``acse_timeout``), then requests one at a
time, each answered within ``dimse_timeout`` or the association is aborted.
A C-STORE streams the stored file's dataset from the file as it is on disk:
``os.sendfile`` on plain TCP (no byte through Python), reads into one buffer
under TLS; nothing is decoded, so what arrives at the remote is what arrived
here.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from dcmrecvd.remote.peers import Remote
from dcmrecvd.wire import dimse, part10, requestor
from dcmrecvd.wire.negotiation import AcceptedContext
from dcmrecvd.wire.requestor import Proposal, Requestor
from dcmrecvd.wire.upper_layer import ProtocolError

VERIFICATION = "1.2.840.10008.1.1"
#: Datasets up to this size are read once and sent gathered (see ``_send_dataset``).
GATHER_MAX = 8 << 20
#: Buffers per sendmsg (Linux's IOV_MAX is 1024).
IOV_BATCH = 512
#: Dataset bytes per PDU when the remote sets no limit.
UNLIMITED_PDU = 1 << 20


class AssociationFailed(Exception):
    """No association: ``why`` is unreachable, rejected (``result``: 1 permanent, 2
    transient), aborted, or no-context (accepted, but not one presentation context)."""

    def __init__(self, why: str, detail: str, result: int = 0) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why
        self.result = result


class NoContext(ValueError):
    """The remote accepted no presentation context for this object's SOP class and
    transfer syntax (an answer of its own: the object is not sent)."""


class OutboundAssociation:
    """An established association to a remote; requests are sent one at a time."""

    def __init__(self, sock: socket.socket, core: Requestor, accepted: requestor.Accepted, remote: Remote):
        self.sock = sock
        self.core = core
        self.contexts = accepted.contexts
        self.remote = remote
        room = accepted.peer_max_pdu or UNLIMITED_PDU
        #: Dataset bytes per P-DATA-TF PDU (the PDV header takes 6 of the remote's maximum).
        self.chunk = max(room - 6, 1)
        self._message_id = 0
        self.is_aborted = False
        #: When it was negotiated (monotonic): what it accepted is what the remote said then.
        self.opened = time.monotonic()

    @classmethod
    def open(
        cls,
        remote: Remote,
        offered: list[Proposal],
        tls: ssl.SSLContext | None,
        roles: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> OutboundAssociation:
        try:
            sock = socket.create_connection((remote.host, remote.port), timeout=remote.connect_timeout)
        except OSError as exc:
            raise AssociationFailed("unreachable", str(exc)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(remote.acse_timeout)
            if tls is not None:
                server_name = remote.tls.server_name if remote.tls is not None else ""
                sock = tls.wrap_socket(sock, server_hostname=server_name or remote.host)
            core = Requestor(offered)
            sock.sendall(
                requestor.associate_rq(remote.calling_aet, remote.ae_title, offered, remote.max_pdu, roles)
            )
            answer = cls._await(sock, core, (requestor.Accepted, requestor.Rejected, requestor.Aborted))
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            sock.close()
            raise AssociationFailed("aborted", str(exc) or type(exc).__name__) from None
        if isinstance(answer, requestor.Rejected):
            sock.close()
            raise AssociationFailed(
                "rejected",
                f"result {answer.result}, source {answer.source}, reason {answer.reason}",
                answer.result,
            )
        if isinstance(answer, requestor.Accepted) and not answer.contexts:  # nothing we can use
            sock.sendall(core.abort())
            sock.close()
            raise AssociationFailed("no-context", "no presentation context accepted")
        if not isinstance(answer, requestor.Accepted):
            sock.close()
            raise AssociationFailed("aborted", "aborted while negotiating")
        sock.settimeout(remote.dimse_timeout)
        return cls(sock, core, answer, remote)

    @staticmethod
    def _await(sock: socket.socket, core: Requestor, kinds: tuple[type, ...]) -> requestor.Event:
        """Read until the core produces an event of ``kinds`` (others before it are dropped)."""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("connection closed by the remote")
            for event in core.feed(data):
                if isinstance(event, kinds):
                    return event
                if isinstance(event, requestor.Aborted):
                    raise ConnectionAbortedError(f"aborted by the remote ({event.source}, {event.reason})")

    @property
    def is_established(self) -> bool:
        return self.core.state is requestor.State.ESTABLISHED and not self.is_aborted

    def _context_for(self, sop_class: str, transfer_syntax: str) -> AcceptedContext:
        for context in self.contexts.values():
            if context.abstract_syntax == sop_class and context.transfer_syntax == transfer_syntax:
                return context
        raise NoContext(f"no accepted presentation context for {sop_class} in {transfer_syntax}")

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _request(self, send: Callable[[], None]) -> dimse.Response:
        """Send a request (``send()``), wait for its response; abort on any failure."""
        try:
            send()
            event = self._await(self.sock, self.core, (requestor.Response,))
        except (OSError, ProtocolError) as exc:
            self.abort()
            raise AssociationFailed("aborted", str(exc) or type(exc).__name__) from None
        assert isinstance(event, requestor.Response)
        return event.command

    def echo(self) -> int:
        """C-ECHO; its status."""
        context = next((c for c in self.contexts.values() if c.abstract_syntax == VERIFICATION), None)
        if context is None:
            raise NoContext("Verification was not accepted")
        command = dimse.encode_request(dimse.C_ECHO_RQ, self._next_id(), VERIFICATION)
        return self._request(lambda: self._send_command(context.context_id, command)).status

    def store(self, path: Path) -> dimse.Response:
        """C-STORE of a stored Part 10 file, its dataset streamed as it is; the response."""
        with open(path, "rb") as f:
            meta = part10.read_meta(f.read(part10.META_READ))
            size = os.fstat(f.fileno()).st_size
            context = self._context_for(meta.sop_class_uid, meta.transfer_syntax_uid)
            command = dimse.encode_request(
                dimse.C_STORE_RQ, self._next_id(), meta.sop_class_uid, meta.sop_instance_uid, has_dataset=True
            )

            def send() -> None:
                self._send_command(context.context_id, command)
                self._send_dataset(context.context_id, f.fileno(), meta.dataset_offset, size)

            return self._request(send)

    def accepts(self, sop_class: str, transfer_syntax: str) -> bool:
        return any(
            c.abstract_syntax == sop_class and c.transfer_syntax == transfer_syntax
            for c in self.contexts.values()
        )

    def proposed(self, sop_class: str, transfer_syntax: str) -> bool:
        """Whether this association's A-ASSOCIATE-RQ offered the pair (if not, a newer
        association may get it accepted)."""
        return any(
            p.abstract_syntax == sop_class and transfer_syntax in p.transfer_syntaxes
            for p in self.core.offered.values()
        )

    def store_encoded(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes
    ) -> dimse.Response:
        """C-STORE of a dataset already encoded in ``transfer_syntax`` (a converted object)."""
        context = self._context_for(sop_class, transfer_syntax)
        command = dimse.encode_request(
            dimse.C_STORE_RQ, self._next_id(), sop_class, sop_instance, has_dataset=True
        )

        def send() -> None:
            self._send_command(context.context_id, command)
            self._send_bytes(context.context_id, data)

        return self._request(send)

    def event_report(
        self, sop_class: str, sop_instance: str, event_type: int, dataset: Callable[[str], bytes]
    ) -> dimse.Response:
        """N-EVENT-REPORT of ``event_type`` on the context accepted for ``sop_class``;
        ``dataset(transfer_syntax)`` encodes its dataset in the syntax that context took."""
        context = next((c for c in self.contexts.values() if c.abstract_syntax == sop_class), None)
        if context is None:
            raise NoContext(f"no accepted presentation context for {sop_class}")
        body = dataset(context.transfer_syntax)
        command = dimse.encode_request(
            dimse.N_EVENT_REPORT_RQ,
            self._next_id(),
            sop_class,
            sop_instance,
            has_dataset=True,
            event_type_id=event_type,
        )

        def send() -> None:
            self._send_command(context.context_id, command)
            self._send_bytes(context.context_id, body)

        return self._request(send)

    def _send_bytes(self, context_id: int, data: bytes) -> None:
        """A dataset held in memory, in PDUs the remote accepts."""
        view = memoryview(data)
        offset = 0
        while True:
            piece = view[offset : offset + self.chunk]
            offset += len(piece)
            last = offset >= len(data)
            self.sock.sendall(requestor.data_pdu_header(context_id, len(piece), command=False, last=last))
            self.sock.sendall(piece)
            if last:
                return

    def _send_command(self, context_id: int, command: bytes) -> None:
        self.sock.sendall(
            requestor.data_pdu_header(context_id, len(command), command=True, last=True) + command
        )

    def _send_dataset(self, context_id: int, fd: int, offset: int, size: int) -> None:
        """The dataset in PDUs the remote accepts.  On plain TCP a dataset up to
        ``GATHER_MAX`` is read once and its PDUs (headers and slices of it) go out in one
        gathered ``sendmsg``: a 0.5 MB CT in 16 KiB PDUs is 64 writes otherwise, whose
        per-call cost was a third of the forwarder's CPU; a larger one: each PDU's header
        queued (MSG_MORE), its data by ``sendfile`` from the file."""
        plain = not isinstance(self.sock, ssl.SSLSocket)
        if plain and size - offset <= GATHER_MAX:
            data = memoryview(os.pread(fd, size - offset, offset))
            self._sendmsg_all(list(self._pdus(context_id, data)))
            return
        while True:
            n = min(self.chunk, size - offset)
            last = offset + n >= size
            header = requestor.data_pdu_header(context_id, n, command=False, last=last)
            if plain:
                self.sock.sendall(header, socket.MSG_MORE if n else 0)
                self._sendfile(fd, offset, n)
            else:
                self.sock.sendall(header + os.pread(fd, n, offset))
            offset += n
            if last:
                return

    def _pdus(self, context_id: int, data: memoryview) -> Iterator[bytes | memoryview]:
        """Header, piece, header, piece... of ``data`` in P-DATA-TF PDUs."""
        pos = 0
        while True:
            n = min(self.chunk, len(data) - pos)
            last = pos + n >= len(data)
            yield requestor.data_pdu_header(context_id, n, command=False, last=last)
            yield data[pos : pos + n]
            pos += n
            if last:
                return

    def _sendmsg_all(self, parts: list[bytes | memoryview]) -> None:
        """Every byte of ``parts``, gathered (at most ``IOV_BATCH`` buffers a call)."""
        while parts:
            sent = self.sock.sendmsg(parts[:IOV_BATCH])
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if sent:
                parts[0] = memoryview(parts[0])[sent:]

    def _sendfile(self, fd: int, offset: int, n: int) -> None:
        while n > 0:
            sent = os.sendfile(self.sock.fileno(), fd, offset, n)
            if sent == 0:
                raise ConnectionResetError("connection closed while sending")
            offset += sent
            n -= sent

    def release(self) -> None:
        """A-RELEASE; the socket is closed whatever the remote answers."""
        try:
            if self.is_established:
                self.sock.settimeout(self.remote.acse_timeout)
                self.sock.sendall(self.core.release())
                self._await(self.sock, self.core, (requestor.Released,))
        except (OSError, ProtocolError):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """A-ABORT and close (a request went wrong: its state is unknown)."""
        self.is_aborted = True
        try:
            self.sock.sendall(self.core.abort())
        except OSError:
            pass
        self.sock.close()
