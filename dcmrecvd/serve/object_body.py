"""Where an object's bytes wait until it is answered: in memory (its journal record) or a file.

Why two bodies behind one protocol: with the ack journal, an object up to
``journal.inline_max`` travels inside its record (one device flush acknowledges
many of them), a larger one streams into a temp file in its directory; without
the journal every object is a file.  ``receiving.Stored`` walks, names and
places an object the same way whichever holds its bytes, so the choice is made
once, when the body is made, and the body says what it came to (``Landed``).

A body is fed lists of views (valid only during the call), keeps a running
CRC-32 where it is wanted (every record's data; a file's only while Storage
Commitment verifies checksums), compares its dataset with a first copy
(``output.duplicates = "reject-if-different"``), lands under a name or is
discarded without a trace.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from dcmrecvd.serve.duplicates import Placement, same_dataset
from dcmrecvd.store.storage import PendingFile, Writer

if TYPE_CHECKING:
    from dcmrecvd.serve.ack_journal import AckJournal


@dataclass(frozen=True, slots=True)
class Landed:
    """Where a body went, and what its journal record carries of it."""

    path: Path
    size: int
    #: Its name held an older file it replaced (known at once only for a file).
    replaced: bool = False
    #: The bytes for its record (b"": a file, durable under its name already).
    data: bytes | bytearray = b""
    crc: int | None = None
    #: A file's digest for the index ("" when none was kept).
    digest: str = ""

    @property
    def large(self) -> bool:
        """Its record names a file rather than carrying its bytes."""
        return not self.data


class Body(Protocol):
    """One object's bytes, file meta first (``meta_len`` bytes of it)."""

    meta_len: int

    @property
    def size(self) -> int:
        """Bytes held so far."""

    def append(self, chunks: list[memoryview]) -> Body:
        """Take the pieces; the body to use from now on (a memory body may spill to a file)."""

    def same_dataset(self, first: Path) -> bool:
        """Does it hold the same dataset bytes as the stored file ``first``?"""

    def land(self, place: Placement) -> Landed:
        """Give it its name (``place``): durable at the window's sync or commit."""

    def discard(self) -> None:
        """Leave nothing behind; never raises."""


class FileBody:
    """A temp file in the object's directory, streamed as it arrives (``storage.Writer``)."""

    def __init__(
        self, writer: Writer, file: PendingFile, directory: PurePosixPath, meta_len: int, crc: int | None
    ) -> None:
        self.writer = writer
        self.file: PendingFile | None = file
        #: The directory its temp file is in, under the output directory.
        self.directory = directory
        self.meta_len = meta_len
        #: CRC-32 of what it holds, kept only when wanted (None: not kept).
        self.crc = crc

    @classmethod
    def open(
        cls, writer: Writer, directory: PurePosixPath, head: bytes | bytearray, meta_len: int, crc: int | None
    ) -> FileBody:
        """A new temp file in ``directory`` holding ``head`` (the file meta and what came);
        ``crc``: of ``head`` when a digest is kept (None: none is)."""
        file = writer.open(directory)
        try:
            file.write(head)
        except BaseException:
            file.discard()
            raise
        return cls(writer, file, directory, meta_len, crc)

    @property
    def size(self) -> int:
        return self.file.size if self.file is not None else 0

    def append(self, chunks: list[memoryview]) -> Body:
        assert self.file is not None
        self.file.writev(chunks)
        if self.crc is not None:  # the index's digest of a large object (verify = checksum)
            crc = self.crc
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
            self.crc = crc
        return self

    def same_dataset(self, first: Path) -> bool:
        assert self.file is not None
        self.file.flush()  # its bytes readable from the temp file
        return same_dataset(first, None, self.file.temp_path, self.meta_len)

    def land(self, place: Placement) -> Landed:
        file = self.file
        assert file is not None
        size = file.size
        if place.directory != self.directory:  # over a first copy in another directory
            file.directory = self.writer.store.directory(place.directory)
        committed = self.writer.stage(file, place.directory, place.names, replace=place.replace)
        self.file = None
        digest = f"crc32:{self.crc:08x}" if self.crc is not None else ""
        return Landed(committed.path, size, committed.replaced, digest=digest)

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None


class MemoryBody:
    """The object in memory, for its journal record; a file (in ``directory``) once it
    outgrows the record (``journal.inline_max_kib``)."""

    def __init__(
        self,
        ack: AckJournal,
        writer: Writer,
        directory: PurePosixPath,
        head: bytes | bytearray,
        meta_len: int,
    ) -> None:
        self.ack = ack
        self.writer = writer
        self.directory = directory
        #: ``head`` itself when it is a bytearray (taken over, not copied).
        self.data: bytearray | None = head if isinstance(head, bytearray) else bytearray(head)
        self.meta_len = meta_len
        #: CRC-32 of ``data`` so far, for its record: kept as the pieces arrive, while the
        #: sender is still sending, rather than at the commit.
        self.crc = zlib.crc32(self.data)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0

    def append(self, chunks: list[memoryview]) -> Body:
        data = self.data
        assert data is not None
        crc = self.crc
        for chunk in chunks:
            data += chunk
            crc = zlib.crc32(chunk, crc)
        self.crc = crc
        if len(data) <= self.ack.inline_max:
            return self
        self.data = None  # the record would be too big: streamed as on the per-file path
        digest = crc if self.ack.digest_files else None  # a file's CRC only when the index keeps it
        return FileBody.open(self.writer, self.directory, data, self.meta_len, digest)

    def same_dataset(self, first: Path) -> bool:
        return same_dataset(first, self.data, None, self.meta_len)

    def land(self, place: Placement) -> Landed:
        """Named now (never yet on disk: the materialiser makes the file after the ack)."""
        directory = self.writer.store.root.joinpath(*place.directory.parts)
        name = self.ack.choose_name(directory, place.names, replace=place.replace)
        data, self.data = self.data, None
        assert data is not None
        return Landed(directory / name, len(data), data=data, crc=self.crc)

    def discard(self) -> None:
        self.data = None
