"""RBAC engine: one request's decision, for a realistic Istio policy, and compile time.

The policy is what istiod's proxyless generator sends for two AuthorizationPolicies in one
namespace (security.md §4.2, ``useAuthenticated``): a DENY of namespace ``evil``, and an ALLOW
of 9 rules (10 rules in all) with principals, namespaces and service accounts (RE2), methods,
path prefixes, hosts (case-insensitive) and a ``request.headers[x-tenant]`` condition. Requests
carry a gRPC-like set of 10 headers and an mTLS peer:

* ``first``: allowed by the first ALLOW rule; ``last``: by the last one;
* ``nomatch``: every rule evaluated, denied (the worst case);
* ``deny``: denied by the DENY filter;
* ``asgi``: ``first`` with ASGI-style bytes header pairs (the header map's slow path);
* ``peer``: ``first`` with a ``PeerCertificate`` instead of ``principal=``.

Target: <= 2 us per decision (pure Python). ``MESHCORE_BENCH_QUICK=1``: fewer rounds.
Also: ``from_xds`` compile time for that policy and for 1,000 rules.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List

import pytest

from meshcore import PeerCertificate, RbacEngine

QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NS = "prod"
CALLERS = ["frontend", "checkout", "cart", "payments", "shipping", "email", "ads", "reco", "search", "auth"]


# -- Istio's translation, the parts this policy uses (pilot/pkg/security/authz/model) -----------


def _auth(m: Dict[str, Any]) -> Dict[str, Any]:
    return {"authenticated": {"principal_name": m}}


def _path(v: str) -> Dict[str, Any]:
    return {"url_path": {"path": {"prefix": v[:-1]} if v.endswith("*") else {"exact": v}}}


def _rule(i: int) -> Dict[str, Any]:
    """The RBAC policy of ALLOW rule ``i``."""
    c = CALLERS[i % len(CALLERS)]
    if i % 3 == 0:  # source.namespaces [prod, staging]
        ids = [{"or_ids": {"ids": [_auth({"safe_regex": {"regex": f".*/ns/{ns}/.*"}}) for ns in (NS, "staging")]}}]
    else:  # source.principals (+ serviceAccounts)
        ids = [{"or_ids": {"ids": [_auth({"exact": f"spiffe://cluster.local/ns/{NS}/sa/{c}"})]}}]
        if i % 3 == 1:
            ids.append({"or_ids": {"ids": [_auth({"safe_regex": {
                "regex": f"spiffe://.+/ns/{NS}/(.+/|)sa/{c}-canary(/.+)?"}})]}})
    if i % 4 == 2:  # when: request.headers[x-tenant] in [acme, globex*]
        ids.append({"or_ids": {"ids": [{"header": {"name": "x-tenant", "exact_match": "acme"}},
                                       {"header": {"name": "x-tenant", "prefix_match": "globex"}}]}})
    methods = ["GET", "POST"] if i % 2 else ["GET"]
    rules: List[Dict[str, Any]] = []
    if i % 5 == 4:  # to.operation.hosts
        rules.append({"or_rules": {"rules": [
            {"header": {"name": ":authority", "string_match": {"exact": f"{c}.{NS}.svc.cluster.local", "ignore_case": True}}},
            {"header": {"name": ":authority", "string_match": {"prefix": f"{c}.example.com", "ignore_case": True}}}]}})
    rules.append({"or_rules": {"rules": [{"header": {"name": ":method", "exact_match": m}} for m in methods]}})
    rules.append({"or_rules": {"rules": [_path(f"/api/v{i % 3 + 1}/{c}/*"), _path(f"/{c}/health")]}})
    return {"permissions": [{"and_rules": {"rules": rules}}], "principals": [{"and_ids": {"ids": ids}}]}


def istio_filters(n_allow_rules: int = 9) -> List[Dict[str, Any]]:
    deny = {"ns[prod]-policy[deny-evil]-rule[0]": {
        "permissions": [{"any": True}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [_auth({"safe_regex": {"regex": ".*/ns/evil/.*"}})]}}]}}]}}
    allow = {f"ns[prod]-policy[allow-callers]-rule[{i}]": _rule(i) for i in range(n_allow_rules)}
    return [
        {"name": "envoy.filters.http.rbac.DENY",
         "typed_config": {"@type": RBAC_TYPE, "rules": {"action": "DENY", "policies": deny}}},
        {"name": "envoy.filters.http.rbac",
         "typed_config": {"@type": RBAC_TYPE, "rules": {"action": "ALLOW", "policies": allow}}},
    ]


HEADERS = [("content-type", "application/grpc"), ("user-agent", "grpc-python/1.66.0"), ("te", "trailers"),
           ("grpc-accept-encoding", "identity,deflate,gzip"), ("x-tenant", "globex-eu"),
           ("x-request-id", "2f1c0d5e-6a7b-4c8d-9e0f-1a2b3c4d5e6f"), ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
           ("x-b3-spanid", "e457b5a2e4d86bd1"), ("x-b3-sampled", "1"), ("accept-encoding", "gzip")]
COMMON = dict(headers=HEADERS, authority="svc.prod.svc.cluster.local:8080", source_ip="10.8.1.17",
              source_port=51234, destination_ip="10.8.2.9", destination_port=8080)
REQUESTS = {
    "first": dict(method="GET", path="/api/v1/frontend/items?page=2",
                  principal="spiffe://cluster.local/ns/prod/sa/frontend", **COMMON),
    "last": dict(method="GET", path="/api/v3/search/query", principal="spiffe://cluster.local/ns/prod/sa/search",
                 **COMMON),
    "nomatch": dict(method="DELETE", path="/api/v1/unknown", principal="spiffe://cluster.local/ns/other/sa/x",
                    **COMMON),
    "deny": dict(method="GET", path="/api/v1/frontend/items", principal="spiffe://cluster.local/ns/evil/sa/x",
                 **COMMON),
}
EXPECTED = {"first": (True, "ns[prod]-policy[allow-callers]-rule[0]"),
            "last": (True, "ns[prod]-policy[allow-callers]-rule[8]"),
            "nomatch": (False, None), "deny": (False, "ns[prod]-policy[deny-evil]-rule[0]")}


@pytest.fixture(scope="module")
def engine() -> RbacEngine:
    return RbacEngine.from_xds(istio_filters())


def _run(benchmark: Any, fn: Any) -> None:
    if QUICK:
        benchmark.pedantic(fn, rounds=200, iterations=50)
    else:
        benchmark(fn)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean is not None:
        benchmark.extra_info["us_per_decision"] = round(mean * 1e6, 3)


@pytest.mark.benchmark(group="rbac-evaluate")
@pytest.mark.parametrize("case", list(REQUESTS))
def test_evaluate(benchmark, engine, case):
    fn = functools.partial(engine.evaluate, **REQUESTS[case])
    d = fn()
    assert (d.allowed, d.policy) == EXPECTED[case], d
    _run(benchmark, fn)


@pytest.mark.benchmark(group="rbac-evaluate")
def test_evaluate_asgi_headers(benchmark, engine):
    kw = dict(REQUESTS["first"])
    kw["headers"] = [(k.encode(), v.encode()) for k, v in HEADERS]
    fn = functools.partial(engine.evaluate, **kw)
    assert fn().allowed
    _run(benchmark, fn)


@pytest.mark.benchmark(group="rbac-evaluate")
def test_evaluate_peer(benchmark, engine):
    kw = dict(REQUESTS["first"])
    kw["peer"] = PeerCertificate(uri_sans=(kw.pop("principal"),))
    fn = functools.partial(engine.evaluate, **kw)
    assert fn().allowed
    _run(benchmark, fn)


@pytest.mark.benchmark(group="rbac-compile")
@pytest.mark.parametrize("rules", [9, 1000])
def test_compile(benchmark, rules):
    filters = istio_filters(rules)
    e = benchmark.pedantic(RbacEngine.from_xds, args=(filters,), rounds=3 if QUICK or rules > 100 else 20,
                           iterations=1)
    assert e.evaluate(**REQUESTS["first"]).allowed
