"""Storage Commitment reports: checked, sent on an association we open, retried until
delivered or given up.

Why a scheduler of its own with a few workers (``events.scheduler``, keyed by
transaction): a report is never on an association's path (the N-ACTION is answered
as soon as its request is durable), a peer may be down for hours, and one slow peer
must not hold up the others' reports.  Each attempt re-checks every instance
(``commitment_check``), so a report says what is true
when it is sent.  Delivery: the A-ASSOCIATE-RQ proposes Storage Commitment (Implicit
VR LE first, then Explicit) with an SCP/SCU Role Selection item (we are SCP: SCU=0,
SCP=1); a peer that will not take that gets one more try without the item.  A
report is delivered when the peer answers its N-EVENT-REPORT with 0x0000; anything
else is tried again after ``retry_initial`` seconds, doubling to ``retry_max``,
until ``give_up_after`` seconds after the N-ACTION.  The transactions are in
``CommitmentStore``: a stop, a crash or a power cut only delays their reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from dcmrecvd.conf.commitment_settings import CommitmentPeerConfig
from dcmrecvd.conf.config import Config
from dcmrecvd.events import body
from dcmrecvd.events.scheduler import DueScheduler
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.remote.client import AssociationFailed, NoContext, OutboundAssociation
from dcmrecvd.remote.client_tls import client_context
from dcmrecvd.remote.from_config import remote_for
from dcmrecvd.remote.peers import Remote
from dcmrecvd.serve.ack_journal import AckJournal, state_directory
from dcmrecvd.serve.commitment_check import Commitment
from dcmrecvd.serve.runtime import Runtime
from dcmrecvd.store.backoff import backoff
from dcmrecvd.store.commitment_store import DELIVERED, UNDELIVERABLE, CommitmentStore, Transaction
from dcmrecvd.wire import commitment_codec as codec
from dcmrecvd.wire import uids
from dcmrecvd.wire.requestor import proposals

log = structlog.get_logger("dcmrecvd")

OFFER = proposals([(codec.SOP_CLASS, (uids.IMPLICIT_LE, uids.EXPLICIT_LE))])
#: We take the SCP role for Storage Commitment (the modality is the SCU).
ROLES = {codec.SOP_CLASS: (False, True)}
#: How often the reporter looks again without being woken (a clock jump, a lost wake-up).
IDLE_SECONDS = 5.0


class Undelivered(Exception):
    """This attempt did not deliver the report (the reason is logged and kept)."""


class Reporter:
    """Sends the reports that are due, at most ``commitment.max_associations`` at once."""

    def __init__(self, commitment: Commitment, emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.commitment = commitment
        self.store = commitment.store
        #: The outbox's ``record`` (None: no consumer of events configured).
        self.emit = emit
        self._changed = threading.Condition()
        self._generation = 0
        #: One report per transaction at a time, up to commitment.max_associations at once.
        self.scheduler: DueScheduler[Transaction, int] = DueScheduler(
            "commitment-report",
            find=lambda busy, room: (self.store.due(time.time(), busy, room), self.store.next_due()),
            key=lambda tx: tx.id,
            run=self._attempt,
            width=lambda: commitment.runtime().config.commitment.max_associations,
            changed=self._changed,
            generation=lambda: self._generation,
            notify=self.wake,
            idle_wait=IDLE_SECONDS,
        )
        commitment.wake = self.wake

    def start(self) -> None:
        self.scheduler.start()

    def wake(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """No new attempts; those under way get ``timeout`` seconds, then stay pending."""
        self.scheduler.stop(timeout)

    def _attempt(self, tx: Transaction) -> int:
        try:
            self._report(tx)
        except Exception as exc:  # never let one transaction stop the others
            log.error("commitment.delivery_failed", transaction_uid=tx.uid, reason=f"internal: {exc!r}")
        return tx.id

    def _report(self, tx: Transaction) -> None:
        fields = {"transaction_uid": tx.uid, "calling_aet": tx.calling_aet, "called_aet": tx.called_aet}
        peer = self.commitment.peer(tx.calling_aet)
        try:
            if peer is None:
                raise Undelivered(f"no [[commitment.peer]] for AE '{tx.calling_aet}' any more")
            committed, failed = self.commitment.check(tx.called_aet, self.store.items(tx.id))
            event_type = 1 if not failed else 2
            remote = self._remote(peer, tx)
            fields["remote"] = remote.name
            self._deliver(remote, tx.uid, event_type, committed, failed)
        except Undelivered as exc:
            self._not_delivered(tx, str(exc), fields)
            return
        now = time.time()
        self.store.finish(tx.id, DELIVERED, now)
        METRICS.commitment_report_seconds.observe(now - tx.requested)
        METRICS.commitment_items.labels("committed").inc(len(committed))
        for _c, _i, reason in failed:
            METRICS.commitment_items.labels(f"0x{reason:04X}").inc()
        log.info(
            "commitment.reported",
            event_type=event_type,
            committed=len(committed),
            failed=len(failed),
            attempts=tx.attempts + 1,
            seconds=round(now - tx.requested, 3),
            **fields,
        )
        if self.emit is not None:
            self.emit(body.commitment_reported(_about(tx), len(committed), len(failed)))

    def _remote(self, peer: CommitmentPeerConfig, tx: Transaction) -> Remote:
        config = self.commitment.runtime().config
        settings = config.commitment
        return remote_for(
            peer,
            config.tls,
            host=tx.host,
            calling=tx.called_aet or config.network.ae_title or "DCMRECVD",
            connect_timeout=settings.connect_timeout,
            response_timeout=settings.response_timeout,
        )

    def _deliver(
        self,
        remote: Remote,
        transaction_uid: str,
        event_type: int,
        committed: list[tuple[str, str]],
        failed: list[tuple[str, str, int]],
    ) -> None:
        try:
            context = client_context(remote.tls) if remote.tls is not None else None
        except Exception as exc:
            raise Undelivered(f"TLS: {exc}") from None
        try:
            try:
                assoc = OutboundAssociation.open(remote, OFFER, context, ROLES)
                if not any(c.abstract_syntax == codec.SOP_CLASS for c in assoc.contexts.values()):
                    assoc.release()
                    raise NoContext("Storage Commitment not accepted with the role item")
            except (NoContext, AssociationFailed) as exc:
                if isinstance(exc, AssociationFailed) and exc.why == "unreachable":
                    raise
                assoc = OutboundAssociation.open(remote, OFFER, context)  # once without the role item
        except AssociationFailed as exc:
            raise Undelivered(str(exc)) from None
        try:
            response = assoc.event_report(
                codec.SOP_CLASS,
                codec.SOP_INSTANCE,
                event_type,
                lambda syntax: codec.encode_report(
                    transaction_uid, committed, failed, syntax == uids.EXPLICIT_LE
                ),
            )
        except (NoContext, AssociationFailed) as exc:
            assoc.abort()
            raise Undelivered(str(exc)) from None
        assoc.release()
        if response.status != 0x0000:
            raise Undelivered(
                f"N-EVENT-REPORT-RSP status 0x{response.status:04X} {response.error_comment}".strip()
            )

    def _not_delivered(self, tx: Transaction, reason: str, fields: dict[str, Any]) -> None:
        settings = self.commitment.runtime().config.commitment
        now = time.time()
        if now - tx.requested >= settings.give_up_after:
            self.store.finish(tx.id, UNDELIVERABLE, now, reason)
            METRICS.commitment_undeliverable.inc()
            log.error("commitment.undeliverable", reason=reason, attempts=tx.attempts + 1, **fields)
            if self.emit is not None:
                self.emit(body.commitment_undeliverable(_about(tx), reason))
            return
        delay = backoff(tx.attempts + 1, settings.retry_initial, settings.retry_max)
        self.store.retry(tx.id, now + delay, reason)
        log.warning(
            "commitment.delivery_failed", reason=reason, attempts=tx.attempts + 1, retry_in=delay, **fields
        )

    def figures(self) -> tuple[int, float]:
        """Transactions waiting for their report, and the oldest one's age in seconds."""
        count, oldest = self.store.pending()
        return count, 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def close(self) -> None:
        self.stop()
        self.store.close()


def open_commitment(
    config: Config,
    environ: Mapping[str, str],
    ack: AckJournal | None,
    runtime: Callable[[], Runtime],
    emit: Callable[[dict[str, Any]], None],
) -> Reporter | None:
    """The Storage Commitment SCP's store and reporter, started; None when it is off or
    cannot answer honestly (no ack journal, so no instance index: said in the log)."""
    if not config.commitment.enabled:
        return None
    if ack is None:
        log.warning("commitment.unavailable", reason="the ack journal is not in use (see daemon.ready)")
        return None
    store = CommitmentStore(state_directory(config, environ) / "commitment.sqlite")
    store.prune(time.time())
    reporter = Reporter(Commitment(store, ack, runtime), emit)
    reporter.start()
    return reporter


def _about(tx: Transaction) -> body.TransactionFacts:
    """What the ``commitment.*`` bodies say of a stored transaction."""
    return body.TransactionFacts(tx.called_aet, tx.calling_aet, tx.host, tx.uid, tx.items)
