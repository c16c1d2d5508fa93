"""Negotiation, in-process: an A-ASSOCIATE-RQ's bytes in, an AC or RJ's bytes out."""

from __future__ import annotations

from pathlib import Path

import pytest
from peers import associate_rq

from dcmrecvd.wire import negotiation, pdu, profiles

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
PROFILE = profiles.with_verification(
    profiles.load_profile(Path(__file__).resolve().parent.parent / "etc" / "storescp.cfg", "Default")
)


def decide(raw: bytes, ae_title: str = "") -> negotiation.Outcome:
    request = negotiation.decode_request(raw)
    return negotiation.negotiate(
        request, PROFILE, negotiation.acceptor_contexts(PROFILE), ae_title=ae_title, max_pdu=16384
    )


def test_the_request_is_read_as_sent() -> None:
    request = negotiation.decode_request(
        associate_rq(CT, EXPLICIT, called="PACS", calling="CT1", max_pdu=4096)
    )
    assert (request.calling_ae_title, request.called_ae_title, request.peer_max_pdu) == ("CT1", "PACS", 4096)


def test_a_supported_context_is_accepted_with_its_transfer_syntax() -> None:
    outcome = decide(associate_rq(CT, EXPLICIT, context_id=7))
    assert outcome.accepted and outcome.pdu[0] == pdu.A_ASSOCIATE_AC
    assert outcome.contexts == {7: negotiation.AcceptedContext(7, CT, EXPLICIT)}


def test_nothing_acceptable_is_a_rejection_with_dcmrecvs_reason() -> None:
    outcome = decide(associate_rq("1.2.3.4.5.6", EXPLICIT))
    assert not outcome.accepted and outcome.reject == negotiation.REJECT_NO_REASON
    assert outcome.pdu == pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RJ, 4) + bytes(
        (0, *negotiation.REJECT_NO_REASON)
    )


def test_a_wrong_called_title_is_rejected_when_one_is_required() -> None:
    assert (
        decide(associate_rq(CT, EXPLICIT, called="OTHER"), ae_title="PACS").reject
        == negotiation.REJECT_CALLED_AET
    )
    assert decide(associate_rq(CT, EXPLICIT, called="PACS"), ae_title="PACS").accepted


@pytest.mark.parametrize("raw", [b"", b"\x01\x00\x00\x00\x00\x02\x00\x01"])
def test_garbage_is_a_bad_request_not_a_crash(raw: bytes) -> None:
    with pytest.raises(negotiation.BadRequest):
        negotiation.decode_request(raw)


def window_reply(outcome: negotiation.Outcome) -> tuple[int, int] | None:
    """(invoked, performed) of the A-ASSOCIATE-AC's asynchronous operations window item."""
    raw = outcome.pdu
    at = raw.find(b"\x53\x00\x00\x04")
    return None if at < 0 else (int.from_bytes(raw[at + 4 : at + 6]), int.from_bytes(raw[at + 6 : at + 8]))


@pytest.mark.parametrize(
    ("proposed", "configured", "answered"),
    [(0, 8, None), (4, 8, (1, 4)), (32, 8, (1, 8)), (5, 1, (1, 1))],
    ids=["none-proposed", "smaller-than-ours", "capped-at-ours", "disabled"],
)
def test_the_asynchronous_operations_window(
    proposed: int, configured: int, answered: tuple[int, int] | None
) -> None:
    request = negotiation.decode_request(associate_rq(CT, EXPLICIT, window=proposed))
    outcome = negotiation.negotiate(
        request,
        PROFILE,
        negotiation.acceptor_contexts(PROFILE),
        ae_title="",
        max_pdu=16384,
        window=configured,
    )
    assert window_reply(outcome) == answered
    assert outcome.window == (answered[1] if answered else 1)
