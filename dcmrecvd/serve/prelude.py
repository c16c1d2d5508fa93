"""Before the upper layer: the PROXY header, the TLS handshake, and ARTIM over both.

Why a unit of its own: what arrives before the A-ASSOCIATE-RQ decides who the
peer is (a balancer's PROXY header names the client; TLS names its
certificate), and a hostile or silent peer must cost no more than the ACSE
timeout.  One deadline (``artim``, monotonic) covers the header, the
handshake and, in the driver, the whole A-ASSOCIATE-RQ.  Nothing here speaks
DICOM; a connection that fails the prelude is closed without a word (PS3.8
AA-2: no A-ABORT before an association is requested).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from structlog.typing import FilteringBoundLogger

from dcmrecvd.serve import tls
from dcmrecvd.serve.runtime import Runtime
from dcmrecvd.wire import proxy_protocol


@dataclass(frozen=True)
class Arrival:
    """Who a connection is, once its prelude is through."""

    sock: socket.socket
    #: The client's address as logs show it, and the address rules and limits see.
    peer: str
    host: str
    log: FilteringBoundLogger


def arrive(
    sock: socket.socket, peer: str, host: str, runtime: Runtime, artim: float, log: FilteringBoundLogger
) -> Arrival | None:
    """Read the PROXY header (when configured) and complete TLS (when configured), both
    before ``artim``; None: the connection is refused (logged here) and must be closed."""
    arrival: Arrival | None = Arrival(sock, peer, host, log)
    if runtime.config.network.proxy_protocol != "off":
        arrival = _proxy_header(Arrival(sock, peer, host, log), runtime, artim)
    if arrival is not None and runtime.tls is not None:
        return _handshake(arrival, runtime.tls, artim)
    return arrival


def _proxy_header(arrival: Arrival, runtime: Runtime, artim: float) -> Arrival | None:
    """The PROXY header the balancer must send first."""
    log, host = arrival.log, arrival.host
    if not runtime.trusts_proxy(host):
        log.warning("conn.proxy_rejected", reason=f"{host} is not in network.trusted_proxies")
        return None
    try:
        proxied = proxy_protocol.read_header(
            _exact_reader(arrival.sock, artim), runtime.config.network.proxy_protocol
        )
    except proxy_protocol.ClosedBeforeHeader:  # a port probe or a TCP health check
        log.debug("conn.closed", reason="closed before a PROXY header")
        return None
    except proxy_protocol.ProxyHeaderError as exc:
        log.warning("conn.proxy_rejected", reason=str(exc))
        return None
    except TimeoutError:
        log.warning("conn.proxy_rejected", reason="no complete PROXY header within the ACSE timeout")
        return None
    if proxied.host is None:  # LOCAL (the balancer's own health check): the TCP peer it is
        return arrival
    client = f"[{proxied.host}]:{proxied.port}" if ":" in proxied.host else f"{proxied.host}:{proxied.port}"
    return Arrival(arrival.sock, client, proxied.host, log.bind(peer=client, proxy=arrival.peer))


def _handshake(arrival: Arrival, context: ssl.SSLContext, artim: float) -> Arrival | None:
    """TLS handshake on this thread; the ACSE timeout bounds it as a whole, like ARTIM.

    Why not a socket timeout: that bounds each read, and a peer trickling its
    ClientHello a byte at a time would hold the connection for ever.
    """
    try:
        wrapped = context.wrap_socket(arrival.sock, server_side=True, do_handshake_on_connect=False)
        handshake_by(wrapped, artim)
    except (ssl.SSLError, OSError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
        arrival.log.warning("tls.handshake_failed", reason=reason)
        return None
    return Arrival(wrapped, arrival.peer, arrival.host, arrival.log.bind(**tls.describe_peer(wrapped)))


def handshake_by(sock: ssl.SSLSocket, deadline: float) -> None:
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


def _exact_reader(sock: socket.socket, deadline: float) -> Callable[[int], bytes]:
    """``read(n)``: exactly n bytes from ``sock`` before ``deadline``, never one more (what
    follows the header belongs to TLS or the upper layer)."""
    seen = False

    def read(n: int) -> bytes:
        nonlocal seen
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("PROXY header not complete within the ACSE timeout")
            sock.settimeout(left)
            chunk = sock.recv(n - len(out))
            if not chunk:
                if not seen:  # nothing at all was sent
                    raise proxy_protocol.ClosedBeforeHeader("closed before a PROXY header")
                raise proxy_protocol.ProxyHeaderError("connection closed inside the PROXY header")
            seen = True
            out += chunk
        return bytes(out)

    return read
