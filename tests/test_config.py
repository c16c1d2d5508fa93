"""TOML layers: order, merging, strict validation naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import dcmrecvd

from dcmrecvd.conf import config
from dcmrecvd.errors import ConfigError

pytestmark = pytest.mark.inprocess


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_files(tmp_path: Path) -> None:
    assert config.load(config_dir=tmp_path, environ={}) == config.Config()


def test_layers_in_order_later_wins(tmp_path: Path) -> None:
    write(tmp_path / "dcmrecvd.toml", '[network]\nport = 1\nae_title = "MAIN"\nacse_timeout = 5\n')
    write(tmp_path / "dcmrecvd.toml.d/20-b.toml", "[network]\nport = 3\n")
    write(tmp_path / "dcmrecvd.toml.d/10-a.toml", "[network]\nport = 2\nmax_pdu = 65536\n")
    write(tmp_path / "dcmrecvd.toml.d/ignored.conf", "[network]\nport = 99\n")
    extra = write(tmp_path / "extra.toml", '[network]\nae_title = "EXTRA"\n')
    cfg = config.load(
        config_dir=tmp_path, extra_file=extra, overrides={"network": {"acse_timeout": 9}}, environ={}
    )
    assert cfg.network.port == 3  # 20-b after 10-a
    assert cfg.network.max_pdu == 65536  # tables merge
    assert cfg.network.ae_title == "EXTRA"  # --config over drop-ins
    assert cfg.network.acse_timeout == 9  # flags over everything


def test_arrays_replace(tmp_path: Path) -> None:
    write(tmp_path / "dcmrecvd.toml", '[tls]\nca_files = ["a", "b"]\n')
    write(tmp_path / "dcmrecvd.toml.d/1.toml", '[tls]\nca_files = ["c"]\n')
    assert config.load(config_dir=tmp_path, environ={}).tls.ca_files == ["c"]


def test_config_dir_from_environment(tmp_path: Path) -> None:
    write(tmp_path / "dcmrecvd.toml", "[network]\nport = 7\n")
    assert config.load(environ={"DCMRECVD_CONFIG_DIR": str(tmp_path)}).network.port == 7


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[network]\nprot = 1\n", "network.prot", "unknown key (did you mean 'port'?)"),
        ("[netwrok]\nport = 1\n", "netwrok", "unknown table (did you mean 'network'?)"),
        ('[network]\nport = "104"\n', "network.port", "expected an integer, got string"),
        ("[network]\nport = 70000\n", "network.port", "above the maximum 65535"),
        ("[network]\nhost_lookup = 1\n", "network.host_lookup", "expected a boolean, got integer"),
        ("[network]\nmax_pdu = true\n", "network.max_pdu", "expected an integer, got boolean"),
        ('[output]\nfilenames = "shortunique"\n', "output.filenames", "did you mean 'short-unique'"),
        ('[tls]\nca_files = "a"\n', "tls.ca_files", "expected an array of strings"),
        ("network = 1\n", "network", "must be a table"),
    ],
)
def test_invalid_values_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path / "dcmrecvd.toml.d/50-bad.toml", text)
    with pytest.raises(ConfigError) as info:
        config.load(config_dir=tmp_path, environ={})
    assert info.value.source == str(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dcmrecvd.toml", "[network\n")
    with pytest.raises(ConfigError, match=str(path)):
        config.load(config_dir=tmp_path, environ={})


def test_combination_rule_from_files(tmp_path: Path) -> None:
    write(tmp_path / "dcmrecvd.toml", '[output]\nmode = "bit-preserving"\nsubdirectory = "series-date"\n')
    with pytest.raises(ConfigError, match="--bit-preserving not allowed with --series-date-subdir"):
        config.load(config_dir=tmp_path, environ={})


def test_daemon_refuses_to_start_on_a_bad_value(tmp_path: Path) -> None:
    write(tmp_path / "dcmrecvd.toml.d/10.toml", "[network]\nacse_timeout = 0\n")
    result = dcmrecvd("104", config_dir=tmp_path)
    assert result.returncode == 1
    assert "10.toml: network.acse_timeout: 0 is below the minimum 1" in result.stderr


def test_shipped_main_file_documents_every_key_and_loads() -> None:
    shipped = Path(__file__).resolve().parent.parent / "etc" / "dcmrecvd.toml"
    text = shipped.read_text()
    for key in config.all_keys():
        section, _, name = key.partition(".")
        assert f"[{section}]" in text and f"{name} =" in text, key
    assert "drop-in" in text
    config.build([config.read_layer(shipped)])


def test_shipped_main_file_is_generated_from_the_schema() -> None:
    shipped = Path(__file__).resolve().parent.parent / "etc" / "dcmrecvd.toml"
    assert shipped.read_text() == config.documented_toml() + "\n"
