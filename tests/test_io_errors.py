"""I/O errors are failures, never successes: faults injected through the storage seam.

A real ``Association`` over a socketpair stores through a ``Store`` whose
``FileOps`` fails one chosen call (write, pwrite, fdatasync, sync_file_range,
rename, link, the directory fsync, the temp file's creation) with EIO, ENOSPC
or EDQUOT.  That C-STORE gets 0xA7xx, nothing is left under a final name or
as a temp file, the association serves the next object, and a flush that
failed is never called again for that file.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Sequence
from pathlib import Path

import pytest
from malformed import base_dataset, encode
from peers import associate_rq, dataset_bytes
from splits import whole
from test_association import CT, EXPLICIT, RELEASE_RQ, Peer, make_runtime, store

from dcmrecvd.store.file_ops import Buffer, FileOps
from dcmrecvd.store.storage import TEMP_PREFIX, Store
from dcmrecvd.wire import pdu

pytestmark = pytest.mark.inprocess


class Faulty(FileOps):
    """Fails the first call of ``op`` made while ``armed``, with ``error``."""

    def __init__(self, op: str, error: int) -> None:
        self.op, self.error = op, error
        self.armed = False
        self.failed_path = ""
        self.paths: dict[int, str] = {}  # fd -> the file it was opened on
        self.calls: list[tuple[str, object]] = []

    def _maybe_fail(self, op: str, what: object) -> None:
        if isinstance(what, int):
            what = self.paths.get(what, what)
        self.calls.append((op, what))
        if self.armed and op == self.op:
            self.armed = False
            self.failed_path = str(what)
            raise OSError(self.error, f"injected {errno.errorcode[self.error]} in {op}")

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._maybe_fail("open", str(path))
        fd = super().open(path, flags, mode)
        self.paths[fd] = str(path)
        return fd

    def writev(self, fd: int, chunks: Sequence[Buffer]) -> int:
        self._maybe_fail("write", fd)
        return super().writev(fd, chunks)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        self._maybe_fail("write", fd)
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail("fdatasync", fd)
        super().fdatasync(fd)

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> bool:
        if offset == 0 and length == 0:  # the flush, not the writeback hint
            self._maybe_fail("sync_file_range", fd)
        return super().sync_file_range(fd, offset, length, flags)

    def replace(self, source: Path, target: Path) -> None:
        self._maybe_fail("rename", str(target))
        super().replace(source, target)

    def link(self, source: Path, target: Path) -> None:
        self._maybe_fail("rename", str(target))
        super().link(source, target)

    def fsync_directory(self, path: Path) -> None:
        self._maybe_fail("dirsync", str(path))
        super().fsync_directory(path)


def ct(uid: str, size: int) -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = b"\x11" * size
    return encode(ds)


CASES = [
    ("open", errno.EDQUOT, False),
    ("write", errno.ENOSPC, False),
    ("write", errno.EIO, False),
    ("fdatasync", errno.EIO, False),
    ("sync_file_range", errno.EIO, True),
    ("rename", errno.EIO, False),
    ("rename", errno.ENOSPC, True),
    ("dirsync", errno.EIO, False),
    ("dirsync", errno.EIO, True),
]


@pytest.mark.parametrize("unique", [False, True], ids=["replace", "no-clobber"])
@pytest.mark.parametrize(("op", "error", "ordered"), CASES)
def test_an_io_error_fails_that_store_and_nothing_else(
    tmp_path: Path, op: str, error: int, ordered: bool, unique: bool
) -> None:
    faulty = Faulty(op, error)
    rt = make_runtime(tmp_path, **({"filenames": "unique"} if unique else {}))
    store_ = Store(tmp_path, ops=faulty, ordered_journal=ordered)
    rt = dataclasses.replace(rt, default=dataclasses.replace(rt.default, store=store_))
    peer = Peer(rt)
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    good = ct("1.2.3.1", 600000)
    peer.send(store(good, "1.2.3.1", fragment=16000), whole)
    assert peer.status() == 0x0000
    faulty.armed = True
    peer.send(store(ct("1.2.3.2", 600000), "1.2.3.2", fragment=16000, message_id=2), whole)
    status = peer.status()
    assert not faulty.armed, f"{op} was never called"
    assert 0xA700 <= status <= 0xA7FF, hex(status)
    again = ct("1.2.3.3", 3000)
    peer.send(store(again, "1.2.3.3", message_id=3), whole)
    assert peer.status() == 0x0000  # the association goes on
    peer.send(RELEASE_RQ, whole)
    assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
    peer.finish()
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts)
    assert not [p for p in files if p.name.startswith(TEMP_PREFIX)], "a temp file was left"
    assert len(files) == 2 and all("1.2.3.2" not in p.name for p in files), [p.name for p in files]
    by_content = sorted(dataset_bytes(p) for p in files)
    assert by_content == sorted([good, again])
    if op in ("fdatasync", "sync_file_range"):  # never retried on that file, by any flush
        flushes = [what for name, what in faulty.calls if name in ("fdatasync", "sync_file_range")]
        assert flushes.count(faulty.failed_path) == 1, flushes
