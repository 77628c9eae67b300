"""RouteTable, pure-Python twin: Envoy 1.40's route matching over a RouteConfiguration.

First match wins, exactly as Envoy's linear scan, but routes are indexed: exact paths by hash,
prefixes by length-bucketed hash maps, and only the candidate routes are evaluated, in route
order. Virtual hosts are resolved through hash maps (exact, then suffix wildcards longest
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
from .hashing_py import xxh64
from .._routing import (
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

    __slots__ = ("chunks",)

    def __init__(self, chunks: List[Tuple[Any, int]]) -> None:
        self.chunks = chunks  # (compiled set, index of its first pattern)

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


class HeaderGroup:
    """A run of consecutive routes that differ only in one exact header value (a common
    gateway shape: ``prefix /api`` + ``x-tenant: tN``). First-match-wins over the run is one
    dictionary lookup per header value instead of one matcher per route."""

    __slots__ = ("start", "end", "name", "first_route")

    def __init__(self, start: int, end: int, name: str, first_route: Dict[str, int]) -> None:
        self.start = start  # first route index of the run
        self.end = end  # one past the last
        self.name = name  # the header
        self.first_route = first_route  # header value -> first route of the run expecting it

    def decide(self, hdrs: Dict[str, List[str]]) -> Optional[int]:
        """The route of the run that matches first, or None."""
        best: Optional[int] = None
        for value in hdrs.get(self.name) or ():
            ri = self.first_route.get(value)
            if ri is not None and (best is None or ri < best):
                best = ri
        return best


def _dispatch_key(r: RouteSpec) -> Optional[Tuple[Any, ...]]:
    if r.query or r.runtime_fraction is not None or r.grpc or len(r.headers) != 1:
        return None
    if r.path_kind not in ("prefix", "path", "separated"):
        return None
    h = r.headers[0]
    if (h.kind != "string" or h.invert or h.treat_missing_as_empty or h.string is None
            or h.string.kind != "exact" or h.string.ignore_case):
        return None
    return (r.path_kind, r.path_value, r.case_sensitive, h.name)


def header_groups(routes: Sequence[RouteSpec], min_size: int = 4) -> Tuple[List[int], List[HeaderGroup]]:
    """(group index per route or -1, the groups) for runs of at least ``min_size`` routes."""
    group_of = [-1] * len(routes)
    groups: List[HeaderGroup] = []
    i = 0
    n = len(routes)
    while i < n:
        key = _dispatch_key(routes[i])
        j = i + 1
        if key is not None:
            while j < n and _dispatch_key(routes[j]) == key:
                j += 1
            if j - i >= min_size:
                first: Dict[str, int] = {}
                for k in range(i, j):
                    first.setdefault(routes[k].headers[0].string.value, k)  # type: ignore[union-attr]
                for k in range(i, j):
                    group_of[k] = len(groups)
                groups.append(HeaderGroup(i, j, key[3], first))
        i = j
    return group_of, groups


class _VhostIndex:
    """Candidate index of one virtual host's routes."""

    __slots__ = ("spec", "exact", "exact_ci", "prefix", "prefix_ci", "prefix_lens", "prefix_ci_lens",
                 "always", "regex_set", "n_routes", "group_of", "groups")

    def __init__(self, spec: VirtualHostSpec) -> None:
        self.spec = spec
        self.exact: Dict[str, List[int]] = {}
        self.exact_ci: Dict[str, List[int]] = {}
        self.prefix: Dict[str, List[int]] = {}
        self.prefix_ci: Dict[str, List[int]] = {}
        self.always: List[int] = []  # regex routes: checked for every path
        self.group_of, self.groups = header_groups(spec.routes)
        for r in spec.routes:
            g = self.group_of[r.index]
            if g >= 0 and self.groups[g].start != r.index:
                continue  # a header dispatch run is entered through its first route only
            kind, value = r.path_kind, r.path_value
            if kind == "regex":
                self.always.append(r.index)
            elif kind == "path":
                if r.case_sensitive:
                    self.exact.setdefault(value, []).append(r.index)
                else:
                    self.exact_ci.setdefault(ascii_lower(value), []).append(r.index)
            else:  # prefix / separated: indexed by the prefix, separated re-checked
                if r.case_sensitive or kind == "prefix" and value in ("", "/"):
                    self.prefix.setdefault(value, []).append(r.index)
                else:
                    self.prefix_ci.setdefault(ascii_lower(value), []).append(r.index)
        self.regex_set = regex_set([spec.routes[i].path_value for i in self.always])
        self.prefix_lens = sorted({len(p) for p in self.prefix})
        self.prefix_ci_lens = sorted({len(p) for p in self.prefix_ci})
        self.n_routes = len(spec.routes)

    def candidates(self, path: str) -> List[int]:
        out: List[int] = []
        hit = self.exact.get(path)
        if hit:
            out.extend(hit)
        lowered = ascii_lower(path) if (self.exact_ci or self.prefix_ci) else path
        if self.exact_ci:
            hit = self.exact_ci.get(lowered)
            if hit:
                out.extend(hit)
        n = len(path)
        for length in self.prefix_lens:
            if length > n:
                break
            hit = self.prefix.get(path[:length])
            if hit:
                out.extend(hit)
        for length in self.prefix_ci_lens:
            if length > n:
                break
            hit = self.prefix_ci.get(lowered[:length])
            if hit:
                out.extend(hit)
        if self.regex_set is not None:
            matched = self.regex_set.Match(path)
            if matched:
                always = self.always
                out.extend(always[i] for i in matched)
        else:
            out.extend(self.always)
        out.sort()
        return out


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
            if d == "*":
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
        from ..xds.route_config import route_config_spec

        return cls(route_config_spec(route_configuration))

    @property
    def name(self) -> str:
        return self.spec.name

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
        group_of = index.group_of
        skip_below = -1
        for ri in index.candidates(match_path):
            if ri < skip_below:
                continue
            g = group_of[ri]
            if g >= 0:
                group = index.groups[g]
                # Every route of the run shares the path matcher, so all are candidates and
                # ri is the run's first; the run decides at once.
                winner = group.decide(hdrs) if _path_matches(routes[ri], match_path) else None
                if winner is None:
                    skip_below = group.end
                    continue
                ri = winner
                r = routes[ri]
                return _result(self.spec, index.spec, r, full_path, hdrs, authority, scheme, random_value,
                               source_ip, match_path)
            r = routes[ri]
            if _route_matches(r, match_path, full_path, hdrs, random_value, query_cache):
                return _result(self.spec, index.spec, r, full_path, hdrs, authority, scheme, random_value,
                               source_ip, match_path)
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
        try:
            return r.regex.fullmatch(p) is not None
        except UnicodeEncodeError:  # lone surrogates (see _routing.match_bytes)
            return regex_fullmatch(r.regex, p)
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
    if r.runtime_fraction is not None:
        numerator, denominator = r.runtime_fraction
        if not random_value % denominator < numerator:
            return False
    if not _path_matches(r, match_path):
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
