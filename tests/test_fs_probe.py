"""Which filesystems let one directory fsync stand for the file's own: real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from dcmrecvd import fs_probe
from dcmrecvd.storage import Store

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None, reason="mounts a loop device (root, e2fsprogs)"
)
MakeExt4 = Callable[..., Path]


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[MakeExt4]:
    """Makes and loop-mounts small ext4 filesystems; unmounts them afterwards."""
    mounted: list[Path] = []

    def make(*features: str) -> Path:
        image = tmp_path / f"fs{len(mounted)}.img"
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        with image.open("wb") as f:
            f.truncate(32 << 20)
        options = ["-O", ",".join(features)] if features else []
        subprocess.run(["mkfs.ext4", "-q", *options, str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@needs_root
def test_ext4_with_a_journal_commits_in_order(ext4: MakeExt4) -> None:
    journaled = ext4()
    assert fs_probe.filesystem_type(journaled) == fs_probe.EXT_MAGIC
    assert fs_probe.journals_in_order(journaled)
    assert Store(journaled)._traits(journaled).ordered_journal


@needs_root
def test_ext4_without_a_journal_is_not_trusted(ext4: MakeExt4) -> None:
    bare = ext4("^has_journal")
    assert fs_probe.filesystem_type(bare) == fs_probe.EXT_MAGIC
    assert not fs_probe.ext4_has_journal(bare)
    store = Store(bare)
    assert not store._traits(bare).ordered_journal
    pending = store.open(PurePosixPath("."))
    pending.write(b"x" * 10000)
    assert pending.commit("f", replace=True)[0].read_bytes() == b"x" * 10000


def test_other_filesystems_are_not_trusted(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():
        assert not fs_probe.journals_in_order(shm)
    assert not fs_probe.ext4_has_journal(tmp_path, proc_root=tmp_path)  # no /proc/fs/ext4 there


def test_unknown_paths_give_conservative_answers(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert fs_probe.filesystem_type(missing) == 0
    assert fs_probe.block_device_name(missing) is None
    assert not fs_probe.journals_in_order(missing)
