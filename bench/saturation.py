"""Where the CPU goes while several senders store at once: is the machine the limit?

Runs N storescu against a receiver on the CT set and reads, around the run, the
machine's busy time (/proc/stat), the receiver's CPU (/proc/<pid>/stat) and the
senders' (their rusage).  On a 2-core box whose senders run beside the receiver,
this says how far the aggregate can go at all.

    python bench/saturation.py [--senders 4] [--receivers dcmrecvd,dcmrecv]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import cpu_seconds, ensure_data, fresh_output, start_receiver, tool_env  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """Core-seconds the machine has not been idle (or waiting for I/O) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--receivers", default="dcmrecvd,dcmrecv")
    args = parser.parse_args()
    folder = ensure_data("ct", 2000)
    files = sorted(folder.iterdir())
    cores = os.cpu_count() or 1
    for which in args.receivers.split(","):
        out = fresh_output(after_deletions=False)
        os.sync()
        proc, port = start_receiver(which, out)
        try:
            receiver0, machine0 = cpu_seconds(proc.pid), busy_seconds()
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.monotonic()
            groups = [files[i :: args.senders] for i in range(args.senders)]
            senders = [
                subprocess.Popen(["storescu", "127.0.0.1", str(port), *map(str, g)], env=tool_env())
                for g in groups
            ]
            for sender in senders:
                sender.wait()
            wall = time.monotonic() - start
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            receiver = cpu_seconds(proc.pid) - receiver0
            machine = busy_seconds() - machine0
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(out, ignore_errors=True)
        sent = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        print(
            f"{which}, {args.senders} senders: {len(files) / wall:.0f}/s; "
            f"machine {100 * machine / (cores * wall):.0f} % busy "
            f"({machine:.2f} of {cores * wall:.2f} core-s); receiver {receiver:.2f} s "
            f"({1000 * receiver / len(files):.2f} ms/object); senders {sent:.2f} s "
            f"({1000 * sent / len(files):.2f} ms/object)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
