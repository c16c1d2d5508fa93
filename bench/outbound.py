"""Outgoing associations: which requestor should be our one home for them?

The forwarder and Storage Commitment reports call other nodes (dcmrecvd.remote). This sends
the same data set to one DCMTK dcmrecv over one association, in turn with DCMTK's storescu,
with pynetdicom's requestor (datasets streamed from the files without decoding, TCP_NODELAY
on) and with dcmrecvd.remote (our requestor core, sendfile from the stored files), and
prints each sender's median rate and CPU per object.

    python bench/outbound.py [--set small|ct] [--count 1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from harness import DCMTK_CFG, ensure_data, free_port, fresh_output, tool_env, wait_listening  # noqa: E402

from dcmrecvd.remote.peers import Remote  # noqa: E402
from dcmrecvd.remote.pool import AssociationPool  # noqa: E402
from dcmrecvd.wire.requestor import proposals  # noqa: E402

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def with_storescu(port: int, files: list[Path]) -> tuple[float, float]:
    before, start = cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(["storescu", "127.0.0.1", str(port), *map(str, files)], env=tool_env(), check=True)
    return time.monotonic() - start, cpu(resource.RUSAGE_CHILDREN) - before


def _classes(files: list[Path]) -> list[str]:
    return sorted({str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files})


def with_pynetdicom(port: int, files: list[Path]) -> tuple[float, float]:
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="BENCH")
    for sop_class in _classes(files):
        ae.add_requested_context(sop_class, SYNTAXES)
    before, start = cpu(resource.RUSAGE_SELF), time.monotonic()
    assoc = ae.associate("127.0.0.1", port, max_pdu=16384)
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i, path in enumerate(files):
        status = assoc.send_c_store(path, msg_id=i % 65535 + 1)
        if status.get("Status") != 0:
            raise RuntimeError(f"{path}: {status or 'no response'} (aborted: {assoc.is_aborted})")
    assoc.release()
    return time.monotonic() - start, cpu(resource.RUSAGE_SELF) - before


def with_remote(port: int, files: list[Path]) -> tuple[float, float]:
    offered = proposals([(sop_class, tuple(SYNTAXES)) for sop_class in _classes(files)])
    before, start = cpu(resource.RUSAGE_SELF), time.monotonic()
    pool = AssociationPool(Remote("ANY-SCP", "127.0.0.1", port, max_pdu=16384), offered)
    with pool.association() as assoc:
        for path in files:
            status = assoc.store(path).status
            if status != 0:
                raise RuntimeError(f"{path}: status {status:#06x}")
    pool.close()
    return time.monotonic() - start, cpu(resource.RUSAGE_SELF) - before


SENDERS = {"storescu": with_storescu, "pynetdicom": with_pynetdicom, "dcmrecvd.remote": with_remote}


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
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in SENDERS}
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
                results[name].append(SENDERS[name](port, files))
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
