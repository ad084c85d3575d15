"""PII scrubbing: e-mail addresses, IP addresses (v4 and v6) and phone numbers replaced by placeholders, counted
by kind. What datatrove's `PIIFormatter` covers (e-mails; IPv4, by default only public ones, checked with
`ipaddress`), extended to IPv6 and phone numbers, with case-insensitive e-mails and digit boundaries on IPs.

Placeholders are reserved-for-documentation values, so a scrubbed text reads naturally and a second pass finds
nothing new: email@example.com (RFC 2606), 192.0.2.1 (RFC 5737), 2001:db8::1 (RFC 3849), 555-0100 (a fictional
number, too short to be a phone number here).

Kinds
    email   local@domain.tld; addresses at example.com/.org/.net (reserved) are left alone
    ipv4    dotted quads of 0-255 not inside a longer dotted number; only global ones when `public_only`
    ipv6    colon-hex forms `ipaddress` accepts (full, `::`-compressed); only global ones when `public_only`
    phone   North American numbers with separators ((555) 123-4567, 555-123-4567, +1 555.123.4567) and
            international ones written with a leading + (+44 20 7946 0958): 10 to 15 digits

Runbook
    from tasks.common import pii
    text, found = pii.scrub("mail ann@mail.org", pii.KINDS)     # -> ("mail email@example.com", {"email": 1})
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("email", "ipv4", "ipv6", "phone")
PLACEHOLDERS: dict[str, str] = {
    "email": "email@example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "phone": "555-0100",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@((?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,})(?![\w-])",
    re.IGNORECASE,
)
_RESERVED_DOMAINS = ("example.com", "example.org", "example.net")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", re.IGNORECASE)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international, leading +
    r"|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American, with separators
    r")(?![\w])"
)


def _email_ok(match: re.Match, public_only: bool) -> bool:
    return match.group(1).lower() not in _RESERVED_DOMAINS


def _ip_ok(match: re.Match, public_only: bool) -> bool:
    try:
        ip = ipaddress.ip_address(match.group(0))
    except ValueError:
        return False
    return ip.is_global or not public_only


def _ipv6_ok(match: re.Match, public_only: bool) -> bool:
    return match.group(0).count(":") >= 2 and _ip_ok(match, public_only)


def _phone_ok(match: re.Match, public_only: bool) -> bool:
    return 10 <= sum(c.isdigit() for c in match.group(0)) <= 15


@dataclass(frozen=True)
class _Kind:
    pattern: re.Pattern[str]
    valid: Callable[[re.Match, bool], bool]
    hint: re.Pattern[str]  # something every match holds: the full pattern runs only on texts that have it


_KINDS: dict[str, _Kind] = {
    "email": _Kind(_EMAIL, _email_ok, re.compile("@")),
    "ipv4": _Kind(_IPV4, _ip_ok, re.compile(r"\d\.\d")),
    "ipv6": _Kind(_IPV6, _ipv6_ok, re.compile("::|:[0-9a-fA-F]{1,4}:")),
    "phone": _Kind(_PHONE, _phone_ok, re.compile(r"\d{3}[ .)-]|\+\d")),
}


def scrub(text: str, kinds: tuple[str, ...] | list[str], public_only: bool = True) -> tuple[str, Counter]:
    """(text with every match of `kinds` replaced by its placeholder, matches replaced per kind).

    Kinds apply in KINDS order (e-mails first, so an address's domain is never read as something else)."""
    found: Counter = Counter()
    for name in KINDS:
        if name not in kinds:
            continue
        kind = _KINDS[name]
        if not kind.hint.search(text):
            continue

        def replace(match: re.Match, name: str = name, kind: _Kind = kind) -> str:
            if not kind.valid(match, public_only):
                return match.group(0)
            found[name] += 1
            return PLACEHOLDERS[name]

        text = kind.pattern.sub(replace, text)
    return text, found


__all__ = ["KINDS", "PLACEHOLDERS", "scrub"]
