"""A real power cut, as far as this machine allows: snapshots of a live filesystem's disk.

The output directory is a real filesystem (ext4 with a journal, ext4 without one, XFS) on a
loop device whose backing file lives on btrfs.  While a sender streams objects, the backing
file is copied with ``cp --reflink`` (FICLONE: the clone is taken under the file's lock after
its dirty pages are written, so it is one point-in-time image of every write the loop device
has completed, and perhaps some in flight) at random moments.  Each image is what the disk
would hold if the power went then on a disk without a volatile cache: it is fsck'ed and
mounted (which replays its journal), and every object the sender saw acknowledged *before*
the clone began must be there, complete; every final name must hold a whole object sent.

This is sound (each image is a state a real disk may be left in) but not adversarial (it
never drops a completed write that was not yet flushed): the adversarial half is the
enumerator of ``test_crash_states``.  Bounded here; ``make crash-test`` sets
``DCMRECVD_POWER_CUTS`` and ``DCMRECVD_POWER_CUT_OBJECTS`` for a longer run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, wait_for
from peers import RawClient, dataset_bytes
from test_association import store
from test_kill_phases import CT, EXPLICIT, objects

from dcmrecvd.store.storage import TEMP_PREFIX

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.btrfs", "mkfs.xfs", "mkfs.ext4", "losetup")),
    reason="needs root, loop devices, btrfs-progs, xfsprogs and e2fsprogs",
)
CUTS = int(os.environ.get("DCMRECVD_POWER_CUTS", "4"))
OBJECTS = int(os.environ.get("DCMRECVD_POWER_CUT_OBJECTS", "150"))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@contextlib.contextmanager
def mounted(image: Path, point: Path, *options: str) -> Iterator[Path]:
    point.mkdir(exist_ok=True)
    result = run("mount", "-o", ",".join(("loop", *options)), str(image), str(point))
    assert result.returncode == 0, result.stderr
    try:
        yield point
    finally:
        run("umount", str(point))


def make_filesystem(kind: str, image: Path) -> None:
    with image.open("wb") as f:
        f.truncate(320 << 20)
    argv = {
        "ext4": ["mkfs.ext4", "-q", "-F"],
        "ext4-nojournal": ["mkfs.ext4", "-q", "-F", "-O", "^has_journal"],
        "xfs": ["mkfs.xfs", "-q", "-f"],
    }[kind]
    result = run(*argv, str(image))
    assert result.returncode == 0, result.stderr


def repair(kind: str, image: Path) -> None:
    """What an admin does after the power returns (ext4: e2fsck; XFS: the mount replays its log)."""
    if kind.startswith("ext4"):
        result = run("e2fsck", "-fy", str(image))
        assert result.returncode in (0, 1), f"e2fsck: {result.returncode}\n{result.stdout}"


class Sender(threading.Thread):
    """Streams objects; every acknowledgement is appended (with its time) as it arrives."""

    def __init__(self, port: int, sent: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.port, self.sent = port, sent
        self.acked: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = RawClient(self.port, timeout=60)
            assert client.associate(CT, EXPLICIT) == 0x02
            for i, (uid, data) in enumerate(self.sent.items()):
                client.sock.sendall(store(data, uid, fragment=16000, message_id=i % 60000 + 1))
                assert client.response_status() == 0x0000
                self.acked.append(uid)
            client.close()
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def outer(tmp_path: Path) -> Iterator[Path]:
    """A btrfs filesystem to hold the disk images, so that a clone of one is instant and atomic."""
    image = tmp_path / "outer.img"
    with image.open("wb") as f:
        f.truncate(4 << 30)
    assert run("mkfs.btrfs", "-q", "-f", str(image)).returncode == 0
    with mounted(image, tmp_path / "outer") as point:
        yield point


class Stalled(AssertionError):
    """The stream made no progress for a minute (see the report: where the daemon waits)."""


def stall_report(d: Daemon, sender: Sender) -> str:
    """Where each daemon thread waits (state and kernel wait channel), and its last log lines."""
    threads = []
    for task in sorted(Path(f"/proc/{d.pid}/task").glob("*")):
        try:
            state = (task / "stat").read_text().rsplit(") ", 1)[1].split()[0]
            threads.append(f"{(task / 'comm').read_text().strip()}:{state}:{(task / 'wchan').read_text()}")
        except (OSError, IndexError):
            continue
    return (
        f"no progress for 60 s: {len(sender.acked)} acknowledged, sender error {sender.error!r}; "
        f"daemon threads {threads}; daemon log tail:\n{d.log()[-2000:]}"
    )


def on_disk(daemons: DaemonFactory, top: Path) -> None:
    """Objects in ``top``/incoming, the state in ``top``/state: one filesystem."""
    (top / "incoming").mkdir(exist_ok=True)
    (daemons.config_dir / "dcmrecvd.toml").write_text(f'[daemon]\nstate_directory = "{top}/state"\n')


def cut_while_sending(
    daemons: DaemonFactory, outer: Path, tmp_path: Path, kind: str, *args: str
) -> tuple[dict[str, bytes], list[tuple[Path, list[str]]]]:
    """Stream objects into a fresh filesystem of ``kind``, cloning its disk CUTS times on the
    way; returns what was sent and, per clone, the objects acknowledged before it began."""
    disk = outer / "disk.img"
    make_filesystem(kind, disk)
    sent = objects(OBJECTS, 60_000)
    cuts: list[tuple[Path, list[str]]] = []
    with mounted(disk, tmp_path / "live") as live:
        # The objects and the receiver's state (journal, index) side by side on the one disk
        # that is cut: both must come back from each clone.
        on_disk(daemons, live)
        d = daemons.start(*args, output=live / "incoming")
        try:
            wait_for(lambda: "daemon.ready" in d.log(), timeout=20)
            if not args:  # the durability mode this filesystem must get
                expected = "fdatasync" if kind == "ext4-nojournal" else "journal-ordered"
                assert f"durability={expected}" in d.log()
            sender = Sender(d.port, sent)
            sender.start()
            rng = random.Random(kind)
            for n in range(CUTS):
                # Spread the cuts over the stream, at moments not aligned with anything.
                target = (n + 1) * len(sent) // (CUTS + 1) + rng.randint(-3, 3)
                try:
                    wait_for(lambda t=target: len(sender.acked) >= t or not sender.is_alive(), timeout=60)
                except AssertionError:
                    raise Stalled(stall_report(d, sender)) from None
                before = list(sender.acked)  # read before the clone starts: all of these must be in it
                image = outer / f"cut{n}.img"
                clone = run("cp", "--reflink=always", str(disk), str(image))
                assert clone.returncode == 0, clone.stderr
                cuts.append((image, before))
            sender.join(120)
            if isinstance(sender.error, TimeoutError):  # no answer for the socket's 60 s
                raise Stalled(stall_report(d, sender))
            assert sender.error is None, repr(sender.error)
        finally:  # before the unmount: a daemon still writing there would keep it busy
            d.proc.terminate()
            try:
                d.proc.wait(20)
            except subprocess.TimeoutExpired:  # stuck in writeback to the loop device
                d.proc.kill()
                d.proc.wait(20)
    return sent, cuts


def missing_after_the_cut(
    daemons: DaemonFactory, kind: str, image: Path, point: Path, sent: dict[str, bytes], before: list[str]
) -> list[str]:
    """Repair and mount one clone where the live disk was, start dcmrecvd on it (recovery:
    the ack journal's records made into files), stop it; the acknowledged objects it lacks
    (a partial final name fails)."""
    repair(kind, image)
    with mounted(image, point):
        on_disk(daemons, point)
        d = daemons.start(output=point / "incoming")
        try:
            wait_for(lambda: "daemon.ready" in d.log() or d.proc.poll() is not None, timeout=60)
            assert "daemon.ready" in d.log(), d.log()[-2000:]
        finally:
            assert d.stop() == 0
        # Not ours: the state beside it, and what fsck found with no name (lost+found at the
        # filesystem's root: inodes whose directory entries never reached the disk).
        files = [p for p in (point / "incoming").rglob("*") if p.is_file()]
        held = {p.name[3:]: p for p in files if not p.name.startswith(TEMP_PREFIX)}
        for uid, path in held.items():
            assert dataset_bytes(path) == sent[uid], f"{kind}: {path.name} is not whole"
        assert not [p for p in files if p.name.startswith(TEMP_PREFIX)], "start-up left a temp file"
        return [uid for uid in before if uid not in held]


@pytest.mark.parametrize("kind", ["ext4", "ext4-nojournal", "xfs"])
def test_acknowledged_objects_survive_clones_of_a_live_disk(
    daemons: DaemonFactory, outer: Path, tmp_path: Path, kind: str
) -> None:
    sent, cuts = cut_while_sending(daemons, outer, tmp_path, kind)
    assert len(cuts) == CUTS and all(before for _, before in cuts)
    for n, (image, before) in enumerate(cuts):
        assert missing_after_the_cut(daemons, kind, image, tmp_path / "live", sent, before) == [], f"cut {n}"


def test_the_clones_do_see_a_receiver_that_acknowledges_before_the_disk(
    daemons: DaemonFactory, outer: Path, tmp_path: Path
) -> None:
    """The technique can fail: with output.fsync = false (dcmrecv's way) objects acknowledged
    seconds ago are still only in the page cache, and a clone lacks them."""
    no_fsync = tmp_path / "no-fsync.toml"
    no_fsync.write_text("[output]\nfsync = false\n")
    try:
        sent, cuts = cut_while_sending(daemons, outer, tmp_path, "ext4-nojournal", "--config", str(no_fsync))
    except Stalled as stall:
        # Seen three times in full CI runs on these VMs (never alone), during or after the
        # cuts: the page-cache path on a loop device inside btrfs made no progress for a
        # minute.  Once more on a fresh disk, with where it waited on record; a second stall
        # skips (the technique's limit here, not the product's).
        warnings.warn(f"power-cut stream stalled, tried again: {stall}", stacklevel=1)
        for image in outer.glob("cut*.img"):
            image.unlink()
        try:
            sent, cuts = cut_while_sending(
                daemons, outer, tmp_path, "ext4-nojournal", "--config", str(no_fsync)
            )
        except Stalled as again:  # the technique's own limit on this VM, not the product's
            pytest.skip(f"the page-cache stream stalled twice on this VM: {again}")
    lost = [
        missing_after_the_cut(daemons, "ext4-nojournal", image, tmp_path / "live", sent, before)
        for image, before in cuts
    ]
    assert any(lost), "every clone held every acknowledged object without a single fsync"
