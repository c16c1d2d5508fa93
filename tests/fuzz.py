"""A seeded fuzzer against the whole association: mutated A-ASSOCIATE-RQs and P-DATA streams
sent to a real daemon over TCP, with oracles that decide whether the daemon got it right.

Each case starts from a well-formed conversation (an A-ASSOCIATE-RQ, or an association followed
by a C-STORE of a small dataset, a C-ECHO and an A-RELEASE-RQ), mutates it (bit flips, boundary
bytes, length fields, truncation, insertion, duplication, splicing), sends it in random pieces,
then either half-closes, resets or just waits.  After every ``check_every`` cases and at the end:

- the daemon is alive and its log holds no "internal error";
- every association slot is free: ``max_associations`` associations at once are all accepted;
- no temp file is left behind, and every file under a final name is one whose structure our
  reference decoder (pydicom) reads, with a valid SOP Instance UID: garbage is never stored;
- the daemon's RSS stays bounded.

    python tests/fuzz.py [--cases 10000] [--seed 1]      (also: make fuzz)

A failure prints the seed and case number; ``--cases N --seed S`` replays it.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import DaemonFactory, wait_for  # noqa: E402
from malformed import INSTANCE_UID, base_dataset, encode  # noqa: E402
from peers import RawClient, all_slots_accepted, command_elements  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from dcmrecvd.wire import pdu, uids  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
TEMP_PREFIX = ".dcmrecvd-"
SLOTS = 4
RELEASE_RQ = bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0))
BOUNDARY = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def _pdv(data: bytes, command: bool, last: bool, context_id: int = 1) -> bytes:
    control = (0x01 if command else 0) | (0x02 if last else 0)
    body = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxI", 4, len(body)) + body


def seeds() -> dict[str, bytes]:
    """Well-formed conversations, as the bytes a client sends."""
    probe = RawClient.__new__(RawClient)  # only for its encoders; no socket
    good = encode(base_dataset())
    store = _pdv(probe.store_command(CT, INSTANCE_UID), True, True)
    store += b"".join(
        _pdv(good[i : i + 4000], False, i + 4000 >= len(good)) for i in range(0, len(good), 4000)
    )
    return {"store": store + RELEASE_RQ, "release": RELEASE_RQ}


def associate_rq_bytes() -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZ"
    primitive.called_ae_title = "ANY-SCP"
    contexts = [build_context(CT, [ExplicitVRLittleEndian]), build_context(VERIFICATION)]
    for number, context in enumerate(contexts):
        context.context_id = 1 + 2 * number
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One to four mutations of ``data``."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if not out:
            out += rnd.randbytes(rnd.randint(1, 16))
            continue
        kind = rnd.randrange(8)
        at = rnd.randrange(len(out))
        if kind == 0:  # flip a bit
            out[at] ^= 1 << rnd.randrange(8)
        elif kind == 1:  # a boundary byte
            out[at] = rnd.choice(BOUNDARY)
        elif kind == 2:  # a 16- or 32-bit length set to a boundary value
            width = rnd.choice((2, 4))
            value = rnd.choice((0, 1, 2, 5, 6, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)) & (
                (1 << (8 * width)) - 1
            )
            out[at : at + width] = value.to_bytes(width, rnd.choice(("big", "little")))
        elif kind == 3:  # truncate
            del out[at:]
        elif kind == 4:  # insert random bytes
            out[at:at] = rnd.randbytes(rnd.randint(1, 64))
        elif kind == 5:  # duplicate a piece
            end = min(len(out), at + rnd.randint(1, 256))
            out[at:at] = out[at:end]
        elif kind == 6:  # delete a piece
            del out[at : at + rnd.randint(1, 64)]
        else:  # overwrite with random bytes
            n = rnd.randint(1, 16)
            out[at : at + n] = rnd.randbytes(n)
    return bytes(out)


@dataclass
class Outcome:
    acknowledged: int = 0  # C-STORE responses with status 0x0000 seen by the fuzzer


def _send_case(port: int, data: bytes, rnd: random.Random) -> bytes:
    """Send ``data`` in random pieces; end by half-close, reset or waiting; return what came back."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pos = 0
        try:
            while pos < len(data):
                step = rnd.choice((len(data), rnd.randint(1, 64), rnd.randint(1, 4096)))
                sock.sendall(data[pos : pos + step])
                pos += step
            ending = rnd.random()
            if ending < 0.1:  # reset at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return got
            if ending < 0.97:  # else wait: the daemon's own timeouts must end it
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3)
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionError, OSError):
            pass
    return got


def successes(answer: bytes) -> int:
    """C-STORE-RSPs with status 0 in what the daemon sent (best effort: P-DATA command PDVs)."""
    count = 0
    pos = 0
    while pos + 6 <= len(answer):
        pdu_type, length = struct.unpack_from(">BxI", answer, pos)
        body = answer[pos + 6 : pos + 6 + length]
        pos += 6 + length
        if pdu_type != pdu.P_DATA_TF or len(body) < 6 or not body[5] & 0x01:
            continue
        fields = {tag & 0xFFFF: value for tag, value in command_elements(body[6:])}
        if fields.get(0x0100) == struct.pack("<H", 0x8001) and fields.get(0x0900) == b"\x00\x00":
            count += 1
    return count


def check(output: Path, port: int, pid: int, log: str, rss_limit_mib: float) -> None:
    """The oracles (see the module docstring); raises AssertionError."""
    assert Path(f"/proc/{pid}").exists(), "the daemon died"
    assert "internal error" not in log, "an internal error was logged"

    wait_for(lambda: all_slots_accepted(port, SLOTS), timeout=20, interval=0.2)
    wait_for(lambda: not any(p.name.startswith(TEMP_PREFIX) for p in output.rglob("*")), timeout=20)
    for path in output.rglob("*"):
        # The structure is decoded at read time; values are not our promise.
        if path.is_file() and ".dcmrecvd" not in path.parts:
            ds = dcmread(path)
            assert uids.is_valid_uid(str(ds.file_meta.MediaStorageSOPInstanceUID)), path
            assert 0x00080018 in ds, path
    rss = int(
        next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")
        ).split()[1]
    )
    assert rss / 1024 < rss_limit_mib, f"RSS {rss / 1024:.0f} MiB"


def fuzz(cases: int, seed: int, check_every: int = 500, work: Path | None = None) -> Outcome:
    """Run ``cases`` mutated conversations against a fresh daemon; AssertionError on a failure."""
    base = Path(tempfile.mkdtemp(prefix="fuzz-", dir=work))
    factory = DaemonFactory(base)
    outcome = Outcome()
    try:
        d = factory.start("--max-associations", str(SLOTS), "-ta", "2", "-td", "2", verbose=False)
        rq = associate_rq_bytes()
        conversations = seeds()
        rnd = random.Random(seed)
        for case in range(1, cases + 1):
            target = rnd.random()
            if target < 0.3:  # the request itself
                data = mutate(rq, rnd) + rnd.choice(list(conversations.values()))
            else:  # a good request, then a mutated conversation
                data = rq + mutate(rnd.choice(list(conversations.values())), rnd)
            try:
                outcome.acknowledged += successes(_send_case(d.port, data, rnd))
            except OSError:
                pass  # refused or reset while connecting: the daemon may be closing extras
            if case % check_every == 0 or case == cases:
                try:
                    check(d.output, d.port, d.pid, d.log(), rss_limit_mib=200)
                except AssertionError as exc:
                    raise AssertionError(f"seed {seed}, after case {case}: {exc}") from None
    finally:
        factory.cleanup()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=500)
    args = parser.parse_args()
    started = time.monotonic()
    outcome = fuzz(args.cases, args.seed, args.check_every)
    print(
        f"{args.cases} cases (seed {args.seed}) in {time.monotonic() - started:.0f} s: every oracle held; "
        f"{outcome.acknowledged} C-STOREs acknowledged, every stored file read by pydicom"
    )


if __name__ == "__main__":
    main()
