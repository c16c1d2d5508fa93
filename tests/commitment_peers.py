"""What Storage Commitment tests share: a strict pynetdicom modality that takes reports,
N-ACTION requests sent by hand, and objects to commit."""

from __future__ import annotations

import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import free_port
from peers import RawClient, storescu_send
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dcmrecvd.wire import pdu

SC = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
MODALITY = "MODALITY"


@dataclass
class Report:
    transaction_uid: str
    event_type: int
    committed: list[tuple[str, str]]
    failed: list[tuple[str, str, int]]
    #: The role item the requestor proposed for Storage Commitment: (SCU, SCP), or None.
    role: tuple[bool | None, bool | None] | None
    #: The transfer syntaxes it proposed for Storage Commitment, in its order.
    syntaxes: list[str]


@dataclass
class Modality:
    """A modality's report listener: accepts Storage Commitment only as the SCU of the
    report's association would need it (the requestor SCP), records every report."""

    port: int = field(default_factory=free_port)
    reports: list[Report] = field(default_factory=list)
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Listen with TLS (a server context, e.g. one that requires a client certificate).
    ssl_context: ssl.SSLContext | None = None

    def start(self) -> None:
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(
            StorageCommitmentPushModel, [IMPLICIT, EXPLICIT], scu_role=False, scp_role=True
        )
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)],
            ssl_context=self.ssl_context,
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _report(self, event: Any) -> tuple[int, None]:
        data = event.event_information  # decoded by pynetdicom from the dataset received
        requestor = event.assoc.requestor
        role_item = requestor.role_selection.get(SC)
        syntaxes = [
            str(ts)
            for c in requestor.requested_contexts
            if c.abstract_syntax == SC
            for ts in c.transfer_syntax
        ]
        report = Report(
            transaction_uid=str(data.TransactionUID),
            event_type=int(event.event_type),
            committed=[
                (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in data.get("ReferencedSOPSequence", [])
            ],
            failed=[
                (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
                for i in data.get("FailedSOPSequence", [])
            ],
            role=(role_item.scu_role, role_item.scp_role) if role_item is not None else None,
            syntaxes=syntaxes,
        )
        with self.lock:
            self.reports.append(report)
        return 0x0000, None


def ct_dataset(uid: str | None = None, study: str = "1.2.3.4") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 512
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def store(port: int, datasets: list[Dataset], calling: str = MODALITY) -> list[int]:
    """Store ``datasets`` in order on one association (DCMTK storescu)."""
    return storescu_send(port, datasets, calling, ImplicitVRLittleEndian)


def action_dataset(
    transaction: str | None, items: list[tuple[str, str]] | None, explicit: bool = False
) -> bytes:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    if items is not None:
        seq = []
        for sop_class, sop_instance in items:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            seq.append(item)
        ds.ReferencedSOPSequence = Sequence(seq)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, not explicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, tag, len(value)) + value


def action_command(
    message_id: int = 1,
    sop_class: str = SC,
    sop_instance: str = SC_INSTANCE,
    action_type: int | None = 1,
    has_dataset: bool = True,
) -> bytes:
    body = _element(0x0003, sop_class.encode())
    body += _element(0x0100, struct.pack("<H", 0x0130))
    body += _element(0x0110, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", 0x0000 if has_dataset else 0x0101))
    body += _element(0x1001, sop_instance.encode())
    if action_type is not None:
        body += _element(0x1008, struct.pack("<H", action_type))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def n_action(
    port: int,
    dataset: bytes | None,
    *,
    calling: str = MODALITY,
    context: str = SC,
    syntax: str = IMPLICIT,
    timeout: float = 60,
    **command: Any,
) -> dict[int, bytes]:
    """One N-ACTION on its own association; the response command's elements."""
    client = RawClient(port, timeout=timeout)
    try:
        assert client.associate(context, syntax, calling=calling) == pdu.A_ASSOCIATE_AC
        client.send_pdv(action_command(has_dataset=dataset is not None, **command), command=True, last=True)
        if dataset is not None:
            chunks = [dataset[i : i + 16000] for i in range(0, len(dataset), 16000)] or [b""]
            for n, chunk in enumerate(chunks):
                client.send_pdv(chunk, command=False, last=n == len(chunks) - 1)
        return client.response()
    finally:
        client.close()


def status_of(response: dict[int, bytes]) -> int:
    return int(struct.unpack("<H", response[0x0900])[0])


def config_text(modality_port: int, **commitment: Any) -> str:
    settings = {"enabled": True, "retry_initial": 1, "retry_max": 2, **commitment}
    lines = ["[commitment]"]
    for key, value in settings.items():
        lines.append(f"{key} = {_toml(value)}")
    lines += [
        "",
        "[[commitment.peer]]",
        f'aet = "{MODALITY}"',
        'host = "127.0.0.1"',
        f"port = {modality_port}",
    ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def write_config(config_dir: Path, text: str) -> None:
    (config_dir / "dcmrecvd.toml").write_text(text)
