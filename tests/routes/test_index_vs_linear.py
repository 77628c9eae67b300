"""The indexed tables (tries, RE2 sets, header dispatch runs) decide exactly as a plain
first-match-wins linear scan over the routes, which is what Envoy does."""

from __future__ import annotations

import random

import pytest

from meshcore._fast import routes_py
from meshcore._routing import normalise_headers, strip_path_params
from oracle_common import route_table_class

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
    assert any(slot.by_header for idx in ref._vhosts for table in (idx.prefix, idx.prefix_ci)
               for slot in table.values()), "the config must contain header-indexed routes"
    for authority, path, headers, method in header_run_requests(seed):
        m = rt.match(authority, path, headers, method=method, random_value=1)
        assert (m.route_name if m else None) == linear(ref, authority, path, headers, method, 1), (
            cfg, path, headers)
