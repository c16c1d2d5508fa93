"""Forwarding to Orthanc (Debian's 1.10.1) as the destination, in a network namespace of the
test's own: a backlog built while Orthanc is down, kill -9 of dcmrecvd while it drains, and
the oracle: Orthanc's SOP Instance UIDs equal the acknowledged set, each study in receive order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PROFILES, dcmrecvd_cmd, free_port, isolated_env, wait_for
from forward_peers import ct, forward_toml, studies
from orthanc_peer import Namespace, orthanc_up, own_namespace
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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


def send_in(ns: Namespace, port: int, datasets: list[Any], folder: Path, *options: str) -> None:
    """Write ``datasets`` and send them in order with storescu from inside ``ns``, calling RCV."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(folder / f"{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    argv = ["ip", "netns", "exec", ns.name, "storescu", *options, "-aec", "RCV", "127.0.0.1", str(port)]
    sent = subprocess.run([*argv, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0, sent.stderr[-2000:]


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
    send_in(netns, receiver, objects, tmp_path / "objects")
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


DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def dicomweb_orthanc(ns: Namespace, tmp_path: Path) -> tuple[int, int]:
    return orthanc_up(
        ns,
        tmp_path,
        Plugins=[DICOMWEB],
        DicomWeb={"Enable": True, "Root": "/dicom-web/"},
        AuthenticationEnabled=True,
        RegisteredUsers={"forwarder": "s3cret"},
    )


def authed(ns: Namespace, http: int, path: str) -> object:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns.name,
            "curl",
            "-sSf",
            "-u",
            "forwarder:s3cret",
            f"http://127.0.0.1:{http}{path}",
        ],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not Path(DICOMWEB).exists(), reason="needs Debian's orthanc-dicomweb")
def test_stow_rs_by_series_with_credentials(netns: Namespace, tmp_path: Path) -> None:
    _dicom, http = dicomweb_orthanc(netns, tmp_path)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dcmrecvd.toml").write_text(
        "[[forward]]\n"
        'name = "web"\ntype = "stowrs"\n'
        f'url = "http://127.0.0.1:{http}/dicom-web/studies"\n'
        f'username = "forwarder"\npassword_file = "{secret}"\nbatch = "series"\n'
        "backoff = 1\nbackoff_max = 2\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    receiver = free_port()
    start_receiver(netns, tmp_path, etc, out, receiver, 0)
    objects = studies(2, 6)
    for ds in objects[6:]:  # the second half of each study in a series of its own
        ds.SeriesInstanceUID = ds.StudyInstanceUID + ".2"
    send_in(netns, receiver, objects, tmp_path / "objects")
    wanted = {str(ds.SOPInstanceUID) for ds in objects}

    def held() -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in authed(netns, http, "/instances?expand")}  # type: ignore[attr-defined]

    wait_for(lambda: held() == wanted, timeout=60, interval=0.2)
    log = (tmp_path / "dcmrecvd0.log").read_text(errors="replace")
    assert "s3cret" not in log, "a credential is never logged"
    assert "forward.dead" not in log and "forward.paused" not in log


@pytest.mark.skipif(not Path(DICOMWEB).exists(), reason="needs Debian's orthanc-dicomweb")
def test_stow_rs_with_a_wrong_password_pauses_once(netns: Namespace, tmp_path: Path) -> None:
    _dicom, http = dicomweb_orthanc(netns, tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "token").write_text("not-a-token\n")
    (etc / "dcmrecvd.toml").write_text(
        "[[forward]]\n"
        'name = "web"\ntype = "stowrs"\n'
        f'url = "http://127.0.0.1:{http}/dicom-web/studies"\n'
        f'token_file = "{tmp_path / "token"}"\nbackoff = 1\nbackoff_max = 1\n'
    )
    out = tmp_path / "out"
    out.mkdir()
    receiver = free_port()
    start_receiver(netns, tmp_path, etc, out, receiver, 0)
    send_in(netns, receiver, studies(1, 5), tmp_path / "objects")
    log = tmp_path / "dcmrecvd0.log"
    wait_for(lambda: "forward.paused" in log.read_text(errors="replace"), timeout=30)
    text = log.read_text(errors="replace")
    assert text.count("forward.paused") == 1 and "401" in text
    assert "forward.retry" not in text and "forward.dead" not in text
    assert "not-a-token" not in text


def netns_cmd(ns: Namespace) -> list[str]:
    return ["ip", "netns", "exec", ns.name]


def jpeg(study: str) -> Any:
    """A CT object in JPEG Baseline (encapsulated bytes: never decoded on the way)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = ct(study, 50)
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 8, 8, 7, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\x00" * 60 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


@pytest.mark.parametrize("policy", ["as-received", "uncompressed-ok"])
def test_an_implicit_only_orthanc_gets_what_it_accepts(netns: Namespace, tmp_path: Path, policy: str) -> None:
    """JPEG is dead-lettered with a reason and the rest of its study goes on; an Explicit VR
    object is converted to Implicit only with uncompressed-ok."""
    dicom, http = free_port(), free_port()
    orthanc_up(netns, tmp_path, ports=(dicom, http), AcceptedTransferSyntaxes=["1.2.840.10008.1.2"])
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dcmrecvd.toml").write_text(forward_toml(dicom, called_aet="ORTHANC", transfer_syntax=policy))
    out = tmp_path / "out"
    out.mkdir()
    receiver = free_port()
    start_receiver(netns, tmp_path, etc, out, receiver, 0)
    study = generate_uid(prefix=None)
    implicit, explicit, compressed = ct(study, 1), ct(study, 2), jpeg(study)
    explicit.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Each alone, in its own syntax: storescu -R proposes only what the file holds (-xy: and
    # JPEG Baseline for the compressed one), so nothing is converted on the way.
    send_in(netns, receiver, [compressed], tmp_path / "jpeg", "-R", "-xy")
    send_in(netns, receiver, [implicit, explicit], tmp_path / "uncompressed", "-R")
    # dcmrecv's default (kept) stores uncompressed objects in Explicit VR Little Endian, which
    # this Orthanc refuses: sent as received they are dead letters too; converted, delivered.
    expected: set[str] = set()
    if policy == "uncompressed-ok":
        expected = {str(implicit.SOPInstanceUID), str(explicit.SOPInstanceUID)}
    log = tmp_path / "dcmrecvd0.log"
    dead = 1 if expected else 3
    wait_for(lambda: log.read_text(errors="replace").count("forward.dead") == dead, timeout=60)

    def held_now() -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in netns.http(http, "GET", "/instances?expand")}

    wait_for(lambda: held_now() == expected, timeout=30, interval=0.2)
    lines = [line for line in log.read_text(errors="replace").splitlines() if "forward.dead" in line]
    assert any(str(compressed.SOPInstanceUID) in line and "not accepted" in line for line in lines)
