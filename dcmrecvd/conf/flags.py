"""dcmrecv's command line -> a partial config mapping (the same shape as the TOML).

One table, ``OPTIONS``, holds a row per option: its spellings, the values it
takes, the config keys it sets and its help text.  The parser, ``--help``, the
TOML translation and the tests are all generated from that table.  Parsing
follows DCMTK's rules: options start with ``+`` or ``-``, ``@file`` arguments
are replaced by the file's words, and for repeated or mutually exclusive
options the rightmost one wins (each row simply overwrites the keys it sets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcmrecvd.conf.config import LOG_FORMATS, LOG_LEVELS, bit_preserving_conflict
from dcmrecvd.errors import UsageError

#: Marker values in ``Option.sets``: replaced by the option's n-th argument.
ARG0 = "\x00arg0"
ARG1 = "\x00arg1"

Converter = Callable[[str, str], Any]


def integer(low: int | None = None, high: int | None = None) -> Converter:
    """A converter with DCMTK's wording for out-of-range values."""

    def convert(option: str, text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise UsageError(f"Invalid value for option {option} ({text})") from None
        if low is not None and value < low:
            raise UsageError(f"Invalid value for option {option} (underflow: {text})")
        if high is not None and value > high:
            raise UsageError(f"Invalid value for option {option} (overflow: {text})")
        return value

    return convert


def choice(*allowed: str) -> Converter:
    """A converter accepting only the listed string constants."""

    def convert(option: str, text: str) -> str:
        if text not in allowed:
            raise UsageError(f"Invalid value for option {option} ({text})")
        return text

    return convert


def text(_option: str, value: str) -> str:
    """Strings are taken as they are."""
    return value


@dataclass(frozen=True)
class Option:
    """One row of the option table.

    ``sets`` maps dotted config keys to constants or to ``ARG0``/``ARG1``;
    ``appends`` maps list keys to the argument that is appended (options that
    may be given several times, like ``+cf``).  Keys under ``cli.`` are the
    daemon's own switches and never reach the config.
    """

    short: str | None
    long: str
    group: str
    help: str
    values: tuple[str, ...] = ()
    sets: dict[str, Any] = field(default_factory=dict)
    appends: dict[str, str] = field(default_factory=dict)
    convert: Converter = text
    compat: str = ""
    #: (option, the key it sets): this option is only allowed when that key ends up set.
    requires: tuple[str, str] | None = None
    #: Keys set to these constants unless the command line sets them itself (before or after).
    implies: dict[str, Any] = field(default_factory=dict)

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every spelling that selects this row."""
        return (self.short, self.long) if self.short else (self.long,)


G_GENERAL = "general options"
G_NET = "network options"
G_TLS = "transport layer security (TLS) options"
G_OUT = "output options"
G_DAEMON = "daemon options (dcmrecvd only)"

_SEED_NOTE = "accepted for compatibility only: Python's ssl module seeds itself"

OPTIONS: tuple[Option, ...] = (
    # general options
    Option("-h", "--help", G_GENERAL, "print this help text and exit", sets={"cli.action": "help"}),
    Option(
        None, "--version", G_GENERAL, "print version information and exit", sets={"cli.action": "version"}
    ),
    Option(
        None, "--arguments", G_GENERAL, "print expanded command line arguments", sets={"cli.arguments": True}
    ),
    Option(
        "-q",
        "--quiet",
        G_GENERAL,
        "quiet mode, print no warnings and errors",
        sets={"logging.level": "fatal"},
    ),
    Option(
        "-v", "--verbose", G_GENERAL, "verbose mode, print processing details", sets={"logging.level": "info"}
    ),
    Option(
        "-d", "--debug", G_GENERAL, "debug mode, print debug information", sets={"logging.level": "debug"}
    ),
    Option(
        "-ll",
        "--log-level",
        G_GENERAL,
        f"use level l for the logger\n({', '.join(LOG_LEVELS)})",
        values=("[l]evel: string constant",),
        sets={"logging.level": ARG0},
        convert=choice(*LOG_LEVELS),
    ),
    Option(
        "-lc",
        "--log-config",
        G_GENERAL,
        "use config file f for the logger",
        values=("[f]ilename: string",),
        sets={"logging.config_file": ARG0},
    ),
    Option(
        "+v",
        "--verbose-pc",
        G_GENERAL,
        "show presentation contexts in verbose mode",
        sets={"logging.verbose_pc": True},
    ),
    # network options
    Option(
        "-xf",
        "--config-file",
        G_NET,
        "use profile p from configuration file f",
        values=("[f]ilename, [p]rofile: string", ""),
        sets={"association.config_file": ARG0, "association.profile": ARG1},
    ),
    Option(
        "-uca",
        "--use-called-aetitle",
        G_NET,
        "always respond with called AE title (default)",
        sets={"network.ae_title": ""},
    ),
    Option(
        "-aet",
        "--aetitle",
        G_NET,
        "set my AE title and check called AE title",
        values=("[a]etitle: string",),
        sets={"network.ae_title": ARG0},
    ),
    Option(
        "-ta",
        "--acse-timeout",
        G_NET,
        "timeout for ACSE messages (default: 30)",
        values=("[s]econds: integer",),
        sets={"network.acse_timeout": ARG0},
        convert=integer(1),
    ),
    Option(
        "-td",
        "--dimse-timeout",
        G_NET,
        "timeout for DIMSE messages (default: unlimited)",
        values=("[s]econds: integer",),
        sets={"network.dimse_timeout": ARG0},
        convert=integer(1),
    ),
    Option(
        "-pdu",
        "--max-pdu",
        G_NET,
        "set max receive pdu to n bytes (default: 16384)",
        values=("[n]umber of bytes: integer (4096..131072)",),
        sets={"network.max_pdu": ARG0},
        convert=integer(4096, 131072),
    ),
    Option(
        "-dhl", "--disable-host-lookup", G_NET, "disable hostname lookup", sets={"network.host_lookup": False}
    ),
    # TLS options
    Option(
        "-tls", "--disable-tls", G_TLS, "use normal TCP/IP connection (default)", sets={"tls.enabled": False}
    ),
    Option(
        "+tls",
        "--enable-tls",
        G_TLS,
        "use authenticated secure TLS connection",
        values=("[p]rivate key file, [c]ertificate file: string", ""),
        sets={"tls.enabled": True, "tls.private_key": ARG0, "tls.certificate": ARG1},
    ),
    Option(
        "+ps",
        "--std-passwd",
        G_TLS,
        "prompt user to type password on stdin (default)",
        sets={"tls.password_source": "prompt"},
        requires=("--enable-tls", "tls.enabled"),
    ),
    Option(
        "+pw",
        "--use-passwd",
        G_TLS,
        "use specified password",
        values=("[p]assword: string",),
        sets={"tls.password_source": "value", "tls.password": ARG0},
        requires=("--enable-tls", "tls.enabled"),
    ),
    Option(
        "-pw",
        "--null-passwd",
        G_TLS,
        "use empty string as password",
        sets={"tls.password_source": "empty"},
        requires=("--enable-tls", "tls.enabled"),
    ),
    Option(
        "-pem",
        "--pem-keys",
        G_TLS,
        "read keys and certificates as PEM file (default)",
        sets={"tls.key_format": "pem"},
    ),
    Option(
        "-der", "--der-keys", G_TLS, "read keys and certificates as DER file", sets={"tls.key_format": "der"}
    ),
    Option(
        "+cf",
        "--add-cert-file",
        G_TLS,
        "add certificate file to list of certificates",
        values=("[f]ilename: string",),
        appends={"tls.ca_files": ARG0},
    ),
    Option(
        "+cd",
        "--add-cert-dir",
        G_TLS,
        "add certificates in d to list of certificates",
        values=("[d]irectory: string",),
        appends={"tls.ca_dirs": ARG0},
    ),
    Option(
        "+crl",
        "--add-crl-file",
        G_TLS,
        "add certificate revocation list file\n(implies --enable-crl-vfy)",
        values=("[f]ilename: string",),
        appends={"tls.crl_files": ARG0},
        implies={"tls.crl_check": "leaf"},
    ),
    Option("+crv", "--enable-crl-vfy", G_TLS, "enable leaf CRL verification", sets={"tls.crl_check": "leaf"}),
    Option(
        "+cra",
        "--enable-crl-all",
        G_TLS,
        "enable full chain CRL verification",
        sets={"tls.crl_check": "chain"},
    ),
    Option(
        "+pg",
        "--profile-8996",
        G_TLS,
        "BCP 195 RFC 8996 TLS Profile (default)",
        sets={"tls.profile": "bcp195-rfc8996"},
    ),
    Option(
        "+pm",
        "--profile-8996-mod",
        G_TLS,
        "Modified BCP 195 RFC 8996 TLS Profile",
        sets={"tls.profile": "bcp195-rfc8996-modified"},
    ),
    Option(
        "+py",
        "--profile-bcp195-nd",
        G_TLS,
        "Non-downgrading BCP 195 TLS Profile (retired)",
        sets={"tls.profile": "bcp195-nd"},
    ),
    Option("+px", "--profile-bcp195", G_TLS, "BCP 195 TLS Profile (retired)", sets={"tls.profile": "bcp195"}),
    Option(
        "+pz",
        "--profile-bcp195-ex",
        G_TLS,
        "Extended BCP 195 TLS Profile (retired)",
        sets={"tls.profile": "bcp195-extended"},
    ),
    Option(
        "+pb",
        "--profile-basic",
        G_TLS,
        "Basic TLS Secure Transport Connection Profile (retired)",
        sets={"tls.profile": "basic"},
    ),
    Option(
        "+pa",
        "--profile-aes",
        G_TLS,
        "AES TLS Secure Transport Connection Profile (retired)",
        sets={"tls.profile": "aes"},
    ),
    Option(
        "+pn",
        "--profile-null",
        G_TLS,
        "Authenticated unencrypted communication\n(retired, was used in IHE ATNA)",
        sets={"tls.profile": "null"},
    ),
    Option(
        "+cc",
        "--list-ciphers",
        G_TLS,
        "show list of supported TLS ciphersuites and exit",
        sets={"cli.action": "list-ciphers"},
    ),
    Option(
        "+cs",
        "--cipher",
        G_TLS,
        "add ciphersuite to list of negotiated suites",
        values=("[c]iphersuite name: string",),
        appends={"tls.ciphers": ARG0},
    ),
    Option(
        "+dp",
        "--dhparam",
        G_TLS,
        "read DH parameters for DH/DSS ciphersuites",
        values=("[f]ilename: string",),
        sets={"tls.dh_params": ARG0},
    ),
    Option(None, "--no-sni", G_TLS, "do not use SNI (default)", sets={"tls.expect_sni": ""}),
    Option(
        None,
        "--expect-sni",
        G_TLS,
        "expect requests for server name s",
        values=("[s]erver name: string",),
        sets={"tls.expect_sni": ARG0},
    ),
    Option(
        "+rs",
        "--seed",
        G_TLS,
        "seed random generator with contents of f",
        values=("[f]ilename: string",),
        sets={"tls.seed_file": ARG0},
        compat=_SEED_NOTE,
    ),
    Option(
        "+ws",
        "--write-seed",
        G_TLS,
        "write back modified seed (only with --seed)",
        sets={"tls.write_seed": True},
        compat=_SEED_NOTE,
        requires=("--seed", "tls.seed_file"),
    ),
    Option(
        "+wf",
        "--write-seed-file",
        G_TLS,
        "write modified seed to file f (only with --seed)",
        values=("[f]ilename: string",),
        sets={"tls.write_seed_file": ARG0},
        compat=_SEED_NOTE,
        requires=("--seed", "tls.seed_file"),
    ),
    Option(
        "-rc",
        "--require-peer-cert",
        G_TLS,
        "verify peer certificate, fail if absent (default)",
        sets={"tls.peer_cert": "require"},
    ),
    Option(
        "-vc",
        "--verify-peer-cert",
        G_TLS,
        "verify peer certificate if present",
        sets={"tls.peer_cert": "verify"},
    ),
    Option(
        "-ic", "--ignore-peer-cert", G_TLS, "don't verify peer certificate", sets={"tls.peer_cert": "ignore"}
    ),
    # output options
    Option(
        "-od",
        "--output-directory",
        G_OUT,
        "write received objects to existing directory d (default: '.')",
        values=("[d]irectory: string",),
        sets={"output.directory": ARG0},
    ),
    Option(
        "-s",
        "--no-subdir",
        G_OUT,
        "do not generate any subdirectories (default)",
        sets={"output.subdirectory": "none"},
    ),
    Option(
        "+ssd",
        "--series-date-subdir",
        G_OUT,
        "generate subdirectories from series date",
        sets={"output.subdirectory": "series-date"},
    ),
    Option(
        "+fd",
        "--default-filenames",
        G_OUT,
        "generate filename from instance UID (default)",
        sets={"output.filenames": "default"},
    ),
    Option(
        "+fu",
        "--unique-filenames",
        G_OUT,
        "generate unique filename based on new UID",
        sets={"output.filenames": "unique"},
    ),
    Option(
        "+fsu",
        "--short-unique-names",
        G_OUT,
        "generate short pseudo-random unique filename",
        sets={"output.filenames": "short-unique"},
    ),
    Option(
        "+fst",
        "--system-time-names",
        G_OUT,
        "generate filename from current system time",
        sets={"output.filenames": "system-time"},
    ),
    Option(
        "-fe",
        "--filename-extension",
        G_OUT,
        "append e to all generated filenames",
        values=("[e]xtension: string",),
        sets={"output.extension": ARG0},
    ),
    Option(
        "-B", "--normal", G_OUT, "allow implicit format conversions (default)", sets={"output.mode": "normal"}
    ),
    Option(
        "+B",
        "--bit-preserving",
        G_OUT,
        "write dataset exactly as received",
        sets={"output.mode": "bit-preserving"},
    ),
    Option(
        None, "--ignore", G_OUT, "ignore dataset, receive but do not store it", sets={"output.mode": "ignore"}
    ),
    # dcmrecvd's own options
    Option(
        None,
        "--config",
        G_DAEMON,
        "read TOML file f after the main file and drop-ins",
        values=("[f]ilename: string",),
        sets={"cli.config": ARG0},
    ),
    Option(
        None,
        "--config-dir",
        G_DAEMON,
        "read d/dcmrecvd.toml and d/dcmrecvd.toml.d/*.toml\n(default: /etc/dcmrecvd)",
        values=("[d]irectory: string",),
        sets={"cli.config_dir": ARG0},
    ),
    Option(
        None,
        "--print-config",
        G_DAEMON,
        "print the effective configuration as TOML and exit",
        sets={"cli.action": "print-config"},
    ),
    Option(
        None,
        "--check-config",
        G_DAEMON,
        "validate configuration, profile, directory and TLS files and exit",
        sets={"cli.action": "check-config"},
    ),
    Option(
        None, "--daemon", G_DAEMON, "detach and run in the background (no systemd)", sets={"cli.daemon": True}
    ),
    Option(
        None,
        "--pidfile",
        G_DAEMON,
        "write the daemon's PID to file f (with --daemon)",
        values=("[f]ilename: string",),
        sets={"daemon.pidfile": ARG0},
    ),
    Option(
        None,
        "--log-format",
        G_DAEMON,
        f"{', '.join(LOG_FORMATS[:-1])} or {LOG_FORMATS[-1]} (default: auto)",
        values=("[f]ormat: string constant",),
        sets={"logging.format": ARG0},
        convert=choice(*LOG_FORMATS),
    ),
    Option(
        None,
        "--max-associations",
        G_DAEMON,
        "serve at most n associations at once",
        values=("[n]umber: integer (1..1024)",),
        sets={"network.max_associations": ARG0},
        convert=integer(1, 1024),
    ),
    Option(
        None,
        "--drain-timeout",
        G_DAEMON,
        "seconds to let associations finish on SIGTERM",
        values=("[s]econds: integer",),
        sets={"daemon.drain_timeout": ARG0},
        convert=integer(0),
    ),
)

_BY_SPELLING: dict[str, Option] = {s: o for o in OPTIONS for s in o.spellings}


@dataclass
class CommandLine:
    """What the command line asked for, before any file is read."""

    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cli: dict[str, Any] = field(default_factory=dict)
    port: int | None = None
    expanded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    used: list[Option] = field(default_factory=list)

    @property
    def action(self) -> str:
        """run, help, version, list-ciphers, print-config or check-config."""
        return str(self.cli.get("action", "run"))


# --------------------------------------------------------------------------- @file


def split_command_file(content: str) -> list[str]:
    """Words of a command file, by DCMTK's rules.

    Whitespace separates words; a quotation mark (``"`` or ``'``) starts a word
    that runs to the matching mark, whitespace and the other mark included.
    An empty quoted word yields nothing, as in DCMTK.
    """
    words: list[str] = []
    current: list[str] = []
    quote = ""
    for ch in content:
        if quote:
            if ch == quote:
                quote = ""
                if current:
                    words.append("".join(current))
                current = []
            else:
                current.append(ch)
        elif ch in "\"'":
            if current:
                words.append("".join(current))
            current = []
            quote = ch
        elif ch.isspace():
            if current:
                words.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def expand_command_files(argv: Sequence[str], cwd: Path | None = None) -> list[str]:
    """Replace each ``@file`` argument by its words; files do not nest."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("@") and len(arg) > 1:
            path = Path(arg[1:])
            if cwd is not None and not path.is_absolute():
                path = cwd / path
            try:
                content = path.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError:
                raise UsageError(f"Cannot open command file '{arg[1:]}'") from None
            out.extend(split_command_file(content))
        else:
            out.append(arg)
    return out


# --------------------------------------------------------------------------- parsing


def _is_option(arg: str) -> bool:
    """DCMTK: a leading + or - followed by a non-digit marks an option."""
    return len(arg) > 1 and arg[0] in "+-" and not arg[1].isdigit()


def parse_port(text: str) -> int:
    """The ``port`` parameter, with DCMTK's wording for bad values."""
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"Invalid parameter value {text}") from None
    if value < 1:
        raise UsageError(f"Invalid parameter value {text} (underflow)")
    if value > 65535:
        raise UsageError(f"Invalid parameter value {text} (overflow)")
    return value


def _store(cmd: CommandLine, dotted: str, value: Any, append: bool) -> None:
    section, _, name = dotted.partition(".")
    table = cmd.cli if section == "cli" else cmd.overrides.setdefault(section, {})
    if append:
        table.setdefault(name, []).append(value)
    else:
        table[name] = value


def _lookup(cmd: CommandLine, dotted: str, default: Any) -> Any:
    section, _, name = dotted.partition(".")
    table = cmd.cli if section == "cli" else cmd.overrides.get(section, {})
    return table.get(name, default)


def parse(argv: Sequence[str], cwd: Path | None = None) -> CommandLine:
    """Parse a dcmrecv command line (without the program name)."""
    cmd = CommandLine(expanded=expand_command_files(argv, cwd))
    params: list[str] = []
    args = cmd.expanded
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _is_option(arg):
            params.append(arg)
            continue
        try:
            opt = _BY_SPELLING[arg]
        except KeyError:
            raise UsageError(f"Unknown option {arg}") from None
        nvalues = len(opt.values)
        if i + nvalues > len(args):
            raise UsageError(f"Missing value for option {opt.long}")
        given = args[i : i + nvalues]
        i += nvalues
        converted = [opt.convert(opt.long, v) for v in given]
        for dotted, value in opt.sets.items():
            if value == ARG0:
                value = converted[0]
            elif value == ARG1:
                value = converted[1]
            _store(cmd, dotted, value, append=False)
        for dotted in opt.appends:
            _store(cmd, dotted, converted[0], append=True)
        if opt.compat:
            cmd.warnings.append(f"{opt.long}: {opt.compat}")
        cmd.used.append(opt)
    for opt in cmd.used:
        for dotted, value in opt.implies.items():
            if _lookup(cmd, dotted, None) is None:
                _store(cmd, dotted, value, append=False)
    if cmd.action in ("help", "version", "list-ciphers"):
        return cmd
    _check_requirements(cmd)
    if len(params) > 1:
        raise UsageError("Too many parameters")
    if params:
        cmd.port = parse_port(params[0])
        cmd.overrides.setdefault("network", {})["port"] = cmd.port
    mode, subdirectory = _lookup(cmd, "output.mode", "normal"), _lookup(cmd, "output.subdirectory", "none")
    if bit_preserving_conflict(mode, subdirectory):
        raise UsageError("--bit-preserving not allowed with --series-date-subdir")
    return cmd


#: TLS options that stand on their own; every other one needs --enable-tls, as in dcmrecv.
_TLS_STANDALONE = frozenset({"--enable-tls", "--disable-tls", "--list-ciphers"})


def _check_requirements(cmd: CommandLine) -> None:
    """DCMTK's "X only allowed with Y" and "X not allowed with Y" checks, on the final values."""
    tls_on = bool(_lookup(cmd, "tls.enabled", False))
    for opt in cmd.used:
        if opt.group == G_TLS and opt.long not in _TLS_STANDALONE and not tls_on:
            raise UsageError(f"{opt.long} only allowed with --enable-tls")
        if opt.requires is not None and not _lookup(cmd, opt.requires[1], None):
            raise UsageError(f"{opt.long} only allowed with {opt.requires[0]}")
    if _lookup(cmd, "tls.ciphers", None) and _lookup(cmd, "tls.profile", "") == "bcp195-extended":
        raise UsageError("--cipher not allowed with --profile-bcp195-ex")


# --------------------------------------------------------------------------- help


def help_text(prog: str) -> str:
    """Usage text in dcmrecv's layout, generated from the table."""
    lines = [
        f"{prog}: DICOM storage SCP (receiver) as a Linux daemon",
        f"usage: {prog} [options] [port]",
        "",
        "parameters:",
        "  port                           tcp/ip port number to listen on",
        "                                 (optional with socket activation or network.port)",
    ]
    group = ""
    for opt in OPTIONS:
        if opt.group != group:
            group = opt.group
            lines.append(f"{group}:")
        short = opt.short or ""
        desc_lines = []
        if opt.values and opt.values[0]:
            desc_lines.append(opt.values[0])
        desc_lines.extend(opt.help.split("\n"))
        if opt.compat:
            desc_lines.append(f"({opt.compat})")
        lines.append(f"  {short:<6}{opt.long:<25}{desc_lines[0]}")
        lines.extend(f"{'':33}{d}" for d in desc_lines[1:])
    return "\n".join(lines) + "\n"


def long_form(args: Sequence[str]) -> list[str]:
    """Arguments with every option in its long spelling (what --arguments prints)."""
    return [_BY_SPELLING[a].long if _is_option(a) and a in _BY_SPELLING else a for a in args]
