"""Atomic, durable files under a root directory.  Knows nothing of DICOM.

A file under a final name is always complete: data goes to a hidden temp file
in the target directory, is fsynced, renamed (or hard-linked, when an existing
file must not be replaced) to its final name, and the directory is fsynced.
Only then may the caller acknowledge.  On any failure the temp file goes away
and an older file of the same name survives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

TEMP_PREFIX = ".dcmrecvd-"
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o640
DIR_MODE = 0o750
#: Start writeback every this many bytes, so the final fsync has little left to do.
WRITEBACK_CHUNK = 128 * 1024

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_WRITE_AND_WAIT = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
#: Filesystems whose journal commits transactions strictly in order (ext2/3/4, XFS).
_ORDERED_JOURNAL_FS = {0xEF53: "ext4", 0x58465342: "xfs"}
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


class FileExists(Exception):
    """The final name is taken and the scheme forbids replacing it."""


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to begin writing a range now (best effort, Linux only)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@dataclass
class PendingFile:
    """An open temp file that becomes a final file on ``commit``."""

    store: Store
    directory: Path
    temp_path: Path
    fd: int
    size: int = 0
    _flushed_to: int = field(default=0, repr=False)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (all of it)."""
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)
        self._maybe_writeback()

    def writev(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Append several buffers with as few system calls as possible."""
        total = sum(len(c) for c in chunks)
        written = os.writev(self.fd, chunks)
        if written < total:  # rare: a short write; finish the rest piecewise
            skip = written
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                view = memoryview(chunk)[skip:]
                skip = 0
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
        self.size += total
        self._maybe_writeback()

    def _maybe_writeback(self) -> None:
        if self.store.durable and self.size - self._flushed_to >= WRITEBACK_CHUNK:
            _start_writeback(self.fd, self._flushed_to, self.size - self._flushed_to)
            self._flushed_to = self.size

    def commit(self, name: str, *, replace: bool) -> tuple[Path, bool]:
        """Make the data durable under ``name``; return (path, replaced an older file).

        With ``replace=False`` an existing file is never touched: FileExists is
        raised and the temp file stays for another try with a new name.
        """
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        final = self.directory / name
        if self.fd >= 0:
            if self.store.durable:
                self.store.flush_data(self.fd, self.directory)
            os.close(self.fd)
            self.fd = -1
        replaced = False
        if replace:
            replaced = os.path.lexists(final)
            os.replace(self.temp_path, final)
        else:
            try:
                os.link(self.temp_path, final)
            except FileExistsError:
                raise FileExists(str(final)) from None
            os.unlink(self.temp_path)
        self.store.sync_directory(self.directory)
        return final, replaced

    def discard(self) -> None:
        """Remove the temp file; never raises."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.temp_path)
        except OSError:
            pass


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding ``path`` (0 if unknown)."""

    class _StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = _StatFS()
    statfs = getattr(_libc, "statfs", None)
    if statfs is None or statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


class Store:
    """Creates pending files below ``root``; ``durable`` turns fsync on.

    How a file's data is made durable before its rename depends on the
    filesystem.  In general: ``fdatasync`` (one journal commit), then the
    directory fsync (a second one).  On ext4 and XFS, whose journals commit in
    order, the data blocks are written and waited for with ``sync_file_range``
    and the directory fsync's single commit then carries the file's allocation,
    size and new name together, after a cache flush that covers the data: the
    same guarantee at half the journal commits.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        #: Directory known to exist -> whether its filesystem journals in order.  Per
        #: directory, because a subdirectory may be another mount (another filesystem).
        self._known_dirs: dict[Path, bool] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _ordered_journal(directory: Path) -> bool:
        return _sync_file_range is not None and filesystem_type(directory) in _ORDERED_JOURNAL_FS

    def flush_data(self, fd: int, directory: Path) -> None:
        """Put a file's data on disk, ahead of the directory fsync that publishes it."""
        ordered = self._known_dirs.get(directory)
        if ordered is None:
            ordered = self._ordered_journal(directory)
        if ordered:
            assert _sync_file_range is not None
            if _sync_file_range(fd, 0, 0, _WRITE_AND_WAIT) == 0:
                return
        os.fdatasync(fd)

    def directory(self, relative: PurePosixPath) -> Path:
        """The absolute target directory, created (durably) if missing."""
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"directory escapes the output root: {relative}")
        target = self.root.joinpath(*relative.parts) if relative.parts else self.root
        if target in self._known_dirs:
            return target
        missing: list[Path] = []
        probe = target
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass
            self.sync_directory(path.parent)
        with self._lock:
            self._known_dirs[target] = self._ordered_journal(target)
        return target

    def open(self, relative: PurePosixPath) -> PendingFile:
        """A new hidden temp file in the target directory."""
        directory = self.directory(relative)
        while True:
            temp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                continue
            except FileNotFoundError:
                # The directory vanished under us (an admin cleaned up): make it again.
                with self._lock:
                    self._known_dirs.pop(directory, None)
                directory = self.directory(relative)
                continue
            return PendingFile(self, directory, temp, fd)

    def sync_directory(self, path: Path) -> None:
        """fsync a directory so that a rename or mkdir in it survives a crash."""
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(root: Path, candidates: Sequence[Path] = ()) -> Iterator[Path]:
    """Temp files left by a dead dcmrecvd in ``root`` and the scheme's directories.

    A temp file whose writer (the PID in its name) is still alive belongs to a
    running receiver sharing the directory and is left alone.
    """
    dirs = [root, *candidates]
    for directory in dirs:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                continue
            pid_text = name[len(TEMP_PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue
            yield Path(entry.path)


def scheme_directories(root: Path) -> list[Path]:
    """Directories that +ssd writes into: data/YYYY/MM/DD and undef/YYYYMMDD."""
    found: list[Path] = []
    found.extend(p for p in root.glob("undef/*") if p.is_dir())
    found.extend(p for p in root.glob("data/*/*/*") if p.is_dir())
    return found


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Delete what a crash left behind; return what was removed."""
    removed = []
    for path in stale_temp_files(root, scheme_directories(root)):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return removed
