"""A sender that sends the next C-STOREs before reading the previous responses (some dcm4che
versions do, without negotiating an asynchronous operations window) is served in order, without
deadlock, every object durable before its own response."""

from __future__ import annotations

import struct

from conftest import DaemonFactory, wait_for
from datasets import make_dataset
from malformed import encode
from peers import RawClient
from pydicom.uid import ExplicitVRLittleEndian

from dcmrecvd.wire import pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
COUNT = 20


def message_ids_and_statuses(client: RawClient, count: int) -> list[tuple[int, int]]:
    answers = [client.response() for _ in range(count)]
    return [(struct.unpack("<H", a[0x0120])[0], struct.unpack("<H", a[0x0900])[0]) for a in answers]


def test_pipelined_stores_without_a_negotiated_window(daemons: DaemonFactory) -> None:
    d = daemons.start()
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == pdu.A_ASSOCIATE_AC
        for n in range(1, COUNT + 1):  # every request first; not one response read
            data = encode(make_dataset(rows=256, columns=256, instance_uid=f"1.2.3.{n}"))  # 128 KiB
            client.send_pdv(client.store_command(CT, f"1.2.3.{n}", message_id=n), command=True, last=True)
            for start in range(0, len(data), 16000):
                client.send_pdv(data[start : start + 16000], command=False, last=start + 16000 >= len(data))
        answers = message_ids_and_statuses(client, COUNT)
    finally:
        client.close()
    assert answers == [(n, 0x0000) for n in range(1, COUNT + 1)], "in request order, all stored"
    # The association's spare temp file goes once the daemon has seen the connection close.
    expected = sorted(f"CT.1.2.3.{n}" for n in range(1, COUNT + 1))
    # The connection was closed without a release: the files appear as they are made.
    wait_for(lambda: sorted(p.name for p in d.output.iterdir() if not p.name.startswith(".")) == expected)
    wait_for(lambda: not [p for p in d.output.iterdir() if p.name.startswith(".dcmrecvd-")])
