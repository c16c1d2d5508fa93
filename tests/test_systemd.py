"""systemd for real: unit checks, sd_notify on a test-owned socket, socket activation
with systemd-socket-activate, reload under load, drain on SIGTERM, --daemon mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    DaemonFactory,
    dcmrecvd_cmd,
    free_port,
    isolated_env,
    need,
    per_file_config,
    port_open,
    run,
    wait_for,
)
from datasets import make_dataset, write
from notify import NotifySocket
from peers import associate
from pydicom.uid import ExplicitVRLittleEndian
from test_receive import stored, write_huge

from dcmrecvd.store.storage import TEMP_PREFIX

pytestmark = pytest.mark.systemd

UNITS = ROOT / "systemd"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
VERIFICATION = "1.2.840.10008.1.1"

TWO_PROFILES = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[A]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = MRImageStorage\\Uncompressed
[B]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = UltrasoundImageStorage\\Uncompressed
[[Profiles]]
[A]
PresentationContexts = A
[B]
PresentationContexts = B
"""


# --------------------------------------------------------------------------- units


@pytest.fixture
def units_for_host(tmp_path: Path) -> Path:
    """The unit files with ExecStart pointing at this checkout's dcmrecvd."""
    binary = Path(sys.executable).parent / "dcmrecvd"
    assert binary.exists()
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.glob("dcmrecvd*.s*"):
        (out / unit.name).write_text(unit.read_text().replace("/usr/bin/dcmrecvd", str(binary)))
    return out


@pytest.mark.parametrize(
    "units", [("dcmrecvd.service", "dcmrecvd.socket"), ("dcmrecvd@11113.service", "dcmrecvd@11113.socket")]
)
def test_units_verify_clean(units_for_host: Path, units: tuple[str, str]) -> None:
    result = subprocess.run(
        [need("systemd-analyze"), "verify", "--man=no", *units],
        cwd=units_for_host,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("unit", ["dcmrecvd.service", "dcmrecvd@.service"])
def test_units_hardened(unit: str) -> None:
    result = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=true", "--threshold=20", str(UNITS / unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level" in result.stdout


def test_unit_contract() -> None:
    service = (UNITS / "dcmrecvd.service").read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=dcmrecvd",
        "StateDirectory=dcmrecvd/state dcmrecvd/incoming",
        "RestartPreventExitStatus=1 45 66 71",
        "WatchdogSec=",
    ):
        assert line in service
    socket_unit = (UNITS / "dcmrecvd.socket").read_text()
    assert "ListenStream=104" in socket_unit and "FileDescriptorName=dicom" in socket_unit
    assert "u dcmrecvd" in (UNITS / "dcmrecvd.sysusers").read_text()
    assert "/var/lib/dcmrecvd" in (UNITS / "dcmrecvd.tmpfiles").read_text()


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def test_notify_lifecycle_from_the_main_pid(daemons: DaemonFactory, notify: NotifySocket) -> None:
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    d = daemons.start(env=env)
    notify.wait("READY", "1", pid=d.pid)
    assert any("0 active" in s for s in notify.values("STATUS"))
    notify.wait("WATCHDOG", "1", pid=d.pid, timeout=5)
    mark = notify.count()
    d.proc.send_signal(signal.SIGHUP)
    notify.wait("RELOADING", "1", pid=d.pid, after=mark)
    notify.wait("READY", "1", pid=d.pid, after=mark)
    reloading = next(f for _, f in notify.messages[mark:] if "RELOADING" in f)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
    notify.wait("STATUS", pid=d.pid, after=mark)
    wait_for(lambda: any("1 associations" in s for s in notify.values("STATUS")), timeout=10)
    assert d.stop() == 0
    assert notify.seen("STOPPING", "1", pid=d.pid)


def test_ready_only_after_listening(daemons: DaemonFactory, notify: NotifySocket) -> None:
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start(env=env, wait=False)
    notify.wait("READY", "1", pid=d.pid)
    assert port_open(d.port)


# --------------------------------------------------------------------------- socket activation


def test_socket_activation(tmp_path: Path, notify: NotifySocket) -> None:
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    env = isolated_env(config_dir, NOTIFY_SOCKET=str(notify.path))
    cmd = [
        need("systemd-socket-activate"),
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=dicom",
        "-E",
        f"NOTIFY_SOCKET={notify.path}",
        "-E",
        f"DCMRECVD_CONFIG_DIR={config_dir}",
        *dcmrecvd_cmd(),
        "-v",
        "-od",
        str(out),
        "-xf",
        str(ROOT / "etc/storescp.cfg"),
        "Default",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: port_open(port), timeout=10)
        # The first connection starts the daemon; echoscu retries are not needed: the
        # socket already listens, the kernel queues the connection.
        assert run([need("echoscu"), "127.0.0.1", str(port)]).returncode == 0
        notify.wait("READY", "1")
        (pid, _) = next(m for m in notify.messages if m[1].get("READY") == "1")
        assert pid == proc.pid  # systemd-socket-activate execs the daemon in place
        path = write(make_dataset(rows=8, columns=8), tmp_path / "a.dcm")
        assert run([need("storescu"), "127.0.0.1", str(port), str(path)]).returncode == 0
        assert len(stored(out)) == 1
        # SIGHUP must not close or rebind the inherited socket.
        mark = notify.count()
        proc.send_signal(signal.SIGHUP)
        notify.wait("READY", "1", after=mark)
        assert run([need("echoscu"), "127.0.0.1", str(port)]).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output


# --------------------------------------------------------------------------- reload


def _profile_toml(config_dir: Path, cfg: Path, profile: str) -> None:
    dropins = config_dir / "dcmrecvd.toml.d"
    dropins.mkdir(exist_ok=True)
    tmp = dropins / ".10-profile.toml.new"
    tmp.write_text(f'[association]\nconfig_file = "{cfg}"\nprofile = "{profile}"\n')
    os.replace(tmp, dropins / "10-profile.toml")


def _accepted(port: int) -> set[str]:
    assoc = associate(port, [(MR, [ExplicitVRLittleEndian]), (US, [ExplicitVRLittleEndian])])
    try:
        assert assoc.is_established
        return {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    finally:
        assoc.release()


def test_reload_under_load(daemons: DaemonFactory, notify: NotifySocket, tmp_path: Path) -> None:
    cfg = tmp_path / "two.cfg"
    cfg.write_text(TWO_PROFILES)
    _profile_toml(daemons.config_dir, cfg, "A")
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start("+fsu", profile=None, env=env)
    notify.wait("READY", "1", pid=d.pid)
    assert _accepted(d.port) == {MR}
    folder = tmp_path / "load"
    folder.mkdir()
    files = [write(make_dataset(rows=32, columns=32, seed=i), folder / f"{i:03d}.dcm") for i in range(500)]
    sender = subprocess.Popen(
        [need("storescu"), "-xe", "127.0.0.1", str(d.port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": os.environ["PATH"]},
    )
    try:
        for i in range(20):
            profile = "B" if i % 2 == 0 else "A"
            _profile_toml(daemons.config_dir, cfg, profile)
            mark = notify.count()
            d.proc.send_signal(signal.SIGHUP)
            notify.wait("READY", "1", after=mark)
            assert _accepted(d.port) == ({US} if profile == "B" else {MR})
        _, err = sender.communicate(timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, err
    assert len(stored(d.output)) == 500
    log = d.log()
    assert log.count("reload.completed") == 20
    assert "assoc.aborted" not in log
    # A broken config is rejected; the old one keeps serving.
    (daemons.config_dir / "dcmrecvd.toml.d" / "20-broken.toml").write_text("[network]\nmax_pdu = 1\n")
    mark = notify.count()
    d.proc.send_signal(signal.SIGHUP)
    notify.wait("READY", "1", after=mark)
    wait_for(lambda: "reload.rejected" in d.log())
    assert "20-broken.toml: network.max_pdu" in d.log()
    assert any("last reload: failed" in s for s in notify.values("STATUS"))
    assert _accepted(d.port) == {MR}
    assert d.proc.poll() is None


def test_reload_with_broken_profile_keeps_serving(
    daemons: DaemonFactory, notify: NotifySocket, tmp_path: Path
) -> None:
    cfg = tmp_path / "two.cfg"
    cfg.write_text(TWO_PROFILES)
    _profile_toml(daemons.config_dir, cfg, "A")
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start(profile=None, env=env)
    notify.wait("READY", "1", pid=d.pid)
    cfg.write_text(TWO_PROFILES.replace("MRImageStorage", "NoSuchImageStorage"))
    mark = notify.count()
    d.proc.send_signal(signal.SIGHUP)
    notify.wait("READY", "1", after=mark)
    wait_for(lambda: "reload.rejected" in d.log())
    assert f"{cfg}:9: unknown SOP class 'NoSuchImageStorage'" in d.log()
    assert _accepted(d.port) == {MR}


def test_reload_names_settings_that_need_a_restart(daemons: DaemonFactory, notify: NotifySocket) -> None:
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start(env=env)
    notify.wait("READY", "1", pid=d.pid)
    (daemons.config_dir / "dcmrecvd.toml").write_text('[network]\naddress = "127.0.0.2"\n')
    mark = notify.count()
    d.proc.send_signal(signal.SIGHUP)
    notify.wait("READY", "1", after=mark)
    wait_for(lambda: "reload.needs_restart" in d.log())
    assert "network.address" in d.log()
    assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0


# --------------------------------------------------------------------------- stop


def test_sigterm_drains_a_transfer_in_flight(daemons: DaemonFactory, tmp_path: Path) -> None:
    big = write_huge(tmp_path / "big.dcm", 200 * 1024 * 1024)
    d = daemons.start("-pdu", "4096")
    sender = subprocess.Popen(
        [need("storescu"), "127.0.0.1", str(d.port), str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": os.environ["PATH"]},
    )
    try:
        wait_for(
            lambda: any(p.name.startswith(TEMP_PREFIX) for p in d.output.iterdir()),
            timeout=30,
            interval=0.005,
        )
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "daemon.stopping" in d.log(), timeout=10)
        refused = run([need("echoscu"), "127.0.0.1", str(d.port)])
        assert refused.returncode != 0
        output, _ = sender.communicate(timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, output
    assert d.proc.wait(60) == 0
    (got,) = stored(d.output)
    assert got.stat().st_size > 200 * 1024 * 1024


def test_drain_timeout_aborts_and_removes_partial(daemons: DaemonFactory, tmp_path: Path) -> None:
    from peers import RawClient

    # The per-file path: through the journal a small partial object never reaches the disk.
    d = daemons.start("--drain-timeout", "1", "--config", str(per_file_config(tmp_path)))
    client = RawClient(d.port)
    assert client.associate(CT, ExplicitVRLittleEndian) == 0x02
    client.send_pdv(client.store_command(CT, "1.2.3.4"), command=True, last=True)
    # The temp file opens once the dataset's SOP Instance UID is known (past (0008,0018)).
    head = b"\x08\x00\x16\x00UI\x02\x001\x00" + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"
    client.send_pdv(head + b"\x08\x00\x20\x00DA\x08\x0020240131", command=False, last=False)
    wait_for(lambda: any(p.name.startswith(TEMP_PREFIX) for p in d.output.iterdir()))
    start = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - start < 15
    client.close()
    assert stored(d.output) == []


# --------------------------------------------------------------------------- classic daemon mode


def test_daemon_mode_with_pidfile(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pidfile = tmp_path / "run" / "dcmrecvd.pid"
    pidfile.parent.mkdir()
    port = free_port()
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    result = subprocess.run(
        [*dcmrecvd_cmd(), "--daemon", "--pidfile", str(pidfile), "-od", str(out), str(port)],
        env=isolated_env(config_dir),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
    try:
        assert Path(f"/proc/{pid}").exists()
        assert os.getsid(pid) != os.getsid(0)  # a session of its own: detached
        wait_for(lambda: port_open(port))
        assert run([need("echoscu"), "127.0.0.1", str(port)]).returncode == 0
        # a second instance with the same pidfile refuses to start
        again = subprocess.run(
            [*dcmrecvd_cmd(), "--daemon", "--pidfile", str(pidfile), "-od", str(out), str(free_port())],
            env=isolated_env(config_dir),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.returncode != 0
        assert "locked" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )
    wait_for(lambda: not pidfile.exists())


def test_reload_applies_a_new_log_level(daemons: DaemonFactory, notify: NotifySocket, tmp_path: Path) -> None:
    from peers import send_file

    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start(env=env, verbose=False)
    notify.wait("READY", "1", pid=d.pid)
    first = write(make_dataset(rows=8, columns=8), tmp_path / "first.dcm")
    assert send_file(d.port, first) == 0
    assert "store.completed" not in d.log()  # warnings only, by default
    (daemons.config_dir / "dcmrecvd.toml").write_text('[logging]\nlevel = "info"\n')
    mark = notify.count()
    d.proc.send_signal(signal.SIGHUP)
    notify.wait("READY", "1", after=mark)
    second = write(make_dataset(rows=8, columns=8), tmp_path / "second.dcm")
    assert send_file(d.port, second) == 0
    wait_for(lambda: "store.completed" in d.log())
