"""Hostile and broken peers, from raw sockets: slots never leak, ARTIM bounds a whole request,
command sets we send ascend by tag."""

from __future__ import annotations

import socket
import struct
import time

from conftest import DaemonFactory, need, run, wait_for
from malformed import INSTANCE_UID, base_dataset, encode
from peers import (
    RawClient,
    all_slots_accepted,
    command_elements,
    p_data,
    pdv,
    store_command,
    trickle,
)
from peers import (
    associate_rq as pynetdicom_rq,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dcmrecvd.wire import pdu

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
LIMIT = 4


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(body)) + body


def _uid(value: str) -> bytes:
    return value.encode()


def associate_rq(transfer_syntaxes: list[str], sop: str = VERIFICATION) -> bytes:
    """An A-ASSOCIATE-RQ built by hand, so that it may break rules pynetdicom would not."""
    context = bytes((1, 0, 0, 0)) + _item(0x30, _uid(sop))
    for ts in transfer_syntaxes:
        context += _item(0x40, _uid(ts))
    user = _item(0x51, struct.pack(">I", 16384))
    body = (
        struct.pack(">H2x", 1)
        + b"ANY-SCP".ljust(16)
        + b"HOSTILE".ljust(16)
        + bytes(32)
        + _item(0x10, _uid("1.2.840.10008.3.1.1.1"))
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, len(body)) + body


def _reads_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _all_slots_free(port: int) -> None:
    """``LIMIT`` associations at once are all accepted (retrying while the last floods end)."""
    wait_for(lambda: all_slots_accepted(port, LIMIT), timeout=15, interval=0.2)


def test_no_transfer_syntax_is_a_protocol_error_and_frees_its_slot(daemons: DaemonFactory) -> None:
    d = daemons.start("--max-associations", str(LIMIT))
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(associate_rq([]))
            answer = _reads_until_closed(s)
            assert answer[:1] == bytes((pdu.A_ABORT,)), answer[:10]
    _all_slots_free(d.port)
    assert "internal error" not in d.log()
    assert "malformed A-ASSOCIATE-RQ" in d.log()


def test_peers_that_reset_before_the_answer_free_their_slots(daemons: DaemonFactory) -> None:
    d = daemons.start("--max-associations", str(LIMIT))
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(associate_rq([ImplicitVRLittleEndian]))
        s.close()  # RST, before or while the A-ASSOCIATE-AC is on its way
    _all_slots_free(d.port)
    assert d.proc.poll() is None


def test_silent_connection_is_closed_without_an_abort(daemons: DaemonFactory) -> None:
    d = daemons.start("-ta", "1")
    silent = RawClient(d.port)
    try:
        assert _reads_until_closed(silent.sock) == b""
    finally:
        silent.close()


def test_trickled_request_is_bounded_by_artim_and_stalls_nobody(daemons: DaemonFactory) -> None:
    d = daemons.start("-ta", "2")
    request = associate_rq([ImplicitVRLittleEndian])
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)

    def others_are_served(elapsed: float) -> None:
        if elapsed > 1:  # every read is on time, the whole is not; meanwhile others are served at once
            t = time.monotonic()
            assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
            assert time.monotonic() - t < 1.5

    try:
        closed_after = trickle(s, request, 0.1, others_are_served)
    finally:
        s.close()
    assert closed_after is not None, "a trickled A-ASSOCIATE-RQ was never dropped"
    assert closed_after < 6
    assert "no complete A-ASSOCIATE-RQ" in d.log()


def _command_tags(data: bytes) -> list[int]:
    return [tag for tag, _ in command_elements(data)]


def test_refused_store_response_elements_ascend(daemons: DaemonFactory) -> None:
    d = daemons.start()
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        client.send_pdv(client.store_command(CT, "1.2..3"), command=True, last=True)
        client.send_pdv(b"\x08\x00\x18\x00UI\x04\x001.2\x00", command=False, last=True)
        data = client.response_bytes()
    finally:
        client.close()
    tags = _command_tags(data)
    assert 0x00000902 in tags, "a refusal carries an Error Comment"
    assert tags == sorted(tags)


def test_non_ascii_uid_in_a_command_is_refused_and_echoed_byte_for_byte(daemons: DaemonFactory) -> None:
    """Found by the fuzzer: a command UID with a byte >= 0x80 made the response an internal error."""
    d = daemons.start()
    client = RawClient(d.port)
    bad = "1.2.\xff.4"
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        command = client.store_command(CT, "1.2.3.4").replace(b"1.2.3.4", bad.encode("latin-1"))
        client.send_pdv(command, command=True, last=True)
        client.send_pdv(b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00", command=False, last=True)
        data = client.response_bytes()
    finally:
        client.close()
    assert bad.encode("latin-1") in data, "the response echoes the request's UID"
    assert struct.pack("<HHIH", 0, 0x0900, 2, 0xC000) in data
    assert "internal error" not in d.log()


def _command(fields: list[tuple[int, bytes]]) -> bytes:
    body = b""
    for element, value in fields:
        value += b"\x00" * (len(value) % 2)
        body += struct.pack("<HHI", 0, element, len(value)) + value
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def test_every_kind_of_response_ascends_by_tag_with_a_true_group_length(daemons: DaemonFactory) -> None:
    d = daemons.start()
    client = RawClient(d.port)
    us = lambda value: struct.pack("<H", value)  # noqa: E731
    good = b"\x08\x00\x16\x00UI\x1a\x00" + CT.encode() + b"\x00" + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"
    requests: list[tuple[str, bytes, bytes | None, int]] = [
        ("echo", _command([(0x0100, us(0x0030)), (0x0110, us(1)), (0x0800, us(0x0101))]), None, 0x0000),
        ("store", client.store_command(CT, "1.2.3.4", 2), good, 0x0000),
        ("invalid UID", client.store_command(CT, "1.2..4", 3), good, 0xC000),
        ("other SOP class", client.store_command("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", 4), good, 0x0122),
        (
            "C-FIND",
            _command([(0x0002, CT.encode()), (0x0100, us(0x0020)), (0x0110, us(5)), (0x0800, us(0x0101))]),
            None,
            0x0211,
        ),
    ]
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        for name, command, dataset, expected in requests:
            client.send_pdv(command, command=True, last=True)
            if dataset is not None:
                client.send_pdv(dataset, command=False, last=True)
            data = client.response_bytes()
            tags = _command_tags(data)
            assert tags == sorted(tags), f"{name}: {[hex(t) for t in tags]}"
            assert tags[0] == 0x00000000
            assert struct.unpack_from("<I", data, 8)[0] == len(data) - 12, f"{name}: group length"
            status_at = data.index(struct.pack("<HH", 0, 0x0900))
            assert struct.unpack_from("<H", data, status_at + 8)[0] == expected, name
    finally:
        client.close()


def test_an_abort_in_the_same_bytes_as_a_whole_request_is_no_internal_error(daemons: DaemonFactory) -> None:
    """Found by the fuzzer: A-ASSOCIATE-RQ, a complete C-STORE and an A-ABORT in one segment.
    The object is stored (its bytes were all there); there is nobody left to answer."""
    d = daemons.start()
    ct = "1.2.840.10008.5.1.4.1.1.2"
    data = encode(base_dataset())
    abort = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0))
    burst = (
        pynetdicom_rq(ct, ExplicitVRLittleEndian)
        + p_data(pdv(store_command(ct, INSTANCE_UID), command=True, last=True))
        + p_data(pdv(data, command=False, last=True))
        + abort
    )
    client = RawClient(d.port)
    client.sock.sendall(burst)
    client.sock.settimeout(10)
    try:
        while client.sock.recv(65536):
            pass
    except OSError:
        pass
    client.close()
    wait_for(lambda: "assoc.aborted" in d.log() or "assoc.unanswered" in d.log(), timeout=10)
    assert "internal error" not in d.log(), d.log()[-3000:]
    assert run(["echoscu", "127.0.0.1", str(d.port)]).returncode == 0
