"""The listener: accept connections, one thread per association, bounded.

dcmrecv serves one association at a time and makes the next sender wait;
here each association runs on its own thread up to ``max_associations``, and
the next one is rejected at once as transient "local limit exceeded".  The
accept loop does nothing slow: no DNS, no TLS, no disk.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from dcmrecvd.conf.config import Config
from dcmrecvd.errors import ListenError, UsageError
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.ops.systemd import listen_fds
from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.association import Association
from dcmrecvd.serve.commitment_check import Commitment
from dcmrecvd.serve.runtime import Runtime, Stats

log = structlog.get_logger("dcmrecvd")

#: conn.refused is logged at most this often (seconds), with the count since the last one.
REFUSED_LOG_INTERVAL = 10.0


def bind_listener(address: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket (exit 64 when the port cannot be had)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        where = f"{address or '*'}:{port}"
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def tune_connection(conn: socket.socket) -> None:
    """TCP_NODELAY (else each small PDU waits ~40 ms for a delayed ACK) and keepalive."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def resolve_peer(host: str, log_event: Callable[[str], None]) -> None:
    """Reverse DNS on a side thread, so a slow resolver never stalls anyone."""

    def lookup() -> None:
        try:
            name = socket.gethostbyaddr(host)[0]
        except OSError:
            return
        log_event(name)

    threading.Thread(target=lookup, name="dns", daemon=True).start()


class Server:
    """Accepts on one or more listeners and runs associations on threads."""

    def __init__(
        self,
        listeners: list[socket.socket],
        runtime: Callable[[], Runtime],
        stats: Stats,
        *,
        heartbeat: Callable[[], None] | None = None,
        heartbeat_interval: float = 0.0,
        events: Callable[[dict[str, Any]], None] | None = None,
        ack: AckJournal | None = None,
    ) -> None:
        self.listeners = listeners
        self.events = events
        #: The ack journal stored objects are acknowledged through (None: the per-file path).
        self.ack = ack
        #: Storage Commitment (set at start when enabled; its reporter runs beside the server).
        self.commitment: Commitment | None = None
        self.runtime = runtime
        self.stats = stats
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._slots = 0
        #: Slots held per source address (the client's, behind a PROXY balancer).
        self._per_peer: dict[str, int] = {}
        #: Connections accepted that have not finished negotiating, and how many
        #: were closed at once since the last warning because there were too many.
        self._pending = 0
        self._refused = 0
        self._refused_logged = 0.0
        #: When the accept loop last went round (monotonic): the liveness signal.
        self.turned = time.monotonic()
        self._live: set[Association] = set()
        self._threads: set[threading.Thread] = set()
        self._all_done = threading.Condition(self._lock)
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ slots

    def _admit(self, host: str) -> bool:
        network = self.runtime().config.network
        with self._lock:
            if self._slots >= network.max_associations or self._stopping.is_set():
                return False
            held = self._per_peer.get(host, 0)
            if network.max_associations_per_peer and held >= network.max_associations_per_peer:
                return False
            self._slots += 1
            self._per_peer[host] = held + 1
            return True

    def _release(self, host: str) -> None:
        with self._lock:
            self._slots -= 1
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)

    def _negotiated(self) -> None:
        with self._lock:
            self._pending -= 1

    def _take_pending(self) -> bool:
        """Room for one more connection that has not negotiated yet?"""
        limit = self.runtime().config.network.max_pending_connections
        with self._lock:
            if self._pending < limit:
                self._pending += 1
                return True
            self._refused += 1
            METRICS.refused.inc()
            now = time.monotonic()
            if now - self._refused_logged < REFUSED_LOG_INTERVAL:
                return False
            refused, self._refused, self._refused_logged = self._refused, 0, now
        log.warning(
            "conn.refused",
            reason=f"more than {limit} connections not yet negotiated",
            refused=refused,
        )
        return False

    @property
    def pending(self) -> int:
        """Connections accepted that have not negotiated yet."""
        with self._lock:
            return self._pending

    @property
    def listening(self) -> bool:
        """The accept loop runs and takes new connections."""
        return self.thread is not None and self.thread.is_alive() and not self._stopping.is_set()

    @property
    def connections(self) -> int:
        """Connections being served, negotiating or associated (the associations among
        them are counted in ``Stats.active``, their one owner)."""
        with self._lock:
            return len(self._live)

    # ------------------------------------------------------------------ accept loop

    def start(self) -> None:
        """Run the accept loop on its own thread."""
        for listener in self.listeners:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        """Accept until stopped; the heartbeat (the systemd watchdog) comes from here,
        because a responsive accept loop is what "healthy" means for a receiver."""
        # Wake at least every second, so that /livez can tell a turning loop from a stuck one.
        timeout = min(self.heartbeat_interval, 1.0) if self.heartbeat else 1.0
        next_beat = time.monotonic()
        while not self._stopping.is_set():
            self.turned = time.monotonic()
            if self.heartbeat is not None and time.monotonic() >= next_beat:
                self.heartbeat()
                next_beat = time.monotonic() + self.heartbeat_interval
            for key, _ in self._selector.select(timeout):
                if key.fileobj is self._wake_r:
                    return
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: log, keep serving
            log.error("accept.failed", reason=str(exc))
            return
        if not self._take_pending():  # a flood of idle connections must not cost a thread each
            conn.close()
            return
        conn.setblocking(True)
        try:
            tune_connection(conn)
        except OSError:
            pass
        host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        peer = f"{host}:{addr[1]}" if isinstance(addr, tuple) else host
        runtime = self.runtime()
        assoc = Association(
            conn,
            peer,
            runtime,
            self.stats,
            admit=self._admit,
            release_slot=self._release,
            negotiated=self._negotiated,
            host=host,
            events=self.events,
            ack=self.ack,
            commitment=self.commitment,
        )
        if runtime.config.network.host_lookup and isinstance(addr, tuple):
            bound = assoc.log
            resolve_peer(host, lambda name: bound.info("assoc.peer_host", peer_host=name))
        thread = threading.Thread(target=self._run, args=(assoc,), name=f"assoc-{assoc.id}")
        with self._lock:
            self._live.add(assoc)
            self._threads.add(thread)
        thread.start()

    def _run(self, assoc: Association) -> None:
        try:
            assoc.run()
        finally:
            with self._lock:
                self._live.discard(assoc)
                self._threads.discard(threading.current_thread())
                self._all_done.notify_all()

    # ------------------------------------------------------------------ stop

    def stop_accepting(self) -> None:
        """No new connections are taken; in-flight ones continue."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join()
        for listener in self.listeners:
            try:
                self._selector.unregister(listener)
            except (KeyError, ValueError):
                pass

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for associations to finish, then abort the rest.

        Returns how many had to be aborted.
        """
        with self._lock:
            self._all_done.wait_for(lambda: not self._live, timeout=timeout)
            left = list(self._live)
        for assoc in left:
            assoc.abort()
        with self._lock:
            self._all_done.wait_for(lambda: not self._live, timeout=10)
        return len(left)

    def close(self) -> None:
        """Release the selector and wake-up pair (listeners belong to the caller)."""
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def open_listeners(
    config: Config, environ: Mapping[str, str], pid: int | None = None
) -> tuple[list[socket.socket], bool]:
    """Adopt systemd's ``dicom`` sockets, or bind the configured port.

    Returns the listeners and whether we own them (closing them is ours).
    """
    passed = listen_fds(environ, os.getpid() if pid is None else pid)
    adopted = passed.get("dicom") or passed.get("unknown") or []
    if adopted:
        return adopted, False
    port = config.network.port
    if not port:
        raise UsageError("Missing parameter port")
    return [bind_listener(config.network.address, port)], True
