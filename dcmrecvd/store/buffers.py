"""Large buffers from anonymous mappings, kept warm in a small pool.

Why not ``bytearray``: a 1 MiB bytearray per association comes from glibc's
malloc, and after the first ones are freed its dynamic mmap threshold rises
above that size, so later ones are carved from per-thread arenas that are
seldom given back.  A long run with many short associations then grew the
daemon by 14-22 MiB per 10,000 objects.  A mapping of our own is returned to
the kernel when closed, its pages are touched only as data arrives, and the
few kept for reuse are already faulted in (fresh pages are the expensive
part of a big buffer).
"""

from __future__ import annotations

import mmap
import threading


class BufferPool:
    """Page-aligned buffers of one size; at most ``keep`` idle ones are held for reuse."""

    def __init__(self, size: int, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)
                return
        try:
            buf.close()
        except BufferError:  # a view is still alive somewhere: unmapped when it goes
            pass
