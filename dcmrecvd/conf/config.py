"""The typed configuration: schema, layering, validation and TOML output.

Every setting lives in exactly one frozen dataclass field whose metadata holds
its documentation and constraints, so validation, ``--print-config`` and the
shipped ``etc/dcmrecvd.toml`` all derive from one declaration.  Layers merge
in the systemd order: built-in defaults < main file < sorted drop-ins <
``--config`` < command-line flags.  Tables merge, arrays replace.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from pydicom.datadict import tag_for_keyword

from dcmrecvd.conf.access import check_network, check_rules
from dcmrecvd.conf.commitment_settings import CommitmentConfig, CommitmentPeerConfig, check_peer
from dcmrecvd.conf.forward import ForwardConfig, check_destination, parse_match
from dcmrecvd.conf.options import describe
from dcmrecvd.conf.options import opt as _opt
from dcmrecvd.conf.sub_tables import SubTable
from dcmrecvd.conf.validation import suggest, validate_table
from dcmrecvd.errors import ConfigError
from dcmrecvd.store.disk_space import parse_min_free
from dcmrecvd.wire import layout
from dcmrecvd.wire.status import is_failure_code

DEFAULT_CONFIG_DIR = Path("/etc/dcmrecvd")
MAIN_FILE_NAME = "dcmrecvd.toml"
DROPIN_DIR_NAME = "dcmrecvd.toml.d"
CONFIG_DIR_ENV = "DCMRECVD_CONFIG_DIR"

#: The key in the override mapping that the command line uses for its own origin.
COMMAND_LINE = "<command line>"


#: The log levels, in dcmrecv's order (-ll): the one list the flags, the config and the
#: logging setup use.
LOG_LEVELS = ("fatal", "error", "warn", "info", "debug", "trace")
#: Where log lines go (logging.format, --log-format).
LOG_FORMATS = ("auto", "console", "json", "journal")


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}' is not host:port (e.g. '127.0.0.1:9104')")
    return host.strip("[]") or "0.0.0.0", int(port)


def _listen_or_empty(text: str) -> object:
    return parse_listen(text) if text else None


TLS_PROFILES = (
    "bcp195-rfc8996",
    "bcp195-rfc8996-modified",
    "bcp195-nd",
    "bcp195",
    "bcp195-extended",
    "basic",
    "aes",
    "null",
)


@dataclass(frozen=True)
class NetworkConfig:
    """Where and how associations are accepted."""

    port: int = _opt(
        0,
        "TCP port to listen on (dcmrecv's `port` parameter). 0 means: none configured; "
        "then the port must come from the command line or from socket activation.",
        minimum=0,
        maximum=65535,
        restart=True,
    )
    address: str = _opt(
        "", "Address to bind; empty binds every IPv4 interface, as dcmrecv does.", restart=True
    )
    ae_title: str = _opt(
        "",
        "Our AE title (-aet). When set, associations whose called AE title differs are "
        "rejected; when empty, we respond with whatever AE title was called (-uca).",
    )
    acse_timeout: int = _opt(30, "Timeout for ACSE messages, in seconds (-ta).", minimum=1)
    dimse_timeout: int = _opt(
        0, "Timeout for DIMSE messages, in seconds; 0 means unlimited (-td).", minimum=0
    )
    max_pdu: int = _opt(
        16384,
        "Maximum receive PDU length we announce, in bytes (-pdu allows 4096..131072; "
        "the config file allows up to 4194304).",
        minimum=4096,
        maximum=4194304,
    )
    host_lookup: bool = _opt(True, "Resolve peer host names for the logs (false: -dhl).")
    max_associations: int = _opt(
        32,
        "Associations served at once; more are rejected as transient 'local limit exceeded'.",
        minimum=1,
        maximum=1024,
    )
    max_associations_per_peer: int = _opt(
        0,
        "Associations one source address may hold at once (0: no limit); more are rejected "
        "as transient 'local limit exceeded'. Behind a PROXY-protocol balancer the address "
        "is the client's.",
        minimum=0,
        maximum=1024,
    )
    proxy_protocol: str = _opt(
        "off",
        "PROXY protocol header before each connection (HAProxy's send-proxy / send-proxy-v2): "
        "off (never parsed), v1, v2, or any (v1 or v2; still required).",
        choices=("off", "v1", "v2", "any"),
    )
    trusted_proxies: list[str] = _opt(
        ["127.0.0.1/32", "::1/128"],
        "Networks a PROXY header is accepted from; a connection from elsewhere is closed.",
        parse=check_network,
    )
    async_window: int = _opt(
        8,
        "Asynchronous operations window (PS3.7 D.3.3.3): how many C-STOREs a sender that "
        "proposes a window may have outstanding. Objects that arrive together are made "
        "durable together (one directory fsync for several), and each response still waits "
        "for its own object, in request order. 1: no asynchronous operations (answered (1,1)).",
        minimum=1,
        maximum=64,
    )
    max_pending_connections: int = _opt(
        256,
        "Connections accepted but not yet negotiated (no A-ASSOCIATE-RQ answered yet); "
        "more are closed at once. Each costs a thread and a few KiB until the ACSE timeout.",
        minimum=1,
        maximum=65536,
    )


@dataclass(frozen=True)
class AssociationConfig:
    """Which association negotiation profile decides what we accept."""

    config_file: str = _opt(
        "",
        "DCMTK association negotiation config file (asconfig format, -xf). Empty: only "
        "Verification with Implicit VR Little Endian is accepted, as in dcmrecv.",
    )
    profile: str = _opt("", "Profile (section of [[Profiles]]) to use from config_file (-xf).")


def check_layout(value: str) -> None:
    if value:
        layout.parse(value)  # LayoutError is a ValueError: the config error names the key


def check_layout_missing(value: str) -> None:
    if not value or layout.safe(value, "") != value:
        raise ValueError("letters, digits, space and - . _ @ only, not empty, no leading or trailing dot")


#: output.duplicates: what a second copy of an instance does.
DUPLICATE_POLICIES = ("overwrite", "keep", "reject", "reject-if-different", "keep-both")


def check_duplicate_status(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not is_failure_code(value):
        raise ValueError(
            "a C-STORE failure status: 0x01xx (but the warnings 0x0107 and 0x0116), 0x02xx, 0xAxxx or 0xCxxx"
        )


@dataclass(frozen=True)
class OutputConfig:
    """Where received objects go and how they are named."""

    directory: str = _opt(".", "Existing directory that receives the objects (-od).")
    subdirectory: str = _opt(
        "none",
        "Subdirectory scheme: none (-s) or series-date (+ssd): data/YYYY/MM/DD from Series Date.",
        choices=("none", "series-date"),
    )
    filenames: str = _opt(
        "default",
        "File name scheme: default (+fd), unique (+fu), short-unique (+fsu), system-time (+fst).",
        choices=("default", "unique", "short-unique", "system-time"),
    )
    extension: str = _opt("", "Extension appended to every file name, e.g. '.dcm' (-fe).")
    layout: str = _opt(
        "",
        "A relative path template from the header, e.g. "
        "'{PatientID}/{StudyDate:%Y%m%d}/{SOPInstanceUID}.dcm'. "
        "Placeholders: attribute keywords or tags (8 hex digits), calling_aet, called_aet, received, "
        "modality_prefix, uuid; modifiers: a strftime format (DA, DT, TM, received), upper, lower, "
        "[a:b], sha256, md5, hash8. Values are reduced to letters, digits, space and - . _ @. The "
        "last level must hold {SOPInstanceUID} or {uuid}, unmodified. A date the format asks more "
        "of than the value gives (or an absent one) is layout_missing. Empty: dcmrecv's naming "
        "(subdirectory, filenames, extension), which cannot be set with it.",
        parse=check_layout,
    )
    layout_missing: str = _opt(
        "UNKNOWN",
        "What an absent or empty value (or '.', '..') becomes in output.layout.",
        parse=check_layout_missing,
    )
    duplicates: str = _opt(
        "overwrite",
        "What a second copy of an instance does: overwrite (replace the first, as dcmrecv), keep "
        "(the first stays, the second is received and discarded: success), reject (the second is "
        "refused with output.duplicate_status), reject-if-different (identical dataset bytes: "
        "success and nothing touched; different: refused), keep-both (stored beside the first, "
        "its name with a suffix _1, _2...).",
        choices=DUPLICATE_POLICIES,
    )
    duplicate_identity: str = _opt(
        "path",
        "What makes a second copy: path (a second object under the same final name, as dcmrecv; "
        "needs names made from the instance: output.filenames = 'default' or a layout without "
        "{uuid}) or instance (the same SOP Instance UID under the same called AE, wherever it "
        "lies; from the ack journal's instance index, so it needs journal.enabled and "
        "output.fsync).",
        choices=("path", "instance"),
    )
    duplicate_status: int = _opt(
        0x0111,
        "The failure status a refused duplicate gets (0x0111: Duplicate SOP Instance); any "
        "C-STORE failure code: 0x01xx (not the warnings 0x0107 and 0x0116), 0x02xx, 0xAxxx or "
        "0xCxxx (e.g. 0xA700 to have senders retry).",
        parse=check_duplicate_status,
    )
    mode: str = _opt(
        "normal",
        "Storage mode: normal (-B), bit-preserving (+B), ignore (--ignore: receive, do not store).",
        choices=("normal", "bit-preserving", "ignore"),
    )
    fsync: bool = _opt(
        True,
        "Flush each object (and its directory) to disk before acknowledging it. Turning "
        "this off breaks the promise that an acknowledged object survives a power cut.",
        restart=True,
    )
    min_free: str = _opt(
        "",
        "Free-space watermark of the output directory, e.g. '2GiB', '500MB' or '5%'; empty: "
        "off. Below it new associations are rejected (transient, local limit exceeded), an "
        "object that would cross it answers 0xA700, and the agent check says drain.",
        parse=parse_min_free,
    )


@dataclass(frozen=True)
class JournalConfig:
    """The ack journal: with output.fsync on, an object is acknowledged once its record is durable."""

    enabled: bool = _opt(
        True,
        "Acknowledge each object once its record is in the ack journal (a data-only flush), "
        "and make its file off the ack path. Off: each object's own file, data flush, rename "
        "and directory fsync before its ack (the per-file path). Without output.fsync there "
        "is no journal either way.",
        restart=True,
    )
    directory: str = _opt(
        "",
        "Where the journal's segments live. Empty: journal/ in daemon.state_directory. A separate "
        "fast device (NVMe) may hold it; it must support O_DIRECT (not tmpfs). Where it cannot "
        "be used, dcmrecvd falls back to the per-file path and says so, unless a setting needs "
        "it (duplicate_identity = 'instance', [commitment], [[forward]]): then it refuses to start.",
        restart=True,
    )
    segment_mib: int = _opt(16, "Size of one journal segment, in MiB.", minimum=1, maximum=1024, restart=True)
    segments: int = _opt(
        32,
        "Segments at most (disk use: segments x segment_mib). When all hold objects not yet "
        "materialised, new objects wait up to 10 s, then fail with 0xA700. Fewer (or smaller) "
        "segments are made when these would take more than a quarter of the free space of "
        "their filesystem; journal.sized says so at start.",
        minimum=2,
        maximum=4096,
        restart=True,
    )
    inline_max_kib: int = _opt(
        64,
        "Objects up to this size (KiB) travel inside their journal record (written twice: "
        "record, then file); larger ones stream into their own file with O_DIRECT, as on the "
        "per-file path, and their record only names it. Measured on a virtio disk: 3 KB "
        "objects +37 % through the journal, 0.5 MB objects faster through their own file.",
        minimum=4,
        maximum=65536,
        restart=True,
    )


@dataclass(frozen=True)
class LoggingConfig:
    """How much is logged and where."""

    level: str = _opt("warn", "Log level (-q fatal, -v info, -d debug, -ll).", choices=LOG_LEVELS)
    config_file: str = _opt("", "DCMTK logger config file (-lc); levels and a log file are honoured.")
    verbose_pc: bool = _opt(False, "Log presentation contexts when verbose (+v).")
    format: str = _opt(
        "auto",
        "auto (journal under systemd, console otherwise), console, json (JSON lines) or journal.",
        choices=LOG_FORMATS,
    )


@dataclass(frozen=True)
class TLSConfig:
    """Transport layer security, as dcmrecv's TLS options."""

    enabled: bool = _opt(False, "Use TLS (+tls) instead of plain TCP (-tls).")
    private_key: str = _opt("", "Private key file (+tls).")
    certificate: str = _opt("", "Certificate file (+tls).")
    password_source: str = _opt(
        "prompt",
        "Where the key password comes from: prompt (+ps), value (+pw), empty (-pw), "
        "file (password_file), credential (systemd credential 'credential_name').",
        choices=("prompt", "value", "empty", "file", "credential"),
    )
    password: str = _opt("", "Key password for password_source = value (+pw).", secret=True)
    password_file: str = _opt("", "File whose first line is the key password.")
    credential_name: str = _opt(
        "dcmrecvd-key-password", "systemd credential (LoadCredential=) holding the password."
    )
    key_format: str = _opt("pem", "Key and certificate format (-pem, -der).", choices=("pem", "der"))
    ca_files: list[str] = _opt([], "Trusted certificate files (+cf).")
    ca_dirs: list[str] = _opt([], "Directories of trusted certificates (+cd).")
    crl_files: list[str] = _opt([], "Certificate revocation list files (+crl).")
    crl_check: str = _opt(
        "none", "CRL checking: none, leaf (+crv) or chain (+cra).", choices=("none", "leaf", "chain")
    )
    profile: str = _opt(
        "bcp195-rfc8996", "Security profile (+pg +pm +py +px +pz +pb +pa +pn).", choices=TLS_PROFILES
    )
    ciphers: list[str] = _opt([], "Additional cipher suites (+cs).")
    dh_params: str = _opt("", "DH parameters file (+dp).")
    expect_sni: str = _opt("", "Server name to expect in SNI; empty: no SNI (--no-sni).")
    seed_file: str = _opt("", "Accepted for compatibility (+rs); Python's ssl seeds itself.")
    write_seed: bool = _opt(False, "Accepted for compatibility (+ws).")
    write_seed_file: str = _opt("", "Accepted for compatibility (+wf).")
    peer_cert: str = _opt(
        "require",
        "Peer authentication: require (-rc), verify if present (-vc), ignore (-ic).",
        choices=("require", "verify", "ignore"),
    )


@dataclass(frozen=True)
class AccessConfig:
    """Who may send: rules on calling AE title, called AE title and source address."""

    default: str = _opt(
        "allow",
        "What happens when no rule matches: allow (dcmrecv's behaviour) or deny.",
        choices=("allow", "deny"),
    )
    rule: list[dict[str, Any]] = _opt(
        [],
        "Rules ([[access.rule]] tables), the first that matches decides: action = 'allow' | "
        "'deny'; calling_aet, called_aet = glob patterns (exact, case-sensitive, trailing "
        "spaces ignored); from = IPv4/IPv6 networks, e.g. ['10.1.0.0/16', '2001:db8::/32']. "
        "A rule's fields are ANDed; an absent field matches anything. Reloadable (SIGHUP).",
        parse=check_rules,
    )


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics, health probes and HAProxy's agent check (all off by default)."""

    listen: str = _opt(
        "",
        "host:port of the HTTP listener for /metrics (Prometheus), /livez and /readyz; empty: off.",
        parse=_listen_or_empty,
        restart=True,
    )
    agent_listen: str = _opt(
        "",
        "host:port of the HAProxy agent-check responder (up, drain, maint); empty: off.",
        parse=_listen_or_empty,
        restart=True,
    )
    agent_weight: bool = _opt(
        False, "Append a weight (NN%) from the free association slots to the agent's 'up'."
    )
    drain_notice: int = _opt(
        2,
        "With agent_listen set: on SIGTERM, seconds during which the agent already says drain "
        "but new associations are still accepted, so that HAProxy (agent-inter) stops sending "
        "before the port closes. Then the usual drain (daemon.drain_timeout) follows.",
        minimum=0,
        maximum=300,
    )


@dataclass(frozen=True)
class DaemonConfig:
    """Service lifecycle settings with no dcmrecv counterpart."""

    drain_timeout: int = _opt(
        30,
        "On SIGTERM, seconds to let associations in flight finish before aborting them.",
        minimum=0,
    )
    pidfile: str = _opt("", "Pidfile for --daemon mode.")
    state_directory: str = _opt(
        "",
        "Where the receiver keeps its state (the ack journal, the instance index, the event "
        "outbox, Storage Commitment, the quarantine), never among the objects. Empty: "
        "$STATE_DIRECTORY under systemd (the packaged service: /var/lib/dcmrecvd/state), else "
        "$XDG_STATE_HOME/dcmrecvd/<output name>-<hash of the output path> (~/.local/state when "
        "XDG_STATE_HOME is unset). It belongs to one output directory: another one is refused.",
        restart=True,
    )


def check_amqp_url(url: str) -> str:
    """amqp:// or amqps://, and no password in it (password_file or password_credential)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if url and parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"'{url}' is not an amqp:// or amqps:// URL")
    if parts.password is not None:
        raise ValueError(
            "no password in the URL (it would be shown): use password_file or password_credential"
        )
    return url


@dataclass(frozen=True)
class AmqpConfig:
    """``[events.amqp]``: every event published to RabbitMQ, with publisher confirms."""

    url: str = _opt(
        "",
        "Broker URL, e.g. amqp://mq.example:5672/%2F (empty: off); no password in it.",
        parse=check_amqp_url,
    )
    user: str = _opt("", "User name (empty: the URL's, or RabbitMQ's guest).")
    password_file: str = _opt("", "File whose first line is the password.")
    password_credential: str = _opt(
        "", "systemd credential holding the password (LoadCredential=NAME:/path)."
    )
    exchange: str = _opt("dcmrecvd", "Topic exchange the events go to (declared durable).")
    routing_key: str = _opt("{event}.{called_aet}", "Routing key, with the hooks' {placeholders}.")
    queue: str = _opt("", "A queue to declare and bind to every event (empty: none; bind your own).")
    quorum: bool = _opt(True, "Declare that queue as a quorum queue (replicated, for fleets).")


@dataclass(frozen=True)
class EventsConfig:
    """What happens after the ack: the event outbox and series/study completion."""

    database: str = _opt(
        "",
        "The SQLite event outbox. Empty: events.sqlite in daemon.state_directory. Used when "
        "[[hooks]], [events.amqp] or [[forward]] are configured.",
        restart=True,
    )
    stable_seconds: int = _opt(
        60,
        "A series or study is complete after this many seconds without a new object (per "
        "called AE, calling AE and Study Instance UID).",
        minimum=1,
        maximum=86400,
    )
    max_seconds: int = _opt(
        3600,
        "...or at the latest this many seconds after its first object, even if objects keep coming.",
        minimum=1,
        maximum=604800,
    )
    complete_on_stop: bool = _opt(
        False,
        "On SIGTERM, declare every pending series and study complete at once (otherwise they "
        "wait in the outbox and complete after the restart).",
    )


#: Event kinds a hook can be for.
EVENT_KINDS = (
    "object.stored",
    "series.complete",
    "series.updated",
    "study.complete",
    "study.updated",
    "commitment.requested",
    "commitment.reported",
    "commitment.undeliverable",
    "object.duplicate",
    "object.quarantined",
)
#: Placeholders a hook's exec items may hold, e.g. {path}.
EVENT_FIELDS = (
    "version",
    "event",
    "called_aet",
    "calling_aet",
    "peer",
    "sop_class_uid",
    "sop_instance_uid",
    "study_uid",
    "series_uid",
    "patient_id",
    "path",
    "directory",
    "size",
    "transfer_syntax",
    "time",
    "objects",
    "recovered",
    "transaction_uid",
    "items",
    "failed",
    "reason",
    "policy",
    "outcome",
    "first_path",
    "intended_path",
    "quarantine",
)


def check_exec_item(item: str) -> str:
    """One item of a hook's argv: its {placeholders} must be known event fields."""
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(item) if name is not None]
    except ValueError as exc:
        raise ValueError(f"bad placeholder in {item!r}: {exc}") from None
    for name in names:
        if name not in EVENT_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} in {item!r}; known: {', '.join(EVENT_FIELDS)}")
    return item


def check_kind(kind: str) -> str:
    if kind not in EVENT_KINDS:
        raise ValueError(f"'{kind}' is not an event kind ({', '.join(EVENT_KINDS)})")
    return kind


@dataclass(frozen=True)
class HookConfig:
    """One ``[[hooks]]`` table: a program run for each event of the kinds in ``on``."""

    on: list[str] = _opt(
        ["study.complete"],
        "Event kinds that run the hook (one kind may be written as a string).",
        parse=check_kind,
        one_or_many=True,
    )
    exec: list[str] = _opt(
        [],
        "The program and its arguments (no shell); {placeholders} are replaced item by item, "
        'e.g. ["/usr/bin/dcmsend", "pacs.example", "104", "{path}"] on object.stored.',
        parse=check_exec_item,
    )
    name: str = _opt("", "For logs, STATUS and metrics (default hook1, hook2, ... in file order).")
    timeout: int = _opt(300, "Seconds a run may take; then it is killed and counts as failed.", minimum=1)
    concurrency: int = _opt(
        1, "Runs at once (events of one study always run in order).", minimum=1, maximum=64
    )
    retries: int = _opt(5, "Runs after the first one fails; then the event is dead-lettered.", minimum=0)
    backoff: int = _opt(10, "Seconds before the first retry; doubled each time, at most 1 hour.", minimum=1)


@dataclass(frozen=True)
class Config:
    """The whole effective configuration, one field per TOML table."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    #: ``[[commitment.peer]]`` (an array inside [commitment]; a later file's list replaces).
    commitment_peers: tuple[CommitmentPeerConfig, ...] = field(default=(), metadata={"table": False})
    #: ``[[hooks]]``: programs run after the ack (see ``hooks``); an array, so a later file's
    #: list replaces an earlier one's.
    hooks: tuple[HookConfig, ...] = field(default=(), metadata={"table": False})
    #: ``[[forward]]``: destinations acknowledged objects are delivered to (see ``events.forward``).
    forward: tuple[ForwardConfig, ...] = field(default=(), metadata={"table": False})
    #: ``[events.amqp]`` (a table inside [events]).
    amqp: AmqpConfig = field(default_factory=AmqpConfig, metadata={"table": False})
    #: ``[ae.<TITLE>]``: per called AE title, the keys of association, output and access
    #: that differ from the tables above (see ``receiver_tables``).
    ae: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict, metadata={"table": False})
    #: Which file set each dotted key (for messages such as "rule 2 of 10-access.toml");
    #: not a table, not compared.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, metadata={"table": False})
    #: Keys read under an old name ("forward[1].called_aet -> ae_title"), warned about at start.
    renamed: tuple[str, ...] = field(default=(), compare=False, metadata={"table": False})


def receiver_tables(config: Config, title: str) -> tuple[AssociationConfig, OutputConfig, AccessConfig]:
    """The association, output and access tables of AE ``title`` (its overrides on the defaults)."""
    overrides = config.ae.get(title, {})
    return (
        dataclasses.replace(config.association, **overrides.get("association", {})),
        dataclasses.replace(config.output, **overrides.get("output", {})),
        dataclasses.replace(config.access, **overrides.get("access", {})),
    )


#: The tables below the top level, in documentation order (see ``sub_tables``).
SUB_TABLES: tuple[SubTable, ...] = (
    SubTable(
        "events.amqp",
        "amqp",
        AmqpConfig,
        array=False,
        about=(
            "Every event (the kinds above) published to a RabbitMQ topic exchange as a persistent "
            "JSON message, with publisher confirms: an event leaves the outbox only when the "
            "broker confirmed it. While the broker is down events wait in the outbox (STATUS "
            "counts them) and receiving goes on. The password is read from password_file or a "
            "systemd credential and never shown; a URL with a password is refused."
        ),
    ),
    SubTable(
        "commitment.peer",
        "commitment_peers",
        CommitmentPeerConfig,
        array=True,
        about=(
            "An AE that may ask for Storage Commitment (ae_title: the calling AE of its N-ACTION), "
            "and where its report (N-EVENT-REPORT, on an association dcmrecvd opens) goes. An "
            "N-ACTION from an AE without a table is refused 0x0110 with an Error Comment. The "
            "first keys are those of every remote AE, as in [[forward]]."
        ),
        intro=(
            "# [[commitment.peer]]: an AE that may ask for Storage Commitment, and where its",
            "# report goes (one table per AE; none by default: every N-ACTION is refused 0x0110).",
        ),
        example=CommitmentPeerConfig(ae_title="MODALITY1", host="192.0.2.10", port=104),
        unique="ae_title",
        check=check_peer,
    ),
    SubTable(
        "forward",
        "forward",
        ForwardConfig,
        array=True,
        about=(
            "A destination every acknowledged object (or those match selects) is delivered to by "
            "C-STORE, after the ack, from the stored file as it is. A consumer of the event outbox: "
            "at least once across kill -9, power loss and outages, duplicates possible, a local "
            "file never deleted. Per (called AE, calling AE, study) in receive order; studies in "
            "parallel up to max_associations. Outcomes: 0x0000 and warnings delivered; 0x0111 per "
            "duplicate_status; 0xA7xx, 0x0213, 0x0110, refused or reset connections, transient "
            "rejections, aborts and timeouts retried with backoff (a connection failure rests the "
            "whole destination), then a dead letter after give_up_after; 0xA9xx, 0xCxxx, 0x0122, "
            "other failures and an unaccepted SOP class or transfer syntax a dead letter for that "
            "object; a permanent rejection or 0x0124 pauses the destination (probed every "
            "backoff_max). See dcmrecvd forward in dcmrecvd(8)."
        ),
        intro=(
            "# [[forward]]: a destination acknowledged objects are delivered to, after the ack,",
            "# with retries, dead letters and pauses (none by default; see dcmrecvd.toml(5)).",
        ),
        example=ForwardConfig(name="pacs", host="pacs.example", port=104, ae_title="PACS"),
        unique="name",
        check=check_destination,
        parsers={"match": lambda value: parse_match(value, lambda k: tag_for_keyword(k) is not None)},
        shown={"match": '#match = { Modality = ["CT", "MR"], calling_aet = "CT*" }'},
        lead=("name", "on", "type", "match"),
    ),
    SubTable(
        "hooks",
        "hooks",
        HookConfig,
        array=True,
        about=(
            "Programs run after the ack, off the receiving path, one table per program. Each "
            "acknowledged object becomes an object.stored event in the outbox (events.database); "
            "a series or study is complete after events.stable_seconds without a new object "
            "(events.max_seconds at the latest), and an object after that makes an update event "
            f"instead of a second completion. Event kinds: {', '.join(EVENT_KINDS)}. "
            "At least once: an object's event is part of its ack-journal record, and after a "
            "crash the records past the journal's checkpoint hand theirs on again, so "
            "duplicates are possible and none is missing (on the per-file path an event not "
            "yet written when the process dies is lost). "
            "exec is run without a shell; its items may hold placeholders "
            f"({', '.join('{' + n + '}' for n in EVENT_FIELDS)}), each replaced within "
            "its item; the event is also on stdin as JSON and in DCMRECVD_<FIELD> variables. "
            "Events of one study run in order; a failed run is retried (backoff doubling), "
            "then dead-lettered (hook.failed, STATUS, dcmrecvd_events_dead). Every body has "
            "version (the contract's, now 1) and time in one format: local time with its UTC "
            "offset, to the microsecond (2026-12-08T09:30:00.123456+01:00)."
        ),
        intro=(
            "# [[hooks]]: a program run for each event of the kinds in `on` (none by default).",
            f"# Kinds: {', '.join(EVENT_KINDS)}.",
            f"# Placeholders in exec: {', '.join('{' + name + '}' for name in EVENT_FIELDS)}.",
            "# The event is also on stdin (JSON) and in DCMRECVD_* variables. No shell is involved.",
        ),
        example=HookConfig(on=["object.stored"], exec=["/usr/bin/dcmsend", "pacs.example", "104", "{path}"]),
        check=lambda row: (
            ""
            if row.get("exec") and row["exec"][0]
            else 'exec: names no program (exec = ["/path/to/program", ...])'
        ),
        complete=lambda i, row: row if row.get("name") else {**row, "name": f"hook{i}"},
    ),
)


def restart_keys() -> list[tuple[str, str]]:
    """(table, key) of every setting declared ``restart=True``: a reload keeps its running value."""
    return [
        (section, f.name)
        for section, cls in sections().items()
        for f in dataclasses.fields(cls)
        if f.metadata.get("restart")
    ]


def sections() -> dict[str, type]:
    """TOML table name -> dataclass, in documentation order."""
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(Config)
        if f.metadata.get("table", True)
    }


def all_keys() -> list[str]:
    """Every dotted key the schema knows, e.g. ``network.port``."""
    return [f"{s}.{f.name}" for s, cls in sections().items() for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------- layering


@dataclass(frozen=True)
class Layer:
    """One source of settings: where it came from and its nested mapping."""

    source: str
    data: Mapping[str, Any]


def discover_files(config_dir: Path, extra: Path | None) -> list[Path]:
    """The files that make up the configuration, lowest precedence first."""
    files: list[Path] = []
    main = config_dir / MAIN_FILE_NAME
    if main.is_file():
        files.append(main)
    dropins = config_dir / DROPIN_DIR_NAME
    if dropins.is_dir():
        files.extend(sorted(p for p in dropins.glob("*.toml") if p.is_file()))
    if extra is not None:
        files.append(extra)
    return files


def read_layer(path: Path) -> Layer:
    """Parse one TOML file; any failure names the file."""
    try:
        with path.open("rb") as fh:
            return Layer(str(path), tomllib.load(fh))
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file") from None
    except OSError as exc:
        raise ConfigError(str(path), "", exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None


def default_config_dir(environ: Mapping[str, str]) -> Path:
    """``/etc/dcmrecvd`` unless ``$DCMRECVD_CONFIG_DIR`` says otherwise."""
    return Path(environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def load(
    *,
    config_dir: Path | None = None,
    extra_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read every layer, merge them and validate the result as a whole."""
    env = os.environ if environ is None else environ
    directory = config_dir if config_dir is not None else default_config_dir(env)
    layers = [read_layer(p) for p in discover_files(directory, extra_file)]
    if overrides:
        layers.append(Layer(COMMAND_LINE, overrides))
    return build(layers)


@dataclass
class Loader:
    """Re-reads every config layer the same way the first start did."""

    config_dir: Path | None
    extra_file: Path | None
    overrides: Mapping[str, object]
    environ: Mapping[str, str]

    def __call__(self) -> Config:
        return load(
            config_dir=self.config_dir,
            extra_file=self.extra_file,
            overrides=dict(self.overrides),
            environ=self.environ,
        )


def build(layers: Iterable[Layer]) -> Config:
    """Validate each layer against the schema, merge in order, freeze."""
    merged: dict[str, dict[str, Any]] = {}
    aes: dict[str, dict[str, dict[str, Any]]] = {}
    subs: dict[str, Any] = {}
    origins: dict[str, str] = {}
    notes: list[str] = []
    declared = {t.path: t for t in SUB_TABLES}
    for layer in layers:
        for section, values in validate_layer(layer, notes).items():
            table = declared.get(section)
            if table is not None and table.array:  # an array: the later file's list replaces
                subs[section] = values
                origins[section] = layer.source
                continue
            if section == "ae":  # per title, per table: tables merge, values replace
                for title, tables in values.items():
                    for name, per in tables.items():
                        aes.setdefault(title, {}).setdefault(name, {}).update(per)
                        origins.update({f"ae.{title}.{name}.{key}": layer.source for key in per})
                continue
            merged.setdefault(section, {}).update(values)
            origins.update({f"{section}.{name}": layer.source for name in values})
    config = Config(
        **{s: cls(**merged.get(s, {})) for s, cls in sections().items()},
        **{t.attribute: t.build(subs.get(t.path) if t.array else merged.get(t.path)) for t in SUB_TABLES},
        ae=aes,
        origins=origins,
        renamed=tuple(notes),
    )
    check_combinations(config)
    return config


#: The tables an ``[ae.<TITLE>]`` may override for the associations called by that title.
AE_SECTIONS = ("association", "output", "access")


def _validate_aes(source: str, table: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """``[ae.<TITLE>.<section>]`` tables: a valid AE title, only AE_SECTIONS, their keys checked."""
    if not isinstance(table, Mapping):
        raise ConfigError(source, "ae", "must be a table of AE titles ([ae.TITLE.output] ...)")
    schema = sections()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for title, per_title in table.items():
        if not (
            0 < len(title) <= 16 and title == title.strip() and title.isprintable() and "\\" not in title
        ):
            raise ConfigError(source, f"ae.{title}", "not an AE title (1-16 characters, no backslash)")
        if not isinstance(per_title, Mapping):
            raise ConfigError(source, f"ae.{title}", "must be a table")
        out[title] = {}
        for section, values in per_title.items():
            if section not in AE_SECTIONS:
                raise ConfigError(
                    source, f"ae.{title}.{section}", f"an AE can override only {', '.join(AE_SECTIONS)}"
                )
            out[title][section] = validate_table(source, f"ae.{title}.{section}", schema[section], values)
    return out


def validate_layer(layer: Layer, notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Check one layer's tables and values; return a normalised copy (sub-tables under their
    dotted path).  ``notes`` gets the keys read under an old name."""
    schema = sections()
    said: list[str] = [] if notes is None else notes
    result: dict[str, Any] = {}
    data = dict(layer.data)
    for sub in SUB_TABLES:  # taken out of their parent table first
        parent = data.get(sub.parent) if sub.parent else data
        if isinstance(parent, Mapping) and sub.key in parent:
            result[sub.path] = sub.validate(layer.source, parent[sub.key], said)
            if sub.parent:
                data[sub.parent] = {k: v for k, v in parent.items() if k != sub.key}
            else:
                del data[sub.key]
    for section, table in data.items():
        if section == "ae":
            result["ae"] = _validate_aes(layer.source, table)
            continue
        if section not in schema:
            raise ConfigError(layer.source, section, "unknown table" + suggest(section, schema))
        result[section] = validate_table(layer.source, section, schema[section], table)
    return result


def bit_preserving_conflict(mode: str, subdirectory: str) -> bool:
    """dcmrecv's rule: +B (write the bytes as received) cannot go with +ssd (which must
    read the dataset to find its directory).  The one statement of it: the command line,
    the top-level tables and each [ae.<TITLE>] ask here."""
    return mode == "bit-preserving" and subdirectory == "series-date"


def _layout_conflict(output: OutputConfig) -> str:
    """What dcmrecv naming option is set along with output.layout ("" when none)."""
    if not output.layout:
        return ""
    for key, default in (("subdirectory", "none"), ("filenames", "default"), ("extension", "")):
        if getattr(output, key) != default:
            return key
    return ""


def _duplicates_conflict(output: OutputConfig) -> tuple[str, str]:
    """Why output's duplicate settings cannot work: (key, reason), or ("", "")."""
    if output.mode == "ignore":
        return "", ""
    if output.duplicate_identity == "instance":
        if not output.fsync:
            return "duplicate_identity", "'instance' looks instances up in the ack journal's index: " + (
                "it needs journal.enabled = true and output.fsync = true"
            )
        return "", ""
    if output.duplicates == "overwrite":
        return "", ""
    unique = output.filenames != "default" or (output.layout and layout.parse(output.layout).unique)
    if unique:
        return "duplicates", (
            f"'{output.duplicates}' with duplicate_identity = 'path' needs names made from the instance "
            "(filenames = 'default', or a layout without {uuid}): these names never repeat; "
            "use duplicate_identity = 'instance'"
        )
    return "", ""


def journal_needed(config: Config) -> list[tuple[str, str]]:
    """The settings that rely on the ack journal, each with why: (key, reason).

    One list for both refusals, so that a journal turned off (journal.enabled) and a
    journal that cannot work where it is (tmpfs, no O_DIRECT) give the same error."""
    needs: list[tuple[str, str]] = []
    outputs = [("output", config.output)]
    outputs += [(f"ae.{title}.output", receiver_tables(config, title)[1]) for title in config.ae]
    for prefix, output in outputs:
        if output.mode != "ignore" and output.duplicate_identity == "instance":
            needs.append(
                (f"{prefix}.duplicate_identity", "'instance' looks instances up in the ack journal's index")
            )
    if config.commitment.enabled:
        needs.append(
            ("commitment.enabled", "Storage Commitment answers from the ack journal's instance index")
        )
    if config.forward and config.output.fsync:
        needs.append(
            (
                "forward",
                "forwarding is at-least-once across a crash only when the object and its event are "
                "durable together, in the ack journal (or set output.fsync = false)",
            )
        )
    return needs


def check_combinations(config: Config) -> None:
    """Rules that involve more than one key (dcmrecv checks them on its command line)."""
    key, reason = _duplicates_conflict(config.output)
    if key:
        raise ConfigError("configuration", f"output.{key}", reason)
    conflict = _layout_conflict(config.output)
    if conflict:
        raise ConfigError(
            "configuration", "output.layout", f"output.{conflict} (dcmrecv's naming) cannot be set with it"
        )
    if bit_preserving_conflict(config.output.mode, config.output.subdirectory):
        raise ConfigError(
            "configuration",
            "output.mode",
            "--bit-preserving not allowed with --series-date-subdir "
            "(output.mode = 'bit-preserving' with output.subdirectory = 'series-date')",
        )
    if config.association.profile and not config.association.config_file:
        raise ConfigError("configuration", "association.config_file", "a profile needs a config_file")
    if config.commitment.enabled and not config.output.fsync:
        raise ConfigError(
            "configuration",
            "commitment.enabled",
            "Storage Commitment answers from the ack journal's instance index: it needs "
            "output.fsync = true and journal.enabled = true",
        )
    if not config.journal.enabled:
        for key, reason in journal_needed(config):
            raise ConfigError("configuration", key, f"{reason}: it needs journal.enabled = true")
    for title in config.ae:
        association, output, _ = receiver_tables(config, title)
        if bit_preserving_conflict(output.mode, output.subdirectory):
            raise ConfigError(
                "configuration", f"ae.{title}.output.mode", "bit-preserving not allowed with series-date"
            )
        conflict = _layout_conflict(output)
        if conflict:
            raise ConfigError(
                "configuration", f"ae.{title}.output.layout", f"output.{conflict} cannot be set with it"
            )
        key, reason = _duplicates_conflict(output)
        if key:
            raise ConfigError("configuration", f"ae.{title}.output.{key}", reason)
        if association.profile and not association.config_file:
            raise ConfigError(
                "configuration", f"ae.{title}.association.config_file", "a profile needs a config_file"
            )


# --------------------------------------------------------------------------- output


def to_mapping(config: Config, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """Nested plain data of ``config``; secrets are left out when ``redact``."""
    out: dict[str, dict[str, Any]] = {}
    for section in sections():
        obj = getattr(config, section)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if redact and f.metadata["secret"]:
                continue
            table[f.name] = getattr(obj, f.name)
        out[section] = table
    for sub in SUB_TABLES:
        value = getattr(config, sub.attribute)
        if sub.array and not value:
            continue
        parent = out.setdefault(sub.parent, {}) if sub.parent else out
        parent[sub.key] = sub.to_mapping(value)
    if config.ae:
        out["ae"] = {
            title: {name: dict(t) for name, t in tables.items()} for title, tables in config.ae.items()
        }
    return out


def to_toml(config: Config) -> str:
    """TOML that, loaded alone, gives ``config`` back (secrets excepted, and said so)."""
    text = tomli_w.dumps(to_mapping(config))
    notes = [
        f"# {s}.{f.name} is set but not printed; supply it again (e.g. from a file).\n"
        for s in sections()
        for f in dataclasses.fields(getattr(config, s))
        if f.metadata["secret"] and getattr(getattr(config, s), f.name)
    ]
    return "".join(notes) + text


#: What the packages set in /etc/dcmrecvd/dcmrecvd.toml on top of the built-in defaults.
PACKAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "network": {"port": 104},
    "association": {"config_file": "/etc/dcmrecvd/storescp.cfg", "profile": "Default"},
    "output": {"directory": "/var/lib/dcmrecvd/incoming"},
    # A service keeps a per-object audit trail in the journal; dcmrecv's own default
    # (warnings only) stays the default on the command line.
    "logging": {"level": "info"},
}


def documented_toml(settings: Mapping[str, Mapping[str, Any]] = PACKAGE_SETTINGS) -> str:
    """The shipped main file: every key and its meaning; ``settings`` active, the rest
    commented out at their built-in defaults."""
    lines = [
        "# dcmrecvd configuration. Every key is shown; commented-out ones have their",
        "# built-in default.",
        "#",
        "# Do not edit this file for local changes: add a drop-in instead, e.g.",
        "#   /etc/dcmrecvd/dcmrecvd.toml.d/50-local.toml",
        "# Drop-ins are read in sorted order after this file; later values win, tables",
        "# merge and arrays replace. Command-line flags (dcmrecv's) win over all files.",
        "# `dcmrecvd --print-config` shows the effective result.",
        "",
    ]
    defaults = to_mapping(Config(), redact=False)
    for section, cls in sections().items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            lines.append(f"# {describe(f)}")
            if f.name in settings.get(section, {}):
                lines.append(tomli_w.dumps({f.name: settings[section][f.name]}).rstrip())
            else:
                dumped = tomli_w.dumps({f.name: defaults[section][f.name]}).rstrip()
                if f.name.endswith("_status") and isinstance(
                    defaults[section][f.name], int
                ):  # DIMSE status reads as hex, and TOML takes it so
                    dumped = f"{f.name} = 0x{defaults[section][f.name]:04X}"
                lines.extend("#" + line for line in dumped.splitlines())  # arrays span lines
        lines.append("")
    for sub in SUB_TABLES:
        lines += [*sub.intro, f"#[[{sub.path}]]" if sub.array else f"[{sub.path}]"]
        shown = sub.example if sub.example is not None else sub.schema()
        for f in sub.documented_fields():
            lines.append(f"# {describe(f)}")
            if f.name in sub.shown:
                lines.append(sub.shown[f.name])
                continue
            dumped = tomli_w.dumps({f.name: getattr(shown, f.name)}).rstrip()
            lines.extend("#" + line for line in dumped.splitlines())
        lines.append("")
    return "\n".join(lines)
