"""Inside a private journal: run dcmrecvd as systemd would (stderr on the journal's
stream socket, JOURNAL_STREAM set), store one object, stop.  Used by test_journal.py.

    python journal_scenario.py OUTPUT_DIR CONFIG_DIR FILE CALLING_AET
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def journal_stream(identifier: str) -> socket.socket:
    """A stream connection to journald, as systemd hands to a service's stderr."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("/run/systemd/journal/stdout")
    sock.shutdown(socket.SHUT_RD)
    sock.sendall(f"{identifier}\n\n6\n0\n0\n0\n0\n".encode())
    return sock


def main() -> int:
    out, config_dir, path, calling = sys.argv[1:5]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = journal_stream("dcmrecvd")
    st = os.fstat(stream.fileno())
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "DCMRECVD_CONFIG_DIR": config_dir}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmrecvd", "-v", "-od", out, "-xf", "etc/storescp.cfg", "Default", str(port)],
        stdout=stream.fileno(),
        stderr=stream.fileno(),
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    return 3
                time.sleep(0.02)
        sender = subprocess.run(
            ["storescu", "-aet", calling, "127.0.0.1", str(port), path],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
        )
        if sender.returncode != 0:
            print(sender.stderr, file=sys.stderr)
            return 4
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return 0 if proc.returncode == 0 else 5


if __name__ == "__main__":
    raise SystemExit(main())
