"""dcmrecvd against DCMTK's dcmrecv, in the same run, over loopback.

For each data set and PDU size, alternating receivers, several repetitions:
DCMTK ``storescu`` (TCP_NODELAY=1) sends the whole set over one association;
we time the send, read the receiver's CPU time from /proc, verify every
received file (count, SOP Instance UIDs, sizes) and print instances/s, MB/s,
CPU seconds and the paired ratio dcmrecvd/dcmrecv (median over repetitions).
Then, each paired in the same way: 1, 2, 4 and 8 senders at once; senders with
Nagle on (as Debian ships DCMTK, against a dcmrecv with Nagle on and one
without); one pipelining sender at windows 1, 4 and 16 (``pipelined.py``).
Last, one summary table of every scenario with the spread of the paired
ratios and the receiver CPU per object.

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
from collections.abc import Callable
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


def tool_env(nodelay: bool | None = None) -> dict[str, str]:
    """The environment of a DCMTK tool: TCP_NODELAY=1 unless ``nodelay`` is False (or the
    bench runs with ``--nagle``)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
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


@dataclass
class Row:
    """One line of the summary: a scenario, both receivers, paired."""

    scenario: str
    rates: tuple[float, float]  # instances/s, dcmrecv and dcmrecvd (medians)
    ratio: float  # median of the paired ratios dcmrecvd/dcmrecv
    spread: tuple[float, float]  # the lowest and highest paired ratio seen
    cpu_ms: tuple[float, float]  # receiver CPU ms per object (medians)


def paired_row(scenario: str, count: int, base: list[Result], ours: list[Result]) -> Row:
    paired = [b.seconds / a.seconds for a, b in zip(ours, base, strict=True)]
    return Row(
        scenario,
        (
            count / statistics.median(r.seconds for r in base),
            count / statistics.median(r.seconds for r in ours),
        ),
        statistics.median(paired),
        (min(paired), max(paired)),
        (
            1000 * statistics.median(r.cpu for r in base) / count,
            1000 * statistics.median(r.cpu for r in ours) / count,
        ),
    )


def brief(row: Row) -> str:
    return f"dcmrecv {row.rates[0]:.0f}/s, dcmrecvd {row.rates[1]:.0f}/s, {row.ratio:.2f}x"


def paired_runs(reps: int, run: Callable[[str], Result]) -> tuple[list[Result], list[Result]]:
    """``run`` each receiver ``reps`` times, alternating which goes first."""
    out: dict[str, list[Result]] = {"dcmrecv": [], "dcmrecvd": []}
    for rep in range(reps):
        for which in ("dcmrecv", "dcmrecvd") if rep % 2 == 0 else ("dcmrecvd", "dcmrecv"):
            out[which].append(run(which))
    return out["dcmrecv"], out["dcmrecvd"]


def many_senders(reps: int, quick: bool) -> list[Row]:
    """1, 2, 4 and 8 storescu at once, the CT set split between them (dcmrecv serves them one
    after another, dcmrecvd at once)."""
    count = 200 if quick else 2000
    folder = ensure_data("ct", count)
    rows = []
    print("\nseveral senders at once (0.5 MB CT set split between them, PDU 16384):")
    for senders in (1, 2, 4, 8):
        base, ours = paired_runs(reps, lambda w, n=senders: run_once(w, folder, 16384, senders=n))
        row = paired_row(f"{senders} sender{'s' if senders > 1 else ''}, CT", count, base, ours)
        print(f"  {senders} senders: {brief(row)}")
        rows.append(row)
    return rows


def nagle_runs(reps: int, quick: bool) -> list[Row]:
    """Senders as people run them: storescu without TCP_NODELAY=1 (Nagle on), against a
    dcmrecv with Nagle on too (as shipped) and against one with TCP_NODELAY=1 (Nagle on the
    sender only).  dcmrecvd always sets TCP_NODELAY and re-arms TCP_QUICKACK."""
    rows = []
    count = 30 if quick else 300
    nagle, nodelay = tool_env(False), tool_env(True)
    print(f"\nNagle on in the sender ({count} objects, PDU 16384):")
    for kind in ("ct", "small"):
        folder = ensure_data(kind, count)
        label = f"{count} x {'0.5 MB CT' if kind == 'ct' else '~3 KB'}"
        for mode, receiver_env in (("as shipped (Nagle on both)", nagle), ("Nagle sender only", nodelay)):
            base, ours = paired_runs(
                reps,
                lambda w, f=folder, e=receiver_env: run_once(w, f, 16384, sender_env=nagle, receiver_env=e),
            )
            row = paired_row(f"{label}, {mode}", count, base, ours)
            print(f"  {row.scenario}: {brief(row)}")
            rows.append(row)
        # The bar of #16: a Nagle sender gets >= 0.9x of what a TCP_NODELAY sender gets.
        fast = [run_once("dcmrecvd", folder, 16384, sender_env=nodelay) for _ in range(reps)]
        slow = [run_once("dcmrecvd", folder, 16384, sender_env=nagle) for _ in range(reps)]
        share = statistics.median(f.seconds for f in fast) / statistics.median(s.seconds for s in slow)
        print(f"  {label}: dcmrecvd with a Nagle sender reaches {share:.2f}x of a TCP_NODELAY sender")
    return rows


def pipelined_runs(reps: int, quick: bool) -> list[Row]:
    """One raw sender keeping W C-STOREs outstanding (see pipelined.py), W = 1, 4, 16."""
    import pipelined

    count = 200 if quick else 2000
    folder = ensure_data("small", count)
    objects = [pipelined.dataset_of(f) for f in sorted(folder.iterdir())]
    rows = []
    print(f"\npipelined C-STOREs ({count} x ~3 KB, one association, PDU 16384):")
    for window in (1, 4, 16):

        def once(which: str, w: int = window) -> Result:
            seconds, cpu = pipelined.run_once(which, folder, objects, w)
            return Result(seconds, cpu, count, 0)

        base, ours = paired_runs(reps, once)
        row = paired_row(f"pipelined, window {window}, ~3 KB", count, base, ours)
        print(f"  window {window}: {brief(row)}")
        rows.append(row)
    return rows


def print_summary(rows: list[Row]) -> None:
    """One table of every scenario: medians, the paired ratio and its spread, CPU per object."""
    print("\nsummary (medians; ratio = dcmrecvd/dcmrecv throughput, paired per repetition, lowest-highest):")
    print(f"{'scenario':<46}{'dcmrecv/s':>10}{'dcmrecvd/s':>11}{'ratio':>8}{'spread':>15}{'cpu ms/obj':>16}")
    for r in rows:
        spread = f"{r.spread[0]:.2f}-{r.spread[1]:.2f}"
        cpu = f"{r.cpu_ms[0]:.2f} / {r.cpu_ms[1]:.2f}"
        print(f"{r.scenario:<46}{r.rates[0]:>10.0f}{r.rates[1]:>11.0f}{r.ratio:>7.2f}x{spread:>15}{cpu:>16}")
    print("(cpu ms/obj: receiver user+sys CPU per object, dcmrecv / dcmrecvd)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sets", default="ct,small,large")
    parser.add_argument("--pdus", default="16384,131072")
    parser.add_argument("--quick", action="store_true", help="a tenth of each set, one repetition")
    parser.add_argument("--no-concurrent", action="store_true", help="skip the 1/2/4/8-sender runs")
    parser.add_argument(
        "--no-extended", action="store_true", help="skip the Nagle and pipelined runs (only the main table)"
    )
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
    summary: list[Row] = []
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
            if "dcmrecvd" in results:
                summary.append(
                    paired_row(f"{label}, pdu {pdu}", count, results["dcmrecv"], results["dcmrecvd"])
                )
    if not args.no_concurrent:
        summary.extend(many_senders(reps, args.quick))
    if not args.no_extended:
        summary.extend(nagle_runs(reps, args.quick))
        summary.extend(pipelined_runs(reps, args.quick))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
