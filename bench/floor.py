"""How fast this disk can take durable files at all: dcmrecvd's storage layer, no network.

A C-STORE response waits for its object to be durable, and ``storescu`` sends
the next object only after the response, so one sender can never go faster
than receive time + this floor.  Comparing it with dcmrecv's whole cycle per
object (which never waits for the disk) says what ratio is reachable here.

    python bench/floor.py [--count 1000] [--sizes 3000,524288]

Per size, into a fresh directory (see harness.fresh_output), the two ways an
acknowledgement can wait for the disk:

* per-file: through ``storage.Writer``, the code an association runs on the
  per-file path (write, flush, next temp file from the second file on, rename,
  directory fsync);
* journal: one record appended to the ack journal (``store.journal``: a write
  into a zero-filled segment opened ``O_DSYNC | O_DIRECT``), the code an
  association runs when the journal is on (the file is made afterwards, off
  the ack path, and not timed here);

and the per-file path without fsync (what dcmrecv does).
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
from dcmrecvd.store.journal import Journal, Record  # noqa: E402
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


def measure_journal(size: int, count: int) -> float:
    """Median ms per record appended to a fresh ack journal (its segments made beforehand,
    as on a running server), checkpointed as it goes so that segments recycle."""
    out = fresh_output(after_deletions=False)
    journal = Journal(out / "journal", segment_size=64 << 20, segments=4)
    journal.open()
    payload = os.urandom(size)
    header = {"root": str(out), "dir": ".", "name": "CT.1.2.3", "replace": True, "size": size}
    ack_ms = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            journal.commit([Record(dict(header), payload)])
            ack_ms.append((time.perf_counter() - t0) * 1e3)
            journal.checkpoint(journal.last_seq)
    finally:
        journal.close()
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
    print(f"{'size':>9}  {'per-file ms':>11}  {'journal ms':>10}  {'ratio':>5}  {'no-fsync ms':>11}")
    for size in map(int, args.sizes.split(",")):
        ack = measure(size, args.count, durable=True)
        logged = measure_journal(size, args.count)
        plain = measure(size, args.count, durable=False)
        print(f"{size:>9}  {ack:>11.3f}  {logged:>10.3f}  {ack / logged:>5.1f}  {plain:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
