"""The ack journal: an object is acknowledged once its record is durable here.

Why a journal: a durable new file costs a data flush, a rename and a directory
fsync (an inode and a directory to commit: 0.55 ms for 3 KB on our disks),
while a write into an already-zeroed file opened ``O_DSYNC | O_DIRECT`` is a
data-only flush (0.14 ms).  So the acknowledgement waits for the record, and
the file is made later, off the ack path (``materialiser``), as databases do
with their write-ahead logs.  Knows nothing of DICOM: a record is a JSON
header the caller fills and, for a small object, its bytes.

On disk: a directory of segments, each ``segment_size`` bytes, zero-filled
when made (so that a write into one converts no extent and commits no inode).
A segment starts with a 4 KiB header block naming its *generation*; batches
follow, each on a 4 KiB boundary (O_DIRECT): a 32-byte batch header (magic,
generation, length, CRC-32 of all three and the records) and its records (a
12-byte head, the JSON header, the data).  A batch counts only when magic,
generation and checksum agree, so a torn batch (the last one, cut by a crash,
never acknowledged) and the old content of a recycled segment (an older
generation) both end a segment's replay.

What is done (materialised, indexed, its events queued durably) is said by
the checkpoint: the highest sequence number below which every record is
done, in two alternating 4 KiB slots of ``checkpoint`` (a torn slot leaves
the other).  Replay skips records at or below it, so a file that a pipeline
has moved away is not made again; a segment whose records are all at or
below it is recycled.  Disk use is bounded: ``segments`` x ``segment_size``;
a full journal makes ``commit`` wait, then fail (the C-STORE answers
0xA700), and never drops a record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .file_ops import REAL, FileOps
from .fs_probe import MEMORY_FILESYSTEMS, filesystem_type

BLOCK = 4096
SEGMENT_MAGIC = b"DRJS"
BATCH_MAGIC = b"DRJB"
CHECKPOINT_MAGIC = b"DRJC"
_SEGMENT_HEAD = struct.Struct("<4sQ")  # magic, generation
_BATCH_HEAD = struct.Struct("<4sIQQQ")  # magic, crc32, generation, length, first sequence number
_RECORD_HEAD = struct.Struct("<II")  # header length, data length
_CHECKPOINT = struct.Struct("<4sIQQ")  # magic, crc32, counter, done-through sequence number
SUFFIX = ".seg"
#: How long ``commit`` waits for room in a full journal before the object fails.
FULL_WAIT_SECONDS = 10.0


class JournalFull(OSError):
    """Every segment holds records not yet materialised: the object is refused (0xA700)."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "ack journal full (materialisation is behind)")


class JournalUnusable(Exception):
    """The journal directory cannot host a journal (no O_DIRECT, not writable...)."""


@dataclass
class Record:
    """One object's record: ``header`` for whoever materialises it, ``data`` its bytes (or b"")."""

    header: dict[str, Any]
    data: bytes | bytearray | memoryview = b""
    seq: int = 0
    #: The encoded head (lengths and JSON header), made once by ``commit``.
    head: bytes = field(default=b"", repr=False)


@dataclass
class _Segment:
    path: Path
    fd: int
    generation: int = 0
    #: Where the next batch goes; 0: not in use (a spare).
    offset: int = 0
    #: The highest sequence number written into it (for recycling).
    last_seq: int = 0


@dataclass
class _Pending:
    records: list[Record]
    done: bool = False
    error: OSError | None = None
    size: int = field(default=0)


def _align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _encode_head(record: Record) -> int:
    """Encode the record's head onto it; its size on disk."""
    header = json.dumps(record.header, separators=(",", ":")).encode()
    record.head = _RECORD_HEAD.pack(len(header), len(record.data)) + header
    return len(record.head) + len(record.data)


class Journal:
    """Segments, group commit and replay; one per process (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_size: int = 16 << 20,
        segments: int = 32,
        ops: FileOps = REAL,
        full_wait: float = FULL_WAIT_SECONDS,
    ) -> None:
        if segment_size % BLOCK or segment_size < 16 * BLOCK:
            raise ValueError("segment size must be a multiple of 4 KiB and at least 64 KiB")
        self.directory = directory
        self.segment_size = segment_size
        self.max_segments = max(2, segments)
        self.ops = ops
        self.full_wait = full_wait
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._next_seq = 1
        self._next_generation = 1
        #: Every record at or below this is done (durably, once ``checkpoint`` wrote it).
        self.done_through = 0
        self._checkpoint_fd = -1
        self._lock_fd = -1
        self._checkpoint_counter = 0
        #: Page-aligned (O_DIRECT) buffers: batches and segment heads (the leader's), the
        #: checkpoint's (its writer's, under ``_checkpoint_lock``).
        self._buffer = mmap.mmap(-1, segment_size)
        self._head_block = mmap.mmap(-1, BLOCK)
        self._checkpoint_block = mmap.mmap(-1, BLOCK)
        self._checkpoint_lock = threading.Lock()
        self.closed = False
        #: Told of every batch after its write, in sequence order: (records, written durably).
        self.on_written: Callable[[list[Record], bool], None] | None = None

    # ------------------------------------------------------------------ open and replay

    def open(self) -> list[Record]:
        """Open (or create) the journal; return the records past the checkpoint, in order.

        Raises JournalUnusable when the directory cannot host one (say why).
        """
        try:
            self._make_directory()
            memory = MEMORY_FILESYSTEMS.get(filesystem_type(self.directory))
            if memory:
                raise JournalUnusable(f"{self.directory} is on {memory}: nothing there survives a power cut")
            self._lock_directory()
            self._open_checkpoint()
            records: list[Record] = []
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                segment, found = self._scan(path)
                self._segments.append(segment)
                records.extend(r for r in found if r.seq > self.done_through)
                self._next_generation = max(self._next_generation, segment.generation + 1)
            if not self._segments:
                self._segments.append(self._create_segment())
        except JournalUnusable:
            raise
        except OSError as exc:
            raise JournalUnusable(f"{self.directory}: {exc.strerror or exc}") from None
        records.sort(key=lambda r: r.seq)
        if records:
            self._next_seq = records[-1].seq + 1
        self._next_seq = max(self._next_seq, self.done_through + 1)
        return records

    def _lock_directory(self) -> None:
        """One process per journal: a second dcmrecvd on the same state directory must not
        write into (or recycle) segments that the first one is using."""
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalUnusable(f"{self.directory} is in use by another dcmrecvd") from None

    def _open_direct(self, path: Path, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_DSYNC | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            return self.ops.open(path, flags | os.O_DIRECT, 0o640)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            with contextlib.suppress(OSError):
                if create:
                    os.unlink(path)
            raise JournalUnusable(f"{self.directory}: the filesystem does not support O_DIRECT") from None

    def _zero_file(self, path: Path, size: int) -> int:
        """A new file of ``size`` zero bytes, written (not merely allocated) and synced."""
        ops = self.ops
        temp = path.with_name(f".{path.name}.new")
        with contextlib.suppress(FileNotFoundError):
            ops.unlink(temp)
        fd = ops.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            zeros = bytes(min(size, 1 << 20))
            left = size
            while left:
                left -= ops.write(fd, zeros[: min(left, len(zeros))])
            ops.fdatasync(fd)
        finally:
            ops.close(fd)
        ops.replace(temp, path)
        ops.fsync_directory(self.directory)
        return self._open_direct(path, create=False)

    def _make_directory(self) -> None:
        """The journal directory and any missing parent, each made durable in its parent."""
        missing = []
        probe = self.directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                self.ops.mkdir(path, 0o750)
            self.ops.fsync_directory(path.parent)

    def _open_checkpoint(self) -> None:
        path = self.directory / "checkpoint"
        if not path.exists():
            self._checkpoint_fd = self._zero_file(path, 2 * BLOCK)
            return
        self._checkpoint_fd = self._open_direct(path, create=False)
        best = (0, 0)
        content = path.read_bytes()  # buffered: O_DIRECT reads want aligned buffers
        for slot in (0, 1):
            raw = content[slot * BLOCK : slot * BLOCK + _CHECKPOINT.size]
            if len(raw) < _CHECKPOINT.size:
                continue
            magic, crc, counter, done = _CHECKPOINT.unpack(raw)
            if magic == CHECKPOINT_MAGIC and crc == zlib.crc32(raw[8:]) and counter > best[0]:
                best = (counter, done)
        self._checkpoint_counter, self.done_through = best

    def _create_segment(self) -> _Segment:
        existing = {s.path.name for s in self._segments}
        number = len(self._segments)
        while f"{number:04d}{SUFFIX}" in existing:
            number += 1
        path = self.directory / f"{number:04d}{SUFFIX}"
        return _Segment(path, self._zero_file(path, self.segment_size))

    def _scan(self, path: Path) -> tuple[_Segment, list[Record]]:
        """A segment's valid records (batches until the first that does not check out)."""
        fd = self._open_direct(path, create=False)
        segment = _Segment(path, fd)
        with open(path, "rb") as f:  # buffered reads: replay is not on the ack path
            head = f.read(BLOCK)
            magic, generation = _SEGMENT_HEAD.unpack_from(head)
            if magic != SEGMENT_MAGIC:
                return segment, []
            segment.generation = generation
            records: list[Record] = []
            offset = BLOCK
            while offset + _BATCH_HEAD.size <= self.segment_size:
                f.seek(offset)
                raw = f.read(_BATCH_HEAD.size)
                magic, crc, gen, length, first = _BATCH_HEAD.unpack(raw)
                end = offset + _BATCH_HEAD.size + length
                if magic != BATCH_MAGIC or gen != generation or end > self.segment_size:
                    break
                body = f.read(length)
                if len(body) != length or zlib.crc32(body, zlib.crc32(raw[8:])) != crc:
                    break  # torn: the crash cut this batch; nothing in it was acknowledged
                records.extend(_decode_batch(body, first))
                offset = _align(offset + _BATCH_HEAD.size + length)
            if records:
                segment.last_seq = records[-1].seq
            return segment, records

    # ------------------------------------------------------------------ the ack path

    def commit(self, records: list[Record]) -> None:
        """Append ``records`` durably (sequence numbers set on them), with whatever other
        threads are committing at the same moment: one write and one flush for all
        (group commit).  Raises OSError (the objects fail) when the write fails or the
        journal stays full."""
        if not records:
            return
        pending = _Pending(records, size=sum(_encode_head(r) for r in records))
        if _BATCH_HEAD.size + pending.size > self.segment_size - BLOCK:
            raise OSError(errno.EFBIG, "objects too large for one journal segment")
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if not self._writing:
                    self._lead()
                else:
                    self._cond.wait()
        if isinstance(pending.error, JournalFull):
            raise JournalFull()
        if pending.error is not None:  # a new exception per thread: the error is shared
            raise OSError(pending.error.errno, pending.error.strerror)

    def _lead(self) -> None:
        """Write everything queued that fits one batch (called, and returns, under the lock)."""
        batch: list[_Pending] = []
        size = _BATCH_HEAD.size
        room = self.segment_size - BLOCK
        while self._queue and size + self._queue[0].size <= room:
            item = self._queue.pop(0)
            batch.append(item)
            size += item.size
        self._writing = True
        error: OSError | None = None
        records: list[Record] = []
        try:
            segment = self._room_for(_align(size))
            records = [r for item in batch for r in item.records]
            for record in records:
                record.seq = self._next_seq
                self._next_seq += 1
            self._cond.release()
            try:
                self._write_batch(segment, records)
            finally:
                self._cond.acquire()
        except OSError as exc:
            error = exc
            if self._active is not None and not isinstance(exc, JournalFull):
                # Never write after a failed write in the same place (fsyncgate): move on.
                self._active.offset = self.segment_size
        finally:
            self._writing = False
            if records and self.on_written is not None:
                self.on_written(records, error is None)  # in sequence order: we hold the lock
            for item in batch:
                item.done, item.error = True, error
            self._cond.notify_all()

    def _room_for(self, size: int) -> _Segment:
        """The segment the next ``size`` bytes go into: the active one, a recycled one or a
        new one; waits (bounded) while every segment holds undone records."""
        active = self._active
        if active is not None and active.offset + size <= self.segment_size:
            return active
        deadline = time.monotonic() + self.full_wait
        while True:
            spare = next(
                (s for s in self._segments if s is not active and s.last_seq <= self.done_through), None
            )
            if spare is None and len(self._segments) < self.max_segments:
                self._cond.release()
                try:
                    spare = self._create_segment()
                finally:
                    self._cond.acquire()
                self._segments.append(spare)
            if spare is not None:
                self._start_segment(spare)
                return spare
            left = deadline - time.monotonic()
            if left <= 0:
                raise JournalFull()
            self._cond.wait(min(left, 0.1))

    def _start_segment(self, segment: _Segment) -> None:
        block = memoryview(self._head_block)
        block[:] = bytes(BLOCK)
        _SEGMENT_HEAD.pack_into(block, 0, SEGMENT_MAGIC, self._next_generation)
        self._pwrite_all(segment.fd, block, 0)
        segment.generation = self._next_generation
        self._next_generation += 1
        segment.offset = BLOCK
        segment.last_seq = 0
        self._active = segment

    def _write_batch(self, segment: _Segment, records: list[Record]) -> None:
        buf = memoryview(self._buffer)
        pos = _BATCH_HEAD.size
        for record in records:
            head = record.head
            buf[pos : pos + len(head)] = head
            pos += len(head)
            data = memoryview(record.data).cast("B")
            buf[pos : pos + len(data)] = data
            pos += len(data)
        length = pos - _BATCH_HEAD.size
        padded = _align(pos)
        buf[pos:padded] = bytes(padded - pos)
        prefix = struct.pack("<QQQ", segment.generation, length, records[0].seq)
        crc = zlib.crc32(buf[_BATCH_HEAD.size : pos], zlib.crc32(prefix))
        _BATCH_HEAD.pack_into(buf, 0, BATCH_MAGIC, crc, segment.generation, length, records[0].seq)
        self._pwrite_all(segment.fd, buf[:padded], segment.offset)
        segment.offset += padded
        segment.last_seq = records[-1].seq

    def _pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        while data:
            n = self.ops.journal_write(fd, data, offset)
            data, offset = data[n:], offset + n

    # ------------------------------------------------------------------ done and recycling

    def checkpoint(self, done_through: int) -> None:
        """Say durably that every record up to ``done_through`` is done (the caller has made
        its files, index rows and events durable first); segments holding only such records
        become spares."""
        with self._checkpoint_lock:
            if done_through <= self.done_through:
                return
            counter = self._checkpoint_counter + 1
            payload = struct.pack("<QQ", counter, done_through)
            block = memoryview(self._checkpoint_block)
            block[:] = bytes(BLOCK)
            _CHECKPOINT.pack_into(block, 0, CHECKPOINT_MAGIC, zlib.crc32(payload), counter, done_through)
            self._pwrite_all(self._checkpoint_fd, block, (counter % 2) * BLOCK)
            self._checkpoint_counter = counter
            with self._cond:
                self.done_through = done_through
                self._cond.notify_all()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record written."""
        return self._next_seq - 1

    def usage(self) -> dict[str, int]:
        """Segments in all and holding undone records (for logs and STATUS)."""
        with self._cond:
            busy = sum(1 for s in self._segments if s.last_seq > self.done_through)
            return {"segments": len(self._segments), "busy": busy, "segment_size": self.segment_size}

    def close(self) -> None:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self.closed = True
            for segment in self._segments:
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
            self._segments = []
            for fd in (self._checkpoint_fd, self._lock_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._checkpoint_fd = self._lock_fd = -1


def _decode_batch(body: bytes, first: int) -> Iterator[Record]:
    view = memoryview(body)
    pos = 0
    seq = first
    while pos < len(view):
        header_len, data_len = _RECORD_HEAD.unpack_from(view, pos)
        pos += _RECORD_HEAD.size
        header = json.loads(bytes(view[pos : pos + header_len]))
        pos += header_len
        data = bytes(view[pos : pos + data_len])
        pos += data_len
        yield Record(header, data, seq)
        seq += 1
