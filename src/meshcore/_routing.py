"""Request-side helpers shared by both route-table twins: header model, query parsing,
rewrites, redirects, request hashing, and the match result type.

Envoy sources: source/common/http/header_utility.cc, source/common/router/config_impl.cc,
source/common/http/hash_policy.cc, source/common/http/utility.cc (query parsing).
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping as _AbcMapping  # isinstance against typing.Mapping is slow
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ._fast.hashing_py import xxh64

__all__ = [
    "RouteMatch",
    "apply_rewrites",
    "ascii_lower",
    "compute_hash",
    "hash_bytes",
    "match_bytes",
    "header_values",
    "is_grpc",
    "normalise_headers",
    "parse_query",
    "redirect_location",
    "simple_atoi",
    "simple_atoi_u64",
    "simple_atoi_unsigned",
    "header_pairs",
    "split_host_port",
    "strip_path_params",
    "tls_redirect",
]

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = str.maketrans(_UPPER, _UPPER.lower())

# Headers Envoy stores inline (envoy/http/header_map.h INLINE_REQ_*_HEADERS and
# INLINE_REQ_RESP_*_HEADERS): its HTTP/1 codec appends repeated values with ",".
INLINE_HEADERS = frozenset({
    "x-client-trace-id", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node",
    "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal", "x-envoy-ip-tags", "x-envoy-retry-on", "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names", "x-envoy-is-timeout-retry",
    "x-envoy-original-path", "x-envoy-original-url", "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-alt-response", "expect", "x-forwarded-client-cert",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "grpc-timeout", "te", "user-agent",
    "x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms", "x-envoy-max-retries",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-stream-duration-ms", "grpc-accept-encoding", "connection", "content-length",
    "content-type", "x-envoy-decorator-operation", "keep-alive", "proxy-connection",
    "x-request-id", "transfer-encoding", "upgrade", "via",
})


def ascii_lower(s: str) -> str:
    """absl::AsciiStrToLower: only A-Z change."""
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


# -- request strings that are not valid UTF-8 -----------------------------------------------------
#
# A server that decodes raw request bytes with ``surrogateescape`` hands us lone surrogates
# (U+DC80..U+DCFF for each byte that is not UTF-8); callers may pass other lone surrogates too.
# ``str.encode()`` refuses both, so every place that needs bytes goes through one of these:
#
# * matching (path tries, RE2): ``match_bytes``, UTF-8 with ``surrogatepass``. Every code point,
#   lone surrogates included, becomes its own self-delimiting byte sequence, and a surrogate's
#   sequence never occurs in configured strings (protobuf strings are valid UTF-8). So comparing
#   these bytes is comparing code points: exact/prefix/suffix/contains matchers behave on bytes
#   as on ``str``. RE2 reads such a sequence as one (non-ASCII) character.
#   For text that came from ``surrogateescape`` decoding this is also Envoy's byte-wise result:
#   configured (valid UTF-8) strings match the raw bytes exactly where they match the text.
# * hashing: ``hash_bytes`` gives the bytes the server received: U+DC80..U+DCFF back to the byte
#   they escape (Envoy hashes the raw header bytes), other lone surrogates with surrogatepass.


def _raw_bytes_errors(err: UnicodeError) -> Tuple[bytes, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = bytearray()
    for ch in err.object[err.start:err.end]:
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(cp - 0xDC00)
        else:
            out += ch.encode("utf-8", "surrogatepass")
    return bytes(out), err.end


_RAW_BYTES = "meshcore.rawbytes"
codecs.register_error(_RAW_BYTES, _raw_bytes_errors)


def hash_bytes(s: str) -> bytes:
    """The bytes a request string stands for, for hashing (see above)."""
    try:
        return s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", _RAW_BYTES)


def match_bytes(s: str) -> bytes:
    """A request string as bytes for matching: UTF-8, lone surrogates passed through."""
    return s.encode("utf-8", "surrogatepass")


def regex_fullmatch(rx: Any, s: str) -> bool:
    """``rx.fullmatch(s) is not None`` for any string (RE2 wants UTF-8: see ``match_bytes``)."""
    try:
        return rx.fullmatch(s) is not None
    except UnicodeEncodeError:
        return rx.fullmatch(match_bytes(s)) is not None


def _from_match_bytes(b: bytes) -> str:
    try:
        return b.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # RE2's \C can cut a character: keep the odd bytes escaped
        return b.decode("utf-8", "surrogateescape")


class RouteMatch:
    """The routing decision for one request (what Envoy's router would act on).

    ``cluster`` is the chosen cluster (``""`` when a ``cluster_header`` is absent; ``None`` for
    direct responses and redirects); ``direct_response`` is ``(status, body)``; ``redirect``
    the ``Location`` URL (``redirect_code`` its status); ``timeout`` seconds (``None``:
    disabled); ``hash`` the request hash from the route's hash policies (``None``: none);
    ``path_rewrite`` the upstream ``:path`` after ``prefix_rewrite``/``regex_rewrite`` (``None``:
    unchanged); ``host_rewrite`` a literal host rewrite. Results of routes whose outcome does
    not depend on the request are shared, immutable objects.
    """

    __slots__ = ("virtual_host", "route_name", "cluster", "direct_response", "redirect", "timeout",
                 "retry_policy", "hash", "path_rewrite", "host_rewrite", "cluster_not_found_response_code",
                 "redirect_code", "route")
    _FIELDS = __slots__

    virtual_host: str
    route_name: str
    cluster: Optional[str]
    direct_response: Optional[Tuple[int, str]]
    redirect: Optional[str]
    timeout: Optional[float]
    retry_policy: Any
    hash: Optional[int]
    path_rewrite: Optional[str]
    host_rewrite: Optional[str]
    cluster_not_found_response_code: int
    redirect_code: Optional[int]
    route: Any

    def __init__(self, virtual_host: str, route_name: str, cluster: Optional[str],
                 direct_response: Optional[Tuple[int, str]], redirect: Optional[str], timeout: Optional[float],
                 retry_policy: Any, hash: Optional[int], path_rewrite: Optional[str] = None,
                 host_rewrite: Optional[str] = None, cluster_not_found_response_code: int = 503,
                 redirect_code: Optional[int] = None, route: Any = None) -> None:
        self.virtual_host = virtual_host
        self.route_name = route_name
        self.cluster = cluster
        self.direct_response = direct_response
        self.redirect = redirect
        self.timeout = timeout
        self.retry_policy = retry_policy
        self.hash = hash
        self.path_rewrite = path_rewrite
        self.host_rewrite = host_rewrite
        self.cluster_not_found_response_code = cluster_not_found_response_code
        self.redirect_code = redirect_code
        self.route = route

    def _key(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._FIELDS[:-1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteMatch):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._FIELDS[:-1] if getattr(self, f) is not None)
        return f"RouteMatch({shown})"


def normalise_headers(
    headers: Union[None, Mapping[str, str], Iterable[Tuple[str, str]]],
    authority: Optional[str], path: str, method: str, scheme: str,
) -> Dict[str, List[str]]:
    """Lower-cased name -> values, plus the pseudo-headers, as Envoy's router sees them."""
    out: Dict[str, List[str]] = {}
    if headers is not None:
        items = headers.items() if type(headers) is dict or isinstance(headers, _AbcMapping) else headers
        for name, value in items:
            key = name.lower() if name.isascii() else ascii_lower(name)
            if key == "host" or key[:1] == ":":
                continue  # HTTP/1 Host is :authority; pseudo-headers come from the arguments
            values = out.get(key)
            if values is None:
                out[key] = [value]
            elif key in INLINE_HEADERS:
                values[0] = values[0] + "," + value
            else:
                values.append(value)
    if authority is not None:
        out[":authority"] = [authority]
        out["host"] = out[":authority"]  # Envoy: a "host" matcher reads :authority as sent
    out[":path"] = [path]
    out[":method"] = [method]
    out[":scheme"] = [effective_scheme(out, scheme)]
    out.setdefault("x-forwarded-proto", [scheme])
    return out


def empty_forwarded_proto(headers: Any) -> bool:
    """A client-sent, empty x-forwarded-proto: Envoy's router finds no route at all.

    Both twins call this first for every request with headers, so it is also where header
    names and values are checked to be strings (TypeError otherwise), whichever twin runs."""
    if not headers:
        return False
    items = headers.items() if type(headers) is dict or isinstance(headers, _AbcMapping) else headers
    found = False
    empty = False
    for name, value in items:
        if type(name) is not str or type(value) is not str:
            _check_header(name, value)
        if not found and len(name) == 17 and ascii_lower(name) == "x-forwarded-proto":
            found = True
            empty = value == ""  # the first one decides (repeated values are joined with ",")
    return empty


def _check_header(name: Any, value: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"request header names must be str, got {type(name).__name__}")
    if not isinstance(value, str):
        raise TypeError(f"request header {name!r}: value must be str, got {type(value).__name__}")


def check_request_args(authority: Any, path: Any, method: Any, scheme: Any, source_ip: Any) -> None:
    """TypeError unless the request's scalar arguments are strings (``authority`` and
    ``source_ip`` may be None). Both twins call it only when a quick type test fails."""
    for arg, value, optional in (("path", path, False), ("method", method, False), ("scheme", scheme, False),
                                 ("authority", authority, True), ("source_ip", source_ip, True)):
        if not (isinstance(value, str) or (optional and value is None)):
            raise TypeError(f"match(): {arg} must be str{' or None' if optional else ''}, got {type(value).__name__}")


def request_headers(headers: Any) -> Any:
    """Headers as given when they can be read twice (a mapping, list or tuple), else a list of
    their pairs (an iterator would be used up by the first scan). Not for dicts (the caller's
    fast path) or None."""
    if type(headers) is list or type(headers) is tuple or isinstance(headers, (_AbcMapping, list, tuple)):
        return headers
    if isinstance(headers, (str, bytes)):
        raise TypeError(f"headers must be a mapping or (name, value) pairs, got {type(headers).__name__}")
    return list(headers)


def effective_scheme(hdrs: Dict[str, List[str]], scheme: str) -> str:
    """The request's scheme as Envoy's router sees it: a client-sent x-forwarded-proto of
    http or https (any case) wins, lower-cased; anything else leaves the connection's."""
    xfp = hdrs.get("x-forwarded-proto")
    if xfp:
        value = ascii_lower(xfp[0])
        if value in ("http", "https"):
            return value
    return scheme


def strip_path_params(path: str) -> str:
    """ignore_path_parameters_in_path_matching: drop ``;params`` from every segment
    (``/p;x=1/q;y`` -> ``/p/q``), as Envoy does before path matching."""
    if ";" not in path:
        return path
    return "/".join(seg.split(";", 1)[0] for seg in path.split("/"))


def header_values(hdrs: Dict[str, List[str]], name: str) -> List[str]:
    return hdrs.get(name) or []


def is_grpc(hdrs: Dict[str, List[str]]) -> bool:
    """Grpc::Common::isGrpcRequestHeaders: content-type application/grpc or application/grpc+*."""
    values = hdrs.get("content-type")
    if not values:
        return False
    ct = values[0]
    return ct == "application/grpc" or ct.startswith("application/grpc+")


def parse_query(full_path: str) -> Dict[str, str]:
    """QueryParamsMulti::parseQueryString, first value per name, no percent-decoding."""
    q = full_path.find("?")
    out: Dict[str, str] = {}
    if q < 0:
        return out
    for part in full_path[q + 1:].split("&"):
        if not part:
            continue
        eq = part.find("=")
        name, value = (part, "") if eq < 0 else (part[:eq], part[eq + 1:])
        if name not in out:
            out[name] = value
    return out


_WHITESPACE = " \t\n\v\f\r"


def simple_atoi(s: str, lo: int, hi: int) -> Optional[int]:
    """absl::SimpleAtoi: surrounding ASCII whitespace, an optional sign, decimal digits."""
    t = s.strip(_WHITESPACE)
    if not t:
        return None
    sign = 1
    if t[0] in "+-":
        sign = -1 if t[0] == "-" else 1
        t = t[1:]
    if not t or not (t.isascii() and t.isdigit()):
        return None
    n = sign * int(t)
    return n if lo <= n <= hi else None


def simple_atoi_unsigned(s: str, hi: int = 2**64 - 1) -> Optional[int]:
    """absl::SimpleAtoi into an unsigned type of range [0, hi]: no ``-`` sign at all (not even
    ``-0``)."""
    t = s.strip(_WHITESPACE)
    if t.startswith("-"):
        return None
    return simple_atoi(s, 0, hi)


def simple_atoi_u64(s: str) -> Optional[int]:
    return simple_atoi_unsigned(s)


def header_pairs(headers: Any) -> List[Tuple[str, str]]:
    """Headers given as a mapping or as ``(name, value)`` pairs, as a list of string pairs."""
    if not headers:
        return []
    if hasattr(headers, "items"):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def split_host_port(host: str) -> Tuple[str, str]:
    """Http::HeaderUtility::getPortStart: cut at the last ':' unless a ']' follows it,
    whatever the "port" is (``a.com:80:90`` -> ``a.com:80``, ``::1:80`` -> ``::1``)."""
    colon = host.rfind(":")
    if colon < 0:
        return host, ""
    bracket = host.rfind("]")
    if bracket >= 0 and bracket > colon:
        return host, ""
    return host[:colon], host[colon + 1:]


def _rewrite_path(r: Any, full_path: str, match_path: str, prefix_rewrite: Optional[str],
                  regex_rewrite: Optional[Tuple[Any, str]]) -> Optional[str]:
    q = full_path.find("?")
    query = "" if q < 0 else full_path[q:]
    just_path = full_path if q < 0 else full_path[:q]
    if prefix_rewrite is not None:
        # The matched part is the route's prefix/path (the whole path for a regex route). It
        # is replaced only where the request path really starts with it, which it may not
        # with ignore_path_parameters_in_path_matching (Envoy then leaves the path alone).
        matched = just_path if r.path_kind == "regex" else r.path_value
        head = full_path[: len(matched)]
        if head != matched and (r.case_sensitive or ascii_lower(head) != ascii_lower(matched)):
            return None
        return prefix_rewrite + full_path[len(matched):]
    if regex_rewrite is not None:
        rx, substitution = regex_rewrite
        return re2_global_replace(rx, substitution, just_path) + query
    return None


def apply_rewrites(r: Any, full_path: str, match_path: str) -> Optional[str]:
    """The upstream :path after prefix_rewrite / regex_rewrite (None: unchanged)."""
    if r.prefix_rewrite is None and r.regex_rewrite is None:
        return None
    return _rewrite_path(r, full_path, match_path, r.prefix_rewrite, r.regex_rewrite)


def redirect_location(r: Any, full_path: str, match_path: str, host_header: str, scheme: str,
                      hdrs: Dict[str, List[str]]) -> str:
    """RouteEntryImplBase::newUri for a redirect route."""
    red = r.redirect
    request_proto = hdrs[":scheme"][0]
    final_scheme = red.scheme or request_proto
    final_port = f":{red.port}" if red.port else ""
    if red.host:
        final_host = red.host
    else:
        final_host = host_header
        if host_header:
            if host_header.startswith("["):
                end = host_header.rfind("]:")
                end = end + 1 if end >= 0 else -1
            else:
                end = host_header.rfind(":")
            if end >= 0:
                request_port = host_header[end:]
                remove = bool(final_port)
                if final_scheme != request_proto:
                    remove |= request_proto == "https" and request_port == ":443"
                    remove |= request_proto == "http" and request_port == ":80"
                if remove:
                    final_host = host_header[:end]
    path_has_query = "?" in red.path
    if red.path:
        if path_has_query:
            final_path = red.path
        else:
            q = full_path.find("?")
            final_path = red.path + (full_path[q:] if q >= 0 else "")
    else:
        rewritten = _rewrite_path(r, full_path, match_path, red.prefix_rewrite, red.regex_rewrite)
        final_path = rewritten if rewritten is not None else full_path
    if not path_has_query and red.strip_query:
        q = final_path.find("?")
        if q >= 0:
            final_path = final_path[:q]
    return f"{final_scheme}://{final_host}{final_port}{final_path}"


def tls_redirect(vh: Any, hdrs: Dict[str, List[str]], host_header: str, full_path: str) -> Optional["RouteMatch"]:
    """A virtual host's ``require_tls``: Envoy answers a plain-HTTP request with a 301 to
    https (EXTERNAL_ONLY: unless ``x-envoy-internal: true``). None when it does not apply."""
    if vh.require_tls == "NONE" or hdrs[":scheme"][0] == "https":
        return None
    if vh.require_tls == "EXTERNAL_ONLY" and (hdrs.get("x-envoy-internal") or [""])[0] == "true":
        return None
    request_proto = hdrs[":scheme"][0]
    host = host_header
    end = host.rfind("]:") + 1 if host.startswith("[") else host.rfind(":")
    if end > 0 and request_proto == "http" and host[end:] == ":80":
        host = host[:end]
    location = f"https://{host}{full_path}"
    return RouteMatch(vh.name, "", None, None, location, None, None, None, redirect_code=301)


def _rewrite_one(rewrite: bytes, m: Any) -> bytes:
    """RE2::Rewrite: \\0..\\9 are the match and its groups, \\\\ is a backslash (bytes)."""
    if b"\\" not in rewrite:
        return rewrite
    out: List[bytes] = []
    i = 0
    n = len(rewrite)
    while i < n:
        c = rewrite[i]
        if c == 92 and i + 1 < n:  # backslash
            d = rewrite[i + 1]
            if 48 <= d <= 57:
                out.append(m.group(d - 48) or b"")
                i += 2
                continue
            if d == 92:
                out.append(b"\\")
                i += 2
                continue
        out.append(rewrite[i:i + 1])
        i += 1
    return b"".join(out)


def _char_len(data: bytes, p: int) -> int:
    """Bytes of the UTF-8 character at ``p`` (1 for a byte that does not start one), as RE2's
    GlobalReplace steps over an empty match (lone surrogates' sequences count as characters)."""
    b = data[p]
    n = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 1
    if n > 1:
        if p + n > len(data):
            return 1
        for k in range(p + 1, p + n):
            if not 0x80 <= data[k] <= 0xBF:
                return 1
    return n


def re2_global_replace(rx: Any, rewrite: str, text: str) -> str:
    """RE2::GlobalReplace: replace every non-overlapping match; an empty match right where
    the previous match ended is skipped (Python's re.sub would replace it).

    Runs over the text's bytes (``match_bytes``), encoded once: google-re2's ``search(str, pos)``
    re-encodes the whole text and re-counts ``pos`` on every call, which made a header with many
    matches quadratic (a 64 KiB value took 20 s)."""
    data = match_bytes(text)
    sub = rewrite.encode("utf-8", "surrogatepass")
    out: List[bytes] = []
    p = 0
    n = len(data)
    last_end = -1
    count = 0
    search = rx.search
    while p <= n:
        m = search(data, p)
        if m is None:
            break
        start, end = m.span()
        if p < start:
            out.append(data[p:start])
        if start == last_end and start == end:
            if p < n:
                step = _char_len(data, p)
                out.append(data[p:p + step])
                p += step
            else:
                p += 1
            continue
        out.append(_rewrite_one(sub, m))
        p = end
        last_end = end
        count += 1
    if count == 0:
        return text
    if p < n:
        out.append(data[p:])
    return _from_match_bytes(b"".join(out))


def _rotl1(h: int) -> int:
    return ((h << 1) | (h >> 63)) & 0xFFFFFFFFFFFFFFFF


def _cookie(hdrs: Dict[str, List[str]], name: str) -> Optional[str]:
    """Http::Utility::parseCookieValue: the first ``name=value`` over all Cookie headers;
    parts split on ';', only leading whitespace skipped, one pair of quotes removed."""
    for header in hdrs.get("cookie") or ():
        for part in header.split(";"):
            part = part.lstrip(_WHITESPACE)
            eq = part.find("=")
            if eq < 0:
                continue
            if part[:eq] == name:
                v = part[eq + 1:]
                if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                    v = v[1:-1]
                return v
    return None


def _apply_mutations(hdrs: Dict[str, List[str]], adds: Sequence[Any], removes: Sequence[str]) -> None:
    """HeaderParser::evaluateHeaders: removals first, then additions by append action."""
    for name in removes:
        hdrs.pop(name, None)
    for m in adds:
        if not m.value and not m.keep_empty_value:
            continue
        present = hdrs.get(m.name)
        if m.action == "append":
            if present:
                if m.name in INLINE_HEADERS:
                    present[0] = present[0] + "," + m.value
                else:
                    present.append(m.value)
            else:
                hdrs[m.name] = [m.value]
        elif m.action == "add_if_absent":
            if not present:
                hdrs[m.name] = [m.value]
        elif m.action == "overwrite_if_exists":
            if present:
                hdrs[m.name] = [m.value]
        else:
            hdrs[m.name] = [m.value]


def headers_after_route(spec: Any, vh: Any, r: Any, entry: Any, hdrs: Dict[str, List[str]], full_path: str,
                        path_rewrite: Optional[str], host_rewrite: Optional[str]) -> Tuple[Dict[str, List[str]], str]:
    """The request headers as Envoy 1.40's router has them when it computes the hash: after
    the weighted cluster's, route's, virtual host's and route configuration's header
    mutations, host and path rewrites, and the router's own x-envoy-* headers."""
    out = {k: list(v) for k, v in hdrs.items()}
    if entry is not None:
        _apply_mutations(out, entry.headers_to_add, entry.headers_to_remove)
    levels = [(r.headers_to_add, r.headers_to_remove), (vh.headers_to_add, vh.headers_to_remove),
              (spec.headers_to_add, spec.headers_to_remove)]
    if spec.most_specific_header_mutations_wins:
        levels.reverse()
    for adds, removes in levels:
        _apply_mutations(out, adds, removes)
    if host_rewrite:
        out[":authority"] = [host_rewrite]
        out["host"] = out[":authority"]
    path = full_path
    if path_rewrite is not None and path_rewrite != full_path:
        out["x-envoy-original-path"] = [full_path]
        out[":path"] = [path_rewrite]
        path = path_rewrite
    timeout = r.timeout or 0.0
    per_try = r.retry_policy.per_try_timeout if r.retry_policy is not None else None
    expected = timeout
    if per_try and (not timeout or per_try < timeout):
        expected = per_try
    if r.action in ("cluster", "weighted", "cluster_header") and expected and expected > 0:
        out["x-envoy-expected-rq-timeout-ms"] = [str(int(round(expected * 1000)))]
    return out, path


def compute_hash(policies: Sequence[Any], hdrs: Dict[str, List[str]], full_path: str,
                 source_ip: Optional[str], hash64: Callable[..., int] = xxh64) -> Optional[int]:
    """HashPolicyImpl::generateHash: combine the policies' hashes with rotl(h, 1) ^ new.

    ``hash64`` is XXH64 (``hash64(data, seed)``): the compiled twin passes its C one, the pure
    twin keeps the pure one. Strings are hashed as the bytes they stand for (``hash_bytes``)."""
    h: Optional[int] = None
    for p in policies:
        new: Optional[int] = None
        if p.kind == "header":
            values = hdrs.get(p.name)
            if values:
                vals = list(values)
                if p.regex_rewrite is not None:
                    rx, sub = p.regex_rewrite
                    vals = [re2_global_replace(rx, sub, v) for v in vals]
                raw = sorted([hash_bytes(v) for v in vals])
                acc = 0
                for b in raw:
                    acc = hash64(b, acc)
                new = acc
        elif p.kind == "cookie":
            value = _cookie(hdrs, p.name)
            if value:
                new = hash64(hash_bytes(value), 0)
        elif p.kind == "source_ip":
            if source_ip:
                new = hash64(hash_bytes(source_ip), 0)
        elif p.kind == "query_parameter":
            value = parse_query(full_path).get(p.name)
            if value is not None:
                new = hash64(hash_bytes(value), 0)
        if new is not None:
            h = (_rotl1(h) if h is not None else 0) ^ new
        if p.terminal and h is not None:
            break
    return h
