"""dcmrecvd against DCMTK's dcmrecv, in the same run, over loopback.

For each data set and PDU size, alternating receivers, several repetitions:
DCMTK ``storescu`` (TCP_NODELAY=1) sends the whole set over one association;
we time the send, read the receiver's CPU time from /proc, verify every
received file (count, SOP Instance UIDs, sizes) and print instances/s, MB/s,
CPU seconds and the paired ratio dcmrecvd/dcmrecv (median over repetitions).
A last scenario runs four senders at once against each receiver.

    python bench/run.py [--reps 3] [--sets ct,small,large] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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
IGNORE = "/ignore"


def receiver_cmd(which: str, port: int, pdu: int, out: Path) -> list[str]:
    common = ["-xf", str(DCMTK_CFG), "Default", "-pdu", str(pdu), "-od", str(out), str(port)]
    if which.endswith(IGNORE):  # the protocol alone: received and acknowledged, not stored
        which = which.removesuffix(IGNORE)
        common.insert(0, "--ignore")
    if which == "dcmrecv":
        return ["dcmrecv", *common]
    daemon = str(Path(sys.executable).parent / "dcmrecvd")
    if which == "nofsync":  # like dcmrecv: acknowledged before it is on disk
        NO_FSYNC.write_text("[output]\nfsync = false\n")
        return [daemon, "--config", str(NO_FSYNC), *common]
    return [daemon, *common]


#: TCP_NODELAY=1 for DCMTK's tools (the bench's default); ``--nagle`` empties it: Debian's DCMTK
#: then leaves Nagle on, as people actually run it.
NODELAY_ENV = {"TCP_NODELAY": "1"}


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return {**env, **NODELAY_ENV}


def send(port: int, folder: Path, senders: int = 1) -> float:
    env = tool_env()
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
    got = [p for p in out.rglob("*") if p.is_file()]
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in got}
    if uids != sent or len(got) != len(sent):
        raise RuntimeError(f"verification failed: {len(got)} files for {len(sent)} sent")
    return len(got), sum(p.stat().st_size for p in got)


RECEIVED = OUT / "received"


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
    return Path(tempfile.mkdtemp(dir=RECEIVED, prefix="run-"))


def run_once(
    which: str, folder: Path, pdu: int, senders: int = 1, *, after_deletions: bool = False
) -> Result:
    out = fresh_output(after_deletions)
    # Start each run on a quiet disk: the previous run's writeback and deletions
    # (discard/TRIM) would otherwise land on whichever receiver fsyncs, i.e. ours.
    os.sync()
    port = free_port()
    env = tool_env()
    proc = subprocess.Popen(
        receiver_cmd(which, port, pdu, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, proc)
        before = cpu_seconds(proc.pid)
        seconds = send(port, folder, senders)
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sets", default="ct,small,large")
    parser.add_argument("--pdus", default="16384,131072")
    parser.add_argument("--quick", action="store_true", help="a tenth of each set, one repetition")
    parser.add_argument("--no-concurrent", action="store_true")
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="DCMTK's tools without TCP_NODELAY=1 (Nagle on, as Debian ships them), both sides",
    )
    parser.add_argument(
        "--also-no-fsync",
        action="store_true",
        help="also run dcmrecvd with output.fsync = false (like dcmrecv)",
    )
    parser.add_argument(
        "--also-ignore",
        action="store_true",
        help="also run both receivers with --ignore (the protocol alone, nothing stored)",
    )
    parser.add_argument(
        "--after-deletions",
        action="store_true",
        help="every run into the same just-emptied directory (see fresh_output)",
    )
    args = parser.parse_args()
    for tool in ("dcmrecv", "storescu"):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    reps = 1 if args.quick else args.reps
    if args.nagle:
        NODELAY_ENV.clear()
        print("Nagle on: storescu and dcmrecv without TCP_NODELAY=1")
    rows = []
    header = f"{'data set':<20}{'pdu':>7}  {'receiver':<16}{'inst/s':>9}{'MB/s':>9}{'cpu s':>8}{'ratio':>8}"
    print(header)
    for kind in args.sets.split(","):
        label, count = SETS[kind]
        if args.quick:
            count = max(2, count // 10)
            label = f"{label} /10"
        folder = ensure_data(kind, count)
        for pdu in map(int, args.pdus.split(",")):
            receivers: tuple[str, ...] = ("dcmrecv", "dcmrecvd")
            if args.also_no_fsync:
                receivers += ("nofsync",)
            if args.also_ignore:
                receivers += ("dcmrecv" + IGNORE, "dcmrecvd" + IGNORE)
            results: dict[str, list[Result]] = {r: [] for r in receivers}
            for rep in range(reps):
                order = receivers if rep % 2 == 0 else tuple(reversed(receivers))
                for which in order:
                    results[which].append(run_once(which, folder, pdu, after_deletions=args.after_deletions))
            for which in receivers:
                rs = results[which]
                secs = statistics.median(r.seconds for r in rs)
                cpu = statistics.median(r.cpu for r in rs)
                size = rs[0].bytes
                baseline = "dcmrecv" + IGNORE if which.endswith(IGNORE) else "dcmrecv"
                paired = [b.seconds / a.seconds for a, b in zip(rs, results[baseline], strict=True)]
                ratio = f"{statistics.median(paired):.2f}x" if which != baseline else ""
                line = (
                    f"{label:<20}{pdu:>7}  {which:<16}{count / secs:>9.0f}{size / secs / 1e6:>9.0f}"
                    f"{cpu:>8.2f}{ratio:>8}"
                )
                print(line, flush=True)
                rows.append(line)
    if not args.no_concurrent:
        folder = ensure_data("ct", 200 if args.quick else 2000)
        print("\nfour senders at once (0.5 MB CT set split in four, PDU 16384):")
        agg: dict[str, list[float]] = {"dcmrecv": [], "dcmrecvd": []}
        for rep in range(reps):
            for which in ("dcmrecv", "dcmrecvd") if rep % 2 == 0 else ("dcmrecvd", "dcmrecv"):
                try:
                    r = run_once(which, folder, 16384, senders=4, after_deletions=args.after_deletions)
                    agg[which].append(r.files / r.seconds)
                except RuntimeError as exc:  # dcmrecv serialises: late senders may time out
                    print(f"  {which}: {exc}")
        for which, values in agg.items():
            if values:
                print(f"  {which:<9}{statistics.median(values):>9.0f} inst/s aggregate")
        if agg["dcmrecv"] and agg["dcmrecvd"]:
            print(f"  ratio {statistics.median(agg['dcmrecvd']) / statistics.median(agg['dcmrecv']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
