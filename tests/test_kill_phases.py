"""kill -9 in every phase of receiving: what the sender saw acknowledged survives.

The daemon runs with the ``DCMRECVD_TEST_STOP_AFTER`` hook of ``file_ops``: it
stops itself (SIGSTOP) right after a chosen call of the write path, the test
kills it with SIGKILL there, then starts a new daemon on the same directory.
Checked: every object the sender saw acknowledged is complete under its final
name; every final name holds a complete object that was sent; start-up removed
every temp file.  Also killed: during negotiation, and right after a reload.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import DaemonFactory, isolated_env, per_file_config, wait_for
from malformed import base_dataset, encode
from peers import RawClient, associate_rq, dataset_bytes
from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from test_association import store

from dcmrecvd.store.storage import TEMP_PREFIX

CT = str(CTImageStorage)
EXPLICIT = "1.2.840.10008.1.2.1"


def objects(count: int, size: int) -> dict[str, bytes]:
    out = {}
    for i in range(1, count + 1):
        ds = base_dataset()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7.{i}"
        ds.PixelData = bytes([i % 251]) * size
        out[str(ds.SOPInstanceUID)] = encode(ds)
    return out


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


class Sender(threading.Thread):
    """Sends the objects one by one on one association; keeps the UIDs acknowledged."""

    def __init__(self, port: int, sent: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.port, self.sent = port, sent
        self.acked: list[str] = []

    def run(self) -> None:
        try:
            client = RawClient(self.port, timeout=60)
            assert client.associate(CT, EXPLICIT) == 0x02
            for i, (uid, data) in enumerate(self.sent.items()):
                client.sock.sendall(store(data, uid, fragment=16000, message_id=i + 1))
                if client.response_status() == 0x0000:
                    self.acked.append(uid)
        except (OSError, ConnectionError, AssertionError):
            pass  # the daemon was killed under us: what was acked is what counts


def check_survivors(output: Path, sent: dict[str, bytes], acked: list[str]) -> None:
    files = [p for p in output.rglob("*") if p.is_file() and ".dcmrecvd" not in p.relative_to(output).parts]
    assert not [p for p in files if p.name.startswith(TEMP_PREFIX)], "start-up left a temp file"
    held = {p.name[3:]: p for p in files}
    for uid in acked:
        assert uid in held, f"acknowledged {uid} is missing"
    for uid, path in held.items():  # acknowledged or not, a final name holds a whole object
        assert dataset_bytes(path) == sent[uid], f"{path.name} is not the object sent"
        assert str(dcmread(path).SOPInstanceUID) == uid


PHASES = [
    ("mid-object", "write:8"),
    ("after-flush-before-rename", "flush:3"),
    ("after-rename-before-dirsync", "rename:3"),
    ("after-dirsync", "dirsync:3"),
    ("at-the-next-temp-file", "open:5"),
]
#: Through the ack journal the phases are the materialiser's (off the ack path), which flushes
#: a batch of files at once (one syncfs, then the renames, then one directory fsync), and one
#: more: right after a write into the journal (the segment heads, the records and the
#: checkpoints: the 8th comes a few objects in; which one it is, the threads decide).
JOURNAL_PHASES = [
    ("mid-object", "write:4"),
    ("after-flush-before-rename", "flush:1"),
    ("after-rename-before-dirsync", "rename:3"),
    ("after-dirsync", "dirsync:1"),
    ("at-the-next-temp-file", "open:5"),
    ("record-durable-before-its-ack", "journal:8"),
]
CASES = [("per-file", phase, hook) for phase, hook in PHASES] + [
    ("journal", phase, hook) for phase, hook in JOURNAL_PHASES
]


@pytest.mark.parametrize(("path", "phase", "hook"), CASES, ids=[f"{a}-{p}" for a, p, _ in CASES])
def test_kill_9_in_a_phase_of_the_write_path(
    daemons: DaemonFactory, tmp_path: Path, path: str, phase: str, hook: str
) -> None:
    output = tmp_path / "store"
    output.mkdir()
    args = ["--config", str(per_file_config(tmp_path))] if path == "per-file" else []
    env = isolated_env(daemons.config_dir, NO_COLOR="1", DCMRECVD_TEST_STOP_AFTER=hook)
    d = daemons.start(*args, output=output, env=env)
    # Through the journal: objects that travel in their records (under journal.inline_max_kib),
    # enough of them that the stream outlasts the first batch (64 records or 20 ms).
    sent = objects(20, 300_000) if path == "per-file" else objects(200, 30_000)
    sender = Sender(d.port, sent)
    sender.start()
    wait_for(lambda: stopped(d.pid) or not sender.is_alive(), timeout=30)
    assert stopped(d.pid), f"the daemon never reached {hook} ({phase})"
    acked = list(sender.acked)  # the daemon is stopped: no further acknowledgement can come
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    sender.join(30)
    assert 2 <= len(acked) < len(sent), acked  # stopped mid-stream, with something to keep
    restarted = daemons.start(*args, output=output)
    wait_for(lambda: "daemon.ready" in restarted.log(), timeout=20)
    check_survivors(output, sent, acked)


def test_kill_9_during_negotiation_leaves_nothing(daemons: DaemonFactory, tmp_path: Path) -> None:
    output = tmp_path / "store"
    output.mkdir()
    d = daemons.start(output=output)
    client = RawClient(d.port)
    request = associate_rq(CT, EXPLICIT)
    client.sock.sendall(request[: len(request) // 2])  # the daemon dies with half a request
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    client.close()
    restarted = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in restarted.log(), timeout=20)
    assert [p for p in output.rglob("*") if ".dcmrecvd" not in p.parts] == []


def test_kill_9_right_after_a_reload_keeps_what_was_acknowledged(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    output = tmp_path / "store"
    output.mkdir()
    d = daemons.start(output=output)
    sent = objects(40, 100_000)
    sender = Sender(d.port, sent)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 5 or not sender.is_alive(), timeout=30)
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "reload." in d.log() or d.proc.poll() is not None, timeout=10)
    os.kill(d.pid, signal.SIGSTOP)  # freeze, so that the acks read now are all there are
    acked = list(sender.acked)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    sender.join(30)
    assert 5 <= len(acked) < len(sent)
    restarted = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in restarted.log(), timeout=20)
    check_survivors(output, sent, acked)
