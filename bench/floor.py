"""How fast this disk can take durable files at all: dcmrecvd's storage layer, no network.

A C-STORE response waits for its object to be durable, and ``storescu`` sends
the next object only after the response, so one sender can never go faster
than receive time + this floor.  Comparing it with dcmrecv's whole cycle per
object (which never waits for the disk) says what ratio is reachable here.

    python bench/floor.py [--count 1000] [--sizes 3000,524288]

Per size, into a fresh directory (see run.fresh_output): the acknowledgement
path as an association runs it from its second object on (write, flush,
next temp file, rename, directory fsync), and the same without fsync (what
dcmrecv does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import fresh_output  # noqa: E402

from dcmrecvd.fs_probe import journals_in_order  # noqa: E402
from dcmrecvd.storage import Store  # noqa: E402


def measure(size: int, count: int, durable: bool) -> float:
    """Median ms per file of write + flush + commit, the next temp file made on the way.

    The same order as an association from its second object on: data flushed,
    the next object's temp file created, rename, directory fsync.
    """
    out = fresh_output(after_deletions=False)
    os.sync()
    store = Store(out, durable=durable)
    payload = os.urandom(size)
    ack_ms = []
    pending = store.open(PurePosixPath("."))
    try:
        for i in range(count):
            t0 = time.perf_counter()
            pending.write(payload)
            pending.flush()
            spare = store.open(PurePosixPath("."))
            pending.commit(f"f{i}", replace=True)
            ack_ms.append((time.perf_counter() - t0) * 1e3)
            pending = spare
    finally:
        pending.discard()
        shutil.rmtree(out, ignore_errors=True)
    return statistics.median(ack_ms)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--sizes", default="3000,524288")
    args = parser.parse_args()
    probe = fresh_output(after_deletions=False)
    ordered = journals_in_order(probe)
    shutil.rmtree(probe)
    print(f"filesystem journals in order (one commit per object): {'yes' if ordered else 'no'}")
    print(f"{'size':>9}  {'durable ms':>10}  {'files/s':>8}  {'no-fsync ms':>11}")
    for size in map(int, args.sizes.split(",")):
        ack = measure(size, args.count, durable=True)
        plain = measure(size, args.count, durable=False)
        print(f"{size:>9}  {ack:>10.3f}  {1000 / ack:>8.0f}  {plain:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
