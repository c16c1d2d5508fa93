"""``dcmrecvd forward``: the dead letters of forward destinations, listed and re-queued.

Works beside a running daemon: the outbox is SQLite in WAL mode, so this reads
and updates it while the daemon's forwarders work; a re-queued delivery is
picked up within a second, in its study's order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from dcmrecvd import lifecycle
from dcmrecvd.cli_subcommand import add_config_options, load_config
from dcmrecvd.errors import ExitCode
from dcmrecvd.events.event_store import EventStore

USAGE = """\
dcmrecvd forward --list-dead [NAME...] [--config FILE] [--config-dir DIR] [-od DIR]
dcmrecvd forward --retry-dead NAME... [--config FILE] [--config-dir DIR] [-od DIR]"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcmrecvd forward",
        usage=USAGE,
        description="List or re-queue the dead letters of [[forward]] destinations.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list-dead", action="store_true", help="print each dead letter, one per line")
    what.add_argument(
        "--retry-dead", action="store_true", help="make the named destinations' dead letters due"
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="destinations (default for --list-dead: all)")
    add_config_options(p)
    return p


def main(args: Sequence[str], env: Mapping[str, str]) -> int:
    opts = parser().parse_args(list(args))
    config = load_config(opts, env)
    configured = [f.name for f in config.forward]
    names = opts.names or configured
    unknown = [n for n in names if n not in configured]
    if unknown:
        print(f"dcmrecvd forward: no [[forward]] named {', '.join(unknown)}", file=sys.stderr)
        return int(ExitCode.COMMANDLINE_SYNTAX_ERROR)
    if opts.retry_dead and not opts.names:
        print("dcmrecvd forward: --retry-dead needs the destinations' names", file=sys.stderr)
        return int(ExitCode.COMMANDLINE_SYNTAX_ERROR)
    path = lifecycle.events_database(config, env)
    if not path.is_file():
        print(f"no outbox at {path}: nothing has been forwarded", file=sys.stderr)
        return int(ExitCode.OK)
    store = EventStore(path)
    consumers = {f"forward/{n}": n for n in names}
    if opts.list_dead:
        for consumer, event_id, attempts, error, body in store.dead_letters(list(consumers)):
            print(
                "\t".join(
                    (
                        consumers[consumer],
                        str(event_id),
                        str(attempts),
                        str(body.get("sop_instance_uid", "")),
                        str(body.get("path", "")),
                        error,
                    )
                )
            )
        return int(ExitCode.OK)
    for consumer, name in consumers.items():
        print(f"{name}: {store.requeue_dead(consumer)} dead letters re-queued")
    return int(ExitCode.OK)
