"""The outbox and everything that consumes it: hooks, the AMQP publisher, forward destinations.

One owner for them, so the daemon's lifecycle only says when: the outbox opens
with the first configuration that has a consumer, each SIGHUP re-applies who
takes which events (a consumer that went loses its pending deliveries; a
forward destination whose settings changed keeps them), and stop ends the
consumers before the outbox is made durable and closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dcmrecvd.conf.config import EVENT_KINDS, AmqpConfig, Config
from dcmrecvd.events.amqp import CONSUMER as AMQP_CONSUMER
from dcmrecvd.events.amqp import Publisher, read_password, start_publisher
from dcmrecvd.events.body import OBJECT_STORED, Body
from dcmrecvd.events.forward import Forwarding
from dcmrecvd.events.hooks import Hooks
from dcmrecvd.events.outbox import Outbox


def wanted_consumers(config: Config) -> dict[str, frozenset[str]]:
    """Who takes which event kinds: each hook its kinds, the AMQP publisher all of them,
    each forward destination its trigger."""
    wanted = {h.name: frozenset(h.on) for h in config.hooks}
    if config.amqp.url:
        wanted[AMQP_CONSUMER] = frozenset(EVENT_KINDS)
    wanted.update({f.consumer: f.kinds for f in config.forward})
    return wanted


@dataclass
class EventConsumers:
    environ: Mapping[str, str]
    outbox: Outbox | None = None
    hooks: Hooks | None = None
    publisher: Publisher | None = None
    forwarding: Forwarding | None = None

    def apply(self, config: Config, database: Path, on_open: Callable[[Outbox], None]) -> None:
        """Open the outbox at ``database`` when the first consumer appears (``on_open`` is
        called before its writer starts: replayed events must find the consumers known);
        then (re)start hooks, publisher and forward destinations for ``config``."""
        if self.outbox is None:
            if not wanted_consumers(config):
                return
            self.outbox = Outbox(
                database, stable_seconds=config.events.stable_seconds, max_seconds=config.events.max_seconds
            )
            self.hooks = Hooks(self.outbox, self.environ)
            self.forwarding = Forwarding(self.outbox, self.environ)
            self._set_consumers(config)
            on_open(self.outbox)
            self.outbox.start()
        else:
            completion = self.outbox.completion
            completion.stable, completion.cap = config.events.stable_seconds, config.events.max_seconds
            self._set_consumers(config)
        assert self.hooks is not None and self.forwarding is not None
        self.hooks.apply(config.hooks)
        self.forwarding.apply(config.forward, config.tls)
        if (self.publisher.cfg if self.publisher else AmqpConfig()) != config.amqp:
            password = read_password(config.amqp, self.environ)  # may fail: the old one stays
            if self.publisher is not None:
                self.publisher.stop()
            self.publisher = start_publisher(self.outbox, config.amqp, password)

    def _set_consumers(self, config: Config) -> None:
        assert self.outbox is not None
        wanted = wanted_consumers(config)
        gone = set(self.outbox.consumers) - set(wanted)
        self.outbox.consumers = wanted
        units = [f.consumer for f in config.forward if f.on != OBJECT_STORED]
        self.outbox.held = {consumer: frozenset({OBJECT_STORED}) for consumer in units}
        for consumer in set(wanted) - set(units):  # no longer sending units: nothing stays held
            self.outbox.release_all(consumer)
        if gone:
            self.outbox.forget(gone)

    def record(self, body: Body) -> None:
        if self.outbox is not None:
            self.outbox.record(body)

    def counts(self) -> dict[str, int] | None:
        return self.outbox.counts() if self.outbox is not None else None

    def forward_figures(self) -> dict[str, tuple[int, float, bool]]:
        return self.forwarding.figures() if self.forwarding is not None else {}

    def stop(self, complete: bool) -> None:
        """Consumers end (their pending deliveries wait in the outbox), then the outbox is
        made durable and closed."""
        if self.outbox is None:
            return
        assert self.hooks is not None and self.forwarding is not None
        self.hooks.stop()
        self.forwarding.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.outbox.stop(complete=complete)
        self.outbox.close()
