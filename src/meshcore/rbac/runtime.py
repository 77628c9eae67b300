"""Per-request helpers the compiled RBAC programs call: the request's header map, addresses as
integer keys, the ``remote_ip`` from ``x-forwarded-for``, and bounded memo tables for the
matchers that cost more than a comparison (RE2, case folding over several candidates).

Everything here is pure and thread-safe (a memo table may compute a value twice under
concurrency; it never returns a wrong one).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping as _AbcMapping
from typing import Any, Callable, Dict, Optional, Union

import re2

from .._routing import INLINE_HEADERS, ascii_lower, simple_atoi
from .config import TAG_V4, TAG_V6

__all__ = [
    "COALESCED_HEADERS", "HOP_BY_HOP_HEADERS", "IP_KEYS", "MEMO_LIMIT", "IpKeys", "Memo", "RegexMemo", "address_key",
    "authority_of", "cut_query", "header_map", "in_range", "remote_key", "te_value",
]

logger = logging.getLogger(__name__)

#: Entries a memo table holds before it starts over (bounded memory under unique inputs).
MEMO_LIMIT = 4096

#: Headers whose repeated values Envoy's header map joins with "," (its inline headers, and the
#: custom inline headers its built-in extensions register; measured on Envoy 1.40); any other
#: repeated header is matched one value at a time (security.md §4 fact 2).
COALESCED_HEADERS = frozenset(INLINE_HEADERS | {
    "accept", "accept-encoding", "access-control-request-headers", "access-control-request-method",
    "authorization", "cache-control", "cdn-loop", "content-encoding", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "origin", "pragma", "referer",
})

#: Connection-specific headers Envoy's HTTP connection manager removes before the filters run
#: (and A41 requires to be treated as absent): a matcher on these never sees a value.
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})

_EMPTY: Dict[str, Any] = {}


class Memo(dict):
    """``memo[key]`` -> ``fn(key)``, computed once per key (up to :data:`MEMO_LIMIT` keys)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], bool]) -> None:
        super().__init__()
        self.fn = fn

    def __missing__(self, key: Any) -> bool:
        value = self.fn(key)
        if len(self) >= MEMO_LIMIT:
            self.clear()
        self[key] = value
        return value


class RegexMemo(dict):
    """``memo[s]``: RE2 full match of one pattern (an ``RE2::Set`` anchored at both ends, which
    answers from the DFA alone), memoised per string."""

    __slots__ = ("pattern", "_set")

    def __init__(self, pattern: str) -> None:
        super().__init__()
        options = re2.Options()
        options.log_errors = False
        s = re2.Set.FullMatchSet(options)
        s.Add(pattern)
        s.Compile()
        self.pattern = pattern
        self._set = s

    def matches(self, s: Union[str, bytes]) -> bool:
        if type(s) is str:
            try:
                data = s.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (surrogateescape'd bytes): as _routing.match_bytes
                data = s.encode("utf-8", "surrogatepass")
        else:
            data = s
        return self._set.Match(data) is not None

    def __missing__(self, s: str) -> bool:
        value = self.matches(s)
        if len(self) >= MEMO_LIMIT:
            self.clear()
        self[s] = value
        return value


# -- addresses --------------------------------------------------------------------------------

_V4_MAPPED = (0xFFFF << 32)


def address_key(address: Optional[str], *, mapped_to_v4: bool = True) -> int:
    """An address as ``TAG | int`` (see ``config.cidr_key``); ``None`` -> 0 (no IP address:
    matches no CIDR, as a pipe address in Envoy). ``::ffff:a.b.c.d`` becomes the IPv4 address
    when ``mapped_to_v4`` (a dual-stack socket's view of an IPv4 peer, as Envoy's non-v6only
    listeners report it); a ``%scope`` suffix is dropped. ValueError if not an address."""
    if address is None:
        return 0
    if type(address) is not str:
        raise TypeError(f"an IP address must be a str, got {type(address).__name__}")
    try:
        return TAG_V4 | int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):
        pass
    text = address.split("%", 1)[0]
    try:
        n = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        raise ValueError(f"{address!r} is not an IP address") from None
    if mapped_to_v4 and (n >> 32) == 0xFFFF:
        return TAG_V4 | (n & 0xFFFFFFFF)
    return TAG_V6 | n


class IpKeys(dict):
    """``keys[address]`` -> :func:`address_key`, memoised."""

    __slots__ = ()

    def __missing__(self, address: Optional[str]) -> int:
        value = address_key(address)
        if len(self) >= MEMO_LIMIT:
            self.clear()
        self[address] = value
        return value


#: The address-key memo every compiled engine shares.
IP_KEYS = IpKeys()

_XFF_WHITESPACE = " \t\f\v\n\r"  # StringUtil::ltrim/rtrim (isspace)


def _xff_address(value: str, hops: int) -> int:
    """Utility::getLastAddressFromXFF: drop ``hops`` trusted entries from the right, take the
    text after the last remaining comma (the whole value if there is none, or if the comma ends
    the value), trimmed; 0 unless it parses as an IPv4/IPv6 address (no port, no brackets)."""
    for _ in range(hops):
        comma = value.rfind(",")
        if comma < 0:
            return 0
        value = value[:comma]
    comma = value.rfind(",")
    if comma >= 0 and comma + 1 < len(value):
        value = value[comma + 1:]
    value = value.strip(_XFF_WHITESPACE)
    try:
        return TAG_V4 | int.from_bytes(socket.inet_pton(socket.AF_INET, value), "big")
    except (OSError, ValueError):
        pass
    try:
        return TAG_V6 | int.from_bytes(socket.inet_pton(socket.AF_INET6, value), "big")
    except (OSError, ValueError):
        return 0


def remote_key(hdrs: Dict[str, Any], source_key: int, hops: int) -> int:
    """``remote_ip`` as Envoy computes it with ``use_remote_address: false``: the last valid
    ``x-forwarded-for`` address (``hops`` = ``xff_num_trusted_hops`` entries skipped), else the
    peer."""
    xff = hdrs.get("x-forwarded-for")
    if xff is None:
        return source_key
    if type(xff) is not str:  # never split (COALESCED_HEADERS joins it), but be safe
        xff = ",".join(xff)
    key = _xff_address(xff, hops)
    return key if key else source_key


# -- headers ----------------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if type(value) is str:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"header {what} must be str or bytes, got {type(value).__name__}")


def header_map(headers: Any) -> Dict[str, Any]:
    """The request's headers as Envoy's header map holds them: lower-cased name -> value (a
    str: the only value, or the ``,``-joined values of a :data:`COALESCED_HEADERS` header) or a
    tuple of values (a repeated header, matched one value at a time).

    ``headers``: ``(name, value)`` pairs (str or bytes, e.g. ASGI's), or a mapping of name ->
    value or list of values. Pairs of lower-case str names without repeats (what HTTP/2 and
    ASGI servers deliver) take a fast path."""
    if not headers:
        return _EMPTY
    if type(headers) is list or type(headers) is tuple:
        try:
            d = dict(headers)
            keys = "".join(d)
            "".join(d.values())  # every value a str (TypeError otherwise)
        except (TypeError, ValueError):
            return _header_map_slow(headers)
        if len(d) == len(headers) and keys == keys.lower():
            return d
        return _header_map_slow(headers)
    if isinstance(headers, _AbcMapping):
        return _header_map_slow(headers.items())
    if isinstance(headers, (str, bytes)):
        raise TypeError("headers must be (name, value) pairs or a mapping")
    return _header_map_slow(list(headers))


def _header_map_slow(items: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise TypeError(f"headers must be (name, value) pairs, got {item!r}") from None
        key = ascii_lower(_text(name, "name"))
        if isinstance(value, (list, tuple)):
            values = [_text(v, "value") for v in value]
        else:
            values = [_text(value, "value")]
        for v in values:
            have = out.get(key)
            if have is None:
                out[key] = v
            elif key in COALESCED_HEADERS:
                # HeaderMapImpl::appendToHeader: an empty value adds nothing, and an empty
                # value so far gets no delimiter
                if v:
                    out[key] = have + "," + v if have else v
            elif type(have) is str:
                out[key] = (have, v)
            else:
                out[key] = have + (v,)
    return out


def authority_of(headers: Any) -> Optional[str]:
    """``:authority`` when the caller gave none: the ``:authority`` pseudo-header among the
    headers, else ``host`` (HTTP/1's Host is :authority; A41)."""
    hdrs = header_map(headers)
    for name in (":authority", "host"):
        v = hdrs.get(name)
        if v is not None:
            return v if type(v) is str else v[0]
    return None


def te_value(hdrs: Dict[str, Any]) -> Optional[str]:
    """``te`` as Envoy's connection manager leaves it (sanitizeTEHeader): ``"trailers"`` when
    one of its comma-separated values is exactly ``trailers`` (case-sensitive, surrounding
    whitespace ignored), else absent."""
    te = hdrs.get("te")
    if te is None:
        return None
    if type(te) is not str:
        te = ",".join(te)
    for token in te.split(","):
        if token.strip(" \t\n\v\f\r") == "trailers":
            return "trailers"
    return None


def cut_query(path: str) -> str:
    """PathUtil::removeQueryAndFragment: up to the first ``?`` or ``#``."""
    q = path.find("?")
    f = path.find("#")
    if q < 0 or (0 <= f < q):
        q = f
    return path if q < 0 else path[:q]


_INT64 = (-(2**63), 2**63 - 1)


def in_range(value: str, start: int, end: int) -> bool:
    """HeaderMatcher.range_match: absl::SimpleAtoi into int64, then ``start <= n < end``."""
    n = simple_atoi(value, *_INT64)
    return n is not None and start <= n < end


