"""Route matching: c vs py side by side, by table size and shape, plus table build time.

Istio-like: many virtual hosts (service FQDN, short names, host:port), few routes each.
Gateway-like: one virtual host with many exact, prefix, regex and header routes.
The request hits the LAST route of its kind, as Envoy's config_impl_speed_test does.
"""

from __future__ import annotations

import os
from importlib import import_module

import pytest

SIZES = [10, 1000, 10_000]
if os.environ.get("MESHCORE_BENCH_QUICK"):
    SIZES = [10, 1000]


@pytest.fixture(scope="module", params=["c", "py"])
def RT(request):  # noqa: N802
    return import_module(f"meshcore._fast.routes_{request.param}").RouteTable


def istio_like(n_routes: int) -> dict:
    vhosts = []
    n_vhosts = max(1, n_routes // 4)
    for i in range(n_vhosts):
        host = f"svc{i}.ns{i % 7}.svc.cluster.local"
        vhosts.append({
            "name": f"svc{i}:80",
            "domains": [host, f"{host}:80", f"svc{i}", f"svc{i}:80", f"svc{i}.ns{i % 7}", f"10.0.{i // 250}.{i % 250}:80"],
            "routes": [
                {"name": f"svc{i}-canary", "match": {"prefix": "/", "headers": [{"name": "x-canary", "exact_match": "1"}]},
                 "route": {"cluster": f"outbound|80|v2|{host}"}},
                {"name": f"svc{i}-api", "match": {"prefix": "/api/"}, "route": {"cluster": f"outbound|80|v1|{host}"}},
                {"name": f"svc{i}-health", "match": {"path": "/healthz"}, "direct_response": {"status": 200}},
                {"name": f"svc{i}-default", "match": {"prefix": "/"}, "route": {"cluster": f"outbound|80||{host}"}},
            ],
        })
    return {"name": "istio", "virtual_hosts": vhosts}


def gateway_like(n_routes: int, kind: str) -> dict:
    routes = []
    for i in range(n_routes):
        if kind == "exact":
            match = {"path": f"/shelves/{i}/books"}
        elif kind == "prefix":
            match = {"prefix": f"/shelves/{i}/"}
        elif kind == "regex":
            match = {"safe_regex": {"regex": f"/shelves/[^/]+/route_{i}"}}
        else:  # header routes on one prefix
            match = {"prefix": "/api", "headers": [{"name": "x-tenant", "exact_match": f"t{i}"}]}
        routes.append({"name": f"r{i}", "match": match, "route": {"cluster": f"c{i}"}})
    return {"name": "gw", "virtual_hosts": [{"name": "gw", "domains": ["*"], "routes": routes}]}


def _request(kind: str, n: int):
    last = n - 1
    if kind == "exact":
        return "gw.example.com", f"/shelves/{last}/books", None
    if kind == "prefix":
        return "gw.example.com", f"/shelves/{last}/x?y=1", None
    if kind == "regex":
        return "gw.example.com", f"/shelves/abc/route_{last}", None
    return "gw.example.com", "/api/v1", [("x-tenant", f"t{last}")]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["exact", "prefix", "header", "regex"])
def test_match_gateway(benchmark, RT, kind, n):
    rt = RT.from_xds(gateway_like(n, kind))
    authority, path, headers = _request(kind, n)
    m = rt.match(authority, path, headers)
    assert m is not None and m.route_name == f"r{n - 1}"
    benchmark.group = f"route match gateway {kind} n={n}"
    benchmark(rt.match, authority, path, headers)


@pytest.mark.parametrize("n", SIZES)
def test_match_istio(benchmark, RT, n):
    rt = RT.from_xds(istio_like(n))
    last = max(1, n // 4) - 1
    authority = f"svc{last}.ns{last % 7}.svc.cluster.local:80"
    m = rt.match(authority, "/api/users?page=2")
    assert m is not None and m.route_name == f"svc{last}-api"
    benchmark.group = f"route match istio n={n}"
    benchmark(rt.match, authority, "/api/users?page=2")


@pytest.mark.parametrize("kind", ["prefix", "istio"])
def test_build_10k(benchmark, RT, kind):
    from meshcore.xds.route_config import route_config_spec

    spec = route_config_spec(gateway_like(10_000, "prefix") if kind == "prefix" else istio_like(10_000))
    benchmark.group = f"route table build 10k {kind} (from parsed spec)"
    benchmark.pedantic(RT, args=(spec,), rounds=5, iterations=1)
