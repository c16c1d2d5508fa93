"""Every crash state of recorded runs of the ack-journal path, each recovered, in-process.

As ``test_crash_states`` (the per-file path), with what the journal changes:
an object is acknowledged when its record is durable, before its file exists,
so a crash state is judged *after recovery*: the state is written out, the
journal replayed (``Journal.open`` + ``Materialiser.replay``) and start-up's
temp-file cleanup run, and then every object acknowledged before the crash
must be complete under its final name with an index row that points at it;
no final name may hold a partial or foreign file.  The journal's segments and
checkpoint are modelled like any file (a write into them with ``O_DSYNC`` is
its own data flush, and may be torn while it is in flight); the instance
index is taken to be what its last ``sync`` made durable.

The mutants each break one rule the journal rests on, and must be caught.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crash_model import ORDERED, WEAK, Op, Recorder, Replay, annotate, is_temp, materialize
from malformed import base_dataset, encode
from peers import associate_rq
from splits import whole
from test_association import CT, EXPLICIT, Peer, make_runtime, store

from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.association import Association
from dcmrecvd.serve.receiving import Outcome
from dcmrecvd.store import journal as journal_module
from dcmrecvd.store import journal_files, storage
from dcmrecvd.store.file_ops import FileOps
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal
from dcmrecvd.store.making import Maker
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.store.quarantine import Quarantine
from dcmrecvd.store.storage import Store
from dcmrecvd.wire import pdu
from dcmrecvd.wire.status import Status

pytestmark = pytest.mark.inprocess

SEGMENT = 64 * 1024
SEGMENTS = 2
#: Objects above this go to their own file (the large-object path) in these runs.
INLINE_MAX = 24 * 1024
CALLED = "ANY-SCP"


def dataset(uid: str, size: int) -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = bytes([len(uid) * size % 251]) * size
    return encode(ds)


class RecordedIndex(InstanceIndex):
    """The index, whose every ``sync`` is logged with the database as it then is."""

    def __init__(self, path: Path, recorder: Recorder) -> None:
        super().__init__(path)
        self.recorder = recorder

    def sync(self) -> None:
        super().sync()
        self.recorder.index_synced(self.path.read_bytes())


@dataclass
class Run:
    recorder: Recorder
    root: Path
    index: Path
    ordered: bool
    #: final name -> every complete content ever sent under it, in order.
    sent: dict[str, list[bytes]] = field(default_factory=dict)
    acked_keys: dict[str, str] = field(default_factory=dict)  # final name -> SOP Instance UID


def drain(materialiser: Materialiser, consume: Callable[[], None] = lambda: None) -> None:
    """One turn of the materialiser's thread, here and now (deterministic op order);
    ``consume``: a consumer takes files away between the files made and the checkpoint."""
    with materialiser._cond:
        batch, materialiser._queue = materialiser._queue, []
    materialiser._apply_and_account(batch)
    consume()
    materialiser.checkpoint()


#: The final name made unmakeable (a directory with a file in it is in its way) before its
#: object arrives: the record is quarantined, and the quarantine must keep it across crashes.
BLOCKED = "CT.1.2.3.7"
#: The object a consumer deletes right after its file is made: it must never come back.
CONSUMED_UID = "1.2.3.2"


def journal_run(tmp_path: Path, model: str, pipelined: bool = False, **output: object) -> Run:
    """Objects small (in their record) and large (their own file), one sent twice (its
    default name replaced), the materialiser turning between them so that segments fill,
    are checkpointed and recycled; one object aborted halfway."""
    root = tmp_path / "out"
    root.mkdir()
    recorder = Recorder(root)
    ordered = model == ORDERED
    journal = Journal(root / ".dcmrecvd" / "journal", segment_size=SEGMENT, segments=SEGMENTS, ops=recorder)
    assert journal.open() == []
    index = RecordedIndex(tmp_path / "index.sqlite", recorder)
    materialiser = Materialiser(journal, index, ops=recorder, ordered_journal=ordered)
    journal.on_written = materialiser.written
    ack = AckJournal(journal, materialiser, index, INLINE_MAX)
    rt = make_runtime(root, **output)
    store_ = Store(root, ops=recorder, ordered_journal=ordered)
    import dataclasses

    rt = dataclasses.replace(rt, default=dataclasses.replace(rt.default, store=store_))
    run = Run(recorder, root, tmp_path / "index.sqlite", ordered)

    class Acking(Association):
        """Journaled; marks the log the moment a success is answered, with what it promises."""

        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, ack=ack, **kw)  # type: ignore[arg-type]

        def _answer(self, request: object, outcome: Outcome) -> None:
            if outcome.status == Status.SUCCESS and outcome.path:
                name = recorder.rel(outcome.path)
                record = outcome.record
                # A second copy discarded (output.duplicates = "keep") promises its first copy.
                assert record is not None or outcome.duplicate, "not acknowledged through the journal"
                data = bytes(record.data) if record and record.data else Path(outcome.path).read_bytes()
                recorder.ack(name, data)
                run.acked_keys[name] = request.call.command.affected_sop_instance_uid  # type: ignore[attr-defined]
            super()._answer(request, outcome)  # type: ignore[arg-type]

    peer = Peer(rt, Acking)
    peer.send(associate_rq(CT, EXPLICIT, window=8 if pipelined else 0), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    groups = [
        [("1.2.3.1", 3000), ("1.2.3.2", 9000)],
        [("1.2.3.1", 5000), ("1.2.3.3", 40000), ("1.2.3.4", 12000)],  # 1.2.3.1 again; .3 is large
        [("1.2.3.5", 20000), ("1.2.3.6", 20000), ("1.2.3.7", 1000)],  # into the second segment
        [("1.2.3.9", 22000), ("1.2.3.10", 22000), ("1.2.3.11", 22000)],  # the first one, recycled
    ]
    message_id = 0
    seen: set[str] = set()
    for number, group in enumerate(groups):
        if number == 2 and output.get("duplicates") != "keep-both":  # (keep-both goes beside it)
            block(recorder, root / BLOCKED)
        streams = []
        expected = []
        for uid, size in group:
            data = dataset(uid, size)
            message_id += 1
            streams.append(store(data, uid, fragment=16000, message_id=message_id))
            expected.append(0x0111 if output.get("duplicates") == "reject" and uid in seen else 0)
            seen.add(uid)
        if pipelined:
            peer.send(b"".join(streams), whole)
            assert [peer.status() for _ in streams] == expected
        else:
            for stream, status in zip(streams, expected, strict=True):
                peer.send(stream, whole)
                assert peer.status() == status
        if number == 0:
            consumed = next(n for n, uid in run.acked_keys.items() if uid == CONSUMED_UID)
            drain(materialiser, lambda name=consumed: recorder.consume(name))  # type: ignore[misc]
        else:
            drain(materialiser)
    peer.send(store(dataset("1.2.3.8", 30000), "1.2.3.8", fragment=16000)[:20000], whole)
    peer.send(bytes((7, 0, 0, 0, 0, 4, 0, 0, 0, 0)), whole)  # abort mid-object
    peer.finish()
    drain(materialiser)
    journal.close()
    index.close()
    for op in recorder.ops:  # what may legitimately be under each final name
        if op.kind == "ack":
            run.sent.setdefault(op.path, []).append(op.data)
    return run


def block(recorder: Recorder, final: Path) -> None:
    """A directory, with a file in it, where an object's file will want to go."""
    import os

    recorder.mkdir(final, 0o755)
    recorder.close(recorder.open(final / "in-the-way", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    recorder.fsync_directory(final)
    recorder.fsync_directory(final.parent)


class NoSync(FileOps):
    """Recovery in the checker: the real calls without the flushes (nothing here needs them)."""

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_directory(self, path: Path) -> None:
        pass

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> bool:  # noqa: ARG002
        return True

    def syncfs(self, path: Path) -> None:
        pass


def recover(run: Run) -> None:
    """Start-up on the state now in ``run.root``: replay, then the temp-file cleanup."""
    journal = Journal(
        run.root / ".dcmrecvd" / "journal", segment_size=SEGMENT, segments=SEGMENTS, ops=NoSync()
    )
    records = journal.open()
    index = InstanceIndex(run.index)
    try:
        Materialiser(journal, index, ops=NoSync(), ordered_journal=run.ordered).replay(records)
    finally:
        journal.close()
        index.close()
    storage.remove_stale_temp_files(run.root)


def judge(run: Run, acked: dict[str, set[bytes]], gone: frozenset[str] = frozenset()) -> list[str]:
    """What is wrong after recovery (empty: the promise holds)."""
    wrong = []
    files = {
        str(p.relative_to(run.root)): p.read_bytes()
        for p in run.root.rglob("*")
        if p.is_file()
        and ".dcmrecvd" not in p.relative_to(run.root).parts
        and BLOCKED not in p.relative_to(run.root).parts[:-1]
    }
    quarantined = {
        e.header.get("name"): e.data_path.read_bytes()
        for e in Quarantine(run.root / ".dcmrecvd" / "quarantine").entries()
        if e.data_path is not None
    }
    rows = {}
    if run.index.exists():
        with sqlite3.connect(run.index) as db:
            rows = {uid: path for uid, path in db.execute("SELECT sop_instance_uid, path FROM instances")}
    for name, allowed in acked.items():
        history = run.sent[name]
        # The acknowledged bytes, or those of the same object sent again later.
        later = {data for data in history[max(history.index(d) for d in allowed) :]}
        got = files.get(name)
        if got is None and quarantined.get(name) in allowed:
            continue  # set aside visibly, with the acknowledged bytes (no row: not a file)
        if got is None:
            wrong.append(f"acknowledged {name} is missing")
        elif got not in allowed | later:
            wrong.append(f"acknowledged {name} holds {len(got)} bytes, not the object")
        # The instance's row points at an acknowledged copy of it: this one, or (keep-both) a
        # copy acknowledged under another name, one row per instance.
        copies = {str(run.root / n) for n, uid in run.acked_keys.items() if uid == run.acked_keys[name]}
        if rows.get(run.acked_keys[name]) not in copies or (
            len(copies) == 1 and rows.get(run.acked_keys[name]) != str(run.root / name)
        ):
            wrong.append(f"acknowledged {name} has no index row pointing at it")
    for name in gone:
        if name in files:
            wrong.append(f"{name}, which a consumer deleted after it was made, came back")
    for path, data in files.items():
        if is_temp(path):
            wrong.append(f"start-up left {path}")
        elif data not in run.sent.get(path, []) and path != f"{BLOCKED}/in-the-way":
            wrong.append(f"{path} holds a partial or foreign file ({len(data)} bytes)")
    return wrong


def states(
    run: Run, model: str
) -> Iterator[tuple[Op, dict[str, bytes], bytes, dict[str, set[bytes]], frozenset[str]]]:
    """Distinct crash states (files and index), each with the acknowledgements before it."""
    replay = Replay(model)
    seen: set[bytes] = set()
    for op in annotate(run.recorder.ops):
        replay.step(op)
        for state in replay.states():
            digest = hashlib.sha256()
            for path in sorted(state.files):
                digest.update(path.encode() + b"\0" + hashlib.sha256(state.files[path]).digest())
            digest.update(hashlib.sha256(state.index).digest())
            key = digest.digest() + repr(sorted(state.acked)).encode() + repr(sorted(state.gone)).encode()
            if key in seen:
                continue
            seen.add(key)
            yield op, state.files, state.index, {k: set(v) for k, v in state.acked.items()}, state.gone


def check_journal(
    run: Run, model: str, first_only: bool = False, until: Callable[[str], bool] | None = None
) -> tuple[int, list[str]]:
    """Every distinct crash state, recovered and judged: (states checked, violations);
    ``first_only``: stop at the first state that breaks the promise; ``until``: at the first
    violation it accepts."""
    live = run.root.with_name("live")
    run.root.rename(live)  # records name their absolute root: states are rebuilt in its place
    live_index = run.index.with_name("live-index.sqlite")
    if run.index.exists():
        run.index.rename(live_index)
    checked = 0
    found: list[str] = []
    for op, files, index, acked, gone in states(run, model):
        checked += 1
        run.root.mkdir()
        from crash_model import CrashState

        materialize(CrashState(files, acked), run.root)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{run.index}{suffix}").unlink(missing_ok=True)
        if index:
            run.index.write_bytes(index)
        try:
            recover(run)
            problems = judge(run, acked, gone)
        except Exception as exc:  # a recovery that cannot cope is a broken promise too
            problems = [f"recovery failed: {type(exc).__name__}: {exc}"]
        found.extend(f"after op {op.seq} ({op.kind} {op.path or op.inode}): {p}" for p in problems)
        shutil.rmtree(run.root)
        if (found and first_only) or (until is not None and any(until(p) for p in found)):
            break
    return checked, found


@pytest.mark.parametrize("model", [WEAK, ORDERED])
@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize(
    "output",
    [
        {},
        {"duplicates": "keep"},
        {"duplicates": "reject", "duplicate_identity": "instance"},
        {"duplicates": "keep-both"},
    ],
    ids=["replaced", "dup-keep", "dup-reject-instance", "dup-keep-both"],
)
def test_every_crash_state_recovers_every_acknowledged_object(
    tmp_path: Path, model: str, pipelined: bool, output: dict[str, object]
) -> None:
    run = journal_run(tmp_path, model, pipelined, **output)
    kinds = [op.kind for op in run.recorder.ops]
    assert kinds.count("ack") == (10 if output.get("duplicates") == "reject" else 11)
    assert {"dsync", "syncfs", "indexsync", "rename", "dirsync"} <= set(kinds)
    heads = [
        op.inode
        for op in run.recorder.ops
        if op.kind == "write" and op.offset == 0 and op.data.startswith(journal_files.SEGMENT_MAGIC)
    ]
    assert len(set(heads)) == SEGMENTS and len(heads) > SEGMENTS, "no segment was ever recycled"
    checked, found = check_journal(run, model)
    assert checked >= 50  # distinct states (files and index), each recovered
    assert found == [], "\n".join(found[:10])


@pytest.fixture
def mutate(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Break one rule of the journal path."""

    def apply(which: str) -> None:
        if which == "ack-before-journal-flush":
            # The journal opened without O_DSYNC and never flushed: the ack outruns the disk.
            import os

            def no_dsync(ops: FileOps, path: Path) -> int:
                return ops.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT, 0o640)

            monkeypatch.setattr(journal_module, "open_direct", no_dsync)
            monkeypatch.setattr(journal_files, "open_direct", no_dsync)
        elif which == "checksum-not-checked":
            monkeypatch.setattr(journal_files, "checks_out", lambda raw, body, crc: True)
        elif which == "name-before-data-flush":
            monkeypatch.setattr(Store, "flush_data", lambda self, fd, directory: None)
            monkeypatch.setattr(Maker, "_flush", lambda self, roots: None)
        elif which == "recycled-before-directory-fsync":
            monkeypatch.setattr(Store, "sync_published", lambda self, path: None)
        elif which == "progress-not-said":
            # Files made, but the journal never told how far: recovery makes them all again.
            real = Journal.checkpoint
            monkeypatch.setattr(Journal, "checkpoint", lambda self, done, made=0: real(self, done, done))
        elif which == "quarantine-entry-before-its-object":
            # The entry's JSON may land before its object's bytes are durable under their name.
            real_fsync = FileOps.fsync_directory

            def put(self: Quarantine, seq: int, header: dict, data: bytes, reason: str) -> str:  # type: ignore[type-arg]
                self.ops.fsync_directory = lambda path: None  # type: ignore[method-assign]
                try:
                    return real_put(self, seq, header, data, reason)
                finally:
                    del self.ops.fsync_directory
                    real_fsync(self.ops, self.directory)

            real_put = Quarantine.put
            monkeypatch.setattr(Quarantine, "put", put)

    return apply


@pytest.mark.parametrize("model", [WEAK, ORDERED])
@pytest.mark.parametrize(
    "which",
    [
        "ack-before-journal-flush",
        "checksum-not-checked",
        "name-before-data-flush",
        "recycled-before-directory-fsync",
        "progress-not-said",
        "quarantine-entry-before-its-object",
    ],
)
def test_the_checker_catches_a_broken_journal_path(tmp_path: Path, mutate, model: str, which: str) -> None:  # type: ignore[no-untyped-def]
    mutate(which)
    run = journal_run(tmp_path, model)
    _checked, found = check_journal(run, model, first_only=True)
    assert found, f"{which} under {model}: no crash state broke the promise"
    # ...and for the reason the mutation implies.
    expected = {
        "ack-before-journal-flush": ("is missing",),
        "checksum-not-checked": ("partial or foreign", "recovery failed"),  # a torn record taken
        "name-before-data-flush": ("partial or foreign",),
        "recycled-before-directory-fsync": ("is missing",),
        "progress-not-said": ("came back",),
        "quarantine-entry-before-its-object": ("CT.1.2.3.7 is missing",),
    }[which]
    assert any(reason in problem for problem in found for reason in expected), found[:3]
    if which == "name-before-data-flush":  # caught on a file the materialiser made, too
        (tmp_path / "again").mkdir()
        inline = lambda problem: "partial or foreign" in problem and "CT.1.2.3.3" not in problem  # noqa: E731
        _checked, found = check_journal(journal_run(tmp_path / "again", model), model, until=inline)
        assert any(inline(problem) for problem in found), found[:3]
