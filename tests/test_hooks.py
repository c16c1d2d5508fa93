"""Events and [[hooks]] against a real daemon: what the hook sees, what it can't break,
and kill -9 with a restart (every acknowledged object has its event, at least once)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonFactory, wait_for
from malformed import base_dataset, encode
from peers import RawClient
from test_association import store

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
HOSTILE_AET = "A'B $(touch x)"
HOSTILE_PATIENT = "$(touch /tmp/pwned-dcmrecvd); `id` 'a b' \"c\""

#: The hook: one JSON line per run (argv, stdin, the DCMRECVD_* environment), appended
#: in one write; then it sleeps or fails if told to by its first argument.
HOOK = r"""
import json, os, sys, time
out, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
line = json.dumps({"argv": args, "stdin": json.loads(sys.stdin.read()),
                   "env": {k: v for k, v in os.environ.items() if k.startswith("DCMRECVD_")},
                   "notify": "NOTIFY_SOCKET" in os.environ}) + "\n"
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, line.encode())
os.close(fd)
if mode.startswith("sleep"):
    time.sleep(float(mode[5:]))
sys.exit(1 if mode == "fail" else 0)
"""


def dataset(uid: str, study: str, patient: str = "P1") -> bytes:
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.PatientID = patient
    return encode(ds)


def config_with_hooks(tmp_path: Path, hooks: list[dict[str, Any]], stable: int = 1) -> Path:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    lines = ["[events]", f"stable_seconds = {stable}", ""]
    for hook in hooks:
        lines.append("[[hooks]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in hook.items()]
        lines.append("")
    path = tmp_path / "hooks.toml"
    path.write_text("\n".join(lines))
    return path


def hook_exec(tmp_path: Path, out: str, mode: str, *placeholders: str) -> list[str]:
    return [sys.executable, str(tmp_path / "hook.py"), str(tmp_path / out), mode, *placeholders]


def study_hook(tmp_path: Path) -> list[str]:
    return hook_exec(tmp_path, "studies.jsonl", "ok", "{study_uid}", "{objects}")


def runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Only whole lines: a hook may be appending its line as we read.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def send_all(port: int, objects: list[tuple[str, bytes]], calling: str = "RAW") -> list[int]:
    client = RawClient(port)
    assert client.associate(CT, EXPLICIT, calling=calling) == 0x02
    statuses = []
    for i, (uid, data) in enumerate(objects):
        client.sock.sendall(store(data, uid, message_id=i + 1))
        statuses.append(client.response_status())
    client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    client.read_pdu()
    client.close()
    return statuses


def test_hooks_see_each_object_and_each_study_once_with_values_as_single_items(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    placeholders = ("{sop_instance_uid}", "--aet={calling_aet}", "{patient_id}", "{path}")
    config = config_with_hooks(
        tmp_path,
        [
            {"on": ["object.stored"], "exec": hook_exec(tmp_path, "objects.jsonl", "ok", *placeholders)},
            {
                "on": ["study.complete"],
                "exec": hook_exec(tmp_path, "studies.jsonl", "ok", "{study_uid}", "{objects}"),
            },
        ],
    )
    d = daemons.start("--config", str(config))
    objects = [
        (f"1.2.3.{i}", dataset(f"1.2.3.{i}", "1.2.9" if i % 2 else "1.2.8", HOSTILE_PATIENT))
        for i in range(6)
    ]
    assert send_all(d.port, objects, calling=HOSTILE_AET) == [0] * 6
    wait_for(
        lambda: len(runs(tmp_path / "objects.jsonl")) == 6 and len(runs(tmp_path / "studies.jsonl")) == 2
    )
    seen = runs(tmp_path / "objects.jsonl")
    assert sorted(r["argv"][0] for r in seen) == sorted(uid for uid, _ in objects)
    for run in seen:
        uid, aet, patient, path = run["argv"]
        assert aet == f"--aet={HOSTILE_AET}" and patient == HOSTILE_PATIENT  # one item each, verbatim
        assert Path(path).name == f"CT.{uid}" and Path(path).is_file()
        assert run["stdin"]["path"] == path and run["stdin"]["event"] == "object.stored"
        assert run["env"]["DCMRECVD_SOP_INSTANCE_UID"] == uid
        assert run["env"]["DCMRECVD_CALLING_AET"] == HOSTILE_AET
        assert not run["notify"]  # the daemon's systemd socket is not the hook's
    assert not Path("/tmp/pwned-dcmrecvd").exists() and not (tmp_path / "x").exists()
    studies = sorted((r["argv"][0], r["argv"][1]) for r in runs(tmp_path / "studies.jsonl"))
    assert studies == [("1.2.8", "3"), ("1.2.9", "3")]
    assert "hook.completed" in d.log()


def test_a_slow_or_failing_hook_never_delays_or_fails_a_store(daemons: DaemonFactory, tmp_path: Path) -> None:
    config = config_with_hooks(
        tmp_path,
        [
            {"on": ["object.stored"], "exec": hook_exec(tmp_path, "slow.jsonl", "sleep30"), "timeout": 60},
            {
                "on": ["object.stored"],
                "exec": hook_exec(tmp_path, "failing.jsonl", "fail"),
                "retries": 1,
                "backoff": 1,
                "name": "failing",
            },
        ],
    )
    d = daemons.start("--config", str(config))
    objects = [(f"1.2.4.{i}", dataset(f"1.2.4.{i}", "1.2.4")) for i in range(20)]
    started = time.monotonic()
    assert send_all(d.port, objects) == [0] * 20
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"20 small C-STOREs took {elapsed:.1f} s with a 30 s hook"  # 600 s if on the path
    wait_for(lambda: d.log().count("hook.failed") == 20, timeout=60)  # 2 runs each, then dead
    assert len(runs(tmp_path / "failing.jsonl")) == 40
    assert d.log().count("hook.retry") == 20
    assert len(runs(tmp_path / "slow.jsonl")) == 1  # one run at a time, the first still sleeping


class Sender(threading.Thread):
    def __init__(self, port: int, objects: list[tuple[str, bytes]]) -> None:
        super().__init__(daemon=True)
        self.port, self.objects = port, objects
        self.acked: list[str] = []

    def run(self) -> None:
        try:
            client = RawClient(self.port, timeout=30)
            assert client.associate(CT, EXPLICIT) == 0x02
            for i, (uid, data) in enumerate(self.objects):
                client.sock.sendall(store(data, uid, message_id=i + 1))
                if client.response_status() == 0:
                    self.acked.append(uid)
        except (OSError, ConnectionError, AssertionError):
            pass


@pytest.mark.parametrize("kill_after", [40, 130, 220])
def test_kill_9_and_restart_every_acknowledged_object_has_its_event(
    daemons: DaemonFactory, tmp_path: Path, kill_after: int
) -> None:
    output = tmp_path / "store"
    output.mkdir()
    config = config_with_hooks(
        tmp_path,
        [
            {
                "on": ["object.stored"],
                "exec": hook_exec(tmp_path, "objects.jsonl", "ok", "{sop_instance_uid}"),
            },
            {
                "on": ["study.complete"],
                "exec": hook_exec(tmp_path, "studies.jsonl", "ok", "{study_uid}", "{objects}"),
            },
        ],
        stable=2,
    )
    d = daemons.start("--config", str(config), output=output)
    objects = [(f"1.2.5.{i}", dataset(f"1.2.5.{i}", "1.2.5")) for i in range(300)]
    sender = Sender(d.port, objects)
    sender.start()
    wait_for(lambda: len(sender.acked) >= kill_after or not sender.is_alive(), timeout=60)
    os.kill(d.pid, signal.SIGSTOP)
    acked = list(sender.acked)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    sender.join(30)
    assert kill_after <= len(acked) < len(objects)
    restarted = daemons.start("--config", str(config), output=output)
    wait_for(lambda: set(acked) <= {r["argv"][0] for r in runs(tmp_path / "objects.jsonl")}, timeout=60)
    seen = [r["argv"][0] for r in runs(tmp_path / "objects.jsonl")]
    duplicates = len(seen) - len(set(seen))
    assert duplicates <= len(acked) // 10, f"{duplicates} duplicates for {len(acked)} objects"
    # The study completes once, after the restart, with every object it holds.
    wait_for(lambda: runs(tmp_path / "studies.jsonl"), timeout=30)
    wait_for(lambda: "hook.completed" in restarted.log(), timeout=10)
    studies = runs(tmp_path / "studies.jsonl")
    assert [r["argv"][0] for r in studies] == ["1.2.5"], [
        (r["argv"], r["stdin"]["time"], r["stdin"]["event"]) for r in studies
    ]
    assert int(studies[0]["argv"][1]) >= len(acked)


def test_a_reload_applies_changed_hooks(daemons: DaemonFactory, tmp_path: Path) -> None:
    first = {"on": ["object.stored"], "exec": hook_exec(tmp_path, "a.jsonl", "ok", "{sop_instance_uid}")}
    config = config_with_hooks(tmp_path, [first])
    d = daemons.start("--config", str(config))
    assert send_all(d.port, [(f"1.2.6.{i}", dataset(f"1.2.6.{i}", "1.2.6")) for i in range(2)]) == [0, 0]
    wait_for(lambda: len(runs(tmp_path / "a.jsonl")) == 2)
    second = {"on": ["object.stored"], "exec": hook_exec(tmp_path, "b.jsonl", "ok", "{sop_instance_uid}")}
    config_with_hooks(tmp_path, [second])  # rewrites hooks.toml: same name (hook1), another program
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "reload.completed" in d.log())
    assert send_all(d.port, [(f"1.2.7.{i}", dataset(f"1.2.7.{i}", "1.2.7")) for i in range(2)]) == [0, 0]
    wait_for(lambda: len(runs(tmp_path / "b.jsonl")) == 2)
    assert sorted(r["argv"][0] for r in runs(tmp_path / "b.jsonl")) == ["1.2.7.0", "1.2.7.1"]
    assert len(runs(tmp_path / "a.jsonl")) == 2


def test_text_values_are_decoded_by_the_datasets_character_set(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """#28.8: 'Jürgen-Ω' sent as ISO_IR 192 reached argv, stdin and DCMRECVD_PATIENT_ID as
    'JÃ¼rgen-Î©' (every value was read as Latin-1).  Each set is decoded as it says."""
    config = config_with_hooks(
        tmp_path,
        [
            {
                "on": "object.stored",
                "exec": hook_exec(tmp_path, "objects.jsonl", "ok", "{sop_instance_uid}", "{patient_id}"),
            }
        ],
    )
    d = daemons.start("--config", str(config))
    sent = {
        "1.2.40.1": ("ISO_IR 192", "Jürgen-Ω"),
        "1.2.40.2": ("ISO_IR 100", "Jürgen Müller"),
        "1.2.40.3": ("", "PLAIN-ID"),
        "1.2.40.4": ("ISO_IR 144", "Иванов"),
    }
    objects = []
    for uid, (charset, patient) in sent.items():
        ds = base_dataset()
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, "1.2.40", "1.2.40.0"
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientID = patient
        data = encode(ds)
        assert (
            patient.encode({"ISO_IR 192": "utf-8", "ISO_IR 144": "iso8859_5"}.get(charset, "latin-1")) in data
        )
        objects.append((uid, data))
    assert send_all(d.port, objects) == [0] * len(objects)
    wait_for(lambda: len(runs(tmp_path / "objects.jsonl")) == len(objects))
    for run in runs(tmp_path / "objects.jsonl"):
        uid, patient = run["argv"]
        expected = sent[uid][1]
        assert patient == expected
        assert run["stdin"]["patient_id"] == expected
        assert run["env"]["DCMRECVD_PATIENT_ID"] == expected


def test_a_nul_in_a_value_neither_wedges_the_hooks_nor_spins(daemons: DaemonFactory, tmp_path: Path) -> None:
    """#28.6: a Patient ID of bytes 42 41 44 00 58 made every start of the hook raise
    ValueError: retried at once, for ever (a core busy, no dead letter), and the study's
    later events waited behind it.  In argv and env a control character is U+FFFD; the
    JSON keeps the value."""
    config = config_with_hooks(
        tmp_path,
        [
            {
                "on": ["object.stored"],
                "exec": hook_exec(tmp_path, "objects.jsonl", "ok", "{sop_instance_uid}", "{patient_id}"),
            }
        ],
    )
    d = daemons.start("--config", str(config))
    objects = [
        ("1.2.41.1", dataset("1.2.41.1", "1.2.41", "BAD\x00X")),
        ("1.2.41.2", dataset("1.2.41.2", "1.2.41", "LINE\nBREAK")),
        ("1.2.41.3", dataset("1.2.41.3", "1.2.41", "FINE")),
    ]
    assert b"BAD\x00X" in objects[0][1]
    assert send_all(d.port, objects) == [0, 0, 0]
    wait_for(lambda: len(runs(tmp_path / "objects.jsonl")) == 3)
    by_uid = {r["argv"][0]: r for r in runs(tmp_path / "objects.jsonl")}
    assert by_uid["1.2.41.1"]["argv"][1] == "BAD\ufffdX" == by_uid["1.2.41.1"]["env"]["DCMRECVD_PATIENT_ID"]
    assert by_uid["1.2.41.1"]["stdin"]["patient_id"] == "BAD\x00X"
    assert by_uid["1.2.41.2"]["argv"][1] == "LINE\ufffdBREAK"
    assert by_uid["1.2.41.3"]["argv"][1] == "FINE"
    assert "Traceback" not in d.log() and "hook.retry" not in d.log()


def test_a_run_that_cannot_start_backs_off_and_is_dead_lettered(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Any failure to start a run is a failed run: backoff, retries, dead letter; the
    study's next event then runs."""
    missing = str(tmp_path / "no-such-program")
    config = config_with_hooks(
        tmp_path,
        [{"on": ["object.stored"], "exec": [missing, "{sop_instance_uid}"], "retries": 1, "backoff": 1}],
    )
    d = daemons.start("--config", str(config))
    started = time.monotonic()
    assert send_all(d.port, [("1.2.42.1", dataset("1.2.42.1", "1.2.42"))]) == [0]
    wait_for(lambda: "hook.failed" in d.log(), timeout=20)
    assert time.monotonic() - started >= 1.0  # the retry waited its backoff
    assert d.log().count("hook.retry") == 1 and d.log().count("hook.failed") == 1


def _stop_and_restart_with_hooks(daemons: DaemonFactory, tmp_path: Path, how: str) -> tuple[Any, Path]:
    output = tmp_path / "archive"
    output.mkdir()
    bare = tmp_path / "bare.toml"
    bare.write_text("[events]\nstable_seconds = 1\n")
    d = daemons.start("--config", str(bare), output=output)
    old = [(f"1.2.43.{i}", dataset(f"1.2.43.{i}", "1.2.43")) for i in range(4)]
    assert send_all(d.port, old) == [0] * 4
    config = config_with_hooks(
        tmp_path,
        [
            {
                "on": ["object.stored"],
                "exec": hook_exec(tmp_path, "objects.jsonl", "ok", "{sop_instance_uid}"),
            },
            {"on": ["study.complete"], "exec": hook_exec(tmp_path, "studies.jsonl", "ok", "{study_uid}")},
        ],
    )
    if how == "restart":
        assert d.stop() == 0
        d = daemons.start("--config", str(config), output=output)
    else:
        bare.write_text(config.read_text())
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "reload.completed" in d.log())
    return d, output


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_turning_hooks_on_does_not_replay_the_archive(
    daemons: DaemonFactory, tmp_path: Path, how: str
) -> None:
    """#28.5: every file already in the output directory became an object.stored event
    (recovered = 1) when the first consumer appeared: a new outbox's mark is its creation."""
    d, _ = _stop_and_restart_with_hooks(daemons, tmp_path, how)
    assert send_all(d.port, [("1.2.44.1", dataset("1.2.44.1", "1.2.44"))]) == [0]
    wait_for(lambda: runs(tmp_path / "studies.jsonl"), timeout=20)
    assert [r["argv"][0] for r in runs(tmp_path / "objects.jsonl")] == ["1.2.44.1"]
    assert [r["argv"][0] for r in runs(tmp_path / "studies.jsonl")] == ["1.2.44"]
    assert "journal.recovered" not in d.log()


def test_stored_files_say_which_ae_title_they_came_in_under(daemons: DaemonFactory) -> None:
    """#28.7: recovery read the called AE from nowhere and used '*'; the file meta now
    carries it (0002,0018 Receiving Application Entity Title)."""
    from pydicom import dcmread

    d = daemons.start()
    client = RawClient(d.port)
    assert client.associate(CT, EXPLICIT, called="ARCHIVE", calling="MODALITY") == 0x02
    client.sock.sendall(store(dataset("1.2.45.1", "1.2.45"), "1.2.45.1"))
    assert client.response_status() == 0
    client.close()
    (path,) = wait_for(lambda: [p for p in d.output.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts])
    meta = dcmread(path, stop_before_pixels=True).file_meta
    assert meta.ReceivingApplicationEntityTitle == "ARCHIVE"
    assert meta.SourceApplicationEntityTitle == "MODALITY"
