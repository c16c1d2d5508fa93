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
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .file_ops import REAL, FileOps
from .fs_probe import MEMORY_FILESYSTEMS, filesystem_type
from .journal_files import (
    BATCH_HEAD,
    BATCH_MAGIC,
    BLOCK,
    CHECKPOINT_MADE,
    CHECKPOINT_MAGIC_MADE,
    SEGMENT_HEAD,
    SEGMENT_MAGIC,
    SUFFIX,
    JournalUnusable,
    Record,
    align,
    batch_crc,
    encode_head,
    lock_directory,
    make_directory,
    open_direct,
    read_checkpoint,
    scan_segment,
    zero_file,
)

__all__ = ["BLOCK", "FULL_WAIT_SECONDS", "Journal", "JournalFull", "JournalUnusable", "Record"]

#: How long ``commit`` waits for room in a full journal before the object fails.
FULL_WAIT_SECONDS = 10.0


class JournalFull(OSError):
    """Every segment holds records not yet materialised: the object is refused (0xA700)."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "ack journal full (materialisation is behind)")


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
        #: Every record at or below this has had its file made (or was quarantined): replay
        #: makes none of them again, so a file a consumer took away stays away.
        self.made_through = 0
        #: What was wrong with the segments read at ``open`` (corruption read past).
        self.problems: list[str] = []
        self._checkpoint_fd = -1
        self._lock_fd = -1
        self._checkpoint_counter = 0
        #: Page-aligned (O_DIRECT) buffers: batches and segment heads (the leader's), the
        #: checkpoint's (its writer's, under ``_checkpoint_lock``).
        self._buffer = mmap.mmap(-1, segment_size)
        self._head_block = mmap.mmap(-1, BLOCK)
        self._checkpoint_block = mmap.mmap(-1, BLOCK)
        self._checkpoint_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self.closed = False
        #: Told of every batch after its write, in sequence order: (records, written durably).
        self.on_written: Callable[[list[Record], bool], None] | None = None

    # ------------------------------------------------------------------ open and replay

    def open(self) -> list[Record]:
        """Open (or create) the journal; return the records past the checkpoint, in order.

        Raises JournalUnusable when the directory cannot host one (say why).
        """
        try:
            existing = next(p for p in (self.directory, *self.directory.parents) if p.is_dir())
            memory = MEMORY_FILESYSTEMS.get(filesystem_type(existing))
            if memory:  # said before anything is made there
                raise JournalUnusable(f"{self.directory} is on {memory}: nothing there survives a power cut")
            make_directory(self.ops, self.directory)
            self._lock_fd = lock_directory(self.directory)
            self._open_checkpoint()
            records: list[Record] = []
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                scan = scan_segment(path, self.segment_size)
                generation, found = scan.generation, scan.records
                self.problems.extend(f"{path.name}: {problem}" for problem in scan.problems)
                segment = _Segment(path, open_direct(self.ops, path), generation)
                if found:
                    segment.last_seq = found[-1].seq
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
        self._next_seq = max(self._next_seq, self.done_through + 1, self.made_through + 1)
        return records

    def _open_checkpoint(self) -> None:
        path = self.directory / "checkpoint"
        if not path.exists():
            self._checkpoint_fd = zero_file(self.ops, path, 2 * BLOCK)
            return
        self._checkpoint_fd = open_direct(self.ops, path)
        self._checkpoint_counter, self.done_through, self.made_through = read_checkpoint(path)

    def prepare_spare(self) -> None:
        """Make a new segment ahead of need (off the ack path: the materialiser calls this),
        unless a spare exists or the journal has all its segments."""
        with self._cond:
            if self.closed or len(self._segments) >= self.max_segments:
                return
            if any(s is not self._active and s.last_seq <= self.done_through for s in self._segments):
                return
        self._add_segment()

    def _add_segment(self) -> _Segment:
        """A new zero-filled segment, counted in (one creator at a time: names are unique)."""
        with self._create_lock:
            segment = self._create_segment()
            with self._cond:
                self._segments.append(segment)
                self._cond.notify_all()
        return segment

    def _create_segment(self) -> _Segment:
        existing = {s.path.name for s in self._segments}
        number = len(self._segments)
        while f"{number:04d}{SUFFIX}" in existing:
            number += 1
        path = self.directory / f"{number:04d}{SUFFIX}"
        return _Segment(path, zero_file(self.ops, path, self.segment_size))

    # ------------------------------------------------------------------ the ack path

    def commit(self, records: list[Record]) -> None:
        """Append ``records`` durably (sequence numbers set on them), with whatever other
        threads are committing at the same moment: one write and one flush for all
        (group commit).  Raises OSError (the objects fail) when the write fails or the
        journal stays full."""
        if not records:
            return
        room = self.segment_size - BLOCK - BATCH_HEAD.size
        parts: list[_Pending] = []
        for record in records:  # as many batches as it takes: a window may outgrow a segment
            size = encode_head(record)
            if size > room:
                raise OSError(errno.EFBIG, "object too large for one journal segment")
            if not parts or parts[-1].size + size > room:
                parts.append(_Pending([]))
            parts[-1].records.append(record)
            parts[-1].size += size
        with self._cond:
            self._queue.extend(parts)
            while not all(part.done for part in parts):
                if not self._writing:
                    self._lead()
                else:
                    self._cond.wait()
        error = next((part.error for part in parts if part.error is not None), None)
        if isinstance(error, JournalFull):
            raise JournalFull()
        if error is not None:  # a new exception per thread: the error is shared
            raise OSError(error.errno, error.strerror)

    def _lead(self) -> None:
        """Write everything queued that fits one batch (called, and returns, under the lock)."""
        batch: list[_Pending] = []
        size = BATCH_HEAD.size
        room = self.segment_size - BLOCK
        while self._queue and size + self._queue[0].size <= room:
            item = self._queue.pop(0)
            batch.append(item)
            size += item.size
        self._writing = True
        error: OSError | None = None
        records: list[Record] = []
        try:
            segment = self._room_for(align(size))
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
                    spare = self._add_segment()
                finally:
                    self._cond.acquire()
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
        SEGMENT_HEAD.pack_into(block, 0, SEGMENT_MAGIC, self._next_generation)
        self._pwrite_all(segment.fd, block, 0)
        segment.generation = self._next_generation
        self._next_generation += 1
        segment.offset = BLOCK
        segment.last_seq = 0
        self._active = segment

    def _write_batch(self, segment: _Segment, records: list[Record]) -> None:
        buf = memoryview(self._buffer)
        pos = BATCH_HEAD.size
        for record in records:
            head = record.head
            buf[pos : pos + len(head)] = head
            pos += len(head)
            data = memoryview(record.data).cast("B")
            buf[pos : pos + len(data)] = data
            pos += len(data)
        length = pos - BATCH_HEAD.size
        padded = align(pos)
        buf[pos:padded] = bytes(padded - pos)
        prefix = struct.pack("<QQQ", segment.generation, length, records[0].seq)
        crc = batch_crc(prefix, (record.head for record in records))
        BATCH_HEAD.pack_into(buf, 0, BATCH_MAGIC, crc, segment.generation, length, records[0].seq)
        self._pwrite_all(segment.fd, buf[:padded], segment.offset)
        segment.offset += padded
        segment.last_seq = records[-1].seq

    def _pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        while data:
            n = self.ops.journal_write(fd, data, offset)
            data, offset = data[n:], offset + n

    # ------------------------------------------------------------------ done and recycling

    def checkpoint(self, done_through: int, made_through: int = 0) -> None:
        """Say durably that every record up to ``done_through`` is done (the caller has made
        its files, index rows and events durable first), and up to ``made_through`` has its
        file (or was quarantined); segments holding only done records become spares."""
        with self._checkpoint_lock:
            made_through = max(made_through, done_through, self.made_through)
            done_through = max(done_through, self.done_through)
            if done_through == self.done_through and made_through == self.made_through:
                return
            counter = self._checkpoint_counter + 1
            payload = struct.pack("<QQQ", counter, done_through, made_through)
            block = memoryview(self._checkpoint_block)
            block[:] = bytes(BLOCK)
            CHECKPOINT_MADE.pack_into(
                block, 0, CHECKPOINT_MAGIC_MADE, zlib.crc32(payload), counter, done_through, made_through
            )
            self._pwrite_all(self._checkpoint_fd, block, (counter % 2) * BLOCK)
            self._checkpoint_counter = counter
            self.made_through = made_through
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
