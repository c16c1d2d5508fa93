"""Forwarding: each ``[[forward]]`` destination is one more consumer of the event outbox.

Why the outbox: an object is acknowledged once it is durable here, and its
``object.stored`` event is in the outbox (or replayed from the ack journal
after a crash) before the journal lets its record go; the forwarder takes the
events from there, so delivery is at least once across kill -9 and power loss,
never in the ack path, and a destination that is down only grows a backlog.
Duplicates are possible: an object sent whose response was lost to a crash is
sent again after the restart.  A local file is never deleted by forwarding.

Order and fairness: per (called AE, calling AE, study) the oldest pending
object goes first and alone; studies go in parallel up to
``max_associations``.  What an answer means is ``forward_outcome``'s table:
delivered, retry (later, with backoff, then a dead letter after
``give_up_after``), dead (this object only: its study goes on), or pause (the
destination refused us for good: nothing is sent until a probe every
``backoff_max`` seconds is answered otherwise).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydicom import dcmread

from dcmrecvd.conf.config import TLSConfig
from dcmrecvd.conf.forward import ForwardConfig
from dcmrecvd.events.body import OBJECT_STORED
from dcmrecvd.events.event_store import Due
from dcmrecvd.events.forward_dimse import DimseDestination
from dcmrecvd.events.forward_outcome import Delivery, Verdict
from dcmrecvd.events.forward_stow import StowDestination, read_secret
from dcmrecvd.events.outbox import Outbox
from dcmrecvd.events.scheduler import DueScheduler
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.store.backoff import backoff

log = structlog.get_logger("dcmrecvd")

#: Seconds a scheduler sleeps at most between looks at the outbox (events wake it sooner).
IDLE_WAIT = 1.0
#: Objects of one study a worker delivers in a row before the scheduler has its say again.
RUN_LIMIT = 32
#: How often, at most, undelivered objects past give_up_after are looked for.
EXPIRE_EVERY = 10.0
#: Objects in one STOW-RS batch at most (besides max_bytes).
BATCH_LIMIT = 500


class Destination(Protocol):
    """How a forwarder hands objects to a destination (DIMSE or STOW-RS)."""

    def deliver(self, items: list[tuple[Path, Mapping[str, Any]]]) -> list[Delivery]: ...

    def close(self) -> None: ...

    def close_idle(self) -> None: ...


class Forwarder:
    """Delivers one destination's objects: a scheduler thread and ``max_associations`` workers."""

    def __init__(
        self, outbox: Outbox, cfg: ForwardConfig, environ: Mapping[str, str], server_tls: TLSConfig
    ) -> None:
        self.outbox, self.cfg = outbox, cfg
        self.server_tls = server_tls
        self.name = cfg.name
        self.consumer = cfg.consumer
        self.destination: Destination = (
            StowDestination(cfg, environ) if cfg.type == "stowrs" else DimseDestination(cfg, server_tls)
        )
        self._waiting: dict[str, float] = {}  # studies whose oldest object waits for a retry
        self._lock = threading.Lock()
        #: Paused: nothing is sent but a probe at ``_probe_at``.
        self.paused = False
        self._probe_at = 0.0
        #: The destination rests (its connection failed) until then; consecutive failures.
        self._rest_until = 0.0
        self._down = 0
        self._expire_at = 0.0
        #: Per study in order; studies in parallel up to max_associations (one while paused).
        self.scheduler: DueScheduler[Due, str] = DueScheduler(
            f"forward {self.name}",
            find=lambda busy, room: outbox.due(self.consumer, busy, room, self._waiting),
            key=lambda due: due.study_key,
            run=self._deliver,
            width=lambda: 1 if self.paused else cfg.max_associations,
            changed=outbox.changed,
            clock=outbox.clock,
            generation=lambda: outbox.generation,
            notify=outbox.notify,
            gate=self._gate,
            turn=self._turn,
            idle=self.destination.close_idle,
            workers=cfg.max_associations,
        )

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, wait: float = 5.0) -> None:
        """No new sends; those in flight get ``wait`` seconds (an unanswered one is sent
        again after the restart: at least once)."""
        self.scheduler.stop(wait)
        self.destination.close()

    # ------------------------------------------------------------------ scheduling

    def _turn(self, now: float) -> None:
        if now >= self._expire_at:  # counted from receipt, tried or not (#34)
            self._expire(now)
            self._expire_at = now + min(EXPIRE_EVERY, self.cfg.give_up_after / 4)

    def _expire(self, now: float) -> None:
        """Objects past ``give_up_after`` since receipt become dead letters, also those never
        tried while the destination rested or was paused."""
        why = f"gave up after {self.cfg.give_up_after} s without delivery"
        for event_id, reason, body in self.outbox.expire(self.consumer, now - self.cfg.give_up_after, why):
            METRICS.forward_objects.labels(self.name, "dead").inc()
            log.error(
                "forward.dead",
                reason=reason,
                destination=self.name,
                sop_instance_uid=body.get("sop_instance_uid"),
                path=body.get("path"),
                event_id=event_id,
            )

    def _gate(self, now: float) -> float | None:
        """When sending may start again (None: now)."""
        with self._lock:
            if self.paused and now < self._probe_at:
                return self._probe_at
            if self.paused and self.scheduler.busy():
                return now + IDLE_WAIT  # a probe is in flight
        if now < self._rest_until:
            return self._rest_until
        return None

    # ------------------------------------------------------------------ one object

    def _deliver(self, due: Due) -> str:
        """Deliver ``due``, then, while each is delivered, what is due next, up to
        ``RUN_LIMIT``: the study's next object, else another study's oldest (taken as the
        scheduler would).  A worker so keeps its association busy without a hand-over
        through the scheduler per object (a thread switch that costs more than the send);
        a study is busy while its object is out, so its order holds."""
        item, study = due, due.study_key
        try:
            for _ in range(RUN_LIMIT):
                if not self._deliver_one(item) or self.scheduler.stopping.is_set() or self.paused:
                    break
                if self._gate(self.outbox.clock()) is not None:
                    break
                following = self.outbox.following(self.consumer, study, item.event_id, 1)
                if following:
                    item = following[0]
                    continue
                other = self._take_another(study)
                if other is None:
                    break
                item, study = other, other.study_key
        except Exception as exc:  # a bug must not lose the object: retry it later
            self._handle(item, Delivery(Verdict.RETRY, f"{type(exc).__name__}: {exc}", label="retry"), 0.0)
        return study  # let go by the scheduler

    def _take_another(self, done: str) -> Due | None:
        """Another study's oldest due object, made busy (and ``done`` let go), or None."""
        found, _retry = self.outbox.due(self.consumer, self.scheduler.busy(), 1)
        if not found or not self.scheduler.hold(found[0].study_key):  # the scheduler launched it
            return None
        self.scheduler.let_go(done)
        return found[0]

    def _deliver_one(self, due: Due) -> bool:
        """One object (or a series batch, or a unit's release); True when all was delivered."""
        if due.body.get("event") != OBJECT_STORED:  # a unit is complete (or updated): its objects go
            series = due.body.get("series_uid") if str(due.body["event"]).startswith("series.") else None
            released = self.outbox.release(self.consumer, due.study_key, series, due.event_id)
            if not released:  # they went before it, in order: the unit is done
                self.outbox.done(due.event_id, self.consumer)
            return False  # the released objects come through the scheduler
        batch: list[tuple[Due, Path]] = []
        for item in [due, *self._more_of_series(due)]:
            path = Path(str(item.body.get("path", "")))
            if self._matches(item.body, path):
                batch.append((item, path))
                continue
            self.outbox.done(item.event_id, self.consumer)
            METRICS.forward_objects.labels(self.name, "skipped").inc()
            log.debug("forward.skipped", destination=self.name, event_id=item.event_id, path=str(path))
        if not batch:
            return True
        start = time.monotonic()
        results = self.destination.deliver([(path, item.body) for item, path in batch])
        seconds = (time.monotonic() - start) / len(batch)
        delay: float | None = None
        now = self.outbox.clock()  # one time for the batch: it stays together on its retry
        for (item, _path), result in zip(batch, results, strict=True):
            if result.connection and result.verdict is Verdict.RETRY:  # one rest for the batch
                delay = self._delay(1, True, result.retry_after) if delay is None else delay
            self._handle(item, result, seconds, delay, now)
        return all(result.verdict is Verdict.DELIVERED for result in results)

    def _more_of_series(self, due: Due) -> list[Due]:
        """With ``batch = "series"``: the objects that follow ``due`` in its study, pending and
        due, of the same series, up to ``max_bytes`` together."""
        if self.cfg.type != "stowrs" or self.cfg.batch != "series":
            return []
        series = due.body.get("series_uid")
        total = int(due.body.get("size", 0) or 0)
        more = []
        for item in self.outbox.following(self.consumer, due.study_key, due.event_id, BATCH_LIMIT):
            total += int(item.body.get("size", 0) or 0)
            if item.body.get("series_uid") != series or total > self.cfg.max_bytes:
                break
            more.append(item)
        return more

    def _matches(self, body: dict[str, Any], path: Path) -> bool:
        first = self.cfg.match_event(body)
        if first is not None:
            return first
        keys = self.cfg.header_keys
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=list(keys))
        except Exception:  # unreadable: let the send say so (a dead letter with its reason)
            return True
        return self.cfg.match_header({k: _text(ds.data_element(k)) for k in keys})

    def _handle(
        self, due: Due, result: Delivery, seconds: float, delay: float | None = None, now: float | None = None
    ) -> None:
        fields = {
            "destination": self.name,
            "sop_instance_uid": due.body.get("sop_instance_uid"),
            "path": due.body.get("path"),
            "event_id": due.event_id,
        }
        now = self.outbox.clock() if now is None else now
        if result.verdict is Verdict.PAUSE or (self.paused and result.connection):
            self._pause(now, result.reason)  # a probe that found it down: still paused
            return
        self._resume(result.reason)
        if result.verdict is Verdict.DELIVERED:
            self._down = 0
            self.outbox.done(due.event_id, self.consumer)
            METRICS.forward_objects.labels(self.name, result.label).inc()
            METRICS.forward_seconds.labels(self.name).observe(seconds)
            log.debug("forward.delivered", outcome=result.reason, seconds=round(seconds, 4), **fields)
            return
        attempts = self.outbox.attempts(due.event_id, self.consumer) + 1
        if result.verdict is Verdict.RETRY and now - due.created < self.cfg.give_up_after:
            if delay is None or not result.connection:
                delay = self._delay(attempts, result.connection, result.retry_after)
            self.outbox.failed(due.event_id, self.consumer, result.reason, now + delay)
            METRICS.forward_objects.labels(self.name, "retry").inc()
            log.warning("forward.retry", reason=result.reason, attempts=attempts, retry_in=delay, **fields)
            return
        reason = result.reason
        if result.verdict is Verdict.RETRY:
            reason = f"gave up after {attempts} attempts ({self.cfg.give_up_after} s): {reason}"
        self.outbox.failed(due.event_id, self.consumer, reason, None)
        METRICS.forward_objects.labels(self.name, "dead").inc()
        log.error("forward.dead", reason=reason, attempts=attempts, **fields)

    def _delay(self, attempts: int, connection: bool, asked: float = 0.0) -> float:
        """Seconds before the next try (at least what the destination ``asked``); a failed
        connection rests the whole destination."""
        if not connection:
            self._down = 0
            return max(asked, backoff(attempts, self.cfg.backoff, self.cfg.backoff_max))
        with self._lock:
            self._down += 1
            delay = max(backoff(self._down, self.cfg.backoff, self.cfg.backoff_max), asked)
            self._rest_until = max(self._rest_until, self.outbox.clock() + delay)
        return delay

    def _pause(self, now: float, reason: str) -> None:
        with self._lock:
            was = self.paused
            self.paused = True
            self._probe_at = now + self.cfg.backoff_max
        if not was:
            METRICS.forward_objects.labels(self.name, "paused").inc()
            log.error(
                "forward.paused", destination=self.name, reason=reason, probe_every=self.cfg.backoff_max
            )

    def _resume(self, answer: str) -> None:
        with self._lock:
            was, self.paused = self.paused, False
        if was:
            log.warning("forward.resumed", destination=self.name, answer=answer)

    def figures(self) -> tuple[int, float, bool]:
        """(deliveries waiting, the oldest one's age in seconds, paused)."""
        waiting, oldest = self.outbox.backlog(self.consumer)
        age = 0.0 if oldest is None else max(0.0, self.outbox.clock() - oldest)
        return waiting, age, self.paused


def _text(element: Any) -> str:
    """An element's value as text (values of a multi-valued one joined by a backslash)."""
    if element is None or element.value is None:
        return ""
    return "\\".join(str(v) for v in element.value) if element.VM > 1 else str(element.value)


class Forwarding:
    """The running forwarders, one per ``[[forward]]`` table; ``apply`` follows SIGHUP."""

    def __init__(self, outbox: Outbox, environ: Mapping[str, str]) -> None:
        self.outbox = outbox
        self.environ = environ
        self.running: dict[str, Forwarder] = {}

    def apply(self, destinations: tuple[ForwardConfig, ...], server_tls: TLSConfig) -> None:
        """Start new destinations, restart changed ones (or all, when [tls] changed: its
        certificate may be theirs), stop removed ones; queued objects stay in the outbox
        under the destination's name, so a change loses none."""
        wanted = {d.name: d for d in destinations}
        for cfg in wanted.values():  # secrets first: an unreadable one changes nothing
            if cfg.type == "stowrs":
                read_secret(cfg, self.environ)
        for name in list(self.running):
            current = self.running[name]
            if wanted.get(name) != current.cfg or server_tls != current.server_tls:
                current.stop()
                del self.running[name]
        for name, cfg in wanted.items():
            if name not in self.running:
                self.running[name] = Forwarder(self.outbox, cfg, self.environ, server_tls)
                self.running[name].start()

    def figures(self) -> dict[str, tuple[int, float, bool]]:
        return {name: f.figures() for name, f in self.running.items()}

    def stop(self, wait: float = 5.0) -> None:
        for forwarder in self.running.values():
            forwarder.stop(wait)
        self.running.clear()
