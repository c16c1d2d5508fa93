"""Every crash state of recorded runs of the write path (see ``crash_model``), in-process.

A real ``Association`` over a socketpair stores objects through a ``Store`` whose
system calls are recorded; the model then lists each on-disk state a power cut
may leave after each call, and every one is checked.  Mutations of the write
path (no directory fsync, no file flush, the rename before the flush) must be
caught: that is what shows the checker can fail.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from crash_model import ORDERED, WEAK, Recorder, check, is_temp, materialize
from malformed import base_dataset, encode
from peers import associate_rq, p_data, pdv, store_command
from splits import whole
from test_association import CT, EXPLICIT, Peer, make_runtime, store

from dcmrecvd.serve.association import Association
from dcmrecvd.serve.receiving import Outcome
from dcmrecvd.store import storage
from dcmrecvd.store.storage import Store
from dcmrecvd.wire import pdu
from dcmrecvd.wire.status import Status

pytestmark = pytest.mark.inprocess


def dataset(uid: str, size: int, series_date: str = "") -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    if series_date:
        ds.SeriesDate = series_date
    ds.PixelData = bytes([len(uid) % 251]) * size
    return encode(ds)


def recorded_run(tmp_path: Path, model: str, pipelined: bool = False, **output: object) -> Recorder:
    """Several objects: one replaced (default names) or kept apart (unique names), an
    association's spare temp file, and an object aborted halfway; ``pipelined``: all sent
    at once under a negotiated window, so that their commits are grouped."""
    root = tmp_path / "out"
    root.mkdir()
    recorder = Recorder(root)
    rt = make_runtime(root, **output)
    store_ = Store(root, ops=recorder, ordered_journal=(model == ORDERED))
    rt = dataclasses.replace(rt, default=dataclasses.replace(rt.default, store=store_))

    class Acking(Association):
        """Marks the log the moment a success is answered."""

        def _answer(self, request: object, outcome: Outcome) -> None:
            if outcome.status == Status.SUCCESS and outcome.path:
                recorder.ack(recorder.rel(outcome.path))
            super()._answer(request, outcome)  # type: ignore[arg-type]

    peer = Peer(rt, Acking)
    peer.send(associate_rq(CT, EXPLICIT, window=8 if pipelined else 0), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    objects = [("1.2.3.1", 3000, "20240101"), ("1.2.3.2", 70000, "20240102"), ("1.2.3.1", 5000, "20240101")]
    objects += [("1.2.3.3", 300000, "")]
    streams = [
        store(dataset(u, n, d), u, fragment=16000, message_id=i + 1) for i, (u, n, d) in enumerate(objects)
    ]
    # The third is a second copy of the first: refused under output.duplicates = "reject".
    expected = [0, 0, 0x0111 if output.get("duplicates") == "reject" else 0, 0]
    if pipelined:
        peer.send(b"".join(streams), whole)
        assert [peer.status() for _ in streams] == expected
    for stream, status in [] if pipelined else zip(streams, expected, strict=True):
        peer.send(stream, whole)
        assert peer.status() == status
    half = dataset("1.2.3.4", 200000)
    command = p_data(pdv(store_command(CT, "1.2.3.4", 9), True, True))
    peer.send(command + p_data(pdv(half[:150000], False, False)), whole)
    peer.send(bytes((7, 0, 0, 0, 0, 4, 0, 0, 0, 0)), whole)  # abort mid-object
    peer.finish()
    return recorder


@pytest.mark.parametrize("model", [WEAK, ORDERED])
@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize(
    "output",
    [
        {},
        {"subdirectory": "series-date", "filenames": "unique"},
        {"duplicates": "keep"},
        {"duplicates": "keep-both"},
        {"duplicates": "reject"},
    ],
    ids=["replaced", "ssd-unique", "dup-keep", "dup-keep-both", "dup-reject"],
)
def test_every_crash_state_keeps_the_promise(
    tmp_path: Path, model: str, pipelined: bool, output: dict[str, object]
) -> None:
    recorder = recorded_run(tmp_path, model, pipelined, **output)
    kinds = {op.kind for op in recorder.ops}
    replaces = not output or output == {"duplicates": "keep"} or output == {"duplicates": "reject"}
    assert {"create", "write", "rename" if replaces else "link", "dirsync", "ack"} <= kinds
    assert ("datasync" if model == WEAK else "wait") in kinds
    assert sum(op.kind == "ack" for op in recorder.ops) == (3 if output.get("duplicates") == "reject" else 4)
    if output.get("duplicates") in ("keep", "reject"):  # the second copy never reached a final name
        assert sum(op.kind == "rename" and not op.target.endswith(".tmp") for op in recorder.ops) == 3
    checked, found = check(recorder.ops, model)
    assert checked > len(recorder.ops)
    assert found == []


def test_start_up_removes_what_a_crash_leaves(tmp_path: Path) -> None:
    """Materialize crash states and run start-up's cleanup: only final names remain."""
    from crash_model import Replay, annotate

    recorder = recorded_run(tmp_path, WEAK)
    replay = Replay(WEAK)
    samples = 0
    for op in annotate(recorder.ops):
        replay.step(op)
        if op.seq % 7:
            continue
        for state in list(replay.states())[:3]:
            root = tmp_path / f"state{samples}"
            root.mkdir()
            materialize(state, root)
            storage.remove_stale_temp_files(root)
            left = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
            assert not any(is_temp(p) for p in left)
            assert left == {p for p in state.files if not is_temp(p)}
            samples += 1
    assert samples > 10


@pytest.fixture
def mutate(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Break one step of the durability order."""

    def apply(which: str) -> None:
        if which == "no-directory-fsync":
            monkeypatch.setattr(Store, "sync_directory", lambda self, path: None)
            monkeypatch.setattr(Store, "sync_published", lambda self, path: None)
        elif which == "no-file-flush":
            monkeypatch.setattr(Store, "flush_data", lambda self, fd, directory: None)
        elif which == "rename-before-flush":
            real_flush = storage.PendingFile.flush

            def publish(self: storage.PendingFile, name: str, *, replace: bool) -> tuple[Path, bool]:  # noqa: ARG001
                """The final name first, the data flush after it: the bug to catch."""
                final = self.directory / name
                if self.direct is not None:  # staged bytes reach the file, unflushed
                    self.direct.finish()
                    self.direct = None
                self.store.ops.replace(self.temp_path, final)
                self.temp_path = final
                real_flush(self)
                return final, False

            monkeypatch.setattr(storage.PendingFile, "publish", publish)
            # Writer.stage flushes before publishing: that first flush must do nothing.
            monkeypatch.setattr(storage.PendingFile, "flush", lambda self: None)

    return apply


@pytest.mark.parametrize("model", [WEAK, ORDERED])
@pytest.mark.parametrize("which", ["no-directory-fsync", "no-file-flush", "rename-before-flush"])
def test_the_checker_catches_a_broken_write_path(tmp_path: Path, mutate, model: str, which: str) -> None:  # type: ignore[no-untyped-def]
    mutate(which)
    recorder = recorded_run(tmp_path, model)
    _checked, found = check(recorder.ops, model)
    assert found, f"{which} under {model}: no crash state broke the promise"
    # ...and for the reason the mutation implies: a lost name, or a name over unflushed data.
    expected = "is missing" if which == "no-directory-fsync" else "partial or foreign"
    assert any(expected in problem for problem in found), found[:3]


def test_the_recorder_sees_what_the_disk_holds(tmp_path: Path) -> None:
    """The log replayed with nothing lost is the directory as it is."""
    from crash_model import Replay, annotate

    recorder = recorded_run(tmp_path, WEAK)
    replay = Replay(WEAK)
    for op in annotate(recorder.ops):
        replay.step(op)
    root = recorder.root
    on_disk = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    replayed = {path: bytes(replay.inodes[inode].content) for path, inode in replay.names.items()}
    assert replayed == on_disk
    assert os.listdir(root)
