"""``[[hooks]]``: programs run for events from the outbox, never on the ack path.

Each hook has its own scheduler thread and at most ``concurrency`` runs at once;
the events of one study run in order (the next waits for the one before, its
retries included).  A run is a plain ``exec`` (no shell): the argv items with
their {placeholders} replaced, the event as JSON on stdin and as
``DCMRECVD_*`` variables, killed with its process group after ``timeout``.
Exit 0 is done; anything else is retried after ``backoff`` seconds, doubled
each time, and after ``retries`` retries the event is dead-lettered: logged as
``hook.failed``, counted in STATUS and the metrics, kept in the outbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import structlog

from dcmrecvd.conf.config import HookConfig
from dcmrecvd.events import body as events
from dcmrecvd.events.event_store import Due
from dcmrecvd.events.outbox import Outbox
from dcmrecvd.events.scheduler import DueScheduler
from dcmrecvd.ops.metrics import METRICS
from dcmrecvd.store.backoff import backoff

log = structlog.get_logger("dcmrecvd")

#: The daemon's own environment that a hook must not inherit: a hook that could
#: notify systemd or adopt our sockets would speak for the daemon.
_PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
MAX_BACKOFF = 3600.0
#: Output kept from a run, for the log.
OUTPUT_TAIL = 2000
#: What a run killed by the daemon's own stop reports: no attempt is counted.
STOPPED = "stopped with the daemon"


class HookRunner:
    """Runs one hook for the events of its kinds."""

    def __init__(self, outbox: Outbox, hook: HookConfig, environ: Mapping[str, str]) -> None:
        self.outbox, self.hook = outbox, hook
        self.name = hook.name
        self._env = {k: v for k, v in environ.items() if k not in _PRIVATE_ENV}
        self._waiting: dict[str, float] = {}  # studies whose oldest event waits for a retry
        self._procs: set[subprocess.Popen[bytes]] = set()
        #: Events of one study in order, up to ``concurrency`` studies at once.
        self.scheduler: DueScheduler[Due, str] = DueScheduler(
            f"hook {self.name}",
            find=lambda busy, room: outbox.due(self.name, busy, room, self._waiting),
            key=lambda due: due.study_key,
            run=self._run,
            width=lambda: hook.concurrency,
            changed=outbox.changed,
            clock=outbox.clock,
            generation=lambda: outbox.generation,
            notify=outbox.notify,
            workers=hook.concurrency,
        )

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, wait: float = 0.0) -> None:
        """No new runs; runs in flight get ``wait`` seconds to finish, then are killed
        (their events stay in the outbox and run again after the restart)."""
        self.scheduler.stop(wait)
        for proc in list(self._procs):
            _kill_group(proc)
        self.scheduler.stop(1.0)  # the killed runs report back

    def _run(self, due: Due) -> str:
        try:
            ok, detail = self._execute(due.body)
        except Exception as exc:  # a run that went wrong in our hands is a failed run
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if detail is STOPPED:  # still pending: it runs again after the restart
            return due.study_key
        if ok:
            self.outbox.done(due.event_id, self.name)
            METRICS.hook_runs.labels(self.name, "ok").inc()
            log.info(
                "hook.completed", hook=self.name, hook_event=due.body.get("event"), event_id=due.event_id
            )
            return due.study_key
        self._failed(due, detail)
        return due.study_key

    def _failed(self, due: Due, detail: str) -> None:
        attempts = self.outbox.attempts(due.event_id, self.name) + 1  # this run included
        fields = {
            "hook": self.name,
            "hook_event": due.body.get("event"),
            "event_id": due.event_id,
            "attempts": attempts,
            "reason": detail,
        }
        if attempts > self.hook.retries:
            self.outbox.failed(due.event_id, self.name, detail, None)
            METRICS.hook_runs.labels(self.name, "dead").inc()
            log.error("hook.failed", **fields)
            return
        delay = backoff(attempts, self.hook.backoff, MAX_BACKOFF)
        self.outbox.failed(due.event_id, self.name, detail, self.outbox.clock() + delay)
        METRICS.hook_runs.labels(self.name, "retry").inc()
        log.warning("hook.retry", retry_in=delay, **fields)

    def _execute(self, body: Mapping[str, object]) -> tuple[bool, str]:
        """One run: (exited 0, what to log about it).  A run that cannot even start, for
        whatever reason, is a failed run like any other: retried with backoff, then
        dead-lettered; never retried at once, never lost."""
        try:
            argv = events.argv(self.hook.exec, body)
            env = {**self._env, **events.environment(body)}
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills all of it
                close_fds=True,
            )
        except Exception as exc:  # OSError, ValueError (a NUL), a bug: each fails the run
            return False, f"cannot run {self.hook.exec[0]}: {type(exc).__name__}: {exc}"
        self._procs.add(proc)
        try:
            output, _ = proc.communicate(events.to_json(body).encode(), timeout=self.hook.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            return False, f"killed after {self.hook.timeout} s: {_tail(output)}"
        finally:
            self._procs.discard(proc)
        if self.scheduler.stopping.is_set() and proc.returncode < 0:  # killed by our own stop
            return False, STOPPED
        if proc.returncode == 0:
            return True, ""
        return False, f"exit status {proc.returncode}: {_tail(output)}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def _tail(output: bytes | None) -> str:
    return (output or b"")[-OUTPUT_TAIL:].decode("utf-8", "replace").strip()


class Hooks:
    """The running hooks; ``apply`` swaps them on reload (changed or removed hooks stop,
    new ones start; a removed hook's pending events go)."""

    def __init__(self, outbox: Outbox, environ: Mapping[str, str]) -> None:
        self.outbox = outbox
        self.environ = environ
        self.runners: dict[str, HookRunner] = {}

    def apply(self, hooks: Sequence[HookConfig]) -> None:
        """Stop the runners of hooks that changed or went; start the new ones (the outbox's
        consumers are set by the caller first)."""
        wanted = {h.name: h for h in hooks}
        for name, runner in list(self.runners.items()):
            if wanted.get(name) != runner.hook:
                runner.stop()
                del self.runners[name]
        for name, hook in wanted.items():
            if name not in self.runners:
                runner = HookRunner(self.outbox, hook, self.environ)
                self.runners[name] = runner
                runner.start()

    def stop(self, wait: float = 5.0) -> None:
        for runner in self.runners.values():
            runner.stop(wait)
