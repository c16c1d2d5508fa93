"""Ways to cut a byte stream into the pieces a peer sends (after gunicorn's tests/treq.py):
framing bugs hide in fragmentation, so every conversation is fed each way."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

Split = Callable[[bytes], Iterator[bytes]]


def whole(stream: bytes) -> Iterator[bytes]:
    yield stream


def by_byte(stream: bytes) -> Iterator[bytes]:
    for i in range(len(stream)):
        yield stream[i : i + 1]


def by_pdu(stream: bytes) -> Iterator[bytes]:
    """One upper-layer PDU at a time."""
    pos = 0
    while pos < len(stream):
        length = struct.unpack_from(">I", stream, pos + 2)[0]
        yield stream[pos : pos + 6 + length]
        pos += 6 + length


def random_chunks(stream: bytes, largest: int = 40, seed: int = 7) -> Iterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, largest)
        yield stream[pos : pos + n]
        pos += n


def large_random_chunks(stream: bytes) -> Iterator[bytes]:
    """Random pieces of up to 3000 bytes (for streams too long to feed 40 bytes at a time)."""
    return random_chunks(stream, largest=3000, seed=len(stream))
