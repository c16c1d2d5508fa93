"""One scheduler for everything that works through due items after the ack: hooks,
forward destinations, Storage Commitment reports (and the audit consumer to come).

Why one: each of them had its own loop of "look for what is due, start it on a
worker unless its key is busy, wait for a change or the next retry", and they
had begun to differ in exactly the places that lose work (a wake-up lost
between the look and the wait, a worker that crashed and kept its key busy).
Here the loop is written once; a consumer says how to find what is due, what
one item's key is (a study: its items go in order; a transaction), how to run
one, and how wide it may go.

The loop never sleeps past a change: it reads the source's ``generation``
before it looks and waits only if it has not moved since (a notify between the
look and the wait is not lost), and at most ``idle_wait`` seconds anyway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Key = TypeVar("Key", bound=Hashable)

#: Seconds the loop sleeps at most between looks (a change or a retry wakes it sooner).
IDLE_WAIT = 1.0


class DueScheduler(Generic[Item, Key]):
    """Starts due items on up to ``width()`` workers, never two of one key at once.

    ``find(busy, room)`` returns what is due (none of the ``busy`` keys, at most ``room``)
    and when the next retry is due (None: none waits); ``run(item)`` does one on a worker
    and returns the key it holds at the end (a worker may go on with other keys it
    ``hold``s); ``gate(now)`` says when work may start again (None: now), ``turn(now)``
    runs at every look, ``idle()`` when nothing was started.
    """

    def __init__(
        self,
        name: str,
        *,
        find: Callable[[set[Key], int], tuple[list[Item], float | None]],
        key: Callable[[Item], Key],
        run: Callable[[Item], Key],
        width: Callable[[], int],
        changed: threading.Condition,
        clock: Callable[[], float] = time.time,
        generation: Callable[[], int] = lambda: 0,
        notify: Callable[[], None] | None = None,
        gate: Callable[[float], float | None] = lambda now: None,
        turn: Callable[[float], None] = lambda now: None,
        idle: Callable[[], None] = lambda: None,
        workers: int = 64,
        idle_wait: float = IDLE_WAIT,
    ) -> None:
        self.name = name
        self.find, self.key, self.run, self.width = find, key, run, width
        self.changed, self.clock, self.generation = changed, clock, generation
        self.notify = notify or self._notify_changed
        self.gate, self.turn, self.idle = gate, turn, idle
        self.idle_wait = idle_wait
        self.stopping = threading.Event()
        self._busy: set[Key] = set()
        self._lock = threading.Condition()
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """No new items; those under way get ``wait`` seconds (then they stay pending at
        the source: whatever did not finish is found due again after the restart)."""
        self.stopping.set()
        self.notify()
        self._thread.join(2.0)
        self._workers.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait
        with self._lock:
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)

    # ------------------------------------------------------------------ keys

    def busy(self) -> set[Key]:
        with self._lock:
            return set(self._busy)

    def hold(self, key: Key) -> bool:
        """Take ``key`` (False: it is busy already)."""
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def let_go(self, key: Key) -> None:
        with self._lock:
            self._busy.discard(key)
            self._lock.notify_all()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self.stopping.is_set():
            seen = self.generation()  # before the look: a notify after it is not lost
            now = self.clock()
            self.turn(now)
            wake_at = self.gate(now)
            found: list[Item] = []
            retry: float | None = None
            if wake_at is None:
                room = self.width() - len(self.busy())
                if room > 0:
                    found, retry = self.find(self.busy(), room)
                    for item in found:
                        self._launch(item)
            if found:
                continue
            self.idle()
            wake = min(x for x in (wake_at, retry, now + self.idle_wait) if x is not None)
            with self.changed:
                if self.generation() == seen and not self.stopping.is_set():
                    self.changed.wait(max(0.01, min(self.idle_wait, wake - now)))

    def _launch(self, item: Item) -> None:
        key = self.key(item)
        if not self.hold(key):  # a worker took it on its own meanwhile
            return
        try:
            self._workers.submit(self._work, item)
        except RuntimeError:  # shut down under us: the item stays pending
            self.let_go(key)

    def _work(self, item: Item) -> None:
        held = self.key(item)
        try:
            held = self.run(item)
        finally:
            self.let_go(held)
            self.notify()

    def _notify_changed(self) -> None:
        with self.changed:
            self.changed.notify_all()
