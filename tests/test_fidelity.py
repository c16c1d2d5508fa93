"""Drop-in fidelity, seen from outside and checked against DCMTK's dcmrecv itself where it can
be: the same bytes on the wire, the same exit codes and wording."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonFactory, dcmrecvd, free_port, need, port_open, wait_for
from test_hostile import associate_rq

from dcmrecvd.wire import pdu


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port someone else listens on: a receiver that passes every check exits 64 there."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def with_application_context(request: bytes, name: str) -> bytes:
    """``request`` (from associate_rq) with another application context name."""
    standard = struct.pack(">BxH", 0x10, 21) + b"1.2.840.10008.3.1.1.1"
    assert request.count(standard) == 1
    body = request[6:].replace(standard, struct.pack(">BxH", 0x10, len(name)) + name.encode())
    return pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, len(body)) + body


def answer_to(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        got = b""
        while len(got) < 10:
            chunk = s.recv(10 - len(got))
            if not chunk:
                break
            got += chunk
        return got


def test_unsupported_application_context_is_rejected_transient_like_dcmrecv(daemons: DaemonFactory) -> None:
    """#11.7: A-ASSOCIATE-RJ rejected-transient (2), service-user (1), reason 2, byte for byte."""
    request = with_application_context(associate_rq(["1.2.840.10008.1.2"]), "1.2.3.4")
    ours = answer_to(daemons.start().port, request)
    assert ours == pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RJ, 4) + bytes((0, 2, 1, 2))
    port = free_port()
    proc = subprocess.Popen(
        [need("dcmrecv"), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None)
        assert answer_to(port, request) == ours
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_logger_config_is_found_in_the_same_pass_as_every_other_error(
    config_dir: Path, tmp_path: Path, busy_port: int
) -> None:
    """#11.9: -lc missing.cfg on a busy port exits 1, as --check-config does; before the profile (66)."""
    missing = str(tmp_path / "missing.cfg")
    start = dcmrecvd("-lc", missing, "-od", str(tmp_path), str(busy_port), config_dir=config_dir)
    check = dcmrecvd(
        "--check-config", "-lc", missing, "-od", str(tmp_path), str(busy_port), config_dir=config_dir
    )
    assert start.returncode == check.returncode == 1, start.stderr
    assert "missing.cfg" in start.stderr and "cannot read logger config" in start.stderr
    assert start.stderr == check.stderr
    bad_profile = dcmrecvd(
        "-lc",
        missing,
        "-xf",
        str(tmp_path / "no.cfg"),
        "Default",
        "-od",
        str(tmp_path),
        "104",
        config_dir=config_dir,
    )
    assert bad_profile.returncode == 1, "a command-line error comes before a missing profile (66)"
    no_dir = dcmrecvd("-lc", missing, "-od", str(tmp_path / "none"), "104", config_dir=config_dir)
    assert no_dir.returncode == 1, "... and before a missing output directory (45)"


@pytest.mark.parametrize(
    "argv", [["+cf", "ca.pem"], ["-der", "+cf", "ca.der"], ["-ic"], ["+pa"], ["+crl", "x.crl"]]
)
def test_tls_options_without_tls_fail_as_in_dcmrecv(
    config_dir: Path, argv: list[str], busy_port: int
) -> None:
    """#11.1 against the real dcmrecv: the same exit code and the same message."""
    ours = dcmrecvd(*argv, str(busy_port), config_dir=config_dir)
    theirs = subprocess.run(
        [need("dcmrecv"), *argv, str(busy_port)], capture_output=True, text=True, timeout=30
    )
    assert ours.returncode == theirs.returncode == 1
    their_error = next(
        line for line in (theirs.stdout + theirs.stderr).splitlines() if line.startswith("error:")
    )
    message = their_error.removeprefix("error: ")
    if argv == ["+pa"]:  # dcmrecv 3.6.7 names the wrong option here (--profile-basic); we name +pa's
        message = "--profile-aes only allowed with --enable-tls"
    assert message in ours.stderr
