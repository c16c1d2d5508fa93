"""Filesystems of their own for the bench: ext4 with its journal, XFS, on loop devices.

Why: these VMs' own disk is ext4 without a journal, which no server runs; a
user's disk has a journal (ext4's ordered mode, XFS's log), and what a durable
file costs (a rename and a directory fsync commit the journal) differs.  Each
filesystem is made in a sparse image file on the same disk as bench/out, so
the device below is the same and only the filesystem changes.  Needs root
(losetup, mount); the image is removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

#: kind -> mkfs command (the image path is appended).
MKFS = {
    "ext4-journal": ["mkfs.ext4", "-q", "-F", "-O", "has_journal"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}
#: Room for the largest set (10 x 100 MB) twice, the ack journal and the state.
IMAGE_BYTES = 8 << 30


@contextlib.contextmanager
def mounted(kind: str, under: Path) -> Iterator[Path]:
    """A fresh ``kind`` filesystem mounted at ``under/kind`` for the duration."""
    under.mkdir(parents=True, exist_ok=True)
    image = under / f"{kind}.img"
    point = under / kind
    point.mkdir(exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(IMAGE_BYTES)
    device = ""
    try:
        subprocess.run([*MKFS[kind], str(image)], check=True, capture_output=True)
        device = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["mount", device, str(point)], check=True, capture_output=True)
        try:
            yield point
        finally:
            subprocess.run(["umount", str(point)], check=False, capture_output=True)
    finally:
        if device:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink(missing_ok=True)
