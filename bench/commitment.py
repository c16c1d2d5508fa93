"""Storage Commitment: how long from N-ACTION to the modality holding its report, and what
answering a modality costs the objects being received meanwhile.

A pynetdicom modality listens for reports (it accepts the Storage Commitment context
as the requestor's SCP, as a strict modality does).  The objects are stored first
with DCMTK storescu, then one N-ACTION names them all; printed per item count: the
N-ACTION-RSP latency and the time until the N-EVENT-REPORT is in the modality's hands
(median over repetitions).  ``--while-receiving`` then sends the ~3 KB set with
storescu, alternately alone and with a modality asking for 1,000-item commitments in a
loop on another association (each waits for its report), and prints both rates and the
receiver's CPU: the cost of reports on the receiving path.

    python bench/commitment.py [--items 1,100,10000] [--reps 3] [--while-receiving]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import OUT, cpu_seconds, ensure_data, free_port, fresh_output, send, tool_env, wait_listening  # noqa: E402

SC = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
MODALITY = "BENCHMOD"


@dataclass
class Listener:
    """The modality's report listener: the monotonic time each transaction's report arrived."""

    port: int = field(default_factory=free_port)
    arrived: dict[str, float] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(SC, SYNTAXES, scu_role=False, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)]
        )

    def _report(self, event: Any) -> tuple[int, None]:
        tx = str(event.event_information.TransactionUID)
        with self.cond:
            self.arrived[tx] = time.monotonic()
            self.cond.notify_all()
        return 0x0000, None

    def wait(self, tx: str, timeout: float = 300) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: tx in self.arrived, timeout):
                raise TimeoutError(f"no report for {tx} in {timeout} s")
            return self.arrived[tx]


def config(listener: Listener) -> Path:
    path = OUT / "commitment.toml"
    path.write_text(
        f'[journal]\ndirectory = "{OUT / "journal"}"\n\n'
        "[commitment]\nenabled = true\nretry_initial = 1\n\n"
        f'[[commitment.peer]]\nae_title = "{MODALITY}"\nhost = "127.0.0.1"\nport = {listener.port}\n'
    )
    return path


def start_daemon(cfg: Path, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    daemon = str(Path(sys.executable).parent / "dcmrecvd")
    argv = [daemon, "--config", str(cfg), "-xf", "/etc/dcmtk/storescp.cfg", "Default"]
    argv += ["-od", str(out), str(port)]
    proc = subprocess.Popen(argv, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, port


def items_of(folder: Path) -> list[tuple[str, str]]:
    out = []
    for path in sorted(folder.iterdir()):
        ds = dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def action(port: int, items: list[tuple[str, str]]) -> tuple[str, float]:
    """One N-ACTION naming ``items``: (Transaction UID, monotonic time it was sent)."""
    ds = Dataset()
    ds.TransactionUID = tx = generate_uid()
    seq = []
    for sop_class, sop_instance in items:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        seq.append(item)
    ds.ReferencedSOPSequence = Sequence(seq)
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(SC, SYNTAXES)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANY-SCP")
    if not assoc.is_established:
        raise RuntimeError("association for the N-ACTION refused")
    try:
        sent = time.monotonic()
        status, _ = assoc.send_n_action(ds, 1, SC, SC_INSTANCE)
        if status is None or int(status.Status) != 0:
            raise RuntimeError(f"N-ACTION answered {status}")
        return tx, sent
    finally:
        assoc.release()


def latency(counts: list[int], reps: int) -> None:
    listener = Listener()
    listener.start()
    folder = ensure_data("small", max(counts))
    out = fresh_output(after_deletions=False)
    proc, port = start_daemon(config(listener), out)
    try:
        send(port, folder)
        items = items_of(folder)
        print(f"{len(items)} objects stored; N-ACTION -> N-ACTION-RSP / report in the modality's hands")
        for count in counts:
            answered, reported = [], []
            for _ in range(reps):
                start = time.monotonic()
                tx, sent = action(port, items[:count])
                answered.append(time.monotonic() - sent)
                reported.append(listener.wait(tx) - start)
            print(
                f"  {count:>6} items: N-ACTION-RSP {statistics.median(answered) * 1000:7.1f} ms, "
                f"report delivered {statistics.median(reported) * 1000:7.1f} ms "
                f"(runs {' '.join(f'{r * 1000:.0f}' for r in reported)})"
            )
    finally:
        proc.terminate()
        proc.wait(30)
        listener.server.shutdown()


@dataclass
class Asker:
    """A modality asking for commitments of the same items in a loop, each after the last report."""

    port: int
    listener: Listener
    items: list[tuple[str, str]]
    reports: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            tx, _ = action(self.port, self.items)
            self.listener.wait(tx)
            self.reports += 1

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(300)


def while_receiving(reps: int) -> None:
    """The ~3 KB set received alone and while a modality asks for commitments in a loop."""
    listener = Listener()
    listener.start()
    asked = ensure_data("small", 1000)
    folder = ensure_data("small", 2000)
    cfg = config(listener)
    results: dict[str, list[tuple[float, float, int]]] = {"alone": [], "asking": []}
    for rep in range(reps):
        for mode in ("alone", "asking") if rep % 2 == 0 else ("asking", "alone"):
            out = fresh_output(after_deletions=False)
            proc, port = start_daemon(cfg, out)
            try:
                send(port, asked)  # what the modality asks about, stored before the run
                asker = Asker(port, listener, items_of(asked))
                if mode == "asking":
                    asker.start()
                before = cpu_seconds(proc.pid)
                seconds = send(port, folder)
                cpu = cpu_seconds(proc.pid) - before
                asker.stop()
            finally:
                proc.terminate()
                proc.wait(30)
            results[mode].append((2000 / seconds, cpu, asker.reports))
    listener.server.shutdown()
    alone, asking = results["alone"], results["asking"]
    ratios = [b[0] / a[0] for a, b in zip(alone, asking, strict=True)]
    for mode, rs in results.items():
        print(
            f"  {mode:>6}: {statistics.median(r[0] for r in rs):.0f}/s "
            f"(runs {' '.join(f'{r[0]:.0f}' for r in rs)}), receiver cpu "
            f"{statistics.median(r[1] for r in rs):.2f} s, reports during the run "
            f"{' '.join(str(r[2]) for r in rs)}"
        )
    print(
        f"  paired rate ratio asking/alone: median {statistics.median(ratios):.2f} "
        f"(runs {' '.join(f'{r:.2f}' for r in ratios)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", default="1,100,10000")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--while-receiving", action="store_true")
    args = parser.parse_args()
    latency([int(n) for n in args.items.split(",")], args.reps)
    if args.while_receiving:
        print("2000 x ~3 KB received by storescu, alone and while a modality asks for 1,000-item commitments")
        while_receiving(args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
