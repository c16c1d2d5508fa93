"""Pipelined C-STOREs: throughput against the asynchronous operations window.

A raw upper-layer sender (no toolkit sends C-STOREs pipelined: storescu,
pynetdicom and dcmsend all wait for each response) proposes an asynchronous
operations window of W (W = 1: none proposed) and keeps up to W requests
outstanding on one association.  Sent to dcmrecvd and to DCMTK's dcmrecv in the
same run (dcmrecv negotiates no window and answers one request at a time; a
sender that pipelines anyway is still served, from its socket buffer), paired
ratio and receiver CPU per object.

    python bench/pipelined.py [--windows 1,2,4,8,16] [--set small] [--reps 3]
"""

from __future__ import annotations

import argparse
import collections
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import (  # noqa: E402
    SETS,
    cpu_seconds,
    ensure_data,
    fresh_output,
    start_receiver,
    verify,
)


def dataset_of(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, encoded dataset) of a Part 10 file."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True)
    pos = 132
    while struct.unpack_from("<H", raw, pos)[0] == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            pos += 12 + struct.unpack_from("<I", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return str(meta.SOPClassUID), str(meta.SOPInstanceUID), str(meta.file_meta.TransferSyntaxUID), raw[pos:]


def element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, tag, len(value)) + value


def store_rq(sop_class: str, instance: str, message_id: int) -> bytes:
    body = (
        element(0x0002, sop_class.encode())
        + element(0x0100, struct.pack("<H", 0x0001))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0700, struct.pack("<H", 0))
        + element(0x0800, struct.pack("<H", 0))
        + element(0x1000, instance.encode())
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data(context_id: int, data: bytes, command: bool, max_pdu: int) -> bytes:
    out = bytearray()
    room = max_pdu - 6
    for start in range(0, max(len(data), 1), room):
        piece = data[start : start + room]
        control = (1 if command else 0) | (2 if start + room >= len(data) else 0)
        pdv = struct.pack(">IBB", len(piece) + 2, context_id, control) + piece
        out += struct.pack(">BxI", 4, len(pdv)) + pdv
    return bytes(out)


class Pipeliner:
    def __init__(self, port: int, sop_class: str, syntax: str, window: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rq = A_ASSOCIATE()
        rq.application_context_name = "1.2.840.10008.3.1.1.1"
        rq.calling_ae_title, rq.called_ae_title = "PIPELINER", "ANY-SCP"
        context = build_context(sop_class, [syntax])
        context.context_id = 1
        rq.presentation_context_definition_list = [context]
        length = MaximumLengthNotification()
        length.maximum_length_received = 16384
        items: list[object] = [length]
        if window > 1:
            proposal = AsynchronousOperationsWindowNegotiation()
            proposal.maximum_number_operations_invoked = window
            proposal.maximum_number_operations_performed = 1
            items.append(proposal)
        rq.user_information = items  # type: ignore[assignment]
        self.sock.sendall(A_ASSOCIATE_RQ(rq).encode())
        kind, _answer = self.read_pdu()
        if kind != 2:
            raise RuntimeError(f"association not accepted (PDU type {kind})")
        self.max_pdu = 16384
        self.buffer = b""

    def read_pdu(self) -> tuple[int, bytes]:
        header = self.exact(6)
        kind, length = struct.unpack(">BxI", header)
        return kind, self.exact(length)

    def exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                raise ConnectionError("closed")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read_status(self) -> int:
        data = b""
        while True:
            kind, body = self.read_pdu()
            if kind != 4:
                raise RuntimeError(f"PDU type {kind} instead of a response")
            data += body[6:]
            if body[5] & 2:
                break
        pos = 0
        while pos < len(data):
            _g, elem, length = struct.unpack_from("<HHI", data, pos)
            if elem == 0x0900:
                return int(struct.unpack_from("<H", data, pos + 8)[0])
            pos += 8 + length
        raise RuntimeError("no status")

    def send_all(self, objects: list[tuple[str, str, str, bytes]], window: int) -> None:
        outstanding: collections.deque[int] = collections.deque()
        for i, (sop_class, instance, _ts, dataset) in enumerate(objects):
            while len(outstanding) >= window:
                outstanding.popleft()
                if self.read_status() != 0:
                    raise RuntimeError("a C-STORE failed")
            message = p_data(1, store_rq(sop_class, instance, i % 65535 + 1), True, self.max_pdu)
            self.sock.sendall(message + p_data(1, dataset, False, self.max_pdu))
            outstanding.append(i)
        while outstanding:
            outstanding.popleft()
            if self.read_status() != 0:
                raise RuntimeError("a C-STORE failed")
        self.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        self.read_pdu()
        self.sock.close()


def run_once(
    which: str, folder: Path, objects: list[tuple[str, str, str, bytes]], window: int
) -> tuple[float, float]:
    out = fresh_output(after_deletions=False)
    proc, port = start_receiver(which, out)
    try:
        before = cpu_seconds(proc.pid)
        start = time.monotonic()
        Pipeliner(port, objects[0][0], objects[0][2], window).send_all(objects, window)
        seconds = time.monotonic() - start
        cpu = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
    verify(folder, out)
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", default="1,2,4,8,16")
    parser.add_argument("--set", default="small", choices=sorted(SETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--count", type=int, default=0, help="objects (default: the whole set)")
    args = parser.parse_args()
    label, count = SETS[args.set]
    folder = ensure_data(args.set, count)
    files = sorted(folder.iterdir())[: args.count or None]
    if args.count:
        label = f"{args.count} of {label}"
        folder = fresh_output(after_deletions=False)
        for f in files:
            (folder / f.name).symlink_to(f)
    objects = [dataset_of(f) for f in files]
    print(f"pipelined C-STOREs, {label}, PDU 16384, one association")
    heads = ("dcmrecv/s", "cpu ms/obj", "dcmrecvd/s", "cpu ms/obj")
    print(f"{'window':>6}  {heads[0]:>9} {heads[1]:>10}  {heads[2]:>10} {heads[3]:>10}  {'ratio':>6}")
    for window in map(int, args.windows.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {"dcmrecv": [], "dcmrecvd": []}
        for rep in range(args.reps):
            for which in ("dcmrecv", "dcmrecvd") if rep % 2 == 0 else ("dcmrecvd", "dcmrecv"):
                runs[which].append(run_once(which, folder, objects, window))
        n = len(objects)
        rate = {w: n / statistics.median(s for s, _ in r) for w, r in runs.items()}
        cpu = {w: 1000 * statistics.median(c for _, c in r) / n for w, r in runs.items()}
        paired = statistics.median(
            a[0] / b[0] for a, b in zip(runs["dcmrecv"], runs["dcmrecvd"], strict=True)
        )
        print(
            f"{window:>6}  {rate['dcmrecv']:>9.0f} {cpu['dcmrecv']:>10.3f}  {rate['dcmrecvd']:>10.0f}"
            f" {cpu['dcmrecvd']:>10.3f}  {paired:>5.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
