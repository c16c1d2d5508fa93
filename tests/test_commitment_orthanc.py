"""Storage Commitment against Orthanc (Debian's 1.10.1) as the modality.

Orthanc binds every interface, so it, dcmrecvd and every request to them run inside a
network namespace this test makes (``ip netns``) and removes, whatever happens.  Orthanc
stores through C-STORE on one association and asks for commitment (N-ACTION) on another,
then takes our N-EVENT-REPORT on an association we open to it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from commitment_peers import CT, MR, ct_dataset
from conftest import PROFILES, dcmrecvd_cmd, free_port, isolated_env, wait_for
from orthanc_peer import Namespace, orthanc_up, own_namespace
from pydicom.uid import generate_uid

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("Orthanc") or not shutil.which("curl") or not shutil.which("ip"),
    reason="needs root (network namespaces), Debian's orthanc and curl",
)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    yield from own_namespace()


def test_orthanc_hears_success_and_the_failure_reasons(netns: Namespace, tmp_path: Path) -> None:
    receiver_port = free_port()
    orthanc_dicom, http = orthanc_up(
        netns, tmp_path, {"rcv": {"AET": "RCV", "Host": "127.0.0.1", "Port": receiver_port}}
    )
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
