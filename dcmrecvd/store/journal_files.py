"""The ack journal on disk: its format, and making, locking and reading its files.

``journal`` writes and recycles; this module says what the bytes mean (see
``journal``'s docstring for the layout) and does the once-per-file work: a
zero-filled file made durably, the directory lock, a segment scanned back at
start.  Reads at start use buffered I/O: replay is not on the ack path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .file_ops import FileOps

BLOCK = 4096
SEGMENT_MAGIC = b"DRJS"
BATCH_MAGIC = b"DRJB"
CHECKPOINT_MAGIC = b"DRJC"
SEGMENT_HEAD = struct.Struct("<4sQ")  # magic, generation
BATCH_HEAD = struct.Struct("<4sIQQQ")  # magic, crc32, generation, length, first sequence number
RECORD_HEAD = struct.Struct("<III")  # header length, data length, crc32 of the data
CHECKPOINT = struct.Struct("<4sIQQ")  # magic, crc32, counter, done-through sequence number
#: Since 0.9: the same, then made-through (every record up to it has its file, or is quarantined).
CHECKPOINT_MAGIC_MADE = b"DRJM"
CHECKPOINT_MADE = struct.Struct("<4sIQQQ")
SUFFIX = ".seg"


class JournalUnusable(Exception):
    """The journal directory cannot host a journal (in memory, no O_DIRECT, in use...)."""


@dataclass
class Record:
    """One object's record: ``header`` for whoever materialises it, ``data`` its bytes (or b"")."""

    header: dict[str, Any]
    data: bytes | bytearray | memoryview = b""
    seq: int = 0
    #: CRC-32 of ``data``, when the caller kept it on the way (the data arrived piece by
    #: piece while the network was the bottleneck); else computed at commit.
    crc: int | None = field(default=None, repr=False)
    #: The encoded head (lengths, the data's checksum, the JSON header), made once by ``commit``.
    head: bytes = field(default=b"", repr=False)
    #: What the caller made ``header`` from, handed back with the record by ``on_written``
    #: so that a record just written is not parsed again (the journal never reads it).
    origin: Any = field(default=None, repr=False, compare=False)


def align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def encode_head(record: Record) -> int:
    """Encode the record's head onto it; its size on disk."""
    header = json.dumps(record.header, separators=(",", ":")).encode()
    if record.crc is None:
        record.crc = zlib.crc32(record.data)
    record.head = RECORD_HEAD.pack(len(header), len(record.data), record.crc) + header
    return len(record.head) + len(record.data)


def batch_crc(prefix: bytes | memoryview, heads: Iterable[bytes | memoryview]) -> int:
    """The checksum of a batch: its generation, length and first number, then every record's
    head (which holds the CRC of the record's data)."""
    crc = zlib.crc32(prefix)
    for head in heads:
        crc = zlib.crc32(head, crc)
    return crc


def checks_out(raw_head: bytes, body: bytes, crc: int) -> bool:
    """Does a batch read back match its checksums (the batch's, and each record's data)?
    A torn batch does not."""
    view = memoryview(body)
    heads = []
    pos = 0
    while pos < len(view):
        if pos + RECORD_HEAD.size > len(view):
            return False
        header_len, data_len, data_crc = RECORD_HEAD.unpack_from(view, pos)
        data_at = pos + RECORD_HEAD.size + header_len
        if data_at + data_len > len(view) or zlib.crc32(view[data_at : data_at + data_len]) != data_crc:
            return False
        heads.append(view[pos:data_at])
        pos = data_at + data_len
    return batch_crc(raw_head[8:], heads) == crc


def decode_batch(body: bytes, first: int) -> Iterator[Record]:
    """The records of a batch that checked out.  A header that does not decode to an
    object (a writer's bug, never a torn write: the checksum covers it) still yields its
    record, marked ``invalid``: the materialiser quarantines it with its bytes."""
    view = memoryview(body)
    pos = 0
    seq = first
    while pos < len(view):
        header_len, data_len, data_crc = RECORD_HEAD.unpack_from(view, pos)
        pos += RECORD_HEAD.size
        raw = bytes(view[pos : pos + header_len])
        try:
            header = json.loads(raw)
        except ValueError as exc:
            header = {"invalid": f"header is not JSON: {exc}", "raw": raw.decode("latin-1")}
        if not isinstance(header, dict):
            header = {"invalid": "header is not a JSON object", "raw": raw.decode("latin-1")}
        pos += header_len
        data = bytes(view[pos : pos + data_len])
        pos += data_len
        yield Record(header, data, seq, data_crc)
        seq += 1


@dataclass
class Scan:
    """What one segment holds: its generation, its valid records, and what was wrong
    with it (a batch that did not check out with a valid batch of its generation after
    it is corruption, not the torn end a crash leaves: reported, and read past)."""

    generation: int = 0
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def scan_segment(path: Path, segment_size: int) -> Scan:
    """A segment's generation and valid records: batches until the first that does not
    check out (a torn batch, or an older generation's left in a recycled segment); then
    any later batch of the same generation, which only corruption can leave behind."""
    scan = Scan()
    with open(path, "rb") as f:
        head = f.read(BLOCK)
        if len(head) < SEGMENT_HEAD.size:
            scan.problems.append("shorter than its header")
            return scan
        magic, generation = SEGMENT_HEAD.unpack_from(head)
        if magic != SEGMENT_MAGIC:
            if any(head):
                scan.problems.append("its header is not a segment header")
            return scan
        scan.generation = generation
        offset = BLOCK
        bad_at = 0
        while offset + BATCH_HEAD.size <= segment_size:
            batch = _read_batch(f, offset, generation, segment_size)
            if batch is None:
                if not bad_at:
                    bad_at = offset
                offset += BLOCK  # look further: a later batch of this generation means corruption
                continue
            records, end = batch
            if bad_at:
                scan.problems.append(f"bytes {bad_at}-{offset} do not check out; read past them")
                bad_at = 0
            scan.records.extend(records)
            offset = align(end)
        return scan


def _read_batch(
    f: BinaryIO, offset: int, generation: int, segment_size: int
) -> tuple[list[Record], int] | None:
    """The records of the batch at ``offset`` and where it ends, or None (no valid batch)."""
    f.seek(offset)
    raw = f.read(BATCH_HEAD.size)
    if len(raw) < BATCH_HEAD.size:
        return None
    magic, crc, gen, length, first = BATCH_HEAD.unpack(raw)
    end = offset + BATCH_HEAD.size + length
    if magic != BATCH_MAGIC or gen != generation or end > segment_size:
        return None
    body = f.read(length)
    if len(body) != length or not checks_out(raw, body, crc):
        return None  # torn: the crash cut this batch; nothing in it was acknowledged
    return list(decode_batch(body, first)), end


def read_checkpoint(path: Path) -> tuple[int, int, int]:
    """(counter, done-through, made-through) of the newer valid slot; zeros if neither is.
    An older slot without made-through reads as made-through = done-through."""
    best = (0, 0, 0)
    content = path.read_bytes()
    for slot in (0, 1):
        raw = content[slot * BLOCK : slot * BLOCK + CHECKPOINT_MADE.size]
        if len(raw) < CHECKPOINT_MADE.size:
            continue
        if raw[:4] == CHECKPOINT_MAGIC_MADE:
            _, crc, counter, done, made = CHECKPOINT_MADE.unpack(raw)
        else:
            _, crc, counter, done = CHECKPOINT.unpack(raw[: CHECKPOINT.size])
            made = done
            raw = raw[: CHECKPOINT.size]
        if (
            raw[:4] in (CHECKPOINT_MAGIC, CHECKPOINT_MAGIC_MADE)
            and crc == zlib.crc32(raw[8:])
            and counter > best[0]
        ):
            best = (counter, done, max(made, done))
    return best


def lock_directory(directory: Path) -> int:
    """One process per journal: a second dcmrecvd on the same state directory must not
    write into (or recycle) segments that the first one uses.  Returns the lock's fd."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalUnusable(f"{directory} is in use by another dcmrecvd") from None
    return fd


def open_direct(ops: FileOps, path: Path) -> int:
    """A journal file for writing: every write durable on return, past the page cache."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_DSYNC | os.O_DIRECT
    try:
        return ops.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise JournalUnusable(f"{path.parent}: the filesystem does not support O_DIRECT") from None


def zero_file(ops: FileOps, path: Path, size: int) -> int:
    """A new file of ``size`` zero bytes, written (not merely allocated, so that a later
    write converts no extent) and durable under its name; opened with ``open_direct``."""
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
    ops.fsync_directory(path.parent)
    return open_direct(ops, path)


def make_directory(ops: FileOps, directory: Path) -> None:
    """The journal directory and any missing parent, each made durable in its parent."""
    missing = []
    probe = directory
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            ops.mkdir(path, 0o750)
        ops.fsync_directory(path.parent)


#: The share of its filesystem's free space (with its own segments counted as free) the
#: journal may take; and the smallest segment it shrinks to before it gives up.
JOURNAL_SHARE = 4
MIN_SEGMENT = 256 << 10


@dataclass(frozen=True)
class Sizing:
    segment_size: int
    segments: int
    #: Why it differs from what was configured ("" when it does not).
    note: str = ""


def fit_to_disk(directory: Path, segment_size: int, segments: int) -> Sizing:
    """Segments sized against the free space of the filesystem that will hold them.

    Why: two 16 MiB segments are made ahead of need, and a small disk (a 40 MB test
    volume, an SD card) would lose most of its room to a journal nobody asked to be that
    big.  Existing segments keep their size (their records are read back at it)."""
    existing = sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []
    probe = next(p for p in (directory, *directory.parents) if p.is_dir())
    stats = os.statvfs(probe)
    held = sum(p.stat().st_size for p in existing)
    budget = (stats.f_bavail * stats.f_frsize + held) // JOURNAL_SHARE
    if existing:
        size = existing[0].stat().st_size
        count = max(len(existing), min(segments, budget // size))
        note = (
            ""
            if count >= segments
            else f"{count} segments of its {size >> 10} KiB fit 1/{JOURNAL_SHARE} of the free space"
        )
        return Sizing(size, max(count, 2), note)
    if budget >= 2 * segment_size:
        count = min(segments, budget // segment_size)
        note = "" if count == segments else f"{count} segments fit 1/{JOURNAL_SHARE} of the free space"
        return Sizing(segment_size, count, note)
    size = max(MIN_SEGMENT, budget // 2 // (64 << 10) * (64 << 10))
    return Sizing(
        size,
        2,
        f"segments of {size >> 10} KiB (not {segment_size >> 20} MiB): "
        f"1/{JOURNAL_SHARE} of the free space is {budget >> 10} KiB",
    )
