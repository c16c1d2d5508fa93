"""The PROXY protocol (HAProxy's ``doc/proxy-protocol.txt``, versions 1 and 2), receiving side.

Why: behind a TCP load balancer the daemon would otherwise see only the
balancer's address, for access rules, logs and per-peer limits alike.  The
rules we keep from the specification: never guess whether a header is there
(``off`` never parses one, any other mode always requires it); accept it only
from ``network.trusted_proxies``; bound its size and read it whole under the
ACSE timeout; read exactly the header and not one byte more, because what
follows belongs to TLS or to the DICOM upper layer.  A v2 ``LOCAL`` command
(the balancer's own health check) and v1 ``UNKNOWN`` keep the balancer's
address.  No I/O here: the reading (exact, under the ACSE timeout) is ``prelude``'s.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: v1 headers are at most 107 bytes including CRLF (specification, 2.1).
V1_MAX = 107
#: v2 address block and TLVs we accept (an IPv6 block is 36 bytes; TLVs are rarely large).
V2_MAX_LENGTH = 1024

_FAMILIES = {0x11: (4, 12), 0x12: (4, 12), 0x21: (6, 36), 0x22: (6, 36)}


class ProxyHeaderError(ValueError):
    """No valid PROXY header where one is required (short text for the log)."""


class ClosedBeforeHeader(ProxyHeaderError):
    """Connected and closed without a byte: a port probe, not an attack."""


@dataclass(frozen=True)
class ProxiedPeer:
    """What the header says: the client's address, or None (LOCAL/UNKNOWN: keep the balancer's)."""

    host: str | None
    port: int | None
    version: int


def parse_v1(line: bytes) -> ProxiedPeer:
    """``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (or ``PROXY UNKNOWN ...``)."""
    if not line.endswith(b"\r\n") or len(line) > V1_MAX:
        raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError("not a v1 header")
    if parts[1] == "UNKNOWN":
        return ProxiedPeer(None, None, 1)
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"v1 header with protocol {parts[1]!r} or {len(parts)} fields")
    src, dst = parts[2], parts[3]
    version = 4 if parts[1] == "TCP4" else 6
    for address in (src, dst):
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ProxyHeaderError(f"v1 header with bad address {address!r}") from None
        if parsed.version != version:
            raise ProxyHeaderError(f"v1 header: {address} is not IPv{version}")
    ports = []
    for field in parts[4:6]:
        if not field.isdigit() or (len(field) > 1 and field[0] == "0") or int(field) > 65535:
            raise ProxyHeaderError(f"v1 header with bad port {field!r}")
        ports.append(int(field))
    return ProxiedPeer(src, ports[0], 1)


def parse_v2(header: bytes, body: bytes) -> ProxiedPeer:
    """The 16-byte v2 header and its address block (TLVs after it are ignored)."""
    if header[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad v2 signature")
    version_command, family, length = header[12], header[13], struct.unpack(">H", header[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer speaking for itself
        return ProxiedPeer(None, None, 2)
    if command != 0x1:
        raise ProxyHeaderError(f"v2 header with command {command}")
    if len(body) != length:
        raise ProxyHeaderError("v2 header shorter than its length")
    if family not in _FAMILIES:  # UNSPEC, UNIX: no IP client address to use
        return ProxiedPeer(None, None, 2)
    ip_version, needed = _FAMILIES[family]
    if length < needed:
        raise ProxyHeaderError(f"v2 address block of {length} bytes for IPv{ip_version}")
    size = 4 if ip_version == 4 else 16
    src = ipaddress.ip_address(body[:size])
    sport = struct.unpack(">H", body[2 * size : 2 * size + 2])[0]
    return ProxiedPeer(str(src), sport, 2)


def read_header(read: Callable[[int], bytes], mode: str) -> ProxiedPeer:
    """Read exactly one header with ``read(n)`` (exactly n bytes, or an exception); ``mode``
    v1, v2 or any.  The caller's ``read`` owns the socket and the deadline."""
    start = read(12)
    if start == V2_SIGNATURE:
        if mode == "v1":
            raise ProxyHeaderError("a v2 header where v1 is configured")
        header = start + read(4)
        length = struct.unpack(">H", header[14:16])[0]
        if length > V2_MAX_LENGTH:
            raise ProxyHeaderError(f"v2 header of {length} bytes (at most {V2_MAX_LENGTH})")
        return parse_v2(header, read(length))
    if start.startswith(V1_PREFIX):
        if mode == "v2":
            raise ProxyHeaderError("a v1 header where v2 is configured")
        line = bytearray(start)
        while not line.endswith(b"\r\n"):  # a byte at a time: never read past the header
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
            line += read(1)
        return parse_v1(bytes(line))
    raise ProxyHeaderError("no PROXY header")
