"""The wire: bytes <-> meaning, no I/O.

PDUs, the upper-layer state machine, DIMSE command sets, association
negotiation and the asconfig profiles it negotiates against, the PROXY
protocol header, the dataset walk, the Part 10 meta header, UIDs and DIMSE
statuses.  Everything here is a function of its input: no socket, no ssl, no
file written, no thread.

May import: the standard library (never ``socket`` or ``ssl``), pydicom,
pynetdicom's codecs, ``dcmrecvd.errors`` and ``dcmrecvd.data``; nothing else of
the package (checked by import-linter, ``make check``).
"""
