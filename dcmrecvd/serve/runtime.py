"""Config -> a frozen ``Runtime``: everything an association needs, checked up front.

Building a Runtime is the single place where the profile is loaded and the
output directory is checked, so start-up, ``--check-config`` and SIGHUP reload
validate exactly the same way (and fail with the same exit codes).
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom.presentation import PresentationContext

from dcmrecvd.conf.access import Network, Policy, check_network, compile_rules, parse_address
from dcmrecvd.conf.config import AccessConfig, Config, OutputConfig, receiver_tables
from dcmrecvd.errors import OutputDirectoryError, UsageError
from dcmrecvd.ops import logs
from dcmrecvd.serve import naming, tls
from dcmrecvd.serve.duplicates import DuplicatePolicy
from dcmrecvd.store.disk_space import DiskWatch, parse_min_free, watch_directory
from dcmrecvd.store.storage import Store
from dcmrecvd.wire import layout, negotiation, uids
from dcmrecvd.wire.commitment_codec import SOP_CLASS as STORAGE_COMMITMENT
from dcmrecvd.wire.profiles import VERIFICATION_ONLY, Profile, load_profile, with_context, with_verification


@dataclass(frozen=True)
class Receiver:
    """One logical receiver: the default AE, or an ``[ae.<TITLE>]`` chosen by the called AE title."""

    name: str  # for logs and metrics: the AE title, or the default AE's -aet, or "*"
    title: str  # the AE title it answers to; "" for the default AE (network.ae_title applies)
    profile: Profile
    contexts: list[PresentationContext]
    scheme: naming.NamingScheme
    store: Store
    disk: DiskWatch
    access: Policy
    mode: str  # output.mode: normal, bit-preserving, ignore
    duplicates: DuplicatePolicy = DuplicatePolicy()


@dataclass(frozen=True)
class Runtime:
    """Settings frozen for the associations that start under them."""

    config: Config
    #: The default AE (the top-level tables), and the ``[ae.<TITLE>]`` ones by title.
    default: Receiver
    receivers: Mapping[str, Receiver] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    generation: int = 0
    proxies: tuple[Network, ...] = ()

    @property
    def profile(self) -> Profile:
        """The default AE's association profile."""
        return self.default.profile

    @property
    def store(self) -> Store:
        """The default AE's output directory."""
        return self.default.store

    def receiver_for(self, called: str) -> Receiver:
        """The AE an A-ASSOCIATE-RQ calls: its own table by exact title, else the default AE
        (whose network.ae_title, when set, then rejects a title it does not answer to)."""
        return self.receivers.get(called.rstrip(" "), self.default)

    def all_receivers(self) -> list[Receiver]:
        return [self.default, *self.receivers.values()]

    def trusts_proxy(self, host: str) -> bool:
        """May ``host`` send us a PROXY header (network.trusted_proxies)?"""
        address = parse_address(host)
        return address is not None and any(
            address.version == n.version and address in n for n in self.proxies
        )


@dataclass
class Stats:
    """Live figures for STATUS= and the logs (updated from association threads)."""

    active: int = 0
    associations: int = 0
    stored: int = 0
    bytes: int = 0
    failed: int = 0
    rejected: int = 0
    last_reload: str = "none"
    disk_low: bool = False
    #: The outbox (when hooks are configured): deliveries waiting, and dead-lettered ones.
    events: dict[str, int] | None = None
    #: Objects stored per named AE ([ae.<TITLE>]); shown on the STATUS line when there are any.
    stored_by_ae: dict[str, int] = field(default_factory=dict)
    #: Storage Commitment reports not yet delivered (None: not enabled).
    commitment_pending: int | None = None
    #: Objects waiting for a forward destination, all destinations together.
    forward_backlog: int = 0
    #: Why new objects are refused now, from the ack journal ("" when they are not): read by
    #: admission for every association, shown first on the STATUS line.
    refusing: Callable[[], str] = field(default=lambda: "", repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add to counters atomically."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def stored_for(self, ae: str) -> None:
        """One more object stored by the named AE ``ae``."""
        with self.lock:
            self.stored_by_ae[ae] = self.stored_by_ae.get(ae, 0) + 1

    def status_line(self) -> str:
        """One human line for systemd's STATUS=."""
        by_ae = ", ".join(f"{ae} {n}" for ae, n in sorted(self.stored_by_ae.items()))
        line = (
            f"{self.active} active, {self.associations} associations, {self.stored} stored "
            f"({self.bytes / 1e6:.1f} MB{'; ' + by_ae if by_ae else ''}), {self.failed} failed; "
            f"last reload: {self.last_reload}"
        )
        if self.events is not None:
            line += f"; events: {self.events['pending']} pending, {self.events['dead']} dead"
        if self.commitment_pending is not None:
            line += f"; commitment: {self.commitment_pending} reports pending"
        if self.forward_backlog:
            line += f"; forwarding: {self.forward_backlog} waiting"
        if refusing := self.refusing():
            line = f"{refusing}, refusing new objects; {line}"
        return "disk below output.min_free, refusing new objects; " + line if self.disk_low else line


def check_output_directory(directory: str) -> Path:
    """The output directory must exist and be a directory (dcmrecv's exit 45)."""
    path = Path(directory)
    if not path.exists():
        raise OutputDirectoryError(f"specified output directory does not exist: {directory}")
    if not path.is_dir():
        raise OutputDirectoryError(f"specified output directory is not a directory: {directory}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirectoryError(f"specified output directory is not writable: {directory}")
    return path.resolve()


def load_association_profile(config: Config) -> Profile:
    """The configured profile (exit 66 on problems) or dcmrecv's Verification-only default."""
    assoc = config.association
    profile = (
        with_verification(load_profile(assoc.config_file, assoc.profile))
        if assoc.config_file
        else VERIFICATION_ONLY
    )
    if config.commitment.enabled:  # accepted with every profile, as Verification is
        profile = with_context(profile, STORAGE_COMMITMENT)
    return profile


def prepare(
    config: Config,
    generation: int = 0,
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> Runtime:
    """Validate in dcmrecv's order and freeze: the one pass every start, --check-config and
    SIGHUP go through (command line and values 1, profile 66, directory 45, TLS 71; the
    listener, 64, comes after)."""
    out = config.output
    for note in config.renamed:  # an old key name: read, and said, until the file is edited
        warn(f"renamed key {note}")
    try:
        naming.check_extension(out.extension)
    except uids.UnsafeIdentifier as exc:
        raise UsageError(str(exc)) from None
    if config.logging.config_file:  # -lc: a bad file is a command-line error, before all else
        logs.read_dcmtk_logger_config(config.logging.config_file)
    profile = load_association_profile(config)
    titles = sorted(config.ae)
    tables = {title: receiver_tables(config, title) for title in titles}
    for _association, ae_output, _access in tables.values():
        try:
            naming.check_extension(ae_output.extension)
        except uids.UnsafeIdentifier as exc:
            raise UsageError(str(exc)) from None
    profiles = {
        title: load_association_profile(dataclasses.replace(config, association=tables[title][0]))
        for title in titles
    }
    root = check_output_directory(out.directory)
    roots = {title: check_output_directory(tables[title][1].directory) for title in titles}
    disk = watch_directory(str(root), parse_min_free(out.min_free))
    context = tls.build_context(config.tls, environ, warn=warn) if config.tls.enabled else None
    receivers = {
        title: _receiver(config, title, profiles[title], roots[title], tables[title][1], tables[title][2])
        for title in titles
    }
    default = _receiver(config, "", profile, root, out, config.access, disk)
    return Runtime(
        config=config,
        default=default,
        receivers=receivers,
        tls=context,
        generation=generation,
        proxies=tuple(check_network(text) for text in config.network.trusted_proxies),
    )


def _receiver(
    config: Config,
    title: str,
    profile: Profile,
    root: Path,
    output: OutputConfig,
    access: AccessConfig,
    disk: DiskWatch | None = None,
) -> Receiver:
    rules_key = f"ae.{title}.access.rule" if title else "access.rule"
    return Receiver(
        name=title or config.network.ae_title or "*",
        title=title,
        profile=profile,
        contexts=negotiation.acceptor_contexts(profile),
        scheme=naming.NamingScheme(
            output.subdirectory,
            output.filenames,
            output.extension,
            layout.parse(output.layout) if output.layout else None,
            output.layout_missing,
        ),
        store=Store(root, durable=output.fsync),
        disk=disk or watch_directory(str(root), parse_min_free(output.min_free)),
        access=Policy(
            default_allow=access.default == "allow",
            rules=compile_rules(access.rule),
            source=config.origins.get(rules_key, config.origins.get("access.rule", "")),
        ),
        mode=output.mode,
        duplicates=DuplicatePolicy(output.duplicates, output.duplicate_identity, output.duplicate_status),
    )
