"""The ack journal, in-process: segments, group commit, replay, checkpoints, the materialiser.

Daemon-level behaviour (kill -9 mid-stream, release after the files, events
from the log) is in test_ack_journal_daemon.py.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from dcmrecvd.events import body
from dcmrecvd.store.file_ops import FileOps
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import BLOCK, Journal, JournalFull, JournalUnusable, Record
from dcmrecvd.store.materialiser import Materialiser

SEGMENT = 64 * 1024


def journal(path: Path, **kw: object) -> Journal:
    j = Journal(path, segment_size=SEGMENT, segments=4, full_wait=0.3, **kw)  # type: ignore[arg-type]
    j.open()
    return j


def reopen(path: Path) -> tuple[Journal, list[Record]]:
    j = Journal(path, segment_size=SEGMENT, segments=4)
    return j, j.open()


def test_records_come_back_in_order_after_a_reopen(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(30):
        j.commit([Record({"n": i}, bytes([i]) * (100 + i))])
    j.close()
    again, records = reopen(tmp_path)
    assert [r.header["n"] for r in records] == list(range(30))
    assert [r.seq for r in records] == list(range(1, 31))
    assert all(r.data == bytes([r.header["n"]]) * (100 + r.header["n"]) for r in records)
    again.commit([Record({"n": 30})])  # numbering goes on after the replayed records
    again.close()
    assert [r.seq for r in reopen(tmp_path)[1]][-1] == 31


def test_the_checkpoint_hides_done_records_and_recycles_their_segments(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(40):  # 40 batches of one block each: more than one 64 KiB segment
        j.commit([Record({"n": i}, b"x" * 1000)])
    j.checkpoint(25)
    j.close()
    again, records = reopen(tmp_path)
    assert [r.seq for r in records] == list(range(26, 41))
    again.checkpoint(40)
    for i in range(200):  # far more than 4 segments hold: only possible by recycling
        again.commit([Record({"n": i}, b"y" * 1000)])
        again.checkpoint(again.last_seq)
    assert again.usage()["segments"] <= 4
    again.close()
    assert reopen(tmp_path)[1] == []


def test_a_torn_last_batch_ends_the_replay_quietly(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(5):
        j.commit([Record({"n": i}, b"z" * 500)])
    j.close()
    (segment,) = [p for p in tmp_path.glob("*.seg") if p.stat().st_size == SEGMENT][:1]
    raw = bytearray(segment.read_bytes())
    raw[BLOCK * 5 + 100] ^= 0xFF  # inside the last batch: what a crash mid-write leaves
    segment.write_bytes(raw)
    again, records = reopen(tmp_path)
    assert [r.header["n"] for r in records] == [0, 1, 2, 3]
    assert again.problems == []  # never acknowledged: nothing to report


def test_corruption_inside_a_segment_is_reported_and_the_records_after_it_recovered(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(5):
        j.commit([Record({"n": i}, b"z" * 500)])
    j.close()
    (segment,) = [p for p in tmp_path.glob("*.seg") if p.stat().st_size == SEGMENT][:1]
    raw = bytearray(segment.read_bytes())
    raw[BLOCK * 3 + 100] ^= 0xFF  # inside the third batch (segment head, batch 1, 2, 3...)
    segment.write_bytes(raw)
    again, records = reopen(tmp_path)
    assert [r.header["n"] for r in records] == [0, 1, 3, 4]
    assert len(again.problems) == 1 and "do not check out" in again.problems[0]


def test_the_old_content_of_a_recycled_segment_is_not_replayed(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(60):
        j.commit([Record({"old": i}, b"o" * 1000)])
    j.checkpoint(j.last_seq)
    first_new = j.last_seq + 1
    j.commit([Record({"new": 1}, b"n" * 10)])  # goes into a recycled segment or the rest of one
    j.close()
    _, records = reopen(tmp_path)
    assert [r.header for r in records] == [{"new": 1}]
    assert records[0].seq == first_new


def test_concurrent_commits_share_flushes(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.max_segments = 64
    writes = []
    j.on_written = lambda records, ok: writes.append(len(records))

    def sender(k: int) -> None:
        for i in range(40):
            j.commit([Record({"k": k, "i": i}, b"s" * 200)])
            j.checkpoint(j.last_seq)  # let segments recycle

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(writes) == 240
    assert len(writes) < 240, "no two commits ever shared a write"
    j.close()


def test_a_full_journal_refuses_then_takes_again_once_checkpointed(tmp_path: Path) -> None:
    j = journal(tmp_path)
    with pytest.raises(JournalFull):
        for i in range(1000):
            j.commit([Record({"n": i}, b"f" * 3000)])
    taken = j.last_seq
    j.checkpoint(taken)
    j.commit([Record({"n": "after"}, b"a")])
    j.close()
    _, records = reopen(tmp_path)
    assert [r.header["n"] for r in records] == ["after"]  # nothing dropped, nothing invented


class FailingWrite(FileOps):
    def __init__(self) -> None:
        self.fail_next = False

    def journal_write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "injected write error")
        return super().journal_write(fd, data, offset)


def test_a_failed_write_fails_its_commit_and_the_next_one_lands_elsewhere(tmp_path: Path) -> None:
    ops = FailingWrite()
    j = journal(tmp_path, ops=ops)
    results = []
    j.on_written = lambda records, ok: results.append((records[0].header["n"], ok))
    j.commit([Record({"n": 0}, b"a")])
    ops.fail_next = True
    with pytest.raises(OSError) as raised:
        j.commit([Record({"n": 1}, b"b")])
    assert raised.value.errno == errno.EIO
    j.commit([Record({"n": 2}, b"c")])
    assert results == [(0, True), (1, False), (2, True)]
    j.close()
    _, records = reopen(tmp_path)
    assert [r.header["n"] for r in records] == [0, 2]


def test_tmpfs_cannot_hold_a_journal() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    where = shm / f"dcmrecvd-test-{os.getpid()}"
    try:
        with pytest.raises(JournalUnusable, match="tmpfs"):
            Journal(where, segment_size=SEGMENT).open()
    finally:
        for p in where.glob("*"):
            p.unlink()
        if where.exists():
            where.rmdir()


def header(root: Path, name: str, uid: str, *, replace: bool = True) -> dict[str, object]:
    return {
        "root": str(root),
        "dir": ".",
        "name": name,
        "replace": replace,
        "meta_len": 4,
        "index": {"called_aet": "AE", "sop_instance_uid": uid, "sop_class_uid": "1.2", "stored": "now"},
        "event": {"event": "object.stored", "sop_instance_uid": uid},
    }


def test_the_materialiser_makes_files_rows_and_events_then_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    j = journal(tmp_path / "j")
    index = InstanceIndex(tmp_path / "index.sqlite")
    events: list[dict[str, object]] = []
    m = Materialiser(
        j, index, events=lambda settled, replayed: events.extend(b for s in settled for b in body.settled(s))
    )
    j.on_written = m.written
    m.start()
    j.commit([Record(header(out, f"f{i}", f"1.2.{i}"), b"META" + bytes([i]) * 50) for i in range(5)])
    assert m.wait_visible(j.last_seq, 10)
    for i in range(5):
        assert (out / f"f{i}").read_bytes() == b"META" + bytes([i]) * 50
        row = index.get("AE", f"1.2.{i}")
        assert row is not None and row.path == str(out / f"f{i}") and row.size == 54
    assert [e["path"] for e in events] == [str(out / f"f{i}") for i in range(5)]
    m.stop()
    assert j.done_through == 5  # checkpointed when it went idle, or on stop
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temp file was left"


def test_replay_makes_what_is_missing_and_keeps_what_exists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    j = journal(tmp_path / "j")
    j.commit([Record(header(out, f"f{i}", f"1.2.{i}"), b"META" + bytes([i]) * 20) for i in range(3)])
    j.close()  # "crash": nothing materialised, nothing checkpointed
    (out / "f0").write_bytes(b"META" + bytes([0]) * 20)  # made before the crash
    (out / "f1").write_bytes(b"partial")  # cannot happen under a final name, but replay must fix it
    again, records = reopen(tmp_path / "j")
    index = InstanceIndex(tmp_path / "index.sqlite")
    counts = Materialiser(again, index).replay(records)
    assert counts == {
        "records": 3,
        "made": 2,
        "verified": 1,
        "missing": 0,
        "passed": 0,
        "quarantined": 0,
        "waiting": 0,
    }
    for i in range(3):
        assert (out / f"f{i}").read_bytes() == b"META" + bytes([i]) * 20
    assert index.count() == 3
    assert again.done_through == 3
    again.close()
    assert reopen(tmp_path / "j")[1] == []  # a second start replays nothing


def test_someone_elses_file_under_the_name_is_never_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken").write_bytes(b"theirs")
    j = journal(tmp_path / "j")
    index = InstanceIndex(tmp_path / "index.sqlite")
    m = Materialiser(j, index)
    j.on_written = m.written
    m.start()
    j.commit([Record(header(out, "taken", "1.2.9", replace=False), b"METAours")])
    assert m.wait_visible(j.last_seq, 10)
    m.stop()
    assert (out / "taken").read_bytes() == b"theirs"
    row = index.get("AE", "1.2.9")
    assert row is not None and Path(row.path).read_bytes() == b"METAours"


def test_a_second_process_cannot_use_a_journal_in_use(tmp_path: Path) -> None:
    first = journal(tmp_path)
    with pytest.raises(JournalUnusable, match="in use"):
        Journal(tmp_path, segment_size=SEGMENT).open()
    first.close()
    journal(tmp_path).close()  # free again once the first let go


def test_a_window_larger_than_a_segment_is_committed_in_several_batches(tmp_path: Path) -> None:
    j = journal(tmp_path)
    batches = []
    j.on_written = lambda records, ok: batches.append(len(records))
    j.commit([Record({"n": i}, bytes([i]) * 10_000) for i in range(12)])  # 120 KB, 64 KiB segments
    assert sum(batches) == 12 and len(batches) >= 2
    j.checkpoint(0)
    j.close()
    assert [r.header["n"] for r in reopen(tmp_path)[1]] == list(range(12))
