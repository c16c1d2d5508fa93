"""The ack journal in use: real senders, a real daemon, kill -9, faults in the journal.

In-process parts (an association over a socketpair with an injected fault) come first;
then daemons with DCMTK's storescu and raw senders.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import DaemonFactory, need, per_file_config, run, wait_for
from peers import associate_rq, dataset_bytes
from splits import whole
from test_association import CT, EXPLICIT, Peer, make_runtime, store
from test_kill_phases import Sender, check_survivors, objects, stopped

from dcmrecvd.serve.ack_journal import AckJournal
from dcmrecvd.serve.association import Association
from dcmrecvd.store.file_ops import FileOps
from dcmrecvd.store.instance_index import InstanceIndex
from dcmrecvd.store.journal import Journal
from dcmrecvd.store.materialiser import Materialiser
from dcmrecvd.wire import pdu


class FailingJournalWrite(FileOps):
    def __init__(self) -> None:
        self.fail = False

    def journal_write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.fail:
            self.fail = False
            raise OSError(errno.EIO, "injected journal write error")
        return super().journal_write(fd, data, offset)


def journaled_peer(tmp_path: Path, ops: FileOps, **journal: object) -> tuple[Peer, AckJournal, Path]:
    out = tmp_path / "out"
    out.mkdir()
    j = Journal(tmp_path / "journal", segment_size=64 * 1024, ops=ops, **journal)  # type: ignore[arg-type]
    j.open()
    index = InstanceIndex(tmp_path / "index.sqlite")
    materialiser = Materialiser(j, index)
    j.on_written = materialiser.written
    ack = AckJournal(j, materialiser, index, 16 * 1024)
    materialiser.start()
    rt = make_runtime(out)

    class Journaled(Association):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, ack=ack, **kw)  # type: ignore[arg-type]

    peer = Peer(dataclasses.replace(rt), Journaled)
    peer.send(associate_rq(CT, EXPLICIT), whole)
    assert peer.read_pdu()[0] == pdu.A_ASSOCIATE_AC
    return peer, ack, out


def small(uid: str) -> bytes:
    from malformed import base_dataset, encode

    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = b"\x01" * 2000
    return encode(ds)


@pytest.mark.inprocess
def test_a_failed_journal_write_fails_that_store_and_never_a_later_one(tmp_path: Path) -> None:
    ops = FailingJournalWrite()
    peer, ack, out = journaled_peer(tmp_path, ops)
    try:
        peer.send(store(small("1.2.9.1"), "1.2.9.1", message_id=1), whole)
        assert peer.status() == 0x0000
        ops.fail = True
        peer.send(store(small("1.2.9.2"), "1.2.9.2", message_id=2), whole)
        assert peer.status() == 0xA700  # out of resources: the sender may try again
        peer.send(store(small("1.2.9.3"), "1.2.9.3", message_id=3), whole)
        assert peer.status() == 0x0000
        peer.send(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)), whole)  # A-RELEASE-RQ
        assert peer.read_pdu()[0] == pdu.A_RELEASE_RP
        # Released: every object answered with success is under its name already.
        assert sorted(p.name for p in out.iterdir()) == ["CT.1.2.9.1", "CT.1.2.9.3"]
        assert ack.index.get("ANY-SCP", "1.2.9.2") is None
    finally:
        peer.finish()
        ack.close()


@pytest.mark.inprocess
def test_a_full_journal_refuses_with_a700_and_drops_nothing(tmp_path: Path) -> None:
    peer, ack, _ = journaled_peer(tmp_path, FileOps(), segments=2, full_wait=0.2)
    ack.materialiser.stop()  # materialisation stalls: nothing is ever checkpointed
    answers = []
    try:
        for i in range(40):  # ~4 KiB records, 2 x 15 usable blocks: the journal fills
            peer.send(store(small(f"1.2.8.{i}"), f"1.2.8.{i}", message_id=i + 1), whole)
            answers.append(peer.status())
    finally:
        peer.finish()
    assert 0x0000 in answers and answers[-1] == 0xA700
    accepted = [f"1.2.8.{i}" for i, status in enumerate(answers) if status == 0]
    ack.journal.close()
    again = Journal(tmp_path / "journal", segment_size=64 * 1024, segments=2)
    replayed = {r.header["index"]["sop_instance_uid"] for r in again.open()}
    assert replayed == set(accepted)  # every acknowledged record kept, no refused one written
    again.close()
    ack.index.close()


def test_storescu_returns_with_every_file_and_index_row_in_place(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    from datasets import make_dataset, write

    files = [write(make_dataset(rows=32, columns=32, seed=i), tmp_path / f"{i}.dcm") for i in range(25)]
    d = daemons.start()
    wait_for(lambda: "daemon.ready" in d.log())
    assert "ack=journal" in d.log()
    result = run([need("storescu"), "127.0.0.1", str(d.port), *map(str, files)])
    assert result.returncode == 0, result.stderr
    # No waiting: storescu has returned, so the release was answered, so the files are there.
    stored = {p.name: p for p in d.output.iterdir() if p.is_file()}
    assert len(stored) == 25
    for f in files:
        (match,) = [p for p in stored.values() if dataset_bytes(p) == dataset_bytes(f)]
        assert not match.name.startswith(".")
    assert not (d.output / ".dcmrecvd").exists(), "nothing but objects in the output directory"
    with sqlite3.connect(d.state / "instances.sqlite") as db:
        rows = dict(db.execute("SELECT path, size FROM instances").fetchall())
    assert set(rows) == {str(p) for p in stored.values()}
    assert all(rows[str(p)] == p.stat().st_size for p in stored.values())


@pytest.mark.parametrize("kill_after", [3, 17])
def test_kill_9_mid_stream_keeps_every_acknowledged_object_and_its_row(
    daemons: DaemonFactory, tmp_path: Path, kill_after: int
) -> None:
    output = tmp_path / "store"
    output.mkdir()
    d = daemons.start(output=output)
    sent = objects(30, 200_000)
    sender = Sender(d.port, sent)
    sender.start()
    wait_for(lambda: len(sender.acked) >= kill_after or not sender.is_alive(), timeout=30)
    os.kill(d.pid, signal.SIGSTOP)  # frozen: the acknowledgements read now are all there are
    wait_for(lambda: stopped(d.pid))
    acked = list(sender.acked)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    sender.join(30)
    restarted = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in restarted.log(), timeout=30)
    check_survivors(output, sent, acked)
    with sqlite3.connect(restarted.state / "instances.sqlite") as db:
        indexed = {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}
    assert set(acked) <= indexed


def test_a_journal_on_tmpfs_falls_back_to_the_per_file_path_and_says_so(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    where = shm / f"dcmrecvd-journal-{os.getpid()}"
    config = tmp_path / "tmpfs.toml"
    config.write_text(f'[journal]\ndirectory = "{where}"\n')
    d = daemons.start("--config", str(config))
    wait_for(lambda: "daemon.ready" in d.log())
    log = d.log()
    assert "journal.unavailable" in log and "tmpfs" in log
    assert "ack=per-file" in log
    assert not where.exists(), "nothing is made on a filesystem that cannot keep it"
    result = run([need("echoscu"), "127.0.0.1", str(d.port)])
    assert result.returncode == 0


@pytest.mark.parametrize("how", ["fsync-off", "ignore", "journal-off"])
def test_no_journal_when_nothing_is_flushed_or_stored(
    daemons: DaemonFactory, tmp_path: Path, how: str
) -> None:
    if how == "fsync-off":
        config = tmp_path / "nofsync.toml"
        config.write_text("[output]\nfsync = false\n")
        args = ["--config", str(config)]
    elif how == "ignore":
        args = ["--ignore"]
    else:
        args = ["--config", str(per_file_config(tmp_path))]
    d = daemons.start(*args)
    wait_for(lambda: "daemon.ready" in d.log())
    assert "ack=per-file" in d.log()
    assert not (d.state / "journal").exists()
