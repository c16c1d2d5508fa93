"""structlog set-up: native journald entries under systemd, readable lines on a terminal.

Events have stable dotted names (``assoc.accepted``, ``store.completed``...);
under journald each becomes an entry with a stable ``MESSAGE_ID`` and
``DICOM_*`` fields, so admins can ``journalctl MESSAGE_ID=...`` or
``journalctl DICOM_CALLING_AET=CT1``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from dcmrecvd.errors import ConfigError

#: Our levels (config.LOG_LEVELS, dcmrecv's) -> logging's.
LEVELS = {
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}
_SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

#: Our structured keys -> journal field names.
JOURNAL_FIELDS = {
    "calling_aet": "DICOM_CALLING_AET",
    "called_aet": "DICOM_CALLED_AET",
    "peer": "DICOM_PEER",
    "assoc_id": "DICOM_ASSOCIATION_ID",
    "sop_class_uid": "DICOM_SOP_CLASS_UID",
    "sop_instance_uid": "DICOM_SOP_INSTANCE_UID",
    "path": "DICOM_FILE",
    "status": "DICOM_STATUS",
    "bytes": "DICOM_BYTES",
    "duration_ms": "DICOM_DURATION_MS",
}

#: Every event we emit; MESSAGE_ID is derived from the name, so it never changes.
EVENTS = (
    "daemon.ready",
    "daemon.stopping",
    "daemon.stopped",
    "assoc.accepted",
    "assoc.rejected",
    "assoc.released",
    "assoc.aborted",
    "assoc.peer_host",
    "conn.closed",
    "conn.refused",
    "conn.proxy_rejected",
    "disk.low",
    "disk.ok",
    "disk.unusable",
    "metrics.bad_request",
    "tls.handshake_failed",
    "assoc.release_mid_message",
    "assoc.unanswered",
    "echo",
    "store.completed",
    "store.failed",
    "store.replaced",
    "store.duplicate",
    "store.spare_failed",
    "store.uid_mismatch",
    "store.incomplete",
    "store.internal_error",
    "journal.recovered",
    "journal.unavailable",
    "journal.behind",
    "journal.materialise_failed",
    "journal.file_missing",
    "journal.materialise_resumed",
    "journal.quarantined",
    "journal.quarantine_released",
    "journal.quarantine_kept",
    "journal.corrupt",
    "journal.sized",
    "state.migrated",
    "state.legacy_left",
    "state.inside_output",
    "events.unavailable",
    "hook.completed",
    "hook.retry",
    "hook.failed",
    "events.amqp_up",
    "events.amqp_down",
    "remote.opened",
    "commitment.requested",
    "commitment.refused",
    "commitment.unknown_peer",
    "commitment.reported",
    "commitment.delivery_failed",
    "commitment.undeliverable",
    "commitment.unavailable",
    "forward.delivered",
    "forward.skipped",
    "forward.retry",
    "forward.dead",
    "forward.paused",
    "forward.resumed",
    "storage.stale_temp_removed",
    "reload.started",
    "reload.completed",
    "reload.rejected",
    "reload.needs_restart",
    "accept.failed",
    "config.warning",
)
_NAMESPACE = uuid.UUID("6c1f0a9e-3a52-4d0b-9c55-0d1c7e2f5a10")


def message_id(event: str) -> str:
    """The stable journald MESSAGE_ID of an event name (32 hex digits)."""
    return uuid.uuid5(_NAMESPACE, event).hex


def journal_stream_is_stderr(environ: Mapping[str, str]) -> bool:
    """True when stderr is connected to journald (``JOURNAL_STREAM`` = dev:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalSink:
    """structlog logger that writes native journal entries."""

    def __init__(self) -> None:
        from systemd import journal  # type: ignore[attr-defined]

        self._send = journal.send

    def msg(self, **fields: Any) -> None:
        """Send one entry."""
        self._send(**fields)

    log = debug = info = warning = warn = error = critical = exception = msg


def to_journal(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """Final processor: event dict -> journal fields."""
    event = str(event_dict.pop("event", ""))
    level = str(event_dict.pop("level", method))
    event_dict.pop("timestamp", None)
    fields: dict[str, Any] = {
        "MESSAGE": _message(event, event_dict),
        "MESSAGE_ID": message_id(event),
        "PRIORITY": str(_SYSLOG_PRIORITY.get(level, 6)),
        "SYSLOG_IDENTIFIER": "dcmrecvd",
        "DCMRECVD_EVENT": event,
    }
    for key, value in event_dict.items():
        if value is None:
            continue
        name = JOURNAL_FIELDS.get(key) or "DCMRECVD_" + re.sub(r"[^A-Z0-9_]", "_", key.upper())
        fields[name] = value if isinstance(value, str | int | float) else str(value)
    return fields


def _message(event: str, fields: Mapping[str, Any]) -> str:
    shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k != "exception")
    text = f"{event} {shown}".strip()
    if "exception" in fields:
        text += "\n" + str(fields["exception"])
    return text


@dataclass(frozen=True)
class LogSettings:
    """What ``-lc`` (a DCMTK/log4cplus logger config) can tell us."""

    level: str | None = None
    file: str | None = None


def read_dcmtk_logger_config(path: str) -> LogSettings:
    """Honour the root level and one file appender; reject what we cannot honour."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read logger config: {exc.strerror or exc}") from None
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    root = props.get("log4cplus.rootLogger", "")
    parts = [p.strip() for p in root.split(",")] if root else []
    level = parts[0].lower() if parts else None
    if level is not None:
        level = {"warning": "warn", "all": "trace", "off": "fatal"}.get(level, level)
        if level not in LEVELS:
            raise ConfigError(path, "log4cplus.rootLogger", f"unknown level {parts[0]!r}")
    file = None
    for appender in parts[1:]:
        kind = props.get(f"log4cplus.appender.{appender}", "")
        if kind.endswith(("FileAppender", "RollingFileAppender", "DailyRollingFileAppender")):
            file = props.get(f"log4cplus.appender.{appender}.File")
            if not file:
                raise ConfigError(path, f"log4cplus.appender.{appender}.File", "missing")
        elif kind.endswith("ConsoleAppender"):
            continue
        else:
            raise ConfigError(
                path,
                f"log4cplus.appender.{appender}",
                f"appender {kind or '(undefined)'} is not supported by dcmrecvd "
                "(supported: ConsoleAppender, FileAppender; use journald for syslog)",
            )
    for key in props:
        if key.startswith("log4cplus.logger."):
            raise ConfigError(path, key, "per-logger settings are not supported by dcmrecvd")
    return LogSettings(level, file)


def configure(
    level: str,
    fmt: str = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    logger_config: str = "",
) -> str:
    """Set up structlog; return the format chosen (console, json or journal)."""
    env = os.environ if environ is None else environ
    out = stream or sys.stderr
    if logger_config:
        settings = read_dcmtk_logger_config(logger_config)
        level = settings.level or level
        if settings.file:
            out = open(settings.file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            fmt = "json" if fmt == "journal" else ("console" if fmt == "auto" else fmt)
    if fmt == "auto":
        fmt = "journal" if journal_stream_is_stderr(env) else "console"
    if fmt == "journal":
        try:
            JournalSink()
        except ImportError:
            fmt = "console"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    factory: Any
    if fmt == "journal":
        processors.append(to_journal)
        factory = lambda *args: JournalSink()  # noqa: E731
    elif fmt == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()]
        factory = structlog.PrintLoggerFactory(out)
    else:
        colors = out.isatty() and "NO_COLOR" not in env
        processors += [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=colors),
        ]
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return fmt
