"""Storage: durable files, knowing nothing of DICOM.

The durability order (``storage``), every system call of the write path
behind one seam (``file_ops``), O_DIRECT appends (``direct_io``), what the
filesystem promises (``fs_probe``), free space and its watermark
(``disk_space``), pooled buffers (``buffers``).  A file here is bytes under a
name someone else chose.

May import: the standard library, structlog and ``dcmrecvd.errors``; never
``dcmrecvd.wire``, pydicom or pynetdicom (checked by import-linter).
"""
