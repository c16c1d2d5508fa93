"""Configuration: the typed schema, its layers and validation (``config``), and dcmrecv's
command line as one table of options (``flags``).

May import: ``dcmrecvd.store`` and ``dcmrecvd.wire`` (for the parsers of sizes and UIDs),
``dcmrecvd.errors``, the standard library; nothing that serves, emits or operates.
"""
