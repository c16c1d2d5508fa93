"""``dcmrecvd journal``: the quarantine listed, exported and retried.

Works beside a running daemon: entries are files in the state directory
(``store.quarantine``); a retry only marks them, and the daemon's materialiser
(or the next start) makes their files, says so in the log, and removes the
entries it made.  Nothing here writes into the output directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dcmrecvd.cli_subcommand import add_config_options, load_config
from dcmrecvd.errors import ExitCode
from dcmrecvd.serve.ack_journal import state_directory
from dcmrecvd.store.quarantine import Quarantine, export

USAGE = """\
dcmrecvd journal --list-quarantine [--config FILE] [--config-dir DIR] [-od DIR]
dcmrecvd journal --export-quarantine DIR [ID...] [--config FILE] [--config-dir DIR] [-od DIR]
dcmrecvd journal --retry-quarantine [ID...] [--config FILE] [--config-dir DIR] [-od DIR]"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcmrecvd journal",
        usage=USAGE,
        description="Acknowledged objects whose files could not be made (the quarantine).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--list-quarantine",
        action="store_true",
        help="print each entry: id, sequence number, time, SOP Instance UID, intended path, reason",
    )
    what.add_argument(
        "--export-quarantine",
        metavar="DIR",
        type=Path,
        help="copy the entries' objects (<id>.dcm, ready to send again) and headers (<id>.json) to DIR",
    )
    what.add_argument(
        "--retry-quarantine",
        action="store_true",
        help="ask the daemon to make the entries' files again (after the cause is fixed)",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="entries (an id or a sequence number; default: all)")
    add_config_options(p)
    return p


def main(args: Sequence[str], env: Mapping[str, str]) -> int:
    opts = parser().parse_args(list(args))
    config = load_config(opts, env)
    quarantine = Quarantine(state_directory(config, env) / "quarantine")
    wanted = set(opts.ids)
    entries = [e for e in quarantine.entries() if not wanted or e.id in wanted or str(e.seq) in wanted]
    missing = wanted - {e.id for e in entries} - {str(e.seq) for e in entries}
    if missing:
        print(f"dcmrecvd journal: no quarantine entry {', '.join(sorted(missing))}", file=sys.stderr)
        return int(ExitCode.COMMANDLINE_SYNTAX_ERROR)
    if opts.list_quarantine:
        for e in entries:
            print("\t".join((e.id, str(e.seq), e.time, e.sop_instance_uid, e.intended_path, e.reason)))
        return int(ExitCode.OK)
    if opts.export_quarantine is not None:
        written = export(entries, opts.export_quarantine)
        print(f"{len(entries)} entries exported to {opts.export_quarantine} ({len(written)} objects)")
        return int(ExitCode.OK)
    marked = quarantine.request_retry([e.id for e in entries])
    print(f"{len(marked)} entries marked for a retry: the running daemon (or its next start) makes them")
    return int(ExitCode.OK)
