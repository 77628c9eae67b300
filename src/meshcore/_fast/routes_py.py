"""RouteTable, pure-Python twin: Envoy 1.40's route matching over a RouteConfiguration.

First match wins, exactly as Envoy's linear scan, but routes are indexed: exact paths by hash,
prefixes (and each regex's RE2-proven literal prefix) by length-bucketed hash maps, exact header
conditions by value within each of those slots, and only the candidate routes are evaluated, in
route order; regexes run (one RE2 set pass) only when a regex route comes before the best
non-regex match. See the comment above ``regex_literal_prefix``. Virtual hosts are resolved through hash maps (exact, then suffix wildcards longest
first, then prefix wildcards longest first, then ``*``).

Request model (what Envoy's HCM hands the router for a plain-HTTP request): ``:authority`` is
``authority``; ``:path`` is ``path`` with any fragment removed (Envoy strips or rejects it);
``:method``, ``:scheme``; ``x-forwarded-proto`` defaults to the scheme; a ``host`` header is
not a separate header (HTTP/1 turns it into ``:authority``). Headers Envoy keeps inline are
coalesced with ``,`` (its HTTP/1 codec does so); others are matched value by value.
"""

from __future__ import annotations

import random

import re2
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .._route_model import HeaderMatchSpec, RouteConfigSpec, RouteSpec, StringMatchSpec, VirtualHostSpec
from . import _xds_hook
from .hashing_py import xxh64
from .._routing import (
    INLINE_HEADERS,
    RouteMatch,
    apply_rewrites,
    ascii_lower,
    check_request_args,
    empty_forwarded_proto,
    compute_hash,
    headers_after_route,
    header_values,
    is_grpc,
    match_bytes,
    normalise_headers,
    parse_query,
    redirect_location,
    regex_fullmatch,
    request_headers,
    simple_atoi,
    simple_atoi_u64,
    split_host_port,
    strip_path_params,
    tls_redirect,
)

__all__ = ["RouteTable"]

HeadersArg = Union[None, Mapping[str, str], Iterable[Tuple[str, str]]]


class RegexSet:
    """All path regexes of a virtual host as RE2 sets (full match): one pass over the path
    finds every matching regex route. Large groups are split into chunks RE2 can compile."""

    __slots__ = ("chunks", "raw")

    def __init__(self, chunks: List[Tuple[Any, int]]) -> None:
        self.chunks = chunks  # (compiled set, index of its first pattern)
        # google-re2's binding under its Set wrapper (takes UTF-8 bytes, skips the wrapper's
        # Python frame); None when this version of the package has no such attribute.
        raw = [getattr(rset, "_set", None) for rset, _ in chunks]
        self.raw: Optional[List[Tuple[Any, int]]] = (
            None if any(r is None for r in raw) else [(r, base) for r, (_, base) in zip(raw, chunks)])

    def Match(self, path: str) -> List[int]:  # noqa: N802  (re2.Set's spelling)
        out: List[int] = []
        text: "str | bytes" = path
        for rset, base in self.chunks:
            try:
                hit = rset.Match(text)
            except UnicodeEncodeError:  # lone surrogates: RE2 reads match_bytes (see _routing)
                text = match_bytes(path)
                hit = rset.Match(text)
            if hit:
                out.extend(base + i for i in hit)
        return out


def _compile_set(patterns: Sequence[str]) -> Any:
    rset = re2.Set.FullMatchSet()
    for p in patterns:
        rset.Add(p)
    rset.Compile()
    return rset


def regex_set(patterns: Sequence[str], chunk: int = 256) -> Optional[RegexSet]:
    """A RegexSet when there are at least two regexes, else None (check them one by one)."""
    if len(patterns) < 2:
        return None
    chunks: List[Tuple[Any, int]] = []
    start = 0
    while start < len(patterns):
        size = min(chunk, len(patterns) - start)
        while True:
            try:
                chunks.append((_compile_set(patterns[start:start + size]), start))
                break
            except Exception:  # over RE2's memory budget for one set: halve the chunk
                if size == 1:
                    return None
                size //= 2
        start += size
    return RegexSet(chunks)


# -- the candidate index, shared by both twins --------------------------------------------------
#
# Every route of a virtual host sits in exactly one slot, keyed by what its path matcher
# requires of the path:
#
# * prefix / path / path_separated_prefix: the (ASCII-lower-cased, for case_sensitive: false)
#   prefix or path. A route is a candidate only if the path starts with / equals its key.
# * safe_regex: the literal prefix every full match of the regex starts with, as RE2 proves it
#   (``regex_literal_prefix``; often "/api/" and the like, "" when nothing is fixed). A regex
#   route is a candidate only if the path starts with it; the regex itself runs only when the
#   route comes before the best non-regex match (first match wins).
# * routes (other than regex ones) with an exact header matcher on an ordinary header
#   (``indexed_header``) sit in their slot's header index: name -> value -> routes. They are
#   candidates only if the request carries that value, so a table of tenant routes on one prefix
#   costs one dictionary lookup per request value, wherever the routes are in the table.
#
# Every index only drops routes it proves cannot match; candidates are then tried in route
# order, so the decision is Envoy's linear scan.

REGEX_PREFIX_MAXLEN = 128  # bytes of a regex's range RE2 explores for its literal prefix


def regex_literal_prefix(rx: Any) -> str:
    """The longest ASCII string every full match of ``rx`` (a compiled google-re2 regex) starts
    with. RE2's PossibleMatchRange bounds every string the regex matches, anchored at the
    start: min <= s <= max (bytewise); any s between two strings sharing a prefix starts with
    it. Non-ASCII bytes end the prefix (a path's bytes are compared as ASCII). "" when RE2 cannot
    tell (the route is then a candidate for every path)."""
    try:
        lo, hi = rx.possiblematchrange(REGEX_PREFIX_MAXLEN)
    except Exception:  # noqa: BLE001  (re2.error: RE2 cannot bound it; or no such method)
        return ""
    n = 0
    limit = min(len(lo), len(hi))
    while n < limit and lo[n] == hi[n] and lo[n] < 0x80:
        n += 1
    return bytes(lo[:n]).decode("ascii")


def indexed_header(r: RouteSpec) -> Optional[HeaderMatchSpec]:
    """The header matcher of ``r`` its slot's header index keys it by, or None: the first one
    that is a plain exact match (case-sensitive, not inverted, a missing header does not
    match) on a header whose normalised values are the request's own, one by one, in order:
    not a pseudo-header, ``host`` (read from :authority) or a header Envoy coalesces with ","
    (``INLINE_HEADERS``, x-forwarded-proto among them). Regex routes are never header-indexed
    (RE2 sets decide them)."""
    if r.path_kind == "regex":
        return None
    for h in r.headers:
        if (h.kind == "string" and not h.invert and not h.treat_missing_as_empty and h.string is not None
                and h.string.kind == "exact" and not h.string.ignore_case and h.name[:1] != ":"
                and h.name != "host" and h.name not in INLINE_HEADERS):
            return h
    return None


def decided_by_path(r: RouteSpec) -> bool:
    """No condition beyond the path matcher."""
    return not (r.headers or r.query or r.runtime_fraction is not None or r.grpc)


def decided_by_index(r: RouteSpec) -> bool:
    """Its conditions are the path and its indexed header alone: a candidate the header index
    produced (and whose path matched) matches."""
    return (len(r.headers) == 1 and indexed_header(r) is r.headers[0] and not r.query
            and r.runtime_fraction is None and not r.grpc)


SlotKey = Tuple[str, str, str]  # (table: "cs" / "ci", kind: "prefix" / "exact", key)


def slot_of(r: RouteSpec) -> SlotKey:
    """Where the route sits: case-sensitive or lower-cased table, prefix or exact path, key."""
    kind, value = r.path_kind, r.path_value
    if kind == "regex":
        return ("cs", "prefix", regex_literal_prefix(r.regex))
    table = "cs" if r.case_sensitive or (kind == "prefix" and value in ("", "/")) else "ci"
    key = value if table == "cs" else ascii_lower(value)
    return (table, "exact" if kind == "path" else "prefix", key)


HeaderMap = Dict[str, Dict[str, Tuple[int, ...]]]  # header name -> value -> routes
# What the index keeps per key: (plain routes, regex routes, header-indexed routes or None), each
# in route order. Tuples: the garbage collector stops tracking them once it has seen them, so a
# 10,000-route table leaves few objects to every later full collection (and triggers fewer).
FrozenSlot = Tuple[Tuple[int, ...], Tuple[int, ...], Optional[HeaderMap]]


def slots(routes: Sequence[RouteSpec]) -> Dict[SlotKey, FrozenSlot]:
    """Every route of a virtual host in its slot (routes taken in order: every tuple ascends)."""
    plain: Dict[SlotKey, List[int]] = {}
    regex: Dict[SlotKey, List[int]] = {}
    by_header: Dict[SlotKey, Dict[str, Dict[str, List[int]]]] = {}
    for r in routes:
        key = slot_of(r)
        if r.path_kind == "regex":
            ids = regex.get(key)
            if ids is None:
                ids = regex[key] = []
            ids.append(r.index)
            continue
        h = indexed_header(r) if r.headers else None
        if h is None:
            ids = plain.get(key)
            if ids is None:
                ids = plain[key] = []
            ids.append(r.index)
        else:
            by_value = by_header.setdefault(key, {}).setdefault(h.name, {})
            by_value.setdefault(h.string.value, []).append(r.index)  # type: ignore[union-attr]
    out: Dict[SlotKey, FrozenSlot] = {}
    for key, ids in plain.items():
        out[key] = (tuple(ids), (), None)
    for key, ids in regex.items():
        hit = out.get(key)
        out[key] = (hit[0] if hit else (), tuple(ids), None)
    for key, names in by_header.items():
        hit = out.get(key)
        frozen = {name: {value: tuple(ids) for value, ids in by_value.items()} for name, by_value in names.items()}
        out[key] = (hit[0], hit[1], frozen) if hit else ((), (), frozen)
    return out


class _VhostIndex:
    """Candidate index of one virtual host's routes (see the comment above ``regex_literal_prefix``)."""

    __slots__ = ("spec", "exact", "exact_ci", "prefix", "prefix_ci", "prefix_lens", "prefix_ci_lens",
                 "regex_set", "regex_routes", "n_routes", "by_path", "by_index")

    def __init__(self, spec: VirtualHostSpec) -> None:
        self.spec = spec
        tables: Dict[Tuple[str, str], Dict[str, FrozenSlot]] = {
            ("cs", "exact"): {}, ("ci", "exact"): {}, ("cs", "prefix"): {}, ("ci", "prefix"): {}}
        for (table, kind, key), slot in slots(spec.routes).items():
            tables[(table, kind)][key] = slot
        self.exact = tables[("cs", "exact")]
        self.exact_ci = tables[("ci", "exact")]
        self.prefix = tables[("cs", "prefix")]
        self.prefix_ci = tables[("ci", "prefix")]
        regexes = [r for r in spec.routes if r.path_kind == "regex"]
        self.regex_set = regex_set([r.path_value for r in regexes])
        # Tuples, not lists: the garbage collector stops tracking a tuple of ints or bools once
        # it has seen it, so a 10k-route table leaves fewer objects to every full collection
        # (and triggers fewer of them while it is built).
        self.regex_routes = tuple([r.index for r in regexes])  # pattern of the set -> its route
        self.prefix_lens = tuple(sorted({len(p) for p in self.prefix}))
        self.prefix_ci_lens = tuple(sorted({len(p) for p in self.prefix_ci}))
        self.n_routes = len(spec.routes)
        self.by_path = tuple([decided_by_path(r) for r in spec.routes])
        self.by_index = tuple([bool(r.headers) and decided_by_index(r) for r in spec.routes])

    def slots_for(self, path: str) -> List[FrozenSlot]:
        """The slots whose key the path starts with (prefix) or equals (exact)."""
        out: List[FrozenSlot] = []
        hit = self.exact.get(path)
        if hit:
            out.append(hit)
        lowered = ascii_lower(path) if (self.exact_ci or self.prefix_ci) else path
        if self.exact_ci:
            hit = self.exact_ci.get(lowered)
            if hit:
                out.append(hit)
        n = len(path)
        for length in self.prefix_lens:
            if length > n:
                break
            hit = self.prefix.get(path[:length])
            if hit:
                out.append(hit)
        for length in self.prefix_ci_lens:
            if length > n:
                break
            hit = self.prefix_ci.get(lowered[:length])
            if hit:
                out.append(hit)
        return out

    def candidates(self, path: str, hdrs: Dict[str, List[str]]) -> Tuple[List[int], List[int]]:
        """(non-regex candidates, regex candidates), each in route order."""
        out: List[int] = []
        regex: List[int] = []
        for ids, regex_ids, by_header in self.slots_for(path):
            out.extend(ids)
            regex.extend(regex_ids)
            if by_header is None:
                continue
            for name, by_value in by_header.items():
                for value in hdrs.get(name) or ():
                    hit = by_value.get(value)
                    if hit:
                        out.extend(hit)
        out.sort()
        regex.sort()
        return out, regex


DomainMaps = Tuple[Dict[str, int], List[Tuple[int, Dict[str, int]]], List[Tuple[int, Dict[str, int]]], Optional[int]]


def domain_maps(spec: RouteConfigSpec) -> DomainMaps:
    """RouteMatcher's virtual host maps: exact domains; suffix and prefix wildcards bucketed
    by the length of their fixed part, longest first; the ``*`` virtual host (or None)."""
    exact: Dict[str, int] = {}
    suffix: Dict[int, Dict[str, int]] = {}
    prefix: Dict[int, Dict[str, int]] = {}
    default: Optional[int] = None
    for i, vh in enumerate(spec.virtual_hosts):
        for d in vh.domains:
            if "*" not in d:  # most domains: one test instead of four
                exact[d] = i
            elif d == "*":
                default = i
            elif d.startswith("*"):
                suffix.setdefault(len(d) - 1, {})[d[1:]] = i
            elif d.endswith("*"):
                prefix.setdefault(len(d) - 1, {})[d[:-1]] = i
            else:
                exact[d] = i
    return exact, sorted(suffix.items(), reverse=True), sorted(prefix.items(), reverse=True), default


class RouteTable:
    """Envoy-exact route matching for one RouteConfiguration (pure-Python twin)."""

    __slots__ = ("spec", "_exact", "_suffix", "_prefix", "_default", "_vhosts", "__weakref__")

    def __init__(self, spec: RouteConfigSpec) -> None:
        if not isinstance(spec, RouteConfigSpec):
            raise TypeError("RouteTable(spec): use RouteTable.from_xds(route_configuration)")
        self.spec = spec
        self._vhosts = [_VhostIndex(vh) for vh in spec.virtual_hosts]
        self._exact, self._suffix, self._prefix, self._default = domain_maps(spec)

    @classmethod
    def from_xds(cls, route_configuration: Any) -> "RouteTable":
        """Build from an ``envoy.config.route.v3.RouteConfiguration`` (message or dict)."""
        return cls(_xds_hook.decoder("route_config")(route_configuration))

    @property
    def name(self) -> str:
        return self.spec.name

    def _kept_matches(self) -> Optional[int]:
        """(Tests.) None: the pure table walks every request (the compiled one keeps header-less
        static matches, ``routes_c.RouteTable._kept_matches``)."""
        return None

    def _find_vhost(self, authority: Optional[str], headers: Dict[str, List[str]]) -> Optional[int]:
        if not self._exact and not self._suffix and not self._prefix:
            return self._default
        if self.spec.vhost_header:
            values = headers.get(self.spec.vhost_header)
            if not values:
                return None
            host = values[0]
        else:
            if authority is None:
                return None
            host = authority
        if self.spec.ignore_port_in_host_matching:
            host = split_host_port(host)[0]
        host = ascii_lower(host)
        hit = self._exact.get(host)
        if hit is not None:
            return hit
        n = len(host)
        for length, table in self._suffix:
            if length >= n:
                continue
            hit = table.get(host[n - length:])
            if hit is not None:
                return hit
        for length, table in self._prefix:
            if length >= n:
                continue
            hit = table.get(host[:length])
            if hit is not None:
                return hit
        return self._default

    def match(
        self,
        authority: Optional[str],
        path: str,
        headers: HeadersArg = None,
        method: str = "GET",
        scheme: str = "http",
        random_value: Optional[int] = None,
        source_ip: Optional[str] = None,
    ) -> Optional[RouteMatch]:
        """The route Envoy would pick for this request, or ``None`` (Envoy: 404 NR).

        Strings with lone surrogates (servers decoding bytes with ``surrogateescape`` make them)
        match as their code points and hash as the bytes they stand for (``_routing``)."""
        if (type(path) is not str or type(method) is not str or type(scheme) is not str
                or (authority is not None and type(authority) is not str)
                or (source_ip is not None and type(source_ip) is not str)):
            check_request_args(authority, path, method, scheme, source_ip)
        if headers is not None and type(headers) is not dict:
            headers = request_headers(headers)
        full_path = path.split("#", 1)[0]
        if headers and empty_forwarded_proto(headers):
            return None
        hdrs = normalise_headers(headers, authority, full_path, method, scheme)
        vi = self._find_vhost(authority, hdrs)
        if vi is None:
            return None
        index = self._vhosts[vi]
        if index.spec.require_tls != "NONE":
            forced = tls_redirect(index.spec, hdrs, authority or "", full_path)
            if forced is not None:
                return forced
        if random_value is None:
            random_value = random.getrandbits(64)
        random_value &= 0xFFFFFFFFFFFFFFFF
        q = full_path.find("?")
        match_path = full_path if q < 0 else full_path[:q]
        if self.spec.ignore_path_parameters_in_path_matching:
            match_path = strip_path_params(match_path)
        query_cache: List[Any] = []
        routes = index.spec.routes
        plain, regex = index.candidates(match_path, hdrs)
        winner: Optional[int] = None
        for ri in plain:
            r = routes[ri]
            if r.path_kind == "separated" and not _path_matches(r, match_path):
                continue  # the prefix matched; the character after it did not
            if index.by_path[ri] or index.by_index[ri] or _conditions_match(
                    r, full_path, hdrs, random_value, query_cache):
                winner = ri
                break
        if regex:
            # Regex routes run only when they come before the best non-regex match.
            earlier = regex if winner is None else [ri for ri in regex if ri < winner]
            if earlier:
                found = _first_regex_match(index, earlier, match_path, full_path, hdrs, random_value, query_cache)
                if found is not None:
                    winner = found
        if winner is None:
            return None
        return _result(self.spec, index.spec, routes[winner], full_path, hdrs, authority, scheme, random_value,
                       source_ip, match_path)


def _first_regex_match(
    index: _VhostIndex, earlier: List[int], match_path: str, full_path: str, hdrs: Dict[str, List[str]],
    random_value: int, query_cache: List[Any],
) -> Optional[int]:
    """The first of the regex candidates ``earlier`` (in route order) that matches: one pass of
    the virtual host's RE2 set when there are several, else the regex itself."""
    routes = index.spec.routes
    if len(earlier) > 1 and index.regex_set is not None:
        # A regex matches only paths with its literal prefix: every route the set reports is a
        # regex candidate, so those up to the last of ``earlier`` are the ones to try.
        last = earlier[-1]
        for ri in sorted(index.regex_routes[i] for i in index.regex_set.Match(match_path)):
            if ri > last:
                break
            if index.by_path[ri] or _conditions_match(routes[ri], full_path, hdrs, random_value, query_cache):
                return ri
        return None
    for ri in earlier:
        r = routes[ri]
        if regex_fullmatch(r.regex, match_path) and (
                index.by_path[ri] or _conditions_match(r, full_path, hdrs, random_value, query_cache)):
            return ri
    return None


def _path_matches(r: RouteSpec, p: str) -> bool:
    kind = r.path_kind
    value = r.path_value
    if kind == "prefix":
        if r.case_sensitive:
            return p.startswith(value)
        return ascii_lower(p[: len(value)]) == ascii_lower(value)
    if kind == "path":
        return p == value if r.case_sensitive else ascii_lower(p) == ascii_lower(value)
    if kind == "regex":
        return regex_fullmatch(r.regex, p)  # lone surrogates too (see _routing.match_bytes)
    # path_separated_prefix: p == value, or value is a prefix followed by '/'
    n = len(value)
    head = p[:n]
    if not (head == value if r.case_sensitive else ascii_lower(head) == ascii_lower(value)):
        return False
    return len(p) == n or p[n] == "/"


def _string_match(m: StringMatchSpec, s: str) -> bool:
    return m.matches(s)


def _header_matches(h: HeaderMatchSpec, hdrs: Dict[str, List[str]]) -> bool:
    values = hdrs.get(h.name)
    if not values:
        if not h.treat_missing_as_empty:
            if h.kind == "present":
                return h.present if h.invert else not h.present
            return False
        values = [""]
    kind = h.kind
    if kind == "present":
        matched = h.present
    elif kind == "exact_any":
        matched = True
    elif kind == "range":
        matched = False
        for v in values:
            n = simple_atoi_i64(v)
            if n is not None and h.range_start <= n < h.range_end:
                matched = True
                break
    else:
        matched = any(h.string.matches(v) for v in values)  # type: ignore[union-attr]
    return matched != h.invert


def simple_atoi_i64(s: str) -> Optional[int]:
    return simple_atoi(s, -(2**63), 2**63 - 1)


def _route_matches(
    r: RouteSpec, match_path: str, full_path: str, hdrs: Dict[str, List[str]], random_value: int,
    query_cache: List[Any],
) -> bool:
    """Route ``r`` matches the request (Envoy's per-route test in its linear scan)."""
    return _path_matches(r, match_path) and _conditions_match(r, full_path, hdrs, random_value, query_cache)


def _conditions_match(
    r: RouteSpec, full_path: str, hdrs: Dict[str, List[str]], random_value: int, query_cache: List[Any],
) -> bool:
    """Everything of ``r``'s match but the path: runtime fraction, gRPC, headers, query."""
    if r.runtime_fraction is not None:
        numerator, denominator = r.runtime_fraction
        if not random_value % denominator < numerator:
            return False
    if r.grpc and not is_grpc(hdrs):
        return False
    for h in r.headers:
        if not _header_matches(h, hdrs):
            return False
    if r.query:
        if not query_cache:
            query_cache.append(parse_query(full_path))
        params = query_cache[0]
        for qm in r.query:
            value = params.get(qm.name)
            if qm.string is not None:
                if value is None or not qm.string.matches(value):
                    return False
            elif qm.present is False:
                if value is not None:
                    return False
            elif value is None:
                return False
    return True


def _result(
    spec: RouteConfigSpec, vh: VirtualHostSpec, r: RouteSpec, full_path: str, hdrs: Dict[str, List[str]],
    authority: Optional[str], scheme: str, random_value: int, source_ip: Optional[str], match_path: str,
    hash64: Callable[..., int] = xxh64,
) -> RouteMatch:
    cluster: Optional[str] = None
    host_rewrite = r.host_rewrite_literal
    chosen_entry = None
    if r.action == "cluster":
        cluster = r.cluster
    elif r.action == "cluster_header":
        values = header_values(hdrs, r.cluster_header)
        cluster = values[0] if values else ""
    elif r.action == "weighted":
        selection = random_value
        if r.weighted_header:
            values = hdrs.get(r.weighted_header)
            if values and len(values) == 1:
                parsed = simple_atoi_u64(values[0])
                if parsed is not None:
                    selection = parsed
        x = selection % r.weighted_total
        begin = 0
        for entry in r.weighted:
            end = begin + entry.weight
            if begin <= x < end:
                if entry.name:
                    cluster = entry.name
                else:
                    values = header_values(hdrs, entry.cluster_header)
                    cluster = values[0] if values else ""
                if entry.host_rewrite_literal:
                    host_rewrite = entry.host_rewrite_literal
                chosen_entry = entry
                break
            begin = end
    path_rewrite = apply_rewrites(r, full_path, match_path)
    redirect = None
    if r.action == "redirect":
        redirect = redirect_location(r, full_path, match_path, authority or "", scheme, hdrs)
    h = None
    if r.hash_policies:
        # Envoy 1.40 hashes after the route's header mutations and rewrites.
        final_headers, final_path = headers_after_route(spec, vh, r, chosen_entry, hdrs, full_path, path_rewrite,
                                                        host_rewrite or None)
        h = compute_hash(r.hash_policies, final_headers, final_path, source_ip, hash64)
    return RouteMatch(
        virtual_host=vh.name, route_name=r.name, cluster=cluster, direct_response=(
            (r.direct_response.status, r.direct_response.body) if r.direct_response else None),
        redirect=redirect, timeout=r.timeout, retry_policy=r.retry_policy, hash=h,
        path_rewrite=path_rewrite, host_rewrite=host_rewrite or None,
        cluster_not_found_response_code=r.cluster_not_found_response_code,
        redirect_code=r.redirect.response_code if r.redirect else None, route=r,
    )
