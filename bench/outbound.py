"""Outgoing associations: is pynetdicom's requestor fast enough to be our one home for them?

The forwarder and Storage Commitment reports call other nodes (dcmrecvd.remote). This sends
the same data set to one DCMTK dcmrecv over one association, alternately with DCMTK's
storescu and with dcmrecvd.remote's pool (pynetdicom, datasets streamed from the files
without decoding), and prints each sender's median rate and CPU per object.

    python bench/outbound.py [--set small|ct] [--count 1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom.presentation import build_context

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from harness import DCMTK_CFG, ensure_data, free_port, fresh_output, tool_env, wait_listening  # noqa: E402

from dcmrecvd.remote.peers import Remote  # noqa: E402
from dcmrecvd.remote.pool import AssociationPool  # noqa: E402


def cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def with_storescu(port: int, files: list[Path]) -> tuple[float, float]:
    before, start = cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(["storescu", "127.0.0.1", str(port), *map(str, files)], env=tool_env(), check=True)
    return time.monotonic() - start, cpu(resource.RUSAGE_CHILDREN) - before


def with_pool(port: int, files: list[Path]) -> tuple[float, float]:
    syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    classes = sorted({str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files})
    contexts = [build_context(sop_class, syntaxes) for sop_class in classes]
    before, start = cpu(resource.RUSAGE_SELF), time.monotonic()
    pool = AssociationPool(Remote("ANY-SCP", "127.0.0.1", port, max_pdu=16384), contexts)
    with pool.association() as assoc:
        for i, path in enumerate(files):
            status = assoc.send_c_store(path, msg_id=i % 65535 + 1)
            if status.Status != 0:
                raise RuntimeError(f"{path}: status {status.Status:#06x}")
    pool.close()
    return time.monotonic() - start, cpu(resource.RUSAGE_SELF) - before


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", default="small", choices=["small", "ct"])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    folder = ensure_data(args.set, 2000)
    files = sorted(folder.iterdir())[: args.count]
    results: dict[str, list[tuple[float, float]]] = {"storescu": [], "pynetdicom pool": []}
    for rep in range(args.reps):
        for name in list(results) if rep % 2 == 0 else list(results)[::-1]:
            out = fresh_output(after_deletions=False)
            port = free_port()
            scp = subprocess.Popen(
                ["dcmrecv", "-xf", str(DCMTK_CFG), "Default", "-od", str(out), str(port)],
                env=tool_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_listening(port, scp)
                send = with_storescu if name == "storescu" else with_pool
                results[name].append(send(port, files))
            finally:
                scp.terminate()
                scp.wait(30)
                shutil.rmtree(out, ignore_errors=True)
    print(f"{len(files)} objects of the {args.set} set, one association to DCMTK dcmrecv, {args.reps} reps")
    for name, runs in results.items():
        rate = statistics.median(len(files) / s for s, _ in runs)
        cpu_ms = statistics.median(c / len(files) * 1000 for _, c in runs)
        print(f"  {name:16} {rate:8.0f} objects/s   sender CPU {cpu_ms:6.2f} ms/object")
    return 0


if __name__ == "__main__":
    sys.exit(main())
