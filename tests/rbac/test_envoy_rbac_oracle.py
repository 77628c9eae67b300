"""meshcore's RbacEngine decides exactly as real Envoy 1.40's RBAC HTTP filter.

Differential test (``rbac_oracle.py``, ``rbac_gen.py``): generated RBAC filter chains (three
filters, each replaced per route by a generated ``RBACPerRoute``, turned off, emptied or
inherited) and generated requests (methods, paths with queries, authorities, repeated and
inline-joined headers, ``x-forwarded-for``, ``te``; over TLS with generated client certificates
-- URI/DNS SANs, subjects, none -- and SNIs, or plaintext; from several 127.0.0.x sources to
several listener addresses and ports). Each request is sent to one Envoy (one route per
configuration) and evaluated by ``RbacEngine.from_xds(base).for_route(case)``; they must agree
on allow/deny AND on the ``envoy.filters.http.rbac`` dynamic metadata (enforced/shadow policy
ids and results, with stat prefixes), and at the end on the filters' counters.

The default run is one Envoy, 500 configurations, 8,000 requests (~10 s on 2 cores). ``-m soak``
(``test_rbac_matches_envoy_long``) runs MESHCORE_SOAK_EXAMPLES more Envoy processes (default 1,
CI's short run) of MESHCORE_SOAK_REQUESTS requests each (default 8000), other seeds.

``test_envoy_rejects_what_meshcore_rejects``: ``envoy --mode validate`` on edge-case configs; Envoy
and meshcore accept and reject the same ones (meshcore also NACKs what A41 excludes).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import pytest

from meshcore.rbac import PeerCertificate, RbacEngine

from .istio_authz import filters_for
from .rbac_gen import IDENTITIES, generate, identity
from .rbac_oracle import RBAC_TYPE, Listener, RbacOracleEnvoy, Request, Response, default_listeners, make_identities

pytestmark = pytest.mark.envoy

FILTERS = ("f0", "f1", "f2")


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory):
    return make_identities(str(tmp_path_factory.mktemp("rbac-ids")), IDENTITIES)


def meshcore_decide(base: Sequence[Tuple[str, dict]], cases: Sequence[Dict[str, Any]], requests: Sequence[Request],
                    listeners: Dict[str, Listener]) -> Tuple[RbacEngine, List[Any]]:
    engine = RbacEngine.from_xds(list(base))
    engines = [engine.for_route(c) if c else engine for c in cases]
    out = []
    for r in requests:
        ls = listeners[r.listener]
        peer = None
        if ls.tls:
            ident = identity(r.identity)
            peer = PeerCertificate() if ident is None else PeerCertificate(ident.uris, ident.dns, ident.subject)
        # as an HTTP/1 server hands them over: values without surrounding whitespace
        headers = [(k, v.strip(" \t")) for k, v in r.headers]
        out.append(engines[r.case].evaluate(
            method=r.method, path=r.path, headers=headers, authority=r.authority, peer=peer,
            source_ip=r.source, source_port=40000, destination_ip=ls.address, destination_port=ls.port,
            server_name=r.sni if ls.tls else None))
    return engine, out


def _describe(base: Any, case: Dict[str, Any], req: Request, env: Response, mesh: Any) -> str:
    return (f"request {req}\n  envoy:    {env.status} {env.metadata}\n  meshcore: {mesh!r} {dict(mesh.metadata)}\n"
            f"  route overrides: {json.dumps(case)}\n  base filters: {json.dumps(base)}")


def compare(identities: Any, seed: int, n_cases: int, per_case: int) -> Dict[str, Any]:
    listeners = default_listeners()
    base, cases, requests = generate(seed, n_cases, per_case, listeners, FILTERS)
    t0 = time.monotonic()
    with RbacOracleEnvoy(base, cases, identities, listeners) as envoy:
        responses = envoy.send(requests)
        envoy_stats = envoy.stats()
    t_envoy = time.monotonic() - t0
    engine, decisions = meshcore_decide(base, cases, requests, {ls.name: ls for ls in listeners})
    bad = []
    for req, res, d in zip(requests, responses, decisions):
        if (res.status == 200) != d.allowed or res.metadata != dict(d.metadata):
            bad.append(_describe(base, cases[req.case], req, res, d))
    mine = engine.stat_counters
    stats_diff = {k: (envoy_stats.get(k, 0), v) for k, v in mine.items() if envoy_stats.get(k, 0) != v}
    denied = sum(1 for r in responses if r.status == 403)
    return {"bad": bad, "stats_diff": stats_diff, "requests": len(requests), "denied": denied,
            "envoy_seconds": round(t_envoy, 1)}


def _check(result: Dict[str, Any]) -> None:
    bad = result["bad"]
    assert not bad, f"{len(bad)} of {result['requests']} requests disagree; first ones:\n" + "\n\n".join(bad[:6])
    assert not result["stats_diff"], f"counters differ (envoy, meshcore): {result['stats_diff']}"
    # the generator must exercise both outcomes in quantity
    assert 0.2 < result["denied"] / result["requests"] < 0.8, result


def test_rbac_matches_envoy(identities):
    result = compare(identities, seed=1541, n_cases=500, per_case=16)
    _check(result)


@pytest.mark.soak
def test_rbac_matches_envoy_long(identities):
    runs = int(os.environ.get("MESHCORE_SOAK_EXAMPLES", "1"))
    n = int(os.environ.get("MESHCORE_SOAK_REQUESTS", "8000"))
    per_case = 16
    for i in range(runs):
        _check(compare(identities, seed=90_000 + i, n_cases=max(1, n // per_case), per_case=per_case))


# -- Istio's own fixture (pilot/pkg/networking/grpcgen/grpcgen_test.go initRBACTests) ----------

ISTIO_FIXTURE = [
    {"name": "deny-block", "namespace": "test", "action": "DENY",
     "rules": [{"when": [{"key": "request.headers[echo]", "values": ["block"]}]}]},
    {"name": "allow-allow", "namespace": "test", "action": "ALLOW",
     "rules": [{"when": [{"key": "request.headers[echo]", "values": ["allow"]}]}]},
    {"name": "deny-evie", "namespace": "test", "action": "DENY",
     "rules": [{"from": [{"source": {"principals": ["evie"]}}]}]},
]


def test_istio_fixture_on_envoy(identities):
    """The same filters (grpcgen's DENY then ALLOW) on Envoy and meshcore, mTLS as Istio's test."""
    filters = filters_for(ISTIO_FIXTURE)
    base = [(f["name"], {k: v for k, v in f["typed_config"].items() if k != "@type"}) for f in filters]
    listeners = [ls for ls in default_listeners() if ls.tls][:1]
    reqs = []
    for echo in ("block", "allow", None, "other"):
        for who in ("client", "evie"):
            hdrs = [("echo", echo)] if echo is not None else []
            reqs.append(Request(0, listeners[0].name, who, None, "127.0.0.1", "POST", "/echo.EchoTestService/Echo",
                                "server.test.svc.cluster.local:7070", hdrs))
    with RbacOracleEnvoy(base, [{}], identities, listeners) as envoy:
        responses = envoy.send(reqs, workers=1)
    _, decisions = meshcore_decide(base, [{}], reqs, {ls.name: ls for ls in listeners})
    got = [(r.headers, r.identity, res.status == 200, d.allowed, d.policy) for r, res, d in zip(reqs, responses, decisions)]
    assert all(e == m for _, _, e, m, _ in got), got
    allowed = {(tuple(h), who) for h, who, e, _, _ in got if e}
    assert allowed == {((("echo", "allow"),), "client")}, got


# -- what Envoy refuses, meshcore refuses -----------------------------------------------------------


def _pol(perm: Any = None, princ: Any = None) -> Dict[str, Any]:
    return {"rules": {"action": "ALLOW", "policies": {"p": {"permissions": [perm or {"any": True}],
                                                            "principals": [princ or {"any": True}]}}}}


#: (config, Envoy accepts it); meshcore must agree.
VALIDATION_CASES = [
    (_pol({"url_path": {"path": {"safe_regex": {"regex": "a"}, "ignore_case": True}}}), False),
    (_pol({"destination_ip": {"address_prefix": "10.0.0.1", "prefix_len": 40}}), True),  # clamped to /32
    (_pol({"destination_ip": {"address_prefix": "10.0.0.256", "prefix_len": 8}}), False),
    (_pol({"destination_ip": {"address_prefix": " 10.0.0.1", "prefix_len": 8}}), False),
    ({"rules": {"action": "ALLOW", "policies": {"": {"permissions": [{"any": True}],
                                                     "principals": [{"any": True}]}}}}, True),
    (_pol({"header": {"name": "x y", "exact_match": "a"}}), True),
    (_pol({"url_path": {"path": {"safe_regex": {"regex": "(a{1,50}){1,5}"}}}}), False),  # program size
    (_pol({"url_path": {"path": {"safe_regex": {"regex": ""}}}}), False),
    (_pol({"header": {"name": "x", "range_match": {"start": 5, "end": 1}}}), True),
    (_pol({"destination_port_range": {"start": 0, "end": 65536}}), True),
    (_pol({"destination_port_range": {"start": 0, "end": 65537}}), False),
    (_pol({"not_rule": {}}), False),
    (_pol({"url_path": {"path": {}}}), False),
    (_pol({"and_rules": {"rules": []}}), False),
    (_pol({"any": False}), False),
    ({"rules": {"action": "ALLOW", "policies": {"p": {"permissions": [], "principals": [{"any": True}]}}}}, False),
    ({"shadow_rules": {"action": "LOG", "policies": {}}}, True),
]


def test_envoy_rejects_what_meshcore_rejects(tmp_path):
    import subprocess

    from envoy_process import ROUTER_TYPE, find_envoy

    from meshcore import ConfigError

    envoy = find_envoy()
    disagree = []
    for i, (cfg, accepted) in enumerate(VALIDATION_CASES):
        hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                        ".HttpConnectionManager",
               "stat_prefix": "v", "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                   {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
               "http_filters": [{"name": "rbac", "typed_config": {"@type": RBAC_TYPE, **cfg}},
                                {"name": "router", "typed_config": {"@type": ROUTER_TYPE}}]}
        boot = {"static_resources": {"listeners": [{
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}]}]}}
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(boot))
        rc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "critical", "--use-dynamic-base-id"],
                            capture_output=True, timeout=60).returncode
        try:
            RbacEngine.from_xds([cfg])
            mine = True
        except ConfigError:
            mine = False
        if (rc == 0) != accepted or mine != accepted:
            disagree.append((cfg, {"envoy": rc == 0, "meshcore": mine, "expected": accepted}))
    assert not disagree, disagree


# -- remote_ip under the HCM's use_remote_address / xff_num_trusted_hops ---------------------------

XFF_CASES = (None, "10.1.2.3", "10.1.2.3, 192.168.0.7", "10.1.2.3, 192.168.0.7, 172.16.5.5", "garbage",
             "10.0.0.1,", "192.168.0.7,bogus", "bogus, 10.1.2.3", " 172.16.5.5 ", "2001:db8::5, 10.1.2.3")


def test_remote_ip_follows_the_connection_manager(identities):
    """remote_ip with use_remote_address false/true x xff_num_trusted_hops 0/1/2 (Envoy's
    getLastAddressFromXFF), one listener per combination, each with its own RbacEngine."""
    from envoy_process import free_port

    combos = [(ura, hops) for ura in (False, True) for hops in (0, 1, 2)]
    listeners = [Listener(f"l_{int(ura)}_{hops}", "127.0.0.1", free_port("127.0.0.1"), False,
                          (("use_remote_address", ura), ("xff_num_trusted_hops", hops))) for ura, hops in combos]
    cidrs = [("10.1.2.3", 32), ("192.168.0.0", 16), ("172.16.0.0", 12), ("127.0.0.0", 8), ("2001:db8::", 32)]
    cases = [{"f0": {"rbac": {"rules": {"action": "ALLOW", "policies": {"p": {
        "permissions": [{"any": True}], "principals": [{"remote_ip": {"address_prefix": a, "prefix_len": n}}]}}}}}}
        for a, n in cidrs]
    reqs = [Request(c, ls.name, None, None, "127.0.0.5", "GET", "/", "h",
                    [("x-forwarded-for", x)] if x is not None else [])
            for c in range(len(cases)) for ls in listeners for x in XFF_CASES]
    with RbacOracleEnvoy([("f0", {})], cases, identities, listeners) as envoy:
        responses = envoy.send(reqs)
    engines = {(ura, hops): RbacEngine.from_xds([("f0", {})], use_remote_address=ura, xff_num_trusted_hops=hops)
               for ura, hops in combos}
    bad = []
    for r, res in zip(reqs, responses):
        ura, hops = dict(next(ls.hcm for ls in listeners if ls.name == r.listener)).values()
        e = engines[(ura, hops)].for_route(cases[r.case])
        d = e.evaluate(method=r.method, path=r.path, headers=[(k, v.strip()) for k, v in r.headers],
                       authority=r.authority, source_ip=r.source, destination_ip="127.0.0.1")
        if d.allowed != (res.status == 200):
            bad.append((r.listener, cidrs[r.case], r.headers, res.status, d.allowed))
    assert not bad, bad
    assert 0.1 < sum(res.status == 200 for res in responses) / len(responses) < 0.9
