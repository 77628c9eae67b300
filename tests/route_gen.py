"""Seeded generator of RouteConfigurations and requests that stress Envoy's route matching.

``generate(seed)`` returns a :class:`Case`: a RouteConfiguration (proto3-JSON dict, snake_case
or, for some seeds, lowerCamelCase field names) and requests drawn to hit near-misses of it.
The same seed always gives the same case (``random.Random(seed)`` only; no hash randomisation,
no clock).  Everything here is independent of meshcore and of Envoy.

What a configuration may contain (see the ``_gen_*`` functions):

* virtual hosts with exact (mixed case, with ports, IPs), suffix-wildcard (``*.foo.com``,
  ``*foo.com``, ``*-bar.io``), prefix-wildcard (``api.*``, ``foo.com:*``) and ``*`` domains;
  ``ignore_port_in_host_matching``, ``ignore_path_parameters_in_path_matching``, ``vhost_header``;
* routes matching on ``prefix`` / ``path`` / ``safe_regex`` / ``path_separated_prefix``, with
  ``case_sensitive`` unset/true/false; header matchers of every kind (legacy ``exact_match`` incl.
  ``""``, ``prefix_match``..., ``safe_regex_match``, ``string_match`` with ``ignore_case``,
  ``range_match``, ``present_match`` true/false, no specifier), ``invert_match``,
  ``treat_missing_header_as_empty``, on ordinary and pseudo headers (``:path``, ``:authority``,
  ``:method``, ``:scheme``) and ``x-forwarded-proto``; ``query_parameters`` matchers;
  ``grpc``; ``runtime_fraction`` at 0 % or 100 %;
* actions: ``cluster``, ``weighted_clusters`` (weights incl. 0; ``header_name`` ``x-rv`` on
  some), ``cluster_header`` (``x-cluster``), ``direct_response`` (status, optional body),
  ``redirect`` (https/scheme/host/port/path/prefix rewrite, strip_query, response_code); plus
  route ``timeout`` / ``retry_policy`` / ``hash_policy`` / ``prefix_rewrite`` /
  ``host_rewrite_literal`` that do not change which route matches.

Requests: aimed at a (vhost, route) -- an authority derived from one of the vhost's domains,
a path from the route's path specifier, headers/query built to satisfy or nearly satisfy its
matchers -- then mutated (case, ports, trailing dot/slash, query, ``#fragment``, ``;params``,
repeated headers, missing headers...); some are entirely random.  Every request carries a
``random_value``; weighted clusters without ``header_name`` use it (the oracle sends it as a
header), those with ``header_name: x-rv`` get an ``x-rv`` header that is usually a number, and
sometimes unparsable, repeated or absent (then Envoy picks randomly: compare the possible set,
see :func:`weighted_selection_value`).

Only requests Envoy's HTTP/1 codec accepts are generated (visible ASCII paths starting with
``/``, no spaces; header values without surrounding whitespace).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
from typing import Any, Iterable

from route_oracle import Request

CLUSTERS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
CLUSTER_HEADER_NAME = "x-cluster"
WEIGHT_HEADER_NAME = "x-rv"
VHOST_HEADER_NAME = "x-vhost"

HOSTS = ["foo.com", "api.foo.com", "www.foo.com", "bar.io", "x.bar.io", "a.b.c.org", "localhost", "10.0.0.1", "[::1]", "svc.ns.svc.cluster.local"]
SUFFIXES = [".foo.com", "foo.com", "-bar.io", ".bar.io", ".com", "o.com", ".c.org", ".foo.com:8080", ".local"]
PREFIXES = ["api.", "www.", "foo.com:", "api.foo.", "x", "svc.ns", "10.0."]
PORTS = ["80", "8080", "443", "15001"]
LABELS = ["api", "www", "x", "a.b", "API", "Www", "z-y", "1"]

SEGMENTS = ["api", "API", "v1", "v2", "foo", "bar", "Foo", "a.b", "x-y", "~u", "%2F", "%61pi", "users", "123"]
REGEXES: list[tuple[str, list[str]]] = [
    (r"/api/v[0-9]+", ["/api/v1", "/api/v12", "/api/v", "/api/v1/", "/API/v1", "/api/v1?x=1", "/api/v1#f"]),
    (r"/foo/.*", ["/foo/", "/foo/bar", "/foo", "/foo/bar#x", "/Foo/x", "/foo/?q"]),
    (r"/(api|foo)/[^/]+", ["/api/x", "/foo/y", "/api/x/y", "/bar/x", "/api/"]),
    (r"(?i)/api/.*", ["/API/x", "/api/", "/Api/v1", "/apix"]),
    (r".*bar.*", ["/bar", "/foo/bar/x", "/BAR", "/x?bar", "/x#bar"]),
    (r"/foo/bar/?", ["/foo/bar", "/foo/bar/", "/foo/bar//", "/FOO/bar"]),
    (r"/v1/[0-9]{1,3}", ["/v1/1", "/v1/1234", "/v1/", "/v1/12"]),
    (r"/[a-z]+", ["/abc", "/ABC", "/a1", "/", "/users"]),
    (r"/x%2[Ff]y", ["/x%2Fy", "/x%2fy", "/x/y"]),
    (r"/a\.b(/.*)?", ["/a.b", "/axb", "/a.b/c", "/a.bc"]),
    (r"/users/[0-9]+/?", ["/users/123", "/users/123/", "/users/x", "/users/"]),
]
HEADER_NAMES = ["x-a", "x-b", "X-Multi", "x-num", "user-agent"]
PSEUDO = [":path", ":authority", ":method", ":scheme"]
VALUES = ["1", "2", "foo", "Foo", "FOO", "foobar", "a,b", "10", "-5", "bar", "x y", "foo.bar"]
VALUE_REGEXES = [r"[0-9]+", r"foo.*", r"(?i)foo", r".*,.*", r"1|2", r"a+b?", r"-?[0-9]"]
QUERY_NAMES = ["q", "Q", "debug", "v"]
QUERY_VALUES = ["1", "true", "TRUE", "yes", "", "a%20b", "x", "foo"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
STATUSES = [200, 201, 302, 400, 403, 404, 418, 429, 451, 500, 503, 599]
BODIES = ["", "ok", "denied", "{\"error\": \"nope\"}", "line1\nline2", "x" * 50]
REDIRECT_CODES = ["MOVED_PERMANENTLY", "FOUND", "SEE_OTHER", "TEMPORARY_REDIRECT", "PERMANENT_REDIRECT"]
REDIRECT_HOSTS = ["new.example.com", "NEW.example.com", "example.com:9000", "10.1.1.1"]
GRPC_CONTENT_TYPES = [
    "application/grpc", "application/grpc+proto", "application/grpc+json", "application/grpc;charset=utf-8",
    "application/grpc-web", "Application/grpc", "application/json", "application/grpc+",
]


@dataclasses.dataclass
class Case:
    seed: int
    config: dict
    requests: list[Request]
    extra_clusters: list[str]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _flip_case(r: random.Random, s: str) -> str:
    mode = r.randrange(3)
    if mode == 0:
        return s.upper()
    if mode == 1:
        return s.lower()
    return "".join(c.upper() if r.random() < 0.5 else c.lower() for c in s)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def camelize(obj: Any) -> Any:
    """lowerCamelCase every dict key (generated configs have field names as keys only)."""
    if isinstance(obj, dict):
        return {_camel(k): camelize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camelize(v) for v in obj]
    return obj


def simple_atoi_u64(value: str) -> int | None:
    """absl::SimpleAtoi(uint64) as Envoy 1.40 applies it to weighted_clusters.header_name values
    (the generator only produces values whose verdict is unambiguous)."""
    m = re.fullmatch(r"[ \t]*\+?([0-9]+)[ \t]*", value)
    if not m:
        return None
    n = int(m.group(1))
    return n if n < 2**64 else None


def weighted_selection_value(header_name: str, headers: Iterable[tuple[str, str]]) -> int | None:
    """The selection value a weighted_clusters ``header_name`` yields for these request headers,
    or None if Envoy falls back to its own random value (absent, repeated or unparsable)."""
    vals = [v for k, v in headers if k.lower() == header_name.lower()]
    if len(vals) != 1:
        return None
    return simple_atoi_u64(vals[0])


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _gen_domain(r: random.Random, used: set[str], allow_star: bool) -> str | None:
    for _ in range(20):
        kind = r.choices(["exact", "exact_port", "suffix", "prefix", "star", "odd"], [30, 12, 22, 14, 10 if allow_star else 0, 4])[0]
        if kind == "exact":
            d = r.choice(HOSTS)
            if r.random() < 0.25:
                d = _flip_case(r, d)
        elif kind == "exact_port":
            d = r.choice(HOSTS) + ":" + r.choice(PORTS)
        elif kind == "suffix":
            d = "*" + r.choice(SUFFIXES)
            if r.random() < 0.15:
                d = _flip_case(r, d)
        elif kind == "prefix":
            d = r.choice(PREFIXES) + "*"
        elif kind == "star":
            d = "*"
        else:
            d = r.choice(["foo.*.com", "*.*.com", "api.foo.com.", "*:8080"])
        if d.lower() not in used:
            used.add(d.lower())
            return d
    return None


def _gen_string_matcher(r: random.Random, values: list[str], regexes: list[str], allow_ignore_case: bool = True) -> dict:
    kind = r.choice(["exact", "prefix", "suffix", "contains", "safe_regex"])
    if kind == "safe_regex":
        return {"safe_regex": {"regex": r.choice(regexes)}}
    v = r.choice(values)
    if kind != "exact" and not v:
        v = "a"
    m: dict[str, Any] = {kind: v}
    if allow_ignore_case and r.random() < 0.4:
        m["ignore_case"] = r.random() < 0.8
    return m


def _pseudo_values(name: str) -> tuple[list[str], list[str]]:
    if name == ":path":
        return ["/api", "/foo/bar", "?q=", "/", "/API", "q=1", "bar"], [r"/api/.*", r".*\?.*", r"/[a-z]+", r"(?i)/foo.*"]
    if name == ":authority":
        return ["foo.com", "api.", ":8080", "FOO.com", "bar.io", "x.bar.io"], [r".*\.foo\.com", r"[a-z.]+:[0-9]+", r"(?i)FOO\.COM"]
    if name == ":method":
        return ["GET", "POST", "get", "PU", "T"], [r"GET|POST", r"P.*", r"(?i)delete"]
    if name == ":scheme":
        return ["http", "https", "HTTP", "ht"], [r"https?", r"HTTP"]
    if name == "x-forwarded-proto":
        return ["http", "https"], [r"https?"]
    return VALUES, VALUE_REGEXES


def _gen_header_matcher(r: random.Random) -> dict:
    u = r.random()
    if u < 0.2:
        name = r.choice(PSEUDO)
    elif u < 0.25:
        name = r.choice(["x-forwarded-proto", "content-type", "host"])
    else:
        name = r.choice(HEADER_NAMES)
    values, regexes = _pseudo_values(name)
    m: dict[str, Any] = {"name": name}
    kind = r.choices(
        ["string_match", "exact_match", "prefix_match", "suffix_match", "contains_match", "safe_regex_match", "range_match", "present_match", "none"],
        [30, 10, 4, 4, 4, 8, 10, 14, 6],
    )[0]
    if kind == "string_match":
        m["string_match"] = _gen_string_matcher(r, values, regexes)
    elif kind == "exact_match":
        m["exact_match"] = "" if r.random() < 0.25 else r.choice(values)
    elif kind in ("prefix_match", "suffix_match", "contains_match"):
        m[kind] = r.choice([v for v in values if v]) or "a"
    elif kind == "safe_regex_match":
        m["safe_regex_match"] = {"regex": r.choice(regexes)}
    elif kind == "range_match":
        start = r.choice([-10, 0, 1, 2, 5, 10])
        end = start + r.choice([1, 2, 10, 100])
        if r.random() < 0.3:  # proto3 JSON int64 as strings
            m["range_match"] = {"start": str(start), "end": str(end)}
        else:
            m["range_match"] = {"start": start, "end": end}
    elif kind == "present_match":
        m["present_match"] = r.random() < 0.6
    if r.random() < 0.2:
        m["invert_match"] = True
    if r.random() < 0.15:
        m["treat_missing_header_as_empty"] = True
    return m


def _gen_query_matcher(r: random.Random) -> dict:
    m: dict[str, Any] = {"name": r.choice(QUERY_NAMES)}
    u = r.random()
    if u < 0.6:
        m["string_match"] = _gen_string_matcher(r, [v for v in QUERY_VALUES if v] + [""], [r"[0-9]+", r"(?i)true|yes", r".*"])
    elif u < 0.9:
        m["present_match"] = r.random() < 0.6
    return m


def _gen_path_spec(r: random.Random, m: dict) -> str:
    kind = r.choices(["prefix", "path", "safe_regex", "path_separated_prefix"], [40, 25, 20, 15])[0]
    if kind == "prefix":
        u = r.random()
        if u < 0.12:
            m["prefix"] = r.choice(["", "/"])
        else:
            segs = [r.choice(SEGMENTS) for _ in range(r.randint(1, 2))]
            p = "/" + "/".join(segs)
            if r.random() < 0.25:
                p += "/"
            if r.random() < 0.1:
                p = p[:-1] if len(p) > 2 else p  # a prefix that ends mid-segment
            m["prefix"] = p
    elif kind == "path":
        segs = [r.choice(SEGMENTS) for _ in range(r.randint(0, 2))]
        p = "/" + "/".join(segs)
        if segs and r.random() < 0.2:
            p += "/"
        m["path"] = p
    elif kind == "safe_regex":
        m["safe_regex"] = {"regex": r.choice(REGEXES)[0]}
        if r.random() < 0.1:
            m["safe_regex"]["google_re2"] = {}
    else:
        segs = [r.choice(SEGMENTS) for _ in range(r.randint(1, 2))]
        m["path_separated_prefix"] = "/" + "/".join(segs)
    if r.random() < 0.35:
        m["case_sensitive"] = r.random() < 0.4
    return kind


def _gen_action(r: random.Random, route: dict, path_kind: str) -> None:
    kind = r.choices(["route", "direct_response", "redirect"], [58, 20, 22])[0]
    can_prefix_rewrite = path_kind in ("prefix", "path", "path_separated_prefix")
    if kind == "route":
        a: dict[str, Any] = {}
        u = r.random()
        if u < 0.55:
            a["cluster"] = r.choice(CLUSTERS)
        elif u < 0.85:
            n = r.randint(1, 4)
            clusters = []
            for _ in range(n):
                clusters.append({"name": r.choice(CLUSTERS), "weight": r.choice([0, 1, 1, 3, 10, 25, 50, 70, 100])})
            if sum(c["weight"] for c in clusters) == 0:
                clusters[r.randrange(n)]["weight"] = r.choice([1, 5])
            wc: dict[str, Any] = {"clusters": clusters}
            if r.random() < 0.4:
                wc["header_name"] = WEIGHT_HEADER_NAME
            if r.random() < 0.15:
                wc["runtime_key_prefix"] = f"rt.weights{r.randrange(100)}"
            a["weighted_clusters"] = wc
        else:
            a["cluster_header"] = CLUSTER_HEADER_NAME
        if can_prefix_rewrite and r.random() < 0.2:
            a["prefix_rewrite"] = r.choice(["/", "/new", "/new/", ""])
        if r.random() < 0.1:
            a["host_rewrite_literal"] = r.choice(["rewritten.example", "Upstream:81"])
        if r.random() < 0.3:
            a["timeout"] = r.choice(["0s", "3s", "15s", "2.500s"])
        if r.random() < 0.25:
            a["retry_policy"] = {"retry_on": r.choice(["5xx", "connect-failure,reset", "gateway-error"]), "num_retries": r.randint(0, 3)}
        if r.random() < 0.25:
            hp = [{"header": {"header_name": r.choice(["x-user", "x-a"])}}]
            if r.random() < 0.3:
                hp.append({"query_parameter": {"name": "q"}, "terminal": True})
            a["hash_policy"] = hp
        route["route"] = a
    elif kind == "direct_response":
        dr: dict[str, Any] = {"status": r.choice(STATUSES)}
        body = r.choice(BODIES)
        if body or r.random() < 0.3:
            dr["body"] = {"inline_string": body}
        route["direct_response"] = dr
    else:
        rd: dict[str, Any] = {}
        u = r.random()
        if u < 0.35:
            rd["https_redirect"] = r.random() < 0.9
        elif u < 0.5:
            rd["scheme_redirect"] = r.choice(["https", "http", "HTTPS", "ws"])
        if r.random() < 0.35:
            rd["host_redirect"] = r.choice(REDIRECT_HOSTS)
        if r.random() < 0.3:
            rd["port_redirect"] = r.choice([80, 443, 8443, 9090])
        u = r.random()
        if u < 0.3:
            rd["path_redirect"] = r.choice(["/moved", "/", "/moved?x=1", "/a/b/"])
        elif u < 0.5 and can_prefix_rewrite:
            rd["prefix_rewrite"] = r.choice(["/new/", "/new", "/", ""])
        if r.random() < 0.3:
            rd["strip_query"] = r.random() < 0.85
        if r.random() < 0.5:
            rd["response_code"] = r.choice(REDIRECT_CODES)
        route["redirect"] = rd


def _gen_route(r: random.Random, vi: int, ri: int) -> dict:
    m: dict[str, Any] = {}
    path_kind = _gen_path_spec(r, m)
    nh = r.choices([0, 1, 2, 3], [45, 30, 17, 8])[0]
    if nh:
        m["headers"] = [_gen_header_matcher(r) for _ in range(nh)]
    nq = r.choices([0, 1, 2], [75, 20, 5])[0]
    if nq:
        m["query_parameters"] = [_gen_query_matcher(r) for _ in range(nq)]
    if r.random() < 0.1:
        m["grpc"] = {}
    if r.random() < 0.08:
        denom = r.choice(["HUNDRED", "TEN_THOUSAND", "MILLION"])
        full = {"HUNDRED": 100, "TEN_THOUSAND": 10000, "MILLION": 1000000}[denom]
        frac: dict[str, Any] = {"numerator": r.choice([0, full])}
        if denom != "HUNDRED" or r.random() < 0.5:
            frac["denominator"] = denom
        m["runtime_fraction"] = {"default_value": frac, "runtime_key": f"rt.route{r.randrange(1000)}"}
    route: dict[str, Any] = {"match": m}
    if r.random() < 0.85:
        route["name"] = f"r{vi}.{ri}"
    _gen_action(r, route, path_kind)
    return route


def gen_config(r: random.Random) -> dict:
    used: set[str] = set()
    n_vh = r.choices([1, 2, 3, 4, 5, 6], [10, 20, 25, 20, 15, 10])[0]
    star_left = True
    vhosts = []
    for vi in range(n_vh):
        domains = []
        for _ in range(r.choices([1, 2, 3, 4], [40, 30, 20, 10])[0]):
            d = _gen_domain(r, used, star_left)
            if d is None:
                continue
            if d == "*":
                star_left = False
            domains.append(d)
        if not domains:
            continue
        n_r = r.choices([1, 2, 3, 4, 5, 6, 7], [10, 15, 20, 20, 15, 10, 10])[0]
        routes = [_gen_route(r, vi, ri) for ri in range(n_r)]
        if r.random() < 0.3:  # a catch-all last route, as real configs have
            last = _gen_route(r, vi, n_r)
            last["match"] = {"prefix": r.choice(["/", ""])}
            routes.append(last)
        vh = {"name": f"vh{vi}", "domains": domains, "routes": routes}
        if r.random() < 0.15:
            vh["retry_policy"] = {"retry_on": "5xx", "num_retries": 1}
        vhosts.append(vh)
    cfg: dict[str, Any] = {"name": f"rc{r.randrange(1000)}", "virtual_hosts": vhosts}
    if r.random() < 0.25:
        cfg["ignore_port_in_host_matching"] = True
    if r.random() < 0.15:
        cfg["ignore_path_parameters_in_path_matching"] = True
    if r.random() < 0.04:
        cfg["vhost_header"] = VHOST_HEADER_NAME
    return cfg


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------


def _authority_for(r: random.Random, domain: str, mut: float) -> str:
    """A Host for ``domain``; ``mut`` (0..1) scales the probability of near-miss mutations."""
    d = domain
    if d == "*":
        host = r.choice(HOSTS + [r.choice(LABELS) + ".example"])
    elif d.startswith("*"):
        suffix = d[1:]
        u = r.random()
        if u < 1 - 0.35 * mut:
            host = r.choice(LABELS) + suffix
        elif u < 1 - 0.2 * mut:
            host = suffix  # the wildcard must match at least one character
        else:
            host = suffix.lstrip(".-")
    elif d.endswith("*"):
        prefix = d[:-1]
        host = prefix + r.choice(["x", "foo.com", "80", "a.b", "bar.io"]) if r.random() < 1 - 0.3 * mut else prefix
    else:
        host = d
    if r.random() < 0.3:
        host = _flip_case(r, host)  # host matching is case-insensitive: not a miss
    u = r.random()
    if u < 0.15 * mut:
        host = _with_port(r, host)
    elif u < 0.22 * mut:
        host = _without_port(host)
    elif u < 0.25 * mut:
        host = host + "."
    return host


def _without_port(host: str) -> str:
    i = host.rfind(":")
    if i > 0 and "]" not in host[i:]:
        return host[:i]
    return host


def _with_port(r: random.Random, host: str) -> str:
    return _without_port(host) + ":" + r.choice(PORTS + ["", "x"] if r.random() < 0.3 else PORTS)


def _random_authority(r: random.Random) -> str:
    host = r.choice([r.choice(HOSTS), r.choice(LABELS) + r.choice(SUFFIXES), r.choice(PREFIXES) + r.choice(LABELS), "unknown.example", ""])
    if r.random() < 0.3:
        host = _with_port(r, host)
    if r.random() < 0.2:
        host = _flip_case(r, host)
    return host


def _path_for(r: random.Random, m: dict, mut: float) -> str:
    if "prefix" in m:
        p = (m["prefix"] or "/") + r.choice(["", "", "/", "x", "/x", "/x/y", "-z"])
    elif "path" in m:
        p = m["path"]
        u = r.random()
        if u < 0.1 * mut:
            p += "/"
        elif u < 0.15 * mut:
            p = p.rstrip("/") or "/"
        elif u < 0.2 * mut:
            p += "x"
    elif "safe_regex" in m:
        regex = m["safe_regex"]["regex"]
        examples = next((ex for rx, ex in REGEXES if rx == regex), ["/"])
        if not mut:
            examples = [e for e in examples if re.fullmatch(regex, e)] or examples
        p = r.choice(examples)
    elif "path_separated_prefix" in m:
        p = m["path_separated_prefix"] + r.choice(["", "/", "/x", "//", "/x/y"] + (["x", "X"] if mut else []))
    else:
        p = "/"
    if not p.startswith("/"):
        p = "/" + p
    if r.random() < (0.3 * mut if m.get("case_sensitive", True) else 0.4):
        p = _flip_case(r, p)
    if r.random() < 0.08 * mut:
        p = p.replace("/", "//", 1)
    if r.random() < 0.05 * mut and len(p) > 1:
        p = p.replace("a", "%61", 1)
    return p


def _random_path(r: random.Random) -> str:
    segs = [r.choice(SEGMENTS + ["", "..", "."]) for _ in range(r.randint(0, 3))]
    return "/" + "/".join(segs)


def _matching_value(r: random.Random, sm: dict) -> str | None:
    """A value the StringMatcher ``sm`` accepts (None if the pool has none)."""
    if "safe_regex" in sm:
        rx = sm["safe_regex"]["regex"]
        pool = [v for v in _REGEX_VALUES.get(rx, []) if re.fullmatch(rx, v)]
        return r.choice(pool) if pool else None
    for k in ("exact", "prefix", "suffix", "contains"):
        if k in sm:
            v = sm[k]
            if sm.get("ignore_case") and r.random() < 0.5:
                v = _flip_case(r, v)
            if k == "prefix":
                v += r.choice(["", "x", "-1"])
            elif k == "suffix":
                v = r.choice(["", "x", "1-"]) + v
            elif k == "contains":
                v = r.choice(["", "x"]) + v + r.choice(["", "y"])
            return v
    return None


_REGEX_VALUES = {
    r"[0-9]+": ["12", "x1", "", "007"], r"foo.*": ["foo", "foox", "Foo"], r"(?i)foo": ["FOO", "foo", "fo"],
    r".*,.*": ["a,b", "ab", ","], r"1|2": ["1", "2", "12"], r"a+b?": ["aab", "b", "a"], r"-?[0-9]": ["-5", "5", "--5"],
    r"(?i)true|yes": ["TRUE", "yes", "Yes", "no"], r".*": ["", "x"],
}


def _value_for_string_matcher(r: random.Random, sm: dict, mut: float) -> str:
    if r.random() >= mut:
        v = _matching_value(r, sm)
        if v is not None:
            return v
    if "safe_regex" in sm:
        return r.choice(_REGEX_VALUES.get(sm["safe_regex"]["regex"], ["x", ""]))
    for k in ("exact", "prefix", "suffix", "contains"):
        if k in sm:
            v = sm[k]
            u = r.random()
            if u < 0.3:
                v = _flip_case(r, v)
            elif u < 0.5 and k != "exact":
                v = r.choice(["x", "", "foo"]) + v + r.choice(["", "y", "bar"])
            elif u < 0.6:
                v = v[:-1]
            return v
    return r.choice(VALUES)


def _query_for(r: random.Random, matchers: list[dict], mut: float) -> str:
    params: list[str] = []
    for qm in matchers:
        name = qm["name"]
        want_absent = qm.get("present_match") is False
        if r.random() < (0.15 * mut if not want_absent else 1 - 0.3 * mut):
            continue  # absent
        if r.random() < 0.15 * mut:
            name = _flip_case(r, name)
        sm = qm.get("string_match")
        val = _value_for_string_matcher(r, sm, mut) if sm is not None else r.choice(QUERY_VALUES)
        val = val.replace("%", "%25").replace("&", "%26").replace("#", "%23").replace(" ", "%20").replace("=", "%3D")
        if r.random() < 0.1 * mut:
            params.append(name)  # bare: present with value ""
        else:
            params.append(f"{name}={val}")
        if r.random() < 0.1 * mut:
            params.append(f"{name}={r.choice(QUERY_VALUES)}")  # the first occurrence wins
    if r.random() < 0.3:
        params.append(f"{r.choice(QUERY_NAMES)}={r.choice(QUERY_VALUES)}")
    if r.random() < 0.3:
        r.shuffle(params)
    return "&".join(params)


def _headers_for(r: random.Random, matchers: list[dict], mut: float) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for hm in matchers:
        name = hm["name"]
        if name.startswith(":") or name in ("host", "content-type"):
            continue  # comes from the request line / Host / grpc content type
        if name == "x-forwarded-proto" and r.random() < 0.8:
            continue  # Envoy sets it (http) unless the client did
        inv = bool(hm.get("invert_match"))
        m = 0.5 if inv else mut  # for an inverted matcher a "miss" is what matches
        if r.random() < (0.15 * m if hm.get("present_match", True) is not False else 1 - 0.3 * m):
            continue  # absent
        sent = _flip_case(r, name) if r.random() < 0.3 else name
        if "string_match" in hm:
            vals = [_value_for_string_matcher(r, hm["string_match"], m)]
        elif "exact_match" in hm:
            vals = [hm["exact_match"] if r.random() >= m * 0.5 else r.choice(VALUES)]
        elif "range_match" in hm:
            rm = hm["range_match"]
            s, e = int(rm["start"]), int(rm["end"])
            vals = [str(r.choice([s, (s + e) // 2] + ([e - 1, e, s - 1] if r.random() < m else [])))]
            if r.random() < 0.15 * m:
                vals = [r.choice(["+" + vals[0], vals[0] + ".0", "x", "9" * 20, " " + vals[0]])]
        elif any(k in hm for k in ("prefix_match", "suffix_match", "contains_match")):
            k = next(k for k in ("prefix_match", "suffix_match", "contains_match") if k in hm)
            vals = [_value_for_string_matcher(r, {k.split("_")[0]: hm[k]}, m)]
        elif "safe_regex_match" in hm:
            vals = [_value_for_string_matcher(r, {"safe_regex": hm["safe_regex_match"]}, m)]
        else:
            vals = [r.choice(VALUES)]
        if r.random() < 0.25:
            vals.append(r.choice(VALUES + [vals[0]]))  # repeated header: matched value by value
        for v in vals:
            out.append((sent, v))
    return out


def gen_request(r: random.Random, cfg: dict) -> Request:
    """One request for ``cfg`` (snake_case).  Half the aimed requests are faithful (built to
    match the aimed route), half are near-misses."""
    vhosts = cfg["virtual_hosts"]
    headers: list[tuple[str, str]] = []
    method = "GET"
    if vhosts and r.random() < 0.9:
        mut = 0.0 if r.random() < 0.5 else 1.0
        vh = r.choice(vhosts)
        authority = _authority_for(r, r.choice(vh["domains"]), mut)
        route = r.choice(vh["routes"])
        m = route["match"]
        path = _path_for(r, m, mut)
        query = _query_for(r, m.get("query_parameters", []), mut) if r.random() < 0.9 else ""
        headers += _headers_for(r, m.get("headers", []), mut)
        for hm in m.get("headers", []):
            if hm["name"] == ":method" and r.random() < 0.6:
                method = r.choice(["GET", "POST", "PUT", "DELETE"])
        if m.get("grpc") is not None and r.random() < 1 - 0.2 * mut:
            headers.append(("content-type", r.choice(GRPC_CONTENT_TYPES[:3])))
        act = route.get("route", {})
        if act.get("cluster_header"):
            u = r.random()
            if u < 0.75:
                headers.append((CLUSTER_HEADER_NAME, r.choice(CLUSTERS)))
            elif u < 0.85:
                headers.append((CLUSTER_HEADER_NAME, r.choice(["nope", "Alpha", ""])))
            elif u < 0.9:
                headers += [(CLUSTER_HEADER_NAME, r.choice(CLUSTERS)), (CLUSTER_HEADER_NAME, r.choice(CLUSTERS))]
        wc = act.get("weighted_clusters")
        if wc and wc.get("header_name"):
            u = r.random()
            if u < 0.72:
                headers.append((wc["header_name"], str(r.choice([0, 1, 29, 30, 31, 99, 100, 12345, 2**63, 2**64 - 1]))))
            elif u < 0.8:
                headers.append((wc["header_name"], r.choice(["+3", "007", "42"])))
            elif u < 0.88:
                headers.append((wc["header_name"], r.choice(["abc", "-1", "18446744073709551616", "1.5", "0x10"])))
            elif u < 0.94:
                headers += [(wc["header_name"], "1"), (wc["header_name"], "2")]
    else:
        mut = 1.0
        authority = _random_authority(r)
        path = _random_path(r)
        query = _query_for(r, [], 1.0) if r.random() < 0.3 else ""
    if cfg.get("vhost_header") and r.random() < 0.8:
        vh = r.choice(vhosts) if vhosts else None
        headers.append((cfg["vhost_header"], _authority_for(r, r.choice(vh["domains"]), mut) if vh else "x"))
    if query:
        path += ("&" if "?" in path else "?") + query
    u = r.random()
    if u < 0.06:
        path += "#" + r.choice(["frag", "", "x?y=1", "/a"])
    elif u < 0.12 and cfg.get("ignore_path_parameters_in_path_matching"):
        i = path.find("?")
        head, tail = (path, "") if i < 0 else (path[:i], path[i:])
        segs = head.split("/")
        k = r.randrange(1, len(segs)) if len(segs) > 1 else 0
        segs[k] += ";" + r.choice(["v=1", "jsessionid=x", "", "a;b"])
        path = "/".join(segs) + tail
    elif u < 0.12 * mut:
        path = path.replace("/", "/;p=1/", 1) if "/" in path[1:] else path + ";p=1"
    if r.random() < 0.15 * mut:
        method = r.choice(METHODS)
    if r.random() < 0.12 * mut:
        headers.append(("content-type", r.choice(GRPC_CONTENT_TYPES)))
    if r.random() < 0.1 * mut:
        headers.append(("x-forwarded-proto", r.choice(["https", "http"])))
    if r.random() < 0.15 * mut:
        headers.append((r.choice(HEADER_NAMES), r.choice(VALUES)))
    # Inline headers (content-type, user-agent, ...) are coalesced by Envoy's header map when
    # repeated; keep at most one of each so what the library sees is what Envoy matched.
    seen: set[str] = set()
    cleaned: list[tuple[str, str]] = []
    for k, v in headers:
        lk = k.lower()
        if lk in ("content-type", "user-agent", "x-forwarded-proto") and lk in seen:
            continue
        seen.add(lk)
        cleaned.append((k, v.strip(" \t")))  # Envoy's HTTP/1 codec trims surrounding whitespace
    if r.random() < 0.3:
        r.shuffle(cleaned)
    rv = r.choice([r.randrange(2**64), r.randrange(1000), r.randrange(100)])
    return Request(authority=authority, path=path, method=method, headers=tuple(cleaned), random_value=rv)


def generate(seed: int, n_requests: int = 100) -> Case:
    r = random.Random(seed)
    cfg = gen_config(r)
    reqs = [gen_request(r, cfg) for _ in range(n_requests)]
    out_cfg = camelize(cfg) if r.random() < 0.1 else cfg
    return Case(seed=seed, config=out_cfg, requests=reqs, extra_clusters=list(CLUSTERS))


# --------------------------------------------------------------------------------------------
# shrinking: smaller variants of a configuration (tried in order; the caller keeps the first
# that still shows the disagreement and asks again)
# --------------------------------------------------------------------------------------------


def shrink_candidates(cfg: dict, keep: Iterable[tuple[int, int]] = ()) -> list[dict]:
    """Smaller variants of ``cfg``: keep only the vhosts/routes in ``keep`` ((vhost, route)
    indices), then each vhost dropped, each route dropped, each matcher/domain dropped.
    Field names must be snake_case or camelCase consistently (handled)."""
    vk = "virtualHosts" if "virtualHosts" in cfg else "virtual_hosts"
    out: list[dict] = []
    vhs = cfg.get(vk, [])
    keep = sorted(set(keep))
    if keep:
        c = copy.deepcopy(cfg)
        kv = sorted({v for v, _ in keep})
        new = []
        for v in kv:
            vh = copy.deepcopy(vhs[v])
            last = max(ri for vi, ri in keep if vi == v)
            vh["routes"] = vh["routes"][: last + 1]
            new.append(vh)
        c[vk] = new
        out.append(c)
    for i in range(len(vhs)):
        if len(vhs) > 1:
            c = copy.deepcopy(cfg)
            del c[vk][i]
            out.append(c)
            c = copy.deepcopy(cfg)
            c[vk] = [c[vk][i]]
            out.append(c)
        for j in range(1, len(vhs[i].get("routes", []))):
            c = copy.deepcopy(cfg)
            c[vk][i]["routes"] = c[vk][i]["routes"][:j]
            out.append(c)
    for i, vh in enumerate(vhs):
        for j in range(len(vh.get("routes", []))):
            if len(vh["routes"]) > 1:
                c = copy.deepcopy(cfg)
                del c[vk][i]["routes"][j]
                out.append(c)
        for j in range(len(vh.get("domains", []))):
            if len(vh["domains"]) > 1:
                c = copy.deepcopy(cfg)
                del c[vk][i]["domains"][j]
                out.append(c)
        for j, rt in enumerate(vh.get("routes", [])):
            m = rt.get("match", {})
            for field in ("headers", "query_parameters", "queryParameters"):
                for k in range(len(m.get(field, []))):
                    c = copy.deepcopy(cfg)
                    lst = c[vk][i]["routes"][j]["match"][field]
                    del lst[k]
                    if not lst:
                        del c[vk][i]["routes"][j]["match"][field]
                    out.append(c)
            for field in ("grpc", "runtime_fraction", "runtimeFraction", "case_sensitive", "caseSensitive"):
                if field in m:
                    c = copy.deepcopy(cfg)
                    del c[vk][i]["routes"][j]["match"][field]
                    out.append(c)
            act = rt.get("route", {})
            for field in ("timeout", "retry_policy", "retryPolicy", "hash_policy", "hashPolicy", "prefix_rewrite", "prefixRewrite", "host_rewrite_literal", "hostRewriteLiteral"):
                if field in act:
                    c = copy.deepcopy(cfg)
                    del c[vk][i]["routes"][j]["route"][field]
                    out.append(c)
    for field in ("ignore_port_in_host_matching", "ignorePortInHostMatching", "ignore_path_parameters_in_path_matching", "ignorePathParametersInPathMatching"):
        if field in cfg:
            c = copy.deepcopy(cfg)
            del c[field]
            out.append(c)
    return out


def shrink_request_candidates(req: Request) -> list[Request]:
    """Smaller variants of a request: each header dropped, the query / fragment dropped."""
    out = []
    for i in range(len(req.headers)):
        out.append(dataclasses.replace(req, headers=req.headers[:i] + req.headers[i + 1 :]))
    for sep in ("#", "?"):
        if sep in req.path:
            out.append(dataclasses.replace(req, path=req.path.split(sep, 1)[0] or "/"))
    if req.method != "GET":
        out.append(dataclasses.replace(req, method="GET"))
    return out


# --------------------------------------------------------------------------------------------
# mixed tables (issue 12): one virtual host of ~1,000 routes mixing exact paths, prefixes,
# safe_regex and header-matched routes in any order, the shape where route indexes must prove
# what they skip (first match wins over the whole table)
# --------------------------------------------------------------------------------------------

MIXED_PREFIXES = ["/hdr/", "/hdr/", "/hdr/", "/api/", "/api/v1/", "/api/v1/", "/HDR/", "/h"] * 3 + ["/"]
MIXED_TENANTS = 80  # header values t-0 .. t-39: values repeat across routes (first match wins)
MIXED_REGEXES = [  # (pattern template, a path it matches), {i} the route's number
    ("/r/[a-z]+/{i}", "/r/abc/{i}"),
    ("/r/{i}/.*", "/r/{i}/x/y"),
    ("(?i)/rx/{i}", "/RX/{i}"),
    ("/r/(a|b)/{i}/?", "/r/b/{i}/"),
    (".*/z{i}", "/any/z{i}"),
    ("/api/v1/[0-9]+/{i}", "/api/v1/42/{i}"),
    ("/hdr/[a-z]*{i}", "/hdr/q{i}"),
]


def _mixed_headers(r: random.Random) -> list[dict]:
    """The header matchers of a header-matched route. Most are the indexed shape (an exact
    value of an ordinary header); matchers that match most requests (inverted, missing treated
    as empty, presence) come after an indexed one, so they do not shadow the rest of the table."""
    tenant = f"t-{r.randrange(MIXED_TENANTS)}"
    roll = r.random()
    name = r.choice(["x-tenant", "x-tenant", "X-Tenant", "x-env"])
    indexed = {"name": name, "exact_match": tenant}
    if roll < 0.55:
        return [indexed]
    if roll < 0.62:
        return [{"name": "x-tenant", "string_match": {"exact": tenant}}]
    if roll < 0.67:
        return [{"name": "x-tenant", "string_match": {"exact": tenant.upper(), "ignore_case": True}}]
    if roll < 0.72:
        return [{"name": "x-tenant", "prefix_match": tenant}]
    if roll < 0.77:
        return [{"name": "user-agent", "exact_match": tenant}]  # coalesced (inline): not indexed
    if roll < 0.82:
        return [indexed, {"name": "x-tenant", "exact_match": f"t-{r.randrange(MIXED_TENANTS)}", "invert_match": True}]
    if roll < 0.86:
        return [indexed, {"name": "x-empty", "string_match": {"exact": ""}, "treat_missing_header_as_empty": True}]
    if roll < 0.90:
        return [indexed, {"name": ":method", "exact_match": "POST"}]
    if roll < 0.94:
        return [{"name": "x-env", "present_match": True}, indexed]
    return [indexed, {"name": r.choice(["x-tenant", "x-env"]), "exact_match": f"t-{r.randrange(MIXED_TENANTS)}"}]


def gen_mixed_config(r: random.Random, n_routes: int = 1000) -> dict:
    routes = []
    for i in range(n_routes):
        kind = r.choice(["exact", "prefix", "regex", "header", "header", "exact_header"])
        m: dict = {}
        if kind == "exact":
            m["path"] = r.choice([f"/e/{i}/item", f"/e/{r.randrange(n_routes)}/item", "/hdr/", "/api/v1/"])
            if r.random() < 0.15:
                m["case_sensitive"] = False
        elif kind == "prefix":
            roll = r.random()
            if roll < 0.7:
                m["prefix"] = r.choice([f"/p/{i}/", f"/p/{i}", f"/P/{i}/"])
            elif roll < 0.85:
                m["path_separated_prefix"] = f"/s/{i}"
            else:
                m["prefix"] = r.choice(["/p/", "/api/v1/x", "/hdr/q1"])
            if r.random() < 0.2:
                m["case_sensitive"] = False
        elif kind == "regex":
            pattern, _ = r.choice(MIXED_REGEXES)
            m["safe_regex"] = {"regex": pattern.format(i=i)}
        else:
            if kind == "exact_header":
                m["path"] = r.choice(["/hdr/", "/api/v1/", f"/e/{i}/item"])
            else:
                m["prefix"] = r.choice(MIXED_PREFIXES)
                if r.random() < 0.1:
                    m["case_sensitive"] = False
            m["headers"] = _mixed_headers(r)
            if r.random() < 0.05:
                m["query_parameters"] = [{"name": "q", "present_match": True}]
        route: dict = {"name": f"m{i}", "match": m, "route": {"cluster": CLUSTERS[i % len(CLUSTERS)]}}
        routes.append(route)
    return {"name": "mixed", "virtual_hosts": [{"name": "mixed", "domains": ["*"], "routes": routes}]}


def _mixed_request_for(r: random.Random, route: dict) -> tuple[str, list[tuple[str, str]]]:
    """A path and headers aimed at ``route`` (often matching it, sometimes a near miss)."""
    m = route["match"]
    headers: list[tuple[str, str]] = []
    if "path" in m:
        path = m["path"]
    elif "prefix" in m:
        path = m["prefix"] + r.choice(["", "x", "v1/", "q1"])
    elif "path_separated_prefix" in m:
        path = m["path_separated_prefix"] + r.choice(["", "/", "/x", "x"])
    else:
        pattern = m["safe_regex"]["regex"]
        n = re.search(r"(\d+)", pattern).group(1)
        template = next((p for t, p in MIXED_REGEXES if t.format(i=n) == pattern), "/r/abc/" + n)
        path = template.format(i=n)
    for h in m.get("headers", []):
        name = h["name"].lower()
        if name[:1] == ":":
            continue  # :method: the request's method (gen_mixed_request)
        if "exact_match" in h:
            headers.append((name, h["exact_match"]))
        elif "string_match" in h:
            headers.append((name, h["string_match"]["exact"]))
        elif "prefix_match" in h:
            headers.append((name, h["prefix_match"] + "1"))
        else:
            headers.append((name, f"t-{r.randrange(MIXED_TENANTS)}"))
    if "query_parameters" in m and r.random() < 0.7:
        path += "?q=1"
    # mutations: other tenants, repeats, case, dropped headers, a query, path case
    if r.random() < 0.3:
        headers.append((r.choice(["x-tenant", "X-Tenant", "x-env"]), f"t-{r.randrange(MIXED_TENANTS)}"))
    if r.random() < 0.15 and headers:
        headers.pop(r.randrange(len(headers)))
    if r.random() < 0.15:
        headers = [(k.upper() if r.random() < 0.5 else k, v) for k, v in headers]
    if r.random() < 0.1:
        path += "?a=b"
    if r.random() < 0.1:
        path = _flip_case(r, path)
    r.shuffle(headers)
    return path, headers


def gen_mixed_request(r: random.Random, cfg: dict) -> Request:
    routes = cfg["virtual_hosts"][0]["routes"]
    if r.random() < 0.9:
        path, headers = _mixed_request_for(r, r.choice(routes))
    else:
        path = r.choice(["/nothing", "/hdr", "/e/x/item", "/r/ABC/1", "/p", "/s/1x"])
        headers = [("x-tenant", f"t-{r.randrange(MIXED_TENANTS + 5)}")] if r.random() < 0.5 else []
    method = "POST" if r.random() < 0.3 else "GET"
    return Request(authority="mixed.example.com", path=path, method=method, headers=tuple(headers),
                   random_value=r.randrange(2**64))


def generate_mixed(seed: int, n_routes: int = 1000, n_requests: int = 200) -> Case:
    """A mixed table (see ``gen_mixed_config``) and requests aimed at its routes."""
    r = random.Random(seed)
    cfg = gen_mixed_config(r, n_routes)
    reqs = [gen_mixed_request(r, cfg) for _ in range(n_requests)]
    return Case(seed=seed, config=cfg, requests=reqs, extra_clusters=list(CLUSTERS))
