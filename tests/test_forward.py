"""Forwarding to a DICOM destination: delivered after the ack, in order per study, through
outages, refusals and restarts, never lost (a pynetdicom SCP whose answers the test sets)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import Daemon, DaemonFactory, dcmrecvd_cmd, isolated_env, wait_for
from forward_peers import Destination, ct, forward_toml, send, studies, write_config
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid


@pytest.fixture
def destination() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.stop()


def start(daemons: DaemonFactory, text: str) -> Daemon:
    write_config(daemons.config_dir, text)
    d = daemons.start()
    wait_for(lambda: "daemon.ready" in d.log(), timeout=20)
    return d


def forward_cli(daemons: DaemonFactory, d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dcmrecvd_cmd(), "forward", *args, "-od", str(d.output)],
        capture_output=True,
        text=True,
        timeout=30,
        env=isolated_env(daemons.config_dir),
        input="",
    )


def test_each_object_is_delivered_in_receive_order_per_study(
    daemons: DaemonFactory, destination: Destination
) -> None:
    destination.start()
    d = start(daemons, forward_toml(destination.port))
    objects = studies(3, 10)
    assert send(d.port, objects) == [0] * 30
    wait_for(lambda: len(destination.received) == 30, timeout=30)
    got = list(destination.received)
    assert sorted(r.sop_instance_uid for r in got) == sorted(str(ds.SOPInstanceUID) for ds in objects)
    for study in {str(ds.StudyInstanceUID) for ds in objects}:
        sent = [str(ds.SOPInstanceUID) for ds in objects if ds.StudyInstanceUID == study]
        assert [r.sop_instance_uid for r in got if r.study_uid == study] == sent
    # We call as the AE the objects arrived on (pynetdicom's SCU calls ANY-SCP).
    assert {r.calling_aet for r in got} == {"ANY-SCP"}
    assert destination.associations <= 2, "associations are reused across objects"


def test_a_destination_that_is_down_gets_everything_once_it_is_up(
    daemons: DaemonFactory, destination: Destination
) -> None:
    d = start(daemons, forward_toml(destination.port))
    objects = studies(2, 10)
    started = time.monotonic()
    assert send(d.port, objects) == [0] * 20
    wait_for(lambda: d.log().count("forward.retry") >= 2, timeout=20)
    destination.start()
    wait_for(lambda: len(destination.received) == 20, timeout=30)
    assert sorted(destination.uids()) == sorted(str(ds.SOPInstanceUID) for ds in objects)
    # The destination rested while down: one try per interval, not one per object.
    tries = d.log().count("forward.retry")
    assert tries <= 2 + (time.monotonic() - started), f"{tries} retries logged"


def test_a_refused_object_is_a_dead_letter_and_its_study_goes_on(
    daemons: DaemonFactory, destination: Destination
) -> None:
    poisoned: set[str] = set()
    destination.answer = lambda uid: 0xC211 if uid in poisoned else 0x0000
    destination.start()
    d = start(daemons, forward_toml(destination.port))
    objects = studies(1, 6)
    poisoned.add(str(objects[2].SOPInstanceUID))
    assert send(d.port, objects) == [0] * 6
    wait_for(lambda: len(destination.received) == 5, timeout=30)
    wait_for(lambda: "forward.dead" in d.log(), timeout=10)
    listed = forward_cli(daemons, d, "--list-dead")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    name, _event, attempts, uid, _path, reason = line.split("\t")
    assert (name, attempts, uid) == ("pacs", "1", str(objects[2].SOPInstanceUID))
    assert "0xC211" in reason
    poisoned.clear()
    requeued = forward_cli(daemons, d, "--retry-dead", "pacs")
    assert requeued.returncode == 0 and "1 dead letters re-queued" in requeued.stdout, requeued.stderr
    wait_for(lambda: len(destination.received) == 6, timeout=30)


def test_a_destination_that_refuses_our_ae_is_paused_once_and_probed(
    daemons: DaemonFactory, destination: Destination
) -> None:
    destination.calling = "SOMEONE"  # rejects our calling AE: A-ASSOCIATE-RJ permanent
    destination.start()
    d = start(daemons, forward_toml(destination.port, backoff_max=2))
    objects = studies(2, 5)
    assert send(d.port, objects) == [0] * 10
    wait_for(lambda: "forward.paused" in d.log(), timeout=20)
    first = destination.rejected
    wait_for(lambda: destination.rejected > first, timeout=20)  # probed again after backoff_max
    assert d.log().count("forward.paused") == 1, "one alert"
    assert "forward.retry" not in d.log() and "forward.dead" not in d.log(), "no per-object storm"
    destination.stop()
    destination.calling = None
    destination.start()
    wait_for(lambda: len(destination.received) == 10, timeout=30)
    assert "forward.resumed" in d.log()


def test_transfer_syntax_is_as_received_unless_uncompressed_ok(daemons: DaemonFactory) -> None:
    implicit_only = Destination(syntaxes=(ImplicitVRLittleEndian,))
    implicit_only.start()
    try:
        converting = forward_toml(implicit_only.port, name="converting", transfer_syntax="uncompressed-ok")
        d = start(daemons, forward_toml(implicit_only.port) + converting)
        ds = ct(generate_uid(prefix=None))
        assert send(d.port, [ds], syntax=ExplicitVRLittleEndian) == [0]
        wait_for(lambda: len(implicit_only.received) == 1, timeout=30)
        assert implicit_only.received[0].transfer_syntax == ImplicitVRLittleEndian
        wait_for(lambda: "forward.dead" in d.log(), timeout=20)
        dead = [line for line in d.log().splitlines() if "forward.dead" in line]
        assert len(dead) == 1 and "pacs" in dead[0] and "not accepted" in dead[0]
    finally:
        implicit_only.stop()


def test_kill_9_with_a_backlog_loses_nothing(daemons: DaemonFactory, destination: Destination) -> None:
    write_config(daemons.config_dir, forward_toml(destination.port))
    d = daemons.start()
    objects = studies(3, 20)
    assert send(d.port, objects) == [0] * 60
    wait_for(lambda: "forward.retry" in d.log(), timeout=20)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    destination.start()
    d2 = daemons.start(output=d.output)
    wait_for(lambda: set(destination.uids()) == {str(ds.SOPInstanceUID) for ds in objects}, timeout=60)
    assert d2.proc.poll() is None


def test_a_retried_dead_letter_renegotiates_and_its_reason_names_the_pair(daemons: DaemonFactory) -> None:
    """#34 items 8 and 10: a dead letter for a refused pair names the SOP class and transfer
    syntax, and a retry after the destination was fixed asks the destination again (an idle
    association negotiated with its old process must not answer for the new one)."""
    port = Destination().port
    implicit_only = Destination(port=port, syntaxes=(ImplicitVRLittleEndian,))
    implicit_only.start()
    fixed = Destination(port=port)
    try:
        d = start(daemons, forward_toml(port, idle_close=600))
        first, second = ct(generate_uid(prefix=None)), ct(generate_uid(prefix=None))
        assert send(d.port, [second], syntax=ExplicitVRLittleEndian) == [0]  # nothing accepted
        wait_for(lambda: "forward.dead" in d.log(), timeout=20)
        assert send(d.port, [first]) == [0]  # Implicit: delivered, its association kept idle
        wait_for(lambda: len(implicit_only.received) == 1, timeout=20)
        listed = forward_cli(daemons, d, "--list-dead").stdout.splitlines()
        assert len(listed) == 1
        reason = listed[0].split("\t")[-1]
        assert "1.2.840.10008.5.1.4.1.1.2" in reason and ExplicitVRLittleEndian in reason, reason
        implicit_only.stop()
        fixed.start()  # the same port, now taking every syntax
        requeued = forward_cli(daemons, d, "--retry-dead", "pacs")
        assert "1 dead letters re-queued" in requeued.stdout, requeued.stderr
        wait_for(lambda: fixed.uids() == [str(second.SOPInstanceUID)], timeout=30)
        assert forward_cli(daemons, d, "--list-dead").stdout == ""
    finally:
        implicit_only.stop()
        fixed.stop()


def test_give_up_after_counts_from_receipt_also_for_objects_never_tried(
    daemons: DaemonFactory, destination: Destination
) -> None:
    """#34 item 11: a destination that is down rests and tries one object; the others were
    never tried and must expire all the same, give_up_after seconds after their receipt."""
    d = start(daemons, forward_toml(destination.port, give_up_after=3, backoff=1, backoff_max=1))
    objects = studies(3, 2)
    assert send(d.port, objects) == [0] * 6
    wait_for(lambda: d.log().count("forward.dead") == 6, timeout=20)
    listed = forward_cli(daemons, d, "--list-dead").stdout.splitlines()
    assert len(listed) == 6
    assert sum("never tried" in line for line in listed) >= 3, listed
    assert all("gave up after" in line for line in listed)
    destination.start()
    requeued = forward_cli(daemons, d, "--retry-dead", "pacs")
    assert "6 dead letters re-queued" in requeued.stdout  # counted anew from the re-queue
    wait_for(lambda: len(destination.received) == 6, timeout=30)
