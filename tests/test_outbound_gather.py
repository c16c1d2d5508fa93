"""The outbound C-STORE's dataset, gathered into one sendmsg (#34 item 12: a 0.5 MB CT in
16 KiB PDUs was 64 writes), puts on the wire exactly what the sendfile path does, also when
the socket takes only part of it at a time."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from dcmrecvd.remote import client

pytestmark = pytest.mark.inprocess


def wire(monkeypatch: pytest.MonkeyPatch, path: Path, gather: int) -> bytes:
    monkeypatch.setattr(client, "GATHER_MAX", gather)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial sends, many of them
    got = bytearray()

    def read() -> None:
        while chunk := theirs.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    assoc = client.OutboundAssociation.__new__(client.OutboundAssociation)
    assoc.sock, assoc.chunk = ours, 16378
    with open(path, "rb") as f:
        assoc._send_dataset(3, f.fileno(), 132, path.stat().st_size)
    ours.close()
    reader.join(10)
    theirs.close()
    return bytes(got)


@pytest.mark.parametrize("size", [132, 133, 132 + 16378, 132 + 16378 * 3 + 5, 700_000])
def test_gathered_pdus_are_the_sendfile_path_s_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    path = tmp_path / "object.dcm"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    gathered = wire(monkeypatch, path, 8 << 20)
    assert gathered == wire(monkeypatch, path, 0)
    assert len(gathered) >= size - 132
