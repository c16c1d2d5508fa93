"""The shipped etc/haproxy.cfg, run with Debian's haproxy against three dcmrecvd processes: all
serve; one crosses its watermark and HAProxy, told by the agent check, sends it nothing new while
the others keep storing; no acknowledged object is lost."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

from conftest import ROOT, Daemon, DaemonFactory, free_port, need, port_open, run, wait_for
from datasets import make_dataset, write
from pydicom import dcmread
from test_receive import stored

SHIPPED = ROOT / "etc" / "haproxy.cfg"


def haproxy_config(tmp_path: Path, front: int, receivers: list[tuple[int, int]]) -> tuple[Path, Path]:
    """The shipped file with only its addresses, ports and stats socket path replaced."""
    text = SHIPPED.read_text()
    admin = tmp_path / "admin.sock"
    text = text.replace("/run/haproxy/dcmrecvd-admin.sock", str(admin))
    text, binds = re.subn(r"(?m)^(\s+bind) :104$", rf"\1 127.0.0.1:{front}", text)
    assert binds == 1
    text, n = re.subn(
        r"(?m)^(\s+default-server .*) inter 2s (.*) agent-inter 2s$", r"\1 inter 1s \2 agent-inter 1s", text
    )
    assert n == 1, "the default-server line changed shape"
    for number, (port, agent) in enumerate(receivers, start=1):
        pattern = rf"(?m)^(\s+server rcv{number}) 192\.0\.2\.1{number}:11112$"
        text, n = re.subn(pattern, rf"\1 127.0.0.1:{port} agent-port {agent}", text)
        assert n == 1, f"rcv{number} line changed shape"
    assert not re.search(r"(?m)^\s+server .*192\.0\.2\.", text), "a receiver of the shipped file was left"
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return path, admin


def server_states(admin: Path) -> dict[str, str]:
    """Server name -> status from HAProxy's own stats socket (UP, DRAIN, MAINT, DOWN...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "dcmrecvd" and row.get("svname", "").startswith("rcv"):
            out[row["svname"]] = row["status"]
    return out


def receiver(daemons: DaemonFactory, tmp_path: Path, name: str) -> tuple[Daemon, int, Path]:
    agent = free_port()
    toml = tmp_path / f"{name}.toml"
    toml.write_text(
        f'[metrics]\nagent_listen = "127.0.0.1:{agent}"\n'
        '[network]\nproxy_protocol = "v2"\ntrusted_proxies = ["127.0.0.1/32"]\n'
    )
    d = daemons.start("--config", str(toml))
    wait_for(lambda: port_open(agent))
    return d, agent, toml


def test_two_receivers_behind_haproxy_one_drains_when_its_disk_crosses_the_watermark(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    one, agent1, toml1 = receiver(daemons, tmp_path, "rcv1")
    two, agent2, _ = receiver(daemons, tmp_path, "rcv2")
    three, agent3, _ = receiver(daemons, tmp_path, "rcv3")
    front = free_port()
    cfg, admin = haproxy_config(
        tmp_path, front, [(one.port, agent1), (two.port, agent2), (three.port, agent3)]
    )
    assert run([need("haproxy"), "-c", "-f", str(cfg)]).returncode == 0
    log = (tmp_path / "haproxy.log").open("w")
    proxy = subprocess.Popen([need("haproxy"), "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(front) and admin.exists())
        wait_for(lambda: server_states(admin) == {"rcv1": "UP", "rcv2": "UP", "rcv3": "UP"}, timeout=20)
        folder = tmp_path / "send"
        folder.mkdir()
        sent: list[str] = []

        def send_one(i: int) -> None:
            path = write(make_dataset(rows=32, columns=32, seed=i), folder / f"o{i}.dcm")
            assert run([need("storescu"), "127.0.0.1", str(front), str(path)]).returncode == 0
            sent.append(str(dcmread(path).SOPInstanceUID))

        for i in range(12):  # one association each: round robin over all three
            send_one(i)
        assert all(len(stored(d.output)) > 0 for d in (one, two, three))
        before = len(stored(one.output))
        # rcv1's disk "fills": a watermark above what it has free, applied by SIGHUP.
        toml1.write_text(toml1.read_text() + '[output]\nmin_free = "99.9%"\n')
        one.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: server_states(admin).get("rcv1", "").startswith("DRAIN"), timeout=20)
        assert server_states(admin)["rcv2"] == server_states(admin)["rcv3"] == "UP"
        for i in range(12, 24):
            send_one(i)
        assert len(stored(one.output)) == before, "a draining receiver got new associations"
        received = {str(dcmread(p).SOPInstanceUID) for d in (one, two, three) for p in stored(d.output)}
        assert received == set(sent), "every acknowledged object is on one of the disks"
        assert "disk.low" in one.log()
        logs = one.log() + two.log() + three.log()
        assert "proxy=127.0.0.1:" in logs, "the PROXY header reached the receivers"
        assert "conn.proxy_rejected" not in logs, "health checks send the header too"
    finally:
        proxy.kill()
        proxy.wait()
        log.close()
