"""The dataset walk, in-process: every well-formed dataset passes however it is cut, every
malformed one is refused with a reason, and the captured values match pydicom's."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from malformed import NOT_WELL_FORMED, base_dataset, encode, explicit, malformed_cases
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dcmrecvd.wire import uids
from dcmrecvd.wire.dataset_walk import (
    SERIES_DATE,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    DatasetWalker,
    Malformed,
    text_value,
)

pytestmark = pytest.mark.inprocess

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CAPTURE = (SOP_CLASS_UID, SOP_INSTANCE_UID, SERIES_DATE)


def walk(data: bytes, transfer_syntax: str = uids.EXPLICIT_LE, seed: int | None = None) -> DatasetWalker:
    """Walk ``data`` whole (seed None) or cut into random 1-64 byte pieces."""
    walker = DatasetWalker(transfer_syntax, CAPTURE)
    if seed is None:
        walker.feed(data)
    else:
        rnd = random.Random(seed)
        pos = 0
        while pos < len(data):
            step = rnd.randint(1, 64)
            walker.feed(memoryview(data)[pos : pos + step])
            pos += step
    walker.finish()
    return walker


def corpus() -> list[tuple[str, str, bytes, Dataset]]:
    """pydicom's test files with a transfer syntax: (name, transfer syntax, dataset bytes, decoded)."""
    out = []
    for path in sorted(TEST_FILES.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            raw = io.BytesIO(path.read_bytes())
            pydicom.filereader.read_preamble(raw, False)
            pydicom.filereader._read_file_meta_info(raw)
        except Exception:
            continue
        out.append((path.name, transfer_syntax, raw.read(), ds))
    return out


def test_every_well_formed_file_of_pydicoms_corpus_passes_however_it_is_cut() -> None:
    files = corpus()
    assert len(files) > 60
    checked = 0
    for name, transfer_syntax, data, ds in files:
        if name in NOT_WELL_FORMED:
            with pytest.raises(Malformed):
                walk(data, transfer_syntax)
            continue
        whole = walk(data, transfer_syntax)
        for seed in (1, 2):
            cut = walk(data, transfer_syntax, seed)
            assert cut.captured == whole.captured, name
        for tag, keyword in ((SOP_CLASS_UID, "SOPClassUID"), (SOP_INSTANCE_UID, "SOPInstanceUID")):
            expected = ds.get(keyword)
            assert text_value(whole.captured.get(tag)) == (None if expected is None else str(expected)), name
        checked += 1
    assert checked > 60
    kinds = {ts for _, ts, _, _ in files}
    assert {uids.IMPLICIT_LE, uids.EXPLICIT_LE, uids.EXPLICIT_BE, uids.DEFLATED_LE} <= kinds


def test_values_are_captured_only_at_the_top_level_and_decided_early() -> None:
    ds = base_dataset()
    inner = Dataset()
    inner.SOPInstanceUID = "9.9.9"  # inside a sequence: not the dataset's
    ds.ReferencedImageSequence = Sequence([inner])
    data = encode(ds)
    walker = DatasetWalker(uids.EXPLICIT_LE, CAPTURE)
    fed = 0
    while not walker.past(SERIES_DATE):
        walker.feed(data[fed : fed + 16])
        fed += 16
    assert fed < 400, "decided long before the pixel data"
    walker.feed(data[fed:])
    walker.finish()
    assert text_value(walker.captured[SOP_INSTANCE_UID]) == "1.2.3.4.5"
    assert text_value(walker.captured[SERIES_DATE]) == "20240131"


@pytest.mark.parametrize("name", list(malformed_cases()))
def test_malformed_datasets_are_refused_with_a_reason(name: str) -> None:
    data, words = malformed_cases()[name]
    for seed in (None, 3):
        with pytest.raises(Malformed, match=None) as caught:
            walk(data, uids.EXPLICIT_LE, seed)
        assert words in str(caught.value)


def test_a_defined_length_item_may_not_overrun_its_sequence() -> None:
    item = explicit(0x00080100, b"SH", b"113691")
    sequence = struct.pack("<HH2s2xI", 0x0008, 0x1032, b"SQ", 8 + len(item) - 2)
    data = sequence + struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    with pytest.raises(Malformed, match="overruns"):
        walk(data)


def test_deflate_is_walked_inflated_and_corruption_is_refused() -> None:
    plain = encode(base_dataset())
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = packer.compress(plain) + packer.flush()
    walker = walk(deflated, uids.DEFLATED_LE, seed=4)
    assert text_value(walker.captured[SOP_INSTANCE_UID]) == "1.2.3.4.5"
    with pytest.raises(Malformed):
        walk(deflated[:40] + bytes(200) + deflated[240:], uids.DEFLATED_LE)
    unfinished = zlib.compressobj(6, zlib.DEFLATED, -15)  # every byte there, no final block
    with pytest.raises(Malformed, match="final block"):
        walk(unfinished.compress(plain) + unfinished.flush(zlib.Z_SYNC_FLUSH), uids.DEFLATED_LE)
    cut = zlib.compressobj(6, zlib.DEFLATED, -15)
    with pytest.raises(Malformed, match="ends inside"):
        walk(cut.compress(plain[:-50]) + cut.flush(), uids.DEFLATED_LE)


def test_a_deflate_bomb_is_inflated_in_bounded_pieces() -> None:
    """64 MiB of zeros inflated from 64 KiB: walked piecewise, never held at once."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    header = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 64 << 20)
    deflated = bomb.compress(header) + bomb.compress(bytes(64 << 20)) + bomb.flush()
    assert len(deflated) < 200_000
    walker = DatasetWalker(uids.DEFLATED_LE)
    walker.feed(deflated)
    walker.finish()
    assert walker.pos == 12 + (64 << 20)
