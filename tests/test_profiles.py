"""DCMTK asconfig parsing: DCMTK's own storescp.cfg, our shipped one, crafted broken files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import DCMTK_PROFILES, PROFILES, dcmrecvd

from dcmrecvd.errors import ProfileError
from dcmrecvd.wire import profiles, uids

pytestmark = pytest.mark.inprocess

HEAD = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit
[[PresentationContexts]]
[Store]
PresentationContext1 = CTImageStorage\\Uncompressed
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.4\\Uncompressed
PresentationContext3 = EnhancedMRImageStorage\\Uncompressed
"""


def parse(text: str, name: str = "P") -> profiles.Profile:
    return profiles.build_profile(profiles.parse_text(text, "test.cfg"), name)


@pytest.mark.parametrize("name", ["Default", "AllDICOM", "default", "ALLDICOM"])
def test_dcmtk_storescp_cfg(name: str) -> None:
    profile = profiles.load_profile(DCMTK_PROFILES, name)
    assert len(profile.contexts) == 128
    verification = profile.contexts[0]
    assert verification.abstract_syntax == uids.VERIFICATION
    little = sys.byteorder == "little"
    assert verification.transfer_syntaxes == (
        uids.EXPLICIT_LE if little else uids.EXPLICIT_BE,
        uids.EXPLICIT_BE if little else uids.EXPLICIT_LE,
        uids.IMPLICIT_LE,
    )
    ct = next(c for c in profile.contexts if c.abstract_syntax == "1.2.840.10008.5.1.4.1.1.2")
    assert ct.transfer_syntaxes[0] == "1.2.840.10008.1.2.4.91"  # JPEG2000 first: SCP preference
    assert len(ct.transfer_syntaxes) == 21


@pytest.mark.parametrize("name", ["Default", "AllDICOM"])
def test_shipped_profiles(name: str) -> None:
    profile = profiles.load_profile(PROFILES, name)
    assert 1 < len(profile.contexts) <= 128
    assert profile.contexts[0].abstract_syntax == uids.VERIFICATION


def test_names_keywords_and_numeric_uids() -> None:
    text = HEAD + "[[Profiles]]\n[P]\nPresentationContexts = Store\n"
    profile = parse(text)
    assert [c.abstract_syntax for c in profile.contexts] == [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.4.1",
    ]
    text = HEAD.replace("CTImageStorage", "ComputedRadiographyImageStorage").replace(
        "LittleEndianImplicit", "ImplicitVRLittleEndian"
    )  # pydicom keyword
    profile = parse(text + "[[Profiles]]\n[P]\nPresentationContexts = Store\n")
    assert profile.contexts[0].transfer_syntaxes[-1] == uids.IMPLICIT_LE


def test_case_whitespace_comments_and_continuations() -> None:
    text = (
        "# comment\n[[ transfersyntaxes ]]\n[un compressed]\ntransfersyntax1 = LittleEndianImplicit\n"
        "[[PRESENTATIONCONTEXTS]]\n[st.ore]\n"
        "presentationcontext1 = CTImageStorage\\\n   UNCOMPRESSED\n"
        "[[Profiles]]\n[My Profile]\nPresentationContexts = STORE\n"
    )
    profile = parse(text, "my profile")
    assert profile.contexts == (profiles.Context("1.2.840.10008.5.1.4.1.1.2", (uids.IMPLICIT_LE,)),)


def test_numbered_keys_stop_at_the_first_gap_and_first_duplicate_wins() -> None:
    text = (
        "[[TransferSyntaxes]]\n[T]\nTransferSyntax1 = LittleEndianImplicit\n"
        "TransferSyntax1 = BigEndianExplicit\nTransferSyntax3 = LittleEndianExplicit\n"
        "[[PresentationContexts]]\n[S]\nPresentationContext2 = MRImageStorage\\T\n"
        "PresentationContext1 = CTImageStorage\\T\n"
        "[[Profiles]]\n[P]\nPresentationContexts = S\n"
    )
    profile = parse(text)
    assert [c.abstract_syntax for c in profile.contexts] == [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
    ]
    assert profile.contexts[0].transfer_syntaxes == (uids.IMPLICIT_LE,)


def test_roles_and_extended_negotiation() -> None:
    text = HEAD + (
        "[[SCPSCURoleSelection]]\n[R]\nRole1 = CTImageStorage\\BOTH\nRole2 = MRImageStorage\\scu\n"
        "[[ExtendedNegotiation]]\n[E]\nExtendedNegotiation1 = CTImageStorage\\020003000000\n"
        "[[Profiles]]\n[P]\nPresentationContexts = Store\nSCPSCURoleSelection = R\nExtendedNegotiation = E\n"
    )
    profile = parse(text)
    assert profile.roles == {
        "1.2.840.10008.5.1.4.1.1.2": (True, True),
        "1.2.840.10008.5.1.4.1.1.4": (True, False),
    }
    assert profile.extended == {"1.2.840.10008.5.1.4.1.1.2": bytes.fromhex("020003000000")}


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (
            HEAD.replace("CTImageStorage", "NoSuchStorage")
            + "[[Profiles]]\n[P]\nPresentationContexts = Store\n",
            8,
            "unknown SOP class 'NoSuchStorage'",
        ),
        (
            HEAD.replace("LittleEndianImplicit", "LittleEndianImplicitX")
            + "[[Profiles]]\n[P]\nPresentationContexts = Store\n",
            5,
            "unknown transfer syntax",
        ),
        (
            HEAD.replace("\\Uncompressed\nPresentationContext2", "\\Nope\nPresentationContext2")
            + "[[Profiles]]\n[P]\nPresentationContexts = Store\n",
            8,
            "undefined transfer syntax list 'Nope'",
        ),
        (
            HEAD
            + "PresentationContext4 = CTImageStorage\\Uncompressed\n"
            + "[[Profiles]]\n[P]\nPresentationContexts = Store\n",
            11,
            "listed twice in an SCP profile",
        ),
        (
            HEAD + "[[Profiles]]\n[P]\nPresentationContexts = Missing\n",
            13,
            "undefined PresentationContexts list",
        ),
        (HEAD + "this line is garbage\n", 11, "malformed line"),
        (HEAD + "[[Profiles]\n", 11, "malformed heading"),
        ("Key = Value\n", 1, "entry outside any [section]"),
        ("  continued\n", 1, "continuation line without a preceding entry"),
        ("[Orphan]\n", 1, "outside any [[supersection]]"),
        (
            HEAD + "[[ExtendedNegotiation]]\n[E]\nExtendedNegotiation1 = CTImageStorage\\0G\n"
            "[[Profiles]]\n[P]\nPresentationContexts = Store\nExtendedNegotiation = E\n",
            13,
            "not hexadecimal",
        ),
        (
            HEAD + "[[SCPSCURoleSelection]]\n[R]\nRole1 = CTImageStorage\\MAYBE\n"
            "[[Profiles]]\n[P]\nPresentationContexts = Store\nSCPSCURoleSelection = R\n",
            13,
            "role must be",
        ),
    ],
)
def test_broken_files_name_line_and_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse(text)
    assert info.value.line == line
    assert reason in info.value.reason


def test_too_many_contexts() -> None:
    entries = "".join(f"PresentationContext{i} = 1.2.3.{i}\\Uncompressed\n" for i in range(1, 130))
    text = "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LittleEndianImplicit\n"
    text += "[[PresentationContexts]]\n[S]\n" + entries + "[[Profiles]]\n[P]\nPresentationContexts = S\n"
    with pytest.raises(ProfileError, match="more than 128"):
        parse(text)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown profile 'Nope' \\(profiles: ALLDICOM, DEFAULT\\)"):
        profiles.load_profile(DCMTK_PROFILES, "Nope")


def test_missing_file() -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        profiles.load_profile("/nonexistent.cfg", "Default")


def test_check_config_exits_66_naming_file_and_line(tmp_path: Path, config_dir: Path) -> None:
    broken = tmp_path / "broken.cfg"
    broken.write_text(
        HEAD.replace("CTImageStorage", "CTImageStorageX")
        + "[[Profiles]]\n[P]\nPresentationContexts = Store\n"
    )
    result = dcmrecvd(
        "--check-config", "-xf", str(broken), "P", "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 66
    assert f"{broken}:8: unknown SOP class 'CTImageStorageX'" in result.stderr
    for argv in (["-xf", "/nonexistent.cfg", "P"], ["-xf", str(DCMTK_PROFILES), "Nope"]):
        result = dcmrecvd("--check-config", *argv, "-od", str(tmp_path), "104", config_dir=config_dir)
        assert result.returncode == 66, result.stderr
