"""A bounded pool of outgoing associations to one remote AE.

Why a pool: opening an association costs a TCP (and TLS) handshake and a
negotiation, several round trips; a forwarder sending a study object by object
must not pay that per object, and must not open more associations than the
remote allows (PACS limit them per calling AE).  So: at most
``remote.max_associations`` at once, reused while they stay established, an
idle one released after ``remote.idle_close`` seconds, one whose use raised
(a DIMSE timeout, a vanished peer) aborted and dropped, so the next borrower
opens a fresh one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog

from dcmrecvd.remote.client import AssociationFailed, NoContext, OutboundAssociation
from dcmrecvd.remote.client_tls import client_context
from dcmrecvd.remote.peers import Remote
from dcmrecvd.wire.requestor import Proposal

log = structlog.get_logger("dcmrecvd")


class RemoteUnavailable(Exception):
    """No association to the remote: ``why`` is unreachable, rejected or aborted; for a
    rejection, ``result`` says permanent (1) or transient (2)."""

    def __init__(self, remote: Remote, failed: AssociationFailed) -> None:
        super().__init__(f"{remote.name}: {failed}")
        self.remote = remote
        self.why = failed.why
        self.result = failed.result


class PoolExhausted(TimeoutError):
    """Every association to the remote is in use, and none came back in time."""


@dataclass
class _Idle:
    association: OutboundAssociation
    since: float


class AssociationPool:
    """Associations to ``remote`` proposing ``offered``, at most ``remote.max_associations``."""

    def __init__(
        self,
        remote: Remote,
        offered: Sequence[Proposal],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.offered = list(offered)
        self.clock = clock
        self._tls = client_context(remote.tls) if remote.tls is not None else None
        self._lock = threading.Condition()
        self._idle: list[_Idle] = []
        self._busy = 0
        #: Associations opened so far (for tests, logs and metrics).
        self.opened = 0

    @contextlib.contextmanager
    def association(self, wait: float | None = None) -> Iterator[OutboundAssociation]:
        """An established association for the block's use; returned to the pool after it,
        or aborted if the block raised (but for ``NoContext``, which a request raises before
        anything is sent).  Waits up to ``wait`` seconds (None: for ever)
        for one to be free; PoolExhausted after that, RemoteUnavailable when none opens."""
        assoc = self._borrow(wait)
        try:
            yield assoc
        except NoContext:  # said of one object before anything went out: the association is fine
            self._give_back(assoc if assoc.is_established else None)
            raise
        except BaseException:
            assoc.abort()
            self._give_back(None)
            raise
        self._give_back(assoc if assoc.is_established else None)

    def _borrow(self, wait: float | None) -> OutboundAssociation:
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

    def _open(self) -> OutboundAssociation:
        try:
            assoc = OutboundAssociation.open(self.remote, self.offered, self._tls)
        except AssociationFailed as exc:
            raise RemoteUnavailable(self.remote, exc) from None
        self.opened += 1
        log.debug("remote.opened", remote=self.remote.name)
        return assoc

    def _give_back(self, assoc: OutboundAssociation | None) -> None:
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
