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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from structlog.typing import FilteringBoundLogger

from dcmrecvd.events import body as events
from dcmrecvd.serve import naming
from dcmrecvd.serve.duplicates import (
    CLAIMS,
    Claim,
    DuplicatePolicy,
    Placement,
    first_copy,
    identity_key,
    placement,
)
from dcmrecvd.serve.object_body import Body, FileBody, Landed, MemoryBody
from dcmrecvd.store.disk_space import DiskWatch
from dcmrecvd.store.object_record import Identity, ObjectRecord
from dcmrecvd.store.storage import Writer
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
    record: ObjectRecord | None = None
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
    ack: AckJournal | None = None
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
    """An object to store.  It must probe its first bytes before it has a body: the
    dataset's SOP UIDs go into the file meta, and under ``+ssd`` or ``output.layout``
    its tags pick the directory.  Until then those bytes are held aside (bounded by
    ``MAX_PREFIX``); from then on views are queued and appended to its body by
    ``flush`` (``object_body``: in memory for its journal record, or a file).
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
        self.body: Body | None = None
        self.directory = PurePosixPath(".")
        #: Bytes of this object counted against the free-space watermark on their way.
        self.disk_counted = 0
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
        if self.body is not None:
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
        self.body = self._open()
        self.pending.append(chunk)

    def _open(self) -> Body:
        """Start the object's body: its file meta and the bytes held aside, in its directory."""
        sop_class, instance = self.dataset_uids()
        self.directory, self.layout_name = where_to(self.to, self.walker.captured, sop_class)
        meta = part10.meta_header(sop_class, instance, self.transfer_syntax, self.to.calling, self.to.called)
        head, self.prefix = bytearray(meta) + self.prefix, bytearray()
        ack = self.to.ack
        if ack is None:
            return FileBody.open(self.to.writer, self.directory, head, len(meta), None)
        memory = MemoryBody(ack, self.to.writer, self.directory, head, len(meta))
        return memory.append([])  # a head bigger than a record spills at once

    def flush(self) -> None:
        if not self.pending:
            return
        chunks, self.pending = self.pending, []
        if self.failed is not None or self.body is None:
            return
        try:
            self.body = self.body.append(chunks)
        except Exception as exc:
            self._fail(exc)

    def _complete(self) -> Outcome:
        self._end_walk()
        if self.body is None:
            self.body = self._open()  # a dataset that ended before the tags we wait for
        self.flush()
        if self.failed is not None:
            return self.failed
        place = self._place()
        if isinstance(place, Outcome):  # a second copy that is not stored
            return place
        outcome = self._land(place)
        label, first = place.label, place.first
        if not label and outcome.replaced:  # overwrite by path: the rename found the name taken
            label, first = "replaced", Path(outcome.path)
        if label:  # (on the journal path the materialiser finds that, off the ack path)
            outcome.replaced = label == "replaced"
            assert outcome.event is not None
            policy = self.to.duplicates.policy
            outcome.duplicate = events.object_duplicate(outcome.event, policy, str(first or ""), label)
            if outcome.record is not None:  # handed on with the object's own event, its path final
                outcome.record.duplicate = outcome.duplicate
        outcome.claim, self.claim = self.claim, None
        return outcome

    def _place(self) -> Placement | Outcome:
        """Where the object goes, after its identity is held and any first copy found
        (``duplicates``); an Outcome when a second copy is discarded or refused."""
        scheme, policy, called = self.to.scheme, self.to.duplicates, self.to.called
        names = names_for(self.command, scheme, self.to.clock, self.layout_name)
        index = self.to.ack.index if self.to.ack is not None else None
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
        assert first is not None and self.body is not None
        if place == "rejected" and policy.policy == "reject-if-different" and self.body.same_dataset(first):
            place = "identical"
        return self._not_stored(first, place)

    def _not_stored(self, first: Path, label: str) -> Outcome:
        """A second copy received in full and not kept: success or the policy's status."""
        self.discard()  # its temp file or record gone; the claim released (nothing to wait for)
        if label == "rejected":
            outcome = Outcome(Status(self.to.duplicates.status), DUPLICATE_COMMENT)
        else:
            outcome = Outcome(Status.SUCCESS, path=str(first))
        outcome.tags = event_tags(self.walker.captured)
        outcome.size = self.received
        stored = stored_event(self.to, self.command, self.transfer_syntax, outcome)
        outcome.duplicate = events.object_duplicate(
            stored, self.to.duplicates.policy, str(first), label, str(first)
        )
        return outcome

    def _land(self, place: Placement) -> Outcome:
        """Its name given: a file flushed and named (durable at the window's sync), or a
        record's name chosen (made after the ack); with the journal, its record."""
        assert self.body is not None
        started = time.monotonic()
        landed = self.body.land(place)
        self.body = None
        if landed.replaced:
            uid = self.command.affected_sop_instance_uid
            self.log.warning("store.replaced", path=str(landed.path), sop_instance_uid=uid)
        if landed.large and self.to.writer.spare_error:
            self.log.debug("store.spare_failed", reason=self.to.writer.spare_error)
        outcome = Outcome(
            Status.SUCCESS,
            path=str(landed.path),
            replaced=landed.replaced,
            commit_started=started,
            size=landed.size,
            tags=event_tags(self.walker.captured),
        )
        outcome.event = stored_event(self.to, self.command, self.transfer_syntax, outcome)
        if self.to.ack is not None:
            outcome.record = journal_record(self.to, self.command, landed, place, outcome.event)
        return outcome

    def discard(self) -> None:
        if self.claim is not None:  # nothing of this object will be durable
            CLAIMS.release(self.claim)
            self.claim = None
        self.pending = []
        self.prefix = bytearray()
        if self.disk_counted:  # the object will not reach the disk
            self.to.disk.received(-self.disk_counted)
            self.disk_counted = 0
        if self.body is not None:
            self.body.discard()
            self.body = None


def where_to(
    to: Destination, captured: Mapping[int, bytes], sop_class: str
) -> tuple[PurePosixPath, str | None]:
    """An object's directory (under the output directory) and, under output.layout, its
    file name, from the tags held aside: output.layout, +ssd's Series Date, or neither."""
    scheme = to.scheme
    if scheme.layout is not None:
        path = scheme.layout.render(
            captured,
            captured.get(SPECIFIC_CHARACTER_SET),
            derived_values(to.calling, to.called, sop_class),
            to.clock(),
            scheme.layout_missing,
        )
        return path.parent, path.name
    if scheme.needs_series_date:
        series_date = text_value(captured.get(SERIES_DATE))
        return naming.directory_for(scheme, series_date, to.clock().date()), None
    return PurePosixPath("."), None


def stored_event(
    to: Destination, command: dimse.Command, transfer_syntax: str, outcome: Outcome
) -> dict[str, Any]:
    """The ``object.stored`` body of an object (``events.body``)."""
    return events.object_stored(
        called=to.called,
        calling=to.calling,
        peer=to.peer,
        sop_class_uid=command.affected_sop_class_uid,
        sop_instance_uid=command.affected_sop_instance_uid,
        tags=outcome.tags,
        path=outcome.path,
        size=outcome.size,
        transfer_syntax=transfer_syntax,
        when=to.clock(),
    )


def journal_record(
    to: Destination, command: dimse.Command, landed: Landed, place: Placement, event: dict[str, Any]
) -> ObjectRecord:
    """A stored object's ack-journal record: its bytes, or (a large object) its file's name
    (in ``place.directory`` either way)."""
    root = to.writer.store.root
    identity = Identity(
        to.called, command.affected_sop_instance_uid, command.affected_sop_class_uid, event["time"]
    )
    return ObjectRecord(
        str(root),
        str(place.directory),
        landed.path.name,
        replace=place.replace,
        size=landed.size,
        large=landed.large,
        digest=landed.digest,
        identity=identity,
        event=event,
        data=landed.data,
        crc=landed.crc,
    )


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
    if destination.ack is not None and (failing := destination.ack.failing):
        return Drained(Status.OUT_OF_RESOURCES, failing)  # acknowledged ones wait for the disk
    return Stored(command, transfer_syntax, log, destination)
