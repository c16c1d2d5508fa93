"""A test-owned NOTIFY_SOCKET: collects sd_notify datagrams with the sender's PID."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from conftest import wait_for


class NotifySocket:
    """Binds an AF_UNIX datagram socket with SO_PASSCRED and records what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.messages: list[tuple[int, dict[str, str]]] = []
        #: When each message arrived (monotonic), in step with ``messages``.
        self.arrived: list[float] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, size)
            except OSError:
                return
            pid = -1
            for level, kind, cmsg in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cmsg[: struct.calcsize("iII")])[0]
            text = data.decode("utf-8", "replace")  # a stray datagram must not end the recording
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._lock:
                self.messages.append((pid, fields))
                self.arrived.append(time.monotonic())

    def seen(self, key: str, value: str | None = None, pid: int | None = None, after: int = 0) -> bool:
        with self._lock:
            return any(
                key in f and (value is None or f[key] == value) and (pid is None or p == pid)
                for p, f in self.messages[after:]
            )

    def wait(
        self, key: str, value: str | None = None, pid: int | None = None, after: int = 0, timeout: float = 15
    ) -> None:
        wait_for(lambda: self.seen(key, value, pid, after), timeout=timeout)

    def arrival(self, key: str, value: str, after: int = 0) -> float:
        """When the first message from index ``after`` on with ``key=value`` arrived."""
        with self._lock:
            for fields, at in zip(self.messages[after:], self.arrived[after:], strict=True):
                if fields[1].get(key) == value:
                    return at
        raise LookupError(f"no {key}={value}")

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def values(self, key: str) -> list[str]:
        with self._lock:
            return [f[key] for _, f in self.messages if key in f]

    def close(self) -> None:
        self.sock.close()
