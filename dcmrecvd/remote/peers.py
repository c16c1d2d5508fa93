"""Who a remote AE is, and how we talk to it: plain data, built from configuration by
the features that call out (commitment peers, forward destinations)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a remote: our client certificate, and whom we trust."""

    certificate: str = ""  # PEM; empty: no client certificate
    private_key: str = ""
    ca_files: tuple[str, ...] = ()  # empty: the system's trust store
    #: The name the remote's certificate must carry; empty: the chain is verified, the
    #: name is not (DICOM nodes are often known by address, not by a name in their cert).
    server_name: str = ""
    verify: bool = True


@dataclass(frozen=True)
class Remote:
    """One remote AE, as every outgoing association needs it."""

    ae_title: str
    host: str
    port: int
    calling_aet: str = "DCMRECVD"
    tls: ClientTLS | None = None
    connect_timeout: float = 10.0
    #: ARTIM of the requestor: waiting for the A-ASSOCIATE-AC and the A-RELEASE-RP.
    acse_timeout: float = 30.0
    #: Waiting for a response; on expiry the association is aborted (and reopened next time).
    dimse_timeout: float = 60.0
    max_associations: int = 2
    #: Seconds an unused association stays open for the next request.
    idle_close: float = 10.0
    max_pdu: int = 65536

    @property
    def name(self) -> str:
        """For logs: AE@host:port."""
        return f"{self.ae_title}@{self.host}:{self.port}"
