"""Outgoing associations: the one home of everything that calls another node.

Storage Commitment reports (N-EVENT-REPORT on an association we open) and the
forwarder (C-STORE to a PACS) both call remote AEs.  Here is what they share:
who a remote is (``peers.Remote``: AE title, host, port, our calling AE,
timeouts, TLS with our client certificate, never a PROXY header), how an
outbound TLS context is made (``client_tls``), and a bounded pool of
associations per remote, reused across requests, closed when idle, aborted
and reopened on a DIMSE timeout (``pool``).

Driven by a requestor mode of our own upper layer (``wire.requestor``, ``client``),
chosen on measurement (``bench/outbound.py``, one association to DCMTK's dcmrecv):
pynetdicom's requestor sent 324 small objects/s at 1.6 ms CPU each and 196 CT
objects/s at 3.7 ms; ours 3,367/s at 0.12 ms and 985/s at 0.55 ms (sendfile from
the stored file), storescu 3,148/s and 630/s.  pynetdicom's PDU codecs still
encode the A-ASSOCIATE-RQ and decode the answer.

May import: ``dcmrecvd.ops``, ``dcmrecvd.conf``, ``dcmrecvd.store``,
``dcmrecvd.wire``, ``dcmrecvd.errors``; never ``dcmrecvd.serve`` or
``dcmrecvd.events`` (they call here, not the other way).
"""
