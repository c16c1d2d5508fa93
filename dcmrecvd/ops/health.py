"""The operations listeners: Prometheus scrape, liveness and readiness over HTTP, and
HAProxy's agent check over TCP.

Why on their own threads and sockets: a scrape, a health probe or a slow or
hostile client on these ports must never delay receiving, and receiving must
never delay them (a load balancer that cannot reach the agent takes the node
out).  Each request is answered from figures the daemon keeps anyway; nothing
here touches the disk except ``statvfs`` through the disk watch.

HTTP (``metrics.listen``): ``GET /metrics`` (text exposition), ``GET /livez``
(the accept loop turned within the watchdog interval), ``GET /readyz``
(listening, not draining, output directory usable and above its watermark);
anything else is 404, other methods 405.  A request line and headers that have
not arrived whole ``REQUEST_TIMEOUT`` seconds after the connection was accepted
end it, however the client trickles them (one deadline, not a timeout per
read); at most ``MAX_CONNECTIONS`` connections are served at once on each
listener, and one more is closed at once, so a flood costs neither unbounded
threads nor descriptors.

Agent (``metrics.agent_listen``, HAProxy's agent-check protocol): one line
then close, ``up ready``, ``drain`` (watermark crossed, or SIGTERM draining) or
``maint`` (output directory unusable), with ``NN%`` appended when
``metrics.agent_weight`` asks for a weight from the free association slots.
"""

from __future__ import annotations

import io
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from dcmrecvd.conf.config import parse_listen
from dcmrecvd.errors import ListenError

log = structlog.get_logger("dcmrecvd")

#: Seconds a client of these listeners may take to send its whole request.
REQUEST_TIMEOUT = 5.0
#: Connections served at once per listener (each holds a thread while it lasts).
MAX_CONNECTIONS = 32
#: Connections the kernel queues before accept (socketserver's default of 5 made a
#: burst of probes wait a SYN retransmission, a second, for room).
BACKLOG = 128


@dataclass(frozen=True)
class Health:
    """The daemon's state as the probes see it."""

    alive: bool
    listening: bool
    draining: bool
    usable: bool  # output directory writable
    disk_low: bool
    active: int
    capacity: int
    #: Objects waiting for forward destinations (all together), the oldest one's age in
    #: seconds, and the paused destinations: shown by /readyz, never a reason to be unready
    #: (a node cut off from its archive keeps receiving; its backlog drains later).
    forward_waiting: int = 0
    forward_oldest: float = 0.0
    forward_paused: tuple[str, ...] = ()
    #: Why acknowledged objects cannot be made into files now ("" when they can): new
    #: objects are refused meanwhile, so the node is not ready.
    failing: str = ""

    @property
    def ready(self) -> bool:
        return (
            self.alive
            and self.listening
            and not self.draining
            and self.usable
            and not self.disk_low
            and not self.failing
        )

    def why_not_ready(self) -> str:
        reasons = [
            text
            for bad, text in (
                (not self.alive, "accept loop stalled"),
                (not self.listening, "not listening"),
                (self.draining, "draining"),
                (not self.usable, "output directory unusable"),
                (self.disk_low, "output directory below output.min_free"),
                (bool(self.failing), self.failing),
            )
            if bad
        ]
        return ", ".join(reasons) or "ready"

    def readyz_text(self) -> str:
        """The /readyz body: why (not) ready, and the forwarding backlog when there is one."""
        text = self.why_not_ready()
        if self.forward_waiting:
            text += f"; forwarding: {self.forward_waiting} waiting, oldest {self.forward_oldest:.0f} s"
        if self.forward_paused:
            text += f"; paused: {', '.join(self.forward_paused)}"
        return text

    def agent_word(self, weight: bool) -> str:
        """HAProxy agent-check answer (one line).

        Healthy is ``up ready``: ``up`` alone would not lift a DRAIN or MAINT that an
        earlier answer set (HAProxy keeps administrative states until ``ready``).
        """
        if not self.usable:
            word = "maint"
        elif self.failing:  # HAProxy shows the text after '#' as the check's description
            word = "drain #" + " ".join(self.failing.split())
        elif self.draining or self.disk_low or not self.listening:
            word = "drain"
        else:
            word = "up ready"
        if weight and word == "up ready" and self.capacity > 0:
            free = max(self.capacity - self.active, 0)
            word += f" {max(round(100 * free / self.capacity), 1)}%"
        return word


class _ByDeadline(io.RawIOBase):
    """A socket's reads, each bounded by what is left of one deadline for them all:
    a socket timeout bounds one read, and a client sending a byte at a time would
    never meet it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not complete in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Bounded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading server that serves at most ``MAX_CONNECTIONS`` at once and closes
    the next one at once (a prober retries; a flood costs nothing that lasts)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the slot is ours to give back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"
    # A request line we cannot parse still gets a status line, not an HTTP/0.9 body.
    default_request_version = "HTTP/1.0"
    server_version = "dcmrecvd"
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        self.rfile = io.BufferedReader(_ByDeadline(self.connection, deadline))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/livez":
            health = self.server.health()
            self._send(200 if health.alive else 503, b"ok\n" if health.alive else b"accept loop stalled\n")
        elif path == "/readyz":
            health = self.server.health()
            self._send(200 if health.ready else 503, (health.readyz_text() + "\n").encode())
        else:
            self._send(404, b"not found: /metrics, /livez, /readyz\n")

    def do_HEAD(self) -> None:
        self._send(405, b"")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.connection.settimeout(REQUEST_TIMEOUT)  # a client that does not read is let go too
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if code == 405:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not news; errors are logged by send_error via log_error."""

    def log_error(self, format: str, *args: object) -> None:
        log.debug("metrics.bad_request", peer=self.client_address[0], reason=format % args)


class _HTTPServer(_Bounded):
    def __init__(
        self, address: tuple[str, int], exposition: Callable[[], bytes], health: Callable[[], Health]
    ) -> None:
        self.exposition = exposition
        self.health = health
        super().__init__(address, _Handler)


class _AgentHandler(socketserver.BaseRequestHandler):
    server: _AgentServer

    def handle(self) -> None:
        try:
            self.request.settimeout(REQUEST_TIMEOUT)
            self.request.sendall((self.server.answer() + "\n").encode())
        except OSError:
            pass


class _AgentServer(_Bounded):
    def __init__(self, address: tuple[str, int], answer: Callable[[], str]) -> None:
        self.answer = answer
        super().__init__(address, _AgentHandler)


class OpsListeners:
    """The metrics/health HTTP listener and the agent listener, each on its own thread."""

    def __init__(
        self,
        metrics_listen: str,
        agent_listen: str,
        *,
        exposition: Callable[[], bytes],
        health: Callable[[], Health],
        agent_weight: bool = False,
    ) -> None:
        self._servers: list[socketserver.BaseServer] = []
        self._started = False
        try:
            if metrics_listen:
                address = parse_listen(metrics_listen)
                self._servers.append(_HTTPServer(address, exposition, health))
            if agent_listen:
                address = parse_listen(agent_listen)
                self._servers.append(_AgentServer(address, lambda: health().agent_word(agent_weight)))
        except OSError as exc:
            self.close()
            raise ListenError(f"cannot listen for metrics/agent: {exc.strerror or exc}") from None

    def start(self) -> None:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, args=(0.5,), name="ops", daemon=True).start()
        self._started = True

    def close(self) -> None:
        for server in self._servers:
            if self._started:
                server.shutdown()
            server.server_close()
        self._servers = []
