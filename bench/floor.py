"""How fast this disk can take durable files at all: dcmrecvd's storage layer, no network.

A C-STORE response waits for its object to be durable, and ``storescu`` sends
the next object only after the response, so one sender can never go faster
than receive time + this floor.  Comparing it with dcmrecv's whole cycle per
object (which never waits for the disk) says what ratio is reachable here.

    python bench/floor.py [--count 1000] [--sizes 3000,524288]

Per size, into a fresh directory (see harness.fresh_output): the acknowledgement
path through ``storage.Writer``, the code an association runs (write, flush,
next temp file from the second file on, rename, directory fsync), and the
same without fsync (what dcmrecv does).
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
from harness import fresh_output  # noqa: E402

from dcmrecvd.store.fs_probe import journals_in_order  # noqa: E402
from dcmrecvd.store.storage import Store, Writer  # noqa: E402


def measure(size: int, count: int, durable: bool) -> float:
    """Median ms per file of write + commit, through the same ``storage.Writer`` an
    association uses (data flushed, the next temp file created, rename, directory fsync)."""
    out = fresh_output(after_deletions=False)
    os.sync()
    writer = Writer(Store(out, durable=durable))
    here = PurePosixPath(".")
    payload = os.urandom(size)
    ack_ms = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            pending = writer.open(here)
            try:
                pending.write(payload)
                writer.commit(pending, here, lambda i=i: f"f{i}", replace=True)
            except BaseException:
                pending.discard()
                raise
            ack_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        writer.close()
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
