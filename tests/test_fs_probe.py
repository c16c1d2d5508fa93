"""Which filesystems let one directory fsync stand for the file's own: real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from dcmrecvd.store import fs_probe
from dcmrecvd.store.storage import Store

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
    assert Store(journaled).durability() == "journal-ordered"


@needs_root
def test_ext4_without_a_journal_is_not_trusted(ext4: MakeExt4) -> None:
    bare = ext4("^has_journal")
    assert fs_probe.filesystem_type(bare) == fs_probe.EXT_MAGIC
    assert not fs_probe.ext4_has_journal(bare)
    store = Store(bare)
    assert store.durability() == "fdatasync"
    assert Store(bare, durable=False).durability() == "off"
    pending = store.open(PurePosixPath("."))
    pending.write(b"x" * 10000)
    assert pending.commit("f", replace=True)[0].read_bytes() == b"x" * 10000


def test_other_filesystems_are_not_trusted(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():
        assert not fs_probe.journals_in_order(shm)
    assert not fs_probe.ext4_has_journal(tmp_path, proc_root=tmp_path)  # no /proc/fs/ext4 there


def fake_kernel(tmp_path: Path, journal_task: str | None, options: str | None) -> tuple[Path, Path]:
    """A /sys and /proc holding what the kernel shows for the device under ``tmp_path``."""
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    dev = os.stat(tmp_path).st_dev
    (sys_root / "dev/block").mkdir(parents=True)
    link = sys_root / "dev/block" / f"{os.major(dev)}:{os.minor(dev)}"
    link.symlink_to("../../devices/virtual/block/vdz")
    if journal_task is not None:
        (sys_root / "fs/ext4/vdz").mkdir(parents=True)
        (sys_root / "fs/ext4/vdz/journal_task").write_text(journal_task + "\n")
    if options is not None:
        (proc_root / "fs/ext4/vdz").mkdir(parents=True)
        (proc_root / "fs/ext4/vdz/options").write_text(options.replace(" ", "\n") + "\n")
    return sys_root, proc_root


@pytest.mark.parametrize(
    ("journal_task", "options", "journaled"),
    [
        ("26758", None, True),  # sysfs alone (systemd's ProcSubset=pid hides /proc/fs)
        ("<none>", "rw data=ordered", False),  # sysfs wins
        (None, "rw barrier data=ordered", True),  # older kernels: /proc/fs/ext4 only
        (None, "rw barrier discard", False),
        (None, None, False),
    ],
)
def test_journal_signals(
    tmp_path: Path, journal_task: str | None, options: str | None, journaled: bool
) -> None:
    sys_root, proc_root = fake_kernel(tmp_path, journal_task, options)
    assert fs_probe.block_device_name(tmp_path, sys_root) == "vdz"
    assert fs_probe.ext4_has_journal(tmp_path, proc_root=proc_root, sys_root=sys_root) is journaled


def test_unknown_paths_give_conservative_answers(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert fs_probe.filesystem_type(missing) == 0
    assert fs_probe.block_device_name(missing) is None
    assert not fs_probe.journals_in_order(missing)
