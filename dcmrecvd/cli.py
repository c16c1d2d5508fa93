"""argv -> action (run, check-config, print-config, help...).

The only module that prints to stdout or chooses an exit code.  Checks happen
in dcmrecv's order: command line (1), association profile (66), output
directory (45), TLS material (71), listening port (64).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dcmrecvd import __version__, lifecycle
from dcmrecvd.conf import config as config_mod
from dcmrecvd.conf import flags
from dcmrecvd.errors import DcmrecvdError, ExitCode
from dcmrecvd.ops import logs
from dcmrecvd.ops.systemd import Notifier, clear_listen_env
from dcmrecvd.serve import ciphers, server
from dcmrecvd.serve.runtime import Runtime, prepare

PROG = "dcmrecvd"


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def version_text() -> str:
    """What --version prints."""
    import pydicom
    import pynetdicom

    return (
        f"{PROG} {__version__}\n"
        f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
        f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}\n"
    )


def cipher_list() -> str:
    """+cc: the TLS cipher suites the local OpenSSL offers, by the names +cs takes."""
    listed = "".join(f"  {name}\n" for name in ciphers.supported())
    tls13 = "".join(f"  {name}\n" for name in ciphers.tls13_suites())
    return f"Supported TLS ciphersuites are:\n{listed}" + (
        "\nTLS 1.3 ciphersuites (always offered when the security profile permits TLS 1.3;\n"
        "+cs accepts them, but cannot narrow TLS 1.3 to a subset of them):\n" + tls13
        if tls13
        else ""
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``dcmrecvd`` and ``python -m dcmrecvd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    try:
        return _main(args, env)
    except DcmrecvdError as exc:
        _error(str(exc))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 0


def _main(args: list[str], env: dict[str, str]) -> int:
    # Subcommands: dcmrecv's options never start with a word.
    if args[:1] == ["forward"]:
        from dcmrecvd import cli_forward

        return cli_forward.main(args[1:], env)
    if args[:1] == ["journal"]:
        from dcmrecvd import cli_journal

        return cli_journal.main(args[1:], env)
    if not args and not env.get("LISTEN_FDS") and not _has_config(env):
        sys.stdout.write(flags.help_text(PROG))
        return 0
    cmd = flags.parse(args)
    if cmd.cli.get("arguments"):
        shown = " ".join(f"'{a}'" for a in flags.long_form(cmd.expanded))
        print(f"I: calling '{PROG}' with {len(cmd.expanded)} arguments: {shown}", file=sys.stderr)
    if cmd.action == "help":
        sys.stdout.write(flags.help_text(PROG))
        return 0
    if cmd.action == "version":
        sys.stdout.write(version_text())
        return 0
    if cmd.action == "list-ciphers":
        sys.stdout.write(cipher_list())
        return 0
    for warning in cmd.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    config_dir = Path(cmd.cli["config_dir"]) if "config_dir" in cmd.cli else None
    extra = Path(cmd.cli["config"]) if "config" in cmd.cli else None
    loader = config_mod.Loader(config_dir, extra, cmd.overrides, env)
    config = loader()
    if cmd.action == "print-config":
        sys.stdout.write(config_mod.to_toml(config))
        return 0
    runtime = prepare(config, environ=env, warn=lambda m: print(f"{PROG}: warning: {m}", file=sys.stderr))
    if cmd.action == "check-config":
        print(
            f"configuration OK: profile {runtime.profile.name} "
            f"({len(runtime.profile.contexts)} presentation contexts), "
            f"output {runtime.store.root}, TLS {'on' if runtime.tls else 'off'}"
            + "".join(
                f"; AE {rx.title}: profile {rx.profile.name}, output {rx.store.root}"
                for rx in runtime.receivers.values()
            )
        )
        return int(ExitCode.OK)
    return _run(cmd, runtime, loader, env)


def _has_config(env: Mapping[str, str]) -> bool:
    """True when a main config file exists, so running without arguments makes sense."""
    return (config_mod.default_config_dir(env) / config_mod.MAIN_FILE_NAME).is_file()


def _run(cmd: flags.CommandLine, runtime: Runtime, loader: config_mod.Loader, env: dict[str, str]) -> int:
    config = runtime.config
    listeners, owned = server.open_listeners(config, env)
    clear_listen_env(env)
    fmt = config.logging.format
    if cmd.cli.get("daemon"):
        from dcmrecvd.detach import detach

        detach(config.daemon.pidfile, keep=listeners)
        if fmt == "auto" and Path("/run/systemd/journal/socket").exists():
            fmt = "journal"
    chosen = logs.configure(config.logging.level, fmt, environ=env, logger_config=config.logging.config_file)
    notifier = Notifier(env)
    app = lifecycle.Daemon(runtime, loader, listeners, owned, notifier, environ=env, log_format=chosen)
    return app.serve()
