"""The ack journal as the serving side sees it: open and recover it, commit to it, wait on it.

``store.journal`` keeps records durably, ``store.materialiser`` turns them into
files, index rows and events; this module puts them together for the daemon
(where the journal lives, the fallback when it cannot be used, recovery
before READY) and for an association (a stored object's record, the
commit that precedes its ack, the wait for its file before A-RELEASE-RP).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from dcmrecvd.conf.config import Config, journal_needed, receiver_tables
from dcmrecvd.errors import ConfigError
from dcmrecvd.events import body as events
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.store import state_directory as state_dir
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal, JournalUnusable, Record
from dcmrecvd.store.journal_files import Sizing, fit_to_disk
from dcmrecvd.store.making import check_fits
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.store.object_record import ObjectRecord, Settled
from dcmrecvd.store.quarantine import Quarantine

log = structlog.get_logger("dcmrecvd")

#: Names handed out and perhaps not yet made, remembered so that two objects in flight never
#: get one name (the materialiser never clobbers, but a second name would be a surprise).
RESERVED_NAMES = 65536
#: Names tried for one object (as ``storage.MAX_NAME_ATTEMPTS``).
MAX_NAME_ATTEMPTS = 100
#: How long A-RELEASE-RP waits for the association's objects to reach their final names.
RELEASE_WAIT_SECONDS = 60.0


class CannotMakeFiles(OSError):
    """Objects are refused (0xA700) while acknowledged ones cannot be made into files."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class AckJournal:
    """The journal, its materialiser and the instance index, opened together."""

    journal: Journal
    materialiser: Materialiser
    index: InstanceIndex
    #: Objects up to this many bytes travel inside their record.
    inline_max: int
    #: Keep a CRC-32 of each larger object while it streams into its file, for the index
    #: (set while Storage Commitment verifies checksums: it costs the bandwidth path CPU).
    digest_files: bool = False
    _reserved: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def choose_name(self, directory: Path, names: Callable[[], str], *, replace: bool) -> str:
        """A name for an object made later: a default name as it is (it replaces), another
        scheme's first name that is neither on disk nor given to an object in flight."""
        if replace:
            name = names()
            check_fits(directory, name, replace=True)
            return name
        for _attempt in range(MAX_NAME_ATTEMPTS):
            name = names()
            check_fits(directory, name, replace=False)
            key = os.path.join(directory, name)
            with self._lock:
                if key in self._reserved or os.path.lexists(key):
                    continue
                self._reserved[key] = None
                if len(self._reserved) > RESERVED_NAMES:
                    self._reserved.popitem(last=False)
            return name
        raise FileExistsError(f"no free file name after {MAX_NAME_ATTEMPTS} attempts")

    @property
    def failing(self) -> str:
        """Why acknowledged objects cannot be made into files now ("" when they can): while
        it says something, no new object is acknowledged."""
        failure = self.materialiser.failing
        return f"cannot make files: {failure.reason}" if failure is not None else ""

    def waiting(self) -> int:
        """Acknowledged records whose files are not made yet."""
        return max(self.journal.last_seq - self.materialiser.visible_through, 0)

    def commit(self, objects: list[ObjectRecord]) -> None:
        """Durable when this returns (group commit with other threads), each given its
        sequence number; OSError otherwise, also while the materialiser cannot make files
        (the journal would only fill up)."""
        failing = self.failing
        if failing:
            raise CannotMakeFiles(errno.EAGAIN, failing)
        records = [o.to_record() for o in objects]
        self.journal.commit(records)
        for obj, record in zip(objects, records, strict=True):
            obj.seq = record.seq

    def wait_visible(self, seq: int, timeout: float = RELEASE_WAIT_SECONDS) -> bool:
        return self.materialiser.wait_visible(seq, timeout)

    def connect_events(
        self,
        record: Callable[[dict[str, Any]], None],
        persist: Callable[[], None],
        known: Callable[[dict[str, Any]], bool],
    ) -> None:
        """Hand the events of what became of acknowledged objects to the outbox from now on;
        a replayed one only if the outbox does not hold it already (after kill -9 it mostly does)."""

        def hand_on(settled: list[Settled], replayed: bool) -> None:
            for what in settled:
                for body in events.settled(what):
                    if not (replayed and known(body)):
                        record(body)

        self.materialiser.events = hand_on
        self.materialiser.persist_events = persist

    def recover(self, records: list[Record]) -> None:
        """Replay what a crash left past the checkpoint (before serving and READY)."""
        started = time.monotonic()
        counts = self.materialiser.replay(records)
        if records or self.journal.problems:
            log.warning(
                "journal.recovered",
                **counts,
                seconds=round(time.monotonic() - started, 3),
                through=self.journal.done_through,
            )
        self.materialiser.start()

    def close(self) -> None:
        """Every record made and checkpointed, then closed (after the associations ended)."""
        self.materialiser.stop()
        if self.materialiser.visible_through > self.journal.done_through:
            self.materialiser.try_checkpoint()  # a disk that fails now: the next start replays
        self.journal.close()
        self.index.close()


def state_directory(config: Config, environ: Mapping[str, str]) -> Path:
    """daemon.state_directory, $STATE_DIRECTORY under systemd, else one per output directory
    (``store.state_directory``): the journal, the databases and the quarantine live there."""
    return state_dir.resolve(config.daemon.state_directory, Path(config.output.directory), environ)


def why_not(config: Config) -> str:
    """Why no AE acknowledges through the journal ("" when one does): journal.enabled off,
    or no AE that stores with fsync on (output.fsync = false, --ignore)."""
    if not config.journal.enabled:
        return "journal.enabled is off"
    outputs = [config.output, *(receiver_tables(config, title)[1] for title in config.ae)]
    if not any(out.fsync and out.mode != "ignore" for out in outputs):
        return "nothing is stored with output.fsync on"
    return ""


def refuse_without(config: Config, reason: str) -> None:
    """The journal cannot be used where it is: a setting that relies on it is the same
    configuration error as with journal.enabled = false, never a silent change of meaning."""
    for key, why in journal_needed(config):
        raise ConfigError("configuration", key, f"{why}, and the ack journal cannot be used: {reason}")


def _counted(written: Callable[[list[Record], bool], None]) -> Callable[[list[Record], bool], None]:
    """The journal's ``on_written``, also counting the records each flush carried."""

    def on_written(records: list[Record], ok: bool) -> None:
        if ok:
            METRICS.records_per_flush.observe(len(records))
        written(records, ok)

    return on_written


def open_ack_journal(
    config: Config, environ: Mapping[str, str]
) -> tuple[AckJournal | None, list[Record], str]:
    """The journal, the records to replay, and why not when there is none (for daemon.ready).
    Raises ConfigError when there is none and a setting needs one."""
    reason = why_not(config)
    if reason:
        return None, [], reason
    settings = config.journal
    base = state_directory(config, environ)
    directory = Path(settings.directory) if settings.directory else base / "journal"
    try:
        sizing = fit_to_disk(directory, settings.segment_mib << 20, settings.segments)
    except OSError as exc:
        sizing = Sizing(settings.segment_mib << 20, settings.segments)
        log.warning("journal.sized", reason=f"free space unknown: {exc.strerror or exc}")
    if sizing.note:
        log.warning(
            "journal.sized",
            reason=sizing.note,
            segment_kib=sizing.segment_size >> 10,
            segments=sizing.segments,
        )
    journal = Journal(directory, segment_size=sizing.segment_size, segments=sizing.segments)
    try:
        records = journal.open()
    except JournalUnusable as exc:
        journal.close()
        refuse_without(config, str(exc))
        log.warning("journal.unavailable", reason=str(exc), fallback="per-file")
        return None, [], str(exc)
    for problem in journal.problems:
        log.error("journal.corrupt", problem=problem, directory=str(directory))
    index = InstanceIndex(base / "instances.sqlite")
    materialiser = Materialiser(journal, index, quarantine=Quarantine(base / "quarantine"))
    materialiser.replaced = METRICS.duplicates.labels("replaced").inc
    materialiser.quarantined = lambda reason: METRICS.quarantined.labels(reason).inc()
    journal.on_written = _counted(materialiser.written)
    # An object in its record must fit a segment with room to spare (a quarter at most).
    inline_max = min(settings.inline_max_kib << 10, journal.segment_size // 4)
    return AckJournal(journal, materialiser, index, inline_max), records, ""
