"""The upper-layer core, in-process: bytes in, events out, no socket.

Every stream is fed whole, one PDU at a time, byte by byte and in random
chunks (as gunicorn's tests/treq.py does for HTTP): framing bugs hide in
fragmentation, and the events must not depend on how the bytes arrive.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from peers import associate_rq, p_data, pdv, store_command
from splits import Split, by_byte, by_pdu, random_chunks, whole

from dcmrecvd.wire import dimse, pdu
from dcmrecvd.wire.upper_layer import (
    MAX_COMMAND_SET,
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
EXPLICIT = "1.2.840.10008.1.2.1"
RQ = associate_rq(CT, EXPLICIT)
RELEASE_RQ = bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0))


SPLITS: list[Split] = [whole, by_pdu, by_byte, random_chunks]


def established(contexts: tuple[int, ...] = (1,), peer_max_pdu: int = 0) -> UpperLayer:
    core = UpperLayer()
    assert [type(e) for e in core.feed(RQ)] == [AssociateRequest]
    core.accept(b"AC", contexts, peer_max_pdu)
    return core


def feed_all(core: UpperLayer, stream: bytes, split: Callable[[bytes], Iterator[bytes]]) -> list[Event]:
    """Feed in pieces; dataset views are copied at once, as the driver writes them before its next read."""
    events: list[Event] = []
    for piece in split(stream):
        for event in core.feed(bytearray(piece)):
            if isinstance(event, Pdv):
                event = Pdv(event.context_id, event.is_last, memoryview(bytes(event.data)))
            events.append(event)
    return events


def summary(events: list[Event]) -> list[tuple[object, ...]]:
    """The events with dataset pieces joined: what must not depend on fragmentation."""
    out: list[tuple[object, ...]] = []
    data = b""
    for event in events:
        if isinstance(event, Pdv):
            data += bytes(event.data)
            if event.is_last:
                out.append(("dataset", event.context_id, data))
                data = b""
        elif isinstance(event, Command):
            out.append(("command", event.context_id, event.command.command_field, event.command.message_id))
        else:
            out.append((type(event).__name__,))
    assert data == b"", "dataset pieces without a last one"
    return out


def store_stream(dataset: bytes, fragment: int, message_id: int = 1, pdu_size: int = 200) -> bytes:
    """A C-STORE: the command in two fragments, the dataset in ``fragment``-byte PDVs,
    several PDVs packed per P-DATA-TF of at most ``pdu_size`` bytes."""
    command = store_command(CT, f"1.2.3.{message_id}", message_id)
    out = p_data(pdv(command[:10], True, False)) + p_data(pdv(command[10:], True, True))
    pieces = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    pdvs = [pdv(p, False, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    batch: list[bytes] = []
    for item in pdvs:
        if batch and sum(map(len, batch)) + len(item) > pdu_size:
            out += p_data(*batch)
            batch = []
        batch.append(item)
    return out + p_data(*batch)


# ---------------------------------------------------------------------- negotiation phase


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_the_request_arrives_whole_however_it_is_cut(split: Callable[[bytes], Iterator[bytes]]) -> None:
    core = UpperLayer()
    events = feed_all(core, RQ, split)
    assert len(events) == 1 and isinstance(events[0], AssociateRequest)
    assert events[0].pdu == RQ
    assert core.state is State.AWAITING_DECISION and core.requested


def test_a_connection_that_sent_less_than_a_header_has_not_requested() -> None:
    core = UpperLayer()
    assert core.feed(RQ[:5]) == []
    assert not core.requested
    core.feed(RQ[5:6])
    assert core.requested


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (p_data(pdv(b"x", True, True)), pdu.REASON_UNEXPECTED_PDU),
        (b"\x99" + bytes(5), pdu.REASON_UNRECOGNIZED_PDU),
    ],
    ids=["p-data", "type-0x99"],
)
def test_anything_but_a_request_first_is_a_violation(first: bytes, reason: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        UpperLayer().feed(first)
    assert caught.value.reason == reason


def test_an_oversized_request_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        UpperLayer(max_request=1000).feed(struct.pack(">BxI", pdu.A_ASSOCIATE_RQ, 1001))


def test_bytes_sent_before_the_accept_are_kept_for_after_it() -> None:
    """A sender that does not wait for the A-ASSOCIATE-AC loses nothing."""
    core = UpperLayer()
    dataset = b"\x08\x00\x18\x00UI\x02\x001\x00"
    early = store_stream(dataset, 4)
    events = core.feed(RQ + early)
    assert [type(e) for e in events] == [AssociateRequest]
    assert core.feed(b"") == []  # nothing is parsed before the decision
    core.accept(b"AC", [1], 0)
    assert summary(core.feed(b"")) == [("command", 1, dimse.C_STORE_RQ, 1), ("dataset", 1, dataset)]


def test_reject_closes() -> None:
    core = UpperLayer()
    core.feed(RQ)
    assert core.reject(b"RJ") == b"RJ"
    assert core.state is State.CLOSED
    assert core.feed(p_data(pdv(b"x", True, True))) == []
    with pytest.raises(RuntimeError):
        core.respond(1, b"")


# ---------------------------------------------------------------------- data transfer


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_a_stream_of_stores_gives_the_same_events_however_it_is_cut(
    split: Callable[[bytes], Iterator[bytes]],
) -> None:
    datasets = [bytes(range(256)) * 3, b"", b"\x01" * 999]
    stream = b"".join(store_stream(d, 97, i + 1) for i, d in enumerate(datasets)) + RELEASE_RQ
    core = established()
    expected: list[tuple[object, ...]] = []
    for i, d in enumerate(datasets):
        expected += [("command", 1, dimse.C_STORE_RQ, i + 1), ("dataset", 1, d)]
    assert summary(feed_all(core, stream, split)) == [*expected, ("ReleaseRequest",)]
    assert core.state is State.AWAITING_RELEASE
    assert core.release() == pdu.release_rp_pdu()
    assert core.state is State.CLOSED


def test_dataset_pieces_are_views_of_the_fed_buffer_not_copies() -> None:
    """The receive-buffer contract: the core never copies dataset bytes."""
    core = established()
    buffer = bytearray(store_stream(b"\xab" * 500, 500))
    pieces = [e for e in core.feed(memoryview(buffer)) if isinstance(e, Pdv)]
    assert pieces and all(p.data.obj is buffer for p in pieces)
    buffer[-1] = 0xCD  # the view sees the buffer change: it is the buffer
    assert pieces[-1].data[-1] == 0xCD


def test_a_command_without_a_dataset_needs_none() -> None:
    core = established()
    events = core.feed(p_data(pdv(store_command(CT, "1.2.3", has_dataset=False), True, True)))
    assert [type(e) for e in events] == [Command] and not core.in_dataset
    assert [type(e) for e in core.feed(p_data(pdv(store_command(CT, "1.2.4"), True, True)))] == [Command]
    assert core.in_dataset


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (p_data(pdv(b"x", True, True, context_id=3)), "unknown presentation context 3"),
        (
            p_data(pdv(store_command(CT, "1.2"), True, True), pdv(b"\x00", True, True)),
            "while a dataset is pending",
        ),
        (p_data(pdv(b"\x00" * 8, False, True)), "without a matching command"),
        (
            p_data(pdv(b"\x00" * 4, True, False), pdv(b"\x00" * 4, True, True, context_id=5)),
            "different presentation",
        ),
        (p_data(pdv(bytes(12), True, True)), "undecodable command set"),
        (struct.pack(">BxI", 4, 4) + bytes(4), "ends inside a PDV header"),
        (struct.pack(">BxI", 4, 6) + struct.pack(">IBB", 100, 1, 3), "exceeds its PDU"),
        (struct.pack(">BxI", 4, 6) + struct.pack(">IBB", 1, 1, 3), "exceeds its PDU"),
        (struct.pack(">BxI", 2, 4) + bytes(4), "unexpected PDU type 0x02"),
        (struct.pack(">BxI", 0x42, 0), "unrecognised PDU type 0x42"),
    ],
    ids=[
        "unknown-context",
        "command-during-dataset",
        "dataset-without-command",
        "command-across-contexts",
        "bad-command-set",
        "short-pdv-header",
        "pdv-longer-than-pdu",
        "pdv-length-below-two",
        "associate-ac-in-transfer",
        "unknown-pdu-type",
    ],
)
@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_violations_are_caught_however_they_are_cut(
    stream: bytes, message: str, split: Callable[[bytes], Iterator[bytes]]
) -> None:
    core = established(contexts=(1, 5))
    with pytest.raises(ProtocolError, match=message):
        feed_all(core, stream, split)
    with pytest.raises(ProtocolError):  # nothing more is parsed once broken
        core.feed(p_data(pdv(b"x", True, True)))


def test_a_command_set_over_the_bound_is_refused_before_it_is_gathered() -> None:
    core = established()
    core.feed(p_data(pdv(b"\x00" * (MAX_COMMAND_SET // 2 + 1), True, False)))
    with pytest.raises(ProtocolError, match="command set too large"):  # its headers are enough to know
        core.feed(p_data(pdv(b"\x00" * (MAX_COMMAND_SET // 2), True, True))[:12])


def test_events_before_a_violation_are_handed_over_with_it() -> None:
    """A request that ended before the garbage is still answered by the driver."""
    core = established()
    with pytest.raises(ProtocolError) as caught:
        core.feed(store_stream(b"\x00" * 10, 10) + b"\x99" * 6)
    assert summary(caught.value.events) == [("command", 1, dimse.C_STORE_RQ, 1), ("dataset", 1, b"\x00" * 10)]
    assert core.respond(1, b"rsp")  # still answerable until the driver aborts
    core.abort(caught.value.reason)
    assert core.state is State.CLOSED


def test_release_in_the_middle_of_an_object() -> None:
    core = established()
    events = core.feed(
        p_data(pdv(store_command(CT, "1.2"), True, True), pdv(b"\x00" * 6, False, False)) + RELEASE_RQ
    )
    assert [type(e) for e in events] == [Command, Pdv, ReleaseRequest]
    assert core.in_dataset  # the driver drops the partial object before answering
    core.release()
    assert not core.in_dataset and core.state is State.CLOSED


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_abort_in_the_middle_of_an_object(split: Callable[[bytes], Iterator[bytes]]) -> None:
    core = established()
    stream = p_data(pdv(store_command(CT, "1.2"), True, True), pdv(b"\x00" * 6, False, False))
    events = feed_all(core, stream + bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 6)) + b"ignored", split)
    assert isinstance(events[-1], Abort) and (events[-1].source, events[-1].reason) == (2, 6)
    assert core.state is State.CLOSED
    assert core.feed(b"more") == []


def test_a_release_request_skips_its_body_whatever_its_length() -> None:
    core = established()
    assert [type(e) for e in core.feed(struct.pack(">BxI", 5, 3000) + bytes(2999))] == []
    assert [type(e) for e in core.feed(b"\x00")] == [ReleaseRequest]


def test_responses_fit_a_peer_max_pdu_of_64_bytes() -> None:
    core = established(peer_max_pdu=64)
    response = dimse.encode_response(dimse.C_STORE_RSP, 1, 0, CT, "1.2.3.4" * 10)
    out = core.respond(1, response)
    pos, gathered = 0, b""
    while pos < len(out):
        kind, length = pdu.PDU_HEADER.unpack_from(out, pos)
        assert kind == pdu.P_DATA_TF and length <= 64  # the maximum counts the variable field
        gathered += out[pos + 12 : pos + 6 + length]
        last = out[pos + 11] & 0x02
        pos += 6 + length
    assert gathered == response and last


def test_sending_in_the_wrong_state_is_a_bug_not_a_quiet_success() -> None:
    core = UpperLayer()
    with pytest.raises(RuntimeError):
        core.accept(b"AC", [1], 0)
    with pytest.raises(RuntimeError):
        core.release()
    core.feed(RQ)
    core.accept(b"AC", [1], 0)
    with pytest.raises(RuntimeError):
        core.release()
