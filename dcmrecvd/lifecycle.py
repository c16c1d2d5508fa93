"""Lifecycle: start -> READY; signals -> the main loop -> reload or drain; STOPPING.

Signals reach the main thread through a wake-up pipe (``signal_inbox``), at
once whichever thread the kernel chose; the main thread does the work.  A
reload builds a complete new Runtime and swaps it in with one assignment:
associations in flight keep the Runtime they started with, new
ones get the new one, and a Runtime that fails to build never replaces the
one serving.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dcmrecvd.conf.config import Config, journal_needed, restart_keys
from dcmrecvd.errors import ConfigError, DcmrecvdError
from dcmrecvd.events.consumers import EventConsumers
from dcmrecvd.events.outbox import Outbox
from dcmrecvd.ops import logs
from dcmrecvd.ops.health import Health, OpsListeners
from dcmrecvd.ops.metrics import METRICS, LiveFigures
from dcmrecvd.ops.systemd import Notifier
from dcmrecvd.serve.ack_journal import AckJournal, open_ack_journal, state_directory
from dcmrecvd.serve.commitment_reports import Reporter, open_commitment
from dcmrecvd.serve.runtime import Runtime, Stats, prepare
from dcmrecvd.serve.server import Server
from dcmrecvd.signal_inbox import SignalInbox
from dcmrecvd.store import state_directory as state_dir
from dcmrecvd.store import storage

log = structlog.get_logger("dcmrecvd")


@dataclass
class Daemon:
    """Owns the current Runtime, the listeners and the server."""

    runtime: Runtime
    loader: Callable[[], Config]
    listeners: list[socket.socket]
    owns_listeners: bool
    notifier: Notifier
    environ: Mapping[str, str] = field(default_factory=dict)
    #: The log format chosen at start for "auto" (journal, console...), kept across reloads.
    log_format: str = "auto"
    stats: Stats = field(default_factory=Stats)
    signals: SignalInbox | None = None
    server: Server | None = None
    ops: OpsListeners | None = None
    #: Set on SIGTERM: probes and the agent say so while associations drain.
    draining: bool = False
    #: The event outbox and its consumers (hooks, AMQP, forwarding), from the first
    #: configuration with one on.
    events: EventConsumers = field(init=False)
    #: The ack journal (None: the per-file path, said at start with the reason).
    ack: AckJournal | None = None
    #: Storage Commitment's reporter, from the first configuration that enables it.
    reporter: Reporter | None = None

    def __post_init__(self) -> None:
        self.events = EventConsumers(self.environ)

    def current(self) -> Runtime:
        """The Runtime new associations get (read once per association)."""
        return self.runtime

    # ------------------------------------------------------------------ start

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        self.signals = SignalInbox((signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
        config = self.runtime.config
        state_dir.prepare(state_directory(config, self.environ), Path(config.output.directory))
        self.ack, replay, no_journal = open_ack_journal(config, self.environ)
        if self.ack is not None:
            ack = self.ack
            self.stats.refusing = lambda: ack.failing
        watchdog = self.notifier.watchdog_usec / 2e6 if self.notifier.watchdog_usec else 0.0
        self.server = Server(
            self.listeners,
            self.current,
            self.stats,
            heartbeat=self.notifier.watchdog if watchdog else None,
            heartbeat_interval=watchdog,
            ack=self.ack,
        )
        self._apply_hooks(self.runtime)
        if self.ack is not None:  # recovery: before the socket is served and before READY
            self.ack.recover(replay)
        self._apply_commitment(self.runtime)
        self._remove_stale_temp_files(self.runtime)
        metrics = self.runtime.config.metrics
        if metrics.listen or metrics.agent_listen:  # bound before READY: a busy port is exit 64
            self.ops = OpsListeners(
                metrics.listen,
                metrics.agent_listen,
                exposition=METRICS.exposition,
                health=self.health,
                agent_weight=metrics.agent_weight,
            )
            METRICS.watch(self.live_figures)
        # The listeners are bound (or adopted) already, so the kernel queues early
        # connections: announcing readiness first keeps the log in causal order.
        _log_ready(self.runtime, self.listeners, self.ack, no_journal)
        self.notifier.ready(self.stats.status_line())
        self.server.start()
        if self.ops is not None:
            self.ops.start()
        return self._main_loop()

    # ------------------------------------------------------------------ probes

    def health(self) -> Health:
        """What /livez, /readyz and the agent check report (called on their threads)."""
        runtime = self.runtime
        server = self.server
        receivers = runtime.all_receivers()
        room = all([rx.disk.has_room() for rx in receivers])  # every AE's directory, each re-read
        interval = max(5.0, 3 * (server.heartbeat_interval if server else 0.0))
        forward = self.events.forward_figures()
        return Health(
            alive=server is not None and time.monotonic() - server.turned < interval,
            listening=server is not None and server.listening,
            draining=self.draining,
            usable=all(rx.disk.usable and os.access(rx.store.root, os.W_OK | os.X_OK) for rx in receivers),
            disk_low=not room,
            active=self.stats.active,
            capacity=runtime.config.network.max_associations,
            forward_waiting=sum(f[0] for f in forward.values()),
            forward_oldest=max((f[1] for f in forward.values()), default=0.0),
            forward_paused=tuple(sorted(name for name, f in forward.items() if f[2])),
            failing=self.ack.failing if self.ack is not None else "",
        )

    def live_figures(self) -> LiveFigures:
        """The gauges a scrape reads now."""
        runtime = self.runtime
        waiting, oldest = self.reporter.figures() if self.reporter is not None else (None, 0.0)
        return LiveFigures(
            active=self.stats.active,
            pending=self.server.pending if self.server else 0,
            free_bytes={str(rx.store.root): rx.disk.free_bytes() for rx in runtime.all_receivers()},
            disk_low=any(rx.disk.low for rx in runtime.all_receivers()),
            draining=self.draining,
            materialise_failing=bool(self.ack is not None and self.ack.failing),
            materialise_waiting=self.ack.waiting() if self.ack is not None else 0,
            commitment_pending=waiting,
            commitment_oldest_seconds=oldest,
            forward=self.events.forward_figures(),
            **(
                {"events_pending": counts["pending"], "events_dead": counts["dead"]}
                if (counts := self.events.counts())
                else {}
            ),
        )

    def _main_loop(self) -> int:
        status_every = 5.0
        last_status = ""
        next_status = time.monotonic() + status_every
        assert self.signals is not None
        while True:
            signum = self.signals.wait(next_status - time.monotonic())
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                return self.stop()
            if time.monotonic() >= next_status:
                receivers = self.runtime.all_receivers()
                for rx in receivers:  # re-reads free space now and then: disk.low / disk.ok
                    rx.disk.has_room()
                self.stats.disk_low = any(rx.disk.low for rx in receivers)
                if self.events.outbox is not None:
                    self.stats.events = self.events.counts()
                    self.stats.forward_backlog = sum(f[0] for f in self.events.forward_figures().values())
                if self.reporter is not None:
                    self.stats.commitment_pending = self.reporter.figures()[0]
                line = self.stats.status_line()
                if line != last_status:
                    self.notifier.status(line)
                    last_status = line
                next_status = time.monotonic() + status_every

    def _remove_stale_temp_files(self, runtime: Runtime) -> None:
        for root in dict.fromkeys(
            rx.store.root for rx in runtime.all_receivers()
        ):  # each AE's directory once
            try:
                removed = storage.remove_stale_temp_files(root)
            except OSError as exc:
                log.warning("storage.stale_temp_removed", reason=str(exc))
                continue
            for path in removed:
                log.warning("storage.stale_temp_removed", path=str(path))

    # ------------------------------------------------------------------ events

    def _apply_hooks(self, runtime: Runtime) -> None:
        """Open the outbox when the first consumer appears; (re)start its consumers."""
        self.events.apply(runtime.config, events_database(runtime.config, self.environ), self._outbox_opened)

    def _outbox_opened(self, outbox: Outbox) -> None:
        if self.ack is not None:  # events of acknowledged objects come from the journal
            self.ack.connect_events(outbox.record, outbox.persist, outbox.knows_event)
        assert self.server is not None
        self.server.events = outbox.record
        self.stats.events = outbox.counts()

    def _apply_commitment(self, runtime: Runtime) -> None:
        """Open Storage Commitment when a configuration first enables it (disabling it
        refuses new requests; reports already promised are still delivered)."""
        if self.ack is not None:
            settings = runtime.config.commitment
            self.ack.digest_files = settings.enabled and settings.verify == "checksum"
        if self.reporter is None:
            self.reporter = open_commitment(runtime.config, self.environ, self.ack, self.current, self._emit)
            if self.reporter is not None and self.server is not None:
                self.server.commitment = self.reporter.commitment

    def _emit(self, body: dict[str, object]) -> None:
        self.events.record(body)

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Build and swap a new Runtime; keep the old one on any error."""
        self.notifier.reloading()
        log.info("reload.started")
        old = self.runtime
        try:
            new = prepare(
                self.loader(),
                generation=old.generation + 1,
                environ=self.environ,
                warn=lambda message: log.warning("config.warning", reason=message),
            )
            if new.config.logging != old.config.logging:
                self._reconfigure_logging(new)
            if self.ack is None and (needs := journal_needed(new.config)):
                key, why = needs[0]
                raise ConfigError(
                    "configuration", key, f"{why}, and this daemon runs without the ack journal"
                )
        except DcmrecvdError as exc:
            METRICS.reloads.labels("failed").inc()
            self.stats.last_reload = f"failed: {exc}"
            log.error("reload.rejected", reason=str(exc))
            self.notifier.ready(self.stats.status_line())
            return False
        for section, key in restart_keys():  # declared restart=True in the schema
            before = getattr(getattr(old.config, section), key)
            after = getattr(getattr(new.config, section), key)
            if before != after:
                log.warning("reload.needs_restart", key=f"{section}.{key}", running=before, configured=after)
                new = _keep_setting(new, old, section, key)
        self.runtime = new
        self._apply_commitment(new)
        try:
            self._apply_hooks(new)
        except (DcmrecvdError, OSError) as exc:  # e.g. an unreadable AMQP password: the rest applies
            log.error("reload.rejected", reason=f"events: {exc}")
        METRICS.reloads.labels("ok").inc()
        self.stats.last_reload = "ok"
        log.info("reload.completed", generation=new.generation, profile=new.profile.name)
        self.notifier.ready(self.stats.status_line())
        return True

    def _reconfigure_logging(self, runtime: Runtime) -> None:
        """Apply a changed [logging] table (level, format, -lc file) to new log lines."""
        settings = runtime.config.logging
        fmt = settings.format if settings.format != "auto" else self.log_format
        logs.configure(settings.level, fmt, environ=self.environ, logger_config=settings.config_file)

    # ------------------------------------------------------------------ stop

    def stop(self) -> int:
        """Stop accepting, drain, abort stragglers, exit 0."""
        self.draining = True  # the agent says drain, /readyz says 503, from now on
        self.notifier.stopping("draining associations")
        log.info(
            "daemon.stopping",
            active=self.stats.active,
            connections=self.server.connections if self.server else 0,
        )
        assert self.server is not None
        metrics = self.runtime.config.metrics
        if self.ops is not None and metrics.agent_listen and metrics.drain_notice:
            # Let the load balancer hear "drain" before the port closes; a second SIGTERM
            # (or SIGINT) ends the notice at once.
            deadline = time.monotonic() + metrics.drain_notice
            assert self.signals is not None
            while (left := deadline - time.monotonic()) > 0:
                if self.signals.wait(left) in (None, signal.SIGTERM, signal.SIGINT):
                    break
        self.server.stop_accepting()
        if self.owns_listeners:
            for listener in self.listeners:
                listener.close()
        aborted = self.server.drain(self.runtime.config.daemon.drain_timeout)
        self.server.close()
        if self.reporter is not None:  # attempts under way end; pending reports wait on disk
            self.reporter.close()
        if self.ack is not None:  # every acknowledged object under its name, its events handed on
            self.ack.close()
        # Every acknowledged object's event is in, durably; consumers stop, work waits on disk.
        self.events.stop(complete=self.runtime.config.events.complete_on_stop)
        if self.ops is not None:
            self.ops.close()
        log.info("daemon.stopped", aborted=aborted, stored=self.stats.stored)
        return 0


def _log_ready(
    runtime: Runtime, listeners: list[socket.socket], ack: AckJournal | None, no_journal: str
) -> None:
    """daemon.ready: where we listen and store, how durably, and through what."""
    log.info(
        "daemon.ready",
        listen=[_describe(s) for s in listeners],
        profile=runtime.profile.name,
        output=str(runtime.store.root),
        durability=runtime.store.durability(),
        ack="journal" if ack is not None else "per-file",
        **({"journal": str(ack.journal.directory)} if ack is not None else {"journal_off": no_journal}),
        **(
            {
                "aes": {
                    rx.title: f"{rx.store.root} ({rx.store.durability()})"
                    for rx in runtime.receivers.values()
                }
            }
            if runtime.receivers
            else {}
        ),
    )


def _keep_setting(new: Runtime, old: Runtime, section: str, key: str) -> Runtime:
    """``new`` with one setting taken from ``old`` (it needs a restart to change)."""
    import dataclasses

    value = getattr(getattr(old.config, section), key)
    sect = dataclasses.replace(getattr(new.config, section), **{key: value})
    cfg = dataclasses.replace(new.config, **{section: sect})
    return dataclasses.replace(new, config=cfg)


def _describe(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def events_database(config: Config, environ: Mapping[str, str]) -> Path:
    """events.database, or in the state directory (never among the objects)."""
    if config.events.database:
        return Path(config.events.database)
    return state_directory(config, environ) / "events.sqlite"
