"""Sub-tables declared once, the remote AE's keys shared, restarts said from the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dcmrecvd.conf import config
from dcmrecvd.conf.commitment_settings import CommitmentPeerConfig
from dcmrecvd.conf.forward import ForwardConfig
from dcmrecvd.conf.remote import RemoteAEConfig
from dcmrecvd.errors import ConfigError
from dcmrecvd.remote.from_config import remote_for

pytestmark = pytest.mark.inprocess


def load(tmp_path: Path, text: str) -> config.Config:
    (tmp_path / "dcmrecvd.toml").write_text(text)
    return config.load(config_dir=tmp_path, environ={})


def test_a_destination_and_a_peer_share_the_remote_keys() -> None:
    shared = {f.name for f in dataclasses.fields(RemoteAEConfig)}
    for table in (ForwardConfig, CommitmentPeerConfig):
        assert shared <= {f.name for f in dataclasses.fields(table)}
    assert {"aet", "called_aet", "local_aet"}.isdisjoint(f.name for f in dataclasses.fields(ForwardConfig))


def test_old_key_names_are_read_and_said(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "[journal]\nenabled = true\n[commitment]\nenabled = true\n"
        '[[commitment.peer]]\naet = "MOD1"\nlocal_aet = "US"\nport = 11113\n'
        '[[forward]]\nname = "pacs"\nhost = "127.0.0.1"\ncalled_aet = "PACS"\n',
    )
    assert cfg.commitment_peers[0].ae_title == "MOD1" and cfg.commitment_peers[0].calling_aet == "US"
    assert cfg.forward[0].ae_title == "PACS"
    assert len(cfg.renamed) == 3 and all("the old name is still read" in n for n in cfg.renamed)
    assert any("forward[1].called_aet -> ae_title" in n for n in cfg.renamed)


def test_a_key_under_both_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, '[[forward]]\nname = "p"\nhost = "h"\ncalled_aet = "A"\nae_title = "B"\n')
    assert "forward[1].called_aet" in str(err.value) and "use ae_title only" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[forward]]\nname = "p"\nhost = "h"\n[[forward]]\nname = "p"\nhost = "i"\n', "forward[2].name"),
        (
            '[[commitment.peer]]\nae_title = "A"\n[[commitment.peer]]\nae_title = "A"\n',
            "commitment.peer[2].ae_title",
        ),
        ("[[commitment.peer]]\nport = 104\n", "commitment.peer[1].ae_title"),
        ('[[hooks]]\nexec = []\non = ["object.stored"]\n', "hooks[1].exec"),
        ("[[forward]]\nname = 'p'\nhost = 'h'\nmatch = 3\n", "forward[1].match"),
        ("[events.amqp]\nnope = 1\n", "events.amqp.nope"),
    ],
)
def test_each_sub_table_checks_its_rows(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert key in str(err.value)


def test_a_remote_without_its_own_certificate_presents_the_servers() -> None:
    server = config.TLSConfig(certificate="/etc/ssl/server.pem", private_key="/etc/ssl/server.key")
    dest = ForwardConfig(name="p", host="pacs", tls=True)
    remote = remote_for(dest, server, calling="US", connect_timeout=1, response_timeout=2)
    assert remote.tls is not None and remote.tls.certificate == "/etc/ssl/server.pem"
    assert remote.tls.private_key == "/etc/ssl/server.key" and remote.ae_title == "ANY-SCP"
    own = dataclasses.replace(dest, tls_certificate="/c.pem", tls_private_key="/c.key")
    mine = remote_for(own, server, calling="US", connect_timeout=1, response_timeout=2).tls
    assert mine is not None and (mine.certificate, mine.private_key) == ("/c.pem", "/c.key")
    peer = CommitmentPeerConfig(ae_title="MOD1")
    remote = remote_for(peer, server, host="10.0.0.9", calling="STORE", connect_timeout=1, response_timeout=2)
    assert (remote.host, remote.calling_aet, remote.tls) == ("10.0.0.9", "STORE", None)


def test_restart_keys_come_from_the_schema_and_the_docs_say_so() -> None:
    keys = config.restart_keys()
    assert ("network", "port") in keys and ("daemon", "state_directory") in keys
    assert ("logging", "level") not in keys
    shipped = config.documented_toml()
    for section, key in keys:
        cls = config.sections()[section]
        field = next(f for f in dataclasses.fields(cls) if f.name == key)
        assert f"# {field.metadata['doc']} Needs a restart to change." in shipped
    assert shipped.count("Needs a restart to change.") == len(keys)


def test_print_config_round_trips_sub_tables(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[[forward]]\nname = "pacs"\nhost = "h"\nmatch = { Modality = ["CT"] }\n'
        '[[hooks]]\nexec = ["/bin/true"]\non = ["object.stored"]\n',
    )
    (tmp_path / "again").mkdir()
    again = load(tmp_path / "again", config.to_toml(cfg))
    assert again.forward == cfg.forward and again.hooks == cfg.hooks and again.amqp == cfg.amqp
    assert again.hooks[0].name == "hook1"
