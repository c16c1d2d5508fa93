"""A second copy of an instance: found from durable facts, decided by ``output.duplicates``.

Why a registry of claims: two associations storing the same instance at once
must not both decide "no first copy", and an answer that says "kept, the first
copy stays" must never be sent for a first copy that is not durable yet.  So
each object whose identity can repeat *claims* that identity when it is
complete (``Claims.acquire``) and holds the claim until its own work is
durable or failed (the association's answer window releases it).  A second
claimant waits for that, then looks at what is durable: the file under the
name (``path`` identity) or the instance index's row (``instance``), after
the first copy's journal record has been made into its file and row.

Deadlock is ruled out by one rule: before waiting for another object's claim,
an association settles its own answer window (makes its objects durable,
answers them, releases their claims), so a waiter holds no claim.

Nothing here decides bytes: ``receiving`` asks ``decide`` what to do with its
object, and stores, discards or refuses it accordingly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.naming import NamingScheme
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.wire import part10
from dcmrecvd.wire.status import Failure, Status

#: How long an object waits for another association's copy of its instance to be decided.
CLAIM_WAIT_SECONDS = 60.0
#: Claims released into the journal between two purges of those whose files are made.
PURGE_EVERY = 1024
#: Names tried beside a first copy under keep-both.
MAX_BESIDE = 1000


@dataclass(frozen=True)
class DuplicatePolicy:
    """output.duplicates, output.duplicate_identity, output.duplicate_status of one AE."""

    policy: str = "overwrite"
    identity: str = "path"
    status: int = 0x0111


class Claim:
    """One object's hold on its identity until its own work is durable or failed."""

    __slots__ = ("ack", "done", "key", "owner", "seq")

    def __init__(self, key: str, owner: object) -> None:
        self.key = key
        self.owner = owner
        self.done = False
        #: The journal record that holds the object (0: none, or it failed): waiters wait for its file.
        self.seq = 0
        self.ack: AckJournal | None = None

    def visible(self) -> bool:
        return self.ack is None or self.ack.materialiser.visible_through >= self.seq


class Claims:
    """Identities in flight, process-wide: at most one object decides per identity at a time.

    One condition for all claims (waiting is rare: two copies of one instance at once), so
    that taking and releasing a claim, which every object with a repeatable name does, costs
    a dict operation under a lock and nothing more."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[str, Claim] = {}
        self._waiters = 0
        self._since_purge = 0

    def acquire(
        self, key: str, owner: object, settle: Callable[[], None], timeout: float = CLAIM_WAIT_SECONDS
    ) -> Claim:
        """Hold ``key`` (waiting for another object that holds it); Failure after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                held = self._held.get(key)
                if held is None:
                    claim = self._held[key] = Claim(key, owner)
                    return claim
                done = held.done
            if not done:
                settle()  # our own objects durable and answered first: we wait holding nothing
                if held.owner is owner and not held.done:
                    raise RuntimeError(f"claim on {key} not released by its own association")
                self._wait_done(held, deadline)
            if held.ack is not None and not held.visible():
                left = max(0.0, deadline - time.monotonic())
                if not held.ack.wait_visible(held.seq, left):
                    raise Failure(Status.OUT_OF_RESOURCES, "the first copy is not made yet")
            with self._cond:
                if self._held.get(key) is held:
                    del self._held[key]

    def _wait_done(self, held: Claim, deadline: float) -> None:
        with self._cond:
            self._waiters += 1
            try:
                while not held.done:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Failure(
                            Status.OUT_OF_RESOURCES, "another association is still storing this instance"
                        )
                    self._cond.wait(left)
            finally:
                self._waiters -= 1

    def release(self, claim: Claim, seq: int = 0, ack: AckJournal | None = None) -> None:
        """The object's work is durable (``seq``: in that journal record) or failed (0).

        A claim whose object lives in a journal record not yet made into its file stays,
        done: a copy arriving before the file exists still finds it (and waits for the file)."""
        claim.seq, claim.ack = seq, ack if seq else None
        with self._cond:
            claim.done = True
            if claim.ack is None:
                if self._held.get(claim.key) is claim:
                    del self._held[claim.key]
            else:
                self._since_purge += 1
                if self._since_purge >= PURGE_EVERY:
                    self._since_purge = 0
                    for key, held in list(self._held.items()):
                        if held.done and held.visible():
                            del self._held[key]
            if self._waiters:
                self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._held)


#: Every association of the process decides through these.
CLAIMS = Claims()


@dataclass(frozen=True)
class Placement:
    """Where a complete object goes: directory, names to try, whether a name is replaced;
    and, for a second copy stored anyway, its first copy and what became of it."""

    directory: PurePosixPath
    names: Callable[[], str]
    replace: bool
    first: Path | None = None
    label: str = ""


def identity_key(
    policy: DuplicatePolicy, index: InstanceIndex | None, called: str, uid: str, own: Path | None
) -> str | None:
    """What two copies of one instance share (None: this object can have no second copy:
    path identity with names that never repeat).  Instance identity needs the index; without
    the journal (it fell back to the per-file path) the path is the identity."""
    if policy.identity == "instance" and index is not None:
        return f"i\x1f{index.path}\x1f{called}\x1f{uid}"
    return None if own is None else f"p\x1f{own}"  # "p": by path


def first_copy(
    policy: DuplicatePolicy, index: InstanceIndex | None, called: str, uid: str, own: Path | None
) -> Path | None:
    """The durable first copy, if there is one (call holding the identity's claim)."""
    if policy.identity == "instance" and index is not None:
        row = index.get(called, uid)
        if row is not None and row.path_exists:
            return Path(row.path)
    return own if own is not None and os.path.isfile(own) else None


def placement(
    policy: DuplicatePolicy,
    first: Path | None,
    own: Path | None,
    root: Path,
    directory: PurePosixPath,
    names: Callable[[], str],
    scheme: NamingScheme,
) -> Placement | str:
    """Where the object goes; or, for a second copy that is not stored, what becomes of it
    ("discarded" or "rejected"; reject-if-different says "rejected" until the bytes are compared)."""
    named = (lambda: own.name) if own is not None else names
    if first is None:
        return Placement(directory, named, scheme.overwrites)
    if policy.policy == "overwrite":
        if first != own and first.parent.is_relative_to(root):  # instance: where the first lies
            where = PurePosixPath(*first.parent.relative_to(root).parts)
            return Placement(where, lambda: first.name, True, first, "replaced")
        return Placement(directory, named, True, first, "replaced")
    if policy.policy == "keep-both":
        name = own.name if own is not None else names()
        return Placement(directory, beside_names(name, scheme.file_extension), False, first, "beside")
    return "discarded" if policy.policy == "keep" else "rejected"


def beside(name: str, n: int, extension: str) -> str:
    """The name of the ``n``-th extra copy under keep-both: ``_n`` before the extension."""
    if extension and name.endswith(extension) and len(name) > len(extension):
        return f"{name[: -len(extension)]}_{n}{extension}"
    return f"{name}_{n}"


def beside_names(name: str, extension: str) -> Callable[[], str]:
    """Names for keep-both: the name itself, then ``_1``, ``_2``... (each call the next)."""
    tries = iter(range(MAX_BESIDE))

    def next_name() -> str:
        n = next(tries, MAX_BESIDE)
        return name if n == 0 else beside(name, n, extension)

    return next_name


def same_dataset(
    first: Path, data: bytes | bytearray | memoryview | None, file: Path | None, offset: int
) -> bool:
    """Do ``first`` (a stored Part 10 file) and the new object hold the same dataset bytes?

    The new one is ``data`` from ``offset`` (in memory) or the file ``file`` from ``offset``.
    The file meta is not compared: it names the sender, which may differ for the same object.
    """
    chunk = 1 << 20
    with open(first, "rb") as old:
        head = old.read(part10.META_READ)
        try:
            start = part10.read_meta(head).dataset_offset
        except part10.NotPart10:
            return False
        old_size = os.fstat(old.fileno()).st_size - start
        if data is not None:
            new_view = memoryview(data)[offset:]
            if len(new_view) != old_size:
                return False
            old.seek(start)
            pos = 0
            while pos < old_size:
                piece = old.read(chunk)
                if not piece or new_view[pos : pos + len(piece)] != piece:
                    return False
                pos += len(piece)
            return True
        assert file is not None
        with open(file, "rb") as new:
            if os.fstat(new.fileno()).st_size - offset != old_size:
                return False
            old.seek(start)
            new.seek(offset)
            while True:
                a, b = old.read(chunk), new.read(chunk)
                if a != b:
                    return False
                if not a:
                    return True
