"""The systemd protocols we speak: sd_notify and socket activation.

Stdlib only, and silent outside systemd: with no ``NOTIFY_SOCKET`` nothing is
sent; with no (or someone else's) ``LISTEN_FDS`` nothing is adopted.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def listen_fds(environ: Mapping[str, str], pid: int) -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd, by ``FileDescriptorName`` (``unknown`` if unnamed)."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    found: dict[str, list[socket.socket]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        found.setdefault(name, []).append(socket.socket(fileno=fd))
    return found


def clear_listen_env(environ: dict[str, str]) -> None:
    """Children must not think the sockets are theirs."""
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)


class Notifier:
    """Sends sd_notify datagrams; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError:
                self._sock = None
        self.watchdog_usec = 0
        if environ.get("WATCHDOG_USEC") and environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            try:
                self.watchdog_usec = int(environ["WATCHDOG_USEC"])
            except ValueError:
                self.watchdog_usec = 0

    def notify(self, *states: str) -> None:
        """Send ``KEY=value`` lines in one datagram; never raises."""
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(states).encode(), self._address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        """READY=1 with a status line."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic timestamp systemd wants."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        """STOPPING=1."""
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """STATUS=..."""
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        """WATCHDOG=1."""
        self.notify("WATCHDOG=1")
