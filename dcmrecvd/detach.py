"""Classic daemon mode (``--daemon --pidfile``) for hosts without systemd.

python-daemon does the double fork, session, umask and file descriptor
hygiene; the listening sockets are kept open across it, and the signal
handling stays ours (installed after detaching).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import daemon
from daemon.pidfile import TimeoutPIDLockFile

from dcmrecvd.errors import UsageError

UMASK = 0o027


def detach(pidfile: str, keep: list[socket.socket]) -> None:
    """Detach from the terminal; write and lock ``pidfile`` (removed at exit).

    The working directory stays where it was, because relative paths from the
    command line (``-od``, ``-xf``) are re-read on reload.
    """
    lock = None
    if pidfile:
        path = Path(pidfile).absolute()
        lock = TimeoutPIDLockFile(str(path), acquire_timeout=0)
        if lock.is_locked():
            raise UsageError(f"pidfile {path} is locked by PID {lock.read_pid()}")
    context = daemon.DaemonContext(
        working_directory=os.getcwd(),
        umask=UMASK,
        pidfile=lock,
        files_preserve=[s.fileno() for s in keep],
        signal_map={},
        detach_process=True,
    )
    context.open()
