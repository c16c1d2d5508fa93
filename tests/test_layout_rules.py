"""output.layout's rules as the README states them (#34, items 1-7): names that stay unique,
dates that are read or become layout_missing, never invented; failure statuses only."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path, PurePosixPath

import pytest

from dcmrecvd.conf import config
from dcmrecvd.errors import ConfigError
from dcmrecvd.wire import layout
from dcmrecvd.wire.layout import FILE_NAME_MAX, LayoutError

pytestmark = pytest.mark.inprocess


SOP_INSTANCE, STUDY_TIME, STUDY_DATE, ACQ_DATETIME = 0x00080018, 0x00080030, 0x00080020, 0x0008002A
PATIENT_ID, IMAGE_TYPE = 0x00100020, 0x00080008


def render(template: str, values: dict[int, bytes]) -> PurePosixPath:
    return layout.parse(template).render(
        {SOP_INSTANCE: b"1.2.3.4\x00", **values},
        b"ISO_IR 192",
        {"calling_aet": "MOD", "called_aet": "STORE", "modality_prefix": "CT"},
        dt.datetime(2026, 12, 3, 14, 5, 6),
        "UNKNOWN",
    )


@pytest.mark.parametrize(
    "template",
    [
        "{StudyInstanceUID}/{SOPInstanceUID:hash8}.dcm",
        "{SOPInstanceUID[0:30]}.dcm",
        "{SOPInstanceUID:[0:30]}.dcm",
        "{uuid:hash8}",
        "{SOPInstanceUID:md5:[0:4]}",
    ],
)
def test_a_last_level_made_non_unique_by_a_modifier_is_refused(template: str) -> None:
    with pytest.raises(LayoutError):
        layout.parse(template)


def test_the_refusal_is_a_configuration_error_naming_the_key(tmp_path: Path) -> None:
    toml = '[output]\nlayout = "{StudyInstanceUID}/{SOPInstanceUID:hash8}"\n'
    (tmp_path / "dcmrecvd.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.key == "output.layout" and "unique" in str(info.value)


def test_an_unmodified_uid_beside_a_modified_one_is_enough() -> None:
    assert render("{SOPInstanceUID:hash8}_{SOPInstanceUID}", {}).name == (
        hashlib.sha256(b"1.2.3.4").hexdigest()[:8] + "_1.2.3.4"
    )


def test_an_empty_placeholder_is_refused() -> None:
    with pytest.raises(LayoutError, match="empty placeholder"):
        layout.parse("{}/{SOPInstanceUID}")
    with pytest.raises(LayoutError, match="empty placeholder"):
        layout.parse("{:upper}/{SOPInstanceUID}")


@pytest.mark.parametrize("value", [None, b"", b"  ", b"25", b"1", b"12:34", b"abcd"])
def test_an_absent_empty_or_malformed_time_is_layout_missing_never_midnight(value: bytes | None) -> None:
    values = {} if value is None else {STUDY_TIME: value}
    assert render("{StudyTime:%H%M}/{SOPInstanceUID}", values).parts[0] == "UNKNOWN"


@pytest.mark.parametrize("value", [None, b"", b"2023", b"20230230", b"2023-01-01"])
def test_an_absent_empty_or_malformed_date_is_layout_missing(value: bytes | None) -> None:
    values = {} if value is None else {STUDY_DATE: value}
    assert render("{StudyDate:%Y%m%d}/{SOPInstanceUID}", values).parts[0] == "UNKNOWN"


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (b"2023", "%Y", "2023"),
        (b"202301", "%Y-%m", "2023-01"),
        (b"202301", "%Y%m%d", "UNKNOWN"),  # less precise than the format asks: never invented
        (b"2023011512", "%Y%m%d%H", "2023011512"),
        (b"20230115123456.123456+0100", "%H%M%S", "123456"),
        (b"2023", "%H", "UNKNOWN"),
    ],
)
def test_reduced_precision_date_times_are_read_as_far_as_they_go(
    value: bytes, fmt: str, expected: str
) -> None:
    path = render(f"{{AcquisitionDateTime:{fmt}}}/{{SOPInstanceUID}}", {ACQ_DATETIME: value})
    assert path.parts[0] == expected


def test_a_time_with_hours_only_is_read_for_hours() -> None:
    assert render("{StudyTime:%H}/{SOPInstanceUID}", {STUDY_TIME: b"07"}).parts[0] == "07"
    assert render("{StudyTime:%H%M}/{SOPInstanceUID}", {STUDY_TIME: b"07"}).parts[0] == "UNKNOWN"


def test_a_multi_valued_value_uses_its_first_value() -> None:
    assert render("{ImageType}/{SOPInstanceUID}", {IMAGE_TYPE: b"ORIGINAL\\PRIMARY\\AXIAL"}).parts[0] == (
        "ORIGINAL"
    )


def test_a_hash_of_an_absent_value_is_layout_missing_not_the_hash_of_nothing() -> None:
    assert render("{PatientID:hash8}/{SOPInstanceUID}", {}).parts[0] == "UNKNOWN"
    assert render("{PatientID:sha256}/{SOPInstanceUID}", {PATIENT_ID: b""}).parts[0] == "UNKNOWN"


def test_a_file_name_leaves_room_for_a_second_copy_and_a_taken_name() -> None:
    name = render("{PatientID}_{PatientName}_{SOPInstanceUID}.dcm", {PATIENT_ID: "患".encode() * 64}).name
    assert len(name.encode()) <= FILE_NAME_MAX
    long = render("{PatientID}{PatientID}{PatientID}{PatientID}{SOPInstanceUID}", {PATIENT_ID: b"p" * 64})
    assert len(long.name.encode()) <= FILE_NAME_MAX


@pytest.mark.parametrize("status", [0x0107, 0x0116, 0x0000, 0xB000, 0xFE00])
def test_duplicate_status_accepts_failure_codes_only(tmp_path: Path, status: int) -> None:
    toml = f'[output]\nduplicates = "reject"\nduplicate_status = {status}\n'
    (tmp_path / "dcmrecvd.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.key == "output.duplicate_status"


@pytest.mark.parametrize("status", [0x0111, 0x0122, 0x0210, 0xA700, 0xC001])
def test_duplicate_status_takes_any_failure_code(tmp_path: Path, status: int) -> None:
    toml = f'[output]\nduplicates = "reject"\nduplicate_status = {status}\n'
    (tmp_path / "dcmrecvd.toml").write_text(toml)
    assert config.load(config_dir=tmp_path, environ={}).output.duplicate_status == status


def test_a_long_value_is_hashed_whole(daemons) -> None:  # type: ignore[no-untyped-def]
    """#34 item 2: values longer than the walk's usual 1,024-byte capture are hashed whole
    (two 2,000-character Patient IDs that share their first 1,100 characters differ)."""
    from conftest import wait_for
    from forward_peers import ct
    from peers import storescu_send
    from pydicom.uid import generate_uid

    (daemons.config_dir / "dcmrecvd.toml").write_text(
        '[output]\nlayout = "{PatientID:sha256}/{SOPInstanceUID}.dcm"\n'
    )
    d = daemons.start()
    ids = ["A" * 1100 + "x" * 900, "A" * 1100 + "y" * 900]
    datasets = []
    for patient in ids:
        ds = ct(generate_uid(prefix=None))
        ds.PatientID = patient
        datasets.append(ds)
    assert storescu_send(d.port, datasets, "STORESCU", "") == [0, 0]
    expected = {hashlib.sha256(p.encode()).hexdigest() for p in ids}
    wait_for(lambda: {p.name for p in d.output.iterdir() if p.is_dir()} == expected, timeout=20)
