"""c/py parity of route matching over generated RouteConfigurations and requests."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore import ConfigError
from meshcore._fast import routes_py

from route_gen import generate_mixed

from .gen import requests, route_config
from .gen import summary as _summary

CONFIGS = int(os.environ.get("MESHCORE_ROUTE_PARITY_CONFIGS", "120"))


@pytest.mark.c_extension
@pytest.mark.parametrize("seed", range(CONFIGS))
def test_c_and_py_decide_alike(seed):
    from meshcore._fast import routes_c

    cfg = route_config(seed)
    try:
        py = routes_py.RouteTable.from_xds(cfg)
    except ConfigError:
        with pytest.raises(ConfigError):
            routes_c.RouteTable.from_xds(cfg)
        return
    c = routes_c.RouteTable.from_xds(cfg)
    for i, (authority, path, headers, method) in enumerate(requests(cfg, seed)):
        rv = (seed * 7919 + i * 104729) & 0xFFFFFFFFFFFFFFFF
        a = c.match(authority, path, headers, method=method, random_value=rv, source_ip="10.1.2.3")
        b = py.match(authority, path, headers, method=method, random_value=rv, source_ip="10.1.2.3")
        assert _summary(a) == _summary(b), (cfg, authority, path, headers, method, rv)


_NAMES = ["Host", "host", ":path", "x-forwarded-proto", "X-Forwarded-Proto", "x-a", "X-A", "user-agent",
          "x-envoy-retry-on", "content-type", "Straße", "x-b"]
_VALUES = ["", "1", "HTTPS", "http", "ftp", "a,b", " v ", "application/grpc"]


@pytest.mark.c_extension
@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8),
       as_dict=st.booleans(), authority=st.sampled_from([None, "", "a.com:80"]),
       scheme=st.sampled_from(["http", "https"]))
def test_header_normalisation_twins(pairs, as_dict, authority, scheme):
    """routes_c.normalise_headers (C) gives _routing.normalise_headers' result: lower-cased
    names, Host/pseudo-headers dropped, inline headers joined, effective scheme."""
    from meshcore._fast import routes_c
    from meshcore._routing import normalise_headers

    headers = dict(pairs) if as_dict else pairs
    assert routes_c.normalise_headers(headers, authority, "/p?q", "GET", scheme) == normalise_headers(
        headers, authority, "/p?q", "GET", scheme)


@pytest.mark.c_extension
@pytest.mark.parametrize("seed", range(int(os.environ.get("MESHCORE_ROUTE_MIXED_SEEDS", "4"))))
def test_c_and_py_decide_alike_on_mixed_tables(seed):
    """1,000-route mixed tables (route_gen.generate_mixed), requests as lists and as dicts."""
    from meshcore._fast import routes_c

    case = generate_mixed(seed, 1000, 200)
    c = routes_c.RouteTable.from_xds(case.config)
    py = routes_py.RouteTable.from_xds(case.config)
    forms = (list, dict, tuple, lambda pairs: iter(list(pairs)))  # an iterator per call: read once
    for rq in case.requests:
        for form in forms:
            a = c.match(rq.authority, rq.path, form(rq.headers), method=rq.method, random_value=rq.random_value)
            b = py.match(rq.authority, rq.path, form(rq.headers), method=rq.method, random_value=rq.random_value)
            assert _summary(a) == _summary(b), (seed, rq, form)
