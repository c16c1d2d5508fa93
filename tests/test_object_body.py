"""Object bodies: an object in memory spills into a file once it outgrows its record, its
CRC-32 running on across the spill; both compare with a first copy and leave nothing behind
when discarded."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.duplicates import Placement
from dcmrecvd.serve.object_body import Body, FileBody, MemoryBody
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.store.storage import Store, Writer
from dcmrecvd.wire import part10

pytestmark = pytest.mark.inprocess

INLINE_MAX = 4096


@pytest.fixture
def ack(tmp_path: Path) -> Iterator[AckJournal]:
    journal = Journal(tmp_path / "journal", segment_size=64 * 1024)
    journal.open()
    index = InstanceIndex(tmp_path / "index.sqlite")
    yield AckJournal(journal, Materialiser(journal, index), index, INLINE_MAX)
    journal.close()
    index.close()


def meta() -> bytes:
    return part10.meta_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.1", "SCU", "SCP")


def memory_body(ack: AckJournal, writer: Writer, digest: bool) -> MemoryBody:
    ack.digest_files = digest  # a spilled file keeps its CRC only when the index wants it
    return MemoryBody(ack, writer, PurePosixPath("."), meta(), len(meta()))


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_small_object_stays_in_memory_and_lands_as_its_record(ack: AckJournal, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    writer = Writer(Store(out))
    body: Body = memory_body(ack, writer, digest=False)
    body = body.append([memoryview(b"\x08\x00\x16\x00" + b"x" * 100)])
    assert isinstance(body, MemoryBody)
    landed = body.land(Placement(PurePosixPath("."), lambda: "obj.dcm", True))
    assert landed.path == out / "obj.dcm" and not landed.large
    assert landed.crc == zlib.crc32(landed.data) and landed.size == len(landed.data)
    assert files(out) == []  # made after the ack, by the materialiser


@pytest.mark.parametrize("digest", [False, True])
def test_an_object_that_outgrows_its_record_spills_into_a_file(
    ack: AckJournal, tmp_path: Path, digest: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    writer = Writer(Store(out))
    body: Body = memory_body(ack, writer, digest)
    pieces = [b"a" * 3000, b"b" * 3000, b"c" * 3000]
    for piece in pieces:
        body = body.append([memoryview(piece)])
    assert isinstance(body, FileBody)
    landed = body.land(Placement(PurePosixPath("."), lambda: "big.dcm", True))
    writer.sync()
    content = (out / "big.dcm").read_bytes()
    assert content == meta() + b"".join(pieces) and landed.large and landed.size == len(content)
    assert landed.digest == (f"crc32:{zlib.crc32(content):08x}" if digest else "")


def test_both_bodies_compare_datasets_and_discard_without_a_trace(ack: AckJournal, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    writer = Writer(Store(out))
    dataset = b"\x08\x00\x16\x00" + b"d" * 5000
    first = out / "first.dcm"
    first.write_bytes(meta() + dataset)
    small: Body = memory_body(ack, writer, digest=False).append([memoryview(dataset[:100])])
    assert not small.same_dataset(first)
    big = small.append([memoryview(dataset[100:])])
    assert isinstance(big, FileBody) and big.same_dataset(first)
    big.discard()
    small.discard()
    writer.close()
    assert files(out) == ["first.dcm"]
