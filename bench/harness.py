"""The bench's common harness: data sets, receivers (dcmrecvd or DCMTK's dcmrecv) on a
free port, senders (DCMTK storescu), CPU time from /proc, and verification of what
arrived.  Used by run.py, ab.py, pipelined.py, saturation.py and floor.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from datasets import generate  # noqa: E402

OUT = HERE / "out"
DCMTK_CFG = Path("/etc/dcmtk/storescp.cfg")  # both receivers read the same profile file
SETS = {"ct": ("2000 x 0.5 MB CT", 2000), "small": ("2000 x ~3 KB", 2000), "large": ("10 x 100 MB", 10)}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    seconds: float
    cpu: float
    files: int
    bytes: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User+sys CPU of the process tree: its own, its reaped children's and its live ones'
    (``storescp --fork`` serves each association in a child)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # gone meanwhile: a child reaped since counts in its parent's fields
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    return own + sum(cpu_seconds(int(child)) for child in children)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("receiver did not start listening")


NO_FSYNC = OUT / "no-fsync.toml"
#: dcmrecvd's ack journal lives here across runs, as it does on a server (its segments are
#: made once, not in every run's fresh output directory).
JOURNALED = OUT / "journal.toml"
IGNORE = "/ignore"
#: DCMTK's storescp with a process per association: what a multi-sender DCMTK site runs.
FORK = "storescp-fork"


def receiver_cmd(which: str, port: int, pdu: int, out: Path) -> list[str]:
    common = ["-xf", str(DCMTK_CFG), "Default", "-pdu", str(pdu), "-od", str(out), str(port)]
    if which.endswith(IGNORE):  # the protocol alone: received and acknowledged, not stored
        which = which.removesuffix(IGNORE)
        common.insert(0, "--ignore")
    if which == "dcmrecv":
        return ["dcmrecv", *common]
    if which == FORK:  # DCMTK's process-per-association server, no fsync either
        return ["storescp", "--fork", *common]
    daemon = str(Path(sys.executable).parent / "dcmrecvd")
    if which == "nofsync":  # like dcmrecv: acknowledged before it is on disk
        NO_FSYNC.write_text("[output]\nfsync = false\n")
        return [daemon, "--config", str(NO_FSYNC), *common]
    JOURNALED.write_text(f'[journal]\ndirectory = "{OUT / "journal"}"\n')
    return [daemon, "--config", str(JOURNALED), *common]


#: TCP_NODELAY=1 for DCMTK's tools (the bench's default); ``--nagle`` empties it: Debian's DCMTK
#: then leaves Nagle on, as people actually run it.
NODELAY_ENV = {"TCP_NODELAY": "1"}


def tool_env(nodelay: bool | None = None) -> dict[str, str]:
    """The environment of a DCMTK tool: TCP_NODELAY=1 unless ``nodelay`` is False (or the
    bench runs with ``--nagle``)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    env["XDG_STATE_HOME"] = str(STATE)  # dcmrecvd's state (journal, index) beside the runs
    if nodelay is None:
        return {**env, **NODELAY_ENV}
    return {**env, "TCP_NODELAY": "1"} if nodelay else env


def send(port: int, folder: Path, senders: int = 1, env: dict[str, str] | None = None) -> float:
    env = env or tool_env()
    files = sorted(folder.iterdir())
    groups = [files[i::senders] for i in range(senders)]
    start = time.monotonic()
    procs = [
        subprocess.Popen(["storescu", "127.0.0.1", str(port), *map(str, g)], env=env, stderr=subprocess.PIPE)
        for g in groups
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.monotonic() - start


def verify(folder: Path, out: Path) -> tuple[int, int]:
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir()}
    got = [p for p in out.rglob("*") if p.is_file() and ".dcmrecvd" not in p.relative_to(out).parts]
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in got}
    if uids != sent or len(got) != len(sent):
        raise RuntimeError(f"verification failed: {len(got)} files for {len(sent)} sent")
    return len(got), sum(p.stat().st_size for p in got)


#: Where runs write: bench/out, or a filesystem of its own (``run.py --filesystems`` mounts one
#: per kind and runs the bench again with this set to it).
ROOT = Path(os.environ.get("DCMRECVD_BENCH_ROOT") or OUT)
RECEIVED = ROOT / "received"
#: dcmrecvd's state directories (one per output directory), on the same disk as the objects.
STATE = ROOT / "state"


def fresh_output(after_deletions: bool) -> Path:
    """An empty directory for one run's received files.

    By default a new directory per run, spread to another ext4 block group
    (chattr +T, as for top-level directories): on ext4 without a journal every
    new inode is checked against the inodes deleted in the last minute of its
    group, so a run right after the previous run's files were deleted pays
    ~0.3-1 ms per file for them, whichever receiver it is.  With
    ``after_deletions`` every run writes into the same, just emptied directory:
    what a receiver meets when a downstream consumer deletes what it picked up.
    """
    if after_deletions:
        out = RECEIVED / "same"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out
    RECEIVED.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+T", str(RECEIVED)], stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(STATE, ignore_errors=True)  # the last run's receiver has exited: its state goes
    return Path(tempfile.mkdtemp(dir=RECEIVED, prefix="run-"))


def start_receiver(
    which: str, out: Path, pdu: int = 16384, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """A receiver listening on a free port, writing into ``out``; (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        receiver_cmd(which, port, pdu, out),
        env=env or tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port, proc)
    return proc, port


def run_once(
    which: str,
    folder: Path,
    pdu: int,
    senders: int = 1,
    *,
    after_deletions: bool = False,
    sender_env: dict[str, str] | None = None,
    receiver_env: dict[str, str] | None = None,
) -> Result:
    out = fresh_output(after_deletions)
    # Start each run on a quiet disk: the previous run's writeback and deletions
    # (discard/TRIM) would otherwise land on whichever receiver fsyncs, i.e. ours.
    os.sync()
    port = free_port()
    env = receiver_env or tool_env()
    proc = subprocess.Popen(
        receiver_cmd(which, port, pdu, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, proc)
        before = cpu_seconds(proc.pid)
        seconds = send(port, folder, senders, sender_env)
        cpu = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
    if which.endswith(IGNORE):
        files, size = len(list(folder.iterdir())), sum(p.stat().st_size for p in folder.iterdir())
    else:
        files, size = verify(folder, out)
    if not after_deletions:
        shutil.rmtree(out, ignore_errors=True)
    return Result(seconds, cpu, files, size)


def ensure_data(kind: str, count: int) -> Path:
    folder = OUT / "data" / f"{kind}-{count}"
    if not folder.is_dir() or len(list(folder.iterdir())) != count:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {count} {kind} objects in {folder} ...", flush=True)
        generate(kind, count, folder)
    return folder
