"""dcmrecvd: a DICOM storage receiver (Storage SCP) built as a Linux daemon.

A drop-in for DCMTK's ``dcmrecv`` that also speaks systemd (notify, socket
activation, reload, journald) and never acknowledges an object before it is
durably on disk.
"""

__version__ = "0.1.0"
