"""The fleet of docs/FLEET.md on real engines: three dcmrecvd nodes behind Debian's HAProxy
(the shipped etc/haproxy.cfg), delivering to Orthanc and publishing to RabbitMQ, in network
namespaces (``fleet``).  Each scenario's oracle: every object a sender saw acknowledged is in
Orthanc, has its ``object.stored`` message in RabbitMQ, and every node's forward backlog drains.

One fleet for the module (building it costs ~10 s); scenarios use studies of their own and
leave every node up and UP in HAProxy.  ``make fleet-test`` runs this file alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from fleet import NODES, Fleet, Sent, cpu_seconds
from forward_peers import ct
from pydicom.uid import generate_uid

pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("haproxy", "rabbitmq-server", "storescu")),
        reason="namespaces, loop mounts and the fleet's engines (root, haproxy, rabbitmq-server, orthanc)",
    ),
]

ALL_UP = {"rcv1": "UP", "rcv2": "UP", "rcv3": "UP"}
#: Figures for the issue's note, printed at the end of the module (pytest -s shows them).
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        f.build_network()
        f.start_archive()
        for name in NODES:
            f.make_node(name)
            f.start_node(name)
        f.start_balancer()
        wait_for(lambda: f.states() == ALL_UP, timeout=30, interval=0.2)
        yield f
    finally:
        f.close()
        for key, value in FIGURES.items():
            print(f"fleet figure: {key}: {value}")


def studies(fleet: Fleet, name: str, count: int, per_study: int) -> list[list[Path]]:
    """``count`` studies of ``per_study`` small CT objects, written for the senders."""
    folder = fleet.tmp / name
    folder.mkdir()
    out = []
    for s in range(count):
        uid = generate_uid(prefix=None)
        files = []
        for n in range(per_study):
            path = folder / f"s{s}-{n:04d}.dcm"
            ct(uid, n).save_as(path, enforce_file_format=True)
            files.append(path)
        out.append(files)
    return out


def uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def send_all(fleet: Fleet, work: list[list[Path]], senders: int = 3, **where: Any) -> list[Sent]:
    """Each sender its studies one after another (study i goes to sender i % senders);
    through the balancer, or ``host`` and ``port``."""
    results: list[Sent] = [Sent() for _ in range(senders)]

    def sender(i: int) -> None:
        for study in work[i::senders]:
            got = fleet.send(study, calling=f"MODALITY{i}", **where)
            results[i].acked += got.acked
            results[i].failures += got.failures
            results[i].attempts += got.attempts

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def check_oracle(fleet: Fleet, work: list[list[Path]], results: list[Sent], timeout: float = 120) -> set[str]:
    """Everything acknowledged is archived and published; every backlog drains."""
    sent = {uid_of(p) for study in work for p in study}
    acked = {uid_of(p) for r in results for p in r.acked}
    assert acked == sent, f"{len(sent - acked)} objects never acknowledged"
    wait_for(lambda: acked <= fleet.archived(), timeout=timeout, interval=0.5)
    assert fleet.archived() & sent == acked
    wait_for(lambda: all(fleet.backlog_drained(n) for n in NODES), timeout=timeout, interval=0.5)
    published: set[str] = set()

    def all_published() -> bool:
        published.update(
            str(m["sop_instance_uid"]) for m in fleet.published() if m.get("event") == "object.stored"
        )
        return acked <= published

    wait_for(all_published, timeout=timeout, interval=0.5)
    return acked


def stored_on(fleet: Fleet, name: str, uids: set[str]) -> int:
    return sum(
        1 for p in fleet.nodes[name].output.rglob("*") if p.is_file() and p.name.split(".", 1)[-1] in uids
    )


def test_steady_state_spreads_three_senders_over_the_nodes(fleet: Fleet) -> None:
    work = studies(fleet, "steady", 6, 60)
    assert fleet.balancer is not None
    pids = {"haproxy": fleet.balancer.pid, **{n: fleet.nodes[n].proc.pid for n in NODES}}  # type: ignore[union-attr]
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    results = send_all(fleet, work)
    seconds = time.monotonic() - started
    cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
    assert all(r.failures == [] for r in results), results
    acked = check_oracle(fleet, work, results)
    queues = fleet.rabbitmqctl("list_queues", "-q", "name", "type").stdout.split()
    assert queues[queues.index("dcmrecvd-events") + 1] == "quorum", queues
    spread = {n: stored_on(fleet, n, acked) for n in NODES}
    assert all(count > 0 for count in spread.values()), spread
    FIGURES["steady, 3 nodes, 3 senders"] = f"{len(acked) / seconds:.0f} objects/s through HAProxy ({spread})"
    FIGURES["CPU per object while sending"] = ", ".join(  # a node's: per object it received
        f"{name} {1000 * seconds / (spread.get(name) or len(acked)):.2f} ms" for name, seconds in cpu.items()
    )


def test_one_node_alone_for_the_rate(fleet: Fleet) -> None:
    """The same load with rcv2 and rcv3 in maintenance: what one node takes behind the balancer."""
    for server in ("rcv2", "rcv3"):  # the agent first: its "ready" would lift the maintenance
        fleet.admin_command(f"disable agent dcmrecvd/{server}")
        fleet.admin_command(f"disable server dcmrecvd/{server}")
    try:
        wait_for(lambda: fleet.states() == {"rcv1": "UP", "rcv2": "MAINT", "rcv3": "MAINT"}, timeout=20)
        work = studies(fleet, "alone", 6, 60)
        started = time.monotonic()
        results = send_all(fleet, work)
        seconds = time.monotonic() - started
        acked = check_oracle(fleet, work, results)
        assert stored_on(fleet, "node2", acked) == stored_on(fleet, "node3", acked) == 0
        FIGURES["1 node, 3 senders"] = f"{len(acked) / seconds:.0f} objects/s through HAProxy"
    finally:
        for server in ("rcv2", "rcv3"):
            fleet.admin_command(f"enable server dcmrecvd/{server}")
            fleet.admin_command(f"enable agent dcmrecvd/{server}")
        wait_for(lambda: fleet.states() == ALL_UP, timeout=30, interval=0.2)


def test_kill_9_of_a_node_mid_study_loses_nothing(fleet: Fleet) -> None:
    """Senders that lose their association retry the rest on a new one (HAProxy sends it to
    the others); the killed node restarts and delivers what it had acknowledged."""
    work = studies(fleet, "kill", 3, 60)
    victim = fleet.nodes["node2"]
    before = sum(1 for _ in victim.output.rglob("*"))
    killed_at: list[float] = []

    def killer() -> None:
        wait_for(lambda: sum(1 for _ in victim.output.rglob("*")) >= before + 10, timeout=60, interval=0.02)
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        killed_at.append(time.monotonic())

    thread = threading.Thread(target=killer)
    thread.start()
    results = send_all(fleet, work)
    thread.join(60)
    assert killed_at, "the node was never killed"
    assert any(r.failures for r in results), "no sender lost its association: the kill came too late"
    wait_for(lambda: fleet.states().get("rcv2", "").startswith("DOWN"), timeout=30, interval=0.2)
    fleet.start_node("node2")
    wait_for(lambda: fleet.states() == ALL_UP, timeout=30, interval=0.2)
    acked = check_oracle(fleet, work, results)
    last_in = time.monotonic() - killed_at[0]
    copies = sum(stored_on(fleet, n, acked) for n in NODES) - len(acked)
    assert "journal.recovered" in victim.log.read_text() or "daemon.ready" in victim.log.read_text()
    FIGURES["kill -9"] = (
        f"last acknowledged object in Orthanc within {last_in:.1f} s of the kill (restart included); "
        f"{copies} objects stored twice (sent again after the kill, so delivered twice; Orthanc keeps one)"
    )


def test_a_node_cut_off_from_the_archive_keeps_receiving_and_catches_up(fleet: Fleet) -> None:
    fleet.partition("node3", "archive", cut=True)
    try:
        work = studies(fleet, "partition", 3, 20)
        results = send_all(fleet, work)
        assert all(r.failures == [] for r in results)
        acked = {uid_of(p) for r in results for p in r.acked}
        on_node3 = stored_on(fleet, "node3", acked)
        assert on_node3 > 0
        wait_for(
            lambda: fleet.metric("node3", 'dcmrecvd_forward_queue{destination="archive"}') > 0, timeout=20
        )
        code, body = fleet.http("node3", "/readyz")
        assert code == 200 and "forwarding:" in body, body  # ready to receive, and says it is behind
        assert fleet.states()["rcv3"] == "UP"
    finally:
        fleet.partition("node3", "archive", cut=False)
    check_oracle(fleet, work, results)
    code, body = fleet.http("node3", "/readyz")
    assert code == 200 and "forwarding" not in body


def test_a_rolling_restart_refuses_and_aborts_nothing(fleet: Fleet) -> None:
    """SIGTERM each node in turn under load: the agent says drain first, HAProxy stops sending
    there, the associations in flight finish; no sender sees a failure."""
    work = studies(fleet, "rolling", 12, 10)
    results: list[Sent] = []
    done = threading.Event()

    def load() -> None:
        results.extend(send_all(fleet, work))
        done.set()

    thread = threading.Thread(target=load)
    thread.start()
    for name in NODES:
        node = fleet.nodes[name]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0
        fleet.start_node(name)
        wait_for(lambda: fleet.states() == ALL_UP, timeout=30, interval=0.2)
    thread.join(600)
    assert done.is_set()
    failures = [f for r in results for f in r.failures]
    assert failures == [], failures[:3]
    check_oracle(fleet, work, results)
    for name in NODES:
        assert "daemon.stopping" in fleet.nodes[name].log.read_text()


def test_a_full_disk_drains_its_node_and_the_others_take_the_load(fleet: Fleet) -> None:
    node = fleet.nodes["node1"]
    free = os.statvfs(node.mount).f_bavail * os.statvfs(node.mount).f_frsize
    filler = node.mount / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - (16 << 20))  # below its 48 MiB watermark
    try:
        wait_for(lambda: fleet.states().get("rcv1", "").startswith("DRAIN"), timeout=30, interval=0.2)
        work = studies(fleet, "full", 3, 20)
        results = send_all(fleet, work)
        assert all(r.failures == [] for r in results)
        acked = check_oracle(fleet, work, results)
        assert stored_on(fleet, "node1", acked) == 0
        assert stored_on(fleet, "node2", acked) > 0 and stored_on(fleet, "node3", acked) > 0
        assert "disk.low" in node.log.read_text()
    finally:
        filler.unlink()
    wait_for(lambda: fleet.states() == ALL_UP, timeout=30, interval=0.2)
