"""Forwarding: how fast dcmrecvd delivers to a PACS, against DCMTK's dcmsend of the same files
to the same PACS in the same run; and what a forwarder costs the objects being received.

1. Orthanc (Debian's) is the PACS, run in a network namespace of our own (it binds every
   interface), with a fresh storage directory per run.  ``dcmsend``: the CT set sent from its
   files by one dcmsend.  ``dcmrecvd``: the same set received first while Orthanc is down (the
   backlog), then Orthanc started: the time from Orthanc answering until it holds every object
   (the forwarder may rest up to ``backoff_max`` = 1 s first: counted against us).
2. The ~3 KB set received by storescu: without forwarding, with a forwarder delivering to a
   DCMTK dcmrecv on loopback, and with one whose destination is down (a closed port);
   interleaved, with the paired rate ratios and the receiver's CPU per object.

    python bench/forward.py [--reps 3] [--set ct] [--count 2000] [--skip-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import OUT, cpu_seconds, ensure_data, free_port, fresh_output, send, tool_env, wait_listening  # noqa: E402

DAEMON = str(Path(sys.executable).parent / "dcmrecvd")
PROFILE = ["-xf", "/etc/dcmtk/storescp.cfg", "Default"]


class Namespace:
    def __init__(self) -> None:
        self.name = f"dcmrbench{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(argv), check=True, **kw)  # type: ignore[call-overload]

    def count(self, http: int) -> int:
        out = subprocess.run(
            self.argv(["curl", "-sf", f"http://127.0.0.1:{http}/statistics"]), capture_output=True
        )
        return int(json.loads(out.stdout)["CountInstances"]) if out.returncode == 0 else -1

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def orthanc(ns: Namespace, dicom: int, http: int) -> tuple[subprocess.Popen[bytes], Path]:
    storage = Path(tempfile.mkdtemp(dir=OUT, prefix="orthanc-"))
    config = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": dicom, "HttpPort": http,
        "StorageDirectory": str(storage), "IndexDirectory": str(storage), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "OrthancExplorerEnabled": False, "SaveJobs": False, "Plugins": [],
    }  # fmt: skip
    (storage / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(  # TCP_NODELAY=1: DCMTK's Nagle would limit every sender to ~20/s
        ns.argv(["/usr/sbin/Orthanc", str(storage / "orthanc.json")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tool_env(),
    )
    deadline = time.monotonic() + 60
    while ns.count(http) < 0:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("Orthanc did not start")
        time.sleep(0.05)
    return proc, storage


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_count(ns: Namespace, http: int, count: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while (n := ns.count(http)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Orthanc holds {n} of {count}")
        time.sleep(0.05)
    return time.monotonic()


def with_dcmsend(ns: Namespace, folder: Path, count: int) -> float:
    dicom, http = free_port(), free_port()
    proc, storage = orthanc(ns, dicom, http)
    try:
        start = time.monotonic()
        ns.run(["dcmsend", "-aec", "ORTHANC", "127.0.0.1", str(dicom), "+sd", str(folder)], env=tool_env())
        return count / (wait_count(ns, http, count) - start)
    finally:
        stop(proc)
        shutil.rmtree(storage, ignore_errors=True)


ASSOCIATIONS = [1]
#: dcmrecvd's CPU per object forwarded (ms), one per run.
FORWARD_CPU: list[float] = []


def with_dcmrecvd(ns: Namespace, folder: Path, count: int) -> float:
    dicom, http, port = free_port(), free_port(), free_port()
    out = fresh_output(after_deletions=False)
    cfg = OUT / "forward-orthanc.toml"
    cfg.write_text(
        f'[journal]\ndirectory = "{OUT / "journal"}"\n\n[[forward]]\nname = "orthanc"\nhost = "127.0.0.1"\n'
        f'port = {dicom}\nae_title = "ORTHANC"\nbackoff = 1\nbackoff_max = 1\n'
        f"max_associations = {ASSOCIATIONS[0]}\n"
    )
    daemon = subprocess.Popen(
        ns.argv([DAEMON, "--config", str(cfg), *PROFILE, "-od", str(out), str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tool_env(),
    )
    try:
        time.sleep(0.2)
        deadline = time.monotonic() + 30
        while subprocess.run(ns.argv(["echoscu", "127.0.0.1", str(port)]), capture_output=True).returncode:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("dcmrecvd did not start")
            time.sleep(0.05)
        files = sorted(map(str, folder.iterdir()))
        ns.run(["storescu", "127.0.0.1", str(port), *files], env=tool_env())
        proc, storage = orthanc(ns, dicom, http)  # the backlog is complete: now the PACS comes up
        try:
            start, cpu = time.monotonic(), cpu_seconds(daemon.pid)
            rate = count / (wait_count(ns, http, count) - start)
            FORWARD_CPU.append((cpu_seconds(daemon.pid) - cpu) / count * 1000)
            return rate
        finally:
            stop(proc)
            shutil.rmtree(storage, ignore_errors=True)
    finally:
        stop(daemon)
        shutil.rmtree(out, ignore_errors=True)


def receiving(folder: Path, count: int, config: Path | None) -> tuple[float, float]:
    out = fresh_output(after_deletions=False)
    os.sync()
    port = free_port()
    argv = [DAEMON, *PROFILE, "-od", str(out), str(port)]
    if config is not None:
        argv[1:1] = ["--config", str(config)]
    proc = subprocess.Popen(argv, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        before = cpu_seconds(proc.pid)
        seconds = send(port, folder)
        return count / seconds, cpu_seconds(proc.pid) - before
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)


def receiving_costs(reps: int) -> None:
    folder = ensure_data("small", 2000)
    sink_dir = OUT / "forward-sink"
    shutil.rmtree(sink_dir, ignore_errors=True)
    sink_dir.mkdir(parents=True)
    sink_port = free_port()
    sink = subprocess.Popen(
        ["dcmrecv", *PROFILE, "-od", str(sink_dir), str(sink_port)],
        env=tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    configs: dict[str, Path | None] = {"alone": None}
    for mode, port in (("forwarding", sink_port), ("destination down", free_port())):
        path = OUT / f"forward-{mode.split()[0]}.toml"
        path.write_text(
            f'[journal]\ndirectory = "{OUT / "journal"}"\n\n[[forward]]\nname = "sink"\nhost = "127.0.0.1"\n'
            f'port = {port}\nae_title = "ANY-SCP"\n'
        )
        configs[mode] = path
    configs["alone"] = OUT / "forward-alone.toml"
    configs["alone"].write_text(f'[journal]\ndirectory = "{OUT / "journal"}"\n')
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in configs}
    try:
        wait_listening(sink_port, sink)
        for rep in range(reps):
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for mode in order:
                runs[mode].append(receiving(folder, 2000, configs[mode]))
    finally:
        stop(sink)
        shutil.rmtree(sink_dir, ignore_errors=True)
    base = runs["alone"]
    print("2000 x ~3 KB received by storescu (one association), receiver CPU per object:")
    for mode, rs in runs.items():
        ratios = [r[0] / b[0] for r, b in zip(rs, base, strict=True)]
        print(
            f"  {mode:>16}: {statistics.median(r[0] for r in rs):6.0f}/s "
            f"(runs {' '.join(f'{r[0]:.0f}' for r in rs)}), "
            f"cpu {statistics.median(r[1] for r in rs) / 2000 * 1000:.2f} ms/object, "
            f"paired ratio to alone {statistics.median(ratios):.2f} ({' '.join(f'{x:.2f}' for x in ratios)})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--set", default="ct", choices=("ct", "small"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--orthanc-only", action="store_true", help="skip the receiving costs")
    parser.add_argument("--associations", type=int, default=1, help="the forwarder's max_associations")
    args = parser.parse_args()
    ASSOCIATIONS[0] = args.associations
    if not args.skip_orthanc:
        folder = ensure_data(args.set, args.count)
        ns = Namespace()
        results: dict[str, list[float]] = {"dcmsend": [], "dcmrecvd": []}
        try:
            for rep in range(args.reps):
                for who in ("dcmsend", "dcmrecvd") if rep % 2 == 0 else ("dcmrecvd", "dcmsend"):
                    fn = with_dcmsend if who == "dcmsend" else with_dcmrecvd
                    results[who].append(fn(ns, folder, args.count))
        finally:
            ns.close()
        ratios = [b / a for a, b in zip(results["dcmsend"], results["dcmrecvd"], strict=True)]
        print(
            f"{args.count} x {args.set} to Orthanc (objects/s until Orthanc holds them all; "
            f"dcmrecvd forwarding on {args.associations} association(s)):"
        )
        for who, rates in results.items():
            print(
                f"  {who:>9}: {statistics.median(rates):.0f}/s (runs {' '.join(f'{r:.0f}' for r in rates)})"
            )
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(f"  paired ratio dcmrecvd/dcmsend: {statistics.median(ratios):.2f} ({shown})")
        cpu = " ".join(f"{c:.2f}" for c in FORWARD_CPU)
        print(f"  dcmrecvd CPU per object forwarded: {statistics.median(FORWARD_CPU):.2f} ms ({cpu})")
    if not args.orthanc_only:
        receiving_costs(args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
