"""How long to wait before trying again: one rule for everything that retries.

Why one: the materialiser, hooks, forwarding, AMQP and commitment reports all
wait the same way (a first delay doubling up to a cap), and five copies of
that line had begun to differ (attempts counted from 0 or 1, an overflow for
large counts); a user reading one ``backoff`` key can expect the others alike.
"""

from __future__ import annotations

#: Doublings at most: 2**30 times any first delay is past every cap we have.
MAX_DOUBLINGS = 30


def backoff(tries: int, first: float, cap: float, factor: float = 2.0) -> float:
    """Seconds before the next try after ``tries`` failed ones (1: ``first``), at most ``cap``."""
    return float(min(cap, first * factor ** min(max(tries - 1, 0), MAX_DOUBLINGS)))
