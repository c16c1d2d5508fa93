"""Tables below the top level, each declared once: ``[events.amqp]``, ``[[commitment.peer]]``,
``[[forward]]``, ``[[hooks]]``.

Why a declaration: each of them used to be special-cased wherever the config is
read, merged, printed, shipped and documented (six places), and a new one (the
audit trail's) would have meant six more edits.  A ``SubTable`` says where it is
(its dotted ``path``), its schema, whether it is an array of tables (a later
file's list replaces the earlier one) or one nested table (merged key by key),
the key its rows must not share, its row check, its example for the shipped
file and its paragraph for the man page; ``config`` and ``manpage`` loop over
the declarations.  ``[ae.<TITLE>]`` is not one of them: its tables are the
top-level ones again, per called AE title (``config.receiver_tables``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dcmrecvd.conf.remote import renamed
from dcmrecvd.conf.validation import validate_table
from dcmrecvd.errors import ConfigError

#: A row check: "key: what is wrong" ("" when nothing).
RowCheck = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class SubTable:
    """One table below the top level; see the module docstring."""

    #: Dotted, as the TOML writes it: "events.amqp", "commitment.peer", "hooks".
    path: str
    #: The ``Config`` field that holds it.
    attribute: str
    schema: type
    #: ``[[path]]`` (rows) or ``[path]`` (one table).
    array: bool
    #: The man page's paragraph about it.
    about: str
    #: The shipped file's comment lines above it.
    intro: tuple[str, ...] = ()
    #: An array's row shown (commented out) in the shipped file.
    example: Any = None
    #: The key no two rows may share.
    unique: str = ""
    check: RowCheck | None = None
    #: Keys with a form of their own (a table): key -> parse(value), ValueError when wrong.
    parsers: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    #: Keys written as the shipped file shows them (instead of the example's value).
    shown: Mapping[str, str] = field(default_factory=dict)
    #: Fills a row's defaults that depend on its place (``hooks``: name = hook<N>).
    complete: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None
    #: Keys the docs show first (a destination's name before the remote AE's keys).
    lead: tuple[str, ...] = ()

    def documented_fields(self) -> list[dataclasses.Field[Any]]:
        """Its keys in the order the shipped file and the man page show them."""
        fields = dataclasses.fields(self.schema)
        first = [f for name in self.lead for f in fields if f.name == name]
        return first + [f for f in fields if f.name not in self.lead]

    @property
    def parent(self) -> str:
        """The top-level table it sits in ("" for a top-level array such as [[hooks]])."""
        return self.path.rpartition(".")[0]

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]

    def validate(self, source: str, value: Any, notes: list[str]) -> Any:
        """One layer's value checked: a list of rows, or one table.  ``notes`` gets
        each old key name read as its new one."""
        if not self.array:
            return self._row(source, self.path, value, notes)
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(source, self.path, f"must be an array of tables ([[{self.path}]])")
        rows: list[dict[str, Any]] = []
        for i, table in enumerate(value, 1):
            prefix = f"{self.path}[{i}]"
            row = self._row(source, prefix, table, notes)
            if self.unique and any(r.get(self.unique) == row.get(self.unique) for r in rows):
                raise ConfigError(source, f"{prefix}.{self.unique}", f"'{row[self.unique]}' is used twice")
            rows.append(row)
        return rows

    def _row(self, source: str, prefix: str, table: Any, notes: list[str]) -> dict[str, Any]:
        if not isinstance(table, Mapping):
            raise ConfigError(source, prefix, "must be a table")
        try:
            table, written = renamed(self.path, table)
        except ValueError as exc:
            raise ConfigError(source, f"{prefix}.{str(exc).split(':')[0]}", str(exc)) from None
        notes.extend(
            f"{source}: {prefix}.{old} -> {new} (the old name is still read)" for new, old in written.items()
        )
        apart = {k: table.pop(k) for k in list(table) if k in self.parsers}
        row = validate_table(source, prefix, self.schema, table)
        for key, raw in apart.items():
            try:
                row[key] = self.parsers[key](raw)
            except ValueError as exc:
                raise ConfigError(source, f"{prefix}.{key}", str(exc)) from None
        problem = self.check(row) if self.check is not None else ""
        if problem:  # named as the file writes it
            key, _, why = problem.partition(":")
            key = written.get(key, key)
            raise ConfigError(source, f"{prefix}.{key}", f"{key}:{why}")
        return row

    def build(self, value: Any) -> Any:
        """The frozen value of what the layers left (rows or one table)."""
        if not self.array:
            return self.schema(**(value or {}))
        rows = value or []
        return tuple(
            self.schema(**(self.complete(i, r) if self.complete else r)) for i, r in enumerate(rows, 1)
        )

    def to_mapping(self, value: Any) -> Any:
        """Plain data of the frozen value, as TOML writes it."""
        if not self.array:
            return _plain(value)
        return [_plain(row) for row in value]


def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            value = {key: list(globs) for key, globs in value}  # a table of its own (match)
        out[f.name] = value
    return out
