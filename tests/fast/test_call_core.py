"""The request path twins (``meshcore._fast.call_c`` / ``call_py``): circuit breakers, retry
budget, hot counters and histogram; the same operations give the same state in both; a mesh
on either twin makes the same decisions for the same seed."""

from __future__ import annotations

import bisect
import json
import os
import random
from http import HTTPStatus
from importlib import import_module

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.errors import CircuitBreakerOpen, UpstreamError
from meshcore.stats import BUCKETS_MS, COUNTER_NAMES

C_EXT = pytest.mark.c_extension


@pytest.fixture(scope="session")
def callmod(impl):
    return import_module(f"meshcore._fast.call_{impl}")


def counters(callmod, **thresholds):
    c = callmod.ClusterCounters()
    if thresholds:
        t = {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3,
             "retry_budget": None, **thresholds}
        c.set_thresholds(t["max_connections"], t["max_pending_requests"], t["max_requests"], t["max_retries"],
                         t["retry_budget"])
    return c


def values(c):
    return dict(zip(COUNTER_NAMES, c.counter_values()))


# -- circuit breakers (Envoy's cluster circuit_breakers, priority DEFAULT) ---------------------------


def test_envoy_default_thresholds(callmod):
    # Envoy defaults (api/envoy/config/cluster/v3/circuit_breaker.proto): 1024 connections,
    # pending requests and requests; 3 retries.
    c = callmod.ClusterCounters()
    assert (c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries) == (1024, 1024, 1024, 3)
    # Envoy's HTTP/1.1 pool: 1024 requests on the 1024 connections (max_requests counts those
    # only), 1024 more waiting as pending, then overflow
    assert [c.admit(False) for _ in range(2048)] == [0] * 2048
    assert c.admit(False) == callmod.OVER_REQUESTS
    assert c.pending == 1024


def test_requests_and_retries_overflow(callmod):
    c = counters(callmod, max_requests=2, max_retries=1)
    assert c.admit(False) == 0 and c.admit(False) == 0
    assert c.admit(False) == callmod.OVER_REQUESTS  # max_requests reached
    c.complete(False, 200, None, 1.0)
    assert c.admit(True) == 0
    c.complete(False, 200, None, 1.0)
    assert c.admit(True) == callmod.OVER_RETRIES  # max_retries (1) in flight
    c.complete(True, 503, None, 1.0)
    assert c.active_requests == 0 and c.active_retries == 0
    v = values(c)
    assert v["upstream_rq_total"] == 3 and v["upstream_rq_retry"] == 1
    assert v["upstream_rq_pending_overflow"] == 1 and v["upstream_rq_retry_overflow"] == 1


def test_pending_model(callmod):
    # HTTP/1.1 pool model: attempts beyond max_connections are pending; pending overflows at
    # max_pending_requests.
    c = counters(callmod, max_connections=2, max_pending_requests=1, max_requests=100)
    assert [c.admit(False) for _ in range(4)] == [0, 0, 0, callmod.OVER_REQUESTS]
    assert c.pending == 1


@pytest.mark.parametrize("percent,min_conc,active,limit", [
    (20.0, 3, 0, 3),     # never below min_retry_concurrency
    (20.0, 3, 30, 6),    # 20 % of 30 in flight
    (50.0, 1, 9, 4),     # truncated: uint64_t(0.5 * 9)
    (0.0, 0, 50, 0),     # no retries at all
    (100.0, 0, 7, 7),
])
def test_retry_budget_limit(callmod, percent, min_conc, active, limit):
    # Envoy RetryBudgetImpl::max() (source/common/upstream/resource_manager_impl.h):
    # max(budget_percent / 100 * (requests + pending), min_retry_concurrency); max_retries is
    # then ignored.
    c = counters(callmod, max_retries=1000, retry_budget=(percent, min_conc))
    for _ in range(active):
        assert c.admit(False) == 0
    assert c.retry_limit() == limit
    admitted = 0
    while True:
        result = c.admit(True)
        if result:
            break
        admitted += 1
    # each admitted retry is itself in flight and raises the budget's base; the pool (1024
    # connections + 1024 pending, Envoy's HTTP/1.1 defaults) still bounds everything
    expected, in_flight = 0, active
    while expected < max(int(percent / 100.0 * in_flight), min_conc) and in_flight < 2048:
        expected += 1
        in_flight += 1
    assert admitted == expected
    over = callmod.OVER_REQUESTS if in_flight == 2048 else callmod.OVER_RETRIES
    assert result == over
    assert values(c)["upstream_rq_retry_overflow"] == (over == callmod.OVER_RETRIES)


def test_thresholds_validated(callmod):
    c = callmod.ClusterCounters()
    with pytest.raises(ValueError, match="max_requests"):
        c.set_thresholds(1, 1, -1, 1)


def test_abandon_undoes_the_admission(callmod):
    c = counters(callmod)
    c.admit(False)
    c.admit(True)
    c.abandon(True)
    c.abandon(False)
    assert c.active_requests == c.active_retries == 0
    assert values(c)["upstream_rq_total"] == 0 and values(c)["upstream_rq_retry"] == 0


# -- counters and histogram -------------------------------------------------------------------------


def test_statuses_errors_and_histogram(callmod):
    c = counters(callmod)
    outcomes = [(200, None), (HTTPStatus.OK, None), (503, None), (None, None), (700, None), ("x", None),
                (None, "connect-failure"), (None, "timeout"), (None, "reset"), (None, "weird")]
    for status, error in outcomes:
        c.admit(False)
        c.complete(False, status, error, 3.0)
    assert c.statuses() == {200: 2, 503: 1, 0: 2, 700: 1}
    v = values(c)
    assert v["upstream_cx_connect_fail"] == 1 and v["upstream_rq_per_try_timeout"] == 1
    assert v["upstream_rq_rx_reset"] == 2 and v["upstream_rq_5xx_local"] == 4
    buckets, total, count = c.histogram()
    assert count == 10 and total == 30.0 and buckets[2] == 10  # 3 ms: in the (1, 5] bucket


@pytest.mark.parametrize("ms", [0.0, 0.5, 0.50001, 1.0, 4.9, 5.0, 3600000.0, 3600000.5, 1e12])
def test_histogram_buckets_are_bisect_left(callmod, ms):
    c = counters(callmod)
    c.admit(False)
    c.complete(False, 200, None, ms)
    buckets = c.histogram()[0]
    assert len(buckets) == len(BUCKETS_MS) + 1
    assert buckets.index(1) == bisect.bisect_left(BUCKETS_MS, ms)


ops = st.lists(st.tuples(st.sampled_from(["admit", "admit_retry", "complete", "abandon", "thresholds"]),
                         st.integers(0, 2**31), st.sampled_from([None, 0, 200, 204, 404, 503, 599, 600, 1000]),
                         st.sampled_from([None, None, None, "connect-failure", "timeout", "reset"]),
                         st.floats(0, 1e7, allow_nan=False)), max_size=200)


@C_EXT
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=ops)
def test_twins_keep_identical_state(script):
    from meshcore._fast import call_c, call_py

    a, b = call_c.ClusterCounters(), call_py.ClusterCounters()
    admitted = []  # retry flags of attempts in flight
    for op, n, status, error, ms in script:
        if op in ("admit", "admit_retry"):
            retry = op == "admit_retry"
            ra, rb = a.admit(retry), b.admit(retry)
            assert ra == rb
            if ra == 0:
                admitted.append(retry)
        elif op == "thresholds":
            t = (n % 5, n % 7, n % 11, n % 3, None if n % 2 else (float(n % 101), n % 4))
            a.set_thresholds(*t)
            b.set_thresholds(*t)
        elif admitted:
            retry = admitted.pop(n % len(admitted))
            if op == "abandon":
                a.abandon(retry)
                b.abandon(retry)
            else:
                a.complete(retry, status, error, ms)
                b.complete(retry, status, error, ms)
        assert (a.active_requests, a.active_retries, a.pending, a.retry_limit()) == (
            b.active_requests, b.active_retries, b.pending, b.retry_limit())
    assert a.counter_values() == b.counter_values()
    assert a.statuses() == b.statuses()
    ha, hb = a.histogram(), b.histogram()
    assert ha[0] == hb[0] and ha[2] == hb[2] and ha[1] == pytest.approx(hb[1])


# -- a mesh on either twin --------------------------------------------------------------------------

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def write_resources(path, *, retry=None, outlier=None, fault=None, breakers=None):
    filters = []
    if fault is not None:
        filters.append({"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault", **fault}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    routes = [
        {"name": "rewrite", "match": {"prefix": "/old/"}, "route": {"cluster": "svc", "prefix_rewrite": "/new/",
                                                                     "host_rewrite_literal": "backend"}},
        {"name": "hashed", "match": {"prefix": "/h"}, "route": {
            "cluster": "svc", "hash_policy": [{"header": {"header_name": "x-user"}}], "timeout": "0.5s"}},
        {"name": "direct", "match": {"path": "/teapot"}, "direct_response": {"status": 418}},
        {"name": "all", "match": {"prefix": "/"}, "route": {"cluster": "svc", "timeout": "2s",
                                                             **({"retry_policy": retry} if retry else {})}},
    ]
    cluster = {"name": "svc", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
               "lb_policy": "RING_HASH"}
    if outlier:
        cluster["outlier_detection"] = outlier
    if breakers:
        cluster["circuit_breakers"] = {"thresholds": [breakers]}
    data = {
        "listeners": [{"name": "svc.local:80", "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "r"}, "http_filters": filters}}}],
        "routes": [{"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]}],
        "clusters": [cluster],
        "endpoints": [{"cluster_name": "svc", "endpoints": [{"locality": {"zone": "z"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.%d" % i, "port_value": 8080}}}}
            for i in range(1, 6)]}]}],
    }
    with open(path, "w") as f:
        json.dump(data, f)


def script_run(mesh, seed):
    """A fixed random workload through ``run`` and the ``with`` form; returns what happened."""
    rng = random.Random(seed)
    bad = {"10.0.0.2:8080", "10.0.0.4:8080"}
    seen = []
    for i in range(60):
        path = rng.choice(["/", "/old/x?y=1", "/h", "/teapot", "/a/b"])
        headers = {"x-user": str(rng.randrange(7))} if rng.random() < 0.7 else None
        url = "http://svc.local" + path
        if path == "/teapot":
            call = mesh.request(url, headers=headers)
            with pytest.raises(Exception, match="answers directly"):
                call.start_attempt()
            seen.append(("direct", call.route.route_name))
            continue
        if rng.random() < 0.5:
            call = mesh.request(url, "POST", headers)

            def send(a):
                if a.address in bad:
                    if rng.random() < 0.5:
                        raise UpstreamError("reset")
                    return type("R", (), {"status_code": 503})()
                return type("R", (), {"status_code": 200})()

            try:
                r = call.run(send)
                seen.append(("run", r.status_code))
            except (UpstreamError, CircuitBreakerOpen) as e:
                seen.append(("run-error", type(e).__name__))
            seen.append([(a.number, a.address, a.path, a.authority, a.method, a.status, a.error,
                          a.timeout is None) for a in call.attempts])
        else:
            with mesh.request(url, headers=headers) as a:
                a.status = 503 if a.address in bad else 200
                seen.append(("with", a.address, a.path, a.authority, a.cluster, round(a.timeout or 0, 0)))
    return seen, mesh.stats()["svc"]


@pytest.mark.parametrize("config", [
    {},
    {"retry": {"retry_on": "5xx,reset", "num_retries": 2, "retry_back_off": {"base_interval": "0.001s"}}},
    {"retry": {"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.001s"},
               "host_selection_retry_max_attempts": 3},
     "outlier": {"consecutive_5xx": 3, "interval": "10s", "max_ejection_percent": 100},
     "breakers": {"max_retries": 1}},
    {"fault": {"abort": {"http_status": 503, "percentage": {"numerator": 0}},
               "delay": {"fixed_delay": "0.001s", "percentage": {"numerator": 30}}}},
])
@C_EXT
def test_same_seed_same_decisions(tmp_path, config):
    """A mesh on the compiled request path and one on the pure one, same seed and config:
    identical attempts, statuses, errors and stats."""
    from meshcore._fast import call_c, call_py
    from meshcore.mesh import MeshBase

    results = []
    for mod in (call_c, call_py):
        path = os.path.join(str(tmp_path), f"{mod.__name__}.json")
        write_resources(path, **config)
        cls = type("M", (MeshBase, mod.MeshCore), {"_core": mod})
        with cls.from_file(path, watch=False, seed=11) as mesh:
            mesh.wait_ready("svc.local:80", timeout=5)
            out, stats = script_run(mesh, 5)
            stats.pop("upstream_rq_time")
            results.append((out, stats))
    assert results[0] == results[1]
    assert results[0][1]["upstream_rq_total"] > 0


def test_request_errors_and_direct_routes(tmp_path, mesh_cls):
    from meshcore import NoRoute, Unavailable

    path = os.path.join(str(tmp_path), "r.json")
    write_resources(path)
    with mesh_cls.from_file(path, watch=False, seed=1) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        with pytest.raises(Unavailable, match="other.local:80"):
            mesh.request("http://other.local/")
        with pytest.raises(ValueError, match="not an http"):
            mesh.request("ftp://svc.local/")
        call = mesh.request("http://svc.local/teapot")
        assert call.cluster is None and call.route.direct_response[0] == 418
        call = mesh.request("http://svc.local/old/x?q=1", "PUT", {"x-a": "1"}, timeout=0.1)
        assert call.deadline - call.started == pytest.approx(0.1)  # the caller's cap below the route's 2 s
        with call as a:
            assert (a.path, a.authority, a.method, a.headers, a.number) == ("/old/x?q=1".replace("old", "new"),
                                                                           "backend", "PUT", {"x-a": "1"}, 1)
            assert a.url == f"http://{a.address}/new/x?q=1"
            assert 0 < a.timeout <= 0.1
        assert a.status is None and a.error is None  # left without a status: counted as status 0
        assert mesh.stats()["svc"]["upstream_rq_completed"] == 1
        with pytest.raises(NoRoute):
            empty = os.path.join(str(tmp_path), "empty.json")
            with open(path) as f:
                data = json.load(f)
            data["routes"][0]["virtual_hosts"][0]["routes"] = [
                {"match": {"prefix": "/only"}, "route": {"cluster": "svc"}}]
            with open(empty, "w") as f:
                json.dump(data, f)
            with mesh_cls.from_file(empty, watch=False) as other:
                other.wait_ready("svc.local:80", timeout=5)
                other.request("http://svc.local/elsewhere")


def test_finish_is_idempotent_and_counts_once(tmp_path, mesh_cls):
    path = os.path.join(str(tmp_path), "r.json")
    write_resources(path)
    with mesh_cls.from_file(path, watch=False, seed=1) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        call = mesh.request("http://svc.local/")
        a = call.start_attempt()
        lb = mesh.config("svc.local:80").clusters["svc"].lb
        assert lb.active_requests(a.endpoint) == 1
        a.finish(200)
        a.finish(500)
        a.finish(error="reset")
        assert lb.active_requests(a.endpoint) == 0 and a.status == 200
        st = mesh.stats()["svc"]
        assert st["upstream_rq_200"] == 1 and st["upstream_rq_completed"] == 1 and st["upstream_rq_active"] == 0


def test_aggregate_cluster_outlier_detection_is_the_child_clusters(tmp_path, mesh_cls):
    """Envoy: an aggregate cluster's hosts belong to its children, and a host's outlier detector
    is its own cluster's (the child's outlier_detection; ejection stats under the child)."""
    path = os.path.join(str(tmp_path), "agg.json")
    write_resources(path)
    with open(path) as f:
        data = json.load(f)
    data["routes"][0]["virtual_hosts"][0]["routes"] = [{"match": {"prefix": "/"}, "route": {"cluster": "agg"}}]
    data["clusters"] = [
        {"name": "agg", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED", "cluster_type": {
            "name": "envoy.clusters.aggregate", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": ["primary", "secondary"]}}},
        {"name": "primary", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
         "outlier_detection": {"consecutive_5xx": 2, "interval": "10s", "base_ejection_time": "30s",
                               "max_ejection_percent": 50}},
        {"name": "secondary", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}},
    ]
    data["endpoints"] = [
        {"cluster_name": name, "endpoints": [{"locality": {"zone": "z"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": f"10.{k}.0.{i}", "port_value": 80}}}}
            for i in (1, 2)]}]} for k, name in enumerate(("primary", "secondary"))]
    with open(path, "w") as f:
        json.dump(data, f)
    with mesh_cls.from_file(path, watch=False, seed=3) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        bad = "10.0.0.1:80"
        statuses = []
        for _ in range(12):
            with mesh.request("http://svc.local/") as a:
                assert a.cluster == "agg" and a.address.startswith("10.0.0.")  # primary is healthy
                a.status = 503 if a.address == bad else 200
                statuses.append((a.address, a.status))
        assert statuses.count((bad, 503)) == 2  # consecutive_5xx: 2, then ejected
        primary = mesh.config("svc.local:80").clusters["agg"].lb.children[0].lb
        assert [primary.is_ejected(ep) for ep in primary.endpoints] == [True, False]
        stats = mesh.stats()
        assert stats["primary"]["outlier_detection.ejections_enforced_total"] == 1
        assert stats["agg"]["upstream_rq_total"] == 12 and stats["agg"]["upstream_rq_503"] == 2


def test_thresholds_take_integral_values_alike(callmod):
    c = callmod.ClusterCounters()
    c.set_thresholds(2.0, 1, 3, 1.0, (50, 1.0))
    assert (c.max_connections, c.max_requests, c.max_retries, c.budget_percent, c.min_retry_concurrency) == (
        2, 3, 1, 50.0, 1)


@pytest.mark.parametrize("retry", [None, {"retry_on": "5xx,retriable-status-codes,cancelled", "num_retries": 2,
                                          "retriable_status_codes": [404, 200]}])
def test_first_attempt_and_finish_final(tmp_path, mesh_cls, retry):
    """The router's straight path: ``first_attempt`` is ``start_attempt`` unless a fault filter
    applies (``None``: the fault step first); ``finish_final`` records like ``finish`` and says
    whether the first attempt's answer ends the request (``lifecycle._final_answer``)."""
    from meshcore import lifecycle

    path = os.path.join(str(tmp_path), "r.json")
    write_resources(path, retry=retry)
    cases = [(200, None), (204, None), (404, None), (408, None), (409, None), (503, None), (200, 0), (200, 1),
             (None, None), (700, None), (-1, None), (True, None)]
    with mesh_cls.from_file(path, watch=False, seed=1) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        verdicts = {}
        for status, grpc_status in cases:
            call = mesh.request("http://svc.local/")
            a = call.first_attempt()
            assert a is not None and a.number == 1 and call.attempts == [a]
            expected = lifecycle._final_answer(call.retry_policy, status, grpc_status)
            assert a.finish_final(status, grpc_status) is expected, (status, grpc_status)
            verdicts[(status, grpc_status)] = expected
            assert (a.status, a.grpc_status, a.error) == (status, grpc_status, None)
            a.finish_final(500)
            assert a.status == status  # recorded once
            if retry is not None:
                b = call.start_attempt()
                assert b.number == 2 and b.finish_final(200) is False  # a retry's outcome: the retry decision
        assert mesh.stats()["svc"]["upstream_rq_active"] == 0
        assert mesh.stats()["svc"]["upstream_rq_completed"] == len(cases) * (1 if retry is None else 2)
        # the oracle itself, pinned: without a policy every answer is final; with it the
        # retriable status codes (404, 200) and 5xx are not, other statuses are
        if retry is None:
            assert all(verdicts.values())
        else:
            assert verdicts[(204, None)] and verdicts[(409, None)]
            assert not (verdicts[(200, None)] or verdicts[(404, None)] or verdicts[(503, None)])

    write_resources(path, fault={"delay": {"fixed_delay": "0.001s", "percentage": {"numerator": 0}},
                                 "abort": {"http_status": 503, "percentage": {"numerator": 100}}})
    with mesh_cls.from_file(path, watch=False, seed=1) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        call = mesh.request("http://svc.local/")
        assert call.first_attempt() is None and call.attempts == []  # the fault step comes first
        assert mesh.stats()["svc"].get("upstream_rq_total", 0) == 0


def test_request_first(tmp_path, mesh_cls):
    """``_request_first`` (the integrations' short paths): ``request`` + ``first_attempt`` in one
    call, under the configuration the caller expects or not at all (nothing routed or counted);
    refusals of the first attempt returned with their call, routing refusals raised, a fault
    filter's call returned without an attempt -- the same decisions, counters and picks as the
    two calls."""
    from meshcore.errors import MeshError, Unavailable

    path = os.path.join(str(tmp_path), "r.json")
    write_resources(path, breakers={"max_requests": 2, "max_pending_requests": 0, "max_connections": 2})
    with mesh_cls.from_file(path, watch=False, seed=5) as mesh, mesh_cls.from_file(path, watch=False, seed=5) as twin:
        for m in (mesh, twin):
            m.wait_ready("svc.local:80", timeout=5)
        cfg = mesh.config("svc.local:80")
        assert mesh._request_first("http://svc.local/h", "GET", {"x-user": "u"}, "svc.local:80", None, object()) is None
        assert mesh.stats().get("svc", {}).get("upstream_rq_total", 0) == 0  # nothing routed, nothing counted
        picks, twin_picks = [], []
        for i in range(6):
            call, a, refused, key, endpoint, route, started, attempt_timeout = mesh._request_first(
                "http://svc.local/h", "GET", {"x-user": f"u{i}"}, "svc.local:80", 0.2, cfg)
            assert refused is None and a.number == 1 and call.attempts == [a] and call.route.route_name == "hashed"
            # what the caller reads next, read for it
            assert (key, endpoint, route, started, attempt_timeout) == (a.endpoint.key, a.endpoint, call.route,
                                                                        call.started, a.timeout)
            assert endpoint is a.endpoint and route is call.route and type(started) is float
            assert abs((call.deadline - call.started) - 0.2) < 1e-9  # the caller's timeout caps the route's
            picks.append(a.address)
            a.finish_final(200)
            t = twin.request("http://svc.local/h", "GET", {"x-user": f"u{i}"}, target="svc.local:80", timeout=0.2)
            b = t.first_attempt()
            twin_picks.append(b.address)
            b.finish_final(200)
        def counted(m):
            return {k: v for k, v in m.stats()["svc"].items() if k != "upstream_rq_time"}  # (times differ)

        assert picks == twin_picks and counted(mesh) == counted(twin)
        # plain: routed as without the headers (the caller vouches they change nothing), kept on the call
        hdrs = {"x-user": "u1"}
        for plain, hashed in ((False, True), (True, False)):
            call, a = mesh._request_first("http://svc.local/h", "GET", hdrs, "svc.local:80", None, cfg, plain)[:2]
            assert call.headers is hdrs and (call.route.hash is not None) is hashed
            a.finish_final(200)
        held = [mesh._request_first("http://svc.local/", "GET", None, "svc.local:80", None, cfg) for _ in range(2)]
        routed = mesh._request_first("http://svc.local/", "GET", None, "svc.local:80", None, cfg)
        call, a, refused = routed[:3]
        assert a is None and isinstance(refused, CircuitBreakerOpen) and call.attempts == []
        assert routed[3:] == (None,) * 5
        for held_call in held:
            held_call[1].finish_final(200)
        routed = mesh._request_first("http://svc.local/teapot", "GET", None, "svc.local:80", None, cfg)
        call, a, refused = routed[:3]
        assert a is None and isinstance(refused, MeshError)  # a direct response: no upstream attempt
        assert len(routed) == 8 and routed[3:] == (None,) * 5
        # nothing published for a target: nothing expected (not routed, not waited for; request()
        # itself waits for it, then refuses it)
        assert mesh._request_first("http://svc.local/", "GET", None, "nowhere:80", None, None) is None
        with pytest.raises(Unavailable):
            mesh.request("http://svc.local/", target="nowhere:80")
        assert mesh.stats()["svc"]["upstream_rq_active"] == 0
        assert mesh.stats()["svc"]["upstream_rq_pending_overflow"] == 1

    write_resources(path, fault={"delay": {"fixed_delay": "0.001s", "percentage": {"numerator": 0}},
                                 "abort": {"http_status": 503, "percentage": {"numerator": 100}}})
    with mesh_cls.from_file(path, watch=False, seed=1) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        routed = mesh._request_first("http://svc.local/", "GET", None, "svc.local:80", None, mesh.config("svc.local:80"))
        call, first, refused = routed[:3]
        assert first is None and refused is None and call.attempts == []  # the fault step comes first
        assert routed[3:] == (None,) * 5
        assert mesh.stats()["svc"].get("upstream_rq_total", 0) == 0


@pytest.mark.parametrize("read", ["before", "after"])
def test_answered_counts_a_single_attempt_however_the_list_was_read(tmp_path, mesh_cls, callmod, read):
    """``IstioObserver.answered`` counts a call whose only attempt it finishes, whether or not
    ``call.attempts`` was read (before the first attempt or after it): the twins' ``call.attempts
    == [attempt]``."""
    path = os.path.join(str(tmp_path), "r.json")
    write_resources(path)
    missed = []
    observer = callmod.IstioObserver(lambda call, result, key: missed.append(call))
    with mesh_cls.from_file(path, watch=False, seed=5) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        call = mesh.request("http://svc.local/", "POST", {"content-type": "application/grpc"})
        if read == "before":
            assert call.attempts == []
        a = call.first_attempt()
        if read == "after":
            assert call.attempts == [a]
        assert observer.answered(call, a, 200, 0, b"ok", None, 1) == 1
        assert missed == [call]  # (a key not known yet: counted through the record, its facts on the attempt)
        assert a.telemetry == {"peer_metadata": None, "request_messages": 1, "response_messages": 1}
