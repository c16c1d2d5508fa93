"""Journal records become files, off the ack path: one thread, in record order.

Per batch of records (whatever the journal wrote since the last turn): each
inline object is written to a temp file in its directory; all of them are
flushed at once (``syncfs``: one cache flush for the batch, where the per-file
path pays one per object); then each is renamed (or linked without
replacing), and each directory touched is fsynced once (a final name only
ever holds a complete, durable file).
Only then are the batch's index rows written and its events handed on, and
only after those are durable (``sync``) does the journal's checkpoint pass
the records, which lets their segment be recycled.  A crash anywhere in this
leaves records past the checkpoint, which ``replay`` does again at start:
it makes what is missing and verifies what exists.

A record's header (made by the serving side; nothing here knows DICOM):
``root``, ``dir``, ``name``, ``replace`` (a default name replaces an older
file), ``file`` (a large object already durable under its name: only its row
and events are left; with its ``digest``), ``size``, ``index`` (the row's
identifiers), ``event`` (the body of ``object.stored``, if wanted) and
``duplicate`` (the body of ``object.duplicate`` of a second copy stored).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from .file_ops import REAL, FileOps
from .instance_index import Instance, InstanceIndex
from .journal import Journal, Record
from .storage import FILE_MODE, TEMP_PREFIX, TEMP_SUFFIX, Store, take_back

log = structlog.get_logger("dcmrecvd")

#: How often, at most, the index and events are made durable and the checkpoint moved on
#: while objects keep coming (when idle it happens at once).  Short, because segments are
#: recycled only behind the checkpoint, and what is past it is replayed after a crash; not
#: shorter, because each costs the index's and the outbox's fsyncs on the same disk.
CHECKPOINT_SECONDS = 0.25

#: How long the thread waits for more records before making a batch, unless an association
#: waits for its files (A-RELEASE-RQ) or the batch is big already.
LINGER_SECONDS = 0.02
LINGER_RECORDS = 64

#: Records made into files at once during recovery.
REPLAY_BATCH = 256

#: Takes ``object.stored`` bodies; the flag says they come from a replay (maybe handed on before).
Events = Callable[[list[dict[str, Any]], bool], None]


class Materialiser:
    """Turns committed records into files, index rows and events; see the module docstring."""

    def __init__(
        self,
        journal: Journal,
        index: InstanceIndex,
        *,
        events: Events | None = None,
        persist_events: Callable[[], None] = lambda: None,
        ops: FileOps = REAL,
        ordered_journal: bool | None = None,
    ) -> None:
        self.journal = journal
        self.index = index
        #: Where ``object.stored`` bodies go (the outbox), and how it makes them durable.
        self.events = events
        self.persist_events = persist_events
        #: Told of each file that replaced an older one of its name (a second copy, counted).
        self.replaced: Callable[[], None] = lambda: None
        self._stores: dict[str, Store] = {}
        #: The system calls, and what the filesystem promises (None: probed), for its ``Store``s.
        self.ops = ops
        self.ordered_journal = ordered_journal
        self._cond = threading.Condition()
        self._queue: list[Record] = []
        #: Every record at or below this is under its final name (and has its row and events).
        self.visible_through = journal.done_through
        #: Sequence numbers done beyond ``visible_through`` (a gap before them is not).
        self._done: set[int] = set()
        self._stop = False
        #: Threads in ``wait_visible``: while there are any, batches go at once.
        self._waiting = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ intake

    def written(self, records: list[Record], ok: bool) -> None:
        """The journal wrote (``ok``) or failed to write these records, in sequence order."""
        with self._cond:
            if ok:
                self._queue.extend(records)
            else:  # never acknowledged, never to be made: their numbers are simply done
                self._done.update(r.seq for r in records)
                self._advance_locked()
            self._cond.notify_all()

    def wait_visible(self, seq: int, timeout: float) -> bool:
        """Wait until the record ``seq`` (and all before it) is under its final name."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # no lingering while someone waits
            try:
                while self.visible_through < seq:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._waiting -= 1

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="materialiser", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Make everything queued, checkpoint, and end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        last_checkpoint = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    unsaid = self.visible_through > self.journal.done_through
                    due = last_checkpoint + CHECKPOINT_SECONDS - time.monotonic()
                    if unsaid and due <= 0:
                        break  # quiet, with made records not yet checkpointed: now
                    self._cond.wait(due if unsaid else 1.0)
                # Linger a little for more: each batch costs two cache flushes however
                # many files it holds, and they compete with the journal's for the disk.
                linger_until = time.monotonic() + LINGER_SECONDS
                while (
                    self._queue
                    and len(self._queue) < LINGER_RECORDS
                    and not self._waiting
                    and not self._stop
                    and (left := linger_until - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                stopping = self._stop
            try:
                if batch:
                    self.apply(batch)
                self._advance(batch)
                now = time.monotonic()
                # At most every CHECKPOINT_SECONDS, never per object: a lone sender leaves
                # the thread idle between objects, and each checkpoint costs fsyncs.
                if self.visible_through > self.journal.done_through and (
                    now - last_checkpoint >= CHECKPOINT_SECONDS or stopping
                ):
                    self.checkpoint()
                    last_checkpoint = now
            except Exception as exc:  # a disk that fails: the records stay in the journal
                log.error("journal.materialise_failed", reason=str(exc) or type(exc).__name__)
                with self._cond:
                    self._queue[:0] = batch  # tried again; never acknowledged twice, never lost
                    self._cond.wait(1.0)
                continue
            if stopping and not self._queue:
                return

    def _advance(self, batch: list[Record]) -> None:
        with self._cond:
            self._done.update(r.seq for r in batch)
            self._advance_locked()
            self._cond.notify_all()

    def _advance_locked(self) -> None:
        through = self.visible_through
        while through + 1 in self._done:
            through += 1
            self._done.discard(through)
        self.visible_through = through

    def checkpoint(self) -> None:
        """Index rows and events durable, then the journal told: its records are done."""
        through = self.visible_through
        self.index.sync()
        self.persist_events()
        self.journal.checkpoint(through)
        self.journal.prepare_spare()

    # ------------------------------------------------------------------ making files

    def replay(self, records: list[Record]) -> dict[str, int]:
        """At start: make what a crash left undone, verify what exists; counts for the log.

        Files are made in batches (one ``syncfs`` per batch, as when serving), and of several
        records under one replacing name only the last is the file (the others are rows
        and events only): so a full journal replays in seconds, not one flush per record.
        """
        counts = {"records": len(records), "made": 0, "verified": 0, "missing": 0}
        last_for: dict[Path, int] = {}
        for record in records:
            if record.header.get("replace") and not record.header.get("file"):
                last_for[_final_path(record.header)] = record.seq
        to_make: list[Record] = []
        for record in records:
            header = record.header
            final = _final_path(header)
            if header.get("replace") and not header.get("file") and last_for.get(final) != record.seq:
                header["path"] = str(final)  # superseded by a later object under its name
                counts["verified"] += 1
                continue
            outcome = self._replay_one(record)
            if outcome == "made":
                to_make.append(record)
            counts[outcome] += 1
        for start in range(0, len(to_make), REPLAY_BATCH):
            self._make(to_make[start : start + REPLAY_BATCH])
        self._finish(records, replayed=True)
        if records:
            self.visible_through = max(self.visible_through, records[-1].seq)
            self.checkpoint()
        return counts

    def _replay_one(self, record: Record) -> str:
        header = record.header
        final = _final_path(header)
        if header.get("file"):
            if final.is_file() and final.stat().st_size == header.get("size", -1):
                return "verified"
            log.error("journal.file_missing", path=str(final), seq=record.seq)
            return "missing"
        for candidate in (final, final.with_name(f"{final.name}.{record.seq}")):
            try:
                if candidate.read_bytes() == record.data:
                    header["path"] = str(candidate)
                    return "verified"
            except OSError:
                continue
        return "made"

    def apply(self, batch: list[Record]) -> None:
        """Make a batch's files durable under their names, then its rows and events."""
        self._make([r for r in batch if not r.header.get("file")])
        self._finish(batch)

    def _make(self, records: list[Record]) -> None:
        """Write every file of the batch, flush them all at once (one ``syncfs`` per
        filesystem: one cache flush, not one per file), then name them and fsync each
        directory once.  On an error nothing of the batch is taken as made."""
        written: list[tuple[Record, Store, Path, Path]] = []  # record, store, directory, temp
        named: list[tuple[Store, Path]] = []
        try:
            for record in records:
                header = record.header
                store = self._store(header["root"])
                directory = store.directory(PurePosixPath(header["dir"]))
                written.append((record, store, directory, write_temp(self.ops, directory, record.data)))
            self._flush(dict.fromkeys(store.root for _, store, _, _ in written))
            for record, store, directory, temp in written:
                final = give_name(self.ops, directory, temp, record)
                named.append((store, final))
                record.header["path"] = str(final)
            for store, directory in dict.fromkeys((s, d) for _, s, d, _ in written):
                store.sync_published(directory)
        except OSError:
            for store, final in named:
                take_back(store.ops, final)  # not known durable: made again on the next try
            for _, _, _, temp in written:
                with contextlib.suppress(OSError):
                    self.ops.unlink(temp)
            raise

    def _flush(self, roots: Iterable[Path]) -> None:
        """The batch's data and temp files durable: one ``syncfs`` per filesystem."""
        for root in roots:
            self.ops.syncfs(root)

    def _finish(self, records: list[Record], replayed: bool = False) -> None:
        rows = []
        bodies = []
        for record in records:
            header = record.header
            ident = header.get("index") or {}
            path = header.get("path") or str(_final_path(header))
            if ident:
                digest = header.get("digest") or f"crc32:{record.crc or 0:08x}"
                rows.append(
                    Instance(
                        ident["called_aet"],
                        ident["sop_instance_uid"],
                        ident["sop_class_uid"],
                        path,
                        int(header.get("size") or len(record.data)),
                        digest,
                        ident["stored"],
                    )
                )
            if header.get("replaced") and "duplicate" not in header:
                self.replaced()  # output.duplicates = "overwrite" by path: found only now
                if header.get("event") is not None:
                    header["duplicate"] = {
                        **header["event"],
                        "event": "object.duplicate",
                        "policy": "overwrite",
                        "outcome": "replaced",
                        "first_path": path,
                    }
            for kind in ("event", "duplicate"):  # object.stored, then object.duplicate if a copy
                event = header.get(kind)
                if event is not None:
                    event["path"] = path
                    event["directory"] = os.path.dirname(path)
                    bodies.append(event)
        self.index.put(rows)
        if bodies and self.events is not None:
            self.events(bodies, replayed)

    def _store(self, root: str) -> Store:
        store = self._stores.get(root)
        if store is None:
            store = Store(Path(root), durable=True, ops=self.ops, ordered_journal=self.ordered_journal)
            self._stores[root] = store
        return store


def write_temp(ops: FileOps, directory: Path, data: bytes | bytearray | memoryview) -> Path:
    """A hidden temp file holding ``data`` (through the page cache: the batch's
    ``syncfs`` writes it back and flushes it with the others)."""
    while True:
        temp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"
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


def give_name(ops: FileOps, directory: Path, temp: Path, record: Record) -> Path:
    """The final name: replacing (a default name) or never clobbering (someone else's
    file under it after the ack keeps it; ours goes under ``<name>.<seq>``)."""
    header = record.header
    name: str = header["name"]
    final = directory / name
    if header.get("replace"):
        replaced = os.path.lexists(final)
        ops.replace(temp, final)
        if replaced:
            uid = (header.get("index") or {}).get("sop_instance_uid", "")
            log.warning("store.replaced", path=str(final), sop_instance_uid=uid)
            header["replaced"] = True
        return final
    try:
        ops.link(temp, final)
    except FileExistsError:
        final = directory / f"{name}.{record.seq}"
        ops.link(temp, final)
    ops.unlink(temp)
    return final


def _final_path(header: dict[str, Any]) -> Path:
    return Path(header["root"]).joinpath(*PurePosixPath(header["dir"]).parts, header["name"])
