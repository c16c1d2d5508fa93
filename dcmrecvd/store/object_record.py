"""A stored object's journal record, typed: the one place that knows its header's keys.

Why a class of its own: the header is persisted.  The journal keeps it as JSON
and knows nothing of what it says; the serving side writes it, the
materialiser, recovery and the quarantine read it, and a segment written by an
older release must still replay after an upgrade.  So the keys are read and
written here only (``to_header``/``from_header``), a header is parsed once
(when the materialiser takes a record in, or at replay), and a header that
cannot be read is not an exception but a record whose ``invalid`` says why:
the maker refuses it and it goes to the quarantine with its bytes.

The header's keys (unchanged since the journal began; an unknown key, such as
the ``meta_len`` of early releases, is ignored):

- ``root``, ``dir``, ``name``: where its file goes (an absolute root, a
  directory below it, a plain name);
- ``replace``: a default name replaces an older file under it; otherwise a
  taken name gets ``<name>.<seq>`` (never clobbered);
- ``file``: a large object already durable under its name (the record carries
  no bytes; only its row and events are left), with its ``digest``;
- ``size``; ``index``: the instance row's identifiers (``called_aet``,
  ``sop_instance_uid``, ``sop_class_uid``, ``stored``);
- ``event`` and ``duplicate``: the ``object.stored`` and ``object.duplicate``
  bodies as the serving side made them (``events.body``): carried, not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .journal_files import Record
from .materialise_outcome import InvalidRecord

__all__ = ["Identity", "ObjectRecord", "Settled"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The instance row's identifiers, and when the object was stored."""

    called_aet: str
    sop_instance_uid: str
    sop_class_uid: str
    stored: str = ""


@dataclass(slots=True, eq=False)
class ObjectRecord:
    """One acknowledged object: what its header says, its bytes, and how far it got."""

    root: str
    directory: str
    name: str
    replace: bool = False
    size: int = 0
    #: A large object already durable under its name (key ``file``).
    large: bool = False
    digest: str = ""
    identity: Identity | None = None
    #: The ``object.stored`` / ``object.duplicate`` bodies (opaque here: ``events.body``).
    event: dict[str, Any] | None = None
    duplicate: dict[str, Any] | None = None
    # ---- not in the header
    data: bytes | bytearray | memoryview = field(default=b"", repr=False)
    seq: int = 0
    #: CRC-32 of ``data`` when kept on the way (see ``journal_files.Record``).
    crc: int | None = field(default=None, repr=False)
    #: Why the header as read names nothing we may make ("" when it does).
    invalid: str = ""
    #: The header as read (the quarantine keeps it as it was, whatever it holds).
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    #: How far the materialiser got with it (in memory only): "", "made" (its file durable
    #: under its name), "refused" (cannot be made: to quarantine), "quarantined",
    #: "finished" (its row and events handed on too).
    state: str = ""
    #: Where its file went once made (``<name>.<seq>`` when its own name was taken).
    path: str = ""
    #: Its name held a file it replaced (found when it was made).
    replaced: bool = False

    # ------------------------------------------------------------------ the header

    def to_header(self) -> dict[str, Any]:
        """The header as the journal keeps it (see the module docstring)."""
        header: dict[str, Any] = {
            "root": self.root,
            "dir": self.directory,
            "name": self.name,
            "replace": self.replace,
            "size": self.size,
        }
        if self.large:
            header["file"] = True
            header["digest"] = self.digest
        if self.identity is not None:
            i = self.identity
            header["index"] = {
                "called_aet": i.called_aet,
                "sop_instance_uid": i.sop_instance_uid,
                "sop_class_uid": i.sop_class_uid,
                "stored": i.stored,
            }
        if self.event is not None:
            header["event"] = self.event
        if self.duplicate is not None:
            header["duplicate"] = self.duplicate
        return header

    @classmethod
    def from_header(
        cls,
        header: dict[str, Any],
        data: bytes | bytearray | memoryview = b"",
        seq: int = 0,
        crc: int | None = None,
    ) -> ObjectRecord:
        """The record a header describes; never raises (an unreadable one is ``invalid``)."""
        try:
            return cls._parse(header, data, seq, crc)
        except InvalidRecord as exc:
            return cls("", "", "", data=data, seq=seq, crc=crc, invalid=str(exc), raw=header)

    @classmethod
    def _parse(
        cls, header: dict[str, Any], data: bytes | bytearray | memoryview, seq: int, crc: int | None
    ) -> ObjectRecord:
        if "invalid" in header:  # the journal could not decode it (``journal_files``)
            raise InvalidRecord(str(header["invalid"]))
        root, directory, name = header.get("root"), header.get("dir"), header.get("name")
        if not isinstance(root, str) or not os.path.isabs(root):
            raise InvalidRecord(f"root is not an absolute path: {root!r}")
        if not isinstance(directory, str) or directory.startswith("/"):
            raise InvalidRecord(f"dir is not a relative path: {directory!r}")
        if ".." in directory.split("/"):
            raise InvalidRecord(f"dir leaves the output directory: {directory!r}")
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidRecord(f"not a file name: {name!r}")
        size = header.get("size", 0)
        event, duplicate = header.get("event"), header.get("duplicate")
        return cls(
            root,
            directory,
            name,
            replace=bool(header.get("replace")),
            size=size if isinstance(size, int) else 0,
            large=bool(header.get("file")),
            digest=str(header.get("digest") or ""),
            identity=_identity(header.get("index")),
            event=event if isinstance(event, dict) else None,
            duplicate=duplicate if isinstance(duplicate, dict) else None,
            data=data,
            seq=seq,
            crc=crc,
            raw=header,
        )

    @classmethod
    def of(cls, record: Record) -> ObjectRecord:
        """A journal record as this class: the one it was made from (just committed: no
        parse on the committing thread), else parsed (at replay)."""
        made = record.origin
        if isinstance(made, ObjectRecord):
            made.seq, made.crc = record.seq, record.crc
            return made
        return cls.from_header(record.header, record.data, record.seq, record.crc)

    def to_record(self) -> Record:
        """The journal record to commit (``seq`` is given back by the commit)."""
        return Record(self.to_header(), self.data, crc=self.crc, origin=self)

    def as_kept(self) -> dict[str, Any]:
        """The header to keep in the quarantine: as read when it could not be parsed."""
        return self.raw if self.invalid else self.to_header()

    # ------------------------------------------------------------------ what it names

    def check(self) -> None:
        """Raise InvalidRecord unless the header names a file we may make."""
        if self.invalid:
            raise InvalidRecord(self.invalid)

    @property
    def final_path(self) -> Path:
        """Where its file goes: ``root``/``dir``/``name`` (only for a valid record)."""
        return Path(self.root).joinpath(*PurePosixPath(self.directory).parts, self.name)

    @property
    def intended_path(self) -> str:
        """Its final path, or "" when its header names none."""
        return "" if self.invalid else str(self.final_path)

    @property
    def sop_instance_uid(self) -> str:
        return self.identity.sop_instance_uid if self.identity is not None else ""


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of an acknowledged object, for whoever builds its events (``events.body``):
    the store says what happened, never in DICOM's words."""

    #: The ``object.stored`` body the serving side made (``{}`` for a record without one).
    event: dict[str, Any]
    #: Where the object is now ("" when it was set aside).
    path: str = ""
    #: The serving side's ``object.duplicate`` body, for a second copy stored.
    duplicate: dict[str, Any] | None = None
    #: Its file replaced one of its name (found only when it was made: overwrite by path).
    replaced: bool = False
    #: The quarantine entry it went to, where it should have gone, and why ("": made).
    quarantine: str = ""
    intended_path: str = ""
    reason: str = ""


def _identity(index: object) -> Identity | None:
    if index is None:
        return None
    if not isinstance(index, dict):
        raise InvalidRecord("index is not a row's identifiers")
    keys = ("called_aet", "sop_instance_uid", "sop_class_uid")
    if not all(isinstance(index.get(k), str) for k in keys):
        raise InvalidRecord("index is not a row's identifiers")
    called, instance, sop_class = (index[k] for k in keys)
    return Identity(called, instance, sop_class, str(index.get("stored", "")))
