"""The keys of a remote AE, declared once: a ``[[forward]]`` destination, a ``[[commitment.peer]]``.

Why one declaration: both say who the remote is (``ae_title``), where it listens
(``host``, ``port``), as whom we call it (``calling_aet``) and how TLS goes;
declared twice they had drifted into three names for the remote AE and two
fallbacks for the client certificate.  The names of the first releases (``aet``
and ``local_aet`` of a peer, ``called_aet`` of a destination) are still read
(``RENAMED``), and ``dcmrecvd --check-config`` says which to rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dcmrecvd.conf.options import opt

#: Old key -> the key it is now, per table that had it.
RENAMED: Mapping[str, Mapping[str, str]] = {
    "commitment.peer": {"aet": "ae_title", "local_aet": "calling_aet"},
    "forward": {"called_aet": "ae_title"},
}


@dataclass(frozen=True)
class RemoteAEConfig:
    """Who a remote AE is and how we reach it; the first keys of its table."""

    ae_title: str = opt(
        "",
        "The remote AE's title: the destination we call, or the peer that calls us for commitment "
        "and is called back with its report. Empty: ANY-SCP for a [[forward]] (required for a "
        "[[commitment.peer]]).",
    )
    host: str = opt(
        "",
        "Where it listens (required for a dimse [[forward]]). Empty for a [[commitment.peer]]: "
        "the address its N-ACTION came from (PROXY-aware).",
    )
    port: int = opt(104, "Its DICOM port.", minimum=1, maximum=65535)
    calling_aet: str = opt("", "Our calling AE title towards it. Empty: the AE title we were called by.")
    tls: bool = opt(False, "Associations to it go over TLS.")
    tls_certificate: str = opt("", "Our client certificate (PEM). Empty: [tls] certificate, if any.")
    tls_private_key: str = opt("", "Its private key (PEM). Empty: [tls] private_key, with that certificate.")
    tls_ca_files: list[str] = opt([], "Certificates trusted for it. Empty: the system's trust store.")
    tls_server_name: str = opt(
        "", "The name its certificate must carry. Empty: the chain is verified, not the name."
    )


def renamed(table_path: str, table: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``table`` with the old key names read as the new ones, and new -> old for each key
    written under its old name; ValueError when a table holds a key under both names."""
    out = dict(table)
    written: dict[str, str] = {}
    for old, new in RENAMED.get(table_path, {}).items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{old}: set as {new} already (use {new} only)")
        out[new] = out.pop(old)
        written[new] = old
    return out, written


def check_remote_ae(table: Mapping[str, Any], *, required: bool) -> str:
    """What is wrong with a validated remote AE table's titles and TLS pair ("" when nothing)."""
    for key in ("ae_title", "calling_aet"):
        aet = str(table.get(key, ""))
        if not aet and not (required and key == "ae_title"):
            continue
        if not (0 < len(aet) <= 16 and aet == aet.strip() and aet.isprintable() and "\\" not in aet):
            return f"{key}: not an AE title (1-16 characters, no backslash)"
    if bool(table.get("tls_certificate")) != bool(table.get("tls_private_key")):
        return "tls_certificate: needs tls_private_key (and the other way)"
    return ""
