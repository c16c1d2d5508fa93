"""Datasets for the walk's tests, in-process and against the daemon: one well-formed base
and the malformed variants real and hostile senders produce."""

from __future__ import annotations

import random
import struct

from datasets import make_dataset
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dcmrecvd.wire import uids

INSTANCE_UID = "1.2.3.4.5"
#: pydicom's own corpus holds three files that are not what they claim: a JPEG file whose
#: dataset is Implicit VR under an Explicit VR transfer syntax, and two truncated ones.
NOT_WELL_FORMED = {"SC_rgb_jpeg.dcm", "rtplan_truncated.dcm", "MR_truncated.dcm"}


def encode(ds: Dataset, transfer_syntax: str = uids.EXPLICIT_LE) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != uids.EXPLICIT_BE
    buf.is_implicit_VR = transfer_syntax == uids.IMPLICIT_LE
    write_dataset(buf, ds)
    return buf.getvalue()


def base_dataset() -> Dataset:
    ds = make_dataset(rows=16, columns=16, instance_uid=INSTANCE_UID)
    item = Dataset()
    item.CodeValue = "113691"
    item.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.ProcedureCodeSequence = Sequence([item])
    return ds


def explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def malformed_cases() -> dict[str, tuple[bytes, str]]:
    """Name -> (dataset bytes for Explicit VR Little Endian, words the refusal must contain)."""
    good = encode(base_dataset())
    pixel_at = good.index(b"\xe0\x7f\x10\x00")
    pixel_header = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 10_000_000)
    unclosed = (
        explicit(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00")
        + explicit(0x00080018, b"UI", INSTANCE_UID.encode() + b"\x00")
        + struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    )
    rnd = random.Random(7)
    return {
        "random bytes": (rnd.randbytes(4096), ""),
        "cut inside pixel data": (good[:-100], "ends inside element (7FE0,0010)"),
        "cut inside an element header": (good[: pixel_at + 5], "ends inside an element header"),
        "pixel data of 10 MB with 2 KB present": (
            good[:pixel_at] + pixel_header + bytes(2048),
            "ends inside",
        ),
        "invalid VR": (good.replace(b"CS\x02\x00CT", b"ZZ\x02\x00CT"), "invalid VR"),
        "trailing bytes": (good + b"\x01\x02\x03", "ends inside an element header"),
        "100 KB garbage after the dataset": (good + rnd.randbytes(100_000), ""),
        "empty dataset": (b"", "empty dataset"),
        "Implicit VR bytes on Explicit VR": (encode(base_dataset(), uids.IMPLICIT_LE), ""),
        "unclosed sequence": (unclosed, "unclosed"),
        "item delimiter at the top level": (good + struct.pack("<HHI", 0xFFFE, 0xE00D, 0), "delimiter"),
    }


def with_sop_instance_uid(raw: bytes) -> bytes:
    """The base dataset with these exact bytes as its SOP Instance UID (pydicom would clean them)."""
    value = INSTANCE_UID.encode() + b"\x00"
    good = encode(base_dataset())
    assert good.count(explicit(0x00080018, b"UI", value)) == 1
    padded = raw + b"\x00" * (len(raw) % 2)
    return good.replace(explicit(0x00080018, b"UI", value), explicit(0x00080018, b"UI", padded))
