"""Signals to the main loop at once, whichever thread the kernel delivers them to.

Why not a Python handler and a queue alone: the kernel delivers a process signal
to any thread that does not block it, usually a busy one (an association, the
ops listener); CPython then only sets a flag, and the handler runs when the
*main* thread next executes bytecode.  A main thread asleep in a lock or queue
wait with a timeout did not wake until it ran out (up to the 5 s STATUS tick).
``signal.set_wakeup_fd`` makes the C-level handler, on whatever thread, write
the signal's number to a pipe; the main loop waits on that pipe with
``select``, so it wakes within microseconds.  The numbers read from the pipe are
the signals: the Python handler has nothing to do but exist (a handler must be
installed for the wake-up byte to be written).
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable


class SignalInbox:
    """Receives ``signums`` through a wake-up pipe; ``wait`` returns the next one."""

    def __init__(self, signums: Iterable[int]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: list[int] = []
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _ignore)

    def wait(self, timeout: float) -> int | None:
        """The next signal received, waiting up to ``timeout`` seconds; None if none came."""
        if not self._pending:
            try:
                ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
            except InterruptedError:  # a signal on this thread: its byte is in the pipe
                ready = [self._read]
            if ready:
                self._take()
        return self._pending.pop(0) if self._pending else None

    def _take(self) -> None:
        try:
            while chunk := os.read(self._read, 64):
                self._pending.extend(chunk)
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


def _ignore(_signum: int, _frame: object) -> None:
    """The Python-level handler: the number already went down the pipe."""
