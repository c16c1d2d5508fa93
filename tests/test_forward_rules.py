"""Forwarding's rules: the outcome table status by status, match, SIGHUP with a backlog, a DCMTK
destination stopped mid-stream, the metrics, and [[forward]] tables that are refused."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonFactory, free_port, need, port_open, wait_for
from forward_peers import Destination, ct, forward_toml, send, studies, write_config
from pki import CA
from pydicom.uid import generate_uid
from test_operations import http, samples
from test_remote import Dcmrecv

from dcmrecvd.conf import config
from dcmrecvd.errors import ConfigError
from dcmrecvd.events import forward_outcome
from dcmrecvd.events.forward_outcome import Verdict


@pytest.fixture
def destination() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("status", "warnings_delivered", "duplicate_delivered", "verdict"),
    [
        (0x0000, True, True, Verdict.DELIVERED),
        (0xB000, True, True, Verdict.DELIVERED),
        (0xB007, False, True, Verdict.DEAD),
        (0x0111, True, True, Verdict.DELIVERED),
        (0x0111, True, False, Verdict.DEAD),
        (0xA700, True, True, Verdict.RETRY),
        (0xA7FF, True, True, Verdict.RETRY),
        (0x0213, True, True, Verdict.RETRY),
        (0x0110, True, True, Verdict.RETRY),
        (0xA900, True, True, Verdict.DEAD),
        (0xC000, True, True, Verdict.DEAD),
        (0x0122, True, True, Verdict.DEAD),
        (0x0124, True, True, Verdict.PAUSE),
        (0xFE00, True, True, Verdict.DEAD),  # a status nobody defined for C-STORE: never "delivered"
    ],
)
def test_the_outcome_table(
    status: int, warnings_delivered: bool, duplicate_delivered: bool, verdict: Verdict
) -> None:
    got = forward_outcome.of_status(
        status, "", warnings_delivered=warnings_delivered, duplicate_delivered=duplicate_delivered
    )
    assert got.verdict is verdict and f"0x{status:04X}" in got.reason


def test_connection_outcomes() -> None:
    assert forward_outcome.of_association("rejected", "x", 1).verdict is Verdict.PAUSE
    transient = forward_outcome.of_association("rejected", "x", 2)
    assert transient.verdict is Verdict.RETRY and transient.connection
    assert forward_outcome.of_association("unreachable", "refused").connection
    assert forward_outcome.of_association("no-context", "none").verdict is Verdict.DEAD


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ('host = "h"\n', "forward[1].name", "required"),
        ('name = "a b"\nhost = "h"\n', "forward[1].name", "letters, digits"),
        ('name = "p"\n', "forward[1].host", "required"),
        ('name = "p"\nhost = "h"\nmatch = { NoSuchKeyword = "x" }\n', "forward[1].match", "DICOM keyword"),
        ('name = "p"\nhost = "h"\nmatch = { Modality = 1 }\n', "forward[1].match", "glob"),
        ('name = "p"\nhost = "h"\ntype = "ftp"\n', "forward[1].type", "not one of"),
        (
            'name = "p"\nhost = "h"\ncalled_aet = "WAY-TOO-LONG-AE-TITLE"\n',
            "forward[1].called_aet",
            "AE title",
        ),
        ('name = "p"\nhost = "h"\ntls_certificate = "c.pem"\n', "forward[1].tls_certificate", "private_key"),
        ('name = "p"\nhost = "h"\nbackof = 1\n', "forward[1].backof", "did you mean 'backoff'"),
    ],
)
def test_a_bad_destination_is_refused_naming_its_key(
    tmp_path: Path, table: str, key: str, reason: str
) -> None:
    (tmp_path / "dcmrecvd.toml").write_text("[[forward]]\n" + table)
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.key == key and reason in info.value.reason


def test_two_destinations_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dcmrecvd.toml").write_text(forward_toml(104) + forward_toml(105))
    with pytest.raises(ConfigError, match="used twice"):
        config.load(config_dir=tmp_path, environ={})


def test_print_config_gives_the_destination_back(tmp_path: Path) -> None:
    (tmp_path / "dcmrecvd.toml").write_text(forward_toml(104, match={"Modality": ["CT", "MR"]}))
    cfg = config.load(config_dir=tmp_path, environ={})
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "dcmrecvd.toml").write_text(config.to_toml(cfg))
    assert config.load(config_dir=tmp_path / "again", environ={}).forward == cfg.forward


def test_match_sends_only_what_it_selects(daemons: DaemonFactory, destination: Destination) -> None:
    destination.start()
    write_config(daemons.config_dir, forward_toml(destination.port, match={"PatientID": "KEEP*"}))
    d = daemons.start()
    keep, drop = ct(generate_uid(prefix=None)), ct(generate_uid(prefix=None))
    keep.PatientID, drop.PatientID = "KEEP-1", "OTHER"
    assert send(d.port, [drop, keep]) == [0, 0]
    wait_for(lambda: destination.uids() == [str(keep.SOPInstanceUID)], timeout=30)
    wait_for(lambda: _pending(d) == 0, timeout=10)  # the other one was looked at, and skipped
    assert destination.uids() == [str(keep.SOPInstanceUID)]


def test_a_transient_refusal_is_retried_and_a_warning_is_delivered(
    daemons: DaemonFactory, destination: Destination
) -> None:
    answers = {"busy": 1}

    def answer(_uid: str) -> int:
        if answers["busy"]:
            answers["busy"] -= 1
            return 0xA700  # out of resources, once
        return 0xB000

    destination.answer = answer
    destination.start()
    write_config(daemons.config_dir, forward_toml(destination.port))
    d = daemons.start()
    ds = ct(generate_uid(prefix=None))
    assert send(d.port, [ds]) == [0]
    wait_for(lambda: "forward.retry" in d.log(), timeout=20)
    # A warning answer (0xB000) counts as delivered: nothing more is tried.
    wait_for(lambda: d.log().count("forward.retry") == 1 and _pending(d) == 0, timeout=20)
    assert "forward.dead" not in d.log()


def _pending(d: object) -> int:
    db = sqlite3.connect(d.state / "events.sqlite")  # type: ignore[attr-defined]
    try:
        return int(
            db.execute("SELECT count(*) FROM deliveries WHERE consumer = 'forward/pacs'").fetchone()[0]
        )
    finally:
        db.close()


def test_sighup_moves_a_backlog_to_a_changed_destination(
    daemons: DaemonFactory, destination: Destination
) -> None:
    nowhere = free_port()
    write_config(daemons.config_dir, forward_toml(nowhere))
    d = daemons.start()
    objects = studies(2, 5)
    assert send(d.port, objects) == [0] * 10
    wait_for(lambda: "forward.retry" in d.log(), timeout=20)
    destination.start()
    write_config(daemons.config_dir, forward_toml(destination.port))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: sorted(destination.uids()) == sorted(str(ds.SOPInstanceUID) for ds in objects), timeout=30
    )


class Storescp:
    """DCMTK's storescp on a given loopback port, storing into ``out``; stopped by PID."""

    def __init__(self, out: Path, port: int) -> None:
        self.port, self.out = port, out
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [need("storescp"), "--aetitle", "PACS", "-od", str(out), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(port) or self.proc.poll() is not None, timeout=20)
        assert self.proc.poll() is None, "storescp did not start"

    def files(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_a_storescp_destination_stopped_and_started_mid_stream(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    port = free_port()
    scp = Storescp(tmp_path / "pacs", port)
    try:
        write_config(daemons.config_dir, forward_toml(port))
        d = daemons.start()
        first, second = studies(2, 10), studies(2, 10)
        assert send(d.port, first) == [0] * 20
        wait_for(lambda: len(scp.files()) == 20, timeout=30)
        scp.stop()
        assert send(d.port, second) == [0] * 20
        wait_for(lambda: "forward.retry" in d.log(), timeout=20)
        scp = Storescp(tmp_path / "pacs", port)  # back on its port: the backlog follows by itself
        wait_for(lambda: len(scp.files()) == 40, timeout=60)
        names = {p.name.split(".", 1)[1] for p in scp.files()}
        assert names == {str(ds.SOPInstanceUID) for ds in first + second}
    finally:
        scp.stop()


def test_the_metrics_say_what_forwarding_did(daemons: DaemonFactory, destination: Destination) -> None:
    metrics = free_port()
    write_config(
        daemons.config_dir, f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n' + forward_toml(destination.port)
    )
    d = daemons.start()
    d.metrics_port = metrics  # type: ignore[attr-defined]
    wait_for(lambda: port_open(metrics))
    objects = studies(1, 3)
    assert send(d.port, objects) == [0] * 3

    def figure(name: str, **labels: str) -> float | None:
        return samples(http(d, "/metrics")[1]).get((name, tuple(sorted(labels.items()))))

    wait_for(lambda: (figure("dcmrecvd_forward_queue", destination="pacs") or 0) == 3, timeout=20)
    assert (figure("dcmrecvd_forward_oldest_pending_seconds", destination="pacs") or 0) > 0
    destination.start()
    wait_for(
        lambda: figure("dcmrecvd_forward_objects_total", destination="pacs", outcome="delivered") == 3,
        timeout=30,
    )
    assert figure("dcmrecvd_forward_queue", destination="pacs") == 0
    assert figure("dcmrecvd_forward_paused", destination="pacs") == 0
    assert figure("dcmrecvd_forward_send_seconds_count", destination="pacs") == 3


def nothing_arrives(destination: Destination, seconds: float) -> None:
    """A negative check: for ``seconds``, the destination receives nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert destination.uids() == [], "sent before its unit was complete"
        time.sleep(0.05)


@pytest.mark.parametrize("unit", ["study.complete", "series.complete"])
def test_a_unit_is_sent_once_complete_and_a_late_object_with_its_update(
    daemons: DaemonFactory, destination: Destination, unit: str
) -> None:
    destination.start()
    write_config(
        daemons.config_dir, "[events]\nstable_seconds = 3\n\n" + forward_toml(destination.port, on=unit)
    )
    d = daemons.start()
    objects = studies(2, 5)
    assert send(d.port, objects) == [0] * 10
    nothing_arrives(destination, 1.0)  # within stable_seconds: the units are still open
    wait_for(lambda: len(destination.received) == 10, timeout=30)
    got = list(destination.received)
    for study in {str(ds.StudyInstanceUID) for ds in objects}:
        sent = [str(ds.SOPInstanceUID) for ds in objects if str(ds.StudyInstanceUID) == study]
        assert [r.sop_instance_uid for r in got if r.study_uid == study] == sent
    late = ct(str(objects[0].StudyInstanceUID), 99)
    assert send(d.port, [late]) == [0]
    wait_for(lambda: len(destination.received) == 11, timeout=30)
    assert destination.received[-1].sop_instance_uid == str(late.SOPInstanceUID)
    wait_for(lambda: _pending(d) == 0, timeout=20)  # the unit events are done after their objects


def test_a_study_stuck_on_a_retried_object_holds_no_other_study_back(
    daemons: DaemonFactory, destination: Destination
) -> None:
    """More objects wait behind the stuck one than one look at the outbox reads (WINDOW)."""
    stuck = studies(1, 150)
    poisoned = str(stuck[0].SOPInstanceUID)
    destination.answer = lambda uid: 0xA700 if uid == poisoned else 0x0000
    destination.start()
    # A long backoff: the stuck study is not in flight while the other one arrives.
    write_config(daemons.config_dir, forward_toml(destination.port, backoff=60, backoff_max=120))
    d = daemons.start()
    assert send(d.port, stuck) == [0] * 150
    wait_for(lambda: "forward.retry" in d.log(), timeout=20)
    other = studies(1, 3)
    assert send(d.port, other) == [0] * 3
    wait_for(lambda: set(destination.uids()) == {str(ds.SOPInstanceUID) for ds in other}, timeout=20)
    assert poisoned not in destination.uids(), "the stuck study stays in order behind its head"


def test_forwarding_over_tls_with_our_client_certificate(daemons: DaemonFactory, tmp_path: Path) -> None:
    """DCMTK dcmrecv with +tls, requiring a client certificate from its CA: ours."""
    root = CA(tmp_path / "pki", "Forward Test Root")
    server, client = root.issue("localhost"), root.issue("dcmrecvd-forwarder")
    scp = Dcmrecv(tmp_path / "pacs", "+tls", str(server.key), str(server.cert), "+cf", str(root.cert))
    try:
        write_config(
            daemons.config_dir,
            forward_toml(
                scp.port,
                called_aet="ANY-SCP",
                tls=True,
                tls_certificate=str(client.cert),
                tls_private_key=str(client.key),
                tls_ca_files=[str(root.cert)],
                tls_server_name="localhost",
            ),
        )
        d = daemons.start()
        objects = studies(1, 3)
        assert send(d.port, objects) == [0] * 3
        wait_for(lambda: len(scp.files()) == 3, timeout=30)
        assert "forward.retry" not in d.log()
    finally:
        scp.stop()
