"""Several AE titles in one daemon: [ae.<TITLE>] tables pick profile, output, naming and access
by the called AE title; DCMTK's storescu and echoscu as peers."""

from __future__ import annotations

from pathlib import Path

from conftest import DaemonFactory, dcmrecvd, need, run
from datasets import make_dataset, write
from peers import RawClient
from pydicom import dcmread
from test_receive import stored

from dcmrecvd.wire import pdu

PROFILES = Path(__file__).resolve().parent.parent / "etc" / "storescp.cfg"


def two_aes(tmp_path: Path, research: Path) -> Path:
    toml = tmp_path / "aes.toml"
    toml.write_text(
        '[network]\nae_title = "CLINICAL"\n'
        f'[ae.RESEARCH.output]\ndirectory = "{research}"\nfilenames = "unique"\nextension = ".dcm"\n'
        f'[ae.RESEARCH.association]\nconfig_file = "{PROFILES}"\nprofile = "AllDICOM"\n'
        '[ae.RESEARCH.access]\ndefault = "deny"\n'
        '[[ae.RESEARCH.access.rule]]\naction = "allow"\ncalling_aet = ["MR*"]\n'
    )
    return toml


def test_two_ae_titles_into_two_directories(daemons: DaemonFactory, tmp_path: Path) -> None:
    research = tmp_path / "research"
    research.mkdir()
    d = daemons.start("--config", str(two_aes(tmp_path, research)))
    files = [write(make_dataset(rows=16, columns=16, seed=i), tmp_path / f"o{i}.dcm") for i in range(3)]
    storescu, echoscu = need("storescu"), need("echoscu")
    assert run([storescu, "-aec", "CLINICAL", "127.0.0.1", str(d.port), str(files[0])]).returncode == 0
    assert (
        run([storescu, "-aet", "MR1", "-aec", "RESEARCH", "127.0.0.1", str(d.port), str(files[1])]).returncode
        == 0
    )
    clinical, research_files = stored(d.output), stored(research)
    assert [p.name for p in clinical] == [f"CT.{dcmread(files[0]).SOPInstanceUID}"]
    assert len(research_files) == 1 and research_files[0].name.startswith("CT.X.")
    assert research_files[0].suffix == ".dcm", "the research AE's own naming"
    # The research AE's own access rules: only MR* may call it; the clinical AE is open.
    assert (
        run([storescu, "-aet", "CT1", "-aec", "RESEARCH", "127.0.0.1", str(d.port), str(files[2])]).returncode
        != 0
    )
    assert run([echoscu, "-aet", "CT1", "-aec", "CLINICAL", "127.0.0.1", str(d.port)]).returncode == 0
    # A called title with no table goes to the default AE, whose -aet rejects it (reason 7).
    client = RawClient(d.port)
    try:
        assert (
            client.associate("1.2.840.10008.1.1", "1.2.840.10008.1.2", called="OTHER") == pdu.A_ASSOCIATE_RJ
        )
        assert client.answer[1:4] == bytes((1, 1, 7))
    finally:
        client.close()
    log = d.log()
    assert "ae=RESEARCH" in log and "ae=CLINICAL" in log


def test_each_ae_directory_is_checked_and_printed(config_dir: Path, tmp_path: Path) -> None:
    research = tmp_path / "research"
    toml = two_aes(tmp_path, research)  # research does not exist yet
    result = dcmrecvd(
        "--check-config", "--config", str(toml), "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 45, result.stderr
    research.mkdir()
    result = dcmrecvd(
        "--check-config", "--config", str(toml), "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 0, result.stderr
    assert "AE RESEARCH: profile ALLDICOM" in result.stdout
    printed = dcmrecvd("--print-config", "--config", str(toml), "104", config_dir=config_dir)
    assert "[ae.RESEARCH.output]" in printed.stdout and 'filenames = "unique"' in printed.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[ae.RESEARCH.network]\nport = 1\n")
    result = dcmrecvd(
        "--check-config", "--config", str(bad), "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 1 and "ae.RESEARCH.network: an AE can override only" in result.stderr


def test_status_shows_what_each_named_ae_stored() -> None:
    from dcmrecvd.serve.runtime import Stats

    stats = Stats()
    stats.add(stored=3)
    assert "3 stored (0.0 MB)," in stats.status_line()
    stats.stored_for("RESEARCH")
    assert "3 stored (0.0 MB; RESEARCH 1)," in stats.status_line()
