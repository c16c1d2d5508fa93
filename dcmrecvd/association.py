"""One association, start to end, on its own thread.

Reads the A-ASSOCIATE-RQ under the ACSE timeout, negotiates, then streams
P-DATA: command fragments are gathered (they are small), dataset fragments go
straight from the receive buffer to the object's temp file.  The C-STORE
response is sent only after the object is durably stored.  Any protocol
violation aborts the association, removes the partial object, and touches
nothing else.
"""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import structlog

from dcmrecvd import dimse, naming, negotiation, part10, pdu, proxy_protocol, tls, uids
from dcmrecvd.buffers import BufferPool
from dcmrecvd.config import NetworkConfig
from dcmrecvd.dataset_walk import (
    SERIES_DATE,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    DatasetWalker,
    Malformed,
    text_value,
)
from dcmrecvd.metrics import METRICS
from dcmrecvd.runtime import Runtime, Stats
from dcmrecvd.status import Status, status_for_error
from dcmrecvd.storage import FileExists, PendingFile

log = structlog.get_logger("dcmrecvd")

MAX_COMMAND_SET = 64 * 1024
DISK_LOW = "output directory below output.min_free"
#: Bytes kept in memory while waiting for the dataset's SOP UIDs (and Series Date)
#: before the file is opened; they sit in the first few hundred bytes.
MAX_PREFIX = 1 << 20
_ids = itertools.count(1)
#: Receive buffers of established associations, shared by all of them.
RECEIVE_BUFFERS = BufferPool(pdu.BUFFER_SIZE, keep=8)

Clock = Callable[[], dt.datetime]


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


@dataclass
class Message:
    """A request in progress: its command, and where its dataset is going."""

    command: dimse.Command
    context: negotiation.AcceptedContext
    started: float
    status: Status = Status.SUCCESS
    error: str = ""
    file: PendingFile | None = None
    directory: PurePosixPath | None = None
    #: Checks the dataset's structure as it streams and reads its SOP UIDs;
    #: None once it has refused the dataset (the rest is drained unread).
    walker: DatasetWalker | None = None
    #: The file is opened once the walk is past this top-level tag.
    open_after: int = SOP_INSTANCE_UID
    prefix: bytearray = field(default_factory=bytearray)
    pending: list[memoryview] = field(default_factory=list)
    received: int = 0
    #: Bytes of this object counted against the free-space watermark while on their way.
    disk_counted: int = 0
    store: bool = True


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
        self.id = next_association_id()
        self.reader = pdu.Reader(sock)
        self.reader.before_refill = self._flush_pending
        self.contexts: dict[int, negotiation.AcceptedContext] = {}
        self.calling = ""
        self.called = ""
        self.peer_max_pdu = 0  # as announced by the peer; 0 = no limit
        self.message: Message | None = None
        self.command_buf = bytearray()
        self.command_context = 0
        self.log = log.bind(assoc_id=self.id, peer=peer)
        self.established = False
        self.requested = False
        #: True while this connection holds one of the server's association slots;
        #: released exactly once, in ``run``'s finally, whatever path ends it.
        self.holds_slot = False
        #: True until negotiation is over (accepted, rejected or failed): the server
        #: bounds how many connections may be in that state; told exactly once.
        self.pending = True
        #: The next object's temp file, made ahead (see _make_spare), and how many
        #: objects this association has stored so far.
        self.spare: PendingFile | None = None
        self.spare_dir = PurePosixPath(".")
        self.stored = 0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until release, abort or error; never raises."""
        outcome = "aborted"
        admitted = False
        #: PS3.8's ARTIM: the PROXY header, the TLS handshake and the A-ASSOCIATE-RQ must all
        #: arrive within the ACSE timeout of the connection being accepted.
        self.artim = time.monotonic() + self.runtime.config.network.acse_timeout
        try:
            if self.runtime.config.network.proxy_protocol != "off" and not self._proxy_header():
                return
            if self.runtime.tls is not None and not self._handshake(self.runtime.tls):
                return
            admitted = self._negotiate()
            self._end_pending()
            if admitted:
                outcome = self._serve()
            else:
                outcome = "rejected"
        except pdu.PeerClosed as exc:
            if self.requested:
                self.log.warning("assoc.aborted", reason=f"peer vanished: {exc}")
            else:  # a port probe or health check: connected and closed without a word
                self.log.debug("conn.closed", reason="closed before an A-ASSOCIATE-RQ")
        except TimeoutError:
            if self.established:
                self.log.warning("assoc.aborted", reason="timeout waiting for the peer")
                self._send_quietly(pdu.abort_pdu())
            else:  # ARTIM expired before a whole A-ASSOCIATE-RQ: close, no A-ABORT (PS3.8 AA-2)
                self.log.warning("assoc.aborted", reason="timeout: no complete A-ASSOCIATE-RQ")
        except pdu.ProtocolViolation as exc:
            self.log.warning("assoc.aborted", reason=str(exc))
            self._send_quietly(pdu.abort_pdu(pdu.SOURCE_PROVIDER, exc.reason))
        except OSError as exc:
            self.log.warning("assoc.aborted", reason=f"network error: {exc}")
        except Exception:  # a bug must not take the daemon down
            self.log.exception("assoc.aborted", reason="internal error")
            self._send_quietly(pdu.abort_pdu())
        finally:
            self._end_pending()
            self._drop_message()
            self._drop_spare()
            self.reader.close()  # after the message: no view into the buffer is left
            try:
                self.sock.close()
            except OSError:
                pass
            if admitted:
                self.stats.add(active=-1)
            if self.holds_slot:
                self.holds_slot = False
                self.release_slot(self.host)
            if outcome == "released":
                self.log.info("assoc.released")

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
        deadline = self.artim
        try:
            wrapped = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            _handshake_by(wrapped, deadline)
        except (ssl.SSLError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            self.log.warning("tls.handshake_failed", reason=reason)
            return False
        self.sock = wrapped
        self.reader = pdu.Reader(wrapped)
        self.reader.before_refill = self._flush_pending
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

    def _negotiate(self) -> bool:
        config = self.runtime.config.network
        self.reader.deadline = self.artim
        try:
            return self._negotiate_request(config)
        finally:
            self.reader.deadline = None

    def _negotiate_request(self, config: NetworkConfig) -> bool:
        pdu_type, length = self.reader.header()
        self.requested = True
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise pdu.ProtocolViolation(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                pdu.REASON_UNEXPECTED_PDU if pdu_type <= 7 else pdu.REASON_UNRECOGNIZED_PDU,
            )
        if length > pdu.MAX_ASSOCIATE_RQ:
            raise pdu.ProtocolViolation(f"A-ASSOCIATE-RQ of {length} bytes is too large")
        body = self.reader.read_exact(length)
        try:
            request = negotiation.decode_request(pdu.PDU_HEADER.pack(pdu_type, length) + body)
        except negotiation.BadRequest as exc:
            raise pdu.ProtocolViolation(str(exc), pdu.REASON_INVALID_PARAMETER) from None
        self.calling, self.called = request.calling_ae_title, request.called_ae_title
        self.peer_max_pdu = request.peer_max_pdu
        self.rx = rx = self.runtime.receiver_for(self.called)
        self.log = self.log.bind(calling_aet=self.calling, called_aet=self.called, ae=rx.name)
        decision = rx.access.decide(self.calling, self.called, self.host)
        why = ""
        decided: dict[str, object] = {}
        if not decision.allowed:
            why = "access denied"
            decided = {"rule": decision.rule or "default", "rule_file": rx.access.source or None}
            outcome = negotiation.reject(request, (0x01, 0x01, decision.reason))
        elif not self._take_slot():
            outcome = negotiation.reject(request, negotiation.REJECT_LOCAL_LIMIT)
        elif not rx.disk.has_room():
            why = DISK_LOW
            outcome = negotiation.reject(request, negotiation.REJECT_LOCAL_LIMIT)
        else:
            try:
                outcome = negotiation.negotiate(
                    request,
                    rx.profile,
                    rx.contexts,
                    ae_title=rx.title or config.ae_title,
                    max_pdu=config.max_pdu,
                )
            except Exception as exc:  # pynetdicom's codec on a request it cannot handle
                raise pdu.ProtocolViolation(
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
            self.sock.sendall(outcome.pdu)
            return False
        self.contexts = outcome.contexts
        METRICS.accepted.inc()
        fields: dict[str, object] = {"contexts": len(outcome.contexts)}
        if self.runtime.config.logging.verbose_pc:
            fields["presentation_contexts"] = [
                f"{c.context_id}:{c.abstract_syntax}:{c.transfer_syntax}" for c in outcome.contexts.values()
            ]
        self.log.info("assoc.accepted", **fields)
        self.sock.sendall(outcome.pdu)
        self.established = True
        self.reader.grow(self.buffers)
        self.stats.add(active=1, associations=1)
        return True

    # ------------------------------------------------------------------ data transfer

    def _serve(self) -> str:
        timeout = self.runtime.config.network.dimse_timeout
        self.sock.settimeout(timeout or None)
        reader = self.reader
        while True:
            pdu_type, length = reader.header()
            if pdu_type == pdu.P_DATA_TF:
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ:
                reader.skip(length)
                if self.message is not None:
                    self.log.warning("assoc.release_mid_message")
                    self._drop_message()
                self._drop_spare()  # before the peer hears we are done
                self.sock.sendall(pdu.release_rp_pdu())
                return "released"
            elif pdu_type == pdu.A_ABORT:
                reader.skip(min(length, 4))
                self.log.warning("assoc.aborted", reason="aborted by peer")
                return "aborted"
            elif pdu_type in (pdu.A_ASSOCIATE_RQ, pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ, pdu.A_RELEASE_RP):
                raise pdu.ProtocolViolation(
                    f"unexpected PDU type 0x{pdu_type:02X}", pdu.REASON_UNEXPECTED_PDU
                )
            else:
                raise pdu.ProtocolViolation(
                    f"unrecognised PDU type 0x{pdu_type:02X}", pdu.REASON_UNRECOGNIZED_PDU
                )

    def _p_data(self, length: int) -> None:
        reader = self.reader
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise pdu.ProtocolViolation("P-DATA-TF ends inside a PDV header")
            reader.fill(6)
            item_length, context_id, control = pdu.PDV_HEADER.unpack_from(reader.buf, reader.start)
            reader.start += 6
            remaining -= 6
            data_length = item_length - 2
            if item_length < 2 or data_length > remaining:
                raise pdu.ProtocolViolation(f"PDV length {item_length} exceeds its PDU")
            remaining -= data_length
            if context_id not in self.contexts:
                raise pdu.ProtocolViolation(f"PDV on unknown presentation context {context_id}")
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, data_length, last)
            else:
                self._dataset_fragment(context_id, data_length, last)

    def _command_fragment(self, context_id: int, n: int, last: bool) -> None:
        if self.message is not None:
            raise pdu.ProtocolViolation("command fragment while a dataset is pending")
        if self.command_buf and context_id != self.command_context:
            raise pdu.ProtocolViolation("command fragments on different presentation contexts")
        if len(self.command_buf) + n > MAX_COMMAND_SET:
            raise pdu.ProtocolViolation("command set too large")
        self.command_context = context_id
        self.command_buf += self.reader.read_exact(n)
        if last:
            data = bytes(self.command_buf)
            self.command_buf.clear()
            self._command(context_id, data)

    def _dataset_fragment(self, context_id: int, n: int, last: bool) -> None:
        message = self.message
        if message is None or message.context.context_id != context_id:
            raise pdu.ProtocolViolation("dataset fragment without a matching command")
        reader = self.reader
        while n > 0:
            reader.fill(1)
            k = min(reader.available, n)
            self._data(message, reader.take(k))
            n -= k
        if last:
            self._finish(message)

    # ------------------------------------------------------------------ DIMSE

    def _command(self, context_id: int, data: bytes) -> None:
        try:
            command = dimse.decode(data)
        except dimse.CommandError as exc:
            raise pdu.ProtocolViolation(f"undecodable command set: {exc}") from None
        context = self.contexts[context_id]
        if command.command_field == dimse.C_ECHO_RQ:
            self._respond(context, dimse.C_ECHO_RSP, command, Status.SUCCESS)
            self.log.info("echo", msg_id=command.message_id)
            if command.has_dataset:
                self.message = Message(command, context, time.monotonic(), store=False)
            return
        if command.command_field == dimse.C_CANCEL_RQ:
            return
        message = Message(command, context, time.monotonic())
        if command.command_field != dimse.C_STORE_RQ:
            message.status = Status.UNRECOGNIZED_OPERATION
            message.error = f"unsupported command 0x{command.command_field:04X}"
            message.store = False
        else:
            self._start_store(message)
        if command.has_dataset:
            self.message = message
        else:
            if command.command_field == dimse.C_STORE_RQ:
                message.status, message.error = Status.CANNOT_UNDERSTAND, "C-STORE without dataset"
                self._discard(message)
            self._complete(message)

    def _start_store(self, message: Message) -> None:
        command = message.command
        mode = self.rx.mode
        try:
            naming.check_uid(command.affected_sop_class_uid, "Affected SOP Class UID")
            naming.check_uid(command.affected_sop_instance_uid, "Affected SOP Instance UID")
        except naming.UnsafeIdentifier as exc:
            message.status, message.error, message.store = Status.CANNOT_UNDERSTAND, str(exc), False
            return
        if command.affected_sop_class_uid != message.context.abstract_syntax:
            message.status = Status.SOP_CLASS_NOT_SUPPORTED
            message.error = "SOP class differs from the presentation context's"
            message.store = False
            return
        if mode != "ignore" and not self.rx.disk.has_room():
            message.status, message.error, message.store = Status.OUT_OF_RESOURCES, DISK_LOW, False
            return
        wanted = [SOP_CLASS_UID, SOP_INSTANCE_UID]
        if self.rx.scheme.needs_series_date:
            wanted.append(SERIES_DATE)
            message.open_after = SERIES_DATE
        message.walker = DatasetWalker(message.context.transfer_syntax, wanted)
        if mode == "ignore":  # walked all the same: a success still means a well-formed dataset
            message.store = False

    def _data(self, message: Message, chunk: memoryview) -> None:
        message.received += len(chunk)
        walker = message.walker
        if walker is None:
            return
        disk = self.rx.disk
        if disk.watermark.enabled and message.store:
            disk.received(len(chunk))
            message.disk_counted += len(chunk)
            if not disk.has_room():  # this object would take the disk below output.min_free
                self._fail(message, OSError(errno.ENOSPC, DISK_LOW))
                return
        try:
            walker.feed(chunk)
        except Malformed as exc:
            self._refuse(message, f"malformed dataset: {exc}")
            return
        if not message.store:
            return
        if message.file is not None:
            message.pending.append(chunk)
            return
        if not walker.past(message.open_after) and len(message.prefix) + len(chunk) <= MAX_PREFIX:
            message.prefix += chunk
            return
        if not walker.past(SOP_INSTANCE_UID):
            self._refuse(message, f"no SOP Instance UID in the first {MAX_PREFIX} bytes of the dataset")
            return
        self._open(message)
        if message.file is not None:
            message.pending.append(chunk)

    def _dataset_uids(self, message: Message) -> tuple[str, str] | None:
        """The SOP Class and Instance UIDs for the file meta, from the dataset (PS3.10).

        Refuses the object (and returns None) when the dataset's own SOP
        Instance UID is missing or not a valid UID, or its SOP Class UID is
        not one; a dataset that names no SOP class keeps the command's.  When
        they differ from the command's, the file meta follows the dataset and
        the file name the command, as in dcmrecv.
        """
        assert message.walker is not None
        captured = message.walker.captured
        command = message.command
        instance = text_value(captured.get(SOP_INSTANCE_UID))
        sop_class = text_value(captured.get(SOP_CLASS_UID))
        if instance is None or not uids.is_valid_uid(instance):
            what = "no SOP Instance UID" if instance is None else f"an invalid SOP Instance UID {instance!r}"
            self._refuse(message, f"dataset has {what}")
            return None
        if sop_class is not None and not uids.is_valid_uid(sop_class):
            self._refuse(message, f"dataset has an invalid SOP Class UID {sop_class!r}")
            return None
        sop_class = sop_class or command.affected_sop_class_uid
        if (sop_class, instance) != (command.affected_sop_class_uid, command.affected_sop_instance_uid):
            self.log.warning(
                "store.uid_mismatch",
                command_sop_class_uid=command.affected_sop_class_uid,
                command_sop_instance_uid=command.affected_sop_instance_uid,
                dataset_sop_class_uid=sop_class,
                dataset_sop_instance_uid=instance,
            )
        return sop_class, instance

    def _open(self, message: Message) -> None:
        """Open the object's file (in its +ssd directory) and write the meta and the prefix."""
        assert message.walker is not None
        found = self._dataset_uids(message)
        if found is None:
            return
        directory = PurePosixPath(".")
        if message.open_after == SERIES_DATE:
            series_date = text_value(message.walker.captured.get(SERIES_DATE))
            directory = naming.directory_for(self.rx.scheme, series_date, self.clock().date())
        try:
            message.directory = directory
            message.file = self._take_spare(directory) or self.rx.store.open(directory)
            message.file.write(part10.meta_header(*found, message.context.transfer_syntax, self.calling))
            if message.prefix:
                message.file.write(message.prefix)
        except OSError as exc:
            self._fail(message, exc)
        message.prefix = bytearray()

    def _take_spare(self, directory: PurePosixPath) -> PendingFile | None:
        spare, self.spare = self.spare, None
        if spare is not None and directory != self.spare_dir:
            spare.discard()
            return None
        return spare

    def _make_spare(self, directory: PurePosixPath) -> None:
        """Create the next object's temp file between this object's data flush and rename.

        Why: without an ordered journal the first fsync of a new file also
        writes its directory entry and the directory inode (ext4's new-entry
        rule).  A temp file created now has its entry written by this
        object's directory fsync, so the next object's fdatasync finds the
        directory clean and writes only data and inode.  Only from an
        association's second object on: most associations that send one or
        two objects end there, and the spare would be wasted.
        """
        if self.stored < 1 or self.spare is not None:
            return
        try:
            self.spare = self.rx.store.open(directory)
            self.spare_dir = directory
        except OSError as exc:  # the next object meets the problem and reports it
            self.log.debug("store.spare_failed", reason=str(exc))

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.discard()
            self.spare = None

    def _flush_pending(self) -> None:
        message = self.message
        if message is None or not message.pending:
            return
        chunks, message.pending = message.pending, []
        if message.file is None:
            return
        try:
            message.file.writev(chunks)
        except OSError as exc:
            self._fail(message, exc)

    def _fail(self, message: Message, exc: BaseException) -> None:
        message.status = status_for_error(exc)
        message.error = str(exc)
        message.store = False
        message.walker = None  # the answer is this failure; the rest is drained unread
        self._uncount(message)
        message.pending = []
        if message.file is not None:
            message.file.discard()
            message.file = None

    def _refuse(self, message: Message, reason: str) -> None:
        """The dataset is not one we may acknowledge: 0xC000, no file, the rest drained unread."""
        message.status, message.error = Status.CANNOT_UNDERSTAND, reason
        message.store = False
        message.walker = None
        message.prefix = bytearray()
        self._discard(message)

    def _uncount(self, message: Message) -> None:
        """The object will not reach the disk: its bytes no longer count against the watermark."""
        if message.disk_counted:
            self.rx.disk.received(-message.disk_counted)
            message.disk_counted = 0

    def _discard(self, message: Message) -> None:
        self._uncount(message)
        message.pending = []
        if message.file is not None:
            message.file.discard()
            message.file = None

    def _finish(self, message: Message) -> None:
        walker = message.walker
        if walker is not None:
            try:
                walker.finish()
            except Malformed as exc:
                self._refuse(message, f"malformed dataset: {exc}")
            else:
                if message.store and message.file is None:
                    self._open(message)  # a dataset that ended before the tags we wait for
                elif not message.store and message.status == Status.SUCCESS:
                    self._dataset_uids(message)  # -ignore: the same checks, nothing written
        self._flush_pending()
        path = ""
        if message.store and message.file is not None:
            path = self._commit(message)
        self.message = None
        self._complete(message, path)

    def _commit(self, message: Message) -> str:
        assert message.file is not None
        command = message.command
        scheme = self.rx.scheme
        file = message.file
        started = time.monotonic()
        try:
            file.flush()
            if message.directory is not None:
                self._make_spare(message.directory)
            for _attempt in range(100):
                name = naming.file_name(
                    scheme,
                    command.affected_sop_class_uid,
                    command.affected_sop_instance_uid,
                    self.clock(),
                )
                try:
                    final, replaced = file.commit(name, replace=scheme.overwrites)
                except FileExists:
                    continue
                if replaced:
                    self.log.warning(
                        "store.replaced", path=str(final), sop_instance_uid=command.affected_sop_instance_uid
                    )
                message.file = None
                METRICS.commit_seconds.observe(time.monotonic() - started)
                return str(final)
            raise FileExistsError("no free file name after 100 attempts")
        except (OSError, naming.UnsafeIdentifier) as exc:
            self._fail(message, exc)
            return ""

    def _complete(self, message: Message, path: str = "") -> None:
        command = message.command
        if command.command_field == dimse.C_ECHO_RQ:
            return
        response_field = command.command_field | 0x8000
        comment = message.error if message.status.is_failure else ""
        elapsed = time.monotonic() - message.started
        duration_ms = round(elapsed * 1000, 3)
        # Counted before the response goes out: a scrape right after it sees the object.
        METRICS.objects.labels(
            f"0x{int(message.status):04X}", self.rx.name if self.rx.name != "*" else "any"
        ).inc()
        METRICS.received.inc(message.received)
        METRICS.store_seconds.observe(elapsed)
        self._respond(message.context, response_field, command, message.status, comment)
        fields = {
            "sop_class_uid": command.affected_sop_class_uid,
            "sop_instance_uid": command.affected_sop_instance_uid,
            "status": f"0x{int(message.status):04X}",
            "bytes": message.received,
            "duration_ms": duration_ms,
        }
        if message.status == Status.SUCCESS:
            self.stats.add(stored=1, bytes=message.received)
            if self.rx.title:
                self.stats.stored_for(self.rx.title)
            self.log.info("store.completed", path=path or None, **fields)
            if path:
                self.stored += 1
        else:
            self.stats.add(failed=1)
            self.log.error("store.failed", reason=message.error, **fields)

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
        self.sock.sendall(pdu.command_pdu(context.context_id, response, self.peer_max_pdu))

    def _drop_message(self) -> None:
        """Remove the partial object of a message that will never complete."""
        message = self.message
        self.message = None
        if message is not None:
            self._discard(message)
            if message.command.command_field == dimse.C_STORE_RQ:
                self.log.warning(
                    "store.incomplete",
                    sop_instance_uid=message.command.affected_sop_instance_uid,
                    bytes=message.received,
                )
