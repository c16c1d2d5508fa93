"""How long start-up recovery takes: a journal full of records never made into files, replayed.

The worst case at start is a journal whose every segment holds records past the
checkpoint (materialisation fell behind, then the power went).  This fills
``--segments`` segments of ``--segment-mib`` with records of ``--size`` bytes
(each its own commit, as from a lone sender), stops without materialising
anything, then times what start-up does: ``Journal.open`` (scan and check every
batch) and ``Materialiser.replay`` (make every file, write its index row,
checkpoint).  Prints the rates and the time a full default journal
(32 x 16 MiB) would take at them.

    python bench/recovery.py [--size 3000] [--segments 4] [--segment-mib 16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import fresh_output  # noqa: E402

from dcmrecvd.store.instance_index import InstanceIndex  # noqa: E402
from dcmrecvd.store.journal import BLOCK, Journal, JournalFull, Record  # noqa: E402
from dcmrecvd.store.materialiser import Materialiser  # noqa: E402

DEFAULT_JOURNAL = 32 * 16 << 20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--segment-mib", type=int, default=16)
    args = parser.parse_args()
    out = fresh_output(after_deletions=False)
    files = out / "files"
    files.mkdir()
    segment = args.segment_mib << 20
    journal = Journal(out / "journal", segment_size=segment, segments=args.segments, full_wait=0.0)
    journal.open()
    payload = b"\x01" * args.size
    count = 0
    started = time.monotonic()
    try:
        while True:
            header = {
                "root": str(files),
                "dir": ".",
                "name": f"CT.1.2.{count}",
                "replace": True,
                "size": args.size,
            }
            header["index"] = {
                "called_aet": "AE",
                "sop_instance_uid": f"1.2.{count}",
                "sop_class_uid": "1.2",
                "stored": "",
            }
            journal.commit([Record(header, payload)])
            count += 1
    except JournalFull:
        pass
    filled = time.monotonic() - started
    journal.close()
    started = time.monotonic()
    again = Journal(out / "journal", segment_size=segment, segments=args.segments)
    records = again.open()
    scanned = time.monotonic() - started
    index = InstanceIndex(out / "index.sqlite")
    started = time.monotonic()
    counts = Materialiser(again, index).replay(records)
    replayed = time.monotonic() - started
    again.close()
    index.close()
    shutil.rmtree(out, ignore_errors=True)
    assert counts["records"] == count == counts["made"], counts
    size_on_disk = args.segments * segment
    per_record = size_on_disk / count
    full = DEFAULT_JOURNAL / per_record
    print(
        f"{count} records of {args.size} bytes in {args.segments} x {args.segment_mib} MiB "
        f"(filled in {filled:.1f} s)"
    )
    print(
        f"scan: {scanned:.2f} s ({count / scanned:.0f} records/s); "
        f"replay: {replayed:.2f} s ({count / replayed:.0f} files/s)"
    )
    print(
        f"a full default journal (512 MiB, {full:.0f} such records, {per_record / BLOCK:.1f} blocks each): "
        f"about {full / count * (scanned + replayed):.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
