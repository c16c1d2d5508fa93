"""DCMTK association negotiation profiles (asconfig format) -> ``Profile``.

Faithful to DCMTK's ``OFConfigFile`` reader: keys and headings are
case-insensitive and lose every character outside ``[A-Z0-9_-]``; ``#``
starts a comment only in column 1; a line starting with whitespace continues
the previous value; numbered keys (``TransferSyntax1``, ``2``...) are read in
order until one is missing; of duplicate keys the first wins.  Pure: knows
nothing of pynetdicom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dcmrecvd.errors import ProfileError
from dcmrecvd.wire import uids

MAX_CONTEXTS = 128
_KEEP = re.compile(r"[^A-Z0-9_-]")


def mangle(name: str) -> str:
    """DCMTK's key mangling: upper case, only ``A-Z 0-9 _ -`` kept."""
    return _KEEP.sub("", name.upper())


@dataclass(frozen=True)
class Context:
    """A presentation context we accept: one SOP class, transfer syntaxes by preference."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    """What an association may negotiate with us."""

    name: str
    contexts: tuple[Context, ...]
    #: SOP class -> (SCU role, SCP role) we are willing to take.
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    #: SOP class -> raw extended negotiation application information.
    extended: dict[str, bytes] = field(default_factory=dict)
    source: str = ""


#: dcmrecv without a profile: Verification with Implicit VR Little Endian only.
VERIFICATION_ONLY = Profile(name="(none)", contexts=(Context(uids.VERIFICATION, (uids.IMPLICIT_LE,)),))


@dataclass
class _Entry:
    value: str
    line: int


@dataclass
class _Section:
    name: str
    line: int
    entries: dict[str, _Entry] = field(default_factory=dict)


@dataclass
class ConfigFile:
    """The tree of an asconfig file: supersection -> section -> key -> value."""

    source: str
    tree: dict[str, dict[str, _Section]] = field(default_factory=dict)

    def section(self, supersection: str, name: str) -> _Section | None:
        """A section by its (mangled) names, or None."""
        return self.tree.get(mangle(supersection), {}).get(mangle(name))


def parse_text(text: str, source: str) -> ConfigFile:
    """Read the INI-like tree, reporting malformed lines with their number."""
    cfg = ConfigFile(source)
    supersection: dict[str, _Section] | None = None
    section: _Section | None = None
    entry: _Entry | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        if line[0] in " \t":
            if entry is None:
                raise ProfileError(source, number, "continuation line without a preceding entry")
            entry.value += "\n" + line.strip()
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            entry = None
            depth = len(stripped) - len(stripped.lstrip("["))
            closing = len(stripped) - len(stripped.rstrip("]"))
            if depth not in (1, 2) or closing != depth:
                raise ProfileError(source, number, f"malformed heading {stripped!r}")
            name = mangle(stripped[depth:-depth])
            if not name:
                raise ProfileError(source, number, f"empty heading {stripped!r}")
            if depth == 2:
                supersection = cfg.tree.setdefault(name, {})
                section = None
            else:
                if supersection is None:
                    raise ProfileError(source, number, f"section [{name}] outside any [[supersection]]")
                # A repeated section name: the first one wins, as in DCMTK.
                section = supersection.setdefault(name, _Section(name, number))
            continue
        if "=" not in line:
            raise ProfileError(source, number, f"malformed line (expected Key = Value): {stripped!r}")
        if section is None:
            raise ProfileError(source, number, "entry outside any [section]")
        key_text, _, value = line.partition("=")
        key = mangle(key_text)
        if not key:
            raise ProfileError(source, number, f"malformed key in {stripped!r}")
        if key in section.entries:
            entry = _Entry("", number)  # first duplicate wins; absorb continuations
        else:
            entry = section.entries[key] = _Entry(value.strip(), number)
    return cfg


def _numbered(section: _Section, prefix: str) -> list[_Entry]:
    """Entries PREFIX1, PREFIX2... in order, up to the first gap (DCMTK's rule)."""
    out = []
    n = 1
    while (entry := section.entries.get(f"{prefix}{n}")) is not None:
        out.append(entry)
        n += 1
    return out


def _compact(value: str) -> str:
    return "".join(value.split())


def _split_pair(cfg: ConfigFile, entry: _Entry) -> tuple[str, str]:
    left, sep, right = _compact(entry.value).partition("\\")
    if not sep or not left or not right:
        raise ProfileError(cfg.source, entry.line, f"expected 'SOPClass\\Value', got {entry.value!r}")
    return left, right


def _uid(cfg: ConfigFile, entry: _Entry, name: str, what: str) -> str:
    uid = uids.resolve(name)
    if uid is None:
        raise ProfileError(cfg.source, entry.line, f"unknown {what} {name!r}")
    return uid


def _transfer_syntaxes(cfg: ConfigFile, label: str, entry: _Entry) -> tuple[str, ...]:
    section = cfg.section("TransferSyntaxes", label)
    if section is None:
        raise ProfileError(cfg.source, entry.line, f"undefined transfer syntax list {label!r}")
    values: list[str] = []
    for ts_entry in _numbered(section, "TRANSFERSYNTAX"):
        uid = _uid(cfg, ts_entry, _compact(ts_entry.value), "transfer syntax")
        if not uids.is_transfer_syntax(uid):
            raise ProfileError(cfg.source, ts_entry.line, f"{ts_entry.value!r} is not a transfer syntax")
        if uid not in values:
            values.append(uid)
    if not values:
        raise ProfileError(cfg.source, section.line, f"transfer syntax list {label!r} is empty")
    return tuple(values)


def _profile_ref(cfg: ConfigFile, profile: _Section, key: str) -> tuple[_Entry, _Section] | None:
    entry = profile.entries.get(key)
    if entry is None:
        return None
    supersection = {
        "PRESENTATIONCONTEXTS": "PresentationContexts",
        "SCPSCUROLESELECTION": "SCPSCURoleSelection",
        "EXTENDEDNEGOTIATION": "ExtendedNegotiation",
    }[key]
    target = cfg.section(supersection, entry.value)
    if target is None:
        raise ProfileError(cfg.source, entry.line, f"undefined {supersection} list {entry.value!r}")
    return entry, target


def build_profile(cfg: ConfigFile, name: str) -> Profile:
    """The named SCP profile, every reference and name resolved and checked."""
    profile = cfg.section("Profiles", name)
    if profile is None:
        known = ", ".join(sorted(cfg.tree.get("PROFILES", {}))) or "none"
        raise ProfileError(cfg.source, None, f"unknown profile {name!r} (profiles: {known})")
    ref = _profile_ref(cfg, profile, "PRESENTATIONCONTEXTS")
    if ref is None:
        raise ProfileError(cfg.source, profile.line, f"profile {name!r} has no PresentationContexts")
    _, pc_section = ref
    pc_entries = _numbered(pc_section, "PRESENTATIONCONTEXT")
    if len(pc_entries) > MAX_CONTEXTS:
        raise ProfileError(cfg.source, pc_section.line, f"more than {MAX_CONTEXTS} presentation contexts")
    contexts: list[Context] = []
    seen: dict[str, int] = {}
    for entry in pc_entries:
        sop_name, label = _split_pair(cfg, entry)
        sop = _uid(cfg, entry, sop_name, "SOP class")
        if sop in seen:
            raise ProfileError(
                cfg.source,
                entry.line,
                f"SOP class {sop_name} listed twice in an SCP profile (first on line {seen[sop]})",
            )
        seen[sop] = entry.line
        contexts.append(Context(sop, _transfer_syntaxes(cfg, label, entry)))
    roles: dict[str, tuple[bool, bool]] = {}
    if (ref := _profile_ref(cfg, profile, "SCPSCUROLESELECTION")) is not None:
        for entry in _numbered(ref[1], "ROLE"):
            sop_name, role = _split_pair(cfg, entry)
            flags = {"SCU": (True, False), "SCP": (False, True), "BOTH": (True, True)}
            if role.upper() not in flags:
                raise ProfileError(cfg.source, entry.line, f"role must be SCU, SCP or BOTH, not {role!r}")
            roles[_uid(cfg, entry, sop_name, "SOP class")] = flags[role.upper()]
    extended: dict[str, bytes] = {}
    if (ref := _profile_ref(cfg, profile, "EXTENDEDNEGOTIATION")) is not None:
        for entry in _numbered(ref[1], "EXTENDEDNEGOTIATION"):
            sop_name, hexdata = _split_pair(cfg, entry)
            try:
                data = bytes.fromhex(hexdata)
            except ValueError:
                raise ProfileError(cfg.source, entry.line, f"not hexadecimal: {hexdata!r}") from None
            extended[_uid(cfg, entry, sop_name, "SOP class")] = data
    return Profile(profile.name, tuple(contexts), roles, extended, cfg.source)


def load_profile(path: str | Path, name: str) -> Profile:
    """Read ``path`` and return profile ``name`` (ProfileError, exit 66, on any problem)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ProfileError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    return build_profile(parse_text(text, str(path)), name)


def with_context(profile: Profile, sop_class: str) -> Profile:
    """``profile`` accepting ``sop_class`` too (Implicit and Explicit VR Little Endian),
    unless it already names it (then its own transfer syntaxes stand)."""
    if any(c.abstract_syntax == sop_class for c in profile.contexts):
        return profile
    added = Context(sop_class, (uids.IMPLICIT_LE, uids.EXPLICIT_LE))
    return Profile(profile.name, (*profile.contexts, added), profile.roles, profile.extended, profile.source)


def with_verification(profile: Profile) -> Profile:
    """Verification is always answered, even when a profile forgets it."""
    if any(c.abstract_syntax == uids.VERIFICATION for c in profile.contexts):
        return profile
    verification = Context(uids.VERIFICATION, (uids.IMPLICIT_LE, uids.EXPLICIT_LE))
    return Profile(
        profile.name,
        (verification, *profile.contexts),
        profile.roles,
        profile.extended,
        profile.source,
    )
