"""The DICOM upper layer on a blocking socket: framing, buffered reads, small PDUs.

pynetdicom's DUL runs two polling threads per association and copies every
P-DATA fragment several times; that machinery, not DICOM, was where its time
went.  Here one thread per association reads into a large reusable buffer and
hands out views of it, so a dataset fragment goes from the socket to the file
with no intermediate copy.  Negotiation PDUs are still encoded and decoded by
pynetdicom (see ``negotiation``).
"""

from __future__ import annotations

import mmap
import socket
import struct
import time
from collections.abc import Callable

from dcmrecvd.buffers import BufferPool

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: A-ABORT sources and provider reasons (PS3.8 9.3.8).
SOURCE_USER = 0x00
SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_UNRECOGNIZED_PARAMETER = 0x04
REASON_UNEXPECTED_PARAMETER = 0x05
REASON_INVALID_PARAMETER = 0x06

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
#: The receive buffer of an established association: dataset fragments are
#: handed on as views into it, so it is large enough for many PDUs per read.
BUFFER_SIZE = 1 << 20
#: The buffer of a connection that has not negotiated yet: enough for a usual
#: A-ASSOCIATE-RQ (a larger one is read in pieces), so that idle or hostile
#: connections cost a few KiB, not a MiB each.
INITIAL_BUFFER_SIZE = 16 * 1024
#: An A-ASSOCIATE-RQ larger than this is not a real one.
MAX_ASSOCIATE_RQ = 1 << 20


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


class ProtocolViolation(Exception):
    """The peer broke the upper layer protocol; the association must be aborted."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class Reader:
    """Buffered reads from a socket, handing out views into one big buffer.

    It starts small (a connection that has not negotiated costs a few KiB) and
    ``grow`` moves it to a large pooled buffer once the association exists.

    A view returned by ``take`` stays valid until the next refill;
    ``before_refill`` is called first so the owner can flush the views it holds.
    """

    def __init__(self, sock: socket.socket, size: int = INITIAL_BUFFER_SIZE) -> None:
        self.sock = sock
        self.buf: bytearray | mmap.mmap = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self._pool: BufferPool | None = None
        self._quickack = hasattr(socket, "TCP_QUICKACK")
        self.before_refill: Callable[[], None] | None = None
        #: A monotonic time by which the reads in progress must be complete (PS3.8's
        #: ARTIM bounds a whole A-ASSOCIATE-RQ, not each read); None: per-read timeouts.
        self.deadline: float | None = None

    def grow(self, pool: BufferPool) -> None:
        """Move to a large buffer from ``pool`` (once the association is accepted)."""
        if self._pool is not None:
            return
        buf = pool.take()
        pending = self.end - self.start
        buf[:pending] = self.view[self.start : self.end]
        self.view.release()
        self.buf, self.view, self._pool = buf, memoryview(buf), pool
        self.start, self.end = 0, pending

    def close(self) -> None:
        """Give the large buffer back; every view taken from it must be dropped by now."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        buf = self.buf
        assert isinstance(buf, mmap.mmap)
        self.view.release()
        self.buf = bytearray(0)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        pool.give(buf)

    @property
    def available(self) -> int:
        """Bytes buffered and not yet taken."""
        return self.end - self.start

    def fill(self, minimum: int = 1) -> None:
        """Block until at least ``minimum`` bytes are buffered."""
        while self.end - self.start < minimum:
            if self.before_refill is not None:
                self.before_refill()
            if self.start == self.end:
                self.start = self.end = 0
            elif len(self.buf) - self.end < max(minimum, 65536):
                pending = self.end - self.start
                self.buf[:pending] = self.buf[self.start : self.end]
                self.start, self.end = 0, pending
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                self.sock.settimeout(left)
            try:
                got = self.sock.recv_into(self.view[self.end :])
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from None
            if got == 0:
                raise PeerClosed("connection closed by peer")
            self.end += got
            if self._quickack:
                self._rearm_quickack()

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

    def take(self, n: int) -> memoryview:
        """The next ``n`` buffered bytes (``n`` <= available)."""
        start = self.start
        self.start = start + n
        return self.view[start : start + n]

    def read_exact(self, n: int) -> bytes:
        """``n`` bytes as a new object, refilling as needed (for small PDUs)."""
        if n <= len(self.buf):
            self.fill(n)
            return bytes(self.take(n))
        out = bytearray()
        while len(out) < n:
            self.fill(1)
            out += self.take(min(self.available, n - len(out)))
        return bytes(out)

    def skip(self, n: int) -> None:
        """Discard ``n`` bytes."""
        while n > 0:
            self.fill(1)
            k = min(self.available, n)
            self.start += k
            n -= k

    def header(self) -> tuple[int, int]:
        """(PDU type, length) of the next PDU."""
        self.fill(6)
        pdu_type, length = PDU_HEADER.unpack_from(self.buf, self.start)
        self.start += 6
        return int(pdu_type), int(length)


def abort_pdu(source: int = SOURCE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU."""
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


def release_rp_pdu() -> bytes:
    """An A-RELEASE-RP PDU."""
    return PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def command_pdu(context_id: int, command: bytes, peer_max_pdu: int = 0) -> bytes:
    """P-DATA-TF PDUs carrying one complete command set.

    One PDV normally; split into as many PDUs as a peer that announced a tiny
    maximum PDU length (``peer_max_pdu``, 0 = unlimited) needs.
    """
    room = peer_max_pdu - 6 if peer_max_pdu else len(command)
    room = max(room, 1)
    out = bytearray()
    for start in range(0, max(len(command), 1), room):
        piece = command[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command) else 0)
        pdv = PDV_HEADER.pack(len(piece) + 2, context_id, control) + piece
        out += PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv
    return bytes(out)
