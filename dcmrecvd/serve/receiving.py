"""Where a request's dataset goes: one sink per request, chosen before its first byte.

The association (``association``) knows the protocol and nothing about files;
``storage`` knows files and nothing about DICOM.  This module is the DICOM-aware
part in between: which requests may store at all (``sink_for``), walking each
dataset to refuse a malformed one, reading the few tags a file needs (SOP
UIDs for the Part 10 meta, Series Date for ``+ssd``) from its first bytes, and
staging it through ``storage.Writer`` (the driver's ``Writer.sync`` makes it durable,
for several objects at once when a sender pipelines).  Every outcome is an ``Outcome``
whose status comes from ``status.status_for_error``, the one map.

A sink is fed views of the receive buffer (``upper_layer``'s contract): it may
queue them, and ``flush`` writes what it queued; the driver calls ``flush``
before it reuses the buffer.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from structlog.typing import FilteringBoundLogger

from dcmrecvd.serve import naming
from dcmrecvd.serve.duplicates import (
    CLAIMS,
    Claim,
    DuplicatePolicy,
    Placement,
    duplicate_body,
    first_copy,
    identity_key,
    placement,
    same_dataset,
)
from dcmrecvd.store.disk_space import DiskWatch
from dcmrecvd.store.journal import Record
from dcmrecvd.store.storage import PendingFile, Writer
from dcmrecvd.wire import dimse, part10, uids
from dcmrecvd.wire.dataset_walk import (
    CAPTURE_LIMIT,
    LAYOUT_CAPTURE_LIMIT,
    PATIENT_ID,
    SERIES_DATE,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    STUDY_INSTANCE_UID,
    DatasetWalker,
    Malformed,
    decoded_text,
    text_value,
)
from dcmrecvd.wire.layout import derived_values
from dcmrecvd.wire.status import Failure, Status, status_for_error

if TYPE_CHECKING:
    from dcmrecvd.serve.ack_journal import AckJournal

DISK_LOW = "output directory below output.min_free"
#: The Error Comment of a refused second copy (at most 64 characters: an LO).
DUPLICATE_COMMENT = "duplicate: a copy of this SOP Instance is stored already"
#: Bytes kept in memory while waiting for the dataset's SOP UIDs (and Series Date)
#: before the file is opened; they sit in the first few hundred bytes.
MAX_PREFIX = 1 << 20

Clock = Callable[[], dt.datetime]


@dataclass(slots=True)
class Outcome:
    """What one request came to: the status to answer, and the file if one was stored."""

    status: Status
    error: str = ""
    path: str = ""
    replaced: bool = False
    #: When its commit began (monotonic); the commit ends when the writer's ``sync`` does.
    commit_started: float = 0.0
    #: What the events after the ack need of a stored object: file size, study, series, patient.
    size: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    #: The ``object.stored`` body, for the outbox once the object is acknowledged.
    event: dict[str, Any] | None = None
    #: Its ack-journal record (committed before the answer; the journal then owns the event).
    record: Record | None = None
    #: Its hold on its identity (``duplicates``), released once its work is durable or failed.
    claim: Claim | None = None
    #: The ``object.duplicate`` body when it was a second copy of an instance.
    duplicate: dict[str, Any] | None = None


class Sink(Protocol):
    """Takes one request's dataset, piece by piece."""

    received: int

    def write(self, chunk: memoryview) -> None:
        """Take the next piece (a view valid until ``flush``); never raises."""

    def flush(self) -> None:
        """Write the pieces held so far; never raises (a failure becomes the outcome)."""

    def finish(self) -> Outcome:
        """The dataset is complete: store it (if it is stored at all) and say how it went."""

    def discard(self) -> None:
        """The dataset will never complete: leave nothing behind; never raises."""


class Drained:
    """A request whose answer is known before its data (a failure, or not a store):
    the dataset is counted and dropped."""

    def __init__(self, status: Status = Status.SUCCESS, error: str = "") -> None:
        self.outcome = Outcome(status, error)
        self.received = 0

    def write(self, chunk: memoryview) -> None:
        self.received += len(chunk)

    def flush(self) -> None:
        pass

    def finish(self) -> Outcome:
        return self.outcome

    def discard(self) -> None:
        pass


@dataclass(frozen=True)
class Destination:
    """How a stored object is placed (from the AE it was sent to)."""

    writer: Writer
    scheme: naming.NamingScheme
    disk: DiskWatch
    calling: str
    clock: Clock = dt.datetime.now
    #: The AE title the sender called (into the file meta and the events).
    called: str = ""
    #: The sender's address, for the events.
    peer: str = ""
    #: The ack journal, when objects are acknowledged through it (fsync on, journal usable).
    journal: AckJournal | None = None
    #: What a second copy of an instance does (output.duplicates and its keys).
    duplicates: DuplicatePolicy = DuplicatePolicy()
    #: The association (whose claims are its own) and how it makes its answered objects
    #: durable before waiting for another association's claim (see ``duplicates``).
    owner: object = None
    settle: Callable[[], None] = lambda: None


class Checked:
    """Walks the dataset and checks its UIDs, writing nothing (``-ignore``): a success
    still means a well-formed dataset with a valid SOP Instance UID."""

    WANTED = (SOP_CLASS_UID, SOP_INSTANCE_UID)

    def __init__(
        self,
        command: dimse.Command,
        transfer_syntax: str,
        log: FilteringBoundLogger,
        wanted: tuple[int, ...] = WANTED,
        capture_limit: int = CAPTURE_LIMIT,
    ) -> None:
        self.command = command
        self.transfer_syntax = transfer_syntax
        self.log = log
        self.walker = DatasetWalker(transfer_syntax, list(wanted), capture_limit)
        self.received = 0
        #: Set once the request has failed; the rest of the dataset is drained unread.
        self.failed: Outcome | None = None

    def write(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.failed is not None:
            return
        try:
            self._take(chunk)
        except Exception as exc:  # a declared Failure, an OSError, or a bug: that request fails
            self._fail(exc)

    def _take(self, chunk: memoryview) -> None:
        try:
            self.walker.feed(chunk)
        except Malformed as exc:
            raise Failure(Status.CANNOT_UNDERSTAND, f"malformed dataset: {exc}") from None

    def flush(self) -> None:
        pass

    def finish(self) -> Outcome:
        if self.failed is None:
            try:
                return self._complete()
            except Exception as exc:
                self._fail(exc)
        assert self.failed is not None
        return self.failed

    def _complete(self) -> Outcome:
        self._end_walk()
        self.dataset_uids()
        return Outcome(Status.SUCCESS)

    def _end_walk(self) -> None:
        try:
            self.walker.finish()
        except Malformed as exc:
            raise Failure(Status.CANNOT_UNDERSTAND, f"malformed dataset: {exc}") from None

    def discard(self) -> None:
        pass

    def _fail(self, exc: BaseException) -> None:
        self.failed = Outcome(status_for_error(exc), str(exc) or type(exc).__name__)
        if not isinstance(exc, Failure | OSError | ValueError):
            self.log.exception(
                "store.internal_error", sop_instance_uid=self.command.affected_sop_instance_uid
            )
        self.discard()

    def dataset_uids(self) -> tuple[str, str]:
        """The SOP Class and Instance UIDs for the file meta, from the dataset (PS3.10).

        Refuses the object when the dataset's own SOP Instance UID is missing or
        not a valid UID, or its SOP Class UID is not one; a dataset that names
        no SOP class keeps the command's.  When they differ from the command's,
        the file meta follows the dataset and the file name the command, as in
        dcmrecv.
        """
        captured = self.walker.captured
        command = self.command
        instance = text_value(captured.get(SOP_INSTANCE_UID))
        sop_class = text_value(captured.get(SOP_CLASS_UID))
        if instance is None or not uids.is_valid_uid(instance):
            what = "no SOP Instance UID" if instance is None else f"an invalid SOP Instance UID {instance!r}"
            raise Failure(Status.CANNOT_UNDERSTAND, f"dataset has {what}")
        if sop_class is not None and not uids.is_valid_uid(sop_class):
            raise Failure(Status.CANNOT_UNDERSTAND, f"dataset has an invalid SOP Class UID {sop_class!r}")
        sop_class = sop_class or command.affected_sop_class_uid
        if (sop_class, instance) != (command.affected_sop_class_uid, command.affected_sop_instance_uid):
            self.log.warning(
                "store.uid_mismatch",
                command_sop_class_uid=command.affected_sop_class_uid,
                command_sop_instance_uid=command.affected_sop_instance_uid,
                dataset_sop_class_uid=sop_class,
                dataset_sop_instance_uid=instance,
            )
        return sop_class, instance


class Stored(Checked):
    """An object to store.  It must probe its first bytes before it has a file: the
    dataset's SOP UIDs go into the file meta, and under ``+ssd`` its Series Date
    picks the directory.  Until then those bytes are held aside (bounded by
    ``MAX_PREFIX``); from then on views are queued and written by ``flush``.
    """

    #: Read on the way for the events after the ack (and the +ssd directory): no decoding.
    FOR_EVENTS = (SPECIFIC_CHARACTER_SET, SERIES_DATE, PATIENT_ID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)

    def __init__(
        self,
        command: dimse.Command,
        transfer_syntax: str,
        log: FilteringBoundLogger,
        destination: Destination,
    ) -> None:
        layout = destination.scheme.layout
        self.open_after = SERIES_DATE if destination.scheme.needs_series_date else SOP_INSTANCE_UID
        if layout is not None:  # the file's path needs these; held aside (MAX_PREFIX) until then
            self.open_after = layout.last_tag
        wanted = (*Checked.WANTED, *Stored.FOR_EVENTS, *(layout.tags if layout is not None else ()))
        limit = LAYOUT_CAPTURE_LIMIT if layout is not None else CAPTURE_LIMIT  # hashed whole
        super().__init__(command, transfer_syntax, log, tuple(dict.fromkeys(wanted)), limit)
        self.to = destination
        #: The file name output.layout gave (None: dcmrecv's naming).
        self.layout_name: str | None = None
        self.prefix = bytearray()
        self.pending: list[memoryview] = []
        self.file: PendingFile | None = None
        self.directory = PurePosixPath(".")
        #: Bytes of this object counted against the free-space watermark on their way.
        self.disk_counted = 0
        #: Journal path: the object (file meta and dataset) gathered in memory while it
        #: stays under ``inline_max``; None once it has its own file.
        self.inline: bytearray | None = None
        self.meta_len = 0
        #: CRC-32 of ``inline`` so far, for its journal record: kept as the pieces arrive,
        #: while the sender is still sending, rather than at the commit.
        self.crc = 0
        #: Its hold on its identity from completion until its outcome takes it over.
        self.claim: Claim | None = None

    def _take(self, chunk: memoryview) -> None:
        disk = self.to.disk
        if disk.watermark.enabled:
            disk.received(len(chunk))
            self.disk_counted += len(chunk)
            if not disk.has_room():  # this object would take the disk below output.min_free
                raise OSError(errno.ENOSPC, DISK_LOW)
        super()._take(chunk)
        if self.file is not None or self.inline is not None:
            self.pending.append(chunk)
            return
        walker = self.walker
        if not walker.past(self.open_after) and len(self.prefix) + len(chunk) <= MAX_PREFIX:
            self.prefix += chunk
            return
        if not walker.past(SOP_INSTANCE_UID):
            raise Failure(
                Status.CANNOT_UNDERSTAND,
                f"no SOP Instance UID in the first {MAX_PREFIX} bytes of the dataset",
            )
        self._open()
        self.pending.append(chunk)

    def _open(self) -> None:
        """Start the object: its file (in its +ssd directory), or its record in memory."""
        sop_class, instance = self.dataset_uids()
        layout = self.to.scheme.layout
        if layout is not None:
            path = layout.render(
                self.walker.captured,
                self.walker.captured.get(SPECIFIC_CHARACTER_SET),
                derived_values(self.to.calling, self.to.called, sop_class),
                self.to.clock(),
                self.to.scheme.layout_missing,
            )
            self.directory, self.layout_name = path.parent, path.name
        elif self.open_after == SERIES_DATE:
            series_date = text_value(self.walker.captured.get(SERIES_DATE))
            self.directory = naming.directory_for(self.to.scheme, series_date, self.to.clock().date())
        meta = part10.meta_header(sop_class, instance, self.transfer_syntax, self.to.calling, self.to.called)
        self.meta_len = len(meta)
        if self.to.journal is not None:
            self.inline = bytearray(meta)
            self.inline += self.prefix
            self.crc = zlib.crc32(self.inline)
            self.prefix = bytearray()
            self._maybe_spill()
            return
        self.file = self.to.writer.open(self.directory)
        self.file.write(meta)
        if self.prefix:
            self.file.write(self.prefix)
            self.prefix = bytearray()

    def _maybe_spill(self) -> None:
        """An object that outgrows its record gets its own file, streamed as on the per-file path."""
        inline, journal = self.inline, self.to.journal
        if inline is None or journal is None or len(inline) <= journal.inline_max:
            return
        self.inline = None
        self.file = self.to.writer.open(self.directory)
        self.file.write(inline)

    def flush(self) -> None:
        if not self.pending:
            return
        chunks, self.pending = self.pending, []
        if self.failed is not None:
            return
        try:
            if self.inline is not None:
                crc = self.crc
                for chunk in chunks:
                    self.inline += chunk
                    crc = zlib.crc32(chunk, crc)
                self.crc = crc
                self._maybe_spill()
            elif self.file is not None:
                self.file.writev(chunks)
                if self.to.journal is not None and self.to.journal.digest_files:
                    for chunk in chunks:  # the index's digest of a large object (verify = checksum)
                        self.crc = zlib.crc32(chunk, self.crc)
        except Exception as exc:
            self._fail(exc)

    def _complete(self) -> Outcome:
        self._end_walk()
        if self.file is None and self.inline is None:
            self._open()  # a dataset that ended before the tags we wait for
        self.flush()
        if self.failed is not None:
            return self.failed
        place = self._place()
        if isinstance(place, Outcome):  # a second copy that is not stored
            return place
        outcome = self._journaled(place) if self.inline is not None else self._staged(place)
        label, first = place.label, place.first
        if not label and outcome.replaced:  # overwrite by path: the rename found the name taken
            label, first = "replaced", Path(outcome.path)
        if label:  # (on the journal path the materialiser finds that, off the ack path)
            outcome.replaced = label == "replaced"
            outcome.duplicate = duplicate_body(
                outcome.event or self._event(outcome), self.to.duplicates, first, label
            )
            if outcome.record is not None:  # handed on with the object's own event, its path final
                outcome.record.header["duplicate"] = outcome.duplicate
        outcome.claim, self.claim = self.claim, None
        return outcome

    def _place(self) -> Placement | Outcome:
        """Where the object goes, after its identity is held and any first copy found
        (``duplicates``); an Outcome when a second copy is discarded or refused."""
        scheme, policy, called = self.to.scheme, self.to.duplicates, self.to.called
        names = names_for(self.command, scheme, self.to.clock, self.layout_name)
        index = self.to.journal.index if self.to.journal is not None else None
        if policy.policy == "overwrite" and (policy.identity == "path" or index is None):
            # dcmrecv's rule: the atomic rename decides (the last copy stands) and tells.
            return Placement(self.directory, names, scheme.overwrites)
        root = self.to.writer.store.root
        own = root.joinpath(*self.directory.parts, names()) if scheme.repeats else None
        uid = self.command.affected_sop_instance_uid
        key = identity_key(policy, index, called, uid, own)
        if key is None:  # nothing can be a second copy of it
            return Placement(self.directory, names, scheme.overwrites)
        self.claim = CLAIMS.acquire(key, self.to.owner, self.to.settle)
        first = first_copy(policy, index, called, uid, own)
        place = placement(policy, first, own, root, self.directory, names, scheme)
        if isinstance(place, Placement):
            return place
        assert first is not None
        if place == "rejected" and policy.policy == "reject-if-different" and self._same_as(first):
            place = "identical"
        return self._not_stored(first, place)

    def _same_as(self, first: Path) -> bool:
        """Does the new object hold the same dataset bytes as ``first``?"""
        if self.file is not None:
            self.file.flush()  # its bytes readable from the temp file
        temp = self.file.temp_path if self.file is not None else None
        return same_dataset(first, self.inline, temp, self.meta_len)

    def _not_stored(self, first: Path, label: str) -> Outcome:
        """A second copy received in full and not kept: success or the policy's status."""
        self.discard()  # its temp file or record gone; the claim released (nothing to wait for)
        rejected = label == "rejected"
        outcome = (
            Outcome(Status(self.to.duplicates.status), DUPLICATE_COMMENT)
            if rejected
            else Outcome(Status.SUCCESS)
        )
        outcome.path, outcome.tags, outcome.size = (
            "" if rejected else str(first),
            event_tags(self.walker.captured),
            self.received,
        )
        outcome.duplicate = duplicate_body(self._event(outcome), self.to.duplicates, first, label, str(first))
        return outcome

    def _staged(self, place: Placement) -> Outcome:
        """A file of its own (the per-file path, or an object too big for its record):
        flushed and named now, durable at the window's sync."""
        assert self.file is not None
        command = self.command
        size = self.file.size
        started = time.monotonic()
        if place.directory != self.directory:  # over a first copy in another directory
            self.file.directory = self.to.writer.store.directory(place.directory)
        committed = self.to.writer.stage(self.file, place.directory, place.names, replace=place.replace)
        self.file = None
        if self.to.writer.spare_error:
            self.log.debug("store.spare_failed", reason=self.to.writer.spare_error)
        if committed.replaced:
            self.log.warning(
                "store.replaced", path=str(committed.path), sop_instance_uid=command.affected_sop_instance_uid
            )
        outcome = Outcome(
            Status.SUCCESS,
            path=str(committed.path),
            replaced=committed.replaced,
            commit_started=started,
            size=size,
            tags=event_tags(self.walker.captured),
        )
        outcome.event = self._event(outcome)
        if self.to.journal is not None:  # its record only names the file, made durable already
            header = journal_header(
                self.to, self.command, committed.path.parent, committed.path.name, size, outcome.event, place
            )
            header["file"] = True
            # Kept on the way only when Storage Commitment verifies checksums: it costs the
            # bandwidth path CPU (a spilled object's CRC covers what was inline before too).
            header["digest"] = f"crc32:{self.crc:08x}" if self.to.journal.digest_files else ""
            outcome.record = Record(header)
        return outcome

    def _journaled(self, place: Placement) -> Outcome:
        """An object small enough to travel in its record: named now, made after the ack."""
        assert self.inline is not None and self.to.journal is not None
        directory = self.to.writer.store.root.joinpath(*place.directory.parts)
        name = self.to.journal.choose_name(directory, place.names, replace=place.replace)
        data, self.inline = self.inline, None
        outcome = Outcome(
            Status.SUCCESS,
            path=str(directory / name),
            commit_started=time.monotonic(),
            size=len(data),
            tags=event_tags(self.walker.captured),
        )
        outcome.event = self._event(outcome)
        header = journal_header(self.to, self.command, directory, name, len(data), outcome.event, place)
        outcome.record = Record(header, data, crc=self.crc)
        return outcome

    def _event(self, outcome: Outcome) -> dict[str, Any]:
        """The ``object.stored`` body of this object."""
        command = self.command
        return {
            "event": "object.stored",
            "called_aet": self.to.called,
            "calling_aet": self.to.calling,
            "peer": self.to.peer,
            "sop_class_uid": command.affected_sop_class_uid,
            "sop_instance_uid": command.affected_sop_instance_uid,
            **outcome.tags,
            "path": outcome.path,
            "directory": os.path.dirname(outcome.path),
            "size": outcome.size,
            "transfer_syntax": self.transfer_syntax,
            "time": self.to.clock().isoformat(timespec="microseconds"),
        }

    def discard(self) -> None:
        if self.claim is not None:  # nothing of this object will be durable
            CLAIMS.release(self.claim)
            self.claim = None
        self.pending = []
        self.prefix = bytearray()
        self.inline = None
        if self.disk_counted:  # the object will not reach the disk
            self.to.disk.received(-self.disk_counted)
            self.disk_counted = 0
        if self.file is not None:
            self.file.discard()
            self.file = None


def journal_header(
    to: Destination,
    command: dimse.Command,
    directory: Path,
    name: str,
    size: int,
    event: dict[str, Any],
    place: Placement,
) -> dict[str, Any]:
    """A stored object's journal record header (see ``store.materialiser``)."""
    root = to.writer.store.root
    return {
        "root": str(root),
        "dir": str(directory.relative_to(root)),
        "name": name,
        "replace": place.replace,
        "size": size,
        "index": {
            "called_aet": to.called,
            "sop_instance_uid": command.affected_sop_instance_uid,
            "sop_class_uid": command.affected_sop_class_uid,
            "stored": event["time"],
        },
        "event": event,
    }


def event_tags(captured: Mapping[int, bytes]) -> dict[str, str]:
    """What the events after the ack say of an object: study, series, patient."""
    return {
        "study_uid": text_value(captured.get(STUDY_INSTANCE_UID)) or "",
        "series_uid": text_value(captured.get(SERIES_INSTANCE_UID)) or "",
        "patient_id": decoded_text(captured.get(PATIENT_ID), captured.get(SPECIFIC_CHARACTER_SET)),
    }


def names_for(
    command: dimse.Command, scheme: naming.NamingScheme, clock: Clock, layout_name: str | None
) -> Callable[[], str]:
    """The object's file names to try: the layout's one, or dcmrecv's scheme (a fresh one per call)."""
    if layout_name is not None:
        return lambda: layout_name
    return lambda: naming.file_name(
        scheme, command.affected_sop_class_uid, command.affected_sop_instance_uid, clock()
    )


def sink_for(
    command: dimse.Command,
    abstract_syntax: str,
    transfer_syntax: str,
    mode: str,
    destination: Destination,
    log: FilteringBoundLogger,
) -> Sink:
    """The sink of a C-STORE request, decided from its command before any data.

    A request that cannot succeed gets a ``Drained`` sink carrying its failure:
    bad UIDs in the command (never a path from the wire without validation), a
    SOP class other than its presentation context's, a disk below the watermark.
    """
    try:
        naming.check_uid(command.affected_sop_class_uid, "Affected SOP Class UID")
        naming.check_uid(command.affected_sop_instance_uid, "Affected SOP Instance UID")
    except uids.UnsafeIdentifier as exc:
        return Drained(Status.CANNOT_UNDERSTAND, str(exc))
    if command.affected_sop_class_uid != abstract_syntax:
        return Drained(Status.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's")
    if mode == "ignore":
        return Checked(command, transfer_syntax, log)
    if not destination.disk.has_room():
        return Drained(Status.OUT_OF_RESOURCES, DISK_LOW)
    if destination.journal is not None and (failing := destination.journal.failing):
        return Drained(Status.OUT_OF_RESOURCES, failing)  # acknowledged ones wait for the disk
    return Stored(command, transfer_syntax, log, destination)
