"""The indexed tables (tries, RE2 sets, header dispatch runs) decide exactly as a plain
first-match-wins linear scan over the routes, which is what Envoy does."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore._fast import routes_py
from meshcore._routing import normalise_headers, regex_fullmatch, strip_path_params
from oracle_common import route_table_class
from route_gen import generate_mixed

from .gen import requests, route_config


def linear(rt, authority, path, headers, method, rv):
    """Envoy's algorithm, literally: find the vhost, then try every route in order."""
    full_path = path.split("#", 1)[0]
    hdrs = normalise_headers(headers, authority, full_path, method, "http")
    vi = rt._find_vhost(authority, hdrs)
    if vi is None:
        return None
    q = full_path.find("?")
    match_path = full_path if q < 0 else full_path[:q]
    if rt.spec.ignore_path_parameters_in_path_matching:
        match_path = strip_path_params(match_path)
    for r in rt.spec.virtual_hosts[vi].routes:
        if routes_py._route_matches(r, match_path, full_path, hdrs, rv, []):
            return r.name
    return None


def header_run_config(seed: int) -> dict:
    rnd = random.Random(seed)
    routes = []
    while len(routes) < 40:
        kind = rnd.random()
        if kind < 0.7:  # a run of tenant routes on a shared prefix and header
            prefix = rnd.choice(["/api", "/v2"])
            name = rnd.choice(["x-tenant", "x-tenant", "X-Other"])
            for _ in range(rnd.randrange(1, 12)):
                routes.append({"match": {"prefix": prefix, "headers": [{"name": name,
                               "exact_match": f"t{rnd.randrange(12)}"}]}})
        elif kind < 0.8:
            routes.append({"match": {"prefix": "/api", "headers": [{"name": "x-tenant", "prefix_match": "t1"}]}})
        else:
            routes.append({"match": {"prefix": rnd.choice(["/api/x", "/"])}})
    for i, r in enumerate(routes):
        r["name"] = f"r{i}"
        r["route"] = {"cluster": f"c{i}"}
    return {"name": "runs", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]}


def tables(impl: str, cfg: dict):
    """(the pure twin as the linear scan's reference, the twin under test) built from ``cfg``."""
    return routes_py.RouteTable.from_xds(cfg), route_table_class(impl).from_xds(cfg)


SEEDS = pytest.mark.parametrize("seed", range(40))


def header_run_requests(seed: int):
    rnd = random.Random(seed)
    out = []
    for _ in range(80):
        headers = [(rnd.choice(["x-tenant", "X-Tenant", "x-other"]), f"t{rnd.randrange(14)}")
                   for _ in range(rnd.randrange(0, 3))]
        out.append(("h", rnd.choice(["/api", "/api/x/1", "/v2/a", "/other"]), headers, "GET"))
    return out


@SEEDS
def test_generated_configs(impl, seed):
    cfg = route_config(seed)
    ref, rt = tables(impl, cfg)
    for i, (authority, path, headers, method) in enumerate(requests(cfg, seed)):
        rv = i * 2654435761
        m = rt.match(authority, path, headers, method=method, random_value=rv)
        assert (m.route_name if m else None) == linear(ref, authority, path, headers, method, rv), (
            cfg, authority, path, headers)


@SEEDS
def test_header_dispatch_runs(impl, seed):
    cfg = header_run_config(seed)
    ref, rt = tables(impl, cfg)
    assert any(by_header is not None for idx in ref._vhosts for table in (idx.prefix, idx.prefix_ci)
               for _, _, by_header in table.values()), "the config must contain header-indexed routes"
    for authority, path, headers, method in header_run_requests(seed):
        m = rt.match(authority, path, headers, method=method, random_value=1)
        assert (m.route_name if m else None) == linear(ref, authority, path, headers, method, 1), (
            cfg, path, headers)


MIXED_SEEDS = int(os.environ.get("MESHCORE_ROUTE_MIXED_SEEDS", "4"))


@pytest.mark.parametrize("seed", range(MIXED_SEEDS))
def test_mixed_tables(impl, seed):
    """1,000 routes mixing exact paths, prefixes, regexes and header-matched routes in any order
    (route_gen.generate_mixed): the tries, regex literal prefixes, RE2 sets and header indexes
    pick the route a linear scan picks."""
    case = generate_mixed(seed, 1000, 150)
    ref, rt = tables(impl, case.config)
    for rq in case.requests:
        m = rt.match(rq.authority, rq.path, list(rq.headers), method=rq.method, random_value=rq.random_value)
        want = linear(ref, rq.authority, rq.path, list(rq.headers), rq.method, rq.random_value)
        assert (m.route_name if m else None) == want, (seed, rq)


REGEX_CASES = [r"/api/v[0-9]+", r"/foo/.*", r"/(api|foo)/[^/]+", r"(?i)/api/.*", r".*bar.*", r"/foo/bar/?",
               r"/v1/[0-9]{1,3}", r"/[a-z]+", r"/x%2[Ff]y", r"/a\.b(/.*)?", r"/users/[0-9]+/?", r"^/abc",
               r"/ab?c", r"/é/x", r"\C/x", r"/a{2}b", r"/a|/b", r"(/x)?/y", r"/q\b", r"/[^/]*", r"/api/v1/\d+"]
PATH_ALPHABET = ["/", "a", "b", "c", "x", "y", "api", "API", "foo", "bar", "v1", "1", "2", ".", "%2F", "é", "\udc80"]


@settings(max_examples=400, deadline=None)
@given(pattern=st.sampled_from(REGEX_CASES), parts=st.lists(st.sampled_from(PATH_ALPHABET), max_size=8))
def test_regex_literal_prefix_is_proven(pattern, parts):
    """Every path a regex fully matches starts with its literal prefix (what the index keys
    regex routes by): RE2's PossibleMatchRange bounds, read as a prefix, never drop a match."""
    import re2

    rx = re2.compile(pattern)
    prefix = routes_py.regex_literal_prefix(rx)
    path = "".join(parts)
    if regex_fullmatch(rx, path):
        assert path.startswith(prefix), (pattern, prefix, path)
    # and the prefixes the index relies on are the expected ones, not just "" everywhere
    assert routes_py.regex_literal_prefix(re2.compile(r"/users/[0-9]+/?")) == "/users/"
