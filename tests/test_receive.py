"""End to end: real senders (storescu, dcmsend, echoscu, pynetdicom) against the daemon."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import DaemonFactory, dcmrecvd, free_port, need, per_file_config, run, wait_for
from datasets import make_dataset, write
from peers import RawClient, associate, dataset_bytes, send_exact, send_file
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dcmrecvd.store.storage import TEMP_PREFIX

CT = "1.2.840.10008.5.1.4.1.1.2"


def stored(out: Path) -> list[Path]:
    """Final files below ``out`` (temp files excluded, and asserted absent)."""
    files = [p for p in out.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts]
    assert not [p for p in files if p.name.startswith(TEMP_PREFIX)], "temp file left behind"
    return sorted(files)


def ct_file(tmp_path: Path, name: str = "ct.dcm", ts: str = ExplicitVRLittleEndian, **kw: object) -> Path:
    ds = make_dataset(rows=64, columns=64, **kw)  # type: ignore[arg-type]
    return write(ds, tmp_path / name, ts)


def storescu(port: int, *files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return run([need("storescu"), *extra, "127.0.0.1", str(port), *map(str, files)])


# --------------------------------------------------------------------------- basics


def test_echo_without_profile_only_verification(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start(profile=None)
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
    result = storescu(d.port, ct_file(tmp_path))
    assert result.returncode != 0
    assert stored(d.output) == []


def test_store_with_storescu_default_names(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start()
    files = [ct_file(tmp_path, f"f{i}.dcm") for i in range(3)]
    result = storescu(d.port, *files)
    assert result.returncode == 0, result.stderr
    got = stored(d.output)
    expected = {f"CT.{dcmread(f).SOPInstanceUID}" for f in files}
    assert {p.name for p in got} == expected
    for path in got:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ExplicitVRBigEndian)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert len(ds.PixelData) == 64 * 64 * 2
    assert "store.completed" in d.log()


def test_dcmsend_and_extension(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start("-fe", ".dcm")
    files = [ct_file(tmp_path, f"f{i}.dcm") for i in range(2)]
    result = run([need("dcmsend"), "127.0.0.1", str(d.port), *map(str, files)])
    assert result.returncode == 0, result.stderr
    assert all(p.suffix == ".dcm" and p.name.startswith("CT.") for p in stored(d.output))
    assert len(stored(d.output)) == 2


@pytest.mark.parametrize(
    ("flag", "pattern"),
    [
        ("+fu", r"^CT\.X\.[0-9.]+$"),
        ("+fsu", r"^CT_[0-9a-f]{16}$"),
        ("+fst", r"^\d{14}\.\d{6}\.CT$"),
        ("+fd", r"^CT\.[0-9.]+$"),
    ],
)
def test_file_name_schemes(daemons: DaemonFactory, tmp_path: Path, flag: str, pattern: str) -> None:
    d = daemons.start(flag)
    files = [ct_file(tmp_path, f"f{i}.dcm") for i in range(5)]
    assert storescu(d.port, *files).returncode == 0
    names = [p.name for p in stored(d.output)]
    assert len(names) == 5
    assert all(re.match(pattern, n) for n in names), names


def test_unknown_sop_class_prefix(daemons: DaemonFactory, tmp_path: Path) -> None:
    cfg = tmp_path / "private.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[T]\nTransferSyntax1 = LittleEndianExplicit\n"
        "[[PresentationContexts]]\n[S]\nPresentationContext1 = 1.2.3.4.5.6\\T\n"
        "[[Profiles]]\n[P]\nPresentationContexts = S\n"
    )
    path = write(make_dataset("1.2.3.4.5.6"), tmp_path / "priv.dcm")
    for flag, prefix in (("+fd", "UNKNOWN."), ("+fsu", "XX_")):
        d = daemons.start(flag, "-xf", str(cfg), "P", profile=None)
        assert send_file(d.port, path) == 0
        (name,) = [p.name for p in stored(d.output)]
        assert name.startswith(prefix)
        d.stop()


@pytest.mark.parametrize(
    ("series_date", "subdir"),
    [
        ("20240131", "data/2024/01/31"),
        ("20240131 ", "data/2024/01/31"),
        ("2024.01.31", "data/2024/01/31"),
        ("20240131\\20230101", "data/2024/01/31"),
        (None, "undef/TODAY"),
        ("20241399", "undef/TODAY"),
        ("garbage", "undef/TODAY"),
    ],
)
def test_series_date_subdirectories(
    daemons: DaemonFactory, tmp_path: Path, series_date: str | None, subdir: str
) -> None:
    d = daemons.start("+ssd")
    path = ct_file(tmp_path, series_date=None)
    if series_date is not None:
        raw = path.read_bytes()
        ds = dcmread(path)
        ds.add_new(0x00080021, "DA", "")
        ds[0x00080021]._value = series_date  # bypass validation: we test what modalities send
        ds.save_as(path, enforce_file_format=True)
        assert raw != path.read_bytes()
    before = dt.date.today().strftime("%Y%m%d")
    assert send_file(d.port, path) == 0
    (got,) = stored(d.output)
    relative = str(got.parent.relative_to(d.output))
    after = dt.date.today().strftime("%Y%m%d")
    assert relative in (subdir.replace("TODAY", before), subdir.replace("TODAY", after))


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_series_date_in_each_syntax_and_after_a_sequence(
    daemons: DaemonFactory, tmp_path: Path, ts: str
) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    d = daemons.start("+ssd")
    ds = make_dataset(rows=8, columns=8, series_date="19991231")
    item = Dataset()
    item.CodeValue = "x"
    ds.LanguageCodeSequence = Sequence([item])  # (0008,0006): a sequence before the date
    path = write(ds, tmp_path / "seq.dcm", ts)
    assert send_file(d.port, path) == 0
    (got,) = stored(d.output)
    assert got.parent.relative_to(d.output) == Path("data/1999/12/31")


# --------------------------------------------------------------------------- transfer syntaxes, modes


def _big_endian(_tmp_path: Path) -> Path:
    return Path(get_testdata_file("ExplVR_BigEnd.dcm"))


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda t: ct_file(t, ts=ImplicitVRLittleEndian), id="implicit-le"),
        pytest.param(lambda t: ct_file(t, ts=ExplicitVRLittleEndian), id="explicit-le"),
        pytest.param(_big_endian, id="explicit-be"),
        pytest.param(lambda t: Path(get_testdata_file("image_dfl.dcm")), id="deflated"),
        pytest.param(lambda t: Path(get_testdata_file("JPEG-lossy.dcm")), id="jpeg"),
        pytest.param(lambda t: Path(get_testdata_file("SC_rgb_rle.dcm")), id="rle"),
    ],
)
@pytest.mark.parametrize("mode", ["-B", "+B"])
def test_content_identical_in_every_syntax(daemons: DaemonFactory, tmp_path: Path, source, mode: str) -> None:  # type: ignore[no-untyped-def]
    path = source(tmp_path)
    d = daemons.start(mode, profile="AllDICOM" if "dfl" in str(path) else "Default")
    assert send_exact(d.port, path) == 0
    (got,) = stored(d.output)
    assert dataset_bytes(got) == dataset_bytes(path)
    sent_ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == sent_ts


def test_deflated_series_date(daemons: DaemonFactory, tmp_path: Path) -> None:
    ds = make_dataset(rows=16, columns=16, series_date="20010203")
    path = write(ds, tmp_path / "dfl.dcm", DeflatedExplicitVRLittleEndian)
    d = daemons.start("+ssd")
    assert send_exact(d.port, path) == 0
    (got,) = stored(d.output)
    assert got.parent.relative_to(d.output) == Path("data/2001/02/03")
    assert dataset_bytes(got) == dataset_bytes(path)


def test_ignore_mode_stores_nothing(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start("--ignore")
    assert storescu(d.port, ct_file(tmp_path)).returncode == 0
    assert stored(d.output) == []


def test_duplicate_default_name_replaced_with_warning(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start()
    uid = generate_uid()
    first = ct_file(tmp_path, "a.dcm", instance_uid=uid)
    second = ct_file(tmp_path, "b.dcm", instance_uid=uid)
    assert send_file(d.port, first) == 0
    assert send_file(d.port, second) == 0
    (got,) = stored(d.output)
    assert dataset_bytes(got) == dataset_bytes(second)
    assert "store.replaced" in d.log()


@pytest.mark.parametrize("flag", ["+fu", "+fsu", "+fst"])
def test_other_schemes_never_overwrite(daemons: DaemonFactory, tmp_path: Path, flag: str) -> None:
    d = daemons.start(flag)
    uid = generate_uid()
    files = [ct_file(tmp_path, f"{i}.dcm", instance_uid=uid) for i in range(4)]
    assert storescu(d.port, *files).returncode == 0
    assert len(stored(d.output)) == 4


def test_four_concurrent_senders(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start("+fsu")
    batches = []
    for b in range(4):
        folder = tmp_path / f"batch{b}"
        folder.mkdir()
        batches.append([ct_file(folder, f"{i}.dcm") for i in range(25)])
    procs = [
        subprocess.Popen(
            [need("storescu"), "127.0.0.1", str(d.port), *map(str, batch)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        for batch in batches
    ]
    try:
        assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    got = stored(d.output)
    assert len(got) == 100
    pixels = {str(ds.SOPInstanceUID): ds.PixelData for ds in (dcmread(f) for b in batches for f in b)}
    for path in got:
        ds = dcmread(path)
        assert ds.PixelData == pixels.pop(str(ds.SOPInstanceUID))
    assert pixels == {}


# --------------------------------------------------------------------------- negotiation


def test_called_ae_title_checked_with_aet(daemons: DaemonFactory) -> None:
    d = daemons.start("-aet", "RECV")
    ok = run([need("echoscu"), "-aec", "RECV", "127.0.0.1", str(d.port)])
    assert ok.returncode == 0
    bad = associate(d.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])], called="OTHER")
    assert bad.is_rejected
    rj = bad.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    assert "called AE title not recognised" in d.log()


def test_any_called_ae_title_without_aet(daemons: DaemonFactory) -> None:
    d = daemons.start()
    assert run([need("echoscu"), "-aec", "WHATEVER", "127.0.0.1", str(d.port)]).returncode == 0


def test_max_pdu_announced_and_scp_preference(daemons: DaemonFactory) -> None:
    d = daemons.start("-pdu", "65536")
    assoc = associate(d.port, [(CT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])])
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 65536
        (ctx,) = assoc.accepted_contexts
        assert ctx.transfer_syntax[0] == ExplicitVRLittleEndian  # profile order wins
    finally:
        assoc.release()


def test_rejected_contexts_results(daemons: DaemonFactory) -> None:
    d = daemons.start()
    assoc = associate(
        d.port,
        [
            (CT, ["1.2.3.4.5"]),
            ("1.2.3.9.9.9", [ImplicitVRLittleEndian]),
            ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),
        ],
    )
    try:
        assert assoc.is_established
        results = {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts}
        assert results == {CT: 0x04, "1.2.3.9.9.9": 0x03}
    finally:
        assoc.release()


def test_association_limit_rejects_transient(daemons: DaemonFactory) -> None:
    d = daemons.start("--max-associations", "1")
    held = associate(d.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])])
    assert held.is_established
    try:
        extra = associate(d.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])])
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        held.release()
    assert wait_for(lambda: run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0)


# --------------------------------------------------------------------------- untrusted input


@pytest.mark.parametrize("uid", ["../../../etc/evil", "1.2..3", "1.2.3/4", "", "1" * 65, "1.2.3.", ".1.2"])
def test_path_like_uids_are_refused(daemons: DaemonFactory, tmp_path: Path, uid: str) -> None:
    d = daemons.start()
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian) == 0x02
        client.send_pdv(client.store_command(CT, uid), command=True, last=True)
        client.send_pdv(b"\x08\x00\x18\x00UI\x04\x001.2\x00", command=False, last=True)
        status = client.response_status()
    finally:
        client.close()
    assert 0xC000 <= status <= 0xCFFF
    assert stored(d.output) == []
    assert not list(tmp_path.rglob("evil*"))
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(f"{TEMP_PREFIX}*") if p.is_file()]


@pytest.mark.parametrize("end", ["release", "abort"])
def test_spare_temp_file_for_the_next_object_never_outlives_the_association(
    daemons: DaemonFactory, tmp_path: Path, end: str
) -> None:
    """From the second object on, the next object's temp file is made while the peer is busy
    (the per-file path: through the ack journal a small object has no file until after its ack)."""
    d = daemons.start("--config", str(per_file_config(tmp_path)))
    files = [ct_file(tmp_path, f"f{i}.dcm") for i in range(3)]
    assoc = associate(d.port, [(CT, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(files[0]).Status) == 0
        assert temp_files(d.output) == []  # one object: maybe the only one, no spare yet
        assert int(assoc.send_c_store(files[1]).Status) == 0
        spare = wait_for(lambda: temp_files(d.output), timeout=10)
        assert len(spare) == 1 and spare[0].stat().st_size == 0
        assert int(assoc.send_c_store(files[2]).Status) == 0
        assert not spare[0].exists()  # it became the third object
    finally:
        if end == "release":
            assoc.release()
        else:
            assoc.abort()
    if end == "release":  # gone before the release was answered
        assert temp_files(d.output) == []
    wait_for(lambda: not temp_files(d.output), timeout=10)
    assert {p.name for p in stored(d.output)} == {f"CT.{dcmread(f).SOPInstanceUID}" for f in files}


def test_response_respects_a_tiny_peer_max_pdu(daemons: DaemonFactory, tmp_path: Path) -> None:
    """A peer announcing a 64-byte maximum PDU gets its response in fragments that fit."""
    d = daemons.start()
    data = dataset_bytes(ct_file(tmp_path))
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian, max_pdu=64) == 0x02
        client.send_pdv(client.store_command(CT, "1.2.3.4"), command=True, last=True)
        client.send_pdv(data, command=False, last=True)
        bodies = client.response_pdus()
    finally:
        client.close()
    assert len(bodies) > 1 and all(len(b) <= 64 for b in bodies)
    command = b"".join(b[6:] for b in bodies)
    assert b"1.2.3.4" in command
    # Closed, never released: the file appears once it is made.
    wait_for(lambda: [p.name for p in d.output.iterdir() if not p.name.startswith(".")] == ["CT.1.2.3.4"])
    assert [p.name for p in stored(d.output)] == ["CT.1.2.3.4"]


@pytest.mark.parametrize("how", ["vanish", "abort", "garbage-pdu", "release"])
def test_abort_mid_object_leaves_nothing(daemons: DaemonFactory, how: str) -> None:
    d = daemons.start()
    client = RawClient(d.port)
    assert client.associate(CT, ExplicitVRLittleEndian) == 0x02
    client.send_pdv(client.store_command(CT, "1.2.3.4"), command=True, last=True)
    client.send_pdv(
        b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 26 + b"\xe0\x7f\x10\x00OW\x00\x00" + b"\x00" * 8,
        command=False,
        last=False,
    )
    if how == "abort":
        client.sock.sendall(bytes((7, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    elif how == "garbage-pdu":
        client.sock.sendall(b"\x99" * 64)
    elif how == "release":
        client.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    else:  # vanish: the peer just goes away
        client.close()
    wait_for(lambda: "store.incomplete" in d.log(), timeout=10)
    client.close()
    assert stored(d.output) == []
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00\x10short",  # truncated A-ASSOCIATE-RQ
        b"\x01\x00\x00\x00\x00\x20" + b"\x00" * 32,  # undecodable A-ASSOCIATE-RQ
        b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03",  # P-DATA before association
        bytes(range(256)) * 4,
    ],
)
def test_garbage_is_survived(daemons: DaemonFactory, payload: bytes) -> None:
    d = daemons.start("-ta", "2")
    client = RawClient(d.port)
    client.sock.sendall(payload)
    try:
        client.sock.settimeout(5)
        while client.sock.recv(4096):
            pass
    except OSError:
        pass
    client.close()
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
    assert d.proc.poll() is None


def test_stalled_peer_does_not_delay_others(daemons: DaemonFactory) -> None:
    import time

    d = daemons.start()
    staller = RawClient(d.port)
    staller.sock.sendall(b"\x01\x00\x00\x00\x10\x00")  # announces 4096 bytes, sends none
    silent = RawClient(d.port)  # connects and says nothing
    try:
        start = time.monotonic()
        assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
        assert time.monotonic() - start < 1.5
    finally:
        staller.close()
        silent.close()


def test_acse_timeout_ends_silent_peer(daemons: DaemonFactory) -> None:
    d = daemons.start("-ta", "1")
    silent = RawClient(d.port)
    try:
        silent.sock.settimeout(10)
        assert silent.sock.recv(100) in (b"", bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 0)))
    except ConnectionResetError:
        pass
    finally:
        silent.close()
    assert "timeout" in d.log()


# --------------------------------------------------------------------------- storage failures


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    assert result.returncode == 0, f"mounting a tmpfs needs root: {result.stderr!r}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_cleanly_and_recovers(
    daemons: DaemonFactory, tmp_path: Path, small_tmpfs: Path
) -> None:
    d = daemons.start(output=small_tmpfs)
    big = write(make_dataset(rows=1024, columns=1024), tmp_path / "big.dcm")  # 2 MB > 1 MB disk
    assert send_file(d.port, big) == 0xA700
    assert stored(small_tmpfs) == []
    small = ct_file(tmp_path, "small.dcm")
    assert send_file(d.port, small) == 0x0000  # space is there for a small one
    assert len(stored(small_tmpfs)) == 1
    assert "store.failed" in d.log()


def test_disk_full_keeps_older_file(daemons: DaemonFactory, tmp_path: Path, small_tmpfs: Path) -> None:
    d = daemons.start(output=small_tmpfs)
    uid = generate_uid()
    first = ct_file(tmp_path, "first.dcm", instance_uid=uid)
    assert send_file(d.port, first) == 0
    ds = make_dataset(rows=1024, columns=1024, instance_uid=uid)
    big = write(ds, tmp_path / "big.dcm")
    assert send_file(d.port, big) == 0xA700
    (got,) = stored(small_tmpfs)
    assert dataset_bytes(got) == dataset_bytes(first)


def test_read_only_directory_fails_with_a700(
    daemons: DaemonFactory, tmp_path: Path, small_tmpfs: Path
) -> None:
    """The per-file path (through the journal, see test_after_the_ack: the first object after
    the fault is acknowledged and made later, the next ones are refused)."""
    d = daemons.start("--config", str(per_file_config(tmp_path)), output=small_tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert send_file(d.port, ct_file(tmp_path)) == 0xA700
    assert d.proc.poll() is None
    subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert send_file(d.port, ct_file(tmp_path, "again.dcm")) == 0


def test_stale_temp_files_removed_at_start(daemons: DaemonFactory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "data/2024/01/31").mkdir(parents=True)
    stale = [out / f"{TEMP_PREFIX}999999-abc.tmp", out / f"data/2024/01/31/{TEMP_PREFIX}999998-x.tmp"]
    for s in stale:
        s.write_bytes(b"partial")
    keep = out / "CT.1.2.3"
    keep.write_bytes(b"complete")
    d = daemons.start(output=out)
    wait_for(lambda: d.log().count("storage.stale_temp_removed") == 2)
    assert not any(s.exists() for s in stale)
    assert keep.exists()


# --------------------------------------------------------------------------- big objects


def write_huge(path: Path, size: int) -> Path:
    """A Part 10 CT file with ``size`` bytes of pixel data, written in chunks."""
    ds = make_dataset(rows=0, columns=0)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1024, 1024, 16, 16, 15
    ds.NumberOfFrames = size // (2 * 1024 * 1024)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    write(ds, path)
    with path.open("ab") as fh:
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
        chunk = bytes(range(256)) * 4096
        left = size
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
    return path


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_one_gigabyte_object_streams_with_flat_memory(daemons: DaemonFactory, tmp_path: Path) -> None:
    size = 1 << 30
    huge = write_huge(tmp_path / "huge.dcm", size)
    d = daemons.start("-pdu", "131072", verbose=False)
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
    baseline = vm_kib(d.pid, "VmRSS")
    result = storescu(d.port, huge, extra=("-xs",))
    assert result.returncode == 0, result.stderr
    peak = vm_kib(d.pid, "VmHWM")
    assert (peak - baseline) < 100 * 1024, f"RSS grew by {(peak - baseline) // 1024} MB"
    (got,) = stored(d.output)
    assert got.stat().st_size > size
    with got.open("rb") as fh:
        fh.seek(-4096, 2)
        tail = fh.read()
    assert tail == (bytes(range(256)) * 16)[-4096:]
    huge.unlink()


# --------------------------------------------------------------------------- exit codes


def test_exit_45_for_missing_output_directory(config_dir: Path, tmp_path: Path) -> None:
    result = dcmrecvd("-od", str(tmp_path / "missing"), "104", config_dir=config_dir)
    assert result.returncode == 45
    assert "does not exist" in result.stderr
    file = tmp_path / "file"
    file.write_text("")
    assert dcmrecvd("-od", str(file), "104", config_dir=config_dir).returncode == 45


def test_exit_66_checked_before_45(config_dir: Path, tmp_path: Path) -> None:
    result = dcmrecvd(
        "-xf", "/nonexistent.cfg", "P", "-od", str(tmp_path / "missing"), "104", config_dir=config_dir
    )
    assert result.returncode == 66


def test_exit_64_port_in_use(config_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        result = dcmrecvd("-od", str(tmp_path), str(port), config_dir=config_dir)
    assert result.returncode == 64
    assert "cannot listen" in result.stderr


def test_missing_port(config_dir: Path, tmp_path: Path) -> None:
    result = dcmrecvd("-od", str(tmp_path), config_dir=config_dir)
    assert result.returncode == 1
    assert "Missing parameter port" in result.stderr


def test_check_config_ok(config_dir: Path, tmp_path: Path) -> None:
    from conftest import PROFILES

    result = dcmrecvd(
        "--check-config", "-xf", str(PROFILES), "Default", "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_sigterm_exits_zero(daemons: DaemonFactory) -> None:
    d = daemons.start()
    assert d.stop() == 0
    assert "daemon.stopped" in d.log()


def test_port_free_after_stop(daemons: DaemonFactory) -> None:
    port = free_port()
    d = daemons.start(port=port)
    d.stop()
    d2 = daemons.start(port=port)
    assert run([need("echoscu"), "127.0.0.1", str(d2.port)]).returncode == 0
    threading.Event().wait(0)


@pytest.mark.parametrize("mode", ["-B", "+B", "--ignore"])
@pytest.mark.parametrize("names", ["+fd", "+fu", "+fsu", "+fst"])
@pytest.mark.parametrize("subdir", ["-s", "+ssd"])
def test_every_naming_directory_and_mode_combination(
    daemons: DaemonFactory, tmp_path: Path, subdir: str, names: str, mode: str
) -> None:
    if mode == "+B" and subdir == "+ssd":
        result = dcmrecvd(subdir, names, mode, "-od", str(tmp_path), "104", config_dir=daemons.config_dir)
        assert result.returncode == 1
        return
    d = daemons.start(subdir, names, mode, "-fe", ".dcm", verbose=False)
    path = ct_file(tmp_path, series_date="20220304")
    assert send_exact(d.port, path) == 0
    got = stored(d.output)
    if mode == "--ignore":
        assert got == []
        return
    (file,) = got
    expected_dir = Path("data/2022/03/04") if subdir == "+ssd" else Path(".")
    assert file.parent.relative_to(d.output) == expected_dir
    assert file.suffix == ".dcm"
    assert dataset_bytes(file) == dataset_bytes(path)
    prefix = {"+fd": "CT.", "+fu": "CT.X.", "+fsu": "CT_", "+fst": ""}[names]
    assert file.name.startswith(prefix)
