"""Verification (C-ECHO): the smallest service, and the worked example of one.

Always accepted at negotiation, as in dcmrecv.  A C-ECHO-RQ carries no
dataset; one that claims to is drained unread and still answered with success.
"""

from __future__ import annotations

from dcmrecvd.serve.receiving import Drained, Outcome, Sink
from dcmrecvd.serve.services import Call, Peer, Send
from dcmrecvd.wire import dimse
from dcmrecvd.wire.status import Status


class Verification:
    command_fields = frozenset({dimse.C_ECHO_RQ})

    def sink(self, peer: Peer, call: Call) -> Sink:
        return Drained(Status.SUCCESS)

    def answer(self, peer: Peer, call: Call, outcome: Outcome, sink: Sink, send: Send) -> None:
        send(Status.SUCCESS, "")
        peer.log.info("echo", msg_id=call.command.message_id)


SERVICE = Verification()
