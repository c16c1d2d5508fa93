"""Storage Commitment SCP with a real modality (pynetdicom, strict about roles) and by hand."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from commitment_peers import (
    CT,
    IMPLICIT,
    MODALITY,
    MR,
    SC,
    Modality,
    action_command,
    action_dataset,
    config_text,
    ct_dataset,
    n_action,
    status_of,
    store,
    write_config,
)
from conftest import Daemon, DaemonFactory, wait_for
from peers import RawClient
from pydicom.uid import generate_uid
from pynetdicom import AE

from dcmrecvd.wire import pdu

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def modality() -> Iterator[Modality]:
    m = Modality()
    try:
        yield m
    finally:
        m.stop()


def start(
    daemons: DaemonFactory, modality: Modality, output: Path | None = None, **settings: object
) -> Daemon:
    write_config(daemons.config_dir, config_text(modality.port, **settings))
    d = daemons.start(output=output)
    wait_for(lambda: "daemon.ready" in d.log(), timeout=20)
    return d


def test_a_report_names_every_item_once_with_its_reason(daemons: DaemonFactory, modality: Modality) -> None:
    modality.start()
    d = start(daemons, modality)
    stored = [ct_dataset() for _ in range(3)]
    assert store(d.port, stored) == [0, 0, 0]
    unknown = (CT, generate_uid())
    wrong_class = (MR, str(stored[0].SOPInstanceUID))
    items = [(CT, str(ds.SOPInstanceUID)) for ds in stored] + [unknown, wrong_class]
    tx = generate_uid()
    # Asked at once after the last C-STORE-RSP: an object acknowledged a moment ago is found.
    response = n_action(d.port, action_dataset(tx, items))
    assert status_of(response) == 0x0000
    assert response[0x1008] == b"\x01\x00"  # the Action Type ID echoed
    wait_for(lambda: modality.reports, timeout=20)
    (report,) = modality.reports
    assert report.transaction_uid == tx
    assert report.event_type == 2
    assert report.committed == items[:3]
    assert sorted(report.failed) == sorted([(*unknown, 0x0112), (*wrong_class, 0x0119)])
    assert report.role == (False, True), "the report's association proposes the role item (SCU=0, SCP=1)"
    assert report.syntaxes[0] == IMPLICIT
    wait_for(lambda: "commitment.reported" in d.log(), timeout=10)


def test_all_committed_is_event_type_1(daemons: DaemonFactory, modality: Modality) -> None:
    modality.start()
    d = start(daemons, modality, verify="checksum")
    stored = [ct_dataset() for _ in range(2)]
    assert store(d.port, stored) == [0, 0]
    items = [(CT, str(ds.SOPInstanceUID)) for ds in stored]
    assert (
        status_of(
            n_action(
                d.port, action_dataset(generate_uid(), items, explicit=True), syntax="1.2.840.10008.1.2.1"
            )
        )
        == 0
    )
    wait_for(lambda: modality.reports, timeout=20)
    assert modality.reports[0].event_type == 1 and modality.reports[0].committed == items


def test_checksum_verification_on_both_sides_of_the_inline_limit(
    daemons: DaemonFactory, modality: Modality
) -> None:
    """#34 item 13: an object larger than journal.inline_max_kib streams into its own file;
    its CRC-32 is kept on the way, so checksum verification commits it, and catches a change."""
    modality.start()
    d = start(daemons, modality, verify="checksum")
    small, large = ct_dataset(), ct_dataset()
    large.PixelData = bytes(range(256)) * 512  # 128 KiB: over the 64 KiB of a journal record
    assert store(d.port, [small, large]) == [0, 0]
    items = [(CT, str(small.SOPInstanceUID)), (CT, str(large.SOPInstanceUID))]
    assert status_of(n_action(d.port, action_dataset(generate_uid(), items))) == 0
    wait_for(lambda: modality.reports, timeout=20)
    assert modality.reports[0].event_type == 1 and modality.reports[0].committed == items
    path = next(p for p in d.output.rglob("*") if str(large.SOPInstanceUID) in p.name)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # the same size, another content
    path.write_bytes(bytes(data))
    assert status_of(n_action(d.port, action_dataset(generate_uid(), items))) == 0
    wait_for(lambda: len(modality.reports) == 2, timeout=20)
    assert modality.reports[1].committed == items[:1]
    assert modality.reports[1].failed == [(CT, str(large.SOPInstanceUID), 0x0110)]


def test_a_file_deleted_behind_our_back_is_no_such_instance(
    daemons: DaemonFactory, modality: Modality
) -> None:
    modality.start()
    d = start(daemons, modality)
    ds = ct_dataset()
    assert store(d.port, [ds]) == [0]
    path = wait_for(lambda: next((p for p in d.output.rglob("*") if str(ds.SOPInstanceUID) in p.name), None))
    path.unlink()
    assert status_of(n_action(d.port, action_dataset(generate_uid(), [(CT, str(ds.SOPInstanceUID))]))) == 0
    wait_for(lambda: modality.reports, timeout=20)
    assert modality.reports[0].failed == [(CT, str(ds.SOPInstanceUID), 0x0112)]


def test_a_listener_that_is_down_gets_exactly_one_report_once_it_is_up(
    daemons: DaemonFactory, modality: Modality
) -> None:
    d = start(daemons, modality)
    ds = ct_dataset()
    assert store(d.port, [ds]) == [0]
    tx = generate_uid()
    assert status_of(n_action(d.port, action_dataset(tx, [(CT, str(ds.SOPInstanceUID))]))) == 0
    wait_for(lambda: d.log().count("commitment.delivery_failed") >= 2, timeout=20)  # tried, and again
    modality.start()
    wait_for(lambda: "commitment.reported" in d.log(), timeout=20)
    assert [r.transaction_uid for r in modality.reports] == [tx]
    # Nothing more comes: the next retry would have been due within retry_max (2 s).
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert len(modality.reports) == 1
        time.sleep(0.1)


def test_a_promised_report_survives_kill_9(daemons: DaemonFactory, modality: Modality) -> None:
    d = start(daemons, modality)
    ds = ct_dataset()
    assert store(d.port, [ds]) == [0]
    tx = generate_uid()
    assert status_of(n_action(d.port, action_dataset(tx, [(CT, str(ds.SOPInstanceUID))]))) == 0
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    modality.start()
    again = daemons.start(output=d.output)
    wait_for(lambda: modality.reports, timeout=30)
    assert [(r.transaction_uid, r.event_type) for r in modality.reports] == [(tx, 1)]
    assert again.stop() == 0


def test_a_repeated_transaction_is_one_report(daemons: DaemonFactory, modality: Modality) -> None:
    d = start(daemons, modality)
    ds = ct_dataset()
    assert store(d.port, [ds]) == [0]
    tx, items = generate_uid(), [(CT, str(ds.SOPInstanceUID))]
    assert status_of(n_action(d.port, action_dataset(tx, items))) == 0
    assert status_of(n_action(d.port, action_dataset(tx, items))) == 0
    other = n_action(d.port, action_dataset(tx, [(CT, generate_uid())]))
    assert status_of(other) == 0x0110 and b"other instances" in other[0x0902]
    modality.start()
    wait_for(lambda: "commitment.reported" in d.log(), timeout=20)
    time.sleep(1.5)  # one more retry interval: a second report would be on its way
    assert [r.transaction_uid for r in modality.reports] == [tx]


@pytest.mark.parametrize(
    ("command", "dataset", "status"),
    [
        ({"action_type": 2}, action_dataset("1.2.3", [(CT, "1.2.3.4")]), 0x0123),
        ({"action_type": None}, action_dataset("1.2.3", [(CT, "1.2.3.4")]), 0x0123),
        ({"sop_class": CT}, action_dataset("1.2.3", [(CT, "1.2.3.4")]), 0x0118),
        ({"sop_instance": "1.2.3"}, action_dataset("1.2.3", [(CT, "1.2.3.4")]), 0x0117),
        ({}, action_dataset(None, [(CT, "1.2.3.4")]), 0x0115),
        ({}, action_dataset("1.2.3", None), 0x0115),
        ({}, action_dataset("1.2.3", []), 0x0115),
        ({}, action_dataset("1.2.3", [(CT, "")]), 0x0115),
        ({}, action_dataset("1.2.3", [(CT, "1.2.03.x/../../etc")]), 0x0115),
        ({}, action_dataset("not a uid", [(CT, "1.2.3.4")]), 0x0115),
        ({}, None, 0x0115),
        ({}, b"\x08\x00\x95\x11\xff\xff\x00\x00garbage", 0x0115),
    ],
    ids=[
        "action-2",
        "no-action-type",
        "wrong-class",
        "wrong-instance",
        "no-transaction",
        "no-sequence",
        "empty-sequence",
        "item-without-uid",
        "item-invalid-uid",
        "invalid-transaction",
        "no-dataset",
        "broken-length",
    ],
)
def test_hostile_requests_get_their_status(
    daemons: DaemonFactory, modality: Modality, command: dict[str, object], dataset: bytes | None, status: int
) -> None:
    d = start(daemons, modality)
    response = n_action(d.port, dataset, **command)
    assert status_of(response) == status
    assert "commitment.refused" in wait_for(lambda: "commitment.refused" in d.log() and d.log())
    # The association goes on: an echo on a new one still works, nothing was promised.
    assert "commitment.requested" not in d.log()


def test_unknown_ae_gets_processing_failure_with_a_comment(
    daemons: DaemonFactory, modality: Modality
) -> None:
    d = start(daemons, modality)
    response = n_action(d.port, action_dataset("1.2.3", [(CT, "1.2.3.4")]), calling="STRANGER")
    assert status_of(response) == 0x0110
    assert b"STRANGER" in response[0x0902]
    wait_for(lambda: "commitment.unknown_peer" in d.log())


def test_an_n_action_on_another_context_is_refused(daemons: DaemonFactory, modality: Modality) -> None:
    d = start(daemons, modality)
    response = n_action(d.port, action_dataset("1.2.3", [(CT, "1.2.3.4")]), context=VERIFICATION)
    assert status_of(response) == 0x0122


def test_pending_queue_full_is_resource_limitation(daemons: DaemonFactory, modality: Modality) -> None:
    d = start(daemons, modality, max_pending=1)  # the modality is down: the first stays pending
    assert status_of(n_action(d.port, action_dataset(generate_uid(), [(CT, "1.2.3.4")]))) == 0
    assert status_of(n_action(d.port, action_dataset(generate_uid(), [(CT, "1.2.3.5")]))) == 0x0213


def test_too_many_items_is_resource_limitation(daemons: DaemonFactory, modality: Modality) -> None:
    d = start(daemons, modality, max_items=10)
    items = [(CT, f"1.2.3.{i}") for i in range(11)]
    assert status_of(n_action(d.port, action_dataset(generate_uid(), items))) == 0x0213


def test_a_disk_below_min_free_keeps_no_request(daemons: DaemonFactory, modality: Modality) -> None:
    """Below the watermark new associations are rejected (transient), as for C-STORE; an
    association opened before the disk went low gets 0x0213 for its N-ACTION."""
    write_config(daemons.config_dir, config_text(modality.port) + '\n[output]\nmin_free = "99%"\n')
    d = daemons.start()
    wait_for(lambda: "daemon.ready" in d.log(), timeout=20)
    client = RawClient(d.port)
    try:
        assert client.associate(SC, IMPLICIT, calling=MODALITY) == pdu.A_ASSOCIATE_RJ
        assert client.answer[1] == 2  # transient: the modality asks again later
    finally:
        client.close()
    assert "commitment.requested" not in d.log()


def test_an_n_action_right_after_the_disk_went_low_is_refused(
    daemons: DaemonFactory, modality: Modality, tmp_path: Path
) -> None:
    """#34 item 15: free space is sampled once a second; an N-ACTION reads it afresh."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        write_config(daemons.config_dir, config_text(modality.port) + '\n[output]\nmin_free = "1MiB"\n')
        d = daemons.start(output=small)
        wait_for(lambda: "daemon.ready" in d.log(), timeout=20)
        client = RawClient(d.port)
        try:
            assert client.associate(SC, IMPLICIT, calling=MODALITY) == pdu.A_ASSOCIATE_AC  # room now
            (small / "filler").write_bytes(bytes(3584 << 10))  # ...and none a moment later
            client.send_pdv(action_command(has_dataset=True), command=True, last=True)
            client.send_pdv(action_dataset(generate_uid(), [(CT, generate_uid())]), command=False, last=True)
            assert status_of(client.response()) == 0x0213
        finally:
            client.close()
        assert "commitment.requested" not in d.log()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_disabled_refuses_the_context_as_dcmrecv_does(daemons: DaemonFactory) -> None:
    d = daemons.start()
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(SC)
    assoc = ae.associate("127.0.0.1", d.port)
    try:
        assert not assoc.is_established or not [c for c in assoc.accepted_contexts if c.abstract_syntax == SC]
    finally:
        if assoc.is_established:
            assoc.release()


def test_100000_items_are_answered_without_stalling_others(
    daemons: DaemonFactory, modality: Modality
) -> None:
    modality.start()
    d = start(daemons, modality)
    items = [(CT, f"1.2.826.0.1.3680043.2.1143.{i}") for i in range(100_000)]
    dataset = action_dataset(generate_uid(), items)
    echoes: list[float] = []
    stop = threading.Event()

    def echo_loop() -> None:
        ae = AE(ae_title="ECHO")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", d.port)
        assert assoc.is_established
        while not stop.is_set():
            began = time.monotonic()
            assert assoc.send_c_echo().Status == 0
            echoes.append(time.monotonic() - began)
        assoc.release()

    thread = threading.Thread(target=echo_loop)
    thread.start()
    try:
        began = time.monotonic()
        response = n_action(d.port, dataset, timeout=120)
        answered = time.monotonic() - began
    finally:
        stop.set()
        thread.join(30)
    assert status_of(response) == 0x0000
    assert echoes and max(echoes) < 1.0, f"an echo waited {max(echoes):.2f} s"
    wait_for(lambda: modality.reports, timeout=120)
    report = modality.reports[0]
    assert report.event_type == 2 and len(report.failed) == 100_000 and not report.committed
    assert {r for _c, _i, r in report.failed} == {0x0112}
    print(f"100,000 items: answered in {answered:.2f} s")
