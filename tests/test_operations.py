"""Operations, with real parts: a Prometheus scrape checked by promtool, health probes, HAProxy's
agent check, and a free-space watermark crossed for real on a small tmpfs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, DaemonFactory, free_port, need, port_open, run, wait_for
from datasets import make_dataset, write
from peers import RawClient, associate
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian

from dcmrecvd.wire import pdu

CT = "1.2.840.10008.5.1.4.1.1.2"


def ops_daemon(daemons: DaemonFactory, tmp_path: Path, extra: str = "", *args: str, **kw: object) -> Daemon:
    metrics, agent = free_port(), free_port()
    toml = tmp_path / f"ops{len(daemons.started)}.toml"
    toml.write_text(f'[metrics]\nlisten = "127.0.0.1:{metrics}"\nagent_listen = "127.0.0.1:{agent}"\n{extra}')
    d = daemons.start("--config", str(toml), *args, **kw)  # type: ignore[arg-type]
    d.metrics_port, d.agent_port = metrics, agent  # type: ignore[attr-defined]
    if kw.get("wait", True):  # bound just after the DICOM port the factory waits for
        wait_for(lambda: port_open(metrics) and port_open(agent))
    return d


def http(d: Daemon, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{d.metrics_port}{path}", method=method)  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def agent(d: Daemon) -> str:
    with socket.create_connection(("127.0.0.1", d.agent_port), timeout=10) as s:  # type: ignore[attr-defined]
        got = b""
        while chunk := s.recv(100):
            got += chunk
    return got.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def ct_files(tmp_path: Path, n: int) -> list[Path]:
    folder = tmp_path / "send"
    folder.mkdir(exist_ok=True)
    return [write(make_dataset(rows=64, columns=64, seed=i), folder / f"ct{i}.dcm") for i in range(n)]


def test_a_scrape_counts_what_was_sent_and_promtool_accepts_it(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    d = ops_daemon(daemons, tmp_path, '[network]\nae_title = "DCMRECVD"\n')
    storescu, echoscu = need("storescu"), need("echoscu")
    assert (
        run(
            [storescu, "-aec", "DCMRECVD", "127.0.0.1", str(d.port), *map(str, ct_files(tmp_path, 3))]
        ).returncode
        == 0
    )
    assert run([echoscu, "-aec", "NOT-US", "127.0.0.1", str(d.port)]).returncode != 0
    client = RawClient(d.port)
    try:
        assert client.associate(CT, ExplicitVRLittleEndian, called="DCMRECVD") == pdu.A_ASSOCIATE_AC
        client.send_pdv(client.store_command(CT, "1.2.3.4"), command=True, last=True)
        client.send_pdv(b"garbage!", command=False, last=True)
        assert client.response_status() == 0xC000
    finally:
        client.close()
    status, text = http(d, "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("dcmrecvd_objects_total", (("called_ae", "DCMRECVD"), ("status", "0x0000")))] == 3
    assert got[("dcmrecvd_objects_total", (("called_ae", "DCMRECVD"), ("status", "0xC000")))] == 1
    assert got[("dcmrecvd_associations_rejected_total", (("reason", "called AE title not recognised"),))] == 1
    assert got[("dcmrecvd_associations_accepted_total", ())] == 2
    assert got[("dcmrecvd_store_duration_seconds_count", ())] == 4
    assert got[("dcmrecvd_commit_duration_seconds_count", ())] == 3
    assert got[("dcmrecvd_received_bytes_total", ())] > 3 * 8192
    assert got[("dcmrecvd_output_free_bytes", (("directory", str(d.output.resolve())),))] > 0
    assert got[("dcmrecvd_reloads_total", (("result", "ok"),))] == 0
    assert "1.2.3.4" not in text, "no SOP instance UIDs in label values"
    check = subprocess.run([need("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: samples(http(d, "/metrics")[1])[("dcmrecvd_reloads_total", (("result", "ok"),))] == 1)


def test_health_probes_and_bad_requests(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = ops_daemon(daemons, tmp_path)
    assert http(d, "/livez") == (200, "ok\n")
    assert http(d, "/readyz") == (200, "ready\n")
    assert http(d, "/nope")[0] == 404
    assert http(d, "/metrics", method="POST")[0] == 405
    with socket.create_connection(("127.0.0.1", d.metrics_port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 400")
    silent = [socket.create_connection(("127.0.0.1", d.metrics_port)) for _ in range(20)]  # type: ignore[attr-defined]
    try:
        started = time.monotonic()
        assert http(d, "/metrics")[0] == 200, "silent clients block nobody"
        assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
        assert time.monotonic() - started < 3
    finally:
        for s in silent:
            s.close()
    assert agent(d) == "up ready\n"


def test_agent_weight_and_drain_on_sigterm(daemons: DaemonFactory, tmp_path: Path) -> None:
    extra = "agent_weight = true\ndrain_notice = 5\n"
    d = ops_daemon(daemons, tmp_path, extra, "--max-associations", "4", "--drain-timeout", "20")
    assert agent(d) == "up ready 100%\n"
    held = associate(d.port, [(CT, [ExplicitVRLittleEndian])])
    assert held.is_established
    try:
        wait_for(lambda: agent(d) == "up ready 75%\n")
        d.proc.send_signal(signal.SIGTERM)
        noticed = time.monotonic()
        wait_for(lambda: agent(d) == "drain\n")
        status, why = http(d, "/readyz")
        assert status == 503 and "draining" in why
        # The drain notice: the agent says drain while the port still takes associations ...
        assert run([need("echoscu"), "127.0.0.1", str(d.port)]).returncode == 0
        assert time.monotonic() - noticed < 5
        # ... then the port closes, and the association in flight still drains.
        wait_for(lambda: not port_open(d.port), timeout=15)
        assert agent(d) == "drain\n"
        ds = make_dataset(rows=16, columns=16)
        ds.file_meta = __import__("pydicom").dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert held.send_c_store(ds).Status == 0
    finally:
        held.release()
    assert d.proc.wait(30) == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of our own (tests run as root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        [need("mount"), "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True
    )
    assert result.returncode == 0, result.stderr
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free_mib(d: Daemon) -> float:
    got = samples(http(d, "/metrics")[1])
    return next(v for (name, _), v in got.items() if name == "dcmrecvd_output_free_bytes") / 2**20


def fill(path: Path, mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def test_the_watermark_refuses_work_before_the_disk_is_full(
    daemons: DaemonFactory, tmp_path: Path, small_disk: Path
) -> None:
    out = small_disk / "out"
    out.mkdir()
    d = ops_daemon(daemons, tmp_path, '[output]\nmin_free = "16MiB"\n', output=out)
    echoscu = need("echoscu")
    assert agent(d) == "up ready\n"
    # Above the line: an object that would cross it answers 0xA700 and leaves nothing.
    fill(small_disk / "filler", 12)  # 20 MiB free, 4 MiB above the line
    wait_for(lambda: free_mib(d) < 21)  # free space is re-read at most once a second
    served = associate(d.port, [(CT, [ExplicitVRLittleEndian])])
    assert served.is_established
    try:
        big = make_dataset(rows=1024, columns=1024, frames=3)  # 6 MiB
        big.file_meta = __import__("pydicom").dataset.FileMetaDataset()
        big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert served.send_c_store(big).Status == 0xA700
        small = make_dataset(rows=16, columns=16)
        small.file_meta = big.file_meta
        assert served.send_c_store(small).Status == 0x0000
    finally:
        served.release()
    assert [p.name for p in out.iterdir() if p.name != ".dcmrecvd"] == [f"CT.{small.SOPInstanceUID}"]
    # Below the line: rejected transient, drain, 503, said once in the log.
    fill(small_disk / "filler2", 6)
    wait_for(lambda: agent(d) == "drain\n", timeout=10)
    assert http(d, "/readyz") == (503, "output directory below output.min_free\n")
    result = run([echoscu, "127.0.0.1", str(d.port)])
    assert result.returncode != 0
    wait_for(lambda: "output directory below output.min_free" in d.log())
    assert samples(http(d, "/metrics")[1])[("dcmrecvd_disk_low", ())] == 1
    assert d.log().count("disk.low") == 1
    # Back above the line and its margin: serving again.
    (small_disk / "filler").unlink()
    wait_for(lambda: agent(d) == "up ready\n", timeout=10)
    assert run([echoscu, "127.0.0.1", str(d.port)]).returncode == 0
    assert "disk.ok" in d.log()


def test_bad_operations_settings_are_config_errors(tmp_path: Path, config_dir: Path) -> None:
    from conftest import dcmrecvd

    for text, words in (
        ('[output]\nmin_free = "lots"\n', "output.min_free: 'lots' is not a size"),
        ('[metrics]\nlisten = "9104"\n', "metrics.listen: '9104' is not host:port"),
        ('[output]\nmin_free = "120%"\n', "a percentage must be below 100"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        result = dcmrecvd(
            "--check-config", "--config", str(bad), "-od", str(tmp_path), "104", config_dir=config_dir
        )
        assert result.returncode == 1, result.stderr
        assert words in result.stderr and "bad.toml" in result.stderr


def test_a_busy_metrics_port_exits_64(daemons: DaemonFactory, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        toml = tmp_path / "busy.toml"
        toml.write_text(f'[metrics]\nlisten = "127.0.0.1:{holder.getsockname()[1]}"\n')
        d = daemons.start("--config", str(toml), wait=False)
        assert d.proc.wait(30) == 64
        assert "cannot listen for metrics" in d.log()


def test_a_trickling_http_client_is_cut_off_by_one_deadline(daemons: DaemonFactory, tmp_path: Path) -> None:
    """#28.2: a byte every 0.5 s used to keep the connection (and its thread) for ever,
    since the 5 s was a timeout per read.  The whole request now has 5 s."""
    d = ops_daemon(daemons, tmp_path)
    request = b"GET /metrics HTTP/1.0\r\nX-Padding: " + b"a" * 100
    with socket.create_connection(("127.0.0.1", d.metrics_port), timeout=10) as s:  # type: ignore[attr-defined]
        started = time.monotonic()
        closed_after = None
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # reset by the server: cut off
                closed_after = time.monotonic() - started
                break
            readable, _, _ = __import__("select").select([s], [], [], 0.5)
            if readable:  # the server answered or closed: either way it let go
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "still connected after the whole request was trickled"
    assert closed_after < 5.0 + 1.5, closed_after
    assert http(d, "/livez")[0] == 200


def _accept_queue(port: int) -> int:
    """Connections the kernel holds for the listener on ``port`` until it accepts them."""
    for line in run([need("ss"), "-ltnH"]).stdout.splitlines():
        fields = line.split()
        if fields[3].endswith(f":{port}"):
            return int(fields[1])
    raise LookupError(port)


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_http_and_agent_connections_is_bounded(daemons: DaemonFactory, tmp_path: Path) -> None:
    """#28.2: idle connections cost a thread and a descriptor each, without bound; and a
    listen backlog of 5 made every sixth of 60 back-to-back connects wait a second."""
    d = ops_daemon(daemons, tmp_path)
    ports = (d.metrics_port, d.agent_port)  # type: ignore[attr-defined]
    listing = run([need("ss"), "-ltnH"]).stdout
    for port in ports:
        backlogs = [line.split()[2] for line in listing.splitlines() if line.split()[3].endswith(f":{port}")]
        assert backlogs and int(backlogs[0]) >= 128, (port, backlogs)
    tasks, fds = _tasks(d.pid), _fds(d.pid)
    held: list[socket.socket] = []
    try:
        slowest = 0.0
        for i in range(200):  # silent clients: never send a byte
            started = time.monotonic()
            held.append(socket.create_connection(("127.0.0.1", d.metrics_port), timeout=10))  # type: ignore[attr-defined]
            if i < 60:  # the burst: fits the backlog even if the server is slow to accept
                slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, f"one of 60 back-to-back connects took {slowest:.2f} s"
        wait_for(lambda: _accept_queue(d.metrics_port) == 0)  # type: ignore[attr-defined]
        assert _tasks(d.pid) <= tasks + 32 + 4, _tasks(d.pid) - tasks
        assert _fds(d.pid) <= fds + 32 + 4, _fds(d.pid) - fds
        assert agent(d).startswith("up")  # the agent listener is its own pool
    finally:
        for s in held:
            s.close()

    # The held ones are let go at their deadline; then a probe is served again (until then a
    # probe may find every slot taken and be closed unanswered: that is the bound at work).
    def served() -> bool:
        try:
            return http(d, "/livez")[0] == 200
        except OSError:
            return False

    wait_for(served, timeout=15)
    wait_for(lambda: _tasks(d.pid) <= tasks + 2, timeout=15)


def test_signals_are_acted_on_at_once_while_probes_keep_threads_busy(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """#28.3: a signal the kernel gave to a busy thread waited for the main thread's 5 s
    tick (half the SIGTERMs took ~4.5 s with the agent polled).  Now < 0.2 s, each time."""
    import threading

    from conftest import isolated_env
    from notify import NotifySocket

    notify = NotifySocket(tmp_path / "n.sock")
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path), NO_COLOR="1")
    d = ops_daemon(daemons, tmp_path, "drain_notice = 0\n", env=env)
    notify.wait("READY", "1", pid=d.pid)
    stop = threading.Event()

    def poll(probe: Any) -> None:
        while not stop.is_set():
            try:
                probe()
            except OSError:
                pass

    pollers = [threading.Thread(target=poll, args=(lambda: agent(d),), daemon=True) for _ in range(4)]
    pollers += [threading.Thread(target=poll, args=(lambda: http(d, "/metrics"),), daemon=True)]
    for t in pollers:
        t.start()
    delays = []
    try:
        for _ in range(10):
            mark = notify.count()
            sent = time.monotonic()
            os.kill(d.pid, signal.SIGHUP)
            notify.wait("READY", "1", after=mark, timeout=15)
            delays.append(notify.arrival("RELOADING", "1", after=mark) - sent)
        mark = notify.count()
        sent = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        notify.wait("STOPPING", "1", after=mark, timeout=15)
        delays.append(notify.arrival("STOPPING", "1", after=mark) - sent)
        assert d.proc.wait(30) == 0
    finally:
        stop.set()
        for t in pollers:
            t.join(10)
        notify.close()
    assert max(delays) < 0.2, [round(x, 3) for x in delays]


def test_records_per_flush_counts_every_acknowledged_object_once(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Group commit made visible: four senders at once, every record in exactly one flush."""
    d = ops_daemon(daemons, tmp_path)
    files = ct_files(tmp_path, 24)
    senders = [
        subprocess.Popen([need("storescu"), "127.0.0.1", str(d.port), *map(str, files[k::4])])
        for k in range(4)
    ]
    try:
        assert [s.wait(60) for s in senders] == [0, 0, 0, 0]
    finally:
        for s in senders:
            if s.poll() is None:
                s.kill()
    got = samples(http(d, "/metrics")[1])
    flushed = got[("dcmrecvd_journal_records_per_flush_sum", ())]
    flushes = got[("dcmrecvd_journal_records_per_flush_count", ())]
    assert flushed == 24 and 1 <= flushes <= 24
