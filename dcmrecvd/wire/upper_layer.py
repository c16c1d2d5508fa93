"""The DICOM upper layer of one association, as a pure state machine (PS3.8 9.2).

Bytes in, events out, bytes to send: no sockets, no clock, no threads, so
every protocol rule can be tested by feeding bytes (``tests/test_upper_layer.py``)
and the driver (``association``) is left with I/O and timeouts.  Everything
that decides whether a PDU or PDV may arrive *now* lives in this module: the
states, the checks on each PDU and PDV, the assembly of command sets (with
their 64 KiB bound) and the DIMSE message framing that follows from them (a
dataset belongs to the command before it and must arrive on its context).

The shape is h11's (``Connection.receive_data`` / ``next_event`` / ``send``),
with one deliberate difference, the **receive-buffer contract**:

    ``feed(data)`` consumes all of ``data`` and returns the events it completes.
    A ``Pdv`` event's ``data`` is a memoryview into ``data`` itself, never a copy;
    it is valid until the caller reuses that buffer (in the driver: until the
    next read into it), so the caller must write or copy every ``Pdv`` it holds
    before it refills.  Everything else (command sets, the A-ASSOCIATE-RQ,
    headers split across reads) is copied, because it is small.

h11 copies bytes into its events; our throughput comes from handing views of
one receive buffer straight to the file's staging buffer, so a dataset byte is
never copied in Python.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from dcmrecvd.wire import dimse, pdu

#: The largest command set we assemble; real ones are a few hundred bytes.
MAX_COMMAND_SET = 64 * 1024


class State(enum.Enum):
    """The states of PS3.8 Table 9-10 that an acceptor passes through."""

    #: Sta2: transport open, waiting for the A-ASSOCIATE-RQ (under ARTIM).
    AWAITING_REQUEST = "Sta2"
    #: Sta3: the request is in; the local user has to accept or reject it.
    AWAITING_DECISION = "Sta3"
    #: Sta6: data transfer.
    ESTABLISHED = "Sta6"
    #: Sta8: the peer asked to release; the A-RELEASE-RP is ours to send.
    AWAITING_RELEASE = "Sta8"
    #: Sta1/Sta13: over (released, rejected or aborted); nothing more is read.
    CLOSED = "Sta13"


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: abort with ``reason`` (PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = pdu.REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason
        #: The events the same ``feed`` completed before the violation, in order: the
        #: caller acts on them (a request finished before the garbage is still answered).
        self.events: list[Event] = []


@dataclass(slots=True)
class AssociateRequest:
    """A whole A-ASSOCIATE-RQ PDU, header included (for ``negotiation.decode_request``)."""

    pdu: bytes


@dataclass(slots=True)
class Command:
    """A complete, decoded command set on an accepted presentation context."""

    context_id: int
    command: dimse.Command


@dataclass(slots=True)
class Pdv:
    """A piece of a dataset: a view into the fed buffer (see the module's contract).

    One PDV may arrive as several pieces when it spans reads; ``is_last`` is set
    on the final piece of the dataset's last fragment only.
    """

    context_id: int
    is_last: bool
    data: memoryview


@dataclass(slots=True)
class ReleaseRequest:
    """The peer asked for an orderly release."""


@dataclass(slots=True)
class Abort:
    """The peer aborted (A-ABORT): the association is over."""

    source: int
    reason: int


Event = AssociateRequest | Command | Pdv | ReleaseRequest | Abort

#: PDU types that may follow one another in data transfer; the rest are out of place.
_KNOWN_PDU_TYPES = frozenset(range(pdu.A_ASSOCIATE_RQ, pdu.A_ABORT + 1))


class UpperLayer:
    """One association's upper-layer state, as an acceptor.

    ``feed`` what the peer sent; call ``accept``/``reject``, ``respond``,
    ``release`` and ``abort`` for what to send.  Any rule the peer breaks raises
    ``ProtocolError`` (carrying the events completed before it, which may still
    be answered); nothing more is parsed and the caller sends ``abort(error.reason)``.
    """

    def __init__(self, max_request: int = pdu.MAX_ASSOCIATE_RQ) -> None:
        self.state = State.AWAITING_REQUEST
        self.max_request = max_request
        #: True once a whole PDU header has arrived: a peer that closes before is a
        #: port probe, one that closes after has vanished mid-request.
        self.requested = False
        self.peer_max_pdu = 0  # announced by the peer; 0 = no limit
        self._contexts: frozenset[int] = frozenset()
        self._header = bytearray()  # a PDU or PDV header split across reads
        # A non-P-DATA PDU's body being gathered (A-ASSOCIATE-RQ) or skipped (the rest).
        self._body_type = 0
        self._body_left = 0
        self._body = bytearray()
        # The P-DATA-TF PDU being parsed and the PDV inside it.
        self._pdu_left = 0
        self._pdv_left = 0
        self._pdv_context = 0
        self._pdv_command = False
        self._pdv_last = False
        # The command set being assembled, and the dataset that must follow a command.
        self._command = bytearray()
        self._command_context = 0
        self._dataset_context = 0  # 0: no dataset expected
        #: Bytes that arrived while a decision was pending, kept for after ``accept``.
        self._held = bytearray()
        self._broken: ProtocolError | None = None

    # ------------------------------------------------------------------ queries

    @property
    def in_dataset(self) -> bool:
        """True while a command's dataset has been announced and not finished."""
        return self._dataset_context != 0

    # ------------------------------------------------------------------ receiving

    def feed(self, data: memoryview | bytes) -> list[Event]:
        """Consume ``data`` (all of it) and return the events it completes."""
        if self._broken is not None:
            raise ProtocolError(str(self._broken), self._broken.reason)
        if not isinstance(data, memoryview):
            data = memoryview(data)
        if self._held and self.state is State.ESTABLISHED:
            data = memoryview(bytes(self._held) + bytes(data))
            self._held.clear()
        events: list[Event] = []
        pos, end = 0, len(data)
        try:
            while pos < end:
                state = self.state
                if state is State.AWAITING_DECISION:
                    self._held += data[pos:end]
                    return events
                if state is State.CLOSED or state is State.AWAITING_RELEASE:
                    return events  # nothing after the end is read
                if self._pdv_left:
                    pos = self._pdv_data(data, pos, end, events)
                elif self._pdu_left:
                    pos = self._pdv_header(data, pos, end, events)
                elif self._body_left:
                    pos = self._pdu_body(data, pos, end, events)
                else:
                    pos = self._pdu_header(data, pos, end, events)
        except ProtocolError as exc:
            # The state stays, so that the events before the violation can still be
            # answered; nothing more is parsed, and the caller's abort() closes.
            self._broken = exc
            exc.events = events
            raise
        return events

    def _gather_header(
        self, data: memoryview, pos: int, end: int
    ) -> tuple[bytes | memoryview | None, int, int]:
        """(buffer, offset of six header bytes in it, position after them in ``data``).

        The header is read in place when it is whole in ``data``; one split across
        reads is gathered first (buffer None until its sixth byte arrives).
        """
        if not self._header and end - pos >= 6:
            return data, pos, pos + 6
        take = min(6 - len(self._header), end - pos)
        self._header += data[pos : pos + take]
        if len(self._header) < 6:
            return None, 0, pos + take
        header = bytes(self._header)
        self._header.clear()
        return header, 0, pos + take

    def _pdu_header(self, data: memoryview, pos: int, end: int, events: list[Event]) -> int:
        buf, at, pos = self._gather_header(data, pos, end)
        if buf is None:
            return pos
        pdu_type, length = pdu.PDU_HEADER.unpack_from(buf, at)
        self.requested = True
        if self.state is State.AWAITING_REQUEST:
            if pdu_type != pdu.A_ASSOCIATE_RQ:
                raise ProtocolError(
                    f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                    pdu.REASON_UNEXPECTED_PDU
                    if pdu_type in _KNOWN_PDU_TYPES
                    else pdu.REASON_UNRECOGNIZED_PDU,
                )
            if length > self.max_request:
                raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes is too large")
            self._body = bytearray(pdu.PDU_HEADER.pack(pdu_type, length))
        elif pdu_type == pdu.P_DATA_TF:
            self._pdu_left = length
            return pos
        elif pdu_type == pdu.A_ABORT:
            length = min(length, 4)  # the reason is all we need; nothing after an abort matters
            self._body = bytearray()
        elif pdu_type == pdu.A_RELEASE_RQ:
            self._body = bytearray()
        elif pdu_type in _KNOWN_PDU_TYPES:
            raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.REASON_UNEXPECTED_PDU)
        else:
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", pdu.REASON_UNRECOGNIZED_PDU)
        self._body_type, self._body_left = pdu_type, length
        if length == 0:
            self._end_body(events)
        return pos

    def _pdu_body(self, data: memoryview, pos: int, end: int, events: list[Event]) -> int:
        take = min(self._body_left, end - pos)
        if self._body_type != pdu.A_RELEASE_RQ:  # a release's body is skipped, whatever its length
            self._body += data[pos : pos + take]
        self._body_left -= take
        if self._body_left == 0:
            self._end_body(events)
        return pos + take

    def _end_body(self, events: list[Event]) -> None:
        body, self._body = bytes(self._body), bytearray()
        if self._body_type == pdu.A_ASSOCIATE_RQ:
            self.state = State.AWAITING_DECISION
            events.append(AssociateRequest(body))
        elif self._body_type == pdu.A_RELEASE_RQ:
            self.state = State.AWAITING_RELEASE
            events.append(ReleaseRequest())
        else:
            self.state = State.CLOSED
            source = body[2] if len(body) > 2 else 0
            reason = body[3] if len(body) > 3 else 0
            events.append(Abort(source, reason))

    def _pdv_header(self, data: memoryview, pos: int, end: int, events: list[Event]) -> int:
        if self._pdu_left < 6:
            raise ProtocolError("P-DATA-TF ends inside a PDV header")
        buf, at, pos = self._gather_header(data, pos, end)
        if buf is None:
            return pos
        item_length, context_id, control = pdu.PDV_HEADER.unpack_from(buf, at)
        self._pdu_left -= 6
        data_length = item_length - 2
        if item_length < 2 or data_length > self._pdu_left:
            raise ProtocolError(f"PDV length {item_length} exceeds its PDU")
        if context_id not in self._contexts:
            raise ProtocolError(f"PDV on unknown presentation context {context_id}")
        self._pdu_left -= data_length
        is_command = bool(control & 0x01)
        if is_command:
            if self._dataset_context:
                raise ProtocolError("command fragment while a dataset is pending")
            if self._command and context_id != self._command_context:
                raise ProtocolError("command fragments on different presentation contexts")
            if len(self._command) + data_length > MAX_COMMAND_SET:
                raise ProtocolError("command set too large")
            self._command_context = context_id
        elif context_id != self._dataset_context:
            raise ProtocolError("dataset fragment without a matching command")
        self._pdv_context, self._pdv_command, self._pdv_last = context_id, is_command, bool(control & 0x02)
        self._pdv_left = data_length
        if data_length == 0:
            self._end_fragment(data[pos:pos], events)
        return pos

    def _pdv_data(self, data: memoryview, pos: int, end: int, events: list[Event]) -> int:
        take = min(self._pdv_left, end - pos)
        piece = data[pos : pos + take]
        self._pdv_left -= take
        if self._pdv_left:
            if self._pdv_command:
                self._command += piece
            else:
                events.append(Pdv(self._pdv_context, False, piece))
        else:
            self._end_fragment(piece, events)
        return pos + take

    def _end_fragment(self, piece: memoryview, events: list[Event]) -> None:
        """The current PDV is complete: the last piece may end a command set or a dataset."""
        if not self._pdv_command:
            last = self._pdv_last
            if last:
                self._dataset_context = 0
            events.append(Pdv(self._pdv_context, last, piece))
            return
        self._command += piece
        if not self._pdv_last:
            return
        raw, self._command = bytes(self._command), bytearray()
        try:
            command = dimse.decode(raw)
        except dimse.CommandError as exc:
            raise ProtocolError(f"undecodable command set: {exc}") from None
        if command.has_dataset:
            self._dataset_context = self._pdv_context
        events.append(Command(self._pdv_context, command))

    # ------------------------------------------------------------------ sending

    def accept(self, ac_pdu: bytes, context_ids: Collection[int], peer_max_pdu: int) -> bytes:
        """Data transfer may begin on ``context_ids``; returns the A-ASSOCIATE-AC to send."""
        self._expect(State.AWAITING_DECISION, "accept")
        self.state = State.ESTABLISHED
        self._contexts = frozenset(context_ids)
        self.peer_max_pdu = peer_max_pdu
        return ac_pdu

    def reject(self, rj_pdu: bytes) -> bytes:
        """The request is refused; returns the A-ASSOCIATE-RJ to send."""
        self._expect(State.AWAITING_DECISION, "reject")
        self.state = State.CLOSED
        return rj_pdu

    def respond(self, context_id: int, command_set: bytes) -> bytes:
        """P-DATA-TF PDUs carrying one response command set, split for the peer's maximum."""
        if self.state is not State.ESTABLISHED and self.state is not State.AWAITING_RELEASE:
            raise RuntimeError(f"no response can be sent in {self.state.name}")
        return pdu.command_pdu(context_id, command_set, self.peer_max_pdu)

    def release(self) -> bytes:
        """Answer the peer's release request; returns the A-RELEASE-RP to send."""
        self._expect(State.AWAITING_RELEASE, "release")
        self.state = State.CLOSED
        self._dataset_context = 0
        return pdu.release_rp_pdu()

    def abort(self, reason: int = pdu.REASON_NOT_SPECIFIED, source: int = pdu.SOURCE_PROVIDER) -> bytes:
        """End the association at once, in any state; returns the A-ABORT to send."""
        self.state = State.CLOSED
        self._dataset_context = 0
        return pdu.abort_pdu(source, reason)

    def _expect(self, state: State, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {action} in {self.state.name}")
