"""TLS cipher suites by the names DCMTK uses (the IANA/RFC names), and OpenSSL's names for them.

Why a table: ``+cs`` takes names like ``TLS_RSA_WITH_AES_128_CBC_SHA`` (as
dcmrecv does), while OpenSSL's cipher strings want ``AES128-SHA``; OpenSSL
3 accepts the IANA names only for TLS 1.3.  The table holds the TLS 1.2
suites DCMTK 3.6 knows; ``--list-ciphers`` prints those the local OpenSSL
can actually negotiate, then its TLS 1.3 suites apart.

TLS 1.3 suites are a different kind: OpenSSL enables all of them whenever TLS
1.3 may be negotiated, and Python's ``ssl`` module cannot narrow that list.  So
``+cs`` accepts a TLS 1.3 name (the suite is offered, as asked) when the profile
permits TLS 1.3, and refuses it, saying why, when the profile stops at TLS 1.2.
"""

from __future__ import annotations

import ssl

#: IANA name -> OpenSSL name, for the TLS 1.2 suites DCMTK offers.
SUITES: dict[str, str] = {
    "TLS_RSA_WITH_NULL_SHA": "NULL-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_CAMELLIA_128_CBC_SHA": "CAMELLIA128-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_CAMELLIA_256_CBC_SHA": "CAMELLIA256-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA256": "AES256-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_CBC_SHA": "DHE-DSS-AES128-SHA",
    "TLS_DHE_DSS_WITH_CAMELLIA_128_CBC_SHA": "DHE-DSS-CAMELLIA128-SHA",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA": "DHE-RSA-AES128-SHA",
    "TLS_DHE_RSA_WITH_CAMELLIA_128_CBC_SHA": "DHE-RSA-CAMELLIA128-SHA",
    "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256": "DHE-DSS-AES128-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256": "DHE-RSA-AES128-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256": "DHE-DSS-AES128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": "DHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": "ECDHE-ECDSA-AES256-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": "ECDHE-RSA-AES256-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA": "DHE-DSS-AES256-SHA",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA": "DHE-RSA-AES256-SHA",
    "TLS_DHE_DSS_WITH_CAMELLIA_256_CBC_SHA": "DHE-DSS-CAMELLIA256-SHA",
    "TLS_DHE_RSA_WITH_CAMELLIA_256_CBC_SHA": "DHE-RSA-CAMELLIA256-SHA",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256": "DHE-DSS-AES256-SHA256",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256": "DHE-RSA-AES256-SHA256",
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "DHE-RSA-CHACHA20-POLY1305",
    "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384": "DHE-DSS-AES256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": "DHE-RSA-AES256-GCM-SHA384",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
}
_BY_OPENSSL = {openssl: iana for iana, openssl in SUITES.items()}


class UnknownSuite(ValueError):
    """A cipher suite name that is neither in the table nor a TLS 1.3 suite."""


def tls13_suites() -> list[str]:
    """IANA names of the TLS 1.3 suites the local OpenSSL enables (always all of them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return [c["name"] for c in context.get_ciphers() if c.get("protocol") == "TLSv1.3"]


def is_tls13(name: str) -> bool:
    """A TLS 1.3 suite (its IANA and OpenSSL names are the same)."""
    return name in tls13_suites()


def openssl_name(name: str) -> str:
    """OpenSSL's name for a suite given by its IANA name (OpenSSL names pass unchanged)."""
    if name in SUITES:
        return SUITES[name]
    if name in _BY_OPENSSL:
        return name
    raise UnknownSuite(name)


def iana_name(name: str) -> str:
    """The IANA name of a suite given either way."""
    return _BY_OPENSSL.get(name, name)


def is_unencrypted(name: str) -> bool:
    """A NULL-cipher suite: authenticated, not encrypted."""
    return "_WITH_NULL_" in iana_name(name)


def uses_rsa_key_transport(name: str) -> bool:
    """RSA key transport, no forward secrecy (RFC 7525 says: should not be used)."""
    return iana_name(name).startswith("TLS_RSA_WITH_")


def supported() -> list[str]:
    """IANA names of the TLS 1.2 suites the local OpenSSL can negotiate, in DCMTK's order."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    offered = {c["name"] for c in context.get_ciphers()}
    return [iana for iana, openssl in SUITES.items() if openssl in offered]
