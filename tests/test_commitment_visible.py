"""Storage Commitment as operators and pipelines see it: metrics, outbox events for hooks,
and a report delivered over TLS with our client certificate to a modality that demands one."""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from commitment_peers import (
    CT,
    MODALITY,
    Modality,
    action_dataset,
    config_text,
    ct_dataset,
    n_action,
    status_of,
    store,
)
from conftest import DaemonFactory, free_port, need, port_open, wait_for
from pki import CA
from pydicom.uid import generate_uid
from test_operations import http, samples

HOOK = r"""
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(json.loads(sys.stdin.read())) + "\n")
"""


@pytest.fixture
def modality() -> Iterator[Modality]:
    m = Modality()
    try:
        yield m
    finally:
        m.stop()


def events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def test_a_report_is_counted_and_each_step_is_an_event(
    daemons: DaemonFactory, modality: Modality, tmp_path: Path
) -> None:
    modality.start()
    hook, seen = tmp_path / "hook.py", tmp_path / "events.jsonl"
    hook.write_text(HOOK)
    metrics = free_port()
    config = tmp_path / "dcmrecvd.toml"
    config.write_text(
        config_text(modality.port)
        + f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n[[hooks]]\n'
        + 'on = ["commitment.requested", "commitment.reported"]\n'
        + f"exec = {json.dumps([sys.executable, str(hook), str(seen)])}\n"
    )
    d = daemons.start("--config", str(config))
    d.metrics_port = metrics  # type: ignore[attr-defined]
    wait_for(lambda: port_open(metrics))
    stored = [ct_dataset() for _ in range(2)]
    assert store(d.port, stored) == [0, 0]
    tx = generate_uid()
    items = [(CT, str(ds.SOPInstanceUID)) for ds in stored] + [(CT, generate_uid())]
    assert status_of(n_action(d.port, action_dataset(tx, items))) == 0
    wait_for(lambda: len(events(seen)) == 2, timeout=30)
    kinds = {e["event"]: e for e in events(seen)}
    assert kinds["commitment.requested"]["transaction_uid"] == tx
    assert kinds["commitment.requested"]["calling_aet"] == MODALITY
    reported = kinds["commitment.reported"]
    assert (reported["transaction_uid"], reported["objects"], reported["failed"]) == (tx, 2, 1)

    def figures() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(http(d, "/metrics")[1])

    got = wait_for(lambda: (f := figures())[("dcmrecvd_commitment_report_seconds_count", ())] == 1 and f)
    assert got[("dcmrecvd_commitment_requests_total", (("outcome", "accepted"),))] == 1
    assert got[("dcmrecvd_commitment_items_total", (("result", "committed"),))] == 2
    assert got[("dcmrecvd_commitment_items_total", (("result", "0x0112"),))] == 1
    assert got[("dcmrecvd_commitment_pending", ())] == 0
    # A refusal is counted under its status.
    assert status_of(n_action(d.port, action_dataset(generate_uid(), items), action_type=2)) == 0x0123
    wait_for(lambda: figures().get(("dcmrecvd_commitment_requests_total", (("outcome", "0x0123"),))) == 1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, object, object]:
    need("openssl")
    root = CA(tmp_path_factory.mktemp("pki") / "root", "Commitment Test Root")
    return root, root.issue("localhost"), root.issue("dcmrecvd-reports")


def test_a_report_goes_over_tls_with_our_client_certificate(
    daemons: DaemonFactory, pki: tuple[CA, object, object], tmp_path: Path
) -> None:
    root, server, client = pki
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(root.cert))
    context.verify_mode = ssl.CERT_REQUIRED  # the modality accepts only a certificate it trusts
    context.load_cert_chain(str(server.cert), str(server.key))  # type: ignore[attr-defined]
    modality = Modality(ssl_context=context)
    modality.start()
    try:
        text = config_text(modality.port).replace(
            'host = "127.0.0.1"',
            'host = "127.0.0.1"\ntls = true\n'
            f'tls_certificate = "{client.cert}"\ntls_private_key = "{client.key}"\n'  # type: ignore[attr-defined]
            f'tls_ca_files = ["{root.cert}"]\ntls_server_name = "localhost"',
        )
        (tmp_path / "tls.toml").write_text(text)
        d = daemons.start("--config", str(tmp_path / "tls.toml"))
        ds = ct_dataset()
        assert store(d.port, [ds]) == [0]
        tx = generate_uid()
        assert status_of(n_action(d.port, action_dataset(tx, [(CT, str(ds.SOPInstanceUID))]))) == 0
        wait_for(lambda: modality.reports, timeout=30)
        assert [(r.transaction_uid, r.event_type) for r in modality.reports] == [(tx, 1)]
    finally:
        modality.stop()


def test_a_tls_peer_that_we_cannot_verify_gets_no_report(
    daemons: DaemonFactory, pki: tuple[CA, object, object], tmp_path: Path
) -> None:
    """Our CA list does not hold the modality's issuer: the handshake fails, is logged and retried,
    and nothing is sent in the clear."""
    _root, server, _client = pki
    other = CA(tmp_path / "other", "Someone Else")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(server.cert), str(server.key))  # type: ignore[attr-defined]
    modality = Modality(ssl_context=context)
    modality.start()
    try:
        text = config_text(modality.port).replace(
            'host = "127.0.0.1"', f'host = "127.0.0.1"\ntls = true\ntls_ca_files = ["{other.cert}"]'
        )
        (tmp_path / "tls.toml").write_text(text)
        d = daemons.start("--config", str(tmp_path / "tls.toml"))
        ds = ct_dataset()
        assert store(d.port, [ds]) == [0]
        assert (
            status_of(n_action(d.port, action_dataset(generate_uid(), [(CT, str(ds.SOPInstanceUID))]))) == 0
        )
        wait_for(lambda: d.log().count("commitment.delivery_failed") >= 2, timeout=30)
        assert not modality.reports
        assert "certificate" in d.log().lower()
    finally:
        modality.stop()
