"""The compiled table's memo of header-less static matches (``RouteTable._plain``): a request
without headers, source address or caller's random value is matched on (authority, path, method,
scheme) alone, so a static match found once is returned again without walking the table. These
tests hold it to the pure twin (which keeps no memo) and to itself without the memo."""

from __future__ import annotations

import random

import pytest

from meshcore import ConfigError
from meshcore._fast import routes_py

from .gen import requests, route_config
from .gen import summary as _summary


def _without_fractions(cfg):
    """``cfg`` with its routes' runtime fractions removed (a table with one keeps no memo)."""
    for vh in cfg["virtual_hosts"]:
        for r in vh["routes"]:
            r["match"].pop("runtime_fraction", None)
    return cfg


def _weighted(cfg):
    """Names of ``cfg``'s routes with weighted clusters: their cluster is a random draw each twin
    seeds itself, so only the rest of their decision is compared."""
    return {r["name"] for vh in cfg["virtual_hosts"] for r in vh["routes"] if "weighted_clusters" in r.get("route", {})}


@pytest.mark.c_extension
@pytest.mark.parametrize("seed", range(80))
def test_header_less_matches_repeat_alike(seed):
    """Each header-less request of the generated set, asked three times in a shuffled order with
    the fields as new and as the same str objects, under both schemes: the compiled table gives
    the pure twin's decision every time (the generated tables without runtime fractions, which
    keep a memo; a weighted route's cluster is drawn, the rest of its decision compared)."""
    from meshcore._fast import routes_c

    cfg = _without_fractions(route_config(seed))
    try:
        py = routes_py.RouteTable.from_xds(cfg)
    except ConfigError:
        return
    c = routes_c.RouteTable.from_xds(cfg)
    weighted = _weighted(cfg)
    asked = [(a, p, m, s) for a, p, _h, m in requests(cfg, seed) for s in ("http", "https")]
    order = asked * 3
    random.Random(seed).shuffle(order)
    for i, (authority, path, method, scheme) in enumerate(order):
        if i % 2:  # new str objects equal to the kept ones (the memo compares by value)
            authority, path, method = "".join(list(authority)), "".join(list(path)), "".join(list(method))
        got, want = _summary(c.match(authority, path, None, method=method, scheme=scheme)), \
            _summary(py.match(authority, path, None, method=method, scheme=scheme))
        if got is not None and want is not None and got[1] in weighted:
            got, want = got[:2] + got[3:], want[:2] + want[3:]
        assert got == want, (cfg, authority, path, method, scheme)


@pytest.mark.c_extension
def test_same_path_other_fields_not_mixed_up():
    """One path under two authorities, methods and schemes: each gets its own decision, in any
    order (the memo keeps one entry per path and checks the other fields)."""
    from meshcore._fast import routes_c

    cfg = {"name": "rc", "virtual_hosts": [
        {"name": "a", "domains": ["a.svc"], "routes": [
            {"name": "a-post", "match": {"prefix": "/", "headers": [{"name": ":method", "exact_match": "POST"}]},
             "route": {"cluster": "a-post"}},
            {"name": "a-https", "match": {"prefix": "/", "headers": [{"name": ":scheme", "exact_match": "https"}]},
             "route": {"cluster": "a-https"}},
            {"name": "a-any", "match": {"prefix": "/"}, "route": {"cluster": "a-any"}}]},
        {"name": "b", "domains": ["b.svc"], "routes": [
            {"name": "b-any", "match": {"prefix": "/"}, "route": {"cluster": "b-any"}}]}]}
    c = routes_c.RouteTable.from_xds(cfg)
    py = routes_py.RouteTable.from_xds(cfg)
    cases = [(a, m, s) for a in ("a.svc", "b.svc", "c.svc", None) for m in ("GET", "POST") for s in ("http", "https")]
    rnd = random.Random(7)
    for _ in range(400):
        authority, method, scheme = rnd.choice(cases)
        got = c.match(authority, "/x", None, method=method, scheme=scheme)
        assert _summary(got) == _summary(py.match(authority, "/x", None, method=method, scheme=scheme))
    assert c.match("a.svc", "/x", None, method="POST").cluster == "a-post"
    assert c.match("a.svc", "/x", None, method="GET", scheme="https").cluster == "a-https"
    assert c.match("a.svc", "/x", None, method="GET").cluster == "a-any"
    assert c.match("c.svc", "/x", None) is None


@pytest.mark.c_extension
def test_runtime_fraction_still_draws():
    """A table with a runtime fraction keeps no memo: a header-less request to a 50 % route
    gets both decisions."""
    from meshcore._fast import routes_c

    cfg = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "half", "match": {"prefix": "/", "runtime_fraction": {
            "default_value": {"numerator": 50, "denominator": "HUNDRED"}}}, "route": {"cluster": "half"}},
        {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "rest"}}]}]}
    c = routes_c.RouteTable.from_xds(cfg)
    seen = {c.match("x", "/p", None).cluster for _ in range(200)}
    assert seen == {"half", "rest"}


@pytest.mark.c_extension
def test_memo_bounded_and_subclasses_matched_in_full():
    """More distinct paths than the memo holds, asked twice, all decided as the twin decides; a
    str subclass with its own hash and compare is matched without them being called."""
    from meshcore._fast import routes_c

    cfg = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "api", "match": {"prefix": "/api/"}, "route": {"cluster": "api"}},
        {"name": "odd", "match": {"safe_regex": {"regex": "/[0-9]*7"}}, "route": {"cluster": "odd"}},
        {"name": "rest", "match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]}
    c = routes_c.RouteTable.from_xds(cfg)
    py = routes_py.RouteTable.from_xds(cfg)
    paths = [f"/api/{i}" if i % 3 else f"/{i}" for i in range(3000)]
    for path in paths + paths[::-1]:
        assert _summary(c.match("h", path, None)) == _summary(py.match("h", path, None)), path

    class Loud(str):
        def __hash__(self):
            raise AssertionError("hash called")

        def __eq__(self, other):
            raise AssertionError("eq called")

    assert c.match("h", "/api/1", None).cluster == "api"
    assert c.match("h", Loud("/api/1"), None).cluster == "api"
    assert c.match(Loud("h"), "/api/1", None, method=Loud("GET")).cluster == "api"


@pytest.mark.c_extension
def test_memo_edges_decide_as_the_walk():
    """Cases the generated tables do not make: a require_tls host asked over https then http on
    one path (the redirect comes back), a table that picks its virtual host by a header (none
    given: no vhost), lone surrogates in a path, paths over the memo's length limit, and one
    path under many authorities of one table (a sidecar's per-port route configuration) asked
    in rotation — every answer the pure twin's, every repeat of a kept match the same object."""
    from meshcore._fast import routes_c

    def both(cfg):
        return routes_c.RouteTable.from_xds(cfg), routes_py.RouteTable.from_xds(cfg)

    tls = {"name": "rc", "virtual_hosts": [{"name": "secure", "domains": ["s.svc"], "require_tls": "ALL",
                                            "routes": [{"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}
    c, py = both(tls)
    for scheme in ("https", "http", "https", "http"):
        got, want = c.match("s.svc", "/a", None, scheme=scheme), py.match("s.svc", "/a", None, scheme=scheme)
        assert _summary(got) == _summary(want)
        assert (got.redirect is not None) == (scheme == "http")

    by_header = {"name": "rc", "vhost_header": "x-vhost", "virtual_hosts": [
        {"name": "v", "domains": ["a.svc"], "routes": [{"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}
    c, py = both(by_header)
    for _ in range(3):
        assert c.match("a.svc", "/", None) is None and py.match("a.svc", "/", None) is None
        assert c.match("a.svc", "/", [("x-vhost", "a.svc")]).cluster == "c"

    many = {"name": "80", "virtual_hosts": [
        {"name": f"svc{i}", "domains": [f"svc{i}.ns.svc.cluster.local:80"], "routes": [
            {"name": f"svc{i}-health", "match": {"path": "/grpc.health.v1.Health/Check"}, "route": {"cluster": f"h{i}"}},
            {"name": f"svc{i}-api", "match": {"safe_regex": {"regex": "/api/.*x"}}, "route": {"cluster": f"a{i}"}},
            {"name": f"svc{i}-rest", "match": {"prefix": "/"}, "route": {"cluster": f"r{i}"}}]} for i in range(40)]}
    c, py = both(many)
    paths = ["/grpc.health.v1.Health/Check", "/api/\ud800x", "/api/x", "/" + "p" * 600, "/" + "q" * 511]
    first = {}
    for rnd in range(3):
        for i in range(40):
            for path in paths:
                authority = f"svc{i}.ns.svc.cluster.local:80"
                got = c.match(authority, path, None)
                assert _summary(got) == _summary(py.match(authority, path, None)), (authority, path)
                if rnd:
                    assert got is first[authority, path]  # (static matches are shared objects, kept or walked)
                first[authority, path] = got


@pytest.mark.c_extension
def test_what_the_table_keeps():
    """The memo serves what the README says and nothing else: header-less requests (no source
    address, no caller's random value) whose match is static, on tables without runtime
    fractions; one entry per (authority, path, method, scheme) asked; paths or authorities over
    512 characters walked; at most 1,024 kept, then emptied. The pure twin keeps nothing."""
    from meshcore._fast import routes_c

    cfg = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "hashed", "match": {"prefix": "/h"}, "route": {"cluster": "h", "hash_policy": [
            {"header": {"header_name": "x-user"}}]}},
        {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "r"}}]}]}
    c = routes_c.RouteTable.from_xds(cfg)
    assert routes_py.RouteTable.from_xds(cfg)._kept_matches() is None
    assert c._kept_matches() == 0
    m = c.match("a", "/x", None)
    assert c._kept_matches() == 1
    assert c.match("a", "/x", None) is m and c._kept_matches() == 1  # answered from it, not kept again
    c.match("a", "/x", None, method="POST")
    c.match("b", "/x", None)
    assert c._kept_matches() == 3
    c.match("a", "/y", [("x-a", "1")])                         # headers
    c.match("a", "/y", None, source_ip="10.0.0.1")             # a source address
    c.match("a", "/y", None, random_value=7)                   # the caller's random value
    c.match("a", "/h", None)                                   # not static (a hash policy)
    c.match("a", "/" + "p" * 600, None)                        # a path over 512 characters
    c.match("a" * 600, "/y", None)                             # an authority over 512 characters
    assert c._kept_matches() == 3
    for i in range(2000):
        c.match("a", f"/n{i}", None)
        assert c._kept_matches() <= 1024
    assert c._kept_matches() == 3 + 2000 - 1024  # emptied once, when 1,024 were kept
    fractions = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "some", "match": {"prefix": "/s", "runtime_fraction": {"default_value": {"numerator": 5}}},
         "route": {"cluster": "s"}},
        {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "r"}}]}]}
    t = routes_c.RouteTable.from_xds(fractions)
    t.match("a", "/x", None)
    assert t._kept_matches() is None
