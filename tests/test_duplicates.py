"""output.duplicates: each policy's exact status and surviving bytes, identity by path and by
instance, four associations racing on one instance, the events, metrics and SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import DaemonFactory, free_port, need, per_file_config, wait_for
from malformed import base_dataset, encode
from peers import RawClient
from test_association import store
from test_hooks import config_with_hooks, hook_exec, runs
from test_output_layout import gdcmscu_store

from dcmrecvd.conf import config
from dcmrecvd.errors import ConfigError
from dcmrecvd.store.storage import TEMP_PREFIX
from dcmrecvd.wire import part10

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
UID = "1.2.826.0.1.3680043.2.1143.77.1"
ERROR_COMMENT = 0x00000902


def dataset(fill: int, uid: str = UID, size: int = 512) -> bytes:
    """One CT instance; ``fill`` makes copies of it that differ in their pixel bytes (and in
    the Study and Series UIDs, made anew for each call)."""
    ds = base_dataset()
    ds.SOPInstanceUID = uid
    ds.PixelData = bytes([fill]) * size
    return encode(ds)


def send(port: int, data: bytes, calling: str = "RAW", uid: str = UID) -> tuple[int, str]:
    """One C-STORE on its own association: (status, Error Comment)."""
    client = RawClient(port)
    try:
        assert client.associate(CT, EXPLICIT, calling=calling) == 0x02
        client.sock.sendall(store(data, uid))
        response = client.response()
        status = int.from_bytes(response[0x00000900], "little")
        comment = response.get(ERROR_COMMENT, b"").decode().strip()
        client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        client.read_pdu()
    finally:
        client.close()
    return status, comment


def dataset_of(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[part10.read_meta(raw[: part10.META_READ]).dataset_offset :]


def files(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` but the daemon's own state: relative name -> dataset bytes."""
    found = {}
    for path in output.rglob("*"):
        if path.is_file() and ".dcmrecvd" not in path.parts:
            found[str(path.relative_to(output))] = dataset_of(path) if not path.name.startswith(".") else b""
    return found


def start(daemons: DaemonFactory, tmp_path: Path, path: str, output: str, *extra: str):  # type: ignore[no-untyped-def]
    """A daemon with ``[output]`` lines ``output`` on the journal or the per-file path."""
    (daemons.config_dir / "dcmrecvd.toml").write_text(f"[output]\n{output}\n")
    args = ["--config", str(per_file_config(tmp_path))] if path == "per-file" else []
    return daemons.start(*args, *extra)


NAME = f"CT.{UID}"


@pytest.mark.parametrize("path", ["journal", "per-file"])
@pytest.mark.parametrize(
    ("policy", "second", "survivors"),
    [
        ("overwrite", (0x0000, ""), {NAME: 2}),
        ("keep", (0x0000, ""), {NAME: 1}),
        ("reject", (0x0111, "duplicate: a copy of this SOP Instance is stored already"), {NAME: 1}),
        (
            "reject-if-different",
            (0x0111, "duplicate: a copy of this SOP Instance is stored already"),
            {NAME: 1},
        ),
        ("keep-both", (0x0000, ""), {NAME: 1, f"{NAME}_1": 2}),
    ],
)
def test_each_policy_answers_its_status_and_keeps_its_bytes(
    daemons: DaemonFactory,
    tmp_path: Path,
    path: str,
    policy: str,
    second: tuple[int, str],
    survivors: dict[str, int],
) -> None:
    d = start(daemons, tmp_path, path, f'duplicates = "{policy}"')
    copies = {1: dataset(1), 2: dataset(2)}
    assert send(d.port, copies[1]) == (0x0000, "")
    wait_for(lambda: NAME in files(d.output), timeout=20)
    assert send(d.port, copies[2]) == second
    expected = {name: copies[n] for name, n in survivors.items()}
    wait_for(lambda: files(d.output) == expected, timeout=20)
    if policy == "overwrite":  # dcmrecv's rule: the rename replaces, and says so
        wait_for(lambda: "store.replaced" in d.log(), timeout=20)
    else:
        outcome = {"keep": "discarded", "keep-both": "beside"}.get(policy, "rejected")
        wait_for(lambda: f"outcome={outcome}" in d.log(), timeout=20)
        assert "store.duplicate" in d.log()
    assert files(d.output) == expected  # nothing else appeared meanwhile, no temp file left


@pytest.mark.parametrize("path", ["journal", "per-file"])
def test_reject_if_different_takes_an_identical_resend_and_touches_nothing(
    daemons: DaemonFactory, tmp_path: Path, path: str
) -> None:
    d = start(daemons, tmp_path, path, 'duplicates = "reject-if-different"\nduplicate_status = 0xA700')
    first = dataset(1)
    assert send(d.port, first, calling="FIRST") == (0x0000, "")
    stored = d.output / NAME
    wait_for(stored.is_file, timeout=20)
    os.utime(stored, ns=(1_000_000_000, 1_000_000_000))  # far in the past: any touch shows
    before = stored.stat()
    assert send(d.port, first, calling="AGAIN")[0] == 0x0000  # the file meta differs: not compared
    assert send(d.port, dataset(3))[0] == 0xA700  # output.duplicate_status
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert stored.read_bytes().count(b"FIRST") == 1  # the first copy's meta, not the resend's
    assert files(d.output) == {NAME: first}


def test_instance_identity_finds_a_copy_under_another_path(daemons: DaemonFactory, tmp_path: Path) -> None:
    """The layout puts each sender's objects in its own folder: by path they never meet,
    by instance (the index) the second sender's copy is the first one's duplicate."""
    one, two = dataset(1), dataset(2)
    layout = 'layout = "{calling_aet}/{SOPInstanceUID}.dcm"'
    d = start(daemons, tmp_path, "journal", f'{layout}\nduplicates = "keep"\nduplicate_identity = "instance"')
    assert send(d.port, one, calling="MOD_A") == (0x0000, "")
    wait_for(lambda: (d.output / "MOD_A" / f"{UID}.dcm").is_file(), timeout=20)
    assert send(d.port, two, calling="MOD_B") == (0x0000, "")
    assert send(d.port, two, calling="MOD_C") == (0x0000, "")
    wait_for(lambda: d.log().count("store.duplicate") == 2, timeout=20)
    assert files(d.output) == {f"MOD_A/{UID}.dcm": one}

    other = start(daemons, tmp_path, "journal", f'{layout}\nduplicate_identity = "instance"')
    assert send(other.port, one, calling="MOD_A") == (0x0000, "")
    wait_for(lambda: (other.output / "MOD_A" / f"{UID}.dcm").is_file(), timeout=20)
    assert send(other.port, two, calling="MOD_B") == (0x0000, "")  # overwrite: where the first lies
    wait_for(lambda: files(other.output) == {f"MOD_A/{UID}.dcm": two}, timeout=20)
    by_path = start(daemons, tmp_path, "journal", f'{layout}\nduplicates = "reject"')
    assert send(by_path.port, one, calling="MOD_A") == (0x0000, "")
    assert send(by_path.port, two, calling="MOD_B") == (0x0000, "")  # another path: no duplicate
    wait_for(lambda: len(files(by_path.output)) == 2, timeout=20)


@pytest.mark.parametrize(
    ("policy", "path"), [("reject", "journal"), ("keep", "per-file"), ("overwrite", "journal")]
)
def test_four_associations_on_one_instance_one_wins(
    daemons: DaemonFactory, tmp_path: Path, policy: str, path: str
) -> None:
    """Four senders store one instance (different bytes each, 4 MB so that they overlap) at
    once: exactly one copy is the file, whole; the others get the policy's answer."""
    d = start(daemons, tmp_path, path, f'duplicates = "{policy}"')
    copies = [dataset(fill, size=4 << 20) for fill in (11, 12, 13, 14)]
    results: dict[int, tuple[int, str]] = {}
    gate = threading.Barrier(4)

    def sender(i: int) -> None:
        gate.wait()
        results[i] = send(d.port, copies[i], calling=f"SENDER{i}")

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(status for status, _ in results.values())
    assert len(results) == 4
    assert statuses == ([0x0000] + [0x0111] * 3 if policy == "reject" else [0x0000] * 4)
    wait_for(lambda: set(files(d.output)) == {NAME}, timeout=30)
    stored = files(d.output)[NAME]
    assert stored in copies
    if policy == "reject":  # the one that was answered 0x0000 is the one on disk
        (winner,) = [i for i, (status, _) in results.items() if status == 0]
        assert stored == copies[winner]
    leftovers = [p for p in d.output.rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == []
    assert d.log().count("store.duplicate") == 3


def test_events_metrics_and_hooks_see_each_duplicate(daemons: DaemonFactory, tmp_path: Path) -> None:
    """object.duplicate reaches a hook with its policy, outcome and first path; a replaced copy
    is also object.stored again (so forwarded again), a discarded one is not."""
    hooks = config_with_hooks(
        tmp_path,
        [
            {
                "on": ["object.duplicate"],
                "exec": hook_exec(tmp_path, "dup.jsonl", "ok", "{outcome}", "{first_path}"),
            },
            {"on": ["object.stored"], "exec": hook_exec(tmp_path, "stored.jsonl", "ok", "{path}")},
        ],
    )
    one, two = dataset(1), dataset(2)
    metrics_port = free_port()
    (daemons.config_dir / "dcmrecvd.toml").write_text(
        f'[output]\nduplicates = "overwrite"\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    d = daemons.start("--config", str(hooks))
    assert send(d.port, one) == (0x0000, "")
    assert send(d.port, two) == (0x0000, "")  # replaced
    wait_for(lambda: len(runs(tmp_path / "stored.jsonl")) == 2, timeout=30)
    wait_for(lambda: len(runs(tmp_path / "dup.jsonl")) == 1, timeout=30)
    (dup,) = runs(tmp_path / "dup.jsonl")
    assert dup["argv"] == ["replaced", str(d.output / NAME)]
    assert dup["stdin"]["policy"] == "overwrite" and dup["stdin"]["event"] == "object.duplicate"

    main = daemons.config_dir / "dcmrecvd.toml"
    main.write_text(main.read_text().replace('"overwrite"', '"keep"'))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.completed" in d.log(), timeout=20)
    assert send(d.port, dataset(3)) == (0x0000, "")  # discarded: an event, no object.stored
    wait_for(lambda: len(runs(tmp_path / "dup.jsonl")) == 2, timeout=30)
    assert runs(tmp_path / "dup.jsonl")[1]["argv"] == ["discarded", str(d.output / NAME)]
    assert len(runs(tmp_path / "stored.jsonl")) == 2
    assert files(d.output) == {NAME: two}

    main.write_text(main.read_text().replace('"keep"', '"never"'))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.rejected" in d.log(), timeout=20)
    assert send(d.port, dataset(4)) == (0x0000, "")  # still keep
    assert files(d.output) == {NAME: two}

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert 'dcmrecvd_duplicates_total{outcome="replaced"} 1.0' in text
    assert 'dcmrecvd_duplicates_total{outcome="discarded"} 2.0' in text


@pytest.mark.parametrize(
    ("lines", "key", "words"),
    [
        ('duplicates = "keep"\nfilenames = "unique"', "output.duplicates", "never repeat"),
        ('duplicates = "reject"\nlayout = "{uuid}.dcm"', "output.duplicates", "never repeat"),
        ('duplicate_identity = "instance"\nfsync = false', "output.duplicate_identity", "journal"),
        ("duplicate_status = 0x0000", "output.duplicate_status", "failure status"),
        ("duplicate_status = 0xFF00", "output.duplicate_status", "failure status"),
        ('duplicates = "ignore"', "output.duplicates", "not one of"),
    ],
)
def test_settings_that_cannot_work_are_refused(tmp_path: Path, lines: str, key: str, words: str) -> None:
    (tmp_path / "dcmrecvd.toml").write_text(f"[output]\n{lines}\n")
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.key == key and words in str(info.value)


def test_settings_that_work_load(tmp_path: Path) -> None:
    (tmp_path / "dcmrecvd.toml").write_text(
        '[output]\nduplicates = "reject"\nduplicate_status = 0xA700\nfilenames = "unique"\n'
        'duplicate_identity = "instance"\n'
    )
    loaded = config.load(config_dir=tmp_path, environ={})
    assert (loaded.output.duplicates, loaded.output.duplicate_status) == ("reject", 0xA700)
    assert json.loads(json.dumps(loaded.output.duplicate_identity)) == "instance"


def test_a_copy_right_behind_its_first_on_one_association(daemons: DaemonFactory, tmp_path: Path) -> None:
    """The first copy is acknowledged through the journal and made into its file a little
    later; a second copy right behind it (same association, no pause) still finds it."""
    d = start(daemons, tmp_path, "journal", 'duplicates = "keep"')
    copies = [dataset(fill) for fill in (1, 2, 3)]
    client = RawClient(d.port)
    try:
        assert client.associate(CT, EXPLICIT) == 0x02
        statuses = []
        for i, data in enumerate(copies):
            client.sock.sendall(store(data, UID, message_id=i + 1))
            statuses.append(client.response_status())
        client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        client.read_pdu()
    finally:
        client.close()
    assert statuses == [0, 0, 0]
    assert files(d.output) == {NAME: copies[0]}  # visible by A-RELEASE-RP
    assert d.log().count("store.duplicate") == 2


def test_gdcmscu_resending_an_instance_meets_the_policy(daemons: DaemonFactory, tmp_path: Path) -> None:
    """GDCM's sender as the modality: its second copy (other bytes) is refused, the first stays."""
    need("gdcmscu")
    d = start(daemons, tmp_path, "journal", 'duplicates = "reject"')
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    for path, fill in ((first, 1), (second, 2)):
        path.write_bytes(part10.meta_header(CT, UID, EXPLICIT, "GDCM", "ANY-SCP") + dataset(fill))
    gdcmscu_store(d.port, first)
    wait_for(lambda: (d.output / NAME).is_file(), timeout=20)
    kept = dataset_of(d.output / NAME)
    gdcmscu_store(d.port, second)
    wait_for(lambda: "outcome=rejected" in d.log(), timeout=20)
    assert dataset_of(d.output / NAME) == kept == dataset_of(first)
    assert len(files(d.output)) == 1
