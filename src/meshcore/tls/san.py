"""Subject-alt-name checks of an upstream's certificate, with Envoy's semantics.

Envoy (``default_validator.cc``, ``san_matcher.cc``): a certificate passes when ANY of its SANs of
a matcher's type satisfies ANY matcher; no matchers, no check. The deprecated untyped
``match_subject_alt_names`` is tried against the DNS, URI, email and IP SANs. A DNS matcher of
kind ``exact`` compares ASCII-case-insensitively and accepts a certificate wildcard
``*.example.com`` for one leftmost label (``dnsNameMatch``). IP SANs are compared in their
canonical text form (``127.0.0.1``, ``2001:db8::1``).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["peer_sans", "sans_match", "describe_sans", "describe_matchers", "dns_name_match"]

#: ``ssl.SSLSocket.getpeercert()`` SAN type names -> Envoy's SubjectAltNameMatcher types
_TYPES = {"DNS": "DNS", "URI": "URI", "email": "EMAIL", "IP Address": "IP_ADDRESS"}
_UNTYPED = ("DNS", "URI", "EMAIL", "IP_ADDRESS")


def _ip_text(value: str) -> str:
    try:
        return ipaddress.ip_address(value.strip()).compressed
    except ValueError:
        return value.strip()


def peer_sans(cert: Dict[str, Any]) -> Dict[str, List[str]]:
    """``getpeercert()`` (verified form) -> ``{"DNS": [...], "URI": [...], "EMAIL": [...], "IP_ADDRESS": [...]}``."""
    out: Dict[str, List[str]] = {"DNS": [], "URI": [], "EMAIL": [], "IP_ADDRESS": []}
    for kind, value in cert.get("subjectAltName", ()):
        t = _TYPES.get(kind)
        if t is None:
            continue
        out[t].append(_ip_text(value) if t == "IP_ADDRESS" else value)
    return out


def dns_name_match(expected: str, san: str) -> bool:
    """Envoy's ``dnsNameMatch``: ``expected`` (config) against a certificate DNS SAN, which may be a
    ``*.`` wildcard covering exactly one leftmost label."""
    name = expected.lower() if expected.isascii() else expected
    pattern = san.lower() if san.isascii() else san
    if name == pattern:
        return True
    n = len(pattern)
    if n > 1 and pattern[0] == "*" and pattern[1] == ".":
        if len(name) > n - 1:
            off = len(name) - n + 1
            return "." not in name[:off] and name[off:] == pattern[1:]
    return False


def _one(matcher: Any, san_type: str, value: str) -> bool:
    if san_type == "DNS" and matcher.kind == "exact":
        return dns_name_match(matcher.value, value)  # case-insensitive, ignore_case or not
    return bool(matcher.matches(value))


def sans_match(matchers: Sequence[Any], sans: Dict[str, List[str]]) -> bool:
    """Whether the SANs satisfy the matchers (``SanMatcherSpec``s; empty: always)."""
    if not matchers:
        return True
    for m in matchers:
        types: Tuple[str, ...] = (m.san_type,) if m.san_type else _UNTYPED
        for t in types:
            for value in sans.get(t, ()):
                if _one(m.matcher, t, value):
                    return True
    return False


def describe_sans(sans: Dict[str, List[str]]) -> str:
    parts = [f"{t}:{v}" for t in ("URI", "DNS", "IP_ADDRESS", "EMAIL") for v in sans.get(t, ())]
    return "[" + ", ".join(parts) + "]" if parts else "[] (none)"


def describe_matchers(matchers: Sequence[Any]) -> str:
    parts = []
    for m in matchers:
        sm = m.matcher
        how = sm.kind + (" (ignore case)" if sm.ignore_case else "")
        parts.append(f"{m.san_type or 'any'} {how} {sm.value!r}")
    return "[" + ", ".join(parts) + "]"
