"""Subject-alt-name checks of an upstream's certificate, with Envoy's semantics.

Envoy (``default_validator.cc``, ``san_matcher.cc``): a certificate passes when ANY of its SANs of
a matcher's type satisfies ANY matcher; no matchers, no check. The deprecated untyped
``match_subject_alt_names`` is tried against the DNS, URI, email and IP SANs. A DNS matcher of
kind ``exact`` is ``dnsNameMatch``: ASCII-case-insensitive, and a certificate SAN whose leftmost
label holds one ``*`` (``*.example.com``, ``ba*.example.net``, ``*z.example.io``; not an A-label
``xn--*``) covers any run of characters, even none, within exactly that one label. IP SANs are
compared in the text glibc's ``inet_ntop`` gives (what Envoy uses): ``127.0.0.1``,
``2001:db8::1``, and the dotted tail of IPv4-mapped/-compatible addresses (``::ffff:10.0.0.1``,
``::10.0.0.2``), where Python's ``ipaddress`` would print hex.

``tests/tls/test_envoy_san_oracle.py`` checks these decisions against a real Envoy.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["peer_sans", "sans_match", "describe_sans", "describe_matchers", "dns_name_match"]

#: ``ssl.SSLSocket.getpeercert()`` SAN type names -> Envoy's SubjectAltNameMatcher types
_TYPES = {"DNS": "DNS", "URI": "URI", "email": "EMAIL", "IP Address": "IP_ADDRESS"}
_UNTYPED = ("DNS", "URI", "EMAIL", "IP_ADDRESS")


_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = str.maketrans(_UPPER, _UPPER.lower())


def _ascii_lower(s: str) -> str:
    """``absl::AsciiStrToLower``: only A-Z change (also inside a non-ASCII string)."""
    return s.translate(_ASCII_LOWER)


def _inet_ntop6(packed: bytes) -> str:
    """glibc's ``inet_ntop(AF_INET6)`` (BIND's ``inet_ntop6``), which Envoy formats IP SANs with:
    the first longest run (>= 2) of zero groups becomes ``::``; ``::ffff:a.b.c.d`` and
    ``::a.b.c.d`` keep their IPv4 tail dotted."""
    words = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
    for i, w in enumerate(words + [1]):  # the sentinel closes a trailing run
        if w == 0 and i < 8:
            if cur_base == -1:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
        elif cur_base != -1:
            if best_base == -1 or cur_len > best_len:
                best_base, best_len = cur_base, cur_len
            cur_base = -1
    if best_len < 2:
        best_base = -1
    out = ""
    for i in range(8):
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                out += ":"
            continue
        if i:
            out += ":"
        if i == 6 and best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
            out += ".".join(str(b) for b in packed[12:])
            break
        out += f"{words[i]:x}"
    if best_base != -1 and best_base + best_len == 8:
        out += ":"
    return out


def _ip_text(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return value.strip()
    return _inet_ntop6(ip.packed) if ip.version == 6 else str(ip)


def peer_sans(cert: Dict[str, Any]) -> Dict[str, List[str]]:
    """``getpeercert()`` (verified form) -> ``{"DNS": [...], "URI": [...], "EMAIL": [...], "IP_ADDRESS": [...]}``."""
    out: Dict[str, List[str]] = {"DNS": [], "URI": [], "EMAIL": [], "IP_ADDRESS": []}
    for kind, value in cert.get("subjectAltName", ()):
        t = _TYPES.get(kind)
        if t is None:
            continue
        out[t].append(_ip_text(value) if t == "IP_ADDRESS" else value)
    return out


def _label_wildcard_match(label: str, pattern: str) -> bool:
    """Envoy's ``labelWildcardMatch``: ``*`` alone matches any label; else exactly one ``*``
    standing for zero or more characters."""
    if pattern == "*":
        return True
    if pattern.count("*") == 1:
        head, _, tail = pattern.partition("*")
        return len(pattern) <= len(label) + 1 and label.startswith(head) and label.endswith(tail)
    return False


def dns_name_match(expected: str, san: str) -> bool:
    """Envoy's ``dnsNameMatch``: ``expected`` (config) against a certificate DNS SAN, equal up to
    ASCII case, or the SAN's leftmost label is a wildcard (one ``*``, not an ``xn--`` A-label)
    covering ``expected``'s leftmost label and the rest is equal."""
    name = _ascii_lower(expected)
    pattern = _ascii_lower(san)
    if name == pattern:
        return True
    p_label, p_dot, p_rest = pattern.partition(".")
    n_label, n_dot, n_rest = name.partition(".")
    if not p_dot or not n_dot:  # both need more than one label
        return False
    if "*" in p_label and "*" not in p_rest and not p_label.startswith("xn--"):
        return n_rest == p_rest and _label_wildcard_match(n_label, p_label)
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
