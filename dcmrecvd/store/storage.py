"""Atomic, durable files under a root directory.  Knows nothing of DICOM.

A file under a final name is always complete: data goes to a hidden temp file
in the target directory, is fsynced, renamed (or hard-linked, when an existing
file must not be replaced) to its final name, and the directory is fsynced.
Only then may the caller acknowledge.  A failure before the rename removes
the temp file, and an older file of the same name survives; a failure after it
(the directory fsync) takes the new name back.  A flush that failed is never
retried (PostgreSQL's fsyncgate: the kernel may have dropped the data and
report success the second time): the file is discarded and the request fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .buffers import BufferPool
from .direct_io import STAGE_SIZE, DirectAppender
from .file_ops import HAS_SYNC_FILE_RANGE, REAL, SYNC_FILE_RANGE_WRITE, WRITE_AND_WAIT, FileOps
from .fs_probe import journals_in_order

TEMP_PREFIX = ".dcmrecvd-"
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o640
DIR_MODE = 0o750
#: Start writeback every this many bytes, so the final fsync has little left to do.
WRITEBACK_CHUNK = 128 * 1024


class FileExists(Exception):
    """The final name is taken and the scheme forbids replacing it."""


@dataclass
class PendingFile:
    """An open temp file that becomes a final file on ``commit``."""

    store: Store
    directory: Path
    temp_path: Path
    fd: int
    direct: DirectAppender | None = None
    size: int = 0
    _flushed_to: int = field(default=0, repr=False)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (all of it)."""
        self.writev([data])

    def writev(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Append several buffers with as few system calls as possible."""
        total = sum(len(c) for c in chunks)
        if self.direct is not None:
            self.direct.write(chunks)
            self.size += total
            return
        ops = self.store.ops
        written = ops.writev(self.fd, chunks)
        if written < total:  # rare: a short write; finish the rest piecewise
            skip = written
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                view = memoryview(chunk)[skip:]
                skip = 0
                while view:
                    n = ops.write(self.fd, view)
                    view = view[n:]
        self.size += total
        self._maybe_writeback()

    def _maybe_writeback(self) -> None:
        if self.store.durable and self.size - self._flushed_to >= WRITEBACK_CHUNK:
            # Ask the kernel to begin writing now, so that the final flush has little left.
            self.store.ops.sync_file_range(
                self.fd, self._flushed_to, self.size - self._flushed_to, SYNC_FILE_RANGE_WRITE
            )
            self._flushed_to = self.size

    def flush(self) -> None:
        """Make the data durable and close the file (``commit`` does it if needed).

        Separate so that a caller can create files in the directory between
        this and the commit, whose directory fsync then carries them too.
        """
        if self.direct is not None:
            self.direct.finish()
            self.direct = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                if self.store.durable:
                    self.store.flush_data(fd, self.directory)
            finally:
                # A failed flush is never retried on this descriptor (fsyncgate): the
                # caller discards the file and the request fails.
                self.store.ops.close(fd)

    def commit(self, name: str, *, replace: bool) -> tuple[Path, bool]:
        """Make the data durable under ``name``; return (path, replaced an older file).

        With ``replace=False`` an existing file is never touched: FileExists is
        raised and the temp file stays for another try with a new name.
        """
        final, replaced = self.publish(name, replace=replace)
        try:
            self.store.sync_directory(self.directory)
        except OSError:
            take_back(self.store.ops, final)
            raise
        return final, replaced

    def publish(self, name: str, *, replace: bool) -> tuple[Path, bool]:
        """``commit`` without the directory fsync: the data is durable, the name not yet
        (the caller fsyncs the directory, once for several files, before acknowledging)."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        final = self.directory / name
        self.flush()
        replaced = False
        ops = self.store.ops
        if replace:
            with REPLACE_LOCK:  # the look and the rename as one: two copies racing both see it
                replaced = os.path.lexists(final)
                ops.replace(self.temp_path, final)
        else:
            try:
                ops.link(self.temp_path, final)
            except FileExistsError:
                raise FileExists(str(final)) from None
            try:
                ops.unlink(self.temp_path)
            except OSError:
                take_back(ops, final)
                raise
        return final, replaced

    def discard(self) -> None:
        """Remove the temp file; never raises."""
        if self.direct is not None:
            self.direct.release()
            self.direct = None
        ops = self.store.ops
        if self.fd >= 0:
            try:
                ops.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            ops.unlink(self.temp_path)
        except OSError:
            pass


#: Whether a rename replaced a file is looked at and done under one lock (per process: one
#: daemon per output directory), so that of several copies of one name renamed at once
#: (associations, the materialiser) all but the first say they replaced one.
REPLACE_LOCK = threading.Lock()


def take_back(ops: FileOps, final: Path) -> None:
    """A name not known to be durable is not acknowledged: remove it (best effort; the
    failed fsync is never retried as if a second one could succeed)."""
    with contextlib.suppress(OSError):
        ops.unlink(final)


@dataclass
class _Round:
    """One fsync of a directory, for every ticket up to ``covering``."""

    covering: int
    done: bool = False
    error: OSError | None = None


class _DirectorySync:
    """Group commit of one directory's fsync (see ``Store.sync_published``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out: one per caller, after its rename
        self._latest: _Round | None = None  # the round started last
        self._running = False

    def sync(self, fsync: Callable[[], None]) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while True:
                latest = self._latest
                if latest is not None and latest.covering >= ticket:  # it started after our rename
                    while not latest.done:
                        self._cond.wait()
                    if latest.error is not None:  # its failure is ours: never retried as a success
                        raise OSError(latest.error.errno, latest.error.strerror)
                    return
                if not self._running:
                    break
                self._cond.wait()
            this = self._latest = _Round(self._requested)
            self._running = True
        try:
            fsync()
        except OSError as exc:
            this.error = exc
            raise
        finally:
            with self._cond:
                this.done = True
                self._running = False
                self._cond.notify_all()


@dataclass
class _DirectoryTraits:
    """What one target directory's filesystem allows; learned once per directory."""

    ordered_journal: bool
    direct_io: bool = True


class Store:
    """Creates pending files below ``root``; ``durable`` turns fsync on.

    How a file's data is made durable before its rename depends on the
    filesystem.  In general: ``fdatasync``, then the directory fsync.  Where
    the journal commits in order (XFS, ext3/4 with a journal) the data blocks
    are only written and waited for (``sync_file_range``) and the directory
    fsync's single journal commit carries the file's allocation, size and new
    name together, after a cache flush that covers the data: the same
    guarantee at half the journal commits.

    Durable files are written with O_DIRECT (see ``direct_io``) where the
    filesystem accepts it; without fsync (``durable=False``, like dcmrecv)
    the page cache is the faster path and is used.
    """

    def __init__(
        self,
        root: Path,
        *,
        durable: bool = True,
        ops: FileOps = REAL,
        ordered_journal: bool | None = None,
    ) -> None:
        self.root = root
        self.durable = durable
        #: Every system call that touches the disk goes through here (see ``file_ops``).
        self.ops = ops
        #: None: probe each directory's filesystem; True/False: take it as given (tests).
        self._ordered_journal = ordered_journal
        #: Directories known to exist.  Per directory, because a subdirectory may
        #: be another mount (another filesystem).
        self._known_dirs: dict[Path, _DirectoryTraits] = {}
        self._lock = threading.Lock()
        self._buffers = BufferPool(STAGE_SIZE)
        self._groups: dict[Path, _DirectorySync] = {}

    def _traits(self, directory: Path) -> _DirectoryTraits:
        traits = self._known_dirs.get(directory)
        if traits is None:
            ordered = self._ordered_journal
            if ordered is None:
                ordered = HAS_SYNC_FILE_RANGE and journals_in_order(directory)
            traits = _DirectoryTraits(ordered)
            with self._lock:
                self._known_dirs[directory] = traits
        return traits

    def durability(self, directory: Path | None = None) -> str:
        """How objects in ``directory`` (default: the root) are made durable, for the log."""
        if not self.durable:
            return "off"
        return "journal-ordered" if self._traits(directory or self.root).ordered_journal else "fdatasync"

    def flush_data(self, fd: int, directory: Path) -> None:
        """Put a file's data on disk, ahead of the directory fsync that publishes it."""
        if self._traits(directory).ordered_journal and self.ops.sync_file_range(fd, 0, 0, WRITE_AND_WAIT):
            return
        self.ops.fdatasync(fd)

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
                self.ops.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass
            self.sync_directory(path.parent)
        self._traits(target)
        return target

    def forget(self, directory: Path) -> None:
        """Look at ``directory`` again next time (something failed in it: it may have
        vanished, or been a file where a directory should be, and be fixed since)."""
        with self._lock:
            self._known_dirs.pop(directory, None)

    def open(self, relative: PurePosixPath) -> PendingFile:
        """A new hidden temp file in the target directory."""
        directory = self.directory(relative)
        while True:
            traits = self._traits(directory)
            direct = self.durable and traits.direct_io
            temp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
            try:
                fd = self.ops.open(temp, flags, FILE_MODE)
            except FileExistsError:
                continue
            except FileNotFoundError:
                # The directory vanished under us (an admin cleaned up): make it again.
                with self._lock:
                    self._known_dirs.pop(directory, None)
                directory = self.directory(relative)
                continue
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                # This filesystem has no O_DIRECT; Linux refuses only after creating the file.
                traits.direct_io = False
                with contextlib.suppress(OSError):
                    self.ops.unlink(temp)
                continue
            appender = DirectAppender(fd, self._buffers, self.ops) if direct else None
            return PendingFile(self, directory, temp, fd, appender)

    def sync_directory(self, path: Path) -> None:
        """fsync a directory so that a rename or mkdir in it survives a crash."""
        if self.durable:
            self.ops.fsync_directory(path)

    def sync_published(self, path: Path) -> None:
        """``sync_directory`` for names published by this thread, shared between threads.

        Why: several associations renaming into one directory each need its fsync
        after their rename; one fsync that *starts* after a rename covers it, so a
        thread that finds an fsync of the directory in flight waits for it to end and
        for the next one, and one leader fsyncs for everyone who came meanwhile
        (group commit).  A failed fsync fails every thread it was to cover.
        """
        if not self.durable:
            return
        group = self._groups.get(path)
        if group is None:
            with self._lock:
                group = self._groups.setdefault(path, _DirectorySync())
        group.sync(lambda: self.ops.fsync_directory(path))


@dataclass(frozen=True)
class Committed:
    """Where a file ended up, and whether it replaced an older one of that name."""

    path: Path
    replaced: bool


#: Names tried for one file before giving up (a name scheme with a random or
#: time-based part collides only by chance).
MAX_NAME_ATTEMPTS = 100


class Writer:
    """Files written one after another into a ``Store``, each made durable in order.

    The one home of the durability order: ``stage`` flushes the data, creates
    the next file's spare temp file, and renames (or links without replacing)
    under a name from ``names`` (retried on a collision); ``sync`` fsyncs the
    directories of everything staged, once each.  A file is durable under its
    final name when ``sync`` returns, and not before: acknowledge then.
    ``commit`` is both for one file.  One writer per association: the spare
    pays only for the files that follow.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.committed = 0
        self._spare: PendingFile | None = None
        self._spare_dir = PurePosixPath(".")
        #: Why the last spare could not be made ("" if it could): the next file meets it.
        self.spare_error = ""
        #: Staged files whose directory has not been fsynced yet: (directory, final path).
        self._unsynced: list[tuple[Path, Path]] = []

    def open(self, relative: PurePosixPath) -> PendingFile:
        """A temp file in ``relative``: the spare made for it, or a new one."""
        spare, self._spare = self._spare, None
        if spare is not None:
            if relative == self._spare_dir:
                return spare
            spare.discard()
        return self.store.open(relative)

    def commit(
        self, file: PendingFile, relative: PurePosixPath, names: Callable[[], str], *, replace: bool
    ) -> Committed:
        """Make ``file`` durable under the first free name that ``names`` gives."""
        committed = self.stage(file, relative, names, replace=replace)
        self.sync()
        return committed

    def stage(
        self, file: PendingFile, relative: PurePosixPath, names: Callable[[], str], *, replace: bool
    ) -> Committed:
        """Flush ``file`` and give it its final name; durable once ``sync`` returns.

        With ``replace`` the first name is taken whatever is there.  On any
        error the caller still owns ``file`` (and discards it).
        """
        file.flush()
        self._make_spare(relative)
        for _attempt in range(MAX_NAME_ATTEMPTS):
            try:
                final, replaced = file.publish(names(), replace=replace)
            except FileExists:
                continue
            self.committed += 1
            self._unsynced.append((file.directory, final))
            return Committed(final, replaced)
        raise FileExistsError(f"no free file name after {MAX_NAME_ATTEMPTS} attempts")

    @property
    def unsynced(self) -> int:
        """Files staged and not yet durable under their names."""
        return len(self._unsynced)

    def sync(self) -> None:
        """fsync the directory of every staged file, once per directory.

        On a failure every staged name is taken back (none is known durable)
        and the error is raised: each of those requests fails.
        """
        staged, self._unsynced = self._unsynced, []
        try:
            for directory in dict.fromkeys(d for d, _ in staged):
                self.store.sync_published(directory)
        except OSError:
            for _, final in staged:
                take_back(self.store.ops, final)
            raise

    def _make_spare(self, relative: PurePosixPath) -> None:
        """Create the next file's temp file between this file's data flush and rename.

        Why: without an ordered journal the first fsync of a new file also
        writes its directory entry and the directory inode (ext4's new-entry
        rule).  A temp file created now has its entry written by this file's
        directory fsync, so the next file's fdatasync finds the directory clean
        and writes only data and inode.  Only from the second file on: most
        associations send one or two objects, and the spare would be wasted.
        """
        if self.committed < 1 or self._spare is not None:
            return
        try:
            self._spare = self.store.open(relative)
            self._spare_dir = relative
            self.spare_error = ""
        except OSError as exc:  # the next file meets the problem and reports it
            self.spare_error = str(exc)

    def close(self) -> None:
        """Remove the spare; never raises.  Staged names not synced stay (complete files
        that were never acknowledged: the sender sends them again)."""
        self._unsynced = []
        if self._spare is not None:
            self._spare.discard()
            self._spare = None


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
