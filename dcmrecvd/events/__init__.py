"""After the ack: the outbox (``outbox``: ``event_store`` + ``completion``), its consumers
(``hooks``, ``amqp``) and the event bodies they share (``body``).  Next: forwarding and
Storage Commitment reports.

Nothing here is on the path of a C-STORE: an association only hands a body to a callable
after its response is sent.

May import: ``dcmrecvd.ops``, ``dcmrecvd.conf``, ``dcmrecvd.store``, ``dcmrecvd.wire``,
``dcmrecvd.errors``; never ``dcmrecvd.serve``.
"""
