"""Storage Commitment against Orthanc (Debian's 1.10.1) as the modality.

Orthanc binds every interface, so it, dcmrecvd and every request to them run inside a
network namespace this test makes (``ip netns``) and removes, whatever happens.  Orthanc
stores through C-STORE on one association and asks for commitment (N-ACTION) on another,
then takes our N-EVENT-REPORT on an association we open to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from commitment_peers import CT, MR, ct_dataset
from conftest import PROFILES, dcmrecvd_cmd, free_port, isolated_env, wait_for
from pydicom.uid import generate_uid

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("Orthanc") or not shutil.which("curl") or not shutil.which("ip"),
    reason="needs root (network namespaces), Debian's orthanc and curl",
)


class Namespace:
    """A network namespace of our own, with its loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.procs.append(proc)
        return proc

    def http(self, port: int, method: str, path: str, body: Any = None, data: bytes | None = None) -> Any:
        argv = ["ip", "netns", "exec", self.name, "curl", "-sS", "-f", "-X", method]
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        if payload is not None:
            argv += ["--data-binary", "@-"]
        result = subprocess.run(
            [*argv, f"http://127.0.0.1:{port}{path}"], input=payload, capture_output=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"{method} {path}: {result.stderr.decode(errors='replace')}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    ns = Namespace(f"dcmrc{os.getpid()}")
    try:
        yield ns
    finally:
        ns.close()


def orthanc_up(ns: Namespace, tmp_path: Path, receiver_port: int) -> tuple[int, int]:
    dicom, http = free_port(), free_port()
    storage = tmp_path / "orthanc"
    storage.mkdir()
    config = {
        "Name": "modality",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "HttpPort": http,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "OrthancExplorerEnabled": False,
        "SaveJobs": False,
        "Plugins": [],
        "DicomModalities": {"rcv": {"AET": "RCV", "Host": "127.0.0.1", "Port": receiver_port}},
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    proc = ns.spawn(["/usr/sbin/Orthanc", str(path)], tmp_path / "orthanc.log")

    def answers() -> bool:
        assert proc.poll() is None, (tmp_path / "orthanc.log").read_text(errors="replace")[-2000:]
        try:
            ns.http(http, "GET", "/system")
        except RuntimeError:
            return False
        return True

    wait_for(answers, timeout=60, interval=0.2)
    return dicom, http


def test_orthanc_hears_success_and_the_failure_reasons(netns: Namespace, tmp_path: Path) -> None:
    receiver_port = free_port()
    orthanc_dicom, http = orthanc_up(netns, tmp_path, receiver_port)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dcmrecvd.toml").write_text(
        "[commitment]\nenabled = true\nretry_initial = 1\n\n"
        f'[[commitment.peer]]\naet = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc_dicom}\n'
    )
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "dcmrecvd.log"
    netns.spawn(
        [
            *dcmrecvd_cmd(),
            "-v",
            "-aet",
            "RCV",
            "-od",
            str(out),
            "-xf",
            str(PROFILES),
            "Default",
            str(receiver_port),
        ],
        log,
        env=isolated_env(etc, NO_COLOR="1"),
    )
    wait_for(lambda: "daemon.ready" in log.read_text(errors="replace"), timeout=30)

    datasets = [ct_dataset() for _ in range(2)]
    ids = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ids.append(netns.http(http, "POST", "/instances", data=path.read_bytes())["ID"])
    answer = netns.http(
        http,
        "POST",
        "/modalities/rcv/store",
        {"Resources": ids, "StorageCommitment": True, "Synchronous": True},
    )
    committed_tx = answer["StorageCommitmentTransactionUID"]

    def outcome(tx: str) -> dict[str, Any] | None:
        state = netns.http(http, "GET", f"/storage-commitment/{tx}")
        return state if state["Status"] != "Pending" else None

    state = wait_for(lambda: outcome(committed_tx), timeout=60, interval=0.2)
    assert state["Status"] == "Success", state
    assert sorted(s["SOPInstanceUID"] for s in state["Success"]) == sorted(
        str(d.SOPInstanceUID) for d in datasets
    )

    unknown = generate_uid()
    answer = netns.http(
        http,
        "POST",
        "/modalities/rcv/storage-commitment",
        {"DicomInstances": [[CT, unknown], [MR, str(datasets[0].SOPInstanceUID)]]},
    )
    failed_tx = answer.get("StorageCommitmentTransactionUID") or answer["ID"]
    state = wait_for(lambda: outcome(failed_tx), timeout=60, interval=0.2)
    assert state["Status"] == "Failure", state
    reasons = {f["SOPInstanceUID"]: f["FailureReason"] for f in state["Failures"]}
    assert reasons == {unknown: 274, str(datasets[0].SOPInstanceUID): 281}
    wait_for(lambda: log.read_text(errors="replace").count("commitment.reported") == 2, timeout=10)
