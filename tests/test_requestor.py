"""The requestor core (wire.requestor) and the Part 10 meta reader, in-process: answers fed
whole and byte by byte, as a remote may send them, and what must be refused."""

from __future__ import annotations

import struct

import pytest
from peers import dataset_offset
from pydicom import dcmread
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from splits import by_byte, whole

from dcmrecvd.wire import dimse, negotiation, part10, pdu, requestor
from dcmrecvd.wire.profiles import load_profile
from dcmrecvd.wire.upper_layer import ProtocolError

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
PROFILES = __import__("pathlib").Path(__file__).resolve().parent.parent / "etc" / "storescp.cfg"
OFFERED = requestor.proposals([(CT, (EXPLICIT, IMPLICIT)), ("1.2.840.10008.1.1", (IMPLICIT,))])


def answer_of_our_acceptor(rq: bytes) -> bytes:
    """What dcmrecvd's own acceptor answers to the request: a real A-ASSOCIATE-AC."""
    decoded = AssociateRqPdu()
    decoded.decode(rq)
    request = negotiation.decode_request(rq)
    profile = load_profile(PROFILES, "Default")
    contexts = negotiation.acceptor_contexts(profile)
    return negotiation.negotiate(request, profile, contexts, ae_title="ARCHIVE", max_pdu=32768).pdu


def feed(core: requestor.Requestor, data: bytes, split: object) -> list[requestor.Event]:
    events: list[requestor.Event] = []
    for piece in split(data):  # type: ignore[operator]
        events += core.feed(piece)
    return events


@pytest.mark.parametrize("split", [whole, by_byte], ids=["whole", "by byte"])
def test_an_acceptance_a_response_and_a_release(split: object) -> None:
    rq = requestor.associate_rq("MODALITY", "ARCHIVE", OFFERED, 65536)
    assert negotiation.decode_request(rq).called_ae_title == "ARCHIVE"
    core = requestor.Requestor(OFFERED)
    (accepted,) = feed(core, answer_of_our_acceptor(rq), split)
    assert isinstance(accepted, requestor.Accepted) and accepted.peer_max_pdu == 32768
    assert accepted.contexts[1].abstract_syntax == CT and accepted.contexts[1].transfer_syntax in (
        EXPLICIT,
        IMPLICIT,
    )
    response = dimse.encode_response(dimse.C_STORE_RQ | 0x8000, 7, 0xA700, CT, "1.2.3", "disk full")
    (got,) = feed(core, pdu.command_pdu(1, response, peer_max_pdu=20), split)  # in many PDVs
    assert isinstance(got, requestor.Response) and got.context_id == 1
    assert (got.command.responding_to, got.command.status, got.command.error_comment) == (
        7,
        0xA700,
        "disk full",
    )
    assert core.release()[0] == pdu.A_RELEASE_RQ
    assert feed(core, pdu.release_rp_pdu(), split) == [requestor.Released()]


def test_a_rejection_and_an_abort_are_events() -> None:
    core = requestor.Requestor(OFFERED)
    rj = pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RJ, 4) + bytes((0, 2, 3, 2))
    assert core.feed(rj) == [requestor.Rejected(2, 3, 2)]
    core = requestor.Requestor(OFFERED)
    assert core.feed(pdu.abort_pdu(pdu.SOURCE_PROVIDER, 2)) == [requestor.Aborted(2, 2)]
    # An A-ASSOCIATE-AC that accepts nothing we offered is no association to use.
    core = requestor.Requestor(OFFERED)
    (empty,) = core.feed(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_AC, 4) + b"\xff" * 4)
    assert isinstance(empty, requestor.Accepted) and empty.contexts == {}


@pytest.mark.parametrize(
    "data",
    [
        pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 6) + pdu.PDV_HEADER.pack(2, 1, 3),  # data before the AC
        pdu.PDU_HEADER.pack(0x09, 0),  # no such PDU
        pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_AC, 1 << 24),  # a PDU far larger than any answer
    ],
    ids=["p-data first", "unknown pdu", "huge"],
)
def test_what_breaks_the_rules_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        requestor.Requestor(OFFERED).feed(data)


def test_requests_encode_as_the_acceptor_decodes_them() -> None:
    rq = dimse.decode(dimse.encode_request(dimse.C_STORE_RQ, 9, CT, "1.2.3.4", has_dataset=True))
    assert (rq.command_field, rq.message_id, rq.affected_sop_class_uid, rq.affected_sop_instance_uid) == (
        dimse.C_STORE_RQ,
        9,
        CT,
        "1.2.3.4",
    )
    assert rq.has_dataset
    echo = dimse.decode(dimse.encode_request(dimse.C_ECHO_RQ, 1, "1.2.840.10008.1.1"))
    assert echo.command_field == dimse.C_ECHO_RQ and not echo.has_dataset
    header = requestor.data_pdu_header(3, 100, command=False, last=True)
    assert struct.unpack(">BxI", header[:6]) == (pdu.P_DATA_TF, 106) and header[10:12] == bytes((3, 2))


def test_the_meta_reader_finds_the_dataset_where_pydicom_does(tmp_path: object) -> None:
    from datasets import make_dataset, write

    path = write(make_dataset(rows=8, columns=8), tmp_path / "x.dcm")  # type: ignore[operator]
    raw = path.read_bytes()
    meta = part10.read_meta(raw[: part10.META_READ])
    ds = dcmread(path, stop_before_pixels=True)
    assert meta.dataset_offset == dataset_offset(raw)
    assert (meta.transfer_syntax_uid, meta.sop_class_uid, meta.sop_instance_uid) == (
        ds.file_meta.TransferSyntaxUID,
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ours = part10.meta_header(CT, "1.2.3", EXPLICIT, "CALLING", "CALLED") + b"\x08\x00"
    assert part10.read_meta(ours).dataset_offset == len(ours) - 2
    with pytest.raises(part10.NotPart10):
        part10.read_meta(b"\x00" * 200)
