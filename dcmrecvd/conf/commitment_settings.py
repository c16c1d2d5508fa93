"""``[commitment]`` and ``[[commitment.peer]]``: the Storage Commitment SCP's settings.

Off by default: then the Storage Commitment SOP class is refused at negotiation, as
dcmrecv refuses it.  A report goes to the AE that asked, on an association we open,
so each requesting AE must be known here (where it listens, as which AE we call it).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcmrecvd.conf.options import opt
from dcmrecvd.conf.remote import RemoteAEConfig, check_remote_ae

VERIFY_CHOICES = ("exists", "size", "checksum")


@dataclass(frozen=True)
class CommitmentConfig:
    """The Storage Commitment Push Model SCP (1.2.840.10008.1.20.1)."""

    enabled: bool = opt(
        False,
        "Answer Storage Commitment requests (N-ACTION) and send their reports (N-EVENT-REPORT) "
        "to the [[commitment.peer]] that asked. Adds the Storage Commitment context (Implicit "
        "and Explicit VR Little Endian) to every profile. Needs output.fsync and the ack journal "
        "(the instance index answers 'committed').",
    )
    verify: str = opt(
        "size",
        "What is read back per instance at report time, after its index row: exists (the file "
        "is at its final name), size (and has the size received), checksum (and, for objects "
        "kept in a journal record, the CRC-32 received; larger ones are read in full).",
        choices=VERIFY_CHOICES,
    )
    retry_initial: int = opt(
        10, "Seconds before a report that could not be delivered is tried again.", minimum=1
    )
    retry_max: int = opt(600, "The retry interval doubles up to this many seconds.", minimum=1)
    give_up_after: int = opt(
        86400,
        "Seconds after the N-ACTION when an undelivered report is given up "
        "(commitment.undeliverable); the modality then asks again or alerts.",
        minimum=1,
    )
    max_associations: int = opt(4, "Reports delivered at once (one association each).", minimum=1, maximum=64)
    connect_timeout: int = opt(10, "Seconds to connect to a peer (TCP and TLS).", minimum=1, maximum=3600)
    response_timeout: int = opt(
        60, "Seconds to wait for the A-ASSOCIATE-AC and the N-EVENT-REPORT-RSP.", minimum=1, maximum=3600
    )
    max_items: int = opt(
        100000,
        "Instances one N-ACTION may name; more are refused with 0x0213. Reading one costs "
        "about 300 bytes of memory per item while it is answered.",
        minimum=1,
        maximum=1000000,
    )
    max_pending: int = opt(
        10000, "Transactions waiting for their report at most; beyond: N-ACTION refused 0x0213.", minimum=1
    )


@dataclass(frozen=True)
class CommitmentPeerConfig(RemoteAEConfig):
    """One ``[[commitment.peer]]``: an AE that may ask for commitment (its ``ae_title`` is the
    calling AE of its N-ACTION), and where its report goes (the keys of ``RemoteAEConfig``)."""


def check_peer(table: dict[str, object]) -> str:
    """What is wrong with one validated peer table ("" when nothing)."""
    return check_remote_ae(table, required=True)
