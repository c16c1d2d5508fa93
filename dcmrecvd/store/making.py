"""Making a batch of journal records into files, one outcome per record.

Why per record: a batch shares its flushes (one ``syncfs``, one fsync per
directory), but not its fate.  A record that can never be made (its name too
long, a file where its directory should be) is *refused* and the others go on;
a failure of the disk (full, read-only, an I/O error) stops the batch at the
record it hit, and every record before it that reached its name durably is
*made* and stays made: a retry or a recovery never writes it again, so a file
a consumer has already taken away does not come back.

Order inside a batch: each file written to a temp file in its directory; one
``syncfs`` per filesystem; each renamed (or linked without replacing); each
directory fsynced once.  A final name only ever holds a complete, durable file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from .file_ops import FileOps
from .materialise_outcome import MakeFailure, Row, classify
from .object_record import ObjectRecord
from .storage import FILE_MODE, REPLACE_LOCK, TEMP_PREFIX, TEMP_SUFFIX, Store, take_back

log = structlog.get_logger("dcmrecvd")

#: A name component and a whole path, as Linux allows them (NAME_MAX, PATH_MAX).
NAME_MAX = 255
PATH_MAX = 4095
#: Room kept in a never-clobbering name for the ``.<seq>`` a taken name gets.
SEQ_SUFFIX_ROOM = 21
#: Temp names: the pid, a tag drawn once per start and a counter (O_EXCL settles the rest);
#: a random draw per file cost a getrandom call per object.
_TEMP_TAG = secrets.token_hex(4)
_TEMP_COUNTER = itertools.count()


@dataclass
class Batch:
    """What became of a batch: records stopped at (and after) a transient failure are
    ``rest``; ``failure`` says why.  Refused records carry their outcome in ``refused``."""

    rest: list[ObjectRecord] = field(default_factory=list)
    failure: MakeFailure | None = None
    refused: dict[int, MakeFailure] = field(default_factory=dict)


def check_fits(directory: Path, name: str, *, replace: bool) -> None:
    """Raise ENAMETOOLONG when a name (with the ``.<seq>`` a taken never-clobbering name
    may get) or its path cannot exist on Linux: known before the ack, so the object is
    refused there instead of being acknowledged and quarantined."""
    room = 0 if replace else SEQ_SUFFIX_ROOM
    directory_bytes = _directory_bytes(str(directory))
    name_bytes = len(os.fsencode(name))
    if name_bytes + room > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long", name)
    if directory_bytes + 1 + name_bytes + room > PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "path too long", os.path.join(directory, name))


@functools.lru_cache(maxsize=4096)
def _directory_bytes(directory: str) -> int:
    """The encoded length of an absolute directory whose every component fits NAME_MAX
    (asked once per directory, not per object: objects share a few directories)."""
    for part in directory.split("/")[1:]:
        if len(os.fsencode(part)) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "directory name too long", part)
    return len(os.fsencode(directory))


def write_temp(ops: FileOps, directory: Path, data: bytes | bytearray | memoryview) -> Path:
    """A hidden temp file holding ``data`` (through the page cache: the batch's
    ``syncfs`` writes it back and flushes it with the others)."""
    while True:
        temp = directory / f"{TEMP_PREFIX}{os.getpid()}-{_TEMP_TAG}{next(_TEMP_COUNTER):x}{TEMP_SUFFIX}"
        try:
            fd = ops.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            continue
        break
    try:
        view = memoryview(data)
        while view:
            view = view[ops.write(fd, view) :]
    except BaseException:
        ops.close(fd)
        with contextlib.suppress(OSError):
            ops.unlink(temp)
        raise
    ops.close(fd)
    return temp


def give_name(ops: FileOps, directory: Path, temp: Path, record: ObjectRecord) -> Path:
    """The final name: replacing (a default name) or never clobbering (someone else's
    file under it after the ack keeps it; ours goes under ``<name>.<seq>``)."""
    name = record.name
    final = directory / name
    if record.replace:
        with REPLACE_LOCK:  # against an association renaming a large copy of it at once
            replaced = os.path.lexists(final)
            ops.replace(temp, final)
        if replaced:
            log.warning("store.replaced", path=str(final), sop_instance_uid=record.sop_instance_uid)
            record.replaced = True
        return final
    try:
        ops.link(temp, final)
    except FileExistsError:
        final = directory / f"{name}.{record.seq}"
        ops.link(temp, final)
    ops.unlink(temp)
    return final


class Maker:
    """Makes batches of records into files on whatever filesystems their roots are."""

    def __init__(self, ops: FileOps, store_for: Callable[[str], Store]) -> None:
        self.ops = ops
        self.store_for = store_for

    def make(self, records: list[ObjectRecord]) -> Batch:
        """Make every record whose state is "" (in order); see the module docstring."""
        batch = Batch()
        written: list[tuple[ObjectRecord, Store, Path, Path]] = []  # record, store, directory, temp
        #: (root, directory) -> its store and absolute directory: looked up once per batch.
        places: dict[tuple[str, str], tuple[Store, Path]] = {}
        for record in records:
            if record.state:
                continue
            try:
                record.check()
                if record.large:  # durable under its name already
                    record.state = "made"
                    continue
                key = (record.root, record.directory)
                if key not in places:
                    store = self.store_for(record.root)
                    places[key] = (store, store.directory(PurePosixPath(record.directory)))
                store, directory = places[key]
                try:
                    temp = write_temp(self.ops, directory, record.data)
                except FileNotFoundError:  # the directory vanished (a cleanup job): made again
                    store.forget(directory)
                    del places[key]
                    directory = store.directory(PurePosixPath(record.directory))
                    places[key] = (store, directory)
                    temp = write_temp(self.ops, directory, record.data)
                written.append((record, store, directory, temp))
            except Exception as exc:
                self._forget(record)
                if not self._refused(batch, record, classify(exc)):
                    break
        try:
            self._flush(dict.fromkeys(store.root for _, store, _, _ in written))
        except OSError as exc:  # none of them is known durable: all are written again later
            self._discard(temp for _, _, _, temp in written)
            batch.failure = batch.failure or flush_failure(exc)
            written = []
        named: list[tuple[ObjectRecord, Store, Path, Path]] = []
        for at, (record, store, directory, temp) in enumerate(written):
            try:
                final = give_name(self.ops, directory, temp, record)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    self.ops.unlink(temp)
                self._forget(record)
                if not self._refused(batch, record, classify(exc)):
                    self._discard(t for _, _, _, t in written[at + 1 :])
                    break
                continue
            record.path = str(final)
            named.append((record, store, directory, final))
        self._sync_directories(batch, named)
        batch.rest = _from_first_unpassed(records)
        return batch

    def _forget(self, record: ObjectRecord) -> None:
        """A record failed: its directory is looked at anew on the next try."""
        with contextlib.suppress(Exception):
            store = self.store_for(record.root)
            store.forget(store.root.joinpath(*PurePosixPath(record.directory).parts))

    def _flush(self, roots: Iterable[Path]) -> None:
        """The batch's data and temp files durable: one ``syncfs`` per filesystem (one cache
        flush for the batch, where the per-file path pays one per object)."""
        for root in roots:
            self.ops.syncfs(root)

    def _refused(self, batch: Batch, record: ObjectRecord, outcome: MakeFailure) -> bool:
        """A record that failed: refused (True: go on with the others) or the batch stops."""
        if outcome.permanent:
            record.state = "refused"
            batch.refused[record.seq] = outcome
            return True
        batch.failure = batch.failure or outcome
        return False

    def _sync_directories(self, batch: Batch, named: list[tuple[ObjectRecord, Store, Path, Path]]) -> None:
        """One fsync per directory; a name whose directory's fsync failed is taken back
        (never retried as if a second fsync could succeed: the temp is written anew)."""
        for store, directory in dict.fromkeys((s, d) for _, s, d, _ in named):
            try:
                store.sync_published(directory)
                ok = True
            except OSError as exc:
                batch.failure = batch.failure or flush_failure(exc)
                ok = False
            for record, s, d, final in named:
                if (s, d) != (store, directory):
                    continue
                if ok:
                    record.state = "made"
                else:
                    take_back(self.ops, final)
                    record.path = ""

    def _discard(self, temps: Any) -> None:
        for temp in temps:
            with contextlib.suppress(OSError):
                self.ops.unlink(temp)


def flush_failure(exc: OSError) -> MakeFailure:
    """A flush that failed is the disk's trouble, never one record's: it waits, whatever
    its errno (the files are written anew; a flush is never retried on the same file)."""
    return MakeFailure(Row.TRANSIENT, classify(exc).reason, exc.errno or 0)


def _from_first_unpassed(records: list[ObjectRecord]) -> list[ObjectRecord]:
    """The records from the first one neither made nor refused (in order) on."""
    for at, record in enumerate(records):
        if record.state not in ("made", "refused", "quarantined", "finished"):
            return records[at:]
    return []
