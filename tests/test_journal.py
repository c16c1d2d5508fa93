"""Native journal entries, read back from a private systemd-journald."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, need
from datasets import make_dataset, write

from dcmrecvd.ops.logs import message_id

pytestmark = pytest.mark.systemd

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, str]], str, Path]:
    """Run the scenario once beside a private journald; return its entries."""
    need("unshare")
    need("journalctl")
    base = tmp_path_factory.mktemp("journal")
    out = base / "out"
    out.mkdir()
    config_dir = base / "etc"
    config_dir.mkdir()
    ds = make_dataset(rows=16, columns=16)
    path = write(ds, base / "one.dcm")
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            str(SCENARIOS / "private_journal.sh"),
            str(base / "j"),
            sys.executable,
            str(SCENARIOS / "journal_scenario.py"),
            str(out),
            str(config_dir),
            str(path),
            "JTEST",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dump = subprocess.run(
        ["journalctl", "-D", str(base / "j" / "log"), "-o", "json", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    )
    entries = [json.loads(line) for line in dump.stdout.splitlines() if line.strip()]
    return entries, str(ds.SOPInstanceUID), out


def ours(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "dcmrecvd" and "DCMRECVD_EVENT" in e]


def test_store_entry_has_dicom_fields(journal: tuple[list[dict[str, str]], str, Path]) -> None:
    entries, uid, out = journal
    (entry,) = [e for e in ours(entries) if e.get("DICOM_SOP_INSTANCE_UID") == uid]
    assert entry["DCMRECVD_EVENT"] == "store.completed"
    assert entry["MESSAGE_ID"] == message_id("store.completed")
    assert entry["PRIORITY"] == "6"
    assert entry["DICOM_CALLING_AET"] == "JTEST"
    assert entry["DICOM_CALLED_AET"] == "ANY-SCP"
    assert entry["DICOM_PEER"].startswith("127.0.0.1:")
    assert entry["DICOM_SOP_CLASS_UID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert entry["DICOM_STATUS"] == "0x0000"
    assert int(entry["DICOM_BYTES"]) > 512
    assert float(entry["DICOM_DURATION_MS"]) >= 0
    assert entry["DICOM_FILE"] == str(out / f"CT.{uid}")
    assert Path(entry["DICOM_FILE"]).is_file()
    assert entry["DICOM_ASSOCIATION_ID"]


def test_association_events_share_the_association_id(journal: tuple[list[dict[str, str]], str, Path]) -> None:
    entries, uid, _ = journal
    store = next(e for e in ours(entries) if e.get("DICOM_SOP_INSTANCE_UID") == uid)
    same = [
        e["DCMRECVD_EVENT"]
        for e in ours(entries)
        if e.get("DICOM_ASSOCIATION_ID") == store["DICOM_ASSOCIATION_ID"]
    ]
    assert "assoc.accepted" in same and "assoc.released" in same


def test_lifecycle_events_and_stable_ids(journal: tuple[list[dict[str, str]], str, Path]) -> None:
    entries, _, _ = journal
    events = {e["DCMRECVD_EVENT"]: e for e in ours(entries)}
    assert {"daemon.ready", "daemon.stopping", "daemon.stopped"} <= set(events)
    for name, entry in events.items():
        assert entry["MESSAGE_ID"] == message_id(name)
        assert len(entry["MESSAGE_ID"]) == 32


def test_no_plain_stderr_lines(journal: tuple[list[dict[str, str]], str, Path]) -> None:
    """Under journald everything is a structured entry: nothing went through stderr as text."""
    entries, _, _ = journal
    plain = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "dcmrecvd" and "DCMRECVD_EVENT" not in e]
    assert plain == []
