"""After the ack, nothing undefined: the five defects of #33, each as a regression, against
a real daemon on real filesystems (chattr +i, a loop-mounted ext4 filling up, tmpfs).

Every acknowledged object ends as a file or as a quarantine entry; objects the daemon knows
it cannot make are refused (0xA700, associations rejected) instead of acknowledged; a file a
consumer deleted never comes back; the state lives outside the output directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, dcmrecvd_cmd, free_port, isolated_env, need, run, wait_for
from malformed import base_dataset, encode
from peers import RawClient
from pydicom.uid import generate_uid
from test_association import store
from test_duplicates import dataset_of

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
ERROR_COMMENT = 0x00000902
REJECT = 0x03

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None, reason="mounts a loop device (root, e2fsprogs)"
)


def ct(uid: str, size: int = 2048, **attrs: object) -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = bytes([len(uid) % 251]) * size
    for key, value in attrs.items():
        setattr(ds, key, value)
    return encode(ds)


def send_many(port: int, objects: list[tuple[str, bytes]]) -> list[tuple[int, str]] | None:
    """C-STOREs on one association, each answered before the next: [(status, comment)];
    None when the association is rejected."""
    client = RawClient(port)
    try:
        if client.associate(CT, EXPLICIT, calling="RAW") == REJECT:
            return None
        answers = []
        for i, (uid, data) in enumerate(objects):
            client.sock.sendall(store(data, uid, message_id=i + 1))
            response = client.response()
            status = int.from_bytes(response[0x00000900], "little")
            answers.append((status, response.get(ERROR_COMMENT, b"").decode().strip()))
        client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ: answered, not hung
        client.read_pdu()
        return answers
    finally:
        client.close()


def with_metrics(daemons: DaemonFactory, toml: str = "") -> tuple[str, int]:
    port = free_port()
    (daemons.config_dir / "dcmrecvd.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n{toml}')
    return toml, port


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def gauge(port: int, name: str) -> float:
    text = http(port, "/metrics")[1]
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def objects_in(output: Path) -> dict[str, Path]:
    """Objects under ``output`` by relative path (not temp files, not a legacy state in it)."""
    return {
        str(p.relative_to(output)): p
        for p in output.rglob("*")
        if p.is_file() and not p.name.startswith(".") and ".dcmrecvd" not in p.relative_to(output).parts
    }


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """A directory nobody may add to, root included (EPERM): chattr +i."""
    subprocess.run([need("chattr"), "+i", str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run([need("chattr"), "-i", str(directory)], check=True)


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted 40 MB ext4, unmounted afterwards."""
    image, point = tmp_path / "small.img", tmp_path / "small"
    point.mkdir()
    with image.open("wb") as f:
        f.truncate(40 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


# --------------------------------------------------------------------------- 1: a name too long


@pytest.mark.parametrize("path", ["journal", "per-file"])
def test_a_name_too_long_is_refused_before_the_ack_and_nothing_wedges(
    daemons: DaemonFactory, path: str
) -> None:
    lines = ['layout = "{PatientName}_{SOPInstanceUID}.dcm"', 'duplicates = "keep-both"']
    journal = "" if path == "journal" else "[journal]\nenabled = false\n"
    (daemons.config_dir / "dcmrecvd.toml").write_text("[output]\n" + "\n".join(lines) + "\n" + journal)
    d = daemons.start()
    uid = "1.2.826.0.1.3680043.2.1143." + "1" * 37  # 64 characters
    assert len(uid) == 64
    patient = {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "患者" * 32}
    answers = [send_many(d.port, [(uid, ct(uid, **patient))]) for _ in range(2)]
    for answer in answers:
        assert answer is not None
        ((status, comment),) = answer
        assert status in (0x0000, 0xA700)
        if status:
            assert "too long" in comment
    stored = objects_in(d.output)
    assert sum(1 for a in answers if a and a[0][0] == 0) == len(stored), "an acknowledged object has no file"
    other = generate_uid(prefix=None)
    assert send_many(d.port, [(other, ct(other, PatientName="Short"))]) == [(0, "")]
    wait_for(lambda: any(other in name for name in objects_in(d.output)), timeout=10)
    d.stop(signal.SIGKILL)
    again = daemons.start(output=d.output)
    wait_for(lambda: "daemon.ready" in again.log(), timeout=30)
    assert "Traceback" not in again.log()


# --------------------------------------------------------------------------- 2: an unwritable directory


def test_an_unwritable_output_directory_refuses_new_objects_and_recovers(daemons: DaemonFactory) -> None:
    _, metrics = with_metrics(daemons)
    d = daemons.start()
    first = generate_uid(prefix=None)
    assert send_many(d.port, [(first, ct(first))]) == [(0, "")]
    with immutable(d.output):
        late = generate_uid(prefix=None)
        answer = send_many(d.port, [(late, ct(late))])  # may be acknowledged: nothing knew yet
        assert answer is not None and answer[0][0] in (0x0000, 0xA700)
        wait_for(lambda: http(metrics, "/readyz")[0] == 503, timeout=10)
        _, why = http(metrics, "/readyz")
        assert "cannot make files" in why and "EPERM" in why
        assert gauge(metrics, "dcmrecvd_materialise_failing") == 1
        refused = generate_uid(prefix=None)
        assert send_many(d.port, [(refused, ct(refused))]) is None  # rejected, transient
        big = generate_uid(prefix=None)
        assert send_many(d.port, [(big, ct(big, 1 << 20))]) is None
        assert "assoc.rejected" in d.log() and "cannot make files" in d.log()
        assert not any(refused in name for name in objects_in(d.output))
    wait_for(lambda: http(metrics, "/readyz")[0] == 200, timeout=15)
    if answer[0][0] == 0:  # what was acknowledged is made once the directory is writable
        wait_for(lambda: any(late in name for name in objects_in(d.output)), timeout=10)
    after = generate_uid(prefix=None)
    assert send_many(d.port, [(after, ct(after))]) == [(0, "")]
    assert "journal.materialise_resumed" in d.log()


def test_kill_9_while_the_directory_is_unwritable_then_a_start(daemons: DaemonFactory) -> None:
    """dcmrecv's rule holds at start (an unwritable output directory is exit 45, said why);
    the acknowledged record waits in the journal and is made by the next start."""
    _, metrics = with_metrics(daemons)
    d = daemons.start()
    with immutable(d.output):
        uid = generate_uid(prefix=None)
        answer = send_many(d.port, [(uid, ct(uid))])
        assert answer == [(0, "")]
        wait_for(lambda: http(metrics, "/readyz")[0] == 503, timeout=10)
        d.stop(signal.SIGKILL)
        refused = daemons.start(output=d.output, wait=False)
        assert refused.proc.wait(30) == 45
        assert "not writable" in refused.log()
    again = daemons.start(output=d.output)
    wait_for(lambda: "daemon.ready" in again.log(), timeout=30)
    assert "journal.recovered" in again.log()
    assert any(uid in name for name in objects_in(d.output))
    wait_for(lambda: http(metrics, "/readyz")[0] == 200, timeout=15)


# --------------------------------------------------------------------------- 3: a disk filling up


@needs_root
def test_a_full_disk_refuses_new_objects_and_deleted_files_never_come_back(
    daemons: DaemonFactory, small_ext4: Path
) -> None:
    incoming = small_ext4 / "incoming"
    incoming.mkdir()
    _, metrics = with_metrics(daemons, f'[daemon]\nstate_directory = "{small_ext4}/state"\n')
    d = daemons.start(output=incoming)
    wait_for(lambda: "daemon.ready" in d.log())
    assert "journal.sized" in d.log(), "two 16 MiB segments on a 40 MB disk, unsaid"
    acked: list[str] = []
    refused = 0
    for _round in range(60):
        batch = [(uid := generate_uid(prefix=None), ct(uid, 48 << 10)) for _ in range(20)]
        answers = send_many(d.port, batch)
        if answers is None:
            refused += 1
            break
        acked += [uid for (uid, _), (status, _) in zip(batch, answers, strict=True) if status == 0]
        if any(status for status, _ in answers):
            refused += 1
            break
    assert refused, "the disk never filled"
    # A consumer takes every file away, freeing the disk.
    deleted = {name for name in objects_in(incoming)}
    for name in deleted:
        (incoming / name).unlink()
    wait_for(lambda: http(metrics, "/readyz")[0] == 200, timeout=30)
    wait_for(lambda: gauge(metrics, "dcmrecvd_journal_waiting") == 0, timeout=30)
    now = objects_in(incoming)
    assert not deleted & set(now), f"{len(deleted & set(now))} deleted files came back"
    for uid in acked:  # each acknowledged object: made and deleted, or made now
        assert any(uid in name for name in deleted | set(now)), uid
    uid = generate_uid(prefix=None)
    assert send_many(d.port, [(uid, ct(uid))]) == [(0, "")]
    d.stop(signal.SIGKILL)
    again = daemons.start(output=incoming)
    wait_for(lambda: "daemon.ready" in again.log(), timeout=30)
    assert not deleted & set(objects_in(incoming))


# --------------------------------------------------------------------------- 4: the state directory


def test_a_cleanup_job_deleting_every_file_loses_nothing_and_brings_nothing_back(
    daemons: DaemonFactory,
) -> None:
    """`find DIR -type f -delete`, over and over, while modalities store."""
    _, metrics = with_metrics(daemons)
    d = daemons.start()
    deleted: set[str] = set()
    stop = threading.Event()

    def cleanup() -> None:
        while not stop.is_set():
            for path in list(d.output.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        deleted.add(path.name)
            stop.wait(0.05)

    job = threading.Thread(target=cleanup)
    job.start()
    sent: list[str] = []
    try:
        for _ in range(6):
            batch = [(uid := generate_uid(prefix=None), ct(uid)) for _ in range(40)]
            assert send_many(d.port, batch) == [(0, "")] * 40
            sent += [uid for uid, _ in batch]
    finally:
        stop.set()
        job.join()
    wait_for(lambda: gauge(metrics, "dcmrecvd_journal_waiting") == 0, timeout=20)
    now = set(objects_in(d.output))
    assert not deleted & now, "a deleted file came back"
    for uid in sent:
        assert any(name.endswith(uid) for name in deleted | now), f"{uid} was acknowledged and never made"
    assert (d.state / "journal").is_dir() and (d.state / "instances.sqlite").is_file()
    assert http(metrics, "/readyz")[0] == 200


def test_the_output_directory_holds_objects_only_and_the_state_knows_its_output(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    d = daemons.start()
    uid = generate_uid(prefix=None)
    assert send_many(d.port, [(uid, ct(uid))]) == [(0, "")]
    d.stop()
    assert [p.name for p in d.output.iterdir()] == [f"CT.{uid}"]
    assert (d.state / "output-directory").read_text().strip() == str(d.output)
    other = tmp_path / "other"
    other.mkdir()
    state = tmp_path / "shared-state"
    (daemons.config_dir / "dcmrecvd.toml").write_text(f'[daemon]\nstate_directory = "{state}"\n')
    first = daemons.start(output=d.output)
    first.stop()
    second = daemons.start(output=other, wait=False)
    assert second.proc.wait(30) == 1
    assert "holds the state of output directory" in second.log() and "daemon.state_directory" in second.log()


def test_a_legacy_state_in_the_output_directory_is_moved_once_with_its_records(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    output = tmp_path / "legacy"
    output.mkdir()
    (daemons.config_dir / "dcmrecvd.toml").write_text(f'[daemon]\nstate_directory = "{output}/.dcmrecvd"\n')
    old = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in old.log())
    assert "state.inside_output" in old.log()
    uids = [generate_uid(prefix=None) for _ in range(5)]
    assert send_many(old.port, [(u, ct(u)) for u in uids]) == [(0, "")] * 5
    old.stop(signal.SIGKILL)  # records perhaps not all materialised, surely not checkpointed
    for name in objects_in(output):
        (output / name).unlink()  # ...and files perhaps made: a replay must not make them again
    (daemons.config_dir / "dcmrecvd.toml").write_text("")
    new = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in new.log())
    assert "state.migrated" in new.log()
    assert not (output / ".dcmrecvd").exists()
    assert (new.state / "journal").is_dir()
    assert (new.state / "instances.sqlite").is_file()
    new.stop()
    third = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in third.log())
    assert "state.migrated" not in third.log()


# --------------------------------------------------------------------------- 5: needs the journal


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[output]\nduplicates = "keep"\nduplicate_identity = "instance"\n', "output.duplicate_identity"),
        ("[commitment]\nenabled = true\n", "commitment.enabled"),
        ('[[forward]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\ncalled_aet = "PACS"\n', "forward"),
    ],
)
def test_a_setting_that_needs_the_journal_is_one_error_whether_it_is_off_or_unusable(
    daemons: DaemonFactory, tmp_path: Path, toml: str, key: str
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    where = shm / f"dcmrecvd-journal-{os.getpid()}-{tmp_path.name}"
    errors = []
    for journal in ("[journal]\nenabled = false\n", f'[journal]\ndirectory = "{where}"\n'):
        (daemons.config_dir / "dcmrecvd.toml").write_text(journal + toml)
        d = daemons.start(wait=False)
        assert d.proc.wait(30) == 1, d.log()
        errors.append(d.log())
    for log in errors:
        assert key in log and "journal" in log
    assert "cannot be used" in errors[1] and "tmpfs" in errors[1]
    assert not where.exists()


# --------------------------------------------------------------------------- the quarantine, from outside


def journal_cli(d: Daemon, daemons: DaemonFactory, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dcmrecvd_cmd(), "journal", *args, "-od", str(d.output)],
        capture_output=True,
        text=True,
        timeout=30,
        env=isolated_env(daemons.config_dir),
    )


def test_a_file_where_a_layout_directory_should_be_quarantines_and_the_admin_acts(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    layout = '[output]\nlayout = "{PatientID}/{SOPInstanceUID}.dcm"\n'
    (daemons.config_dir / "dcmrecvd.toml").write_text(layout)
    d = daemons.start()
    (d.output / "PID1").write_text("someone's file, in the way")
    blocked, fine = generate_uid(prefix=None), generate_uid(prefix=None)
    data = ct(blocked, PatientID="PID1")
    answers = send_many(d.port, [(blocked, data), (fine, ct(fine, PatientID="PID2"))])
    assert answers == [(0, ""), (0, "")]  # acknowledged: only the materialiser can find out
    wait_for(lambda: "journal.quarantined" in d.log(), timeout=10)
    wait_for(lambda: (d.output / "PID2" / f"{fine}.dcm").exists(), timeout=10)  # the next one went on
    listed = journal_cli(d, daemons, "--list-quarantine")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    entry, _seq, _time, uid, intended, reason = line.split("\t")
    assert uid == blocked and intended == str(d.output / "PID1" / f"{blocked}.dcm")
    assert reason.startswith(("ENOTDIR", "EEXIST")), reason
    exported = journal_cli(d, daemons, "--export-quarantine", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    assert dataset_of(tmp_path / "export" / f"{entry}.dcm") == data
    (d.output / "PID1").unlink()  # the admin removes what was in the way...
    retried = journal_cli(d, daemons, "--retry-quarantine", entry)
    assert retried.returncode == 0 and "1 entries marked" in retried.stdout
    wait_for(lambda: (d.output / "PID1" / f"{blocked}.dcm").exists(), timeout=10)
    wait_for(lambda: journal_cli(d, daemons, "--list-quarantine").stdout == "", timeout=10)
    assert "journal.quarantine_released" in d.log()
    unknown = journal_cli(d, daemons, "--retry-quarantine", "nope")
    assert unknown.returncode != 0 and "no quarantine entry" in unknown.stderr


def test_storescu_sees_a_clear_status_while_the_directory_is_unwritable(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """The first object after the fault is acknowledged (nothing could know); from then on
    storescu is refused at once, and its release is never held for the disk."""
    from datasets import make_dataset, write

    d = daemons.start()
    files = [write(make_dataset(rows=16, columns=16, seed=i), tmp_path / f"{i}.dcm") for i in range(2)]
    with immutable(d.output):
        result = run([need("storescu"), "127.0.0.1", str(d.port), str(files[0])], timeout=20)
        assert result.returncode == 0
        wait_for(lambda: "journal.materialise_failed" in d.log(), timeout=10)
        refused = run([need("storescu"), "127.0.0.1", str(d.port), str(files[1])], timeout=20)
        assert "Association Rejected" in refused.stderr or refused.returncode != 0
