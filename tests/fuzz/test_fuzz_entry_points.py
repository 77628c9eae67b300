"""Fuzz the public entry points of both twins (issue 11): no input makes them raise anything but
ConfigError, ValueError or TypeError, and the compiled and pure twins agree (same match or same
error class; the same picks for the same seed).

Short by default (a few seconds). Marked ``soak`` runs are longer: set MESHCORE_FUZZ_EXAMPLES
(examples per test, default 40) for a long run, e.g. MESHCORE_FUZZ_EXAMPLES=5000.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore import ConfigError, Endpoint, HealthStatus, Locality
from routes.gen import summary as _summary

EXAMPLES = int(os.environ.get("MESHCORE_FUZZ_EXAMPLES", "40"))
ALLOWED = (ConfigError, ValueError, TypeError)
FAST = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = [pytest.mark.soak, pytest.mark.c_extension]


def _twins(name):
    from importlib import import_module

    return import_module(f"meshcore._fast.{name}_c"), import_module(f"meshcore._fast.{name}_py")


def _outcome(f):
    """('ok', value) or ('err', exception class); anything not allowed fails the test."""
    try:
        return "ok", f()
    except ALLOWED as e:
        return "err", ConfigError if isinstance(e, ConfigError) else (
            ValueError if isinstance(e, ValueError) else TypeError)


# -- strings a server might hand us --------------------------------------------------------------

_ODD = st.sampled_from(["\ud800", "\udcff", "\udc80", "\x00", "é", "\u2028", "%00", "#", "?", ";", "/",
                        "\udbff\udfff", "\U0001F600", " ", "\t", ",", "A", "*"])
texts = st.one_of(st.text(max_size=12), st.lists(st.one_of(_ODD, st.text(max_size=3)), max_size=8).map("".join))
paths = st.one_of(st.just("/"), texts.map(lambda s: "/" + s), st.sampled_from(
    ["/api/v1", "/API/v1?x=1", "/r\udcffx", "/a;p=1/b", "/p?q=\ud800", "/x#frag\ud800", "/big"]))
non_str = st.sampled_from([None, 1, 1.5, b"/x", ["/"], object()])
header_names = st.one_of(texts, st.sampled_from(["x-h", "X-H", "cookie", "content-type", "x-forwarded-proto",
                                                 "host", ":path", "x-tenant", "x-w"]))
header_values = st.one_of(texts, st.sampled_from(["", "a=1; b=2", "application/grpc", "https", "t1", "42",
                                                  "x" * 70000]))


@st.composite
def requests(draw):
    def maybe_bad(strategy, optional=False):
        return draw(st.one_of(strategy, non_str) if draw(st.integers(0, 19)) == 0 else strategy)

    pairs = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    shape = draw(st.sampled_from(["dict", "list", "tuple", "iter", "none", "bad"]))
    if shape == "dict":
        headers = dict(pairs)
    elif shape == "list":
        headers = pairs
    elif shape == "tuple":
        headers = tuple(pairs)
    elif shape == "iter":
        headers = ("iter", pairs)  # made into an iterator per twin
    elif shape == "none":
        headers = None
    else:
        headers = draw(st.sampled_from([[("x-h", 1)], [(1, "v")], [("x-h",)], 5, "x-h", {b"x": "v"}]))
    return dict(
        authority=maybe_bad(st.one_of(st.none(), texts, st.sampled_from(["a.com", "A.COM:80", "[::1]:8"]))),
        path=maybe_bad(paths),
        headers=headers,
        method=maybe_bad(st.one_of(st.sampled_from(["GET", "POST", "G\ud800", "", "\x00"]), texts)),
        scheme=maybe_bad(st.sampled_from(["http", "https", "HTTP", "\udcff"])),
        random_value=draw(st.one_of(st.none(), st.integers(-2**70, 2**70), st.sampled_from([1.5, "1"]))),
        source_ip=maybe_bad(st.one_of(st.none(), st.sampled_from(["10.0.0.1", "\ud800", ""]))),
    )


def _call_match(table, req):
    kw = dict(req)
    h = kw.pop("headers")
    if isinstance(h, tuple) and len(h) == 2 and h[0] == "iter":
        h = iter(list(h[1]))
    return table.match(kw.pop("authority"), kw.pop("path"), h, **kw)


# -- route configurations --------------------------------------------------------------------------

_REGEXES = ["/r.*", ".*", "/[a-z]+", "(", "/x\\d+", "[^/]*", "\\C"]


@st.composite
def string_matchers(draw):
    kind = draw(st.sampled_from(["exact", "prefix", "suffix", "contains", "safe_regex"]))
    if kind == "safe_regex":
        return {"safe_regex": {"regex": draw(st.sampled_from(_REGEXES))}}
    out = {kind: draw(st.one_of(texts, st.sampled_from(["t1", "/api", "é"])))}
    if draw(st.booleans()):
        out["ignore_case"] = True
    return out


@st.composite
def routes(draw):
    kind = draw(st.sampled_from(["prefix", "path", "safe_regex", "path_separated_prefix"]))
    if kind == "safe_regex":
        match = {"safe_regex": {"regex": draw(st.sampled_from(_REGEXES))}}
    else:
        match = {kind: draw(st.one_of(st.sampled_from(["/", "", "/api", "/API/v1", "/a", "/é", "/x/"]), paths))}
    if draw(st.booleans()):
        match["case_sensitive"] = False
    headers = []
    for _ in range(draw(st.integers(0, 2))):
        h = {"name": draw(st.sampled_from(["x-h", "x-tenant", ":method", "content-type", "X-W", ""]))}
        which = draw(st.sampled_from(["string_match", "present_match", "range_match", "invert"]))
        if which == "string_match":
            h["string_match"] = draw(string_matchers())
        elif which == "present_match":
            h["present_match"] = draw(st.booleans())
        elif which == "range_match":
            h["range_match"] = {"start": draw(st.integers(-5, 5)), "end": draw(st.integers(-5, 50))}
        else:
            h["string_match"] = draw(string_matchers())
            h["invert_match"] = True
        headers.append(h)
    if headers:
        match["headers"] = headers
    if draw(st.integers(0, 3)) == 0:
        match["query_parameters"] = [{"name": "q", "string_match": draw(string_matchers())}]
    if draw(st.integers(0, 4)) == 0:
        match["grpc"] = {}
    route = {"cluster": draw(st.sampled_from(["a", "b", ""]))}
    hp = []
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.sampled_from(["header", "cookie", "query_parameter", "connection_properties"]))
        if k == "header":
            p = {"header": {"header_name": draw(st.sampled_from(["x-h", "cookie", "X-W"]))}}
            if draw(st.booleans()):
                p["header"]["regex_rewrite"] = {"pattern": {"regex": draw(st.sampled_from(["x", "", ".", "a*"]))},
                                                "substitution": draw(st.sampled_from(["y", "\\0\\0", "", "\\1"]))}
        elif k == "cookie":
            p = {"cookie": {"name": "a"}}
        elif k == "query_parameter":
            p = {"query_parameter": {"name": "q"}}
        else:
            p = {"connection_properties": {"source_ip": True}}
        if draw(st.booleans()):
            p["terminal"] = True
        hp.append(p)
    if hp:
        route["hash_policy"] = hp
    if draw(st.integers(0, 3)) == 0:
        route["regex_rewrite"] = {"pattern": {"regex": draw(st.sampled_from(["/", "[a-z]", ""]))},
                                  "substitution": draw(st.sampled_from(["-", "\\0/"]))}
    if draw(st.integers(0, 5)) == 0:
        route["prefix_rewrite"] = "/new"
    r = {"match": match}
    action = draw(st.sampled_from(["route", "route", "route", "direct_response", "redirect", "weighted", "tpfc"]))
    if action == "direct_response":
        r["direct_response"] = {"status": draw(st.sampled_from([200, 99, 600, 0]))}
    elif action == "redirect":
        r["redirect"] = {"path_redirect": draw(st.sampled_from(["/x", "/y?z"])), "strip_query": True}
    elif action == "weighted":
        route.pop("cluster")
        route["weighted_clusters"] = {"clusters": [{"name": "a", "weight": draw(st.integers(0, 3))},
                                                   {"name": "b", "weight": draw(st.integers(0, 2**32))}]}
        r["route"] = route
    else:
        r["route"] = route
        if action == "tpfc":
            r["typed_per_filter_config"] = {"envoy.filters.http.fault": draw(st.sampled_from([
                {"@type": 1.5},
                {"@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                 "type_url": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                 "value": _deep(120)},
                {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                 "abort": {"http_status": 503, "percentage": {"numerator": 100}}},
            ]))}
    return r


def _deep(n):
    d = {}
    cur = d
    for _ in range(n):
        cur["a"] = {}
        cur = cur["a"]
    return d


@st.composite
def route_configs(draw):
    vhosts = []
    for i in range(draw(st.integers(1, 3))):
        vhosts.append({
            "name": f"v{i}",
            "domains": draw(st.lists(st.sampled_from(["*", "a.com", "*.com", "a.*", "A.COM", "é.com", ""]),
                                     min_size=1, max_size=3, unique=True)),
            "routes": draw(st.lists(routes(), max_size=5)),
        })
        if draw(st.integers(0, 5)) == 0:
            vhosts[-1]["require_tls"] = "ALL"
    cfg = {"name": "rc", "virtual_hosts": vhosts}
    if draw(st.booleans()):
        cfg["ignore_path_parameters_in_path_matching"] = True
    if draw(st.integers(0, 3)) == 0:
        cfg["ignore_port_in_host_matching"] = True
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(st.sampled_from(["bogus", "@type"]))] = draw(st.sampled_from([1.5, None, "x"]))
    return cfg


@FAST
@given(cfg=route_configs(), reqs=st.lists(requests(), min_size=1, max_size=6))
def test_route_tables_never_crash_and_twins_agree(cfg, reqs):
    routes_c, routes_py = _twins("routes")
    built = [_outcome(lambda: routes_c.RouteTable.from_xds(cfg)), _outcome(lambda: routes_py.RouteTable.from_xds(cfg))]
    assert built[0][0] == built[1][0], (cfg, built)
    if built[0][0] == "err":
        assert built[0][1] is built[1][1] is ConfigError, (cfg, built)
        return
    c, py = built[0][1], built[1][1]
    for req in reqs:
        a = _outcome(lambda: _call_match(c, req))
        b = _outcome(lambda: _call_match(py, req))
        if a[0] == "ok" and b[0] == "ok":
            assert _summary(a[1]) == _summary(b[1]), (cfg, req)
        else:
            assert a == b, (cfg, req, a, b)


def test_route_table_message_from_real_protobuf_classes():
    """Messages (not dicts): a lone-surrogate-free but hostile RouteConfiguration."""
    from envoy.config.route.v3 import route_pb2

    routes_c, routes_py = _twins("routes")
    rc = route_pb2.RouteConfiguration(name="rc")
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    r = vh.routes.add()
    r.match.safe_regex.regex = "/r.*"
    r.route.cluster = "a"
    h = r.route.hash_policy.add()
    h.header.header_name = "x-h"
    h.header.regex_rewrite.pattern.regex = "x"
    h.header.regex_rewrite.substitution = "y"
    for mod in (routes_c, routes_py):
        t = mod.RouteTable.from_xds(rc)
        m = t.match("a", "/r\ud800", {"x-h": "x\udcff" * 3})
        assert m is not None and m.hash is not None
    hashes = {mod.RouteTable.from_xds(rc).match("a", "/r", {"x-h": "\udcffx"}).hash for mod in (routes_c, routes_py)}
    assert len(hashes) == 1


# -- load balancers --------------------------------------------------------------------------------

POLICIES = ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]


@st.composite
def endpoint_lists(draw):
    out = []
    for _ in range(draw(st.integers(0, 8))):
        out.append(Endpoint(
            f"10.0.0.{draw(st.integers(0, 5))}", draw(st.sampled_from([80, 81])),
            weight=draw(st.sampled_from([0, 1, 1, 2, 7, 2**32 - 1])),
            health=draw(st.sampled_from(list(HealthStatus))),
            priority=draw(st.sampled_from([0, 0, 1])),
            locality=Locality("r", draw(st.sampled_from("ab"))),
            locality_weight=draw(st.sampled_from([None, 1, 5])),
        ))
    if draw(st.integers(0, 9)) == 0:
        out.append(draw(st.sampled_from([None, "10.0.0.1:80", 3])))  # not an Endpoint: TypeError
    return out


_FOREIGN = [None, "10.0.0.1:80", 3, 1.5, object(), Endpoint("10.9.9.9", 1)]


@FAST
@given(policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**64 - 1), eps=endpoint_lists(),
       bias=st.sampled_from([None, 0.0, 0.5, 1.0, 2.0, 400.0, 1e308, math.inf, -1.0, math.nan, 1e-320]),
       locality_weighted=st.booleans(),
       ops=st.lists(st.tuples(st.sampled_from(["pick", "pick", "pick", "release", "foreign", "update", "eject"]),
                              st.integers(0, 2**64 - 1)), max_size=40),
       updates=st.lists(endpoint_lists(), max_size=3))
def test_load_balancers_never_crash_and_twins_agree(policy, seed, eps, bias, locality_weighted, ops, updates):
    lb_c, lb_py = _twins("lb")
    opts = {"locality_weighted": locality_weighted}
    if policy == "LEAST_REQUEST" and bias is not None:
        opts["active_request_bias"] = bias
    built = [_outcome(lambda m=m: m.LoadBalancer(eps, policy, seed=seed, **opts)) for m in (lb_c, lb_py)]
    assert [b[0] for b in built] == [built[0][0]] * 2 and (built[0][0] == "ok" or built[0][1] is built[1][1]), built
    if built[0][0] == "err":
        return
    a, b = built[0][1], built[1][1]
    picked = []
    pending = list(updates)
    for op, x in ops:
        if op == "pick":
            h = x if policy in ("RING_HASH", "MAGLEV") and x % 3 else None
            pa, pb = _outcome(lambda: a.pick(h)), _outcome(lambda: b.pick(h))
            assert pa == pb or (pa[0] == pb[0] == "ok" and pa[1] is not None and pa[1].key == pb[1].key), (pa, pb)
            if pa[0] == "ok" and pa[1] is not None:
                picked.append(pa[1])
        elif op == "release" and picked:
            ep = picked.pop(x % len(picked))
            assert _outcome(lambda: a.release(ep)) == _outcome(lambda: b.release(ep))
        elif op == "foreign":
            obj = _FOREIGN[x % len(_FOREIGN)]
            assert _outcome(lambda: a.release(obj)) == _outcome(lambda: b.release(obj))
            assert _outcome(lambda: a.active_requests(obj)) == _outcome(lambda: b.active_requests(obj))
        elif op == "update" and pending:
            new = pending.pop(0)
            ua, ub = _outcome(lambda: a.update(new)), _outcome(lambda: b.update(new))
            assert ua[0] == ub[0] and (ua[0] == "ok" or ua[1] is ub[1]), (ua, ub)
        elif op == "eject" and a.endpoints:
            ep = a.endpoints[x % len(a.endpoints)]
            flag = bool(x & 1)
            assert _outcome(lambda: a.set_ejected(ep, flag)) == _outcome(lambda: b.set_ejected(ep, flag))
        assert [e.key for e in a.endpoints] == [e.key for e in b.endpoints]
        assert [a.active_requests(e) for e in a.endpoints] == [b.active_requests(e) for e in b.endpoints]


@pytest.mark.parametrize("bias", [1e308, math.inf, 400.0])
def test_huge_active_request_bias_same_picks(bias):
    lb_c, lb_py = _twins("lb")
    eps = [Endpoint(f"10.0.0.{i}", 80, weight=i) for i in range(1, 6)]
    seqs = []
    for mod in (lb_c, lb_py):
        lb = mod.LoadBalancer(eps, "LEAST_REQUEST", seed=7, active_request_bias=bias)
        seq = [lb.pick().key for _ in range(200)]
        lb.update(eps[:3])
        seq += [lb.pick().key for _ in range(200)]
        seqs.append(seq)
    assert seqs[0] == seqs[1]


# -- xDS decoding ----------------------------------------------------------------------------------

_ADDRESSES = ["10.0.0.1", "10.0.0.1\x00", "::1", "::1\x00", "", "host.example", "fe80::1%eth0", "1.2.3.4.5",
              "\ud800", "é"]


@st.composite
def assignments(draw):
    lles = []
    for _ in range(draw(st.integers(0, 3))):
        lbes = []
        for _ in range(draw(st.integers(0, 3))):
            lbe = {"endpoint": {"address": {"socket_address": {
                "address": draw(st.sampled_from(_ADDRESSES)),
                "port_value": draw(st.sampled_from([80, 0, 65535, 65536, -1]))}}}}
            if draw(st.booleans()):
                lbe["load_balancing_weight"] = draw(st.sampled_from([0, 1, 2**32 - 1, 2**32, -1, 1.5]))
            if draw(st.integers(0, 4)) == 0:
                lbe["metadata"] = draw(st.sampled_from([
                    {"filter_metadata": {"envoy.lb": {"hash_key": "k"}}},
                    {"filter_metadata": {"x": _deep(200)}},
                    {"typed_filter_metadata": {"x": {"@type": 1.5}}},
                ]))
            lbes.append(lbe)
        lle = {"lb_endpoints": lbes, "priority": draw(st.sampled_from([0, 0, 1, 129]))}
        if draw(st.booleans()):
            lle["locality"] = {"zone": draw(st.sampled_from(["a", "b"]))}
            lle["load_balancing_weight"] = draw(st.sampled_from([0, 1, 2**32 - 1]))
        lles.append(lle)
    cla = {"cluster_name": draw(st.sampled_from(["c", ""])), "endpoints": lles}
    if draw(st.integers(0, 9)) == 0:
        cla["@type"] = draw(st.sampled_from([1.5, None, "type.googleapis.com/x.Y"]))
    return cla


@st.composite
def clusters(draw):
    c = {"name": "c", "type": draw(st.sampled_from(["STATIC", "EDS", "STRICT_DNS", "LOGICAL_DNS"]))}
    which = draw(st.sampled_from(["lb_policy", "typed", "none"]))
    if which == "lb_policy":
        c["lb_policy"] = draw(st.sampled_from(POLICIES + ["CLUSTER_PROVIDED", 17]))
        if c["lb_policy"] == "LEAST_REQUEST" and draw(st.booleans()):
            c["least_request_lb_config"] = {"active_request_bias": {
                "default_value": draw(st.sampled_from([1e308, -1.0, 0.0, 2.0])), "runtime_key": "k"}}
    elif which == "typed":
        c["load_balancing_policy"] = {"policies": [{"typed_extension_config": {"name": "p", "typed_config": draw(
            st.sampled_from([
                {"@type": 1.5},
                {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
                 "table_size": draw(st.sampled_from([7, 8, 65537, 5000012]))},
                {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3."
                          "LeastRequest", "active_request_bias": {"default_value": 1e308, "runtime_key": "k"}},
                {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": 2},
            ]))}}]}
    if draw(st.booleans()):
        c["load_assignment"] = draw(assignments())
    return c


@FAST
@given(cla=assignments())
def test_endpoint_decoding_never_crashes(cla):
    from meshcore.xds.endpoint_config import endpoints_spec

    _outcome(lambda: endpoints_spec(cla))


@FAST
@given(cluster=clusters(), cla=st.one_of(st.none(), assignments()), seed=st.integers(0, 2**64 - 1))
def test_load_balancer_from_xds_never_crashes_and_twins_agree(cluster, cla, seed):
    lb_c, lb_py = _twins("lb")
    a = _outcome(lambda: lb_c.LoadBalancer.from_xds(cluster, cla, seed=seed))
    b = _outcome(lambda: lb_py.LoadBalancer.from_xds(cluster, cla, seed=seed))
    assert a[0] == b[0], (a, b)
    if a[0] == "err":
        assert a[1] is b[1]
        return
    for _ in range(20):
        assert _outcome(lambda: a[1].pick(7)) == _outcome(lambda: b[1].pick(7)) or \
            a[1].pick(7).key == b[1].pick(7).key


def test_config_errors_name_resource_and_field():
    from meshcore.xds.endpoint_config import endpoints_spec

    cla = {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1\x00", "port_value": 80}}}}]}]}
    with pytest.raises(ConfigError) as e:
        endpoints_spec(cla)
    assert e.value.resource == "c"
    assert e.value.field == "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    lb_c, lb_py = _twins("lb")
    bad_type = {"name": "c", "load_balancing_policy": {"policies": [
        {"typed_extension_config": {"name": "p", "typed_config": {"@type": 1.5}}}]}}
    for mod in (lb_c, lb_py):
        with pytest.raises(ConfigError) as e:
            mod.LoadBalancer.from_xds(bad_type)
        assert e.value.field.endswith("typed_config.@type")
