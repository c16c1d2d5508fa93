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
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from filesystems import mounted  # noqa: E402
from harness import (  # noqa: E402
    FORK,
    IGNORE,
    NODELAY_ENV,
    OUT,
    SETS,
    Result,
    ensure_data,
    run_once,
    tool_env,
)


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
        forked = [run_once(FORK, folder, 16384, senders=senders) for _ in range(reps)]
        fork_rate = count / statistics.median(r.seconds for r in forked)
        fork_cpu = 1000 * statistics.median(r.cpu for r in forked) / count
        print(
            f"  {senders} senders: {brief(row)}; storescp --fork {fork_rate:.0f}/s "
            f"(dcmrecvd {row.rates[1] / fork_rate:.2f}x of it); CPU ms/obj dcmrecv "
            f"{row.cpu_ms[0]:.2f}, storescp --fork {fork_cpu:.2f}, dcmrecvd {row.cpu_ms[1]:.2f}"
        )
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
        "--filesystems",
        default="vm,ext4-journal,xfs",
        help="where to run: vm (bench/out on this disk), ext4-journal, xfs (each a loop device "
        "made for the run; the CT and small sets at PDU 16384, and the several-sender runs)",
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
    for kind in [k for k in args.filesystems.split(",") if k != "vm"]:
        other_filesystem(kind, args)
    return 0


def other_filesystem(kind: str, args: argparse.Namespace) -> None:
    """The bench again (a smaller matrix) with every run on a ``kind`` filesystem of its own."""
    print(f"\n=== on {kind} (a loop device on this disk; bench/filesystems.py)", flush=True)
    argv = [sys.executable, __file__, "--filesystems", "vm", "--sets", "ct,small", "--pdus", "16384"]
    argv += ["--no-extended", "--reps", str(1 if args.quick else args.reps)]
    argv += ["--quick"] if args.quick else []
    argv += ["--nagle"] if args.nagle else []
    try:
        with mounted(kind, OUT / "fs") as point:
            env = {**os.environ, "DCMRECVD_BENCH_ROOT": str(point)}
            subprocess.run(argv, env=env, check=False)
    except (OSError, subprocess.CalledProcessError) as exc:  # not root, no mkfs: said, not fatal
        print(f"{kind}: cannot make it here: {exc}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
