"""Who may send: ``[access]`` rules on calling AE title, called AE title and source address.

dcmrecv accepts every caller (its ``checkCallingAETitleAccepted`` and
``checkCallingHostAccepted`` hooks return true); ``default = "allow"`` with no
rules keeps that.  Rules are tried in order, the first that matches decides,
a rule's fields are ANDed and an absent field matches anything.  AE titles are
compared exactly (case-sensitive) after the trailing spaces PS3.8 pads them
with are removed; patterns are shell globs (``CT_*``).  Addresses are IPv4 or
IPv6 networks; an IPv4-mapped IPv6 peer (``::ffff:10.1.2.3``) matches IPv4
networks.  C-ECHO goes through the same rules: they decide on the association.

The refusal's reason follows the condition that decided (PS3.8 A-ASSOCIATE-RJ,
rejected-permanent, service-user): calling AE title not recognised (3) when
the deciding rule names calling AE titles, called AE title not recognised (7)
when it names only called ones, no reason given (1) otherwise.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACTIONS = ("allow", "deny")
FIELDS = ("action", "calling_aet", "called_aet", "from")

REASON_NO_REASON = 1
REASON_CALLING_AET = 3
REASON_CALLED_AET = 7

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """One ``[[access.rule]]``, compiled."""

    index: int  # 1-based, as a person counts the rules in the file
    allow: bool
    calling: tuple[str, ...] = ()
    called: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    def matches(
        self, calling: str, called: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ) -> bool:
        if self.calling and not any(fnmatch.fnmatchcase(calling, p) for p in self.calling):
            return False
        if self.called and not any(fnmatch.fnmatchcase(called, p) for p in self.called):
            return False
        if self.networks:
            if address is None:
                return False
            if not any(address.version == n.version and address in n for n in self.networks):
                return False
        return True

    @property
    def reason(self) -> int:
        if self.calling:
            return REASON_CALLING_AET
        if self.called:
            return REASON_CALLED_AET
        return REASON_NO_REASON


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: int | None  # None: the default decided
    reason: int = REASON_NO_REASON


@dataclass(frozen=True)
class Policy:
    """The compiled ``[access]`` table of one Runtime."""

    default_allow: bool = True
    rules: tuple[Rule, ...] = ()
    source: str = ""  # the config file the rules came from

    def decide(self, calling: str, called: str, host: str) -> Decision:
        address = parse_address(host)
        calling, called = calling.rstrip(" "), called.rstrip(" ")
        for rule in self.rules:
            if rule.matches(calling, called, address):
                return Decision(rule.allow, rule.index, REASON_NO_REASON if rule.allow else rule.reason)
        return Decision(self.default_allow, None)


def parse_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address; an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _strings(rule_no: int, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"rule {rule_no}: {name} must be a string or an array of strings")
    return tuple(v.rstrip(" ") for v in value)


def compile_rules(rules: Sequence[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """Check and compile ``[[access.rule]]`` tables; ValueError names the rule and field."""
    out = []
    for number, table in enumerate(rules, start=1):
        if not isinstance(table, Mapping):
            raise ValueError(f"rule {number} must be a table")
        unknown = set(table) - set(FIELDS)
        if unknown:
            raise ValueError(
                f"rule {number}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(FIELDS)})"
            )
        action = table.get("action")
        if action not in ACTIONS:
            raise ValueError(f"rule {number}: action must be 'allow' or 'deny', not {action!r}")
        networks = []
        for text in _strings(number, "from", table.get("from", [])):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"rule {number}: from: {text!r} is not an IPv4 or IPv6 network") from None
        out.append(
            Rule(
                index=number,
                allow=action == "allow",
                calling=_strings(number, "calling_aet", table.get("calling_aet", [])),
                called=_strings(number, "called_aet", table.get("called_aet", [])),
                networks=tuple(networks),
            )
        )
    return tuple(out)


def check_rules(rules: object) -> object:
    """The config validator of ``access.rule`` (an array of tables)."""
    if not isinstance(rules, list):
        raise ValueError("must be an array of tables ([[access.rule]])")
    return compile_rules(rules)


def check_network(text: str) -> Network:
    """An IPv4 or IPv6 network (``10.1.0.0/16``, ``::1/128``); ValueError otherwise."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv4 or IPv6 network") from None
