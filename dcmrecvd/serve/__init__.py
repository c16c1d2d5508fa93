"""Serving associations: the listener (``server``), the per-connection driver
(``association``) and what it delegates to: the prelude before the upper layer
(``prelude``: PROXY, TLS, ARTIM), admission (``admission``, ``access``), the receive
buffer and the answer window, the DIMSE services (``services``), the sinks a dataset
streams into (``receiving``) and where it lands (``naming``), TLS contexts (``tls``,
``ciphers``), and the Runtime an association is served with (``runtime``).

May import: every layer below (``ops``, ``conf``, ``store``, ``wire``) and
``dcmrecvd.errors``; never ``dcmrecvd.events`` (events reach the outbox through a
callable), ``dcmrecvd.lifecycle`` or ``dcmrecvd.cli``.
"""
