"""After the ack, nothing undefined: the materialiser's outcome table, row by row, in-process.

Faults are injected at every system call of materialisation (and of recovery)
through the ``file_ops`` seam, for one record of a batch: a *permanent* error
quarantines that record (bytes and header, durably) and the others are made;
a *transient* one stops the batch there, keeps what was made before it made,
says ``failing`` (so new objects are refused) and is retried with backoff.  A
file once made is never made again, by a retry or by recovery, so a file a
consumer took away stays away.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from dcmrecvd.events import body
from dcmrecvd.store import materialise_outcome as outcome_table
from dcmrecvd.store.file_ops import Buffer, FileOps
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal, Record
from dcmrecvd.store.making import check_fits
from dcmrecvd.store.materialise_outcome import Row, classify
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.store.quarantine import Quarantine, export

pytestmark = pytest.mark.inprocess

SEGMENT = 256 * 1024


class Fails(FileOps):
    """Fails every call of ``op`` on a path containing ``needle`` with ``code``, while armed."""

    def __init__(self) -> None:
        self.op = ""
        self.needle = ""
        self.code = 0
        self.paths: dict[int, str] = {}
        self.opened: list[str] = []  # every path opened for writing

    def arm(self, op: str, needle: str, code: int) -> None:
        self.op, self.needle, self.code = op, needle, code

    def disarm(self) -> None:
        self.op = ""

    def _check(self, op: str, what: object) -> None:
        path = self.paths.get(what, "") if isinstance(what, int) else str(what)
        if self.op == op and self.needle in path:
            raise OSError(self.code, f"injected {errno.errorcode[self.code]}", path)

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._check("open", path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = str(path)
        if flags & os.O_CREAT:
            self.opened.append(str(path))
        return fd

    def write(self, fd: int, data: Buffer) -> int:
        self._check("write", fd)
        return super().write(fd, data)

    def writev(self, fd: int, chunks: Sequence[Buffer]) -> int:
        self._check("write", fd)
        return super().writev(fd, chunks)

    def syncfs(self, path: Path) -> None:
        self._check("syncfs", path)
        super().syncfs(path)

    def journal_write(self, fd: int, data: Buffer, offset: int) -> int:
        self._check("journal_write", fd)
        return super().journal_write(fd, data, offset)

    def replace(self, source: Path, target: Path) -> None:
        self._check("rename", target)
        super().replace(source, target)

    def link(self, source: Path, target: Path) -> None:
        self._check("rename", target)
        super().link(source, target)

    def mkdir(self, path: Path, mode: int) -> None:
        self._check("mkdir", path)
        super().mkdir(path, mode)

    def fsync_directory(self, path: Path) -> None:
        self._check("dirsync", path)
        super().fsync_directory(path)


def header(out: Path, name: str, uid: str, directory: str = ".") -> dict[str, Any]:
    return {
        "root": str(out),
        "dir": directory,
        "name": name,
        "replace": True,
        "size": 24,
        "index": {"called_aet": "AE", "sop_instance_uid": uid, "sop_class_uid": "1.2", "stored": "t"},
        "event": {"event": "object.stored", "sop_instance_uid": uid, "path": ""},
    }


class Rig:
    """A journal, an index and a materialiser on ``tmp_path``, driven turn by turn."""

    def __init__(self, tmp_path: Path, ops: FileOps | None = None) -> None:
        self.tmp = tmp_path
        self.out = tmp_path / "out"
        self.out.mkdir(exist_ok=True)
        self.ops = ops or FileOps()
        self.journal = Journal(tmp_path / "state" / "journal", segment_size=SEGMENT, segments=4, ops=self.ops)
        self.records = self.journal.open()
        self.index = InstanceIndex(tmp_path / "state" / "instances.sqlite")
        self.events: list[dict[str, Any]] = []
        self.quarantine = Quarantine(tmp_path / "state" / "quarantine", self.ops)
        self.m = Materialiser(
            self.journal,
            self.index,
            events=lambda settled, replayed: self.events.extend(b for s in settled for b in body.settled(s)),
            ops=self.ops,
            quarantine=self.quarantine,
        )
        self.journal.on_written = self.m.written

    def commit(self, *names: str, directory: str = ".") -> list[Record]:
        records = [Record(header(self.out, n, f"1.2.{n}", directory), f"DICM{n}".encode().ljust(24, b"."))
                   for n in names]
        self.journal.commit(records)
        return records

    def turn(self) -> None:
        """One turn of the thread: take what is queued, make it, account for it, checkpoint."""
        with self.m._cond:
            batch, self.m._queue = self.m._queue, []
        if batch:
            self.m._apply_and_account(batch)
        self.m.try_checkpoint()

    def close(self) -> None:
        self.journal.close()
        self.index.close()

    def rows(self) -> set[str]:
        with sqlite3.connect(self.tmp / "state" / "instances.sqlite") as db:
            return {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("code", "row"),
    [
        (errno.ENOSPC, Row.TRANSIENT),
        (errno.EDQUOT, Row.TRANSIENT),
        (errno.EACCES, Row.TRANSIENT),
        (errno.EPERM, Row.TRANSIENT),
        (errno.EROFS, Row.TRANSIENT),
        (errno.EIO, Row.TRANSIENT),
        (errno.ENOMEM, Row.TRANSIENT),  # not named: waiting loses nothing
        (errno.ENAMETOOLONG, Row.PERMANENT),
        (errno.ENOTDIR, Row.PERMANENT),
        (errno.EISDIR, Row.PERMANENT),
        (errno.ELOOP, Row.PERMANENT),
        (errno.EEXIST, Row.PERMANENT),
        (errno.EINVAL, Row.PERMANENT),
        (errno.EFBIG, Row.PERMANENT),
    ],
)
def test_each_errno_has_its_row(code: int, row: Row) -> None:
    got = classify(OSError(code, os.strerror(code), "/x/y"))
    assert got.row is row
    assert got.reason.startswith(errno.errorcode[code]) and "/x/y" in got.reason


def test_an_invalid_record_is_permanent_and_unknown_exceptions_wait() -> None:
    assert classify(KeyError("root")).permanent
    assert classify(outcome_table.InvalidRecord("no name")).reason == "invalid record: no name"
    assert not classify(RuntimeError("?")).permanent


def test_backoff_grows_and_is_capped() -> None:
    waits = [outcome_table.retry_delay(n) for n in range(1, 12)]
    assert waits == sorted(waits) and waits[0] == outcome_table.BACKOFF_FIRST
    assert waits[-1] == outcome_table.BACKOFF_CAP


def test_names_too_long_for_linux_are_refused_before_the_ack(tmp_path: Path) -> None:
    check_fits(tmp_path, "a" * 255, replace=True)
    with pytest.raises(OSError) as too_long:
        check_fits(tmp_path, "a" * 240, replace=False)  # no room for the ".<seq>" of a taken name
    assert too_long.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError):
        check_fits(tmp_path / ("d" * 256), "x", replace=True)
    with pytest.raises(OSError):
        check_fits(tmp_path.joinpath(*["d" * 200] * 21), "x", replace=True)  # over PATH_MAX
    with pytest.raises(OSError):
        check_fits(tmp_path, "患" * 86, replace=True)  # 258 bytes in UTF-8


# --------------------------------------------------------------------------- every call, every errno

CALLS = ["open", "write", "rename", "mkdir", "dirsync", "syncfs"]
ERRNOS = [errno.ENOSPC, errno.EACCES, errno.EIO, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR]


@pytest.mark.parametrize("code", ERRNOS, ids=[errno.errorcode[c] for c in ERRNOS])
@pytest.mark.parametrize("call", CALLS)
def test_a_fault_at_any_call_quarantines_or_waits_and_never_remakes(
    tmp_path: Path, call: str, code: int
) -> None:
    ops = Fails()
    rig = Rig(tmp_path, ops)
    first = rig.commit("a")
    rig.turn()
    assert (rig.out / "a").exists()
    (rig.out / "a").unlink()  # a consumer takes the first file away
    # A rename fails for b alone; the other calls fail for the whole directory (b and c).
    needle = str(rig.out / "sub" / "b") if call == "rename" else str(rig.out / "sub")
    ops.arm(call, str(rig.out) if call == "syncfs" else needle, code)
    rig.commit("b", "c", directory="sub")
    rig.turn()
    permanent = classify(OSError(code, "")).permanent
    if call in ("syncfs", "dirsync"):
        permanent = False  # a failed flush is never the record's fault: everything waits
    hit = ["b"] if call == "rename" else ["b", "c"]
    if permanent:
        entries = list(rig.quarantine.entries())
        assert [e.header["name"] for e in entries] == hit
        for entry in entries:
            assert entry.data_path is not None
            assert entry.data_path.read_bytes() == f"DICM{entry.header['name']}".encode().ljust(24, b".")
            assert errno.errorcode[code] in entry.reason
        assert rig.m.failing is None
        assert rig.m.visible_through == 3
        quarantined = [e["sop_instance_uid"] for e in rig.events if e["event"] == "object.quarantined"]
        assert quarantined == [f"1.2.{n}" for n in hit]
        if call == "rename":
            assert (rig.out / "sub" / "c").exists()
    else:
        assert rig.m.failing is not None and errno.errorcode[code] in rig.m.failing.reason
        assert rig.m.visible_through == 1
        assert list(rig.quarantine.entries()) == []
        ops.disarm()
        rig.m._next_try = 0.0
        rig.turn()
        assert rig.m.failing is None
        assert (rig.out / "sub" / "b").read_bytes() == b"DICMb".ljust(24, b".")
        assert (rig.out / "sub" / "c").exists()
    assert not (rig.out / "a").exists(), "a file a consumer deleted came back"
    assert [p for p in ops.opened if p.endswith("/a")] == [], "the first file was written again"
    assert not [p for p in rig.out.rglob(".dcmrecvd-*")], "a temp file was left"
    rig.close()
    # Recovery after a crash here: nothing made is made again, nothing quarantined twice.
    again = Rig(tmp_path)
    counts = again.m.replay(again.records)
    assert counts["waiting"] == 0
    assert not (again.out / "a").exists()
    assert len(list(again.quarantine.entries())) == (len(hit) if permanent else 0)
    again.close()
    assert first[0].seq == 1


def test_a_failing_index_does_not_make_the_batch_again(tmp_path: Path) -> None:
    """Files made, then the rows fail (the state disk full): the retry writes rows only."""
    ops = Fails()
    rig = Rig(tmp_path, ops)
    real_put = rig.index.put
    broken = {"on": True}

    def put(rows: list[Any]) -> None:
        if broken["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        real_put(rows)

    rig.index.put = put  # type: ignore[method-assign]
    rig.commit("x", "y")
    rig.turn()
    assert rig.m.failing is not None and "database or disk is full" in rig.m.failing.reason
    (rig.out / "x").unlink()  # the consumer is quicker than the index
    broken["on"] = False
    rig.m._next_try = 0.0
    rig.turn()
    assert rig.m.failing is None and rig.m.visible_through == 2
    assert not (rig.out / "x").exists()
    assert sum(1 for p in ops.opened if p.endswith("/x") or "/.dcmrecvd-" in p) == 2  # x and y, once
    assert rig.rows() == {"1.2.x", "1.2.y"}
    rig.close()


def test_recovery_quarantines_what_cannot_be_made_and_reaches_the_end(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.commit("ok1")
    bad = Record({"root": "relative/oops", "dir": ".", "name": "z"}, b"bytes of a bad record")
    rig.journal.commit([bad])
    rig.commit("ok2", directory="blocked")
    rig.close()  # crash: nothing made
    (rig.out / "blocked").write_text("a file where a directory should be")
    again = Rig(tmp_path)
    counts = again.m.replay(again.records)
    assert counts["quarantined"] == 2 and counts["made"] == 1 and counts["waiting"] == 0
    reasons = sorted(e.reason for e in again.quarantine.entries())
    assert reasons[0].startswith("ENOTDIR") or reasons[0].startswith("EEXIST"), reasons
    assert reasons[1].startswith("invalid record"), reasons
    assert (again.out / "ok1").exists()
    assert again.journal.done_through == 3
    again.close()
    third = Rig(tmp_path)  # and again: nothing quarantined twice
    assert third.m.replay(third.records)["records"] == 0
    assert len(list(third.quarantine.entries())) == 2
    third.close()


def test_recovery_leaves_what_waits_for_the_disk_queued_and_says_why(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.commit("p", "q")
    rig.close()
    ops = Fails()
    ops.arm("open", "/out/", errno.ENOSPC)
    again = Rig(tmp_path, ops)
    counts = again.m.replay(again.records)
    assert counts["waiting"] == 2 and again.m.failing is not None
    ops.disarm()
    again.m.start()
    wait_for(lambda: again.m.visible_through == 2, timeout=10)
    assert again.m.failing is None
    again.m.stop()
    assert (again.out / "p").exists() and (again.out / "q").exists()
    again.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.ENOTDIR], ids=["ENOSPC", "EIO", "ENOTDIR"])
@pytest.mark.parametrize("call", CALLS)
def test_a_fault_at_any_call_of_recovery_never_stops_the_start(tmp_path: Path, call: str, code: int) -> None:
    rig = Rig(tmp_path)
    rig.commit("s1")
    rig.commit("s2", "s3", directory="sub")
    rig.close()  # crash: nothing made
    ops = Fails()
    ops.arm(call, str(rig.out) if call == "syncfs" else str(rig.out / "sub"), code)
    again = Rig(tmp_path, ops)
    counts = again.m.replay(again.records)  # never raises
    waiting = counts["waiting"]
    if classify(OSError(code, "")).permanent and call not in ("syncfs", "dirsync"):
        assert counts["quarantined"] == 2 and waiting == 0 and again.m.failing is None
        assert (again.out / "s1").exists()
    else:
        assert waiting >= 2 and again.m.failing is not None
        ops.disarm()
        again.m.start()
        wait_for(lambda: again.m.visible_through == 3, timeout=10)
        again.m.stop()
        assert (again.out / "sub" / "s2").exists() and (again.out / "sub" / "s3").exists()
    again.close()


def test_made_through_keeps_a_deleted_file_deleted_across_a_crash(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.commit("m1", "m2")
    with rig.m._cond:
        batch, rig.m._queue = rig.m._queue, []
    rig.m._apply_and_account(batch)  # made, and said so; the checkpoint never written
    assert rig.journal.done_through == 0 and rig.journal.made_through == 2
    (rig.out / "m1").unlink()
    rig.close()
    again = Rig(tmp_path)
    assert [r.seq for r in again.records] == [1, 2]
    counts = again.m.replay(again.records)
    assert counts["passed"] == 2 and counts["made"] == 0
    assert not (again.out / "m1").exists() and (again.out / "m2").exists()
    assert again.rows() == {"1.2.m1", "1.2.m2"}  # rows and events are redone, files are not
    again.close()


def test_a_quarantine_that_cannot_be_written_makes_the_record_wait_never_drops_it(tmp_path: Path) -> None:
    ops = Fails()
    rig = Rig(tmp_path, ops)
    (rig.out / "blocked").write_text("in the way")
    ops.arm("open", "quarantine", errno.ENOSPC)  # the state disk is full too
    rig.commit("w1", directory="blocked")
    rig.commit("w2")
    rig.turn()
    assert rig.m.failing is not None and "ENOSPC" in rig.m.failing.reason
    assert rig.m.visible_through == 0 and list(rig.quarantine.entries()) == []
    ops.disarm()
    rig.m._next_try = 0.0
    rig.turn()
    assert rig.m.failing is None and rig.m.visible_through == 2
    assert [e.header["name"] for e in rig.quarantine.entries()] == ["w1"]
    assert (rig.out / "w2").exists()
    rig.close()


def test_a_checkpoint_that_cannot_be_written_is_tried_again_and_nothing_is_made_twice(
    tmp_path: Path,
) -> None:
    ops = Fails()
    rig = Rig(tmp_path, ops)
    ops.arm("journal_write", "journal/checkpoint", errno.EIO)
    rig.commit("k1")  # the journal's segment writes go on: only its checkpoint file fails
    rig.turn()
    assert (rig.out / "k1").exists() and rig.journal.done_through == 0
    assert rig.m.failing is not None and "EIO" in rig.m.failing.reason  # nothing new is acked
    (rig.out / "k1").unlink()
    ops.disarm()
    rig.turn()
    assert rig.journal.done_through == 1 and not (rig.out / "k1").exists()
    assert rig.m.failing is None
    rig.close()


# --------------------------------------------------------------------------- the quarantine


def test_quarantine_lists_exports_and_a_retry_makes_the_file(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (rig.out / "blocked").write_text("in the way")
    rig.commit("r1", directory="blocked")
    rig.turn()
    (entry,) = list(rig.quarantine.entries())
    assert entry.intended_path == str(rig.out / "blocked" / "r1") and entry.sop_instance_uid == "1.2.r1"
    exported = export([entry], tmp_path / "export")
    assert [p.read_bytes() for p in exported] == [b"DICMr1".ljust(24, b".")]
    about = json.loads((tmp_path / "export" / f"{entry.id}.json").read_text())
    assert about["seq"] == 1 and about["header"]["name"] == "r1"
    (rig.out / "blocked").unlink()  # the admin fixes the cause...
    assert rig.quarantine.request_retry([entry.id]) == [entry.id]  # ...and asks for a retry
    rig.turn()
    from dcmrecvd.store import bookkeeping

    bookkeeping.retry_quarantined(rig.m)
    assert (rig.out / "blocked" / "r1").read_bytes() == b"DICMr1".ljust(24, b".")
    assert list(rig.quarantine.entries()) == []
    assert "1.2.r1" in rig.rows()
    rig.close()


def test_a_retry_that_fails_again_keeps_the_entry_with_its_new_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (rig.out / "blocked").write_text("in the way")
    rig.commit("r2", directory="blocked")
    rig.turn()
    (entry,) = list(rig.quarantine.entries())
    rig.quarantine.request_retry()
    from dcmrecvd.store import bookkeeping

    bookkeeping.retry_quarantined(rig.m)
    (kept,) = list(rig.quarantine.entries())
    assert kept.id == entry.id
    assert not list(rig.quarantine.directory.glob("*.retry"))
    rig.close()


def test_a_released_entry_is_indexed_with_the_crc_of_its_bytes(tmp_path: Path) -> None:
    """Storage Commitment (verify = checksum) compares the file with this digest."""
    rig = Rig(tmp_path)
    (rig.out / "blocked").write_text("in the way")
    rig.commit("r3", directory="blocked")
    rig.turn()
    (rig.out / "blocked").unlink()
    rig.quarantine.request_retry()
    from dcmrecvd.store import bookkeeping

    bookkeeping.retry_quarantined(rig.m)
    made = (rig.out / "blocked" / "r3").read_bytes()
    with sqlite3.connect(tmp_path / "state" / "instances.sqlite") as db:
        (digest,) = db.execute("SELECT digest FROM instances WHERE sop_instance_uid = '1.2.r3'").fetchone()
    assert digest == f"crc32:{zlib.crc32(made):08x}"
    rig.close()
