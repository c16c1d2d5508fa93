"""What the filesystem under a directory promises about ordering.

The storage layer may skip a journal commit only where the filesystem's
journal commits every metadata change in order (XFS; ext3/ext4 *with* a
journal).  An ext4 made without a journal (``mkfs.ext4 -O ^has_journal``, as
some cloud images are) has the same magic number but no such ordering: there
a directory fsync does not carry the file's size and extents, so the file
itself must be synced.  When in doubt, the answer is "no": that only costs
speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

EXT_MAGIC = 0xEF53
XFS_MAGIC = 0x58465342
#: Filesystems in memory: nothing written there survives a power cut.
MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding ``path`` (0 if unknown)."""

    class _StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = _StatFS()
    statfs = getattr(_libc, "statfs", None)
    if statfs is None or statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


def block_device_name(path: Path, sys_root: Path = Path("/sys")) -> str | None:
    """The kernel's name (``vda1``, ``dm-0``) of the device holding ``path``."""
    try:
        dev = os.stat(path).st_dev
        link = os.readlink(sys_root / "dev/block" / f"{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return None
    return os.path.basename(link)


def ext4_has_journal(path: Path, proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> bool:
    """Whether the ext3/ext4 filesystem holding ``path`` has a journal.

    ``/sys/fs/ext4/<dev>/journal_task`` names the journal thread (``<none>``
    without a journal); it stays readable under systemd's ``ProcSubset=pid``,
    which hides the older signal used as a fallback: a ``data=`` mode in
    ``/proc/fs/ext4/<dev>/options``, listed only when a journal exists.
    """
    name = block_device_name(path, sys_root)
    if name is None:
        return False
    try:
        return (sys_root / "fs/ext4" / name / "journal_task").read_text().strip().isdigit()
    except OSError:
        pass
    try:
        options = (proc_root / "fs/ext4" / name / "options").read_text().split()
    except OSError:
        return False
    return any(option.startswith("data=") for option in options)


def journals_in_order(path: Path) -> bool:
    """Whether one directory fsync also commits every earlier metadata change."""
    kind = filesystem_type(path)
    if kind == XFS_MAGIC:
        return True
    if kind == EXT_MAGIC:
        return ext4_has_journal(path)
    return False
