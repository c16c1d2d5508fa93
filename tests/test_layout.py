"""The shape of the package, kept: every module in a layer, no class that does five jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dcmrecvd

pytestmark = pytest.mark.inprocess

PACKAGE = Path(dcmrecvd.__file__).parent
#: The longest a class may grow before it is doing more than one job (#22).
MAX_CLASS_LINES = 300
#: Modules that sit above the layers (or beside all of them).
TOP = {
    "__init__",
    "__main__",
    "cli",
    "cli_forward",
    "cli_journal",
    "cli_subcommand",
    "lifecycle",
    "manpage",
    "errors",
    "signal_inbox",
    "detach",
}


def test_no_class_is_over_300_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({size} lines)")
    assert long == []


def test_every_module_is_in_a_layer_and_every_layer_says_what_it_may_import() -> None:
    stray = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in TOP)
    assert stray == [], "modules beside the layers: put each in the package of its layer"
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name == "data":
            continue
        assert "May import" in (ast.get_docstring(ast.parse(init.read_text())) or ""), init
