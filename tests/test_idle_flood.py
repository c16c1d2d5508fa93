"""Connections that never negotiate are cheap and bounded: a few KiB each, at most
``network.max_pending_connections`` of them, the rest closed at once, and the association
already being served never notices."""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

from conftest import DaemonFactory, need, run, wait_for
from datasets import make_dataset
from peers import associate
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"
FLOOD = 10_000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def closed_at_once(sock: socket.socket, timeout: float = 2.0) -> bool:
    """The daemon closed this connection without waiting for anything from us."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "flood.toml"
    path.write_text(text)
    return str(path)


def test_the_pending_limit_closes_new_connections_at_once_and_frees_on_every_path(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    toml = '[network]\nmax_pending_connections = 8\nae_title = "DCMRECVD"\n'
    d = daemons.start("--config", config(tmp_path, toml))
    echoscu = need("echoscu")
    for _ in range(20):  # the place is given back after an accepted association,
        assert run([echoscu, "-aec", "DCMRECVD", "127.0.0.1", str(d.port)]).returncode == 0
    for _ in range(20):  # ... after a rejected one (called AE title not recognised),
        assert run([echoscu, "-aec", "OTHER", "127.0.0.1", str(d.port)]).returncode != 0
    for _ in range(20):  # ... and after an aborted one (not an A-ASSOCIATE-RQ at all)
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(bytes((0x09, 0, 0, 0, 0, 0)))
            s.settimeout(10)
            assert s.recv(10)[:1] == bytes((0x07,))  # A-ABORT, then the connection is closed
            assert closed_at_once(s, timeout=10)
    idle = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(8)]
    try:
        extra = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        assert closed_at_once(extra), "the 9th connection not yet negotiated was kept"
        extra.close()
        assert not closed_at_once(idle[0], timeout=0.5), "an admitted idle connection was dropped"
        wait_for(lambda: "conn.refused" in d.log())
        assert "more than 8 connections not yet negotiated" in d.log()
    finally:
        for s in idle:
            s.close()
    # The idle ones went away (EOF): their places are free again, at once.
    wait_for(lambda: run([echoscu, "-aec", "DCMRECVD", "127.0.0.1", str(d.port)]).returncode == 0, timeout=10)


def test_ten_thousand_idle_connections_cost_little_and_stall_no_association(daemons: DaemonFactory) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(hard, want)))
    try:
        _flood(daemons)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _flood(daemons: DaemonFactory) -> None:
    d = daemons.start("-ta", "30")
    ds = make_dataset(rows=64, columns=64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    served = associate(d.port, [(CT, [ExplicitVRLittleEndian])])
    assert served.is_established
    try:
        for i in range(20):  # warm up: buffers, threads, the write path
            ds.SOPInstanceUID = f"1.2.3.1.{i}"
            assert served.send_c_store(ds).Status == 0
        before = rss_mib(d.pid)
        flood: list[socket.socket] = []
        peak = before
        try:
            for i in range(FLOOD):
                flood.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
                if i % 1000 == 999:  # the association in progress is served all along
                    ds.SOPInstanceUID = f"1.2.3.2.{i}"
                    started = time.monotonic()
                    assert served.send_c_store(ds).Status == 0
                    assert time.monotonic() - started < 1.0
                    peak = max(peak, rss_mib(d.pid))
            peak = max(peak, rss_mib(d.pid))
            held = sum(not closed_at_once(s, timeout=0.01) for s in flood[:300])
            assert held <= 256, f"{held} idle connections kept, more than network.max_pending_connections"
        finally:
            for s in flood:
                s.close()
        growth = peak - before
        print(f"RSS {before:.1f} MiB before, {peak:.1f} MiB with {FLOOD} idle connections (+{growth:.1f})")
        assert growth < 48, f"{FLOOD} idle connections grew RSS by {growth:.1f} MiB"
    finally:
        served.release()
    wait_for(lambda: run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0, timeout=15)
    wait_for(lambda: len([p for p in d.output.iterdir() if not p.name.startswith(".")]) == 30)
    assert "conn.refused" in d.log()
    assert d.proc.poll() is None
