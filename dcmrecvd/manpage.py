"""dcmrecvd(8) and dcmrecvd.toml(5), generated from the option table and the config schema.

Generated, so the man pages cannot drift from ``--help`` and the TOML keys;
``python -m dcmrecvd.manpage DIR`` writes both (``make man``), and a test
checks that the shipped copies are current.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from dcmrecvd import __version__
from dcmrecvd.conf import config, flags
from dcmrecvd.conf.options import describe
from dcmrecvd.ops import logs
from dcmrecvd.serve import tls


def _esc(text: str) -> str:
    """Escape for roff: backslashes and leading dots/quotes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _option_lines() -> list[str]:
    lines: list[str] = []
    group = ""
    for opt in flags.OPTIONS:
        if opt.group != group:
            group = opt.group
            lines += [".SS " + _esc(group)]
        spelling = ", ".join(f"\\fB{_esc(s)}\\fR" for s in opt.spellings)
        values = " ".join(f"\\fI{_esc(v.split(':')[0])}\\fR" for v in opt.values if v)
        lines += [".TP", f"{spelling} {values}".rstrip()]
        lines += [_esc(part) for part in opt.help.split("\n")]
        if opt.compat:
            lines += [f"({_esc(opt.compat)}.)"]
    return lines


DESCRIPTION = """\
.B dcmrecvd
is a DICOM storage receiver (Storage SCP): it accepts associations from
storage SCUs (modalities, PACS) and stores each received object as a DICOM
Part 10 file. It accepts every option of DCMTK's
.BR dcmrecv (1)
with the same spellings and exit codes, reads a layered TOML configuration
(see
.BR dcmrecvd.toml (5)),
and runs as a systemd service (Type=notify, socket activation, reload on
SIGHUP, drain on SIGTERM, native journal entries).
.PP
An object is acknowledged (C\\-STORE status 0x0000) only after it is durably
on disk. By default (output.fsync on, [journal] enabled) that means its record
is durable in the ack journal (preallocated segments written with O_DSYNC and
O_DIRECT, several objects per write); its file is made right after, off the
ack path, and every file of an association is under its final name before its
A\\-RELEASE\\-RP. At start, before READY, records not yet made into files are
replayed. Objects above journal.inline_max_kib, and every object where the
journal cannot be used (tmpfs, no O_DIRECT; said at start), are streamed into a
hidden temporary file in their target directory, flushed, renamed to their
final name, and the directory is flushed, before the ack. A file under a final
name is always complete. Disk or permission errors answer 0xA700, data that
cannot be used (an invalid UID) 0xC000.
"""

SECTIONS_8 = """\
.SH SIGNALS
.TP
.B SIGHUP
Re\\-read every configuration layer, association profile and TLS file; swap
them in at once if all are valid (associations in flight keep the old
settings), else keep serving with the old ones and log why
(\\fBreload.rejected\\fR). Settings marked "Needs a restart" in
\\fBdcmrecvd.toml\\fR(5) keep their running value (\\fBreload.needs_restart\\fR).
.TP
.BR SIGTERM ", " SIGINT
Stop accepting, let associations in flight finish for up to
\\fBdaemon.drain_timeout\\fR seconds, abort the rest (removing their partial
objects) and exit 0.
.SH SYSTEMD
Units: \\fBdcmrecvd.socket\\fR (port 104, FileDescriptorName=dicom) with
\\fBdcmrecvd.service\\fR (Type=notify, runs as user dcmrecvd, stores objects under
/var/lib/dcmrecvd/incoming and keeps its state in /var/lib/dcmrecvd/state);
\\fBdcmrecvd@\\fIPORT\\fB.socket\\fR and
\\fBdcmrecvd@\\fIPORT\\fB.service\\fR for more receivers, each reading
/etc/dcmrecvd/instances/\\fIPORT\\fR.toml. READY=1 is sent once the listener
is bound or adopted; STATUS= carries live figures; WATCHDOG=1 is sent at
half of WatchdogSec= while the accept loop is alive. An encrypted TLS key's
password can come from a systemd credential:
.PP
.nf
  # systemctl edit dcmrecvd.service
  [Service]
  LoadCredential=dcmrecvd\\-key\\-password:/etc/dcmrecvd/key\\-password
.fi
.PP
with \\fBtls.password_source = "credential"\\fR.
.SH JOURNAL FIELDS
Under systemd each event is a journal entry with PRIORITY,
SYSLOG_IDENTIFIER=dcmrecvd, DCMRECVD_EVENT, a stable MESSAGE_ID and, where
they apply, DICOM_CALLING_AET, DICOM_CALLED_AET, DICOM_PEER,
DICOM_ASSOCIATION_ID, DICOM_SOP_CLASS_UID, DICOM_SOP_INSTANCE_UID,
DICOM_FILE, DICOM_STATUS, DICOM_BYTES, DICOM_DURATION_MS. Message IDs:
"""

EXIT_CODES = [
    ("0", "normal end"),
    ("1", "command line syntax error or invalid configuration value"),
    ("45", "output directory missing or not a directory"),
    ("64", "cannot listen on the port"),
    ("66", "association negotiation profile missing or invalid"),
    ("71", "TLS key, certificate or profile unusable"),
]


def dcmrecvd_8() -> str:
    """The roff source of dcmrecvd(8)."""
    out = [
        f'.TH DCMRECVD 8 "" "dcmrecvd {__version__}" "System Administration"',
        ".SH NAME",
        "dcmrecvd \\- DICOM storage receiver (Storage SCP) as a Linux daemon",
        ".SH SYNOPSIS",
        ".B dcmrecvd",
        "[\\fIoptions\\fR] [\\fIport\\fR]",
        ".br",
        ".B dcmrecvd forward",
        "\\fB\\-\\-list\\-dead\\fR [\\fIname\\fR...] | \\fB\\-\\-retry\\-dead\\fR \\fIname\\fR...",
        "[\\fB\\-\\-config\\fR \\fIfile\\fR] [\\fB\\-\\-config\\-dir\\fR \\fIdir\\fR]",
        "[\\fB\\-od\\fR \\fIdir\\fR]",
        ".br",
        ".B dcmrecvd journal",
        "\\fB\\-\\-list\\-quarantine\\fR | \\fB\\-\\-export\\-quarantine\\fR \\fIdir\\fR [\\fIid\\fR...] |",
        "\\fB\\-\\-retry\\-quarantine\\fR [\\fIid\\fR...]",
        "[\\fB\\-\\-config\\fR \\fIfile\\fR] [\\fB\\-\\-config\\-dir\\fR \\fIdir\\fR]",
        "[\\fB\\-od\\fR \\fIdir\\fR]",
        ".SH DESCRIPTION",
        DESCRIPTION.rstrip(),
        ".SH OPTIONS",
        *_option_lines(),
        ".SH EXIT STATUS",
        "Checked in this order: 1, 66, 45, 71, 64.",
    ]
    for code, meaning in EXIT_CODES:
        out += [".TP", f".B {code}", meaning]
    out += [".SH TLS SECURITY PROFILES"]
    for name, profile in tls.PROFILES.items():
        out += [
            ".TP",
            f".B {_esc(name)}",
            _esc(f"{profile.label}; TLS 1.2 suites: {profile.ciphers.replace(':', ' ')}"),
        ]
    out += [
        "A profile whose suites the local OpenSSL lacks is refused (exit 71), never weakened.",
        ".PP",
        "Every TLS option but +tls, -tls and +cc is only allowed with +tls (exit 1, as dcmrecv).",
        "-der applies to the key, the certificate and the +cf, +cd and +crl files.",
        "+cs takes the names +cc lists and adds them to the profile's suites; an unknown suite, or a",
        "NULL suite under any profile but +pn, exits 71; +cs with +pz is a command-line error (exit 1).",
        "+ps reads one line from standard input when it is not a terminal.",
    ]
    out += [
        ".SH FORWARD DEAD LETTERS",
        _esc(
            "dcmrecvd forward --list-dead prints each dead letter of the [[forward]] destinations "
            "named (all by default), one per line, tab-separated: destination, event id, attempts, "
            "SOP Instance UID, path, reason. dcmrecvd forward --retry-dead NAME... makes the named "
            "destinations' dead letters due again, in their study's order (the running daemon "
            "picks them up within a second). Both read the configuration as the daemon does "
            "(--config, --config-dir, -od for an output directory given on the daemon's command "
            "line) to find the outbox. Exit 0, or 1 for an unknown destination."
        ),
    ]
    out += [
        ".SH AFTER THE ACK",
        _esc(
            "An object acknowledged through the ack journal becomes a file or a quarantine entry, "
            "never nothing. A transient failure to make files (ENOSPC, EDQUOT, EACCES, EPERM, "
            "EROFS, EIO, a failed flush, any other error) keeps the records waiting, retried with "
            "backoff, and meanwhile refuses new objects: associations rejected (transient), "
            "objects in flight 0xA700, /readyz 503 and the agent drain, both saying why. A "
            "permanent one for a record (ENAMETOOLONG, ENOTDIR, EISDIR, ELOOP, EEXIST, EINVAL, "
            "EFBIG, a record that does not decode) quarantines it: its object and header go to "
            "quarantine/ in the state directory and the records behind it go on "
            "(journal.quarantined, the object.quarantined event, dcmrecvd_quarantined_total). "
            "A file once made is never made again. dcmrecvd journal --list-quarantine prints each "
            "entry, tab-separated: id, sequence number, time, SOP Instance UID, intended path, "
            "reason. --export-quarantine DIR copies the entries' objects (<id>.dcm) and headers "
            "(<id>.json) to DIR. --retry-quarantine asks the running daemon (or its next start) "
            "to make the entries' files again, after the cause is fixed. All three take entry ids "
            "or sequence numbers (default: all) and read the configuration as the daemon does. "
            "Exit 0, or 1 for an unknown entry."
        ),
    ]
    out += [SECTIONS_8.rstrip(), ".TS", "l l."]
    out += [f"{event}\t{logs.message_id(event)}" for event in logs.EVENTS]
    out += [
        ".TE",
        ".SH FILES",
        "/etc/dcmrecvd/dcmrecvd.toml, /etc/dcmrecvd/dcmrecvd.toml.d/*.toml,",
        "/etc/dcmrecvd/storescp.cfg, /var/lib/dcmrecvd/incoming (objects),",
        "/var/lib/dcmrecvd/state (daemon.state_directory: journal/, instances.sqlite,",
        "events.sqlite, commitment.sqlite, quarantine/, output-directory)",
        ".SH SEE ALSO",
        ".BR dcmrecvd.toml (5),",
        ".BR dcmrecv (1),",
        ".BR storescu (1),",
        ".BR systemd.socket (5)",
    ]
    return "\n".join(out) + "\n"


def dcmrecvd_toml_5() -> str:
    """The roff source of dcmrecvd.toml(5)."""
    out = [
        f'.TH DCMRECVD.TOML 5 "" "dcmrecvd {__version__}" "File Formats"',
        ".SH NAME",
        "dcmrecvd.toml \\- configuration of the dcmrecvd DICOM receiver",
        ".SH DESCRIPTION",
        "TOML files read in layers, later ones winning: built\\-in defaults,",
        "/etc/dcmrecvd/dcmrecvd.toml (or $DCMRECVD_CONFIG_DIR, or \\fB\\-\\-config\\-dir\\fR),",
        "/etc/dcmrecvd/dcmrecvd.toml.d/*.toml in sorted order, the file given with",
        "\\fB\\-\\-config\\fR, and last the command\\-line flags. Tables merge; arrays",
        "replace. Put local changes in a drop\\-in: the main file belongs to the package.",
        "Values are typed: an unknown key, a wrong type or an out\\-of\\-range value",
        "is an error naming the file, the key and the reason.",
        "\\fBdcmrecvd \\-\\-print\\-config\\fR shows the effective configuration.",
    ]
    for section, cls in config.sections().items():
        out += [f".SH [{section}]"]
        for f in dataclasses.fields(cls):
            default = config.to_mapping(config.Config(), redact=False)[section][f.name]
            shown = f'"{default}"' if isinstance(default, str) else str(default).lower()
            choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
            out += [
                ".TP",
                f"\\fB{_esc(f.name)}\\fR (default {_esc(shown)})",
                _esc(describe(f) + choices),
            ]
    out += [
        ".SH [ae.\\fITITLE\\fR]",
        _esc(
            "Several AE titles in one daemon. [ae.TITLE.association], [ae.TITLE.output] and "
            "[ae.TITLE.access] (with [[ae.TITLE.access.rule]]) take any key of the tables above "
            f"({', '.join(config.AE_SECTIONS)}) and apply it to associations whose called AE title "
            "is exactly TITLE; other keys come from the top-level tables, the default AE. A "
            "called title without a table goes to the default AE, which rejects it (reason 7) "
            "when network.ae_title is set. Each AE's output directory is checked at start (exit 45)."
        ),
    ]
    for sub in config.SUB_TABLES:
        heading = f"[[{sub.path}]]" if sub.array else f"[{sub.path}]"
        out += [f".SH {heading}", _esc(sub.about)]
        out += _keys(sub.schema(), sub.documented_fields())
    out += [
        ".SH SEE ALSO",
        ".BR dcmrecvd (8)",
    ]
    return "\n".join(out) + "\n"


def _keys(table: object, fields: list[dataclasses.Field[Any]]) -> list[str]:
    """One .TP entry per key of a table that is not a top-level section ([events.amqp], [[hooks]])."""
    out = []
    for f in fields:
        default = getattr(table, f.name)
        shown = f'"{default}"' if isinstance(default, str) else str(default).lower()
        if isinstance(default, tuple):  # a table of its own (match)
            shown = "{}"
        out += [".TP", f"\\fB{_esc(f.name)}\\fR (default {_esc(shown)})", _esc(describe(f))]
    return out


def main(argv: list[str] | None = None) -> int:
    """Write both pages into the directory given."""
    target = Path((argv if argv is not None else sys.argv[1:])[0])
    target.mkdir(parents=True, exist_ok=True)
    (target / "dcmrecvd.8").write_text(dcmrecvd_8())
    (target / "dcmrecvd.toml.5").write_text(dcmrecvd_toml_5())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
