"""Test-side DICOM peers: pynetdicom as SCU, a raw upper-layer client for bad input,
and helpers to compare what was sent with what was stored."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from dcmrecvd.wire import dimse, pdu


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a Part 10 file (after preamble, DICM and group 2)."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            return pos
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    return pos


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, exactly as stored."""
    data = path.read_bytes()
    return data[dataset_offset(data) :]


def associate(
    port: int,
    contexts: list[tuple[str, list[str]]],
    called: str = "ANY-SCP",
    calling: str = "PYNETDICOM",
    max_pdu: int = 16384,
) -> Association:
    """A pynetdicom association with the given (SOP class, transfer syntaxes)."""
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = max_pdu
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=called)


def send_file(port: int, path: Path, **kwargs: str) -> int:
    """Send one file as-is (no decoding) with pynetdicom; return the status."""
    ds = dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    assoc = associate(port, [(str(ds.SOPClassUID), [ts])], **kwargs)
    assert assoc.is_established, "association not established"
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def associate_rq(
    sop_class: str,
    transfer_syntax: str,
    called: str = "ANY-SCP",
    max_pdu: int = 16384,
    calling: str = "RAW",
    context_id: int = 1,
    window: int = 0,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (encoded by pynetdicom),
    and an asynchronous operations window of ``window`` requests when it is not 0."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(sop_class, [transfer_syntax])
    context.context_id = context_id
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    items: list[object] = [max_length]
    if window:
        proposal = AsynchronousOperationsWindowNegotiation()
        proposal.maximum_number_operations_invoked = window
        proposal.maximum_number_operations_performed = 1
        items.append(proposal)
    primitive.user_information = items
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def store_command(sop_class: str, sop_instance: str, message_id: int = 1, has_dataset: bool = True) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian), with its group length."""

    def elem(tag: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHI", 0, tag, len(value)) + value

    body = (
        elem(0x0002, sop_class.encode())
        + elem(0x0100, struct.pack("<H", dimse.C_STORE_RQ))
        + elem(0x0110, struct.pack("<H", message_id))
        + elem(0x0700, struct.pack("<H", 0))
        + elem(0x0800, struct.pack("<H", 0x0000 if has_dataset else dimse.NO_DATASET))
        + elem(0x1000, sop_instance.encode())
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def pdv(data: bytes, command: bool, last: bool, context_id: int = 1) -> bytes:
    """One presentation data value item."""
    control = (0x01 if command else 0) | (0x02 if last else 0)
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU carrying ``pdvs``."""
    body = b"".join(pdvs)
    return struct.pack(">BxI", pdu.P_DATA_TF, len(body)) + body


class RawClient:
    """Speaks the upper layer by hand, to send what no well-behaved SCU would."""

    def __init__(
        self,
        port: int = 0,
        timeout: float = 10.0,
        source: str = "",
        prefix: bytes = b"",
        sock: socket.socket | None = None,
    ) -> None:
        """``source``: a loopback address to connect from; ``prefix``: bytes sent first (a PROXY
        header); ``sock``: speak on this connected socket instead (a socketpair)."""
        if sock is None:
            address = (source, 0) if source else None
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        if prefix:
            self.sock.sendall(prefix)
        #: The body of the last answer to an A-ASSOCIATE-RQ (for RJ result/source/reason).
        self.answer = b""

    def associate(
        self,
        sop_class: str,
        transfer_syntax: str,
        called: str = "ANY-SCP",
        max_pdu: int = 16384,
        calling: str = "RAW",
    ) -> int:
        """Send an A-ASSOCIATE-RQ; return the PDU type of the answer."""
        self.sock.sendall(associate_rq(sop_class, transfer_syntax, called, max_pdu, calling))
        pdu_type, self.answer = self.read_pdu()
        return pdu_type

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        pdu_type, length = pdu.PDU_HEADER.unpack(header)
        return pdu_type, self._recv_exact(length)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def store_command(self, sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
        """A C-STORE-RQ command set (Implicit VR Little Endian)."""
        return store_command(sop_class, sop_instance, message_id)

    def send_pdv(self, data: bytes, command: bool, last: bool, context_id: int = 1) -> None:
        self.sock.sendall(p_data(pdv(data, command, last, context_id)))

    def response_pdus(self) -> list[bytes]:
        """The P-DATA-TF PDU bodies that carry one response command set."""
        bodies = []
        while True:
            pdu_type, body = self.read_pdu()
            assert pdu_type == pdu.P_DATA_TF, f"PDU type {pdu_type}"
            bodies.append(body)
            if body[5] & 0x02:  # the (only) PDV of this PDU ends the command set
                return bodies

    def response(self) -> dict[int, bytes]:
        """Read a response command set (however fragmented): element number -> value."""
        return {tag & 0xFFFF: value for tag, value in command_elements(self.response_bytes())}

    def response_bytes(self) -> bytes:
        """Read a response command set (however fragmented): its encoded elements."""
        return b"".join(body[6:] for body in self.response_pdus())

    def response_status(self) -> int:
        """Read a response command set (however fragmented); return its status."""
        status = self.response().get(0x0900)
        assert status is not None, "no status in response"
        return int(struct.unpack("<H", status)[0])

    def close(self) -> None:
        self.sock.close()


def command_elements(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, value) of each element of an Implicit VR Little Endian command set, in order
    (a truncated last element is dropped: the fuzzer reads what it gets)."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        out.append((group << 16 | element, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    return out


def send_exact(port: int, path: Path, fragment: int = 16000) -> int:
    """Send a file's dataset bytes exactly as stored in it, fragmented; return the status."""
    ds = dcmread(path, stop_before_pixels=True)
    data = dataset_bytes(path)
    client = RawClient(port)
    try:
        assert (
            client.associate(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) == pdu.A_ASSOCIATE_AC
        )
        client.send_pdv(client.store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID)), True, True)
        for start in range(0, len(data), fragment):
            chunk = data[start : start + fragment]
            client.send_pdv(chunk, command=False, last=start + fragment >= len(data))
        status = client.response_status()
        client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        client.read_pdu()
        return status
    finally:
        client.close()


def all_slots_accepted(port: int, slots: int) -> bool:
    """``slots`` Verification associations opened at once are all accepted (then released)."""
    held = [associate(port, [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]) for _ in range(slots)]
    try:
        return all(a.is_established for a in held)
    finally:
        for a in held:
            if a.is_established:
                a.release()
            else:
                a.abort()


def trickle(
    sock: socket.socket,
    data: bytes,
    interval: float,
    meanwhile: Callable[[float], None] = lambda elapsed: None,
) -> float | None:
    """Send ``data`` a byte every ``interval`` s; seconds until the peer closed (None: never).

    ``meanwhile(elapsed)`` runs between bytes: where a test shows that others are served.
    """
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes((byte,)))
        except OSError:
            return time.monotonic() - start
        sock.settimeout(interval)
        try:
            if sock.recv(100) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        meanwhile(time.monotonic() - start)
    return None


#: storescu's option for the transfer syntax it proposes (and converts the files to).
_STORESCU_SYNTAX = {"1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe"}


def storescu_send(port: int, datasets: list[Any], calling: str = "STORESCU", syntax: str = "") -> list[int]:
    """Send ``datasets`` in order with DCMTK's storescu on one association; [0x0000] * n, or
    AssertionError with storescu's own words.  (pynetdicom's requestor sometimes hands a
    C-STORE-RSP to its reactor instead of the waiting request on a loaded machine, then times
    out: seen in CI with 60 objects; storescu does not.)"""
    with tempfile.TemporaryDirectory(prefix="storescu-") as folder:
        paths = []
        for i, ds in enumerate(datasets):
            paths.append(Path(folder) / f"{i:06d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        argv = ["storescu", "-aet", calling, *([_STORESCU_SYNTAX[syntax]] if syntax else [])]
        result = subprocess.run(
            [*argv, "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    assert result.returncode == 0, f"storescu failed: {result.stderr[-2000:]}"
    return [0x0000] * len(datasets)
