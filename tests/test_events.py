"""Every event the package logs is declared in logs.EVENTS (its journald MESSAGE_ID and the man
page come from there), and every declared event is logged somewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dcmrecvd
from dcmrecvd.ops import logs

pytestmark = pytest.mark.inprocess

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
EVENT = re.compile(r"^[a-z_]+(\.[a-z_]+)?$")


def emitted() -> set[str]:
    names = set()
    for path in Path(dcmrecvd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and EVENT.match(node.args[0].value)
            ):
                names.add(node.args[0].value)
    return names


def test_every_logged_event_is_declared_and_every_declared_one_is_logged() -> None:
    logged = emitted()
    assert len(logged) > 25
    assert sorted(logged - set(logs.EVENTS)) == [], "logged but not in logs.EVENTS"
    assert sorted(set(logs.EVENTS) - logged) == [], "in logs.EVENTS but never logged"
    assert len(set(logs.EVENTS)) == len(logs.EVENTS)
