"""``meshcore.explain``: virtual host selection with the reason, matchers and actions in words."""

from __future__ import annotations

import pytest

from meshcore import RouteTable
from meshcore.explain import describe_action, describe_match, find_virtual_host, headers_from_args, target_for_url


def _vhost(name, domain, cluster):
    return {"name": name, "domains": [domain], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}


def table(**extra):
    return RouteTable.from_xds({"name": "rc", "virtual_hosts": [
        _vhost("exact", "api.example.com", "a"),
        _vhost("suffix-long", "*.eu.example.com", "b"),
        _vhost("suffix", "*.example.com", "c"),
        _vhost("prefix", "api.*", "d"),
        _vhost("default", "*", "e"),
    ], **extra})


@pytest.mark.parametrize("authority,name,domain,kind", [
    ("api.example.com", "exact", "api.example.com", "exact"),
    ("API.Example.COM", "exact", "api.example.com", "exact"),
    ("x.eu.example.com", "suffix-long", "*.eu.example.com", "suffix wildcard (longest first)"),
    ("x.us.example.com", "suffix", "*.example.com", "suffix wildcard (longest first)"),
    ("api.other.org", "prefix", "api.*", "prefix wildcard (longest first)"),
    ("api.example.com:80", "prefix", "api.*", "prefix wildcard (longest first)"),
    ("other.org", "default", "*", "default (*): no other domain matched"),
])
def test_virtual_host_and_why(authority, name, domain, kind):
    t = table()
    vh = find_virtual_host(t.spec, authority)
    assert (vh["name"], vh["domain"], vh["kind"]) == (name, domain, kind)
    assert t.match(authority, "/").virtual_host == name  # agrees with the route table itself


def test_ignore_port_and_no_match():
    t = table(ignore_port_in_host_matching=True)
    vh = find_virtual_host(t.spec, "api.example.com:8080")
    assert (vh["name"], vh["host"]) == ("exact", "api.example.com")
    only = RouteTable.from_xds({"name": "rc", "virtual_hosts": [
        {"name": "one", "domains": ["a.com"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]})
    assert find_virtual_host(only.spec, "b.com") is None
    assert only.match("b.com", "/") is None


def test_vhost_header():
    t = table(vhost_header="x-host")
    assert find_virtual_host(t.spec, "ignored", [("X-Host", "api.example.com")])["name"] == "exact"
    assert find_virtual_host(t.spec, "api.example.com", []) is None


def test_describe_match_and_action():
    t = RouteTable.from_xds({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "r", "match": {"path": "/a", "case_sensitive": False, "headers": [
            {"name": "x-v", "range_match": {"start": 1, "end": 5}},
            {"name": "x-n", "present_match": True, "invert_match": True}],
            "query_parameters": [{"name": "q", "string_match": {"prefix": "p"}}]},
         "route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}}},
        {"match": {"safe_regex": {"regex": "/b.*"}}, "direct_response": {"status": 204}},
    ]}]})
    r0, r1 = t.spec.virtual_hosts[0].routes
    assert describe_match(r0) == ("path '/a' (case insensitive) and header x-v in [1, 5) and "
                                  "header not (x-n present) and query q prefix 'p'")
    assert describe_action(r0) == "weighted a 1, b 3"
    assert describe_match(r1) == "safe_regex '/b.*'"
    assert describe_action(r1) == "direct response 204"


def test_target_for_url_and_headers():
    assert target_for_url("http://reviews/x?y=1") == ("reviews:80", "http", "reviews", "/x?y=1")
    assert target_for_url("https://reviews:8443") == ("reviews:8443", "https", "reviews:8443", "/")
    assert headers_from_args(["a: b", "C:d:e", "x:"]) == [("a", "b"), ("C", "d:e"), ("x", "")]
    with pytest.raises(ValueError):
        headers_from_args([": v"])
