"""Storage Commitment: what "committed" means here, and the state the SCP shares.

An instance is committed when, at the moment its report is made (never from a
cached answer): the instance index has its row for the AE the request called
(the row is written once the object's file is durable under its final name, and
the check first waits until every object acknowledged so far is), the file is at
that name, it has the size received (``verify = "size"``) and, with ``checksum``,
the CRC-32 received (objects kept in their journal record) or is read in full
without error (larger ones), and its SOP class is the one the modality names.

Failure reasons (PS3.4 J.3.2.1.1): 0x0112 no such object instance (no row, or
its file is gone), 0x0119 class/instance conflict (held under another SOP class),
0x0122 SOP class not supported (not a class this AE stores, and not held),
0x0110 processing failure (unreadable, or not the size or checksum received).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dcmrecvd.conf.commitment_settings import CommitmentPeerConfig
from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.runtime import Runtime
from dcmrecvd.store.commitment_store import CommitmentStore
from dcmrecvd.store.instance_index import Instance
from dcmrecvd.wire.status import Status

#: Seconds a report waits for objects acknowledged before it to be under their names.
VISIBLE_WAIT_SECONDS = 60.0
_READ_CHUNK = 1 << 20

Failed = tuple[str, str, int]


@dataclass
class Commitment:
    """The SCP's shared state: the durable transactions, the index, the running settings."""

    store: CommitmentStore
    ack: AckJournal
    #: The Runtime associations start under now (peers and settings follow SIGHUP).
    runtime: Callable[[], Runtime]
    #: Wakes the reporter: a new transaction is due at once.
    wake: Callable[[], None] = lambda: None

    def peer(self, calling_aet: str) -> CommitmentPeerConfig | None:
        """The ``[[commitment.peer]]`` of a requesting AE (None: it may not ask)."""
        return next((p for p in self.runtime().config.commitment_peers if p.ae_title == calling_aet), None)

    def check(
        self, called_aet: str, items: Iterable[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[Failed]]:
        """Each requested (SOP class, SOP instance): committed, or failed with its reason."""
        self.ack.wait_visible(self.ack.journal.last_seq, VISIBLE_WAIT_SECONDS)
        runtime = self.runtime()
        verify = runtime.config.commitment.verify
        supported = {c.abstract_syntax for c in runtime.receiver_for(called_aet).profile.contexts}
        items = list(items)
        rows = self.ack.index.get_many(called_aet, (uid for _, uid in items))
        committed: list[tuple[str, str]] = []
        failed: list[Failed] = []
        for sop_class, sop_instance in items:
            reason = _reason(rows.get(sop_instance), sop_class, supported, verify)
            if reason:
                failed.append((sop_class, sop_instance, reason))
            else:
                committed.append((sop_class, sop_instance))
        return committed, failed


def _reason(row: Instance | None, sop_class: str, supported: set[str], verify: str) -> int:
    """0 when the instance is committed, else its Failure Reason."""
    if row is None:
        return Status.NO_SUCH_OBJECT_INSTANCE if sop_class in supported else Status.SOP_CLASS_NOT_SUPPORTED
    try:
        size = os.stat(row.path).st_size
    except FileNotFoundError:
        return Status.NO_SUCH_OBJECT_INSTANCE  # moved or deleted behind our back
    except OSError:
        return Status.PROCESSING_FAILURE
    if verify in ("size", "checksum") and size != row.size:
        return Status.PROCESSING_FAILURE
    if verify == "checksum" and not _content_matches(row):
        return Status.PROCESSING_FAILURE
    if row.sop_class_uid != sop_class:
        return Status.CLASS_INSTANCE_CONFLICT
    return 0


def _content_matches(row: Instance) -> bool:
    """The file reads back in full, with the CRC-32 received when one was kept."""
    crc = 0
    try:
        with open(row.path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return False
    return not row.digest.startswith("crc32:") or row.digest == f"crc32:{crc:08x}"
