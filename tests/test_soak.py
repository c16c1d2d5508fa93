"""A short soak: many short associations of small objects, RSS sampled; it must stay flat
after warm-up (it grew 14-22 MiB per 10,000 objects while receive buffers came from malloc).
`make soak` runs the long one."""

from __future__ import annotations

from conftest import DaemonFactory
from soak import soak

OBJECTS = 10_000


def test_rss_is_flat_over_a_short_soak(daemons: DaemonFactory) -> None:
    d = daemons.start(verbose=False)
    result = soak(d.port, d.pid, OBJECTS, senders=4, per_association=50)
    warm = result.warm(OBJECTS)
    growth = (warm[-1][1] - warm[0][1]) / 1024
    print(f"RSS after warm-up {warm[0][1] / 1024:.1f} MiB, at the end {warm[-1][1] / 1024:.1f} MiB")
    assert growth < 4, f"RSS grew {growth:.1f} MiB after warm-up over {OBJECTS} objects"
    assert result.spread_mib(OBJECTS) < 6
    assert sum(1 for p in d.output.iterdir() if p.name != ".dcmrecvd") == OBJECTS
