"""Where the state lives: resolved from the setting, systemd or XDG, never the output directory;
tied to its output directory; a legacy .dcmrecvd/ moved in once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcmrecvd.errors import ConfigError
from dcmrecvd.store.state_directory import prepare, resolve

pytestmark = pytest.mark.inprocess


def test_the_setting_wins() -> None:
    assert resolve("/srv/state", Path("/srv/in"), {"STATE_DIRECTORY": "/x"}) == Path("/srv/state")


@pytest.mark.parametrize(
    "given",
    [
        "/var/lib/dcmrecvd/state:/var/lib/dcmrecvd/incoming",
        "/var/lib/dcmrecvd/incoming:/var/lib/dcmrecvd/state",  # systemd's own order
    ],
)
def test_systemd_s_state_entry_is_found_in_any_order(given: str) -> None:
    output = Path("/var/lib/dcmrecvd/incoming")
    assert resolve("", output, {"STATE_DIRECTORY": given}) == Path("/var/lib/dcmrecvd/state")


def test_an_old_state_directory_that_is_the_output_directory_is_still_used() -> None:
    assert resolve("", Path("/var/lib/dcmrecvd"), {"STATE_DIRECTORY": "/var/lib/dcmrecvd"}) == Path(
        "/var/lib/dcmrecvd"
    )


def test_without_systemd_one_directory_per_output_under_xdg_state_home() -> None:
    env = {"XDG_STATE_HOME": "/home/u/.state", "HOME": "/home/u"}
    a, b = resolve("", Path("/data/a/in"), env), resolve("", Path("/data/b/in"), env)
    assert a != b and a.parent == b.parent == Path("/home/u/.state/dcmrecvd")
    assert a.name.startswith("in-")
    home = resolve("", Path("/data/a/in"), {"HOME": "/home/u"})
    assert home.parent == Path("/home/u/.local/state/dcmrecvd")


def test_a_state_belongs_to_one_output_directory(tmp_path: Path) -> None:
    state, one, two = tmp_path / "state", tmp_path / "one", tmp_path / "two"
    prepare(state, one)
    assert (state / "output-directory").read_text().strip() == str(one)
    prepare(state, one)
    with pytest.raises(ConfigError) as refused:
        prepare(state, two)
    assert "daemon.state_directory" in str(refused.value) and str(one) in str(refused.value)


def test_a_legacy_state_is_moved_in_once(tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / ".dcmrecvd" / "journal").mkdir(parents=True)
    (output / ".dcmrecvd" / "journal" / "0000.seg").write_bytes(b"seg")
    (output / ".dcmrecvd" / "instances.sqlite").write_bytes(b"db")
    state = tmp_path / "state"
    prepare(state, output)
    assert not (output / ".dcmrecvd").exists()
    assert (state / "journal" / "0000.seg").read_bytes() == b"seg"
    assert (state / "instances.sqlite").read_bytes() == b"db"
    (output / ".dcmrecvd").mkdir()  # a second one is left alone: the state has one already
    (output / ".dcmrecvd" / "instances.sqlite").write_bytes(b"other")
    prepare(state, output)
    assert (state / "instances.sqlite").read_bytes() == b"db"
