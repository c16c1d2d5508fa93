"""Two dcmrecvd source trees on the same data, interleaved: is a change faster or slower?

``make bench`` pairs dcmrecvd with DCMTK's dcmrecv, whose own rate swings by 2-3x
between identical runs on these machines, so a before/after comparison of two
bench tables says little about a small change.  This runs the daemon of tree A
and of tree B (``PYTHONPATH=<tree>``, the same venv) alternately on one data
set and prints each one's median rate and receiver CPU, with every run shown.

    git worktree add /tmp/before <commit>
    python bench/ab.py /tmp/before . --set small --pdu 16384 --reps 4 [--senders 4]
    python bench/ab.py . . --config-b hooks.toml   # the cost of hooks on the receiving path
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import SETS, cpu_seconds, ensure_data, free_port, fresh_output, send, tool_env, wait_listening  # noqa: E402


def run_once(
    tree: Path, folder: Path, pdu: int, senders: int, config: Path | None = None
) -> tuple[float, float]:
    """(seconds, receiver CPU seconds) for one send of the whole set."""
    out = fresh_output(after_deletions=False)
    os.sync()
    port = free_port()
    daemon = str(Path(sys.executable).parent / "dcmrecvd")
    argv = [daemon, "-xf", "/etc/dcmtk/storescp.cfg", "Default", "-pdu", str(pdu), "-od", str(out), str(port)]
    if config is not None:
        argv[1:1] = ["--config", str(config.resolve())]
    env = {**tool_env(), "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        before = cpu_seconds(proc.pid)
        seconds = send(port, folder, senders)
        return seconds, cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="source tree A (a checkout or worktree)")
    parser.add_argument("b", type=Path, help="source tree B")
    parser.add_argument("--set", default="small", choices=sorted(SETS))
    parser.add_argument("--pdu", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument(
        "--config-a", type=Path, help="an extra config file for A's daemon (e.g. with [[hooks]])"
    )
    parser.add_argument("--config-b", type=Path, help="the same for B")
    args = parser.parse_args()
    _label, count = SETS[args.set]
    folder = ensure_data(args.set, count)
    runs: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    trees = {"A": args.a, "B": args.b}
    configs = {"A": args.config_a, "B": args.config_b}
    for rep in range(args.reps):
        for name in ("A", "B") if rep % 2 == 0 else ("B", "A"):
            runs[name].append(run_once(trees[name], folder, args.pdu, args.senders, configs[name]))
    for name, rs in runs.items():
        rates = [count / s for s, _ in rs]
        cpus = [c for _, c in rs]
        which = f"{trees[name]}" + (f" + {configs[name]}" if configs[name] else "")
        print(
            f"{name} {which}: {args.set}, pdu {args.pdu}, {args.senders} sender(s): "
            f"{statistics.median(rates):.0f}/s (runs {' '.join(f'{r:.0f}' for r in rates)}), "
            f"cpu {statistics.median(cpus):.2f} s (runs {' '.join(f'{c:.2f}' for c in cpus)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
