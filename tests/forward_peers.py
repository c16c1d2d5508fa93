"""What forwarding tests share: a destination (a pynetdicom Storage SCP whose answers the test
sets), objects in studies, and the daemon's [[forward]] configuration."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import free_port
from peers import storescu_send
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Received:
    sop_instance_uid: str
    study_uid: str
    transfer_syntax: str
    calling_aet: str


@dataclass
class Destination:
    """A PACS stand-in.  ``answer(uid) -> status`` decides each C-STORE's status; ``calling``
    (when set) is the only calling AE accepted (others: A-ASSOCIATE-RJ permanent)."""

    port: int = field(default_factory=free_port)
    syntaxes: tuple[str, ...] = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit)
    calling: str | None = None
    answer: Callable[[str], int] = lambda uid: 0x0000
    received: list[Received] = field(default_factory=list)
    associations: int = 0
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, list(self.syntaxes))
        if self.calling is not None:
            ae.require_calling_aet = [self.calling]
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_ACCEPTED, self._accepted),
                (evt.EVT_REJECTED, self._rejected),
            ],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _accepted(self, _event: Any) -> None:
        with self.lock:
            self.associations += 1

    def _rejected(self, _event: Any) -> None:
        with self.lock:
            self.rejected += 1

    def _store(self, event: Any) -> int:
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        status = self.answer(uid)
        if status == 0:
            with self.lock:
                self.received.append(
                    Received(
                        uid,
                        str(ds.StudyInstanceUID),
                        str(event.context.transfer_syntax),
                        event.assoc.requestor.ae_title,
                    )
                )
        return status

    def uids(self) -> list[str]:
        with self.lock:
            return [r.sop_instance_uid for r in self.received]


def ct(study: str, n: int = 0) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.InstanceNumber = n
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 512
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def studies(count: int, per_study: int) -> list[Dataset]:
    """``count`` studies of ``per_study`` objects, interleaved as two modalities would send."""
    uids = [generate_uid(prefix=None) for _ in range(count)]
    return [ct(uids[s], n) for n in range(per_study) for s in range(count)]


def send(
    port: int, datasets: list[Dataset], calling: str = "MODALITY", syntax: str = ImplicitVRLittleEndian
) -> list[int]:
    """Store ``datasets`` in order on one association (DCMTK storescu)."""
    return storescu_send(port, datasets, calling, syntax)


def forward_toml(port: int, **settings: Any) -> str:
    table = {
        "name": "pacs",
        "host": "127.0.0.1",
        "port": port,
        "called_aet": "PACS",
        "backoff": 1,
        "backoff_max": 2,
    }
    table.update(settings)
    lines = ["[[forward]]"]
    for key, value in table.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def write_config(config_dir: Path, text: str) -> None:
    (config_dir / "dcmrecvd.toml").write_text(text)
