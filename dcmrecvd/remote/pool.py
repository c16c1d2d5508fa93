"""A bounded pool of outgoing associations to one remote AE.

Why a pool: opening an association costs a TCP (and TLS) handshake and a
negotiation, several round trips; a forwarder sending a study object by object
must not pay that per object, and must not open more associations than the
remote allows (PACS limit them per calling AE).  So: at most
``remote.max_associations`` at once, reused while they stay established, an
idle one released after ``remote.idle_close`` seconds, one whose use raised
(a DIMSE timeout, a vanished peer) aborted and dropped, so the next borrower
opens a fresh one.

Datasets are sent as stored: ``STORE_SEND_CHUNKED_DATASET`` makes pynetdicom read
a file's dataset in chunks from disk, without decoding it (set once, here: this
process never sends a decoded dataset from a path).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dcmrecvd.remote.client_tls import client_context
from dcmrecvd.remote.peers import Remote

log = structlog.get_logger("dcmrecvd")

_config.STORE_SEND_CHUNKED_DATASET = True


class RemoteUnavailable(Exception):
    """No association to the remote: ``why`` is unreachable, rejected or aborted."""

    def __init__(self, remote: Remote, why: str) -> None:
        super().__init__(f"{remote.name}: {why}")
        self.remote = remote
        self.why = why


class PoolExhausted(TimeoutError):
    """Every association to the remote is in use, and none came back in time."""


@dataclass
class _Idle:
    association: Association
    since: float


class AssociationPool:
    """Associations to ``remote`` proposing ``contexts``, at most ``remote.max_associations``."""

    def __init__(
        self,
        remote: Remote,
        contexts: Sequence[PresentationContext],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.clock = clock
        self._ae = AE(ae_title=remote.calling_aet)
        self._ae.requested_contexts = list(contexts)
        self._ae.connection_timeout = remote.connect_timeout
        self._ae.acse_timeout = remote.acse_timeout
        self._ae.dimse_timeout = remote.dimse_timeout
        self._ae.network_timeout = max(remote.idle_close * 2, remote.dimse_timeout)
        self._ae.maximum_pdu_size = remote.max_pdu
        self._tls = client_context(remote.tls) if remote.tls is not None else None
        self._lock = threading.Condition()
        self._idle: list[_Idle] = []
        self._busy = 0
        #: Associations opened so far (for tests, logs and metrics).
        self.opened = 0

    @contextlib.contextmanager
    def association(self, wait: float | None = None) -> Iterator[Association]:
        """An established association for the block's use; returned to the pool after it,
        or aborted if the block raised.  Waits up to ``wait`` seconds (None: for ever)
        for one to be free; PoolExhausted after that, RemoteUnavailable when none opens."""
        assoc = self._borrow(wait)
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            self._give_back(None)
            raise
        self._give_back(assoc if assoc.is_established else None)

    def _borrow(self, wait: float | None) -> Association:
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            while True:
                while self._idle:
                    idle = self._idle.pop()
                    if idle.association.is_established:
                        self._busy += 1
                        return idle.association
                if self._busy < self.remote.max_associations:
                    self._busy += 1
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolExhausted(f"{self.remote.name}: all {self.remote.max_associations} in use")
                self._lock.wait(left)
        try:
            return self._open()
        except BaseException:
            with self._lock:
                self._busy -= 1
                self._lock.notify()
            raise

    def _open(self) -> Association:
        remote = self.remote
        tls_args = None
        if self._tls is not None:
            assert remote.tls is not None
            tls_args = (self._tls, remote.tls.server_name or remote.host)  # SNI only, unless checked
        assoc = self._ae.associate(
            remote.host, remote.port, ae_title=remote.ae_title, max_pdu=remote.max_pdu, tls_args=tls_args
        )
        if assoc.is_established:
            _no_delay(assoc)
            self.opened += 1
            log.debug("remote.opened", remote=remote.name)
            return assoc
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
        raise RemoteUnavailable(remote, why)

    def _give_back(self, assoc: Association | None) -> None:
        with self._lock:
            self._busy -= 1
            if assoc is not None:
                self._idle.append(_Idle(assoc, self.clock()))
            self._lock.notify()

    def close_idle(self) -> int:
        """Release the associations unused for ``remote.idle_close`` seconds; how many."""
        cutoff = self.clock() - self.remote.idle_close
        with self._lock:
            old = [i for i in self._idle if i.since <= cutoff]
            self._idle = [i for i in self._idle if i.since > cutoff]
        for idle in old:
            idle.association.release()
        return len(old)

    def close(self) -> None:
        """Release every idle association (those in use are released when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for item in idle:
            item.association.release()

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._busy

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)


def _no_delay(assoc: Association) -> None:
    """TCP_NODELAY on the association's socket (pynetdicom leaves Nagle on): without it each
    C-STORE's last small segment waits for the remote's delayed ACK, ~40 ms an object."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    try:
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
