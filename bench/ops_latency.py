"""The operations listeners and signals under load (#28): how long a trickling HTTP client
keeps its connection, how long the slowest of 60 back-to-back connects takes, and how soon a
SIGHUP or SIGTERM is acted on while four threads poll the agent port (RELOADING= / STOPPING=
arrival on a private NOTIFY_SOCKET).  Measures the tree it is run from:

    cd <tree> && PYTHONPATH=<tree> /work/main/.venv/bin/python /work/main/bench/ops_latency.py
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import free_port, port_open, wait_for
from notify import NotifySocket


def trickle(port: int, request: bytes) -> float:
    """Seconds until the server answers or cuts a client sending a byte every 0.5 s."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.monotonic()
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            if select.select([s], [], [], 0.5)[0]:
                break
        return time.monotonic() - start


def slowest_connect(port: int, n: int = 60) -> float:
    held, slowest = [], 0.0
    try:
        for _ in range(n):
            started = time.monotonic()
            held.append(socket.create_connection(("127.0.0.1", port)))
            slowest = max(slowest, time.monotonic() - started)
    finally:
        for s in held:
            s.close()
    return slowest


def signal_delays(pid: int, notify: NotifySocket, agent: int, hups: int = 20) -> list[float]:
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", agent), timeout=5) as c:
                    c.recv(100)
            except OSError:
                pass

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    for t in pollers:
        t.start()
    delays = []
    try:
        for signum, word in [(signal.SIGHUP, "RELOADING")] * hups + [(signal.SIGTERM, "STOPPING")]:
            mark = notify.count()
            sent = time.monotonic()
            os.kill(pid, signum)
            notify.wait(word, "1", after=mark, timeout=15)
            delays.append(notify.arrival(word, "1", after=mark) - sent)
            if signum == signal.SIGHUP:
                notify.wait("READY", "1", after=mark, timeout=15)
    finally:
        stop.set()
    return sorted(delays)


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    metrics, agent, port = free_port(), free_port(), free_port()
    (tmp / "ops.toml").write_text(
        f'[metrics]\nlisten = "127.0.0.1:{metrics}"\nagent_listen = "127.0.0.1:{agent}"\ndrain_notice = 0\n'
    )
    notify = NotifySocket(tmp / "n.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "n.sock"), "DCMRECVD_CONFIG_DIR": str(tmp / "etc")}
    argv = [sys.executable, "-m", "dcmrecvd", "--config", str(tmp / "ops.toml"), "-od", str(tmp), str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(metrics) and port_open(agent))
        cut = trickle(metrics, b"GET /metrics HTTP/1.0\r\nX-Padding: " + b"a" * 40)
        print(f"trickling client: answered or cut after {cut:.2f} s")
        print(f"60 back-to-back connects: slowest {slowest_connect(metrics) * 1000:.1f} ms")
        delays = signal_delays(proc.pid, notify, agent)
        middle = delays[len(delays) // 2]
        print(
            f"{len(delays)} signals under 4 agent pollers: median {middle * 1000:.1f} ms,"
            f" max {delays[-1] * 1000:.1f} ms"
        )
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
