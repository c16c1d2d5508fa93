"""Crash states of the write path (ALICE-style, in-process): record, then enumerate.

``Recorder`` is a ``FileOps`` that performs every call for real in a temporary
directory and logs it in a logical form (inode numbers, paths, bytes).  Given
that log, a persistence model says which on-disk states a power cut after any
prefix of the calls may leave, and ``check`` looks at every one of them.

Two models, one per durability mode dcmrecvd picks (``storage.Store.durability``):

* ``WEAK`` (ext4 without a journal, and anything unknown: the ``fdatasync``
  mode).  Nothing is assumed that POSIX and the ext4 code do not promise: data
  written and not fdatasynced may be lost or torn (here: absent, half written,
  or complete); a directory entry (create, rename, link, unlink, mkdir) not
  followed by an fsync of its directory may be lost, independently of any
  other, so a rename may survive while the file's unsynced data does not.
  This is the model of Pillai et al., "All File Systems Are Not Created
  Equal" (OSDI 2014), for a filesystem without ordering guarantees.

* ``ORDERED`` (XFS, ext3/ext4 with a journal: the ``journal-ordered`` mode).
  Metadata operations reach the disk through one journal in the order they
  were made, so a crash leaves a *prefix* of them (any prefix since the last
  commit; the journal may commit on its own at any time).  An fsync of a file
  or a directory commits the journal with a cache flush first (REQ_PREFLUSH),
  so data that was written and waited for (``sync_file_range`` WAIT_AFTER, or
  fdatasync) before that commit is durable after it.  Data not waited for may
  be lost or torn even where its metadata committed: the model does not lean
  on data=ordered.  Sources: ext4's and XFS's journalling documentation
  (Documentation/filesystems/ext4 "data=ordered", xfs-delayed-logging-design)
  and the kernel's blk-mq flush machinery (Documentation/block/writeback_cache_control).

In every state: each object acknowledged before the crash point is under its
final name with exactly its bytes; no final name holds a partial or foreign
file (only a complete object that was committed under it); anything else is a
hidden temp file, which start-up removes.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcmrecvd.store import file_ops
from dcmrecvd.store.file_ops import Buffer, FileOps
from dcmrecvd.store.storage import TEMP_PREFIX, TEMP_SUFFIX

WEAK = "weak"
ORDERED = "ordered"
#: States tried per crash point at most (subsets of pending entries x data variants).
MAX_VARIANTS = 256


@dataclass
class Op:
    kind: str  # create write datasync dsync syncfs wait rename link unlink mkdir dirsync indexsync ack
    path: str = ""  # relative to the root
    target: str = ""  # rename/link target
    inode: int = 0
    offset: int = 0
    data: bytes = b""
    seq: int = 0  # its place in the log (see ``annotate``)


class Recorder(FileOps):
    """Does every call for real and logs what it means for the disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ops: list[Op] = []
        self._fds: dict[int, int] = {}  # fd -> inode
        self._dsync: set[int] = set()  # fds opened O_DSYNC
        self._pos: dict[int, int] = {}  # fd -> file offset (write/writev)
        self._inodes = itertools.count(1)
        self._by_path: dict[str, int] = {}

    def rel(self, path: Path | str) -> str:
        return os.path.relpath(path, self.root)

    def ack(self, name: str, data: bytes = b"") -> None:
        """The test's mark: a success for the file now under ``name`` is being sent (with
        ``data``: for an object whose file is made after the ack, from the ack journal)."""
        self.ops.append(Op("ack", path=name, data=data))

    def consume(self, name: str) -> None:
        """A consumer takes the file under ``name`` away (and makes that durable): from now
        on the name must stay free after any recovery; it is no longer an acknowledged file."""
        path = self.root / name
        self.ops.append(Op("consumed", path=name))  # no longer promised from here on...
        super().unlink(path)
        self._by_path.pop(name, None)
        self.ops.append(Op("unlink", path=name))
        super().fsync_directory(path.parent)
        self.ops.append(Op("dirsync", path=self.rel(path.parent)))
        self.ops.append(Op("gone", path=name))  # ...and, its deletion durable, never again

    def index_synced(self, snapshot: bytes) -> None:
        """The instance index is durable as ``snapshot`` (SQLite's own durability is trusted)."""
        self.ops.append(Op("indexsync", data=snapshot))

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        rel = self.rel(path)
        if flags & os.O_CREAT:
            inode = next(self._inodes)
            self._by_path[rel] = inode
            self.ops.append(Op("create", path=rel, inode=inode))
        self._fds[fd] = self._by_path[rel]
        self._pos[fd] = 0
        if flags & os.O_DSYNC:
            self._dsync.add(fd)
        else:
            self._dsync.discard(fd)
        return fd

    def _wrote(self, fd: int, data: Buffer, offset: int) -> None:
        self.ops.append(Op("write", inode=self._fds[fd], offset=offset, data=bytes(data)))

    def writev(self, fd: int, chunks: Sequence[Buffer]) -> int:
        n = super().writev(fd, chunks)
        self._wrote(fd, b"".join(bytes(c) for c in chunks)[:n], self._pos[fd])
        self._pos[fd] += n
        return n

    def write(self, fd: int, data: Buffer) -> int:
        n = super().write(fd, data)
        self._wrote(fd, bytes(data)[:n], self._pos[fd])
        self._pos[fd] += n
        return n

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        self._wrote(fd, bytes(data)[:n], offset)
        return n

    def journal_write(self, fd: int, data: Buffer, offset: int) -> int:
        n = super().journal_write(fd, data, offset)
        self._wrote(fd, bytes(data)[:n], offset)
        if fd in self._dsync:  # O_DSYNC into a file whose blocks exist: this data only, durable
            self.ops.append(Op("dsync", inode=self._fds[fd]))
        return n

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self.ops.append(Op("datasync", inode=self._fds[fd]))

    def syncfs(self, path: Path) -> None:
        super().syncfs(path)
        self.ops.append(Op("syncfs"))

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> bool:
        done = super().sync_file_range(fd, offset, length, flags)
        if done and flags & file_ops.SYNC_FILE_RANGE_WAIT_AFTER and offset == 0 and length == 0:
            self.ops.append(Op("wait", inode=self._fds[fd]))
        return done

    def close(self, fd: int) -> None:
        super().close(fd)
        self._fds.pop(fd, None)

    def replace(self, source: Path, target: Path) -> None:
        super().replace(source, target)
        src, dst = self.rel(source), self.rel(target)
        self._by_path[dst] = self._by_path.pop(src)
        self.ops.append(Op("rename", path=src, target=dst))

    def link(self, source: Path, target: Path) -> None:
        super().link(source, target)
        src, dst = self.rel(source), self.rel(target)
        self._by_path[dst] = self._by_path[src]
        self.ops.append(Op("link", path=src, target=dst))

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        rel = self.rel(path)
        self._by_path.pop(rel, None)
        self.ops.append(Op("unlink", path=rel))

    def mkdir(self, path: Path, mode: int) -> None:
        super().mkdir(path, mode)
        self.ops.append(Op("mkdir", path=self.rel(path)))

    def fsync_directory(self, path: Path) -> None:
        super().fsync_directory(path)
        self.ops.append(Op("dirsync", path=self.rel(path)))


def _parent(rel: str) -> str:
    return os.path.dirname(rel) or "."


@dataclass
class _Inode:
    content: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    #: Writes since ``durable`` (offset, bytes), lost or torn in a crash.
    pending_writes: list[tuple[int, bytes]] = field(default_factory=list)
    #: ORDERED: (op number, content) when it was written and waited for; durable
    #: once a journal commit follows.
    waited: list[tuple[int, bytes]] = field(default_factory=list)


def _apply(content: bytearray, offset: int, data: bytes) -> None:
    if len(content) < offset:
        content.extend(bytes(offset - len(content)))
    content[offset : offset + len(data)] = data


@dataclass
class CrashState:
    """What is on disk after the crash: path -> bytes (directories implied)."""

    files: dict[str, bytes]
    #: final name -> what it may hold: the bytes acknowledged before the crash, or those
    #: of a later object committed under the same name (a replaced duplicate).
    acked: dict[str, set[bytes]]
    #: The instance index as last made durable (b"": never).
    index: bytes = b""
    #: Names a consumer took away after their files were made: they must stay away.
    gone: frozenset[str] = frozenset()


class Replay:
    """Walks the op log, keeping what is durable for sure and what is still pending."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.inodes: dict[int, _Inode] = {}
        self.names: dict[str, int] = {}  # the live namespace
        self.durable_names: dict[str, int] = {}
        self.durable_dirs: set[str] = {"."}
        self.pending: list[Op] = []  # namespace ops not yet durable, in order
        self.acked: dict[str, set[bytes]] = {}
        self.gone: set[str] = set()
        #: name -> every complete content committed under it so far (allowed in a crash state).
        self.committed: dict[str, set[bytes]] = {}
        self.index = b""

    def step(self, op: Op) -> None:
        kind = op.kind
        if kind == "create":
            self.inodes[op.inode] = _Inode()
            self.names[op.path] = op.inode
            self.pending.append(op)
        elif kind == "write":
            node = self.inodes[op.inode]
            _apply(node.content, op.offset, op.data)
            node.pending_writes.append((op.offset, op.data))
        elif kind == "datasync":
            node = self.inodes[op.inode]
            node.durable, node.pending_writes = bytes(node.content), []
            if self.model == ORDERED:  # an fsync commits the journal
                self._commit()
        elif kind == "dsync":  # no metadata to commit: the data alone, durable
            node = self.inodes[op.inode]
            node.durable, node.pending_writes = bytes(node.content), []
        elif kind == "syncfs":  # the whole filesystem: every entry and every byte so far
            for pending in self.pending:
                self._land(self.durable_names, self.durable_dirs, pending)
            self.pending = []
            for node in self.inodes.values():
                node.durable, node.pending_writes, node.waited = bytes(node.content), [], []
        elif kind == "indexsync":
            self.index = op.data
        elif kind == "wait":
            self.inodes[op.inode].waited.append((op.seq, bytes(self.inodes[op.inode].content)))
        elif kind in ("rename", "link"):
            if kind == "rename":
                del self.names[op.path]
            self.names[op.target] = op.inode
            if not is_temp(op.target):
                content = bytes(self.inodes[op.inode].content)
                self.committed.setdefault(op.target, set()).add(content)
                if op.target in self.acked:
                    self.acked[op.target].add(content)
            self.pending.append(op)
        elif kind in ("unlink", "mkdir"):
            self.names.pop(op.path, None)
            self.pending.append(op)
        elif kind == "dirsync":
            if self.model == ORDERED:
                self._commit()
            else:
                self._dir_durable(op.path)
        elif kind == "ack":
            self.acked[op.path] = {op.data or bytes(self.inodes[self.names[op.path]].content)}
            self.gone.discard(op.path)
        elif kind == "consumed":
            self.acked.pop(op.path, None)
        elif kind == "gone":
            self.gone.add(op.path)

    def _commit(self) -> None:
        """ORDERED: a journal commit (after a cache flush) makes every metadata op so far
        and all data waited for so far durable."""
        for op in self.pending:
            self._land(self.durable_names, self.durable_dirs, op)
        self.pending = []
        for node in self.inodes.values():
            if node.waited:
                node.durable, node.waited, node.pending_writes = node.waited[-1][1], [], []

    def _dir_durable(self, directory: str) -> None:
        """WEAK: an fsync of ``directory`` makes its own entries, as they are now, durable."""
        keep: list[Op] = []
        for op in self.pending:
            where = _parent(op.target if op.kind in ("rename", "link") else op.path)
            if where == directory:
                self._land(self.durable_names, self.durable_dirs, op)
            else:
                keep.append(op)
        self.pending = keep

    @staticmethod
    def _land(names: dict[str, int], dirs: set[str], op: Op) -> None:
        if op.kind == "create":
            names[op.path] = op.inode
        elif op.kind == "rename":
            names.pop(op.path, None)
            names[op.target] = op.inode  # may land before the create of its source
        elif op.kind == "link":
            names[op.target] = op.inode
        elif op.kind == "unlink":
            names.pop(op.path, None)
        elif op.kind == "mkdir":
            dirs.add(op.path)

    def states(self) -> Iterator[CrashState]:
        """Every on-disk state the model allows for a crash right now."""
        pending = self.pending
        if self.model == ORDERED:
            choices: Iterator[list[Op]] = (pending[:k] for k in range(len(pending) + 1))
        else:
            choices = (
                [op for op, keep in zip(pending, mask, strict=True) if keep] for mask in _masks(len(pending))
            )
        for count, applied in enumerate(choices):
            if count >= MAX_VARIANTS:
                break
            names, dirs = dict(self.durable_names), set(self.durable_dirs)
            for op in applied:
                self._land(names, dirs, op)
            # A background journal commit that carried ``applied`` flushed the cache first.
            committed_at = applied[-1].seq if applied and self.model == ORDERED else -1
            # An entry in a directory whose own entry did not survive is gone with it.
            names = {p: i for p, i in names.items() if _reachable(p, dirs)}
            for data in self._data_variants(set(names.values()), committed_at):
                files = {path: data[inode] for path, inode in names.items()}
                yield CrashState(files, self.acked, self.index, frozenset(self.gone))

    def _data_variants(self, inodes: set[int], committed_at: int) -> Iterator[dict[int, bytes]]:
        """Un-synced data: lost, torn (half of what is pending), or all there."""
        base: dict[int, bytes] = {}
        unsure: list[int] = []
        for i in sorted(inodes):
            node = self.inodes[i]
            waited = [content for seq, content in node.waited if seq < committed_at]
            base[i] = waited[-1] if waited else node.durable
            if node.pending_writes and base[i] != bytes(node.content):
                unsure.append(i)
        if not unsure:
            yield base
            return
        for pick in itertools.product(range(3), repeat=min(len(unsure), 3)):
            out = dict(base)
            for index, inode in enumerate(unsure):
                node = self.inodes[inode]
                how = pick[index] if index < len(pick) else 2
                if how == 2:  # everything reached the disk
                    out[inode] = bytes(node.content)
                elif how == 1:  # torn: the first half of the pending bytes
                    content = bytearray(base[inode])
                    for offset, data in node.pending_writes:
                        _apply(content, offset, data[: max(len(data) // 2, 1)])
                        break
                    out[inode] = bytes(content)
            yield out


def _masks(n: int) -> Iterator[tuple[bool, ...]]:
    """Which of ``n`` pending entries survive: every subset while there are few (2**8), else
    none, all, each one alone, all but each one, and a seeded sample of the rest."""
    if n <= 8:
        yield from itertools.product((False, True), repeat=n)
        return
    yield (False,) * n
    yield (True,) * n
    for i in range(n):
        yield tuple(j == i for j in range(n))
        yield tuple(j != i for j in range(n))
    rng = random.Random(n)
    for _ in range(MAX_VARIANTS - 2 - 2 * n):
        yield tuple(rng.random() < 0.5 for _ in range(n))


def _reachable(path: str, dirs: set[str]) -> bool:
    parent = _parent(path)
    while parent != ".":
        if parent not in dirs:
            return False
        parent = _parent(parent)
    return True


def annotate(ops: list[Op]) -> list[Op]:
    """Number the ops and give rename/link the inode they move (so that one can land alone)."""
    names: dict[str, int] = {}
    for seq, op in enumerate(ops):
        op.seq = seq
        if op.kind == "create":
            names[op.path] = op.inode
        elif op.kind in ("rename", "link"):
            op.inode = names[op.path]
            names[op.target] = op.inode
            if op.kind == "rename":
                del names[op.path]
        elif op.kind == "unlink":
            names.pop(op.path, None)
    return ops


def is_temp(path: str) -> bool:
    name = path.split("/")[-1]
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def violations(state: CrashState, committed: dict[str, set[bytes]]) -> list[str]:
    """What is wrong with one crash state (empty: the promise holds in it)."""
    wrong = []
    for name, allowed in state.acked.items():
        got = state.files.get(name)
        if got is None:
            wrong.append(f"acknowledged {name} is missing")
        elif got not in allowed:
            sizes = sorted(len(a) for a in allowed)
            wrong.append(f"acknowledged {name} holds {len(got)} bytes, not one of {sizes}")
    for path, data in state.files.items():
        if is_temp(path) or path in state.acked:
            continue
        if data not in committed.get(path, set()):
            wrong.append(f"{path} holds a partial or foreign file ({len(data)} bytes)")
    return wrong


def check(ops: list[Op], model: str) -> tuple[int, list[str]]:
    """Every crash state of ``ops`` under ``model``: (states checked, violations found)."""
    replay = Replay(model)
    checked = 0
    found: list[str] = []
    for op in annotate(ops):
        replay.step(op)
        for state in replay.states():
            checked += 1
            for problem in violations(state, replay.committed):
                found.append(f"after op {op.seq} ({op.kind} {op.path or op.inode}): {problem}")
    return checked, found


def materialize(state: CrashState, root: Path) -> None:
    """Write one crash state to ``root`` (to run start-up's cleanup on it)."""
    for path, data in state.files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
