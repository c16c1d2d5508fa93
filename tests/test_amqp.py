"""[events.amqp] against a real RabbitMQ (Debian's rabbitmq-server, started here in the
foreground with its own data directory and ports): confirmed, persistent messages; the
broker stopped mid-stream and started again loses nothing, and receiving never waits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DaemonFactory, dcmrecvd_cmd, free_port, need, wait_for
from test_hooks import dataset, send_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="rabbitmq-server runs as its own user: needs root")
QUEUE = "dcmrecvd-events"
PASSWORD = "s3cret-Pw-4-amqp"


@dataclass
class Broker:
    directory: Path
    port: int
    dist_port: int
    node: str
    #: The broker starts Erlang's port mapper (epmd) as a daemon: a private port makes it ours
    #: to stop at the end.
    epmd_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [need("rabbitmq-server")],
            env=self.env(),
            stdout=(self.directory / "out.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self.accepting, timeout=60, interval=0.2)

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(8) != b""  # connection.start
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl("stop")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        self.proc = None

    def ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args], env=self.env(), capture_output=True, timeout=60
        )

    def messages(self, expected: int, timeout: float = 60) -> list[dict[str, object]]:
        """Consume from the queue until ``expected`` messages arrived (acking each)."""
        import pika

        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port))
        got: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout
        try:
            channel = connection.channel()
            while len(got) < expected and time.monotonic() < deadline:
                method, _props, body = channel.basic_get(QUEUE, auto_ack=True)
                if method is None:
                    connection.sleep(0.05)
                    continue
                got.append(json.loads(body))
        finally:
            connection.close()
        return got


@pytest.fixture
def broker() -> Iterator[Broker]:
    # Outside pytest's 0700 temp tree: the broker runs as the rabbitmq user.
    directory = Path(tempfile.mkdtemp(prefix="dcmrecvd-rabbitmq-"))
    for sub in ("mnesia", "log"):
        (directory / sub).mkdir(parents=True)
    (directory / "plugins").write_text("[].\n")
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(directory)], check=True)
    b = Broker(directory, free_port(), free_port(), f"dcmrecvd{os.getpid()}@localhost", free_port())
    b.start()
    for command in (
        ("add_user", "dcmrecvd", PASSWORD),
        ("set_permissions", "-p", "/", "dcmrecvd", ".*", ".*", ".*"),
    ):
        done = b.ctl(*command)
        assert done.returncode == 0, done.stderr
    try:
        yield b
    finally:
        b.stop()
        subprocess.run(["epmd", "-kill"], env=b.env(), capture_output=True, timeout=30)  # our own epmd
        shutil.rmtree(directory, ignore_errors=True)


def amqp_config(tmp_path: Path, port: int) -> Path:
    password = tmp_path / "amqp-password"
    password.write_text(PASSWORD + "\n")
    path = tmp_path / "amqp.toml"
    path.write_text(
        "\n".join(
            [
                "[events.amqp]",
                f'url = "amqp://127.0.0.1:{port}/%2F"',
                'user = "dcmrecvd"',
                f'password_file = "{password}"',
                'exchange = "dicom"',
                f'queue = "{QUEUE}"',
                'routing_key = "{event}.{called_aet}"',
                "",
            ]
        )
    )
    return path


def test_events_reach_rabbitmq_and_wait_for_it_when_it_is_down(
    daemons: DaemonFactory, tmp_path: Path, broker: Broker
) -> None:
    config = amqp_config(tmp_path, broker.port)
    d = daemons.start("--config", str(config))
    wait_for(lambda: "events.amqp_up" in d.log(), timeout=30)
    first = [(f"1.2.8.{i}", dataset(f"1.2.8.{i}", "1.2.8")) for i in range(20)]
    assert send_all(d.port, first) == [0] * 20
    got = broker.messages(20)
    assert sorted(m["sop_instance_uid"] for m in got) == sorted(u for u, _ in first)
    assert all(m["event"] == "object.stored" for m in got)
    broker.stop()
    wait_for(lambda: "events.amqp_down" in d.log(), timeout=30)
    second = [(f"1.2.9.{i}", dataset(f"1.2.9.{i}", "1.2.9")) for i in range(20)]
    started = time.monotonic()
    assert send_all(d.port, second) == [0] * 20  # receiving does not wait for the broker
    assert time.monotonic() - started < 10
    broker.start()
    got = broker.messages(20)  # waited in the outbox, confirmed once the broker is back
    assert sorted(m["sop_instance_uid"] for m in got) == sorted(u for u, _ in second)
    assert all(m["event"] == "object.stored" and m["called_aet"] == "ANY-SCP" for m in got)
    printed = subprocess.run(
        [*dcmrecvd_cmd(), "--config", str(config), "--print-config"], capture_output=True, text=True
    )
    assert "password_file" in printed.stdout
    assert PASSWORD not in d.log() + printed.stdout + printed.stderr  # credentials are never shown


def test_an_unreadable_password_stops_a_start_but_not_a_running_daemon(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    port = free_port()  # nobody listens: the publisher just waits for the broker
    config = amqp_config(tmp_path, port)
    (tmp_path / "amqp-password").unlink()
    refused = daemons.start("--config", str(config), wait=False)
    assert refused.proc.wait(20) != 0
    assert "cannot read the password" in refused.log()
    (tmp_path / "amqp-password").write_text(PASSWORD + "\n")
    d = daemons.start("--config", str(config))
    wait_for(lambda: "events.amqp_down" in d.log(), timeout=30)
    config.write_text(config.read_text().replace("amqp-password", "no-such-file"))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "reload.rejected" in d.log(), timeout=20)
    assert d.proc.poll() is None
    assert send_all(d.port, [("1.2.10.1", dataset("1.2.10.1", "1.2.10"))]) == [0]
