"""``[[forward]]``: destinations every acknowledged object (of those matched) is delivered to.

Forwarding is a consumer of the event outbox, never part of the ack path: an
object is acknowledged when it is durable here, and delivered afterwards, at
least once, with retries, dead letters and paused destinations (``events.forward``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dcmrecvd.conf.options import opt
from dcmrecvd.conf.remote import RemoteAEConfig, check_remote_ae

TYPES = ("dimse", "stowrs")
BATCHES = ("object", "series")
SYNTAX_POLICIES = ("as-received", "uncompressed-ok")
DUPLICATE_CHOICES = ("delivered", "dead")
#: What sends objects: each one as it is acknowledged, or a whole series or study once complete.
TRIGGERS = ("object.stored", "series.complete", "study.complete")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Keys of ``match`` answered from the event itself; any other key is a DICOM keyword,
#: read from the stored file's header.
EVENT_KEYS = ("called_aet", "calling_aet")


@dataclass(frozen=True)
class ForwardConfig(RemoteAEConfig):
    """One ``[[forward]]`` table: a destination (the keys of ``RemoteAEConfig``, for dimse)
    and which objects go there."""

    name: str = opt("", "The destination's name, in logs, metrics and `dcmrecvd forward` (required).")
    on: str = opt(
        "object.stored",
        "What sends objects: object.stored (each acknowledged object, in receive order per study), "
        "series.complete or study.complete (a unit's objects are held until its completion event, "
        "then sent in receive order; objects after that go with the unit's update event).",
        choices=TRIGGERS,
    )
    type: str = opt(
        "dimse", "How objects are delivered: dimse (C-STORE) or stowrs (DICOMweb STOW-RS).", choices=TYPES
    )
    match: tuple[tuple[str, tuple[str, ...]], ...] = opt(
        (),
        "Which objects go here: a table of key = glob or [globs] (all keys must match, any glob "
        "of a key). Keys: called_aet, calling_aet, or any DICOM keyword of the header (Modality, "
        "SOPClassUID, ...), read from the stored file without its pixel data. Empty: every object.",
    )
    url: str = opt(
        "",
        "stowrs: the STOW-RS endpoint (https://pacs.example/dicom-web/studies); no credentials in it.",
    )
    token_file: str = opt("", "stowrs: a file holding a bearer token (its first line).")
    username: str = opt("", "stowrs: a user for HTTP basic authentication (password from password_file).")
    password_file: str = opt("", "stowrs: a file holding the basic-authentication password (its first line).")
    credential: str = opt(
        "",
        "stowrs: a systemd credential (LoadCredential=) holding the password (with username) or the "
        "bearer token (without).",
    )
    tls_verify: bool = opt(
        True, "stowrs: verify the server's certificate (against tls_ca_files or the system's)."
    )
    batch: str = opt(
        "object",
        "stowrs: one request per object, or per series (consecutive objects of one series in a "
        "multipart body, streamed from the files, at most max_bytes).",
        choices=BATCHES,
    )
    max_bytes: int = opt(
        64 << 20, "stowrs: the largest batch body in bytes (a larger object goes alone).", minimum=1 << 16
    )
    max_associations: int = opt(
        2, "Associations at once (studies are delivered in parallel up to this).", minimum=1, maximum=64
    )
    idle_close: int = opt(10, "Seconds an unused association stays open for the next object.", minimum=0)
    connect_timeout: int = opt(10, "Seconds to connect (TCP and TLS).", minimum=1, maximum=3600)
    timeout: int = opt(
        60,
        "Seconds to wait for the A-ASSOCIATE-AC or a C-STORE-RSP; on expiry the association is "
        "aborted, the object retried on a new one.",
        minimum=1,
        maximum=3600,
    )
    transfer_syntax: str = opt(
        "as-received",
        "as-received: each object is proposed in its stored transfer syntax only; uncompressed-ok: "
        "an uncompressed little-endian object may also be sent in the other uncompressed "
        "little-endian syntax when the destination accepts only that. Nothing is ever decompressed.",
        choices=SYNTAX_POLICIES,
    )
    warnings_delivered: bool = opt(
        True, "A warning status (0xB000, 0xB006, 0xB007, any 0xBxxx) counts as delivered; false: dead letter."
    )
    duplicate_status: str = opt(
        "delivered",
        "What a 'duplicate SOP instance' answer (0x0111) means: delivered, or dead (kept as a dead letter).",
        choices=DUPLICATE_CHOICES,
    )
    backoff: int = opt(10, "Seconds before a failed delivery is tried again; doubles each time.", minimum=1)
    backoff_max: int = opt(
        600, "The retry interval at most; also how often a paused destination is probed.", minimum=1
    )
    give_up_after: int = opt(
        86400, "Seconds after receipt when an object still not delivered becomes a dead letter.", minimum=1
    )

    @property
    def kinds(self) -> frozenset[str]:
        """The outbox event kinds it takes (a unit trigger also takes the objects it holds)."""
        if self.on == "object.stored":
            return frozenset({self.on})
        return frozenset({"object.stored", self.on, self.on.replace(".complete", ".updated")})

    @property
    def consumer(self) -> str:
        """Its name among the outbox's consumers (apart from the hooks')."""
        return f"forward/{self.name}"

    def match_event(self, body: Mapping[str, Any]) -> bool | None:
        """Whether the event's own fields match (None: the header must also be read)."""
        for key, globs in self.match:
            if key in EVENT_KEYS and not any(fnmatch.fnmatchcase(str(body.get(key, "")), g) for g in globs):
                return False
        return None if self.header_keys else True

    @property
    def header_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.match if key not in EVENT_KEYS)

    def match_header(self, values: Mapping[str, str]) -> bool:
        return all(
            any(fnmatch.fnmatchcase(values.get(key, ""), g) for g in globs)
            for key, globs in self.match
            if key not in EVENT_KEYS
        )


def parse_match(value: Any, keyword_known: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A ``match`` table as (key, globs) pairs; ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError('must be a table (match = { Modality = "CT" })')
    out = []
    for key, globs in value.items():
        if key not in EVENT_KEYS and not keyword_known(key):
            raise ValueError(f"'{key}' is neither called_aet, calling_aet nor a DICOM keyword")
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) for g in globs):
            raise ValueError(f"{key}: expected a glob or an array of globs")
        out.append((str(key), tuple(globs)))
    return tuple(out)


def check_destination(table: Mapping[str, Any]) -> str:
    """What is wrong with one validated destination table ("" when nothing)."""
    if not _NAME.fullmatch(str(table.get("name", ""))):
        return "name: required, 1-64 of letters, digits, '_', '.', '-'"
    if table.get("type", "dimse") == "dimse" and not table.get("host"):
        return "host: required for a dimse destination"
    if table.get("type") == "stowrs":
        problem = _check_stow(table)
        if problem:
            return problem
    return check_remote_ae(table, required=False)


def _check_stow(table: Mapping[str, Any]) -> str:
    url = str(table.get("url", ""))
    if not re.fullmatch(r"https?://[^/@\s]+(/\S*)?", url):
        return "url: required for stowrs: http(s)://host[:port]/path, no user or password in it"
    if table.get("token_file") and (table.get("username") or table.get("password_file")):
        return "token_file: a bearer token or basic authentication (username), not both"
    if table.get("password_file") and not table.get("username"):
        return "password_file: needs username"
    return ""
