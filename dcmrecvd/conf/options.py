"""How a setting is declared: a dataclass field whose metadata carries its documentation
and constraints (the validator, ``--print-config``, the shipped file and the man page
read them from here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
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
) -> Any:
    """Declare one setting: its default and what the docs and validator need.

    ``parse`` checks a string's form (a size, an address); its ValueError becomes the
    config error, naming file and key.  ``one_or_many``: an array of strings that may be
    written as one string (``on = "study.complete"``), which means an array of it.
    """
    meta = {
        "doc": doc,
        "choices": choices,
        "min": minimum,
        "max": maximum,
        "secret": secret,
        "parse": parse,
        "one_or_many": one_or_many,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
