"""The system calls of the write path, behind one small seam.

Everything ``storage`` and ``direct_io`` do to the filesystem goes through a
``FileOps``: open, write/pwrite, the flushes (fdatasync, fsync,
sync_file_range), rename, link, unlink, mkdir, close, and the directory
fsync.  Production uses ``REAL``, a thin pass-through to ``os`` (or, in the tests that
kill -9 the daemon in a chosen phase, ``StopAfter``).  Tests put a
recorder or a fault injector in its place, which is how the durability promise
is checked state by state (``tests/crash_model.py``) and how I/O errors are
made to happen exactly where a test wants them (``tests/test_io_errors.py``),
without LD_PRELOAD or a debugger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

Buffer = bytes | bytearray | memoryview

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
#: Write the range and wait for it: data on the device (not past its cache).
WRITE_AND_WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
HAS_SYNC_FILE_RANGE = _sync_file_range is not None
_syncfs = getattr(_libc, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
#: sync_file_range failures that mean "not here", not "your data is lost".
_UNSUPPORTED = frozenset((errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE))


class FileOps:
    """Pass-through to the kernel; subclass to record or fail single calls."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def writev(self, fd: int, chunks: Sequence[Buffer]) -> int:
        return os.writev(fd, chunks)

    def write(self, fd: int, data: Buffer) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def journal_write(self, fd: int, data: Buffer, offset: int) -> int:
        """A write into an ack-journal file opened O_DSYNC | O_DIRECT: durable on return."""
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> bool:
        """True when done; False when this kernel or filesystem cannot do it (the caller
        then falls back to fdatasync).  An I/O error raises: it is never papered over by
        a fallback that might report success for data the kernel has already dropped."""
        if _sync_file_range is None:
            return False
        if _sync_file_range(fd, offset, length, flags) == 0:
            return True
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return False
        raise OSError(err, os.strerror(err))

    def syncfs(self, path: Path) -> None:
        """Everything written to the filesystem holding ``path`` (data and metadata) made
        durable, with one cache flush: how the materialiser flushes a batch of files at once."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs is None:
                os.sync()  # no syncfs(2): the whole machine, which covers this filesystem too
            elif _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def clear_direct(self, fd: int) -> None:
        """Turn O_DIRECT off for the rest of a file (its unaligned tail)."""
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def link(self, source: Path, target: Path) -> None:
        os.link(source, target)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path, mode: int) -> None:
        os.mkdir(path, mode)

    def fsync_directory(self, path: Path) -> None:
        """Make a directory's entries (renames, links, new files) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StopAfter(FileOps):
    """A test hook: the process stops itself (SIGSTOP) right after the ``count``-th call
    of ``op``, so that a test can kill -9 it in exactly that phase of the write path.

    ``op`` is one of: open, write (write, writev, pwrite), journal (a write into the
    ack journal, durable on return), flush (fdatasync, syncfs, or the waiting sync_file_range),
    rename (replace or link), unlink, dirsync.  Set from
    ``DCMRECVD_TEST_STOP_AFTER=op:count``; never set in production.  Calls made by the
    main thread (start-up: the journal's files, recovery) are not counted.
    """

    def __init__(self, op: str, count: int) -> None:
        self.op, self.left = op, count

    def _after(self, op: str) -> None:
        # Start-up (the journal's files, recovery) runs on the main thread: only the calls
        # of serving (associations, the materialiser) count.
        if op == self.op and threading.current_thread() is not threading.main_thread():
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), signal.SIGSTOP)

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self._after("open")
        return fd

    def writev(self, fd: int, chunks: Sequence[Buffer]) -> int:
        n = super().writev(fd, chunks)
        self._after("write")
        return n

    def write(self, fd: int, data: Buffer) -> int:
        n = super().write(fd, data)
        self._after("write")
        return n

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        self._after("write")
        return n

    def journal_write(self, fd: int, data: Buffer, offset: int) -> int:
        n = super().journal_write(fd, data, offset)
        self._after("journal")
        return n

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self._after("flush")

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> bool:
        done = super().sync_file_range(fd, offset, length, flags)
        if done and flags & SYNC_FILE_RANGE_WAIT_AFTER:
            self._after("flush")
        return done

    def replace(self, source: Path, target: Path) -> None:
        super().replace(source, target)
        self._after("rename")

    def link(self, source: Path, target: Path) -> None:
        super().link(source, target)
        self._after("rename")

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        self._after("unlink")

    def fsync_directory(self, path: Path) -> None:
        super().fsync_directory(path)
        self._after("dirsync")

    def syncfs(self, path: Path) -> None:
        super().syncfs(path)
        self._after("flush")


def from_environment(environ: Mapping[str, str]) -> FileOps:
    """The process's FileOps: the real calls, or the test hook ``StopAfter``."""
    spec = environ.get("DCMRECVD_TEST_STOP_AFTER", "")
    op, _, count = spec.partition(":")
    if op and count.isdigit() and int(count) > 0:
        return StopAfter(op, int(count))
    return FileOps()


REAL = from_environment(os.environ)
