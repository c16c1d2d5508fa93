"""The two units before an association exists, in-process: the prelude (PROXY header and
ARTIM over a socketpair) and admission (access, slots, watermark, negotiation, and the
record of each answer), and the services registry the driver dispatches through."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import structlog
from peers import associate_rq
from test_association import make_runtime

from dcmrecvd.conf.config import Layer, build
from dcmrecvd.serve import admission, prelude, services
from dcmrecvd.serve.runtime import Stats, prepare
from dcmrecvd.wire import dimse, negotiation
from dcmrecvd.wire.upper_layer import ProtocolError

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
PROFILES = Path(__file__).resolve().parent.parent / "etc" / "storescp.cfg"
LOG = structlog.get_logger("test")


def proxy_runtime(output: Path, trusted: list[str]) -> object:
    layer = Layer(
        "test",
        {
            "output": {"directory": str(output)},
            "network": {"proxy_protocol": "v1", "trusted_proxies": trusted},
        },
    )
    return prepare(build([layer]))


def arrive(rt: object, sent: bytes, host: str = "127.0.0.1", artim: float = 5.0) -> prelude.Arrival | None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(sent)
        if artim >= 1.0:  # said all it will say (the ARTIM case stays silent instead)
            theirs.shutdown(socket.SHUT_WR)
        return prelude.arrive(ours, f"{host}:4000", host, rt, time.monotonic() + artim, LOG)  # type: ignore[arg-type]
    finally:
        theirs.close()


def test_a_proxy_header_from_a_trusted_balancer_names_the_client(tmp_path: Path) -> None:
    rt = proxy_runtime(tmp_path, ["127.0.0.0/8"])
    arrival = arrive(rt, b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 104\r\n")
    assert arrival is not None and (arrival.host, arrival.peer) == ("198.51.100.7", "198.51.100.7:40000")


@pytest.mark.parametrize(
    ("sent", "host", "artim"),
    [
        (b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 104\r\n", "192.0.2.9", 5.0),  # not a trusted proxy
        (b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n", "127.0.0.1", 5.0),  # a broken header
        (b"", "127.0.0.1", 5.0),  # closed before a header: a port probe
        (b"PROXY TCP4 198.51.100.7", "127.0.0.1", 0.3),  # half a header, then silence: ARTIM
    ],
    ids=["untrusted", "malformed", "probe", "artim"],
)
def test_a_connection_that_fails_the_prelude_is_refused(
    tmp_path: Path, sent: bytes, host: str, artim: float
) -> None:
    rt = proxy_runtime(tmp_path, ["127.0.0.0/8"])
    started = time.monotonic()
    assert arrive(rt, sent, host, artim) is None
    assert time.monotonic() - started < artim + 1.0


def test_without_proxy_or_tls_the_connection_arrives_as_it_is(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    arrival = arrive(rt, b"")
    assert arrival is not None and arrival.host == "127.0.0.1"


def decide(rt: object, raw: bytes, slots: list[bool], host: str = "127.0.0.1") -> admission.Decision:
    stats = Stats()
    decision = admission.decide(raw, rt, host, lambda: slots.pop(0), stats, LOG)  # type: ignore[arg-type]
    assert stats.rejected == (0 if decision.outcome.accepted else 1)
    return decision


def test_admission_accepts_and_names_the_receiver(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    decision = decide(rt, associate_rq(CT, EXPLICIT, "ARCHIVE", 16384, "MODALITY"), [True])
    assert decision.outcome.accepted and (decision.calling, decision.called) == ("MODALITY", "ARCHIVE")
    assert [c.abstract_syntax for c in decision.outcome.contexts.values()] == [CT]


def test_no_slot_is_a_transient_local_limit(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    decision = decide(rt, associate_rq(CT, EXPLICIT, "ARCHIVE", 16384, "MODALITY"), [False])
    assert decision.outcome.reject == negotiation.REJECT_LOCAL_LIMIT


def test_access_is_decided_before_a_slot_is_taken(tmp_path: Path) -> None:
    layer = Layer(
        "test",
        {
            "output": {"directory": str(tmp_path)},
            "association": {"config_file": str(PROFILES), "profile": "Default"},
            "access": {"default": "deny"},
        },
    )
    rt = prepare(build([layer]))
    slots: list[bool] = []  # asking for one would fail the test: pop from an empty list
    decision = decide(rt, associate_rq(CT, EXPLICIT, "ARCHIVE", 16384, "MODALITY"), slots)
    assert decision.outcome.reject is not None and decision.outcome.reject[:2] == (0x01, 0x01)


def test_an_undecodable_request_is_a_protocol_error(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    with pytest.raises(ProtocolError):
        decide(rt, b"\x01\x00\x00\x00\x00\x04garbage", [True])


def test_each_command_field_has_one_service_and_the_rest_are_unsupported() -> None:
    assert services.for_field(dimse.C_ECHO_RQ).command_fields == {dimse.C_ECHO_RQ}
    assert services.for_field(dimse.C_STORE_RQ).command_fields == {dimse.C_STORE_RQ}
    assert services.for_field(0x0020) is services.UNSUPPORTED  # C-FIND-RQ: not ours
    fields = [f for service in set(services.SERVICES.values()) for f in service.command_fields]
    assert len(fields) == len(set(fields))  # no field claimed twice
