"""A real ``Association`` driven over ``socket.socketpair()``, in-process, with a temporary store.

No daemon, no TCP, no Debian packages: the driver, the core, the sinks and the
storage layer together, fed the same conversation whole, by PDU, byte by byte
and in random chunks.  Whatever the fragmentation, the stored file and the
responses must be the same.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from malformed import base_dataset, encode
from peers import RawClient, associate_rq, dataset_bytes, p_data, pdv, store_command
from splits import by_byte, large_random_chunks, whole

from dcmrecvd.conf import config
from dcmrecvd.conf.config import Layer
from dcmrecvd.serve import runtime
from dcmrecvd.serve.association import Association
from dcmrecvd.serve.runtime import Stats
from dcmrecvd.store.file_ops import FileOps
from dcmrecvd.store.storage import TEMP_PREFIX, Store
from dcmrecvd.wire import dimse, pdu

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
PROFILES = Path(__file__).resolve().parent.parent / "etc" / "storescp.cfg"
RELEASE_RQ = bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def make_runtime(output: Path, **output_keys: object) -> runtime.Runtime:
    layer = Layer(
        "test",
        {
            "output": {"directory": str(output), **output_keys},
            "association": {"config_file": str(PROFILES), "profile": "Default"},
        },
    )
    return runtime.prepare(config.build([layer]))


class Peer:
    """The far end of a socketpair, with an Association serving the near end on a thread."""

    def __init__(self, rt: runtime.Runtime, kind: type[Association] = Association) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        self.reader = RawClient(sock=self.sock)
        self.stats = Stats()
        self.association = kind(ours, "127.0.0.1:1", rt, self.stats)
        self.thread = threading.Thread(target=self.association.run, daemon=True)
        self.thread.start()

    def send(self, data: bytes, split: Callable[[bytes], Iterator[bytes]]) -> None:
        for piece in split(data):
            self.sock.sendall(piece)

    def read_pdu(self) -> tuple[int, bytes]:
        return self.reader.read_pdu()

    def response(self) -> dict[int, int]:
        """The next response's US elements (however fragmented): element number -> value."""
        return {
            tag: int(struct.unpack("<H", value)[0])
            for tag, value in self.reader.response().items()
            if len(value) == 2
        }

    def status(self) -> int:
        """The status of the next response (however fragmented)."""
        return self.response()[0x0900]

    def finish(self) -> None:
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the association did not end"


SPLITS = [whole, by_byte, large_random_chunks]


def store(dataset: bytes, uid: str, fragment: int = 1000, message_id: int = 1) -> bytes:
    pieces = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)]
    out = p_data(pdv(store_command(CT, uid, message_id), True, True))
    for i, piece in enumerate(pieces):
        out += p_data(pdv(piece, False, i == len(pieces) - 1))
    return out


def ct_dataset(uid: str, size: int = 5000) -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = b"\x5a" * size
    return encode(ds)


def stored(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts)


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_stores_arrive_intact_however_the_stream_is_cut(
    tmp_path: Path, split: Callable[[bytes], Iterator[bytes]]
) -> None:
    peer = Peer(make_runtime(tmp_path))
    peer.send(associate_rq(CT, EXPLICIT), split)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    datasets = {f"1.2.3.{i}": ct_dataset(f"1.2.3.{i}", 3000 * i) for i in range(1, 4)}
    for i, (uid, dataset) in enumerate(datasets.items()):
        peer.send(store(dataset, uid, fragment=777, message_id=i + 1), split)
        assert peer.status() == 0x0000
    peer.send(RELEASE_RQ, split)
    assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    peer.finish()
    files = stored(tmp_path)
    assert [p.name for p in files] == [f"CT.{uid}" for uid in datasets]
    for path in files:
        assert dataset_bytes(path) == datasets[path.name[3:]]
    assert peer.stats.stored == 3


def test_a_sender_that_does_not_wait_for_the_ac_or_the_responses(tmp_path: Path) -> None:
    """Everything in one write: request, two stores, release; answered in order."""
    peer = Peer(make_runtime(tmp_path))
    a, b = ct_dataset("1.2.3.1"), ct_dataset("1.2.3.2")
    peer.send(
        associate_rq(CT, EXPLICIT) + store(a, "1.2.3.1") + store(b, "1.2.3.2", message_id=2) + RELEASE_RQ,
        whole,
    )
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    assert [peer.status(), peer.status()] == [0, 0]
    assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    peer.finish()
    assert [p.name for p in stored(tmp_path)] == ["CT.1.2.3.1", "CT.1.2.3.2"]


@pytest.mark.parametrize("ending", ["abort", "release", "vanish", "garbage"])
def test_an_object_cut_short_leaves_nothing_and_no_temp_file(tmp_path: Path, ending: str) -> None:
    peer = Peer(make_runtime(tmp_path))
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    dataset = ct_dataset("1.2.3.9", 20000)
    peer.send(
        p_data(pdv(store_command(CT, "1.2.3.9"), True, True)) + p_data(pdv(dataset[:9000], False, False)),
        whole,
    )
    if ending == "abort":
        peer.send(bytes((7, 0, 0, 0, 0, 4, 0, 0, 0, 0)), whole)
    elif ending == "release":
        peer.send(RELEASE_RQ, whole)
        assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    elif ending == "garbage":
        peer.send(b"\x99" * 10, whole)
        kind, body = peer.read_pdu()
        assert kind == pdu.A_ABORT and body[3] == pdu.REASON_UNRECOGNIZED_PDU
    peer.finish()
    assert list(tmp_path.rglob("*")) == []
    assert peer.association.holds_slot is False


def test_a_store_that_ended_before_the_garbage_is_still_answered(tmp_path: Path) -> None:
    peer = Peer(make_runtime(tmp_path))
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    peer.send(store(ct_dataset("1.2.3.5"), "1.2.3.5") + b"\x99" * 6, whole)
    assert peer.status() == 0x0000
    assert peer.read_pdu()[0] == pdu.A_ABORT
    peer.finish()
    assert [p.name for p in stored(tmp_path)] == ["CT.1.2.3.5"]


def test_a_failing_disk_fails_that_store_and_the_association_goes_on(tmp_path: Path) -> None:
    """An error from the storage layer is 0xA700 for one C-STORE, not an abort."""
    rt = make_runtime(tmp_path)
    peer = Peer(rt)
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    real_open = rt.store.open

    def refuse(_relative: object) -> object:
        raise OSError(5, "Input/output error")

    rt.store.open = refuse  # type: ignore[method-assign]
    try:
        peer.send(store(ct_dataset("1.2.3.6"), "1.2.3.6"), whole)
        assert peer.status() == 0xA700
    finally:
        rt.store.open = real_open  # type: ignore[method-assign]
    peer.send(store(ct_dataset("1.2.3.7"), "1.2.3.7", message_id=2), whole)
    assert peer.status() == 0x0000
    peer.send(RELEASE_RQ, whole)
    assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    peer.finish()
    assert [p.name for p in stored(tmp_path)] == ["CT.1.2.3.7"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_bug_in_the_sink_fails_one_store_not_the_association(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcmrecvd.serve import receiving

    calls = {"n": 0}
    real = receiving.Stored._take

    def buggy(self: receiving.Stored, chunk: memoryview) -> None:
        calls["n"] += 1
        if self.command.affected_sop_instance_uid == "1.2.3.8":
            raise KeyError("a bug")
        real(self, chunk)

    monkeypatch.setattr(receiving.Stored, "_take", buggy)
    peer = Peer(make_runtime(tmp_path))
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    peer.send(store(ct_dataset("1.2.3.8"), "1.2.3.8"), whole)
    assert peer.status() == 0xA700
    peer.send(store(ct_dataset("1.2.3.9"), "1.2.3.9", message_id=2), whole)
    assert peer.status() == 0x0000
    peer.finish()
    assert [p.name for p in stored(tmp_path)] == ["CT.1.2.3.9"] and calls["n"] > 2


def test_an_echo_is_answered(tmp_path: Path) -> None:
    peer = Peer(make_runtime(tmp_path))
    peer.send(associate_rq("1.2.840.10008.1.1", "1.2.840.10008.1.2"), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    echo = dimse.encode_response(dimse.C_ECHO_RQ, 0, 0, "1.2.840.10008.1.1")
    echo = echo.replace(struct.pack("<HHIH", 0, 0x0120, 2, 0), struct.pack("<HHIH", 0, 0x0110, 2, 5))
    peer.send(p_data(pdv(echo, True, True)), whole)
    assert peer.status() == 0x0000
    peer.finish()


class CountingOps(FileOps):
    """Counts directory fsyncs, and the responses already sent when each happened."""

    def __init__(self) -> None:
        self.dirsyncs = 0

    def fsync_directory(self, path: Path) -> None:
        super().fsync_directory(path)
        self.dirsyncs += 1


@pytest.mark.parametrize("window", [8, 0])
def test_a_pipelining_sender_is_answered_in_order_with_grouped_commits(tmp_path: Path, window: int) -> None:
    """Eight C-STOREs in one write: with a negotiated window their objects are made durable
    together (fewer directory fsyncs than objects); without one, one by one.  Either way
    every response comes, in request order, and every object is stored."""
    ops = CountingOps()
    rt = make_runtime(tmp_path)
    store_ = Store(tmp_path, ops=ops)
    rt = dataclasses.replace(rt, default=dataclasses.replace(rt.default, store=store_))
    peer = Peer(rt)
    datasets = {f"1.2.3.{i}": ct_dataset(f"1.2.3.{i}", 2000) for i in range(1, 9)}
    stream = associate_rq(CT, EXPLICIT, window=window)
    for i, (uid, data) in enumerate(datasets.items()):
        stream += store(data, uid, message_id=i + 1)
    peer.send(stream + RELEASE_RQ, whole)
    kind, ac = peer.read_pdu()
    assert kind == pdu.A_ASSOCIATE_AC
    assert (b"\x53\x00\x00\x04\x00\x01\x00\x08" in ac) == bool(window)
    answered = [peer.response() for _ in datasets]
    assert [r[0x0120] for r in answered] == list(range(1, 9))
    assert all(r[0x0900] == 0 for r in answered)
    assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    peer.finish()
    assert sorted(p.name for p in stored(tmp_path)) == sorted(f"CT.{uid}" for uid in datasets)
    if window:
        assert ops.dirsyncs < len(datasets), ops.dirsyncs
    else:
        assert ops.dirsyncs == len(datasets)
