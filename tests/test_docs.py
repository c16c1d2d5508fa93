"""The shipped documents are generated from the code, so they cannot drift."""

from __future__ import annotations

import subprocess

from conftest import ROOT

from dcmrecvd import manpage
from dcmrecvd.conf import flags
from dcmrecvd.ops import logs


def test_man_pages_are_current() -> None:
    assert (ROOT / "packaging/man/dcmrecvd.8").read_text() == manpage.dcmrecvd_8()
    assert (ROOT / "packaging/man/dcmrecvd.toml.5").read_text() == manpage.dcmrecvd_toml_5()


def test_man_page_lists_every_option_and_message_id() -> None:
    page = manpage.dcmrecvd_8()
    for opt in flags.OPTIONS:
        assert manpage._esc(opt.long) in page, opt.long
    for event in logs.EVENTS:
        assert logs.message_id(event) in page


def test_man_pages_render_without_warnings() -> None:
    for page in ("dcmrecvd.8", "dcmrecvd.toml.5"):
        result = subprocess.run(
            ["man", "--warnings", "-l", str(ROOT / "packaging/man" / page)],
            capture_output=True,
            text=True,
            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0
        assert "warning" not in result.stderr, result.stderr


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("---")[0]
    assert "make run" in head and "make test" in head
