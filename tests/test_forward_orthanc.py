"""Forwarding to Orthanc (Debian's 1.10.1) as the destination, in a network namespace of the
test's own: a backlog built while Orthanc is down, kill -9 of dcmrecvd while it drains, and
the oracle: Orthanc's SOP Instance UIDs equal the acknowledged set, each study in receive order."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROFILES, dcmrecvd_cmd, free_port, isolated_env, wait_for
from forward_peers import forward_toml, studies
from orthanc_peer import Namespace, orthanc_up, own_namespace

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("Orthanc") or not shutil.which("curl") or not shutil.which("ip"),
    reason="needs root (network namespaces), Debian's orthanc and curl",
)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    yield from own_namespace()


def start_receiver(
    ns: Namespace, tmp_path: Path, etc: Path, out: Path, port: int, n: int
) -> subprocess.Popen[bytes]:
    log = tmp_path / f"dcmrecvd{n}.log"
    proc = ns.spawn(
        [*dcmrecvd_cmd(), "-v", "-aet", "RCV", "-od", str(out), "-xf", str(PROFILES), "Default", str(port)],
        log,
        env=isolated_env(etc, NO_COLOR="1"),
    )
    wait_for(lambda: "daemon.ready" in log.read_text(errors="replace"), timeout=30)
    return proc


def held(ns: Namespace, http: int) -> list[str]:
    """SOP Instance UIDs in Orthanc, in the order they first arrived (its change log)."""
    by_id = {i["ID"]: i["MainDicomTags"]["SOPInstanceUID"] for i in ns.http(http, "GET", "/instances?expand")}
    order: list[str] = []
    since = 0
    while True:
        page = ns.http(http, "GET", f"/changes?since={since}&limit=1000")
        for change in page["Changes"]:
            if change["ChangeType"] == "NewInstance" and change["ID"] in by_id:
                uid = by_id[change["ID"]]
                if uid not in order:
                    order.append(uid)
        since = page["Last"]
        if page["Done"]:
            return order


def test_a_backlog_drains_into_orthanc_across_kill_9_in_order(netns: Namespace, tmp_path: Path) -> None:
    dicom, http = free_port(), free_port()
    receiver = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dcmrecvd.toml").write_text(forward_toml(dicom, called_aet="ORTHANC", max_associations=4))
    out = tmp_path / "out"
    out.mkdir()
    proc = start_receiver(netns, tmp_path, etc, out, receiver, 0)
    objects = studies(5, 100)
    files = tmp_path / "objects"
    files.mkdir()
    paths = []
    for i, ds in enumerate(objects):
        paths.append(files / f"{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    sent = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns.name,
            "storescu",
            "-aec",
            "RCV",
            "127.0.0.1",
            str(receiver),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr[-2000:]
    log0 = tmp_path / "dcmrecvd0.log"
    wait_for(lambda: "forward.retry" in log0.read_text(errors="replace"), timeout=30)  # Orthanc is down

    orthanc_up(netns, tmp_path, ports=(dicom, http), DicomAet="ORTHANC")
    arrived = wait_for(lambda: (n := len(netns.http(http, "GET", "/instances"))) >= 50 and n, timeout=60)
    proc.send_signal(signal.SIGKILL)  # mid-backlog
    print(f"kill -9 with {arrived} of {len(objects)} in Orthanc")
    proc.wait(10)
    start_receiver(netns, tmp_path, etc, out, receiver, 1)
    wanted = {str(ds.SOPInstanceUID) for ds in objects}
    wait_for(lambda: len(netns.http(http, "GET", "/instances")) >= len(wanted), timeout=180, interval=0.5)
    order = held(netns, http)
    assert set(order) == wanted
    for study in {str(ds.StudyInstanceUID) for ds in objects}:
        in_study = [str(ds.SOPInstanceUID) for ds in objects if str(ds.StudyInstanceUID) == study]
        assert [u for u in order if u in set(in_study)] == in_study, "a study arrives in receive order"
