"""Senders that leave Nagle on (Debian's DCMTK without TCP_NODELAY=1) are served as fast as
those that turn it off: we re-arm TCP_QUICKACK after every read, so their last small segment of
each message is not held back waiting for our delayed ACK."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import DaemonFactory, need
from datasets import generate
from test_receive import stored

OBJECTS = 150
KIND = "small"


def timed_storescu(port: int, files: list[Path], nodelay: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    start = time.monotonic()
    result = subprocess.run(
        [need("storescu"), "127.0.0.1", str(port), *map(str, files)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return time.monotonic() - start


def test_a_nagle_on_sender_is_not_slowed_by_delayed_acks(daemons: DaemonFactory, tmp_path: Path) -> None:
    files = generate(KIND, OBJECTS, tmp_path / KIND)
    d = daemons.start(verbose=False)
    timed_storescu(d.port, files[:10], nodelay=True)  # warm up
    with_nodelay = min(timed_storescu(d.port, files, nodelay=True) for _ in range(2))
    nagle_on = min(timed_storescu(d.port, files, nodelay=False) for _ in range(2))
    print(f"{OBJECTS} {KIND} objects: {with_nodelay:.2f} s with TCP_NODELAY, {nagle_on:.2f} s with Nagle on")
    # Without the re-armed quick ACK the Nagle-on sender took 50 times as long (6.6 s against 0.12 s).
    assert nagle_on < 1.6 * with_nodelay + 0.3
    assert len(stored(d.output)) == OBJECTS


def _no_fsync(tmp_path: Path) -> Path:
    """The disk out of the comparison: what is measured is the network round trip."""
    path = tmp_path / "nofsync.toml"
    path.write_text("[output]\nfsync = false\n")
    return path
