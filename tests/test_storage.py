"""The atomic storage layer on its own: names appear complete or not at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest
from conftest import wait_for

from dcmrecvd.store import direct_io, storage
from dcmrecvd.store.storage import FileExists, Store

pytestmark = pytest.mark.inprocess


def test_commit_is_atomic_and_hidden_until_then(tmp_path: Path) -> None:
    store = Store(tmp_path)
    pending = store.open(PurePosixPath("a/b"))
    pending.write(b"hello ")
    pending.writev([b"wor", memoryview(b"ld")])
    assert list((tmp_path / "a/b").iterdir()) == [pending.temp_path]
    assert pending.temp_path.name.startswith(f".dcmrecvd-{os.getpid()}-")
    final, replaced = pending.commit("x.dcm", replace=True)
    assert (final.read_bytes(), replaced) == (b"hello world", False)
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["x.dcm"]


def test_replace_and_no_clobber(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.open(PurePosixPath("."))
    first.write(b"old")
    first.commit("f", replace=True)
    second = store.open(PurePosixPath("."))
    second.write(b"new")
    with pytest.raises(FileExists):
        second.commit("f", replace=False)
    assert (tmp_path / "f").read_bytes() == b"old"
    final, replaced = second.commit("g", replace=False)
    assert final.read_bytes() == b"new" and not replaced
    third = store.open(PurePosixPath("."))
    third.write(b"newest")
    assert third.commit("f", replace=True)[1] is True
    assert (tmp_path / "f").read_bytes() == b"newest"


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    pending = Store(tmp_path).open(PurePosixPath("."))
    pending.write(b"partial")
    pending.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("relative", ["../x", "/etc", "a/../../b"])
def test_directories_cannot_escape(tmp_path: Path, relative: str) -> None:
    with pytest.raises(ValueError):
        Store(tmp_path).directory(PurePosixPath(relative))


def test_plain_names_only(tmp_path: Path) -> None:
    pending = Store(tmp_path).open(PurePosixPath("."))
    with pytest.raises(ValueError):
        pending.commit("../escape", replace=True)
    pending.discard()


def _open_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


@pytest.mark.parametrize(
    "sizes",
    [
        [0],
        [1],
        [4095, 1],
        [4096],
        [direct_io.WRITE_AT - 1, 2, 4093],
        [direct_io.STAGE_SIZE + 12345],  # one chunk larger than the staging buffer
        [7] * 3000,  # many tiny chunks
        [direct_io.STAGE_SIZE, direct_io.STAGE_SIZE],
    ],
    ids=lambda sizes: f"{len(sizes)}x{sizes[0]}",
)
def test_durable_files_bypass_the_page_cache_and_keep_every_byte(tmp_path: Path, sizes: list[int]) -> None:
    chunks = [os.urandom(n) for n in sizes]
    pending = Store(tmp_path).open(PurePosixPath("."))
    assert _open_flags(pending.fd) & os.O_DIRECT
    pending.write(chunks[0])
    pending.writev([memoryview(bytearray(c)) for c in chunks[1:]])
    final, _ = pending.commit("f", replace=True)
    assert final.read_bytes() == b"".join(chunks)
    assert pending.size == sum(sizes)


def test_without_fsync_the_page_cache_is_used(tmp_path: Path) -> None:
    pending = Store(tmp_path, durable=False).open(PurePosixPath("."))
    assert not _open_flags(pending.fd) & os.O_DIRECT
    pending.write(b"abc")
    assert pending.commit("f", replace=True)[0].read_bytes() == b"abc"


def test_buffers_are_reused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.open(PurePosixPath("."))
    assert first.direct is not None
    buffer = first.direct.buf
    first.discard()
    second = store.open(PurePosixPath("."))
    assert second.direct is not None and second.direct.buf is buffer
    second.discard()


def test_stale_temp_files_of_live_processes_are_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{storage.TEMP_PREFIX}999999-a{storage.TEMP_SUFFIX}"
    live = tmp_path / f"{storage.TEMP_PREFIX}1-b{storage.TEMP_SUFFIX}"  # PID 1 is alive
    other = tmp_path / "CT.1.2.3"
    for path in (dead, live, other):
        path.write_bytes(b"x")
    assert storage.remove_stale_temp_files(tmp_path) == [dead]
    assert live.exists() and other.exists()


class MisalignedPool(direct_io.BufferPool):
    """Hands out buffers one byte off alignment, which O_DIRECT refuses (EINVAL)."""

    def take(self):  # type: ignore[no-untyped-def]
        return memoryview(bytearray(self.size + 1))[1:]

    def give(self, buf) -> None:  # type: ignore[no-untyped-def]
        pass


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    try:
        os.pwrite(fd, memoryview(bytearray(8193))[1:], 0)
        pytest.skip("this filesystem takes misaligned direct writes")
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    finally:
        os.close(fd)
    data = os.urandom(3 * direct_io.WRITE_AT + 5)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    appender = direct_io.DirectAppender(fd, MisalignedPool(direct_io.STAGE_SIZE))
    appender.write([data])
    assert not appender.direct
    appender.finish()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def test_directory_fsyncs_are_shared_by_callers_that_wait_for_one_in_flight() -> None:
    """Group commit: a caller that arrives during an fsync waits for the next one, which
    covers everyone who arrived meanwhile; never for the one already running."""
    import threading

    from dcmrecvd.store.storage import _DirectorySync

    group = _DirectorySync()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def fsync() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            started.set()
            assert release.wait(10)

    first = threading.Thread(target=group.sync, args=(fsync,))
    first.start()
    assert started.wait(10)
    late = [threading.Thread(target=group.sync, args=(fsync,)) for _ in range(3)]
    for t in late:
        t.start()
    wait_for(lambda: group._requested == 4, interval=0.001)  # every late caller holds its ticket
    assert all(t.is_alive() for t in late)  # none may return on the fsync that began before it
    release.set()
    for t in [first, *late]:
        t.join(10)
    assert calls == [0, 1]  # four callers, two fsyncs


def test_a_failed_shared_fsync_fails_every_caller_it_covered() -> None:
    import errno
    import threading

    from dcmrecvd.store.storage import _DirectorySync

    group = _DirectorySync()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def fsync() -> None:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
        elif len(calls) == 2:
            raise OSError(errno.EIO, "injected")

    results: dict[int, str] = {}

    def caller(n: int) -> None:
        try:
            group.sync(fsync)
            results[n] = "ok"
        except OSError as exc:
            results[n] = errno.errorcode[exc.errno or 0]

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    assert started.wait(10)
    late = [threading.Thread(target=caller, args=(n,)) for n in (1, 2)]
    for t in late:
        t.start()
    release.set()
    for t in [first, *late]:
        t.join(10)
    assert results == {0: "ok", 1: "EIO", 2: "EIO"}
    group.sync(fsync)  # the next caller gets a fresh fsync: the failure was not turned into success
    assert len(calls) == 3
