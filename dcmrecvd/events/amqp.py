"""``[events.amqp]``: every event published to RabbitMQ, for fleets of receivers.

A consumer of the outbox like a hook: an event is done only when the broker has
confirmed it (publisher confirms; persistent messages).  While the broker is
down the events wait in the outbox (bounded by its disk, counted in STATUS) and
flow when it returns; receiving never waits for the broker.  pika is the client:
the protocol and its confirms are its job, not ours.  The password comes from a
file or a systemd credential, never from the URL, and never reaches a log line.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from dcmrecvd.conf.config import AmqpConfig
from dcmrecvd.errors import ConfigError
from dcmrecvd.events import body as events
from dcmrecvd.events.outbox import Outbox
from dcmrecvd.store.backoff import backoff

log = structlog.get_logger("dcmrecvd")

CONSUMER = "amqp"
#: Events published per round before the outbox is asked again.
BATCH = 200
MAX_BACKOFF = 30.0


def read_password(cfg: AmqpConfig, environ: Mapping[str, str]) -> str:
    """The broker password: password_file, or the systemd credential, or "" (none)."""
    if cfg.password_file:
        path = Path(cfg.password_file)
    elif cfg.password_credential:
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory:
            raise ConfigError(
                "configuration",
                "events.amqp.password_credential",
                "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)",
            )
        path = Path(directory) / cfg.password_credential
    else:
        return ""
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except OSError as exc:
        raise ConfigError(
            "configuration", "events.amqp", f"cannot read the password: {exc.strerror}"
        ) from None


class Publisher:
    """Moves the outbox's events to the broker, one confirmed message each."""

    def __init__(self, outbox: Outbox, cfg: AmqpConfig, password: str) -> None:
        self.outbox, self.cfg = outbox, cfg
        self._password = password
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amqp", daemon=True)
        self._said_down = False  # "down" is logged once per outage, not per retry

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.outbox.changed:
            self.outbox.changed.notify_all()
        self._thread.join(10)

    def _parameters(self) -> Any:
        import pika

        params = pika.URLParameters(self.cfg.url)
        if self.cfg.user:
            params.credentials = pika.PlainCredentials(self.cfg.user, self._password)
        params.heartbeat = 30
        params.blocked_connection_timeout = 60
        params.connection_attempts = 1
        return params

    def _run(self) -> None:
        import pika
        import pika.exceptions

        failures = 0
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(self._parameters())
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._down(exc)
                failures += 1
                self._stop.wait(backoff(failures, 1.0, MAX_BACKOFF))
                continue
            failures = 0
            try:
                self._serve(connection)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._down(exc)
            finally:
                try:
                    connection.close()
                except Exception:  # closing a broken connection: nothing more to say
                    pass

    def _down(self, exc: BaseException) -> None:
        if not self._said_down:
            log.warning("events.amqp_down", reason=f"{type(exc).__name__}: {exc}", url=self.cfg.url)
            self._said_down = True

    def _serve(self, connection: Any) -> None:
        import pika

        channel = connection.channel()
        channel.confirm_delivery()
        cfg = self.cfg
        channel.exchange_declare(cfg.exchange, exchange_type="topic", durable=True)
        if cfg.queue:
            arguments = {"x-queue-type": "quorum"} if cfg.quorum else {}
            channel.queue_declare(cfg.queue, durable=True, arguments=arguments)
            channel.queue_bind(cfg.queue, cfg.exchange, routing_key="#")
        self._said_down = False
        log.info("events.amqp_up", url=cfg.url, exchange=cfg.exchange)
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        while not self._stop.is_set():
            batch = self.outbox.due_in_order(CONSUMER, BATCH)
            for due in batch:
                routing_key = "".join(events.argv([cfg.routing_key], due.body))
                # Returns once the broker confirmed it (raises on a nack or an unroutable message).
                channel.basic_publish(
                    cfg.exchange, routing_key, events.to_json(due.body), properties, mandatory=False
                )
                self.outbox.done(due.event_id, CONSUMER)
            if not batch:
                with self.outbox.changed:
                    self.outbox.changed.wait(1.0)
                connection.process_data_events(0)  # heartbeats while idle


def start_publisher(outbox: Outbox, cfg: AmqpConfig, password: str) -> Publisher | None:
    """The publisher for ``cfg``, started (None when no url is set)."""
    if not cfg.url:
        return None
    publisher = Publisher(outbox, cfg, password)
    publisher.start()
    return publisher
