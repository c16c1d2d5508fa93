"""Names and directories from identifiers: pure, and safe against hostile UIDs."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import PurePosixPath

import pytest

from dcmrecvd.serve import naming
from dcmrecvd.serve.naming import NamingScheme
from dcmrecvd.wire import uids

pytestmark = pytest.mark.inprocess

NOW = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("scheme", "pattern"),
    [
        (NamingScheme(), r"^CT\.1\.2\.3$"),
        (NamingScheme(filenames="unique", extension=".dcm"), r"^CT\.X\.2\.25\.\d+\.dcm$"),
        (NamingScheme(filenames="short-unique"), r"^CT_[0-9a-f]{16}$"),
        (NamingScheme(filenames="system-time"), r"^20240506070809\.123456\.CT$"),
    ],
)
def test_file_names(scheme: NamingScheme, pattern: str) -> None:
    assert re.match(pattern, naming.file_name(scheme, CT, "1.2.3", NOW))


def test_short_unique_names_differ() -> None:
    names = {naming.file_name(NamingScheme(filenames="short-unique"), CT, "1.2", NOW) for _ in range(1000)}
    assert len(names) == 1000


@pytest.mark.parametrize("uid", ["../x", "1..2", "1.2.", "", "1" * 65, "1.2/3", "1.2\x00", "a.b"])
def test_unsafe_uids(uid: str) -> None:
    with pytest.raises(uids.UnsafeIdentifier):
        naming.file_name(NamingScheme(), CT, uid, NOW)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240131", "data/2024/01/31"),
        ("2024.01.31", "data/2024/01/31"),
        ("20240131 ", "data/2024/01/31"),
        ("20240131\\20200101", "data/2024/01/31"),
        ("20240230", "undef/20240506"),
        (None, "undef/20240506"),
        ("2024", "undef/20240506"),
    ],
)
def test_series_date_directories(value: str | None, expected: str) -> None:
    scheme = NamingScheme(subdirectory="series-date")
    assert naming.directory_for(scheme, value, NOW.date()) == PurePosixPath(expected)
