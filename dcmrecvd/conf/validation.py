"""Checking one table of a config layer against its schema: keys known, values typed.

Why apart from ``config``: the top-level tables, the sub-tables (``sub_tables``)
and each ``[ae.<TITLE>]`` are checked by the same rules, and a rule said once
gives the same message wherever a key is (file, dotted key, reason).  TOML is
typed: nothing is coerced.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from dcmrecvd.errors import ConfigError


def suggest(name: str, known: Iterable[str]) -> str:
    """A close known name for a misspelt one, as a message tail ("" when none is close)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate_table(source: str, prefix: str, cls: type, table: Any) -> dict[str, Any]:
    """``table`` checked against the dataclass ``cls``: a normalised copy (``prefix``: its dotted name)."""
    if not isinstance(table, Mapping):
        raise ConfigError(source, prefix, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{prefix}.{name}"
        if name not in fields:
            raise ConfigError(source, dotted, "unknown key" + suggest(name, fields))
        out[name] = check_value(source, dotted, fields[name], value)
    return out


def type_name(value: Any) -> str:
    """A TOML value's type, as a message names it."""
    return {bool: "boolean", int: "integer", str: "string", list: "array", float: "float"}.get(
        type(value), type(value).__name__
    )


def check_value(source: str, dotted: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Type and range check of one value. TOML is typed: nothing is coerced."""
    meta = f.metadata
    expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(source, dotted, f"expected a boolean, got {type_name(value)}")
    elif expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, dotted, f"expected an integer, got {type_name(value)}")
        if meta["min"] is not None and value < meta["min"]:
            raise ConfigError(source, dotted, f"{value} is below the minimum {meta['min']}")
        if meta["max"] is not None and value > meta["max"]:
            raise ConfigError(source, dotted, f"{value} is above the maximum {meta['max']}")
        if meta["parse"] is not None:
            try:
                meta["parse"](value)
            except ValueError as exc:
                raise ConfigError(source, dotted, str(exc)) from None
    elif expected == "str":
        if not isinstance(value, str):
            raise ConfigError(source, dotted, f"expected a string, got {type_name(value)}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(
                source,
                dotted,
                f"'{value}' is not one of {', '.join(meta['choices'])}" + suggest(value, meta["choices"]),
            )
        if meta["parse"] is not None:
            try:
                meta["parse"](value)
            except ValueError as exc:
                raise ConfigError(source, dotted, str(exc)) from None
    elif expected == "list[str]":
        if isinstance(value, str) and meta.get("one_or_many"):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            example = json.dumps(value.split() or [value]) if isinstance(value, str) else '["..."]'
            raise ConfigError(
                source,
                dotted,
                f"expected an array of strings, got {type_name(value)} (write {dotted.rsplit('.', 1)[-1]}"
                f" = {example})",
            )
        value = list(value)
        if meta["parse"] is not None:
            for item in value:
                try:
                    meta["parse"](item)
                except ValueError as exc:
                    raise ConfigError(source, dotted, str(exc)) from None
    elif expected == "list[dict[str, Any]]":
        try:
            meta["parse"](value)
        except ValueError as exc:
            raise ConfigError(source, dotted, str(exc)) from None
        value = [dict(v) for v in value]
    return value
