"""How a setting is declared: a dataclass field whose metadata carries its documentation
and constraints (the validator, ``--print-config``, the shipped file and the man page
read them from here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, field
from typing import Any


def opt(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: int | None = None,
    maximum: int | None = None,
    secret: bool = False,
    parse: Callable[[str], object] | None = None,
    one_or_many: bool = False,
    restart: bool = False,
) -> Any:
    """Declare one setting: its default and what the docs and validator need.

    ``parse`` checks a string's form (a size, an address); its ValueError becomes the
    config error, naming file and key.  ``one_or_many``: an array of strings that may be
    written as one string (``on = "study.complete"``), which means an array of it.
    ``restart``: a reload (SIGHUP) keeps the running value and says so; the docs say it
    too (``describe``), from this flag alone.
    """
    meta = {
        "doc": doc,
        "choices": choices,
        "min": minimum,
        "max": maximum,
        "secret": secret,
        "parse": parse,
        "one_or_many": one_or_many,
        "restart": restart,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


#: What the docs add to a setting declared with ``restart=True``.
RESTART_SENTENCE = "Needs a restart to change."


def describe(f: Field[Any]) -> str:
    """A setting's documentation as the shipped file and the man page show it."""
    doc = str(f.metadata["doc"])
    return f"{doc} {RESTART_SENTENCE}" if f.metadata.get("restart") else doc
