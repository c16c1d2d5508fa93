"""The state directory: where the receiver keeps what is not an object, away from the objects.

Why not in the output directory (where it was, as ``.dcmrecvd/``, until 0.9):
tools that walk an incoming directory take journal segments and SQLite files
for objects, and the usual cleanup job for one (``find DIR -type f -mmin +60
-delete``) deletes the journal under a running daemon.  dcmrecv writes nothing
there but objects; neither do we.

The state belongs to one output directory (``output-directory`` in it says
which): the journal's records name files under that directory, so a state
started with another one is refused rather than replayed into the wrong place.
An existing ``.dcmrecvd/`` (from before 0.9) is moved here once, and said so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
from collections.abc import Mapping
from pathlib import Path

import structlog

from dcmrecvd.errors import ConfigError

log = structlog.get_logger("dcmrecvd")

#: The file in the state directory naming the output directory it belongs to.
OWNER = "output-directory"
#: Where the state lived before 0.9, relative to the output or the old $STATE_DIRECTORY.
LEGACY = ".dcmrecvd"


def resolve(explicit: str, output: Path, environ: Mapping[str, str]) -> Path:
    """daemon.state_directory, else $STATE_DIRECTORY (the entry for state), else one per output
    directory under $XDG_STATE_HOME (or ~/.local/state): never inside the output directory."""
    if explicit:
        return Path(explicit).absolute()
    given = [Path(p) for p in environ.get("STATE_DIRECTORY", "").split(":") if p]
    if given:
        return _from_systemd(given, Path(os.path.abspath(output)))
    base = environ.get("XDG_STATE_HOME") or os.path.join(_home(environ), ".local", "state")
    absolute = os.path.abspath(output)
    digest = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (os.path.basename(absolute) or "root"))
    return Path(base) / "dcmrecvd" / f"{name[:64]}-{digest}"


def _from_systemd(given: list[Path], output: Path) -> Path:
    """The state among StateDirectory='s entries (systemd lists them in its own order): one
    named ``state``, else the first that is neither the output directory nor inside it."""
    outside = [p for p in given if p != output and output not in p.parents]
    named = [p for p in outside if p.name == "state"]
    return (named or outside or given)[0]


def _home(environ: Mapping[str, str]) -> str:
    home = environ.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return "/var/lib/dcmrecvd"


def prepare(state: Path, output: Path) -> None:
    """Make the state directory, move a legacy ``.dcmrecvd/`` into it once, and check that
    it belongs to ``output``.  Raises ConfigError (exit 1) when it belongs to another."""
    output = Path(os.path.abspath(output))
    if state == output or output in state.parents:
        log.warning(
            "state.inside_output",
            state_directory=str(state),
            output=str(output),
            hint="set daemon.state_directory outside the output directory: "
            "a cleanup job there deletes the journal",
        )
    try:
        state.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "configuration", "daemon.state_directory", f"cannot make {state}: {exc.strerror or exc}"
        ) from None
    _migrate(state, output)
    owner = state / OWNER
    try:
        recorded = owner.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    if recorded and recorded != str(output):
        raise ConfigError(
            "configuration",
            "daemon.state_directory",
            f"{state} holds the state of output directory {recorded}, not {output}: its journal "
            "names files there. Give this output directory a state directory of its own "
            "(daemon.state_directory), or point output.directory back at the one it belongs to",
        )
    if not recorded:
        _write_durably(owner, f"{output}\n")


def _migrate(state: Path, output: Path) -> None:
    """A ``.dcmrecvd/`` of before 0.9 (in the output directory, or in the old
    $STATE_DIRECTORY: this one's parent) moves here, unless the state has one already."""
    for legacy in (output / LEGACY, state / LEGACY, state.parent / LEGACY):
        if not legacy.is_dir() or legacy == state:
            continue
        if any(p.name not in (OWNER, LEGACY) for p in state.iterdir()):
            log.warning("state.legacy_left", legacy=str(legacy), state_directory=str(state))
            return
        moved = []
        for entry in sorted(legacy.iterdir()):
            _move(entry, state / entry.name)
            moved.append(entry.name)
        with contextlib.suppress(OSError):
            legacy.rmdir()
        _fsync_directory(state)
        log.warning("state.migrated", source=str(legacy), state_directory=str(state), moved=moved)
        return


def _move(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another filesystem
            raise
        if source.is_dir():
            shutil.copytree(source, target)
            shutil.rmtree(source)
        else:
            shutil.copy2(source, target)
            source.unlink()


def _write_durably(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.new")
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
