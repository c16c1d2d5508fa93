"""Shared fixtures: ephemeral ports, the daemon as a real subprocess, real peers.

No sleeps for synchronisation: ``wait_for`` polls a condition against a
deadline.  Every process a test starts is stopped by PID in teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PROFILES = ROOT / "etc" / "storescp.cfg"
DCMTK_PROFILES = DATA / "dcmtk-storescp.cfg"
sys.path.insert(0, str(ROOT / "bench"))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def free_port() -> int:
    """An ephemeral TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def dcmrecvd_cmd() -> list[str]:
    """How to run the daemon under test (the installed package in this venv)."""
    return [sys.executable, "-m", "dcmrecvd"]


def per_file_config(tmp_path: Path) -> Path:
    """A config file that turns the ack journal off: the per-file path (fsync per object)."""
    path = tmp_path / "per-file.toml"
    path.write_text("[journal]\nenabled = false\n")
    return path


def isolated_env(config_dir: Path, **extra: str) -> dict[str, str]:
    """An environment whose config layers are the test's own, never /etc, and whose state
    directories (one per output directory) are under the test's own directory."""
    env = dict(os.environ)
    env["DCMRECVD_CONFIG_DIR"] = str(config_dir)
    env["XDG_STATE_HOME"] = str(config_dir.parent / "state")
    env.pop("STATE_DIRECTORY", None)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LISTEN_FDS", None)
    env.pop("JOURNAL_STREAM", None)
    env.update(extra)
    return env


@dataclass
class Daemon:
    """A running dcmrecvd subprocess."""

    proc: subprocess.Popen[str]
    port: int
    output: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    #: Its state directory (journal, index, outbox, quarantine), away from ``output``.
    state: Path = Path("/nonexistent")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class DaemonFactory:
    """Starts daemons for a test and stops all of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Daemon] = []
        self.config_dir = tmp_path / "etc"
        self.config_dir.mkdir(exist_ok=True)

    def start(
        self,
        *args: str,
        output: Path | None = None,
        port: int | None = None,
        profile: str | None = "Default",
        env: dict[str, str] | None = None,
        wait: bool = True,
        verbose: bool = True,
    ) -> Daemon:
        if port is None and wait:
            # free_port() only finds a port that was free a moment ago; a client socket of
            # another test may take it before the daemon binds. Retry on that one failure.
            for _ in range(4):
                daemon = self._start(args, output, free_port(), profile, env, wait, verbose, retry=True)
                if daemon is not None:
                    return daemon
        result = self._start(args, output, port or free_port(), profile, env, wait, verbose, retry=False)
        assert result is not None
        return result

    def _start(
        self,
        args: tuple[str, ...],
        output: Path | None,
        port: int,
        profile: str | None,
        env: dict[str, str] | None,
        wait: bool,
        verbose: bool,
        retry: bool,
    ) -> Daemon | None:
        if output is None:
            output = self.tmp_path / f"out{len(self.started)}"
            output.mkdir(exist_ok=True)
        argv = [*dcmrecvd_cmd()]
        if verbose:
            argv.append("-v")
        argv += ["-od", str(output)]
        if profile:
            argv += ["-xf", str(PROFILES), profile]
        argv += [*args, str(port)]
        log_path = self.tmp_path / f"daemon{len(self.started)}.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env or isolated_env(self.config_dir, NO_COLOR="1"),
                text=True,
            )
        daemon = Daemon(proc, port, output, log_path, argv, state_of(output, self.config_dir))
        self.started.append(daemon)
        if wait:
            wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=20)
            if retry and proc.poll() == 64 and "Address already in use" in daemon.log():
                self.started.remove(daemon)
                return None
            assert proc.poll() is None, f"daemon exited early:\n{daemon.log()}"
        return daemon

    def cleanup(self) -> None:
        for daemon in self.started:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a peer (storescu, echoscu, dcmsend...) with Nagle off, capturing output."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(kwargs.pop("env", {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def dcmrecvd(
    *args: str, config_dir: Path, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run dcmrecvd to completion (for option and config checks)."""
    return subprocess.run(
        [*dcmrecvd_cmd(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=isolated_env(config_dir),
        cwd=cwd,
    )


def state_of(output: Path, config_dir: Path) -> Path:
    """The state directory a daemon started with ``isolated_env(config_dir)`` uses for ``output``."""
    from dcmrecvd.store.state_directory import resolve

    return resolve("", output, {"XDG_STATE_HOME": str(config_dir.parent / "state")})


def need(tool: str) -> str:
    """The path of a required external tool; fail loudly if CI forgot to install it."""
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (see .ci/run)"
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(exist_ok=True)
    return directory
