"""The atomic storage layer on its own: names appear complete or not at all."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from dcmrecvd import storage
from dcmrecvd.storage import FileExists, Store


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


def test_filesystem_detection(tmp_path: Path) -> None:
    assert storage.filesystem_type(tmp_path) != 0
    if Path("/dev/shm").is_dir():
        assert storage.filesystem_type(Path("/dev/shm")) not in storage._ORDERED_JOURNAL_FS


def test_stale_temp_files_of_live_processes_are_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{storage.TEMP_PREFIX}999999-a{storage.TEMP_SUFFIX}"
    live = tmp_path / f"{storage.TEMP_PREFIX}1-b{storage.TEMP_SUFFIX}"  # PID 1 is alive
    other = tmp_path / "CT.1.2.3"
    for path in (dead, live, other):
        path.write_bytes(b"x")
    assert storage.remove_stale_temp_files(tmp_path) == [dead]
    assert live.exists() and other.exists()
