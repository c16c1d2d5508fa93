"""A long run with the daemon's resident memory sampled: is there a trend, and how large?

Several senders at once, each opening association after association and
sending small objects over each (the pattern that grew RSS by 14-22 MiB per
10,000 objects before the receive buffers were pooled).  A raw sender, so
that the sender is never the bottleneck: the dataset is encoded once and
only its fixed-length SOP Instance UID changes per object.

    python bench/soak.py [--objects 100000] [--senders 4] [--per-association 100]

Prints RSS samples, the RSS after warm-up (the first 10 % of objects), at the
end, and the least-squares trend in MiB per 10,000 objects after warm-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from datasets import make_dataset  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PROFILES = HERE.parent / "etc" / "storescp.cfg"
UID_ROOT = "1.2.826.0.1.3680043.2.1143.77."
UID_DIGITS = 12


def instance_uid(n: int) -> bytes:
    return f"{UID_ROOT}9{n:0{UID_DIGITS - 1}d}".encode()  # a component must not start with 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, tag, len(value)) + value


def store_command(instance: bytes, message_id: int) -> bytes:
    body = (
        _element(0x0002, CT.encode())
        + _element(0x0100, struct.pack("<H", 0x0001))
        + _element(0x0110, struct.pack("<H", message_id & 0xFFFF))
        + _element(0x0700, struct.pack("<H", 0))
        + _element(0x0800, struct.pack("<H", 0x0000))
        + _element(0x1000, instance)
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data(data: bytes, command: bool) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, 1, (0x01 if command else 0) | 0x02) + data
    return struct.pack(">BxI", 4, len(pdv)) + pdv


def associate_rq() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "SOAK"
    primitive.called_ae_title = "ANY-SCP"
    context = build_context(CT, [EXPLICIT_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


class Sender:
    """One connection at a time, ``per_association`` objects over each."""

    def __init__(self, port: int, template: bytes, placeholder: bytes) -> None:
        self.port = port
        self.head, self.tail = template.split(placeholder)
        self.rq = associate_rq()

    def _recv_pdu(self, sock: socket.socket) -> tuple[int, bytes]:
        header = self._recv(sock, 6)
        pdu_type, length = struct.unpack(">BxI", header)
        return pdu_type, self._recv(sock, length)

    @staticmethod
    def _recv(sock: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("receiver closed the connection")
            out += chunk
        return bytes(out)

    def association(self, numbers: range) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.rq)
            if self._recv_pdu(sock)[0] != 0x02:
                raise RuntimeError("association not accepted")
            for n in numbers:
                uid = instance_uid(n)
                sock.sendall(p_data(store_command(uid, n), True) + p_data(self.head + uid + self.tail, False))
                _type, body = self._recv_pdu(sock)
                status = _status(body[6:])
                if status != 0:
                    raise RuntimeError(f"object {n}: status 0x{status:04X}")
            sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
            self._recv_pdu(sock)


def _status(command: bytes) -> int:
    pos = 0
    while pos < len(command):
        _, element, length = struct.unpack_from("<HHI", command, pos)
        if element == 0x0900:
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    raise RuntimeError("no status in the response")


def template() -> tuple[bytes, bytes]:
    """A ~3 KB dataset and the placeholder UID inside it."""
    placeholder = instance_uid(0)
    ds = make_dataset(rows=32, columns=32, instance_uid=placeholder.decode())
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    data = buf.getvalue()
    assert data.count(placeholder) == 1
    return data, placeholder


@dataclass
class Soak:
    """Samples of (objects stored so far, daemon RSS in KiB)."""

    samples: list[tuple[int, int]] = field(default_factory=list)

    def warm(self, objects: int) -> list[tuple[int, int]]:
        return [s for s in self.samples if s[0] >= objects // 10]

    def trend_mib_per_10k(self, objects: int) -> float:
        """Least-squares slope of RSS after warm-up, in MiB per 10,000 objects."""
        points = self.warm(objects)
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
        return (sxy / sxx) * 10_000 / 1024 if sxx else 0.0

    def spread_mib(self, objects: int) -> float:
        """Highest minus lowest RSS after warm-up."""
        values = [y for _, y in self.warm(objects)]
        return (max(values) - min(values)) / 1024


def soak(port: int, pid: int, objects: int, senders: int, per_association: int, samples: int = 40) -> Soak:
    """Send ``objects`` objects from ``senders`` threads; sample the daemon's RSS as they go."""
    data, placeholder = template()
    result = Soak([(0, rss_kib(pid))])
    lock = threading.Lock()
    next_start = 0
    done = 0
    errors: list[BaseException] = []
    every = max(objects // samples, per_association)

    def worker() -> None:
        nonlocal next_start, done
        sender = Sender(port, data, placeholder)
        while not errors:
            with lock:
                start = next_start
                if start >= objects:
                    return
                end = next_start = min(start + per_association, objects)
            try:
                sender.association(range(start + 1, end + 1))
            except BaseException as exc:  # reported by the caller
                errors.append(exc)
                return
            with lock:
                before = done
                done += end - start
                if done // every != before // every:
                    result.samples.append((done, rss_kib(pid)))

    threads = [threading.Thread(target=worker) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    result.samples.sort()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--per-association", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None, help="default: a temp dir under bench/out")
    args = parser.parse_args()
    (HERE / "out").mkdir(exist_ok=True)
    output = args.output or Path(tempfile.mkdtemp(prefix="soak-", dir=HERE / "out"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Path(sys.executable).parent / "dcmrecvd"
    cmd = [
        str(daemon),
        "-od",
        str(output),
        "-xf",
        str(PROFILES),
        "Default",
        "--log-format",
        "json",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("dcmrecvd did not start") from None
                time.sleep(0.05)
        started = time.monotonic()
        result = soak(port, proc.pid, args.objects, args.senders, args.per_association)
        seconds = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)
        if args.output is None:
            shutil.rmtree(output, ignore_errors=True)
    print(
        f"{args.objects} objects, {args.senders} senders, "
        f"{args.per_association} per association, {seconds:.0f} s"
    )
    for objects, kib in result.samples:
        print(f"  {objects:>8} objects  RSS {kib / 1024:7.1f} MiB")
    warm = result.warm(args.objects)
    print(
        f"RSS at start {result.samples[0][1] / 1024:.1f} MiB, after warm-up {warm[0][1] / 1024:.1f} MiB, "
        f"at the end {result.samples[-1][1] / 1024:.1f} MiB"
    )
    print(
        f"trend after warm-up: {result.trend_mib_per_10k(args.objects):+.2f} MiB per 10,000 objects; "
        f"spread {result.spread_mib(args.objects):.1f} MiB"
    )


if __name__ == "__main__":
    main()
