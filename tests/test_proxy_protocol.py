"""The PROXY protocol behind a real HAProxy (send-proxy-v2 and send-proxy), and from raw sockets:
missing, truncated, malformed, oversized, spoofed and trickled headers."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import DaemonFactory, free_port, need, port_open, run, wait_for
from datasets import make_dataset, write
from peers import RawClient, trickle
from test_hostile import associate_rq
from test_receive import stored

from dcmrecvd.wire import pdu
from dcmrecvd.wire.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse_v1, parse_v2

BALANCER = "127.0.0.3"  # HAProxy connects from here (``source``); clients come from 127.0.0.1
VERIFICATION = "1.2.840.10008.1.1"


def v1(src: str = "10.9.8.7", sport: int = 4321) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {src} {dst} {sport} 104\r\n".encode()


def v2(src: str = "10.9.8.7", sport: int = 4321, command: int = 0x21, length: int | None = None) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", sport, 104)
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes((command, 0x11)) + struct.pack(">H", size) + body


def test_header_parsing() -> None:
    assert parse_v1(v1()).host == "10.9.8.7" and parse_v1(v1()).port == 4321
    assert parse_v1(v1("2001:db8::5")).host == "2001:db8::5"
    assert parse_v1(b"PROXY UNKNOWN\r\n").host is None
    assert parse_v2(v2()[:16], v2()[16:]).host == "10.9.8.7"
    assert parse_v2(v2(command=0x20)[:16], b"").host is None  # LOCAL
    for bad in (
        b"PROXY TCP4 10.0.0.1 127.0.0.1 99999 104\r\n",
        b"PROXY TCP4 10.0.0.256 127.0.0.1 1 104\r\n",
        b"PROXY TCP4 2001:db8::1 127.0.0.1 1 104\r\n",
        b"PROXY TCP4 10.0.0.1 127.0.0.1 01 104\r\n",
        b"PROXY UDP4 10.0.0.1 127.0.0.1 1 104\r\n",
        b"PROXY TCP4 10.0.0.1\r\n",
    ):
        with pytest.raises(ProxyHeaderError):
            parse_v1(bad)
    with pytest.raises(ProxyHeaderError):
        parse_v2(b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:16], v2()[16:])
    with pytest.raises(ProxyHeaderError):
        parse_v2(v2(command=0x31)[:16], v2()[16:])  # version 3


def proxied_daemon(daemons: DaemonFactory, tmp_path: Path, mode: str, extra: str = "", *args: str):  # type: ignore[no-untyped-def]
    toml = tmp_path / f"proxy{len(daemons.started)}.toml"
    toml.write_text(f'[network]\nproxy_protocol = "{mode}"\ntrusted_proxies = ["{BALANCER}/32"]\n{extra}')
    return daemons.start("--config", str(toml), *args)


def closed_without_answer(client: RawClient, timeout: float = 10) -> bool:
    client.sock.settimeout(timeout)
    try:
        return client.sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    ("mode", "prefix", "reason"),
    [
        ("v2", b"", "no PROXY header"),
        ("v2", v2()[:10], "closed inside the PROXY header"),
        ("v1", b"PROXY TCP4 10.0.0.1 127.0.0.1 99999 104\r\n", "bad port"),
        ("v2", b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:], "no PROXY header"),
        ("v2", v2(length=60000)[:16], "v2 header of 60000 bytes"),
        ("v1", v2(), "a v2 header where v1 is configured"),
        ("v1", b"PROXY " + b"9" * 120, "without CRLF within 107 bytes"),
    ],
    ids=[
        "none",
        "truncated",
        "v1 bad port",
        "v2 bad signature",
        "v2 oversized",
        "wrong version",
        "v1 endless",
    ],
)
def test_bad_headers_close_the_connection(
    daemons: DaemonFactory, tmp_path: Path, mode: str, prefix: bytes, reason: str
) -> None:
    d = proxied_daemon(daemons, tmp_path, mode)
    client = RawClient(d.port, source=BALANCER, prefix=prefix)
    try:
        if not prefix:
            client.sock.sendall(associate_rq(["1.2.840.10008.1.2"]))
        elif reason.startswith("closed inside"):
            client.sock.shutdown(socket.SHUT_WR)
        assert closed_without_answer(client)
    finally:
        client.close()
    wait_for(lambda: "conn.proxy_rejected" in d.log() and reason in d.log())
    assert "assoc.accepted" not in d.log()


def test_a_spoofed_header_from_an_untrusted_address_is_refused(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    d = proxied_daemon(daemons, tmp_path, "any")
    spoof = RawClient(d.port, prefix=v1("10.1.2.3"))  # from 127.0.0.1, not the balancer
    try:
        spoof.sock.sendall(associate_rq(["1.2.840.10008.1.2"]))
        assert closed_without_answer(spoof)
    finally:
        spoof.close()
    wait_for(lambda: "127.0.0.1 is not in network.trusted_proxies" in d.log())
    assert "10.1.2.3" not in d.log(), "nothing of a spoofed header is believed, or even read"


def test_a_trickled_header_is_bounded_by_artim_and_stalls_nobody(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    d = proxied_daemon(daemons, tmp_path, "v1", "", "-ta", "2")
    slow = RawClient(d.port, source=BALANCER)

    def a_proper_client_is_served(elapsed: float) -> None:
        if 0.5 < elapsed < 1.5:
            quick = RawClient(d.port, source=BALANCER, prefix=v1("10.0.0.5"))
            try:
                assert quick.associate(VERIFICATION, "1.2.840.10008.1.2") == pdu.A_ASSOCIATE_AC
            finally:
                quick.close()

    try:
        closed_after = trickle(slow.sock, v1(), 0.2, a_proper_client_is_served)
    finally:
        slow.close()
    assert closed_after is not None and closed_after < 6
    assert "10.0.0.5" in d.log()


def test_the_header_address_is_the_peer_for_rules_and_logs(daemons: DaemonFactory, tmp_path: Path) -> None:
    rule = '[access]\ndefault = "allow"\n[[access.rule]]\naction = "deny"\nfrom = ["10.66.0.0/16"]\n'
    d = proxied_daemon(daemons, tmp_path, "any", rule)
    assert "conn.proxy_rejected" not in d.log(), "a port probe (connect, close) is not an attack"
    for header, host in ((v2("10.5.5.5", 5555), "10.5.5.5:5555"), (v1("10.6.6.6", 6666), "10.6.6.6:6666")):
        client = RawClient(d.port, source=BALANCER, prefix=header)
        try:
            assert client.associate(VERIFICATION, "1.2.840.10008.1.2") == pdu.A_ASSOCIATE_AC
        finally:
            client.close()
        wait_for(lambda host=host: f"peer={host}" in d.log())
    denied = RawClient(d.port, source=BALANCER, prefix=v2("10.66.1.1"))
    try:
        assert denied.associate(VERIFICATION, "1.2.840.10008.1.2") == pdu.A_ASSOCIATE_RJ
    finally:
        denied.close()
    local = RawClient(d.port, source=BALANCER, prefix=v2(command=0x20, length=0)[:16])
    try:  # LOCAL: the balancer's own check keeps the balancer's address
        assert local.associate(VERIFICATION, "1.2.840.10008.1.2") == pdu.A_ASSOCIATE_AC
    finally:
        local.close()
    wait_for(lambda: f"peer={BALANCER}:" in d.log())


def haproxy_cfg(tmp_path: Path, front: int, backend: int, send: str) -> Path:
    cfg = tmp_path / f"haproxy-{send}.cfg"
    cfg.write_text(
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    timeout connect 5s\n"
        "    timeout client 60s\n    timeout server 60s\n"
        f"frontend dicom\n    bind 127.0.0.1:{front}\n    default_backend rcv\n"
        f"backend rcv\n    server s1 127.0.0.1:{backend} source {BALANCER} {send}\n"
    )
    return cfg


@pytest.mark.parametrize(("send", "mode"), [("send-proxy-v2", "v2"), ("send-proxy", "v1")])
def test_storescu_through_a_real_haproxy(
    daemons: DaemonFactory, tmp_path: Path, send: str, mode: str
) -> None:
    rule = '[access]\ndefault = "allow"\n'
    d = proxied_daemon(daemons, tmp_path, mode, rule)
    front = free_port()
    cfg = haproxy_cfg(tmp_path, front, d.port, send)
    log = (tmp_path / "haproxy.log").open("w")
    proxy = subprocess.Popen([need("haproxy"), "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(front))
        path = write(make_dataset(rows=16, columns=16), tmp_path / "one.dcm")
        assert run([need("storescu"), "127.0.0.1", str(front), str(path)]).returncode == 0
        assert len(stored(d.output)) == 1
        wait_for(lambda: "store.completed" in d.log())
        accepted = next(line for line in d.log().splitlines() if "assoc.accepted" in line)
        assert "peer=127.0.0.1:" in accepted and f"proxy={BALANCER}:" in accepted
        # A rule on the client's address decides (the balancer's would not match it).
        toml = tmp_path / f"proxy{len(daemons.started) - 1}.toml"
        toml.write_text(toml.read_text() + '[[access.rule]]\naction = "deny"\nfrom = ["127.0.0.1/32"]\n')
        d.proc.send_signal(__import__("signal").SIGHUP)
        wait_for(lambda: "reload.completed" in d.log())
        assert run([need("storescu"), "127.0.0.1", str(front), str(path)]).returncode != 0
        assert "access denied" in d.log()
    finally:
        proxy.kill()
        proxy.wait()
        log.close()


def test_tls_through_haproxy_with_proxy_v2(daemons: DaemonFactory, tmp_path: Path) -> None:
    from test_tls import PKI, client_tls, tls_args

    need("openssl")
    pki = PKI(tmp_path / "pki")
    d = proxied_daemon(daemons, tmp_path, "v2", "", *tls_args(pki))
    front = free_port()
    cfg = haproxy_cfg(tmp_path, front, d.port, "send-proxy-v2")
    proxy = subprocess.Popen(
        [need("haproxy"), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: port_open(front))
        result = run([need("echoscu"), *client_tls(pki, pki.client), "127.0.0.1", str(front)], timeout=60)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: "tls_peer_subject" in d.log())
        assert f"proxy={BALANCER}:" in d.log()
    finally:
        proxy.kill()
        proxy.wait()
