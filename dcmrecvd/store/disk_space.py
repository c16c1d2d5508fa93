"""The free-space watermark of the output directory: refuse work before the disk is full.

Why: every DICOM receiver we know lets the disk fill until writes fail, and
then each sender learns it one failed C-STORE at a time.  Below
``output.min_free`` dcmrecvd rejects new associations (transient, local limit
exceeded), answers 0xA700 to an object that would cross the line, tells a
load balancer to drain (agent check, /readyz) and says so once in the log.
Free space is read with ``statvfs`` at most every ``interval`` seconds, never
per byte; between reads the bytes received since are subtracted.  Coming back
needs a margin above the line (hysteresis), so a disk hovering at the line
does not flap.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("dcmrecvd")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B|%)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: Back above the line once free space exceeds it by this fraction (at least 1 MiB).
HYSTERESIS = 0.05
MIN_MARGIN = 2**20


@dataclass(frozen=True)
class Watermark:
    """``min_free`` parsed: an absolute number of bytes, or a percentage of the filesystem."""

    bytes: int = 0
    percent: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.bytes > 0 or self.percent > 0

    def threshold(self, total: int) -> int:
        """The line in bytes for a filesystem of ``total`` bytes."""
        return self.bytes if self.bytes else int(total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.bytes} bytes"


def parse_min_free(text: str) -> Watermark:
    """``"2GiB"``, ``"500MB"``, ``"5%"``, ``"0"`` or empty (off); ValueError otherwise."""
    if not text.strip():
        return Watermark()
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size (e.g. '2GiB', '500MB') or a percentage (e.g. '5%')")
    number, unit = float(match[1]), (match[2] or "B").lower()
    if unit == "%":
        if not 0 <= number < 100:
            raise ValueError(f"'{text}': a percentage must be below 100")
        return Watermark(percent=number)
    return Watermark(bytes=int(number * _UNITS[unit]))


StatVfs = Callable[[str], os.statvfs_result]
_watches: dict[str, DiskWatch] = {}
_watches_lock = threading.Lock()


def watch_directory(directory: str, watermark: Watermark) -> DiskWatch:
    """The one watch of ``directory`` (kept across reloads, so 'disk.low' is said once)."""
    with _watches_lock:
        watch = _watches.get(directory)
        if watch is None:
            watch = _watches[directory] = DiskWatch(directory, watermark)
        else:
            watch.set_watermark(watermark)
        return watch


class DiskWatch:
    """Whether the output directory is above its watermark; cheap to ask often."""

    def __init__(
        self,
        directory: str,
        watermark: Watermark,
        *,
        interval: float = 1.0,
        statvfs: StatVfs = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.watermark = watermark
        self.interval = interval
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at = -1e18
        self._free = 0
        self._total = 0
        self._since = 0  # bytes received since the last statvfs
        self.low = False
        self.usable = True

    def set_watermark(self, watermark: Watermark) -> None:
        """A reload changed output.min_free: re-read at the next question."""
        with self._lock:
            if watermark != self.watermark:
                self.watermark = watermark
                self._read_at = -1e18
                if not watermark.enabled and self.low:
                    self.low = False
                    log.info("disk.ok", directory=self.directory, min_free="off")

    def free_bytes(self) -> int:
        """Free space for unprivileged writers now (estimated between reads)."""
        with self._lock:
            self._refresh()
            return max(self._free - self._since, 0)

    def has_room(self, more: int = 0, *, fresh: bool = False) -> bool:
        """Is the directory above the line, with ``more`` bytes still to be written?
        ``fresh``: read the free space now, not the sample of the last second (for a
        promise that outlives the request, like a Storage Commitment transaction)."""
        if not self.watermark.enabled:
            return True
        with self._lock:
            if fresh:
                self._read_at = -1e18
            self._refresh()
            left = self._free - self._since - more
            line = self.watermark.threshold(self._total)
            return left >= line and not self.low

    def received(self, n: int) -> None:
        """``n`` more bytes are on their way to the disk."""
        if self.watermark.enabled:
            with self._lock:
                self._since += n

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._read_at < self.interval:
            return
        self._read_at = now
        try:
            st = self._statvfs(self.directory)
        except OSError as exc:
            if self.usable:
                log.error("disk.unusable", directory=self.directory, reason=str(exc))
            self.usable = False
            return
        self.usable = True
        self._free = st.f_bavail * st.f_frsize
        self._total = st.f_blocks * st.f_frsize
        self._since = 0
        if not self.watermark.enabled:
            return
        line = self.watermark.threshold(self._total)
        margin = max(int(line * HYSTERESIS), MIN_MARGIN)
        if not self.low and self._free < line:
            self.low = True
            log.warning(
                "disk.low", directory=self.directory, free_bytes=self._free, min_free=str(self.watermark)
            )
        elif self.low and self._free >= line + margin:
            self.low = False
            log.info("disk.ok", directory=self.directory, free_bytes=self._free, min_free=str(self.watermark))
