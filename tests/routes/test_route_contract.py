"""What the README promises about route tables, checked directly: error messages name the
resource, virtual host, route and field; request-independent results are shared (an exact or
prefix hit allocates nothing in the compiled twin); require_tls; the twins' public surface."""

from __future__ import annotations

import tracemalloc

import pytest

from meshcore import ConfigError
from meshcore._fast import routes_py


def _rc(route: dict, **vhost: object) -> dict:
    return {"name": "rc1", "virtual_hosts": [{"name": "vh1", "domains": ["*"], "routes": [route], **vhost}]}


@pytest.mark.parametrize("route, field", [
    ({"name": "r1", "match": {"safe_regex": {"regex": "("}}, "route": {"cluster": "c"}},
     "virtual_hosts[vh1].routes[r1].match.safe_regex.regex"),
    ({"name": "r1", "match": {"safe_regex": {"regex": "a{1000}"}}, "route": {"cluster": "c"}},
     "virtual_hosts[vh1].routes[r1].match.safe_regex.regex"),
    ({"name": "r1", "match": {"prefix": "/", "headers": [{"name": "x", "string_match": {
        "safe_regex": {"regex": "a"}, "ignore_case": True}}]}, "route": {"cluster": "c"}},
     "virtual_hosts[vh1].routes[r1].match.headers[0].string_match.ignore_case"),
    ({"name": "r1", "match": {}, "route": {"cluster": "c"}}, "virtual_hosts[vh1].routes[r1].match"),
    ({"name": "r1", "match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 0}]}}}, "virtual_hosts[vh1].routes[r1].route.weighted_clusters"),
    ({"name": "r1", "match": {"prefix": "/"}, "direct_response": {"status": 100}},
     "virtual_hosts[vh1].routes[r1].direct_response.status"),
])
def test_errors_name_resource_vhost_route_and_field(impl, route, field):
    RT = __import__(f"meshcore._fast.routes_{impl}", fromlist=["RouteTable"]).RouteTable  # noqa: N806
    with pytest.raises(ConfigError) as info:
        RT.from_xds(_rc(route))
    assert info.value.resource == "rc1"
    assert info.value.field == field, str(info.value)


def test_duplicate_domain_is_an_error(impl):
    RT = __import__(f"meshcore._fast.routes_{impl}", fromlist=["RouteTable"]).RouteTable  # noqa: N806
    cfg = {"name": "rc1", "virtual_hosts": [
        {"name": "a", "domains": ["x.com"], "routes": []},
        {"name": "b", "domains": ["X.com"], "routes": []}]}
    with pytest.raises(ConfigError, match="virtual_hosts\\[b\\].domains.*Duplicate entry of domain x.com"):
        RT.from_xds(cfg)


@pytest.mark.c_extension
def test_static_results_are_shared_and_allocation_free():
    from meshcore._fast import routes_c

    cfg = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["svc.local"], "routes": [
        {"name": "exact", "match": {"path": "/healthz"}, "direct_response": {"status": 200}},
        {"name": "api", "match": {"prefix": "/api/"}, "route": {"cluster": "api"}}]}]}
    rt = routes_c.RouteTable.from_xds(cfg)
    first = rt.match("svc.local", "/api/users?page=1")
    assert first.cluster == "api"
    assert rt.match("svc.local", "/api/other") is first
    match = rt.match
    for _ in range(100):  # warm up caches (interned strings, the shared result)
        match("svc.local", "/api/users?page=1")
        match("svc.local", "/healthz")
    assert _peak_bytes_per_match(match) < 16  # the pure twin allocates a RouteMatch per call


def _peak_bytes_per_match(match) -> float:
    """Peak extra memory traced while matching: any per-match allocation shows up here."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        match("svc.local", "/api/users?page=1")
        match("svc.local", "/healthz")
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_pure_twin_allocation_is_visible_to_the_probe():
    cfg = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["svc.local"], "routes": [
        {"name": "api", "match": {"prefix": "/"}, "route": {"cluster": "api"}}]}]}
    assert _peak_bytes_per_match(routes_py.RouteTable.from_xds(cfg).match) > 16


@pytest.mark.parametrize("require, authority, headers, expect", [
    ("ALL", "a.com:80", [], "https://a.com/x?y=1"),
    ("ALL", "a.com:8080", [], "https://a.com:8080/x?y=1"),
    ("ALL", "a.com", [("x-forwarded-proto", "https")], None),
    ("EXTERNAL_ONLY", "a.com", [], "https://a.com/x?y=1"),
    ("EXTERNAL_ONLY", "a.com", [("x-envoy-internal", "true")], None),
    ("NONE", "a.com", [], None),
])
def test_require_tls(impl, require, authority, headers, expect):
    RT = __import__(f"meshcore._fast.routes_{impl}", fromlist=["RouteTable"]).RouteTable  # noqa: N806
    rt = RT.from_xds(_rc({"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}}, require_tls=require))
    m = rt.match(authority, "/x?y=1", headers)
    if expect is None:
        assert m.cluster == "c" and m.redirect is None
    else:
        assert (m.redirect, m.redirect_code, m.cluster) == (expect, 301, None)


@pytest.mark.c_extension
def test_route_twins_have_the_same_public_surface():
    from meshcore._fast import routes_c

    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(routes_c.RouteTable) == public(routes_py.RouteTable)
