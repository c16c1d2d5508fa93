"""A remote AE's configuration (``conf.remote``) made into a ``Remote``: written once.

Why here: forwarding and Storage Commitment reports both call remote AEs from
tables that share their keys; the fallbacks (our calling AE, the host the
request came from, the server's certificate as our client certificate) are
decided in one place, so the two cannot drift apart again.
"""

from __future__ import annotations

from dcmrecvd.conf.config import TLSConfig
from dcmrecvd.conf.remote import RemoteAEConfig
from dcmrecvd.remote.peers import ClientTLS, Remote

#: The remote AE title called when a table names none (DCMTK's tools call it so too).
DEFAULT_CALLED = "ANY-SCP"


def client_tls(cfg: RemoteAEConfig, server: TLSConfig) -> ClientTLS | None:
    """TLS towards the remote (None: plain TCP); without a certificate of its own, the
    server's ([tls] certificate and private_key) is presented, if there is one."""
    if not cfg.tls:
        return None
    own = bool(cfg.tls_certificate)
    return ClientTLS(
        certificate=cfg.tls_certificate if own else server.certificate,
        private_key=cfg.tls_private_key if own else server.private_key,
        ca_files=tuple(cfg.tls_ca_files),
        server_name=cfg.tls_server_name,
    )


def remote_for(
    cfg: RemoteAEConfig,
    server: TLSConfig,
    *,
    host: str = "",
    calling: str,
    connect_timeout: float,
    response_timeout: float,
    max_associations: int = 1,
    idle_close: float = 10.0,
) -> Remote:
    """The remote a table describes; ``host`` and ``calling`` stand in for empty keys."""
    return Remote(
        cfg.ae_title or DEFAULT_CALLED,
        cfg.host or host,
        cfg.port,
        calling_aet=cfg.calling_aet or calling,
        tls=client_tls(cfg, server),
        connect_timeout=connect_timeout,
        acse_timeout=response_timeout,
        dimse_timeout=response_timeout,
        max_associations=max_associations,
        idle_close=idle_close,
    )
