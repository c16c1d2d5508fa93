"""Outgoing associations: the one home of everything that calls another node.

Storage Commitment reports (N-EVENT-REPORT on an association we open) and the
forwarder (C-STORE to a PACS) both call remote AEs.  Here is what they share:
who a remote is (``peers.Remote``: AE title, host, port, our calling AE,
timeouts, TLS with our client certificate, never a PROXY header), how an
outbound TLS context is made (``client_tls``), and a bounded pool of
associations per remote, reused across requests, closed when idle, aborted
and reopened on a DIMSE timeout (``pool``).

Driven by pynetdicom's requestor (``AE.associate``), chosen on measurement
(``bench/outbound.py``): outbound traffic is off the ack path, pynetdicom
sends a stored file's dataset as it is on disk, without decoding it
(``STORE_SEND_CHUNKED_DATASET``), and its rate is within reach of DCMTK's
storescu; a requestor mode of our own core would duplicate a well-kept
library for no user-visible gain (docs/ARCHITECTURE.md, "Outgoing
associations").

May import: ``dcmrecvd.ops``, ``dcmrecvd.conf``, ``dcmrecvd.store``,
``dcmrecvd.wire``, ``dcmrecvd.errors``, pynetdicom; never ``dcmrecvd.serve`` or
``dcmrecvd.events`` (they call here, not the other way).
"""
