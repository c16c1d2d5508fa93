"""The quarantine: acknowledged objects whose files cannot be made, kept whole and visible.

Why it exists: a journal record that can never become a file as it stands (a
name too long for the filesystem, a file where a layout directory should be, a
header that does not decode) must not stop the records behind it, and must not
vanish either: the C-STORE was answered 0x0000.  So its bytes and its header go
here, in the state directory, durably, before the checkpoint passes it.  The
admin lists, exports or retries them (``dcmrecvd journal``); nothing here is
ever deleted except by a retry that made the file.

On disk, one entry per record: ``<id>.dcm`` (the object as it would have been
written: file meta and dataset; absent for a record that only named a file)
and ``<id>.json`` (the header, why, when), the JSON written last so that an
entry without one is an unfinished write, never listed.  ``<id>.retry`` asks the
running daemon (or the next start) to try the entry again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .file_ops import REAL, FileOps
from .object_record import ObjectRecord

ENTRY_MODE = 0o640


@dataclass(frozen=True)
class Entry:
    """One quarantined record, as listed."""

    id: str
    seq: int
    reason: str
    time: str
    header: dict[str, Any]
    data_path: Path | None

    @property
    def record(self) -> ObjectRecord:
        """The record it holds, as its header describes it (its bytes are not read)."""
        return ObjectRecord.from_header(self.header, seq=self.seq)

    @property
    def intended_path(self) -> str:
        return self.record.intended_path

    @property
    def sop_instance_uid(self) -> str:
        return self.record.sop_instance_uid


class Quarantine:
    """The quarantine directory (made on first use, durably)."""

    def __init__(self, directory: Path, ops: FileOps = REAL) -> None:
        self.directory = directory
        self.ops = ops
        self._retry_mtime = 0.0

    def put(self, seq: int, header: dict[str, Any], data: bytes | bytearray | memoryview, reason: str) -> str:
        """Keep a record durably; its entry's id.  Raises OSError (the record then waits:
        quarantine is the last place an acknowledged object can go, so it is never skipped)."""
        self._make_directory()
        entry = f"{seq:012d}-{secrets.token_hex(3)}"
        if len(data):  # durable under its name before the JSON that makes the entry count
            self._write_durably(self.directory / f"{entry}.dcm", bytes(data))
            self.ops.fsync_directory(self.directory)
        about = {"seq": seq, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "header": header}
        self._write_durably(self.directory / f"{entry}.json", json.dumps(about, indent=1).encode())
        self.ops.fsync_directory(self.directory)
        return entry

    def entries(self) -> Iterator[Entry]:
        """Every complete entry, oldest record first."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            try:
                about = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            data = path.with_suffix(".dcm")
            yield Entry(
                path.stem,
                int(about.get("seq", 0)),
                str(about.get("reason", "")),
                str(about.get("time", "")),
                about.get("header") if isinstance(about.get("header"), dict) else {},
                data if data.exists() else None,
            )

    def held_seqs(self) -> set[int]:
        """The records here (recovery: a quarantined record is not made again)."""
        if not self.directory.is_dir():
            return set()
        held = set()
        for path in self.directory.glob("*.json"):
            head = path.name.split("-", 1)[0]
            if head.isdigit():
                held.add(int(head))
        return held

    def request_retry(self, ids: list[str] | None = None) -> list[str]:
        """Mark entries (all when ``ids`` is None) to be tried again; the ids marked."""
        marked = []
        for entry in self.entries():
            if ids is None or entry.id in ids or str(entry.seq) in ids:
                (self.directory / f"{entry.id}.retry").touch(ENTRY_MODE)
                marked.append(entry.id)
        return marked

    def retry_requested(self) -> list[Entry]:
        """Entries marked for a retry, looked for only when the directory changed (one stat
        a turn of the materialiser)."""
        try:
            mtime = self.directory.stat().st_mtime
        except OSError:
            return []
        if mtime == self._retry_mtime:
            return []
        self._retry_mtime = mtime
        marked = {p.stem for p in self.directory.glob("*.retry")}
        return [entry for entry in self.entries() if entry.id in marked]

    def forget_retry_scan(self) -> None:
        """Look for marked entries again at the next turn (a retry that must wait)."""
        self._retry_mtime = 0.0

    def release(self, entry: Entry) -> None:
        """The entry's file was made: the entry goes (JSON first: never a half entry listed)."""
        for suffix in (".json", ".dcm", ".retry"):
            with contextlib.suppress(FileNotFoundError):
                self.ops.unlink(self.directory / f"{entry.id}{suffix}")
        self.ops.fsync_directory(self.directory)

    def keep(self, entry: Entry, reason: str) -> None:
        """A retry that failed for good: the entry stays, with the new reason, unmarked."""
        about = {"seq": entry.seq, "reason": reason, "time": entry.time, "header": entry.header}
        self._write_durably(self.directory / f"{entry.id}.json", json.dumps(about, indent=1).encode())
        with contextlib.suppress(FileNotFoundError):
            self.ops.unlink(self.directory / f"{entry.id}.retry")
        self.ops.fsync_directory(self.directory)

    def _make_directory(self) -> None:
        if self.directory.is_dir():
            return
        missing = []
        probe = self.directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                self.ops.mkdir(path, 0o750)
            self.ops.fsync_directory(path.parent)

    def _write_durably(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.new")
        fd = self.ops.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, ENTRY_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[self.ops.write(fd, view) :]
            self.ops.fdatasync(fd)
        finally:
            self.ops.close(fd)
        self.ops.replace(temp, path)


def export(entries: list[Entry], target: Path) -> list[Path]:
    """Copies of the entries' objects (``<id>.dcm``, ready for storescu) and headers."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        about = {"seq": entry.seq, "reason": entry.reason, "time": entry.time, "header": entry.header}
        (target / f"{entry.id}.json").write_text(json.dumps(about, indent=1))
        if entry.data_path is not None:
            out = target / f"{entry.id}.dcm"
            out.write_bytes(entry.data_path.read_bytes())
            written.append(out)
    return written
