"""An outbound TLS context: our client certificate, the remote's chain verified.

Why separate from ``serve.tls``: a server context follows dcmrecv's options and
profiles; a client context is ours to define, and the two must never share
state.  TLS 1.2 at least, Python's default secure ciphers, no PROXY header.
"""

from __future__ import annotations

import ssl

from dcmrecvd.errors import TransportError
from dcmrecvd.remote.peers import ClientTLS


def client_context(cfg: ClientTLS) -> ssl.SSLContext:
    """A client context for ``cfg``; TransportError when its files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cfg.ca_files:
            for path in cfg.ca_files:
                context.load_verify_locations(cafile=path)
        else:
            context.load_default_certs()
        if cfg.certificate:
            context.load_cert_chain(cfg.certificate, cfg.private_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"outbound TLS: {exc}") from None
    context.check_hostname = bool(cfg.server_name) and cfg.verify
    context.verify_mode = ssl.CERT_REQUIRED if cfg.verify else ssl.CERT_NONE
    return context
