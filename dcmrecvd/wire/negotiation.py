"""Association negotiation, done by pynetdicom's PDU codecs and context negotiation.

This is what pynetdicom does well; we only decide *what* to accept (the
profile, the called AE title, the association limit) and hand back the
encoded A-ASSOCIATE-AC or -RJ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dcmrecvd.wire import part10
from dcmrecvd.wire.profiles import Profile

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_APP_CONTEXT = (0x02, 0x01, 0x02)  # rejected-transient, as dcmrecv answers it
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

REJECT_TEXT = {
    REJECT_CALLED_AET: "called AE title not recognised",
    REJECT_APP_CONTEXT: "application context name not supported",
    REJECT_NO_REASON: "no acceptable presentation context",
    REJECT_PROTOCOL_VERSION: "protocol version not supported",
    REJECT_LOCAL_LIMIT: "local limit exceeded",
}


class BadRequest(ValueError):
    """The A-ASSOCIATE-RQ PDU cannot be decoded."""


@dataclass(frozen=True)
class Request:
    """The parts of an A-ASSOCIATE-RQ we decide on and log."""

    primitive: A_ASSOCIATE
    calling_ae_title: str
    called_ae_title: str
    protocol_version: int
    peer_max_pdu: int


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context in use on an association."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class Outcome:
    """What to send back, and the accepted contexts when accepting."""

    pdu: bytes
    accepted: bool
    reject: tuple[int, int, int] | None = None
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    #: Requests the peer may have outstanding (the window we answered; 1 without one).
    window: int = 1


def decode_request(raw: bytes) -> Request:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included)."""
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(raw)
        primitive = pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises assorted errors on garbage
        raise BadRequest(f"malformed A-ASSOCIATE-RQ: {exc}") from None
    max_pdu = primitive.maximum_length_received or 0
    return Request(
        primitive=primitive,
        calling_ae_title=str(primitive.calling_ae_title or "").strip(),
        called_ae_title=str(primitive.called_ae_title or "").strip(),
        protocol_version=int(pdu.protocol_version),
        peer_max_pdu=int(max_pdu),
    )


def acceptor_contexts(profile: Profile) -> list[PresentationContext]:
    """The profile as pynetdicom acceptor contexts (transfer syntaxes in our order)."""
    contexts = []
    for ctx in profile.contexts:
        pc = PresentationContext()
        pc.abstract_syntax = UID(ctx.abstract_syntax)
        pc.transfer_syntax = [UID(ts) for ts in ctx.transfer_syntaxes]
        if ctx.abstract_syntax in profile.roles:
            pc.scu_role, pc.scp_role = profile.roles[ctx.abstract_syntax]
        contexts.append(pc)
    return contexts


def reject(reason: tuple[int, int, int]) -> Outcome:
    """An A-ASSOCIATE-RJ."""
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = reason
    return Outcome(pdu=A_ASSOCIATE_RJ(primitive).encode(), accepted=False, reject=reason)


def negotiate(
    request: Request,
    profile: Profile,
    contexts: list[PresentationContext],
    *,
    ae_title: str,
    max_pdu: int,
    window: int = 1,
) -> Outcome:
    """Accept or reject the request under ``profile``."""
    prim = request.primitive
    if not request.protocol_version & 0x01:
        return reject(REJECT_PROTOCOL_VERSION)
    if str(prim.application_context_name) != APPLICATION_CONTEXT:
        return reject(REJECT_APP_CONTEXT)
    if ae_title and request.called_ae_title != ae_title:
        return reject(REJECT_CALLED_AET)
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    extended_rq: list[SOPClassExtendedNegotiation] = []
    proposed_window: AsynchronousOperationsWindowNegotiation | None = None
    for item in prim.user_information:
        if isinstance(item, AsynchronousOperationsWindowNegotiation):
            proposed_window = item
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, SOPClassExtendedNegotiation):
            extended_rq.append(item)
    results, role_replies = negotiate_as_acceptor(
        prim.presentation_context_definition_list, contexts, roles or None
    )
    accepted = {
        int(cx.context_id): AcceptedContext(
            int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0])
        )
        for cx in results
        if cx.result == 0x00 and cx.context_id is not None
    }
    if not accepted:
        return reject(REJECT_NO_REASON)
    accepted_sops = {c.abstract_syntax for c in accepted.values()}
    user_info: list[object] = []
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    user_info.append(max_length)
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(part10.IMPLEMENTATION_CLASS_UID)
    user_info.append(impl_uid)
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = part10.IMPLEMENTATION_VERSION_NAME
    user_info.append(impl_name)
    user_info.extend(role_replies)
    performed = 1
    if proposed_window is not None:
        # The sender's invoked operations are the ones we perform; 0 means "no limit".
        invoked = int(proposed_window.maximum_number_operations_invoked or 0)
        performed = min(invoked, window) if invoked else window
        reply_window = AsynchronousOperationsWindowNegotiation()
        reply_window.maximum_number_operations_invoked = 1  # we invoke nothing on the sender
        reply_window.maximum_number_operations_performed = performed
        user_info.append(reply_window)
    for item in extended_rq:
        uid = str(item.sop_class_uid)
        if uid in profile.extended and uid in accepted_sops:
            reply = SOPClassExtendedNegotiation()
            reply.sop_class_uid = UID(uid)
            reply.service_class_application_information = profile.extended[uid]
            user_info.append(reply)
    response = A_ASSOCIATE()
    response.application_context_name = UID(APPLICATION_CONTEXT)
    response.calling_ae_title = prim.calling_ae_title
    response.called_ae_title = prim.called_ae_title
    response.result = 0x00
    response.result_source = 0x01
    response.presentation_context_definition_results_list = results
    response.user_information = user_info  # type: ignore[assignment]
    return Outcome(
        pdu=A_ASSOCIATE_AC(response).encode(),
        accepted=True,
        contexts=accepted,
        window=performed,
    )
