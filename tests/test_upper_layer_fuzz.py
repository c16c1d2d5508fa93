"""A fuzz target for the upper-layer core (hypothesis): whatever bytes arrive, however cut,
the core raises nothing but ``ProtocolError`` and never yields an event the state machine
forbids.  ``make test`` runs a few hundred examples; ``make fuzz`` sets
``DCMRECVD_CORE_FUZZ_EXAMPLES`` for a longer run."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import associate_rq, p_data, pdv, store_command

from dcmrecvd.wire.upper_layer import (
    Abort,
    AssociateRequest,
    Command,
    Event,
    Pdv,
    ProtocolError,
    ReleaseRequest,
    State,
    UpperLayer,
)

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
EXAMPLES = int(os.environ.get("DCMRECVD_CORE_FUZZ_EXAMPLES", "300"))
RQ = associate_rq(CT, "1.2.840.10008.1.2.1")

# Well-formed pieces of a conversation, to be shuffled, repeated and corrupted.
PIECES = [
    p_data(pdv(store_command(CT, "1.2.3"), True, True)),
    p_data(pdv(store_command(CT, "1.2.3")[:20], True, False)),
    p_data(pdv(store_command(CT, "1.2.3")[20:], True, True)),
    p_data(pdv(store_command(CT, "1.2.3", has_dataset=False), True, True)),
    p_data(pdv(b"\x08\x00\x16\x00UI\x02\x001\x00", False, False)),
    p_data(pdv(b"\x08\x00\x18\x00UI\x02\x002\x00", False, True)),
    p_data(pdv(b"", False, True), pdv(b"", True, False)),
    p_data(pdv(b"x", False, True, context_id=3)),
    bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)),
    bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 1)),
    bytes((4, 0, 0, 0, 0, 8, 0, 0, 0, 9, 1, 3)),
]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = [RQ] if draw(st.booleans()) else []
    parts += draw(st.lists(st.sampled_from(PIECES) | st.binary(max_size=24), max_size=12))
    stream = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 4))):  # corrupt a few bytes
        if stream:
            stream[draw(st.integers(0, len(stream) - 1))] = draw(st.integers(0, 255))
    cuts = draw(st.lists(st.integers(1, 64), max_size=40))
    return bytes(stream), cuts


class Oracle:
    """What a legal event sequence looks like, checked event by event."""

    def __init__(self) -> None:
        self.requested = self.over = False
        self.dataset_context = 0

    def check(self, core: UpperLayer, event: Event) -> None:
        assert not self.over, f"{event} after the end"
        if isinstance(event, AssociateRequest):
            assert not self.requested, "a second A-ASSOCIATE-RQ event"
            self.requested = True
            return
        assert self.requested, f"{event} before the request"
        if isinstance(event, Command):
            assert not self.dataset_context, "a command inside a dataset"
            assert event.context_id in (1,)
            self.dataset_context = event.context_id if event.command.has_dataset else 0
        elif isinstance(event, Pdv):
            assert event.context_id == self.dataset_context, "a dataset piece without its command"
            if event.is_last:
                self.dataset_context = 0
        elif isinstance(event, ReleaseRequest | Abort):
            self.over = True
            assert core.state in (State.AWAITING_RELEASE, State.CLOSED)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_the_core_raises_only_protocol_errors_and_keeps_its_state_machine(
    case: tuple[bytes, list[int]],
) -> None:
    stream, cuts = case
    core = UpperLayer(max_request=64 * 1024)
    oracle = Oracle()
    pos = 0
    try:
        for cut in [*cuts, len(stream)]:
            for event in core.feed(bytearray(stream[pos : pos + cut])):
                oracle.check(core, event)
                if isinstance(event, AssociateRequest):
                    core.accept(b"AC", [1], 0)
                    for held in core.feed(b""):
                        oracle.check(core, held)
            pos += cut
            if pos >= len(stream):
                break
    except ProtocolError as exc:
        assert 0 <= exc.reason <= 6
        for event in exc.events:  # the events before the violation obey the same rules
            oracle.check(core, event)
