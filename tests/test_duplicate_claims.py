"""The claims that make one copy of an instance decide at a time (``serve.duplicates``): a
second claimant settles its own window, waits for the first to be durable or failed, and
gives up with 0xA700 at its deadline; names and bytes compared for keep-both and
reject-if-different."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dcmrecvd.serve.duplicates import Claims, beside, beside_names, same_dataset
from dcmrecvd.wire import part10
from dcmrecvd.wire.status import Failure, Status

pytestmark = pytest.mark.inprocess


def test_a_second_claimant_settles_first_then_waits_for_the_release() -> None:
    claims = Claims()
    first = claims.acquire("k", owner="A", settle=lambda: None)
    settled = threading.Event()
    got: list[object] = []

    def second() -> None:
        got.append(claims.acquire("k", owner="B", settle=settled.set))

    thread = threading.Thread(target=second)
    thread.start()
    assert settled.wait(10)  # its own window first: it waits holding nothing
    assert got == []  # still waiting: "A" holds the claim
    claims.release(first)
    thread.join(10)
    assert len(got) == 1 and got[0] is not first
    assert len(claims) == 1


def test_its_own_claim_is_released_by_settling() -> None:
    """One association with the same instance twice in one window: settling answers the
    first (and releases its claim), so the second does not wait on itself."""
    claims = Claims()
    first = claims.acquire("k", owner="A", settle=lambda: None)
    second = claims.acquire("k", owner="A", settle=lambda: claims.release(first))
    assert second is not first and first.done


def test_a_claimant_gives_up_with_out_of_resources() -> None:
    claims = Claims()
    claims.acquire("k", owner="A", settle=lambda: None)
    with pytest.raises(Failure) as info:
        claims.acquire("k", owner="B", settle=lambda: None, timeout=0.05)
    assert info.value.status == Status.OUT_OF_RESOURCES


def test_other_identities_never_wait() -> None:
    claims = Claims()
    claims.acquire("k1", owner="A", settle=lambda: None)
    claims.acquire("k2", owner="B", settle=lambda: None, timeout=0.0)
    assert len(claims) == 2


def test_names_beside_a_first_copy() -> None:
    assert beside("1.2.3.dcm", 1, ".dcm") == "1.2.3_1.dcm"
    assert beside("CT.1.2.3", 2, "") == "CT.1.2.3_2"
    assert beside(".dcm", 1, ".dcm") == ".dcm_1"
    names = beside_names("CT.1.2", "")
    assert [names() for _ in range(3)] == ["CT.1.2", "CT.1.2_1", "CT.1.2_2"]


def test_same_dataset_ignores_the_file_meta_and_sees_one_byte(tmp_path: Path) -> None:
    body = b"\x08\x00\x18\x00UI\x04\x001.2\x00" + bytes(range(256)) * 5000
    meta = part10.meta_header("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.840.10008.1.2.1", "A", "B")
    other_meta = part10.meta_header("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.840.10008.1.2.1", "OTHER", "B")
    first = tmp_path / "first"
    first.write_bytes(meta + body)
    assert same_dataset(first, other_meta + body, None, len(other_meta))
    changed = bytearray(body)
    changed[-1] ^= 1
    assert not same_dataset(first, other_meta + changed, None, len(other_meta))
    assert not same_dataset(first, other_meta + body[:-1], None, len(other_meta))
    temp = tmp_path / "temp"
    temp.write_bytes(other_meta + body)
    assert same_dataset(first, None, temp, len(other_meta))
    temp.write_bytes(other_meta + bytes(changed))
    assert not same_dataset(first, None, temp, len(other_meta))
    (tmp_path / "junk").write_bytes(b"not dicom")
    assert not same_dataset(tmp_path / "junk", body, None, 0)
