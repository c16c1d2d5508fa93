"""Appending to a file past the page cache, for data that must reach the disk anyway.

Why: a durable file written the usual way is handled twice — copied into the
page cache, then written back and waited for before the fsync.  Measured on
this project's virtual machines, the copy into freshly allocated page-cache
pages cost more than the disk write itself (0.5 MB objects: ~0.7 ms per file
durable with O_DIRECT against ~2 ms through the page cache).  With O_DIRECT
the device reads our buffer while the next data arrives, and the final fsync
has only the last partial block and the metadata left to do.

O_DIRECT wants aligned memory, offsets and lengths, so data is staged in a
page-aligned buffer (reused from a pool: fresh pages are the expensive part)
and written in whole blocks; the unaligned tail goes through the page cache.
A filesystem that refuses a direct write (EINVAL) gets buffered writes from
then on; nothing is lost, it is only slower.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Sequence

from dcmrecvd.store.buffers import BufferPool
from dcmrecvd.store.file_ops import REAL, FileOps

#: Offset, length and memory alignment good for every block size up to a page.
ALIGN = 4096
#: Staging buffer per open file.
STAGE_SIZE = 1 << 20
#: Write to the disk once this much is staged: early enough to overlap with
#: receiving, large enough to keep the number of system calls low.
WRITE_AT = 256 * 1024


def _pwrite_all(ops: FileOps, fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = ops.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class DirectAppender:
    """Appends to ``fd`` (opened with O_DIRECT) through an aligned staging buffer.

    ``finish`` must be called before the file is synced: until then up to a
    buffer's worth of data exists only here.
    """

    def __init__(self, fd: int, pool: BufferPool, ops: FileOps = REAL) -> None:
        self.fd = fd
        self.ops = ops
        self.pool = pool
        self.buf: mmap.mmap | None = pool.take()
        self.view = memoryview(self.buf)
        self.fill = 0  # staged bytes
        self.offset = 0  # file offset of the first staged byte
        self.direct = True

    def write(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        view, capacity = self.view, len(self.view)
        for chunk in chunks:
            data = memoryview(chunk).cast("B")
            while data:
                k = min(len(data), capacity - self.fill)
                view[self.fill : self.fill + k] = data[:k]
                self.fill += k
                data = data[k:]
                if self.fill == capacity:
                    self._write_blocks()
        if self.fill >= WRITE_AT:
            self._write_blocks()

    def _write_blocks(self) -> None:
        """Write the whole blocks staged and keep the partial one."""
        n = self.fill - self.fill % ALIGN
        if n == 0:
            return
        self._pwrite(self.view[:n])
        rest = self.fill - n
        if rest:
            self.view[:rest] = self.view[n : self.fill]
        self.fill = rest

    def _pwrite(self, data: memoryview) -> None:
        try:
            _pwrite_all(self.ops, self.fd, data, self.offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            # The filesystem will not do direct I/O for this file: go buffered.
            self.direct = False
            self.ops.clear_direct(self.fd)
            _pwrite_all(self.ops, self.fd, data, self.offset)
        self.offset += len(data)

    def finish(self) -> None:
        """Write everything staged; the tail through the page cache."""
        self._write_blocks()
        if self.fill:
            if self.direct:
                self.direct = False
                self.ops.clear_direct(self.fd)
            self._pwrite(self.view[: self.fill])
            self.fill = 0
        self.release()

    def release(self) -> None:
        """Return the buffer to the pool (staged data is dropped); idempotent."""
        if self.buf is not None:
            self.view.release()
            self.pool.give(self.buf)
            self.buf = None
