"""Operations: logs, Prometheus metrics, health and agent listeners, systemd notification.

Read-only views of the daemon for the people and machines that run it; nothing here
changes what is received or how.

May import: ``dcmrecvd.conf``, ``dcmrecvd.store``, ``dcmrecvd.wire``, ``dcmrecvd.errors``.
"""
