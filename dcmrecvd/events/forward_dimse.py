"""Delivering one stored object to a DICOM destination by C-STORE, and what its answer means.

Associations come from ``remote`` (one pool per calling AE title: the AE an
object arrived on, unless the destination names one), reused across objects.
What they propose grows with what is sent: each (SOP class, transfer syntax)
seen becomes a presentation context of its own (so the destination accepts or
refuses each syntax by itself), the newest 128 at most; an object whose pair an
open association did not propose goes on a new one.  The dataset is sent from
the stored file as it is, never decoded (``OutboundAssociation.store``), except
for ``transfer_syntax = "uncompressed-ok"``: an Implicit VR Little Endian
object to a destination that accepts only Explicit VR Little Endian, or the
other way, is re-encoded with pydicom (pixel data is not touched by that).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dcmrecvd.conf.config import TLSConfig
from dcmrecvd.conf.forward import ForwardConfig
from dcmrecvd.events import forward_outcome as outcome
from dcmrecvd.events.forward_outcome import Delivery
from dcmrecvd.remote.client import AssociationFailed, NoContext, OutboundAssociation
from dcmrecvd.remote.from_config import remote_for
from dcmrecvd.remote.peers import Remote
from dcmrecvd.remote.pool import AssociationPool, RemoteUnavailable
from dcmrecvd.wire import part10
from dcmrecvd.wire.requestor import proposals

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
_OTHER = {IMPLICIT: EXPLICIT, EXPLICIT: IMPLICIT}
MAX_CONTEXTS = 128


class _Stale(Exception):
    """The association did not propose this object's pair, or refused it before this
    delivery began (the remote may have been fixed and restarted since): use a new one."""


class DimseDestination:
    """C-STORE to one ``[[forward]]`` destination of type dimse."""

    def __init__(self, cfg: ForwardConfig, server_tls: TLSConfig) -> None:
        self.cfg = cfg
        #: [tls] of the receiver: its certificate is ours towards a destination without one.
        self.server_tls = server_tls
        self._lock = threading.Lock()
        self._pools: dict[str, AssociationPool] = {}
        #: (SOP class, transfer syntax) -> None, oldest first: what associations propose.
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _remote(self, calling_aet: str) -> Remote:
        cfg = self.cfg
        return remote_for(
            cfg,
            self.server_tls,
            calling=calling_aet,
            connect_timeout=cfg.connect_timeout,
            response_timeout=cfg.timeout,
            max_associations=cfg.max_associations,
            idle_close=cfg.idle_close,
        )

    def _pool(self, calling_aet: str, wanted: list[str], sop_class: str) -> AssociationPool:
        """The pool for ``calling_aet``, proposing (at least) ``sop_class`` in ``wanted``."""
        with self._lock:
            added = False
            for syntax in wanted:
                key = (sop_class, syntax)
                if key in self._pairs:
                    self._pairs.move_to_end(key)
                else:
                    self._pairs[key] = None
                    added = True
            while len(self._pairs) > MAX_CONTEXTS:
                self._pairs.popitem(last=False)
            offered = proposals([(c, (s,)) for c, s in self._pairs])
            pool = self._pools.get(calling_aet)
            if pool is None:
                pool = self._pools[calling_aet] = AssociationPool(self._remote(calling_aet), offered)
            elif added:
                for each in self._pools.values():
                    each.offered = offered
                    each.close()  # idle ones go; new ones propose the new pair
            return pool

    def deliver(self, items: list[tuple[Path, Mapping[str, Any]]]) -> list[Delivery]:
        """One C-STORE per item (a batch is one object: associations carry the rest)."""
        return [self.send(path, str(body.get("called_aet", ""))) for path, body in items]

    def send(self, path: Path, calling_aet: str) -> Delivery:
        """Deliver one stored file; the verdict on the destination's answer."""
        calling = self.cfg.calling_aet or calling_aet or "DCMRECVD"
        try:
            with open(path, "rb") as f:
                meta = part10.read_meta(f.read(part10.META_READ))
        except FileNotFoundError:
            return Delivery(outcome.Verdict.DEAD, f"the stored file is gone: {path}", label="dead")
        except (OSError, part10.NotPart10) as exc:
            return Delivery(outcome.Verdict.DEAD, f"the stored file cannot be read: {exc}", label="dead")
        wanted = [meta.transfer_syntax_uid]
        if self.cfg.transfer_syntax == "uncompressed-ok" and meta.transfer_syntax_uid in _OTHER:
            wanted.append(_OTHER[meta.transfer_syntax_uid])
        began = time.monotonic()
        pair = f"{meta.sop_class_uid} in {' or '.join(wanted)}"
        for _attempt in range(2):
            pool = self._pool(calling, wanted, meta.sop_class_uid)
            try:
                with pool.association() as assoc:
                    status, comment = self._store(assoc, path, meta, wanted, began)
            except _Stale:
                pool.close()  # idle ones negotiated the same way: a new association decides
                continue
            except NoContext as exc:
                return outcome.no_context(str(exc))
            except (RemoteUnavailable, AssociationFailed) as exc:
                if exc.why == "no-context":  # not one pair accepted: say which this object needed
                    return outcome.no_context(f"{pair} (no presentation context accepted)")
                return outcome.of_association(exc.why, str(exc), exc.result)
            return outcome.of_status(
                status,
                comment,
                warnings_delivered=self.cfg.warnings_delivered,
                duplicate_delivered=self.cfg.duplicate_status == "delivered",
            )
        return outcome.no_context(f"{meta.sop_class_uid} in {meta.transfer_syntax_uid} was not proposed")

    def _store(
        self, assoc: OutboundAssociation, path: Path, meta: part10.FileMeta, wanted: list[str], began: float
    ) -> tuple[int, str]:
        syntax = next((s for s in wanted if assoc.accepts(meta.sop_class_uid, s)), None)
        if syntax is None:
            if all(assoc.proposed(meta.sop_class_uid, s) for s in wanted) and assoc.opened >= began:
                raise NoContext(f"{meta.sop_class_uid} in {' or '.join(wanted)}")
            # Proposed less than we now know to ask for, or refused by a remote that may have
            # been fixed since (a retried dead letter): the pool aborts it, a new one decides.
            raise _Stale
        if syntax == meta.transfer_syntax_uid:
            response = assoc.store(path)
        else:
            data = _reencoded(path, syntax)
            response = assoc.store_encoded(meta.sop_class_uid, meta.sop_instance_uid, syntax, data)
        return response.status, response.error_comment

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()

    def close_idle(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close_idle()


def _reencoded(path: Path, syntax: str) -> bytes:
    """The stored dataset in the other uncompressed little-endian syntax."""
    ds = dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax == IMPLICIT
    write_dataset(buf, ds)
    return buf.getvalue()
