"""output.layout: templates parsed strictly, hostile values made safe, and real senders' objects
at exactly the path the template gives, on the journal path, the per-file path and with +B."""

from __future__ import annotations

import datetime as dt
import hashlib
import signal
from pathlib import Path, PurePosixPath

import pytest
from conftest import DaemonFactory, need, per_file_config, run, wait_for
from forward_peers import ct
from peers import storescu_send
from pydicom.uid import generate_uid

from dcmrecvd.conf import config
from dcmrecvd.errors import ConfigError
from dcmrecvd.wire import layout
from dcmrecvd.wire.layout import LayoutError

PATIENT_ID, STUDY_DATE, SOP_INSTANCE = 0x00100020, 0x00080020, 0x00080018
WHEN = dt.datetime(2026, 12, 3, 14, 5, 6)


def render(template: str, values: dict[int, bytes], charset: bytes | None = None) -> PurePosixPath:
    return layout.parse(template).render(
        {SOP_INSTANCE: b"1.2.3.4\x00", **values},
        charset,
        {"calling_aet": "MOD 1", "called_aet": "STORE", "modality_prefix": "CT"},
        WHEN,
        "UNKNOWN",
    )


@pytest.mark.parametrize(
    ("value", "component"),
    [
        (b"../../etc", "_.._etc"),
        (b"..", "UNKNOWN"),
        (b".", "UNKNOWN"),
        (b"a/b\\c", "a_b"),  # a backslash separates values: the first one is used
        (b"a\x00b ", "a_b"),
        (b"", "UNKNOWN"),
        (b" .hidden. ", "hidden"),
        (b"x" * 1000, "x" * 55 + "-" + hashlib.sha256(b"x" * 1000).hexdigest()[:8]),
        (b"M\xfcller^Hans", "M\xfcller_Hans"),  # Latin-1 under ISO_IR 100
    ],
)
def test_a_value_becomes_one_safe_component(value: bytes, component: str) -> None:
    path = render("{PatientID}/{SOPInstanceUID}", {PATIENT_ID: value}, b"ISO_IR 100")
    assert path == PurePosixPath(component, "1.2.3.4")


def test_utf8_under_iso_ir_192_and_an_absent_value() -> None:
    name = "Ærøskøbing^Jürgen"
    assert render("{PatientID}/{SOPInstanceUID}", {PATIENT_ID: name.encode()}, b"ISO_IR 192").parts[0] == (
        "Ærøskøbing_Jürgen"
    )
    assert render("{PatientID}/{SOPInstanceUID}", {}).parts[0] == "UNKNOWN"


def test_modifiers() -> None:
    path = render(
        "{StudyDate:%Y/%m}/{PatientID:upper:[0:3]}_{PatientID:hash8}/{calling_aet:lower}/"
        "{received:%Y%m%d}_{modality_prefix}.{SOPInstanceUID}.dcm",
        {STUDY_DATE: b"20240131", PATIENT_ID: b"abcdef"},
    )
    assert path == PurePosixPath(
        "2024", "01", "ABC_" + hashlib.sha256(b"abcdef").hexdigest()[:8], "mod 1", "20261203_CT.1.2.3.4.dcm"
    )
    assert render("{PatientID:md5}/{uuid}", {PATIENT_ID: b"p"}).parts[0] == hashlib.md5(b"p").hexdigest()
    assert render("{StudyDate:%Y}/{SOPInstanceUID}", {STUDY_DATE: b"garbage"}).parts[0] == "UNKNOWN"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{PatientID}/x.dcm", "must hold {SOPInstanceUID} or {uuid}"),
        ("/{SOPInstanceUID}", "relative"),
        ("../{SOPInstanceUID}", "not a directory level"),
        ("a//{SOPInstanceUID}", "not a directory level"),
        ("{NoSuchKeyword}/{SOPInstanceUID}", "neither an attribute keyword"),
        ("{PixelData}/{SOPInstanceUID}", "Pixel Data"),
        ("{PatientID:%Y}/{SOPInstanceUID}", "unknown modifier"),
        ("{PatientID:shout}/{SOPInstanceUID}", "unknown modifier"),
        ("a*b/{SOPInstanceUID}", "literal text"),
        ("{PatientID/{SOPInstanceUID}", "unbalanced"),
    ],
)
def test_a_bad_template_is_refused(template: str, reason: str) -> None:
    with pytest.raises(LayoutError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        layout.parse(template)


def test_layout_with_dcmrecv_naming_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "dcmrecvd.toml").write_text(
        '[output]\nlayout = "{SOPInstanceUID}"\nsubdirectory = "series-date"\n'
    )
    with pytest.raises(ConfigError, match="cannot be set with it"):
        config.load(config_dir=tmp_path, environ={})
    (tmp_path / "dcmrecvd.toml").write_text('[output]\nlayout = "{SOPInstanceUID}"\nlayout_missing = ".."\n')
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.key == "output.layout_missing"


HOSTILE = ["../../etc", "..", "a/b", "x" * 1000, "", None]
TEMPLATE = "{PatientID}/{StudyInstanceUID:hash8}/{Modality}_{SOPInstanceUID}.dcm"


@pytest.mark.parametrize("mode", ["journal", "per-file", "bit-preserving"])
def test_every_object_at_exactly_its_path_and_nothing_outside(
    daemons: DaemonFactory, tmp_path: Path, mode: str
) -> None:
    (daemons.config_dir / "dcmrecvd.toml").write_text(f'[output]\nlayout = "{TEMPLATE}"\n')
    args = {"journal": [], "per-file": ["--config", str(per_file_config(tmp_path))], "bit-preserving": ["+B"]}
    d = daemons.start(*args[mode])
    study = generate_uid(prefix=None)
    objects = []
    for value in HOSTILE:
        ds = ct(study)
        if value is None:
            del ds.PatientID
        else:
            ds.PatientID = value
        objects.append(ds)
    assert storescu_send(d.port, objects) == [0] * len(objects)
    expected = set()
    for ds in objects:
        raw = str(ds.get("PatientID", "")).encode()
        rel = render(
            TEMPLATE.replace(
                "{StudyInstanceUID:hash8}", hashlib.sha256(study.encode()).hexdigest()[:8]
            ).replace("{Modality}", "CT"),
            {PATIENT_ID: raw, SOP_INSTANCE: str(ds.SOPInstanceUID).encode()},
        )
        expected.add(d.output / rel)
    wait_for(lambda: {p for p in d.output.rglob("*.dcm")} == expected, timeout=20)
    outside = [p for p in d.output.parent.rglob("*.dcm") if d.output not in p.parents]
    assert outside == []


def gdcmscu_store(port: int, path: Path) -> None:
    """GDCM's sender (Debian's libgdcm-tools 3.0.21).  It stores, releases, then aborts itself
    with "ProtocolStream as nullptr is invalid" (SIGABRT) against DCMTK's receivers as against
    ours: the object's arrival is what the tests check, not that exit code."""
    result = run(["gdcmscu", "--store", "--call", "ANY-SCP", "127.0.0.1", str(port), str(path)])
    assert result.returncode in (0, 134, -6), result.stderr  # -6: SIGABRT, as subprocess reports it


def test_sighup_applies_a_new_layout_and_keeps_it_when_the_next_is_bad(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    need("gdcmscu")
    main = daemons.config_dir / "dcmrecvd.toml"
    main.write_text('[output]\nlayout = "{PatientID}/{SOPInstanceUID}"\n')
    d = daemons.start()
    first, second, third = (ct(generate_uid(prefix=None)) for _ in range(3))
    first.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    gdcmscu_store(d.port, tmp_path / "first.dcm")
    wait_for(lambda: (d.output / "P1" / str(first.SOPInstanceUID)).is_file(), timeout=20)

    main.write_text('[output]\nlayout = "{Modality:lower}/{SOPInstanceUID}.dcm"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.completed" in d.log(), timeout=20)
    assert storescu_send(d.port, [second]) == [0]
    wait_for(lambda: (d.output / "ct" / f"{second.SOPInstanceUID}.dcm").is_file(), timeout=20)

    main.write_text('[output]\nlayout = "{NoSuchKeyword}/{SOPInstanceUID}"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.rejected" in d.log(), timeout=20)
    assert storescu_send(d.port, [third]) == [0]
    wait_for(lambda: (d.output / "ct" / f"{third.SOPInstanceUID}.dcm").is_file(), timeout=20)
