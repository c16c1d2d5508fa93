"""The association's one receive buffer, and the reads into it.

Why one buffer, reused: the upper layer hands out views into what it was fed
(``upper_layer``'s contract), so a dataset's bytes go from the socket to the
file without a copy in Python.  A connection that has not negotiated gets a
16 KiB buffer (idle or hostile connections cost little); an accepted one a
pooled 1 MiB anonymous mmap, given back when the association ends.
"""

from __future__ import annotations

import mmap
import select
import socket
import ssl

from dcmrecvd.store.buffers import BufferPool

#: The receive buffer of an established association: many PDUs per read.
BUFFER_SIZE = 1 << 20
#: The buffer of a connection that has not negotiated yet: enough for a usual
#: A-ASSOCIATE-RQ (a larger one is read in pieces), so that idle or hostile
#: connections cost a few KiB, not a MiB each.
INITIAL_BUFFER_SIZE = 16 * 1024
#: Receive buffers of established associations, shared by all of them.
RECEIVE_BUFFERS = BufferPool(BUFFER_SIZE, keep=8)


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


class ReceiveBuffer:
    """Reads into one buffer; a read's view is valid until the next read."""

    def __init__(self, pool: BufferPool = RECEIVE_BUFFERS) -> None:
        self.pool = pool
        self._buffer: bytearray | memoryview = bytearray(INITIAL_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._pooled: mmap.mmap | None = None
        self._quickack = hasattr(socket, "TCP_QUICKACK")

    def read(self, sock: socket.socket) -> memoryview:
        """One ``recv_into`` (the socket's timeout applies); PeerClosed at its end."""
        try:
            got = sock.recv_into(self._view)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise PeerClosed(str(exc)) from None
        if got == 0:
            raise PeerClosed("connection closed by peer")
        if self._quickack:
            self._rearm_quickack(sock)
        return self._view[:got]

    def _rearm_quickack(self, sock: socket.socket) -> None:
        """ACK at once what we just read, instead of up to 40 ms later.

        Why: a sender with Nagle on (DCMTK's tools unless TCP_NODELAY=1 is in
        their environment) holds its last small segment of a message until its
        previous data is acknowledged, and Linux delays that ACK; each C-STORE
        then waits for the delayed-ACK timer.  The kernel leaves quick-ACK mode
        by itself, so it is re-armed after every read (one setsockopt, ~1 us;
        cheaper than knowing which read ends a message).
        """
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # not TCP (a socketpair in tests): nothing to re-arm
            self._quickack = False

    def grow(self) -> None:
        """Move to a large pooled buffer: the small one held nothing that is still needed
        (the core copies what it keeps across reads)."""
        self._view.release()
        self._pooled = self.pool.take()
        self._buffer = memoryview(self._pooled)
        self._view = self._buffer

    def release(self) -> None:
        """Give the large buffer back; every view of it must be dropped by now."""
        pooled, self._pooled = self._pooled, None
        self._view.release()
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        if pooled is not None:
            self.pool.give(pooled)


def more_waiting(sock: socket.socket) -> bool:
    """Has the peer already sent more than we read (a pipelining sender)?"""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
