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
from typing import Any

from .file_ops import FileOps

BLOCK = 4096
SEGMENT_MAGIC = b"DRJS"
BATCH_MAGIC = b"DRJB"
CHECKPOINT_MAGIC = b"DRJC"
SEGMENT_HEAD = struct.Struct("<4sQ")  # magic, generation
BATCH_HEAD = struct.Struct("<4sIQQQ")  # magic, crc32, generation, length, first sequence number
RECORD_HEAD = struct.Struct("<III")  # header length, data length, crc32 of the data
CHECKPOINT = struct.Struct("<4sIQQ")  # magic, crc32, counter, done-through sequence number
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
    view = memoryview(body)
    pos = 0
    seq = first
    while pos < len(view):
        header_len, data_len, data_crc = RECORD_HEAD.unpack_from(view, pos)
        pos += RECORD_HEAD.size
        header = json.loads(bytes(view[pos : pos + header_len]))
        pos += header_len
        data = bytes(view[pos : pos + data_len])
        pos += data_len
        yield Record(header, data, seq, data_crc)
        seq += 1


def scan_segment(path: Path, segment_size: int) -> tuple[int, list[Record]]:
    """A segment's generation and valid records: batches until the first that does not
    check out (a torn batch, or an older generation's left in a recycled segment)."""
    with open(path, "rb") as f:
        magic, generation = SEGMENT_HEAD.unpack_from(f.read(BLOCK))
        if magic != SEGMENT_MAGIC:
            return 0, []
        records: list[Record] = []
        offset = BLOCK
        while offset + BATCH_HEAD.size <= segment_size:
            f.seek(offset)
            raw = f.read(BATCH_HEAD.size)
            magic, crc, gen, length, first = BATCH_HEAD.unpack(raw)
            end = offset + BATCH_HEAD.size + length
            if magic != BATCH_MAGIC or gen != generation or end > segment_size:
                break
            body = f.read(length)
            if len(body) != length or not checks_out(raw, body, crc):
                break  # torn: the crash cut this batch; nothing in it was acknowledged
            records.extend(decode_batch(body, first))
            offset = align(end)
        return generation, records


def read_checkpoint(path: Path) -> tuple[int, int]:
    """(counter, done-through) of the newer valid slot; (0, 0) if neither is."""
    best = (0, 0)
    content = path.read_bytes()
    for slot in (0, 1):
        raw = content[slot * BLOCK : slot * BLOCK + CHECKPOINT.size]
        if len(raw) < CHECKPOINT.size:
            continue
        magic, crc, counter, done = CHECKPOINT.unpack(raw)
        if magic == CHECKPOINT_MAGIC and crc == zlib.crc32(raw[8:]) and counter > best[0]:
            best = (counter, done)
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
