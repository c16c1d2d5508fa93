"""A fleet in network namespaces: senders, HAProxy, three dcmrecvd nodes (each on its own
loop-mounted ext4), Orthanc and RabbitMQ behind them, linked through a bridge in a namespace
of its own, on 198.18.0.0/24 (the benchmarking range: never leaves the machine).

Everything is a child of the test, started in the foreground with its own data directory,
and torn down by ``Fleet.close`` whatever happened (processes by PID, mounts, namespaces).
The balancer runs the shipped ``etc/haproxy.cfg`` with only its addresses rewritten, and the
nodes the configuration docs/FLEET.md shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import PROFILES, ROOT, dcmrecvd_cmd, isolated_env, wait_for
from orthanc_peer import orthanc_up
from test_haproxy import server_states

NET = "198.18.0"
LB = f"{NET}.2"
ARCHIVE = f"{NET}.20"
NODES = {"node1": f"{NET}.11", "node2": f"{NET}.12", "node3": f"{NET}.13"}
HOSTS = {"client": f"{NET}.1", "lb": LB, **NODES, "archive": ARCHIVE}
DICOM_PORT, METRICS_PORT, AGENT_PORT = 11112, 9104, 9105
ORTHANC_DICOM, ORTHANC_HTTP, AMQP_PORT = 4242, 8042, 5672
QUEUE = "dcmrecvd-events"
AMQP_PASSWORD = "fleet-Pw-4-amqp"
#: Each node's filesystem, and the watermark below which its agent says drain.
DISK_MIB, MIN_FREE_MIB = 192, 48


def node_toml(name: str, password_file: Path) -> str:
    """A node's configuration, as docs/FLEET.md shows it (addresses of the test)."""
    address = NODES[name]
    return f"""\
[network]
proxy_protocol = "v2"
trusted_proxies = ["{LB}/32"]

[metrics]
listen = "{address}:{METRICS_PORT}"
agent_listen = "{address}:{AGENT_PORT}"
drain_notice = 2

[output]
min_free = "{MIN_FREE_MIB}MiB"

[daemon]
drain_timeout = 30
state_directory = "{password_file.parent}/state"

[events]
stable_seconds = 2

[events.amqp]
url = "amqp://{ARCHIVE}:{AMQP_PORT}/%2F"
user = "dcmrecvd"
password_file = "{password_file}"
exchange = "dicom"
queue = "{QUEUE}"

[[forward]]
name = "archive"
host = "{ARCHIVE}"
port = {ORTHANC_DICOM}
ae_title = "ORTHANC"
backoff = 1
backoff_max = 2
"""


def sh(*argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout, **kw)


class Netns:
    """One namespace of the fleet: ``run`` and ``spawn`` inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Everything started in it, stopped by ``Fleet.close``.
        self.procs: list[subprocess.Popen[bytes]] = []
        sh("ip", "netns", "add", name)
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*argv), check=check, timeout=timeout, **kw)

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.argv(*argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process living in this namespace (ours: nothing else ever enters it)."""
        found = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        return [int(pid) for pid in found if pid.isdigit()]

    def kill_all(self) -> None:
        """SIGKILL every process left in the namespace and wait until none is."""
        deadline = time.monotonic() + 20
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # reaped by their parents: looked at again, to a deadline


@dataclass
class Node:
    name: str
    ns: Netns
    mount: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> Path:
        return self.mount / "received"

    @property
    def address(self) -> str:
        return NODES[self.name]


@dataclass
class Sent:
    """What one sender saw: every file acknowledged, and the associations that failed."""

    acked: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    attempts: int = 0


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Fleet:
    """The topology of the module docstring; ``close`` undoes all of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tag = f"{os.getpid() % 100000}"
        self.tag = tag
        self.namespaces: dict[str, Netns] = {}
        self.mounts: list[Path] = []
        self.nodes: dict[str, Node] = {}
        self.rabbit_dir = Path(tempfile.mkdtemp(prefix="dcmrecvd-fleet-rabbitmq-"))
        self.admin = tmp / "haproxy-admin.sock"
        self.balancer: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ the network

    def build_network(self) -> None:
        switch = self.namespaces["switch"] = Netns(f"fsw{self.tag}")
        switch.run("ip", "link", "add", "br0", "type", "bridge")
        switch.run("ip", "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            ns = self.namespaces[host] = Netns(f"f{host}{self.tag}")
            port = f"p-{host}"
            switch.run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
            switch.run("ip", "link", "set", port, "master", "br0", "up")
            ns.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")

    def ns(self, host: str) -> Netns:
        return self.namespaces[host]

    def partition(self, host: str, other: str, cut: bool) -> None:
        """Cut (or mend) ``host``'s route to ``other``: packets to it go nowhere."""
        verb = "add" if cut else "del"
        self.ns(host).run("ip", "route", verb, "blackhole", f"{HOSTS[other]}/32")

    # ------------------------------------------------------------------ the archive

    def start_archive(self) -> None:
        archive = self.ns("archive")
        orthanc_up(archive, self.tmp, ports=(ORTHANC_DICOM, ORTHANC_HTTP), Name="archive", ConcurrentJobs=2)  # type: ignore[arg-type]
        d = self.rabbit_dir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True)
        (d / "plugins").write_text("[].\n")
        sh("chown", "-R", "rabbitmq:rabbitmq", str(d))
        archive.spawn(["rabbitmq-server"], d / "out.log", env=self.rabbit_env())
        wait_for(lambda: self.rabbitmqctl("status", check=False).returncode == 0, timeout=90, interval=0.5)
        self.rabbitmqctl("add_user", "dcmrecvd", AMQP_PASSWORD)
        self.rabbitmqctl("set_permissions", "-p", "/", "dcmrecvd", ".*", ".*", ".*")

    def rabbit_env(self) -> dict[str, str]:
        d = self.rabbit_dir
        return {
            **os.environ,
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_NODENAME": f"fleet{self.tag}@localhost",
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_NODE_IP_ADDRESS": "0.0.0.0",
            "RABBITMQ_DIST_PORT": "25672",
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "ERL_EPMD_PORT": "4369",
        }

    def rabbitmqctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        node = f"fleet{self.tag}@localhost"
        return self.ns("archive").run("rabbitmqctl", "-n", node, *args, check=check, env=self.rabbit_env())

    def orthanc(self, path: str, body: Any = None) -> Any:
        argv = ["curl", "-sS", "-f", "-X", "POST" if body is not None else "GET"]
        if body is not None:
            argv += ["--data-binary", json.dumps(body)]
        result = self.ns("archive").run(*argv, f"http://127.0.0.1:{ORTHANC_HTTP}{path}", timeout=120)
        return json.loads(result.stdout)

    def archived(self) -> set[str]:
        """Every SOP Instance UID Orthanc holds."""
        found = self.orthanc("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def published(self) -> list[dict[str, Any]]:
        """Every message in the events queue, consumed (a consumer inside the archive)."""
        script = (
            "import json, sys, pika\n"
            f"c = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', {AMQP_PORT}, "
            f"credentials=pika.PlainCredentials('dcmrecvd', '{AMQP_PASSWORD}')))\n"
            "ch = c.channel()\n"
            "while True:\n"
            f"    m, p, b = ch.basic_get('{QUEUE}', auto_ack=True)\n"
            "    if m is None: break\n"
            "    sys.stdout.write(b.decode() + '\\n')\n"
            "c.close()\n"
        )
        result = self.ns("archive").run(os.environ.get("PYTHON", _python()), "-c", script, timeout=120)
        return [json.loads(line) for line in result.stdout.splitlines() if line]

    # ------------------------------------------------------------------ the nodes

    def make_node(self, name: str) -> Node:
        image = self.tmp / f"{name}.img"
        mount = self.tmp / f"{name}-disk"
        mount.mkdir()
        with image.open("wb") as f:
            f.truncate(DISK_MIB << 20)
        sh("mkfs.ext4", "-q", "-F", str(image))
        sh("mount", "-o", "loop", str(image), str(mount))
        self.mounts.append(mount)
        (mount / "received").mkdir()
        password = mount / "amqp-password"
        password.write_text(AMQP_PASSWORD + "\n")
        config = self.tmp / f"{name}.toml"
        config.write_text(node_toml(name, password))
        node = self.nodes[name] = Node(name, self.ns(name), mount, config, self.tmp / f"{name}.log")
        return node

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        etc = self.tmp / f"{name}-etc"
        etc.mkdir(exist_ok=True)
        argv = [*dcmrecvd_cmd(), "-v", "--config", str(node.config), "-xf", str(PROFILES), "Default"]
        argv += ["-od", str(node.output), str(DICOM_PORT)]
        node.proc = node.ns.spawn(argv, node.log, env=isolated_env(etc, NO_COLOR="1"))
        wait_for(
            lambda: self.agent(name) == "up ready" or node.proc.poll() is not None, timeout=60, interval=0.1
        )
        assert node.proc.poll() is None, node.log.read_text(errors="replace")[-3000:]

    def agent(self, name: str) -> str:
        result = self.ns("client").run(
            "bash",
            "-c",
            f"exec 3<>/dev/tcp/{NODES[name]}/{AGENT_PORT} && head -1 <&3",
            check=False,
            timeout=10,
        )
        return result.stdout.strip()

    def http(self, name: str, path: str) -> tuple[int, str]:
        result = self.ns("client").run(
            "curl", "-s", "-w", "\n%{http_code}", f"http://{NODES[name]}:{METRICS_PORT}{path}", check=False
        )
        body, _, code = result.stdout.rpartition("\n")
        return int(code or 0), body

    def metric(self, name: str, series: str) -> float:
        """One sample of a node's /metrics (0 when absent)."""
        _, text = self.http(name, "/metrics")
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def backlog_drained(self, name: str) -> bool:
        return self.metric(name, 'dcmrecvd_forward_queue{destination="archive"}') == 0

    # ------------------------------------------------------------------ the balancer

    def start_balancer(self) -> Path:
        text = (ROOT / "etc" / "haproxy.cfg").read_text()
        text = text.replace("/run/haproxy/dcmrecvd-admin.sock", str(self.admin))
        text, binds = re.subn(r"(?m)^(\s+bind) :104$", rf"\1 {LB}:104", text)
        assert binds == 1
        for number, address in enumerate(NODES.values(), start=1):
            text, n = re.subn(rf"(?m)^(\s+server rcv{number}) 192\.0\.2\.1{number}:", rf"\1 {address}:", text)
            assert n == 1, f"rcv{number} line changed shape"
        assert not re.search(r"(?m)^\s+server .*192\.0\.2\.", text), "a receiver of the shipped file was left"
        config = self.tmp / "haproxy.cfg"
        config.write_text(text)
        self.ns("lb").run("haproxy", "-c", "-f", str(config))
        self.balancer = self.ns("lb").spawn(["haproxy", "-f", str(config), "-db"], self.tmp / "haproxy.log")
        wait_for(self.admin.exists, timeout=20)
        return config

    def states(self) -> dict[str, str]:
        """rcvN -> HAProxy's status (UP, DRAIN, DOWN, MAINT...)."""
        return server_states(self.admin)

    def admin_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.admin))
            s.sendall(command.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    # ------------------------------------------------------------------ the senders

    def send(
        self, files: list[Path], calling: str, retries: int = 30, host: str = LB, port: int = 104
    ) -> Sent:
        """Store ``files`` in order through the balancer, as a modality's queue does: an
        association that fails leaves the files not acknowledged to the next one."""
        sent = Sent()
        pending = list(files)
        while pending and sent.attempts < retries:
            sent.attempts += 1
            result = self.ns("client").run(
                "storescu",
                "-v",
                "-aet",
                calling,
                "-to",
                "20",
                "-ta",
                "20",
                "-td",
                "20",
                host,
                str(port),
                *map(str, pending),
                check=False,
                timeout=300,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            acked = acked_files(result.stdout + result.stderr)
            sent.acked += [p for p in pending if str(p) in acked]
            pending = [p for p in pending if str(p) not in acked]
            if result.returncode != 0 or pending:
                sent.failures.append((result.stdout + result.stderr)[-600:])
                if pending:
                    time.sleep(0.5)  # a modality's retry interval: its behaviour, not our synchronisation
        return sent

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for node in self.nodes.values():
            stop_process(node.proc, signal.SIGKILL)
        for ns in self.namespaces.values():
            for proc in ns.procs:
                stop_process(proc, signal.SIGTERM, wait=20)
        for ns in self.namespaces.values():
            ns.kill_all()  # what those left behind (RabbitMQ's beam and epmd run as another user)
        for mount in self.mounts:
            sh("umount", "-l", str(mount), check=False)
        for ns in self.namespaces.values():
            sh("ip", "netns", "delete", ns.name, check=False)
        shutil.rmtree(self.rabbit_dir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def acked_files(output: str) -> set[str]:
    """Files storescu -v saw answered with success: each 'Sending file' line, then its response."""
    acked = set()
    current = ""
    for line in output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.add(current)
            current = ""
    return acked


def _python() -> str:
    import sys

    return sys.executable
