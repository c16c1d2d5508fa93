"""DIMSE services: one module each, found by the command field of a request.

Why a registry and not branches in the driver: the association (``association``)
knows the upper layer, the window and the order of responses, and nothing of
what a request means.  A service declares the request command fields it
answers; for each request it gives the sink its dataset (if any) streams into,
and, once the request is complete and its sink's work durable, it answers: it
sends the response through the callable the driver hands it, then logs and
emits what follows.  Adding a service is a new module with one ``Service``
object and one line in ``SERVICES`` (docs/ARCHITECTURE.md, "Adding a DIMSE
service", walks through Verification).

A service module may import the wire (``dimse``, ``status``), ``receiving``
and ``storage`` for sinks, ``metrics`` and ``runtime``; never the driver
(``association``), which it sees only as the ``Peer`` protocol below.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.answer_window import AnswerWindow
from dcmrecvd.serve.commitment_check import Commitment
from dcmrecvd.serve.receiving import Drained, Outcome, Sink
from dcmrecvd.serve.runtime import Receiver, Stats
from dcmrecvd.store.storage import Writer
from dcmrecvd.wire import dimse, negotiation
from dcmrecvd.wire.status import Status

#: Sends the response of the request being answered: (status, error comment).
Send = Callable[[Status, str], None]


class Peer(Protocol):
    """What a service may know of the association a request arrived on."""

    calling: str
    called: str
    peer: str
    rx: Receiver
    writer: Writer | None
    stats: Stats
    log: FilteringBoundLogger
    events: Callable[[dict[str, Any]], None] | None
    clock: Callable[[], dt.datetime]
    #: The ack journal, when stored objects are acknowledged through it.
    ack: AckJournal | None
    #: The address access rules saw (the PROXY header's client when there was one).
    host: str
    #: Storage Commitment, when enabled.
    commitment: Commitment | None
    #: Requests complete and not yet answered (flushed before waiting on another association).
    answers: AnswerWindow[Any]


@dataclass(slots=True)
class Call:
    """One request: its command, the presentation context it came on, when it began."""

    command: dimse.Command
    context: negotiation.AcceptedContext
    started: float


class Service(Protocol):
    """A DIMSE service as the driver uses it."""

    #: The request command fields (C-ECHO-RQ, C-STORE-RQ, N-ACTION-RQ...) it answers.
    command_fields: frozenset[int]

    def sink(self, peer: Peer, call: Call) -> Sink:
        """Where the request's dataset goes; a request without one is finished at once."""

    def answer(self, peer: Peer, call: Call, outcome: Outcome, sink: Sink, send: Send) -> None:
        """Respond (``send``) to a complete request, then log and emit what follows."""


class _Unsupported:
    """Any request command no service answers: 0x0211 (unrecognized operation)."""

    command_fields: frozenset[int] = frozenset()

    def sink(self, peer: Peer, call: Call) -> Sink:
        field = call.command.command_field
        return Drained(Status.UNRECOGNIZED_OPERATION, f"unsupported command 0x{field:04X}")

    def answer(self, peer: Peer, call: Call, outcome: Outcome, sink: Sink, send: Send) -> None:
        from dcmrecvd.serve.services.storage import SERVICE as storage

        storage.answer(peer, call, outcome, sink, send)  # counted and logged as a failed request


UNSUPPORTED: Service = _Unsupported()


def _registry() -> dict[int, Service]:
    from dcmrecvd.serve.services import storage, storage_commitment, verification

    table: dict[int, Service] = {}
    for service in (verification.SERVICE, storage.SERVICE, storage_commitment.SERVICE):  # one per service
        for field in service.command_fields:
            table[field] = service
    return table


#: Request command field -> the service that answers it.
SERVICES: dict[int, Service] = _registry()


def for_field(command_field: int) -> Service:
    """The service answering ``command_field``; ``UNSUPPORTED`` when none does."""
    return SERVICES.get(command_field, UNSUPPORTED)
