"""Retries, timeouts and outlier ejection: meshcore's request lifecycle against a real Envoy 1.40
given the same routes and cluster over ADS and the same misbehaving loopback upstreams.

Envoy's side is read from its responses and its admin ``/stats``
(``cluster.<name>.upstream_rq_retry``, ``outlier_detection.ejections_enforced_total``); meshcore's
from ``Mesh.stats()`` and the upstreams' hit counts.
"""

from __future__ import annotations

import http.client
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import pytest

from google.protobuf import json_format

import meshcore
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.client import Backoff
from meshcore.xds.resource_file import parse_resources
from resilience.test_lifecycle import Upstream, send

from .test_envoy_interop import AdsEnvoy, _until

pytestmark = pytest.mark.envoy

TARGET = "shop.local:80"


def resources(ports: List[int], route: Dict[str, Any], cluster_extra: Dict[str, Any]) -> Dict[str, Any]:
    return parse_resources({
        "routes": [{"name": "r", "virtual_hosts": [{"name": "shop", "domains": ["*"], "routes": [
            {"name": "all", "match": {"prefix": "/"}, "route": {"cluster": "shop", **route}}]}]}],
        "clusters": [{"name": "shop", "type": "EDS", "connect_timeout": "0.5s", "lb_policy": "ROUND_ROBIN",
                      "eds_cluster_config": {"eds_config": {"ads": {}}}, **cluster_extra}],
        "endpoints": [{"cluster_name": "shop", "endpoints": [{"locality": {"zone": "z"}, "load_balancing_weight": 1,
                       "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                           "address": "127.0.0.1", "port_value": p}}}} for p in ports]}]}],
    })


def envoy_stats(envoy: AdsEnvoy) -> Dict[str, int]:
    with urllib.request.urlopen(envoy.admin_url + "/stats?filter=cluster.shop.", timeout=3) as r:
        out = {}
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name.removeprefix("cluster.shop.")] = int(value)
        return out


def fault_filters(fault: Optional[Dict[str, Any]]) -> Optional[List[Any]]:
    """The HCM filter chain: the fault filter (``HTTPFault`` as proto3 JSON) before the router."""
    if fault is None:
        return None
    msg = json_format.ParseDict(fault, fault_pb2.HTTPFault())
    return [hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=b.pack(msg)), b.router_filter()]


def envoy_get(port: int, headers: Dict[str, str]) -> Tuple[int, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/x", headers={"Host": "shop.local", **headers})
        r = conn.getresponse()
        r.read()
        return r.status, time.monotonic() - t0
    finally:
        conn.close()


def mesh_get(mesh: meshcore.Mesh, headers: Dict[str, str]) -> Tuple[Any, float]:
    t0 = time.monotonic()
    try:
        status: Any = mesh.request("http://shop.local/x", headers=headers).run(send).status_code
    except meshcore.UpstreamTimeout:
        status = 504  # what Envoy answers for a route timeout
    except meshcore.FaultAbort as e:
        status = e.http_status  # Envoy's local reply for a fault abort
    return status, time.monotonic() - t0


# Request headers per request (cycled) for the fault scenario: Envoy's header-controlled faults
# and their percentage headers (source/extensions/filters/common/fault/fault_config.cc).
FAULT_HEADERS: List[Dict[str, str]] = [
    {"x-envoy-fault-abort-request": "503"},                                               # aborted
    {"x-envoy-fault-abort-request": "503", "x-envoy-fault-abort-request-percentage": "0"},  # not
    {"x-envoy-fault-abort-request": "429", "x-envoy-fault-abort-request-percentage": "100"},
    {"x-envoy-fault-abort-request": "700"},                                  # out of range: ignored
    {"x-envoy-fault-delay-request": "250"},                                               # delayed
    {"x-envoy-fault-delay-request": "250", "x-envoy-fault-delay-request-percentage": "0"},
    {"x-envoy-fault-abort-request": "abc", "x-envoy-fault-delay-request": "x"},           # invalid
    {},
]

SCENARIOS = {
    # one host always 503, retried elsewhere; ejected after 3 consecutive 5xx
    "retry_and_eject": (("fail", "ok", "ok"),
                        {"retry_policy": {"retry_on": "5xx", "num_retries": 2}},
                        {"outlier_detection": {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s",
                                               "max_ejection_percent": 100}}),
    # every host 503: 1 + num_retries attempts, then the last 503
    "retries_exhausted": (("fail", "fail"),
                          {"retry_policy": {"retry_on": "5xx", "num_retries": 2,
                                            "retry_back_off": {"base_interval": "0.001s"}}}, {}),
    # per-try timeout on a slow host, retried on the fast one
    "per_try_timeout": (("slow", "ok"),
                        {"timeout": "3s", "retry_policy": {"retry_on": "5xx", "num_retries": 1,
                                                           "per_try_timeout": "0.15s"}}, {}),
    # route timeout: 504 after about the timeout
    "route_timeout": (("slow",), {"timeout": "0.2s"}, {}),
    # a retry budget of 0 % with no minimum concurrency: no retry is ever admitted
    # (Envoy RetryBudgetImpl::max, resource_manager_impl.h), whatever num_retries says
    "retry_budget": (("fail", "fail"),
                     {"retry_policy": {"retry_on": "5xx", "num_retries": 3,
                                       "retry_back_off": {"base_interval": "0.001s"}}},
                     {"circuit_breakers": {"thresholds": [{"retry_budget": {
                         "budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}}]}}),
    # header-controlled fault filter: FAULT_HEADERS decide per request
    "fault_headers": (("ok",), {}, {}),
    # the router's x-envoy-* request headers (ROUTER_HEADERS): retries on a route without a policy,
    # honoured on internal requests only (HCM below)
    "router_retry_headers": (("fail", "fail"), {"timeout": "3s"}, {}),
    # ... and the request timeout header against a slow host (0.6 s)
    "router_timeout_headers": (("slow",), {"timeout": "3s"}, {}),
    # default HCM: Envoy 1.40 has no internal address ranges, every request is external
    "router_headers_external": (("fail", "fail"), {"timeout": "3s"}, {}),
    # internal by x-forwarded-for (use_remote_address false): a single XFF address in 10/8
    "router_headers_xff": (("fail", "fail"), {"timeout": "3s"}, {}),
}

# HttpConnectionManager options per scenario, on both sides (Envoy's socket listener, meshcore's
# API listener): which requests are internal (source/common/http/conn_manager_utility.cc).
LOOPBACK_INTERNAL = {"use_remote_address": True,
                     "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]}}
HCM_OPTIONS: Dict[str, Dict[str, Any]] = {
    "router_retry_headers": LOOPBACK_INTERNAL,
    "router_timeout_headers": LOOPBACK_INTERNAL,
    "router_headers_xff": {"internal_address_config": {"cidr_ranges": [{"address_prefix": "10.0.0.0",
                                                                         "prefix_len": 8}]}},
}


def with_hcm(listener: Any, options: Optional[Dict[str, Any]]) -> Any:
    """``listener`` with ``options`` merged into its HttpConnectionManager (socket or API listener)."""
    if not options:
        return listener
    any_ = (listener.api_listener.api_listener if listener.HasField("api_listener")
            else listener.filter_chains[0].filters[0].typed_config)
    hcm = hcm_pb2.HttpConnectionManager()
    any_.Unpack(hcm)
    json_format.ParseDict(options, hcm)
    any_.Pack(hcm)
    return listener

# Request headers per request (cycled) for the router-header scenarios: Envoy honours them for
# internal requests, which an application's requests to its sidecar are
# (source/common/router/retry_state_impl.cc, router.cc FilterUtility::finalTimeout).
ROUTER_HEADERS: Dict[str, List[Dict[str, str]]] = {
    "router_retry_headers": [
        {},                                                                  # no policy: no retry
        {"x-envoy-retry-on": "5xx"},                                         # default 1 retry
        {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "3"},             # 3 retries
        {"x-envoy-max-retries": "3"},                                        # no condition: none
        {"x-envoy-retry-on": "retriable-status-codes", "x-envoy-retriable-status-codes": "503"},
        {"x-envoy-retry-on": "bogus"},                                       # unknown: none
        {"x-envoy-retry-on": "gateway-error", "x-envoy-max-retries": "x"},   # invalid count: 1
    ],
    "router_timeout_headers": [
        {"x-envoy-upstream-rq-timeout-ms": "200"},   # 504 after 0.2 s
        {"x-envoy-upstream-rq-timeout-ms": "abc"},   # invalid: the route's 3 s
        {},
    ],
    "router_headers_external": [{"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "2"},
                                {"x-envoy-retry-on": "5xx", "x-forwarded-for": "10.0.0.1"}],
    "router_headers_xff": [
        {"x-envoy-retry-on": "5xx"},                                                # no XFF: external
        {"x-envoy-retry-on": "5xx", "x-forwarded-for": "10.0.0.1"},                 # internal: 1 retry
        {"x-envoy-retry-on": "5xx", "x-forwarded-for": "10.0.0.1, 10.0.0.2"},       # two: external
        {"x-envoy-retry-on": "5xx", "x-forwarded-for": "8.8.8.8"},                  # not listed
        {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "2", "x-forwarded-for": " 10.1.2.3 "},  # 2
    ],
}

FAULTS: Dict[str, Dict[str, Any]] = {
    "fault_headers": {"abort": {"header_abort": {}, "percentage": {"numerator": 100}},
                      "delay": {"header_delay": {}, "percentage": {"numerator": 100}}},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_resilience_matches_envoy(scenario: str) -> None:
    modes, route, cluster_extra = SCENARIOS[scenario]
    filters = fault_filters(FAULTS.get(scenario))
    cycle = FAULT_HEADERS if scenario == "fault_headers" else ROUTER_HEADERS.get(scenario, [{}])
    n_requests = {"fault_headers": 16, "router_retry_headers": 14, "router_timeout_headers": 6,
                  "router_headers_external": 4, "router_headers_xff": 10}.get(scenario, 12)
    hcm_options = HCM_OPTIONS.get(scenario)
    headers = [cycle[i % len(cycle)] for i in range(n_requests)]
    results: Dict[str, Dict[str, Any]] = {}
    for side in ("envoy", "meshcore"):
        ups = [Upstream(f"u{i}", m, delay=0.6) for i, m in enumerate(modes)]
        try:
            res = resources([u.port for u in ups], route, cluster_extra)
            with ControlPlane() as cp:
                if side == "envoy":
                    cp.set_resources([with_hcm(b.http_listener("ingress", 0, route_config_name="r",
                                                               stat_prefix="ingress", filters=filters), hcm_options),
                                      *[m for t in res.values() for m in t.values()]])
                    with AdsEnvoy(cp.port, "GRPC", "envoy-resilience") as envoy:
                        port = _until(lambda: envoy.listener_port("ingress"), "listener", envoy, cp)
                        outcomes = [envoy_get(port, h) for h in headers]
                        stats = envoy_stats(envoy)
                        retries = stats.get("upstream_rq_retry", 0)
                        ejections = stats.get("outlier_detection.ejections_enforced_total", 0)
                        overflows = stats.get("upstream_rq_retry_overflow", 0)
                else:
                    cp.set_resources([with_hcm(b.api_listener(TARGET, route_config_name="r", filters=filters),
                                               hcm_options),
                                      *[m for t in res.values() for m in t.values()]])
                    boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}]}],
                            "node": {"id": "mesh-resilience"}}
                    with meshcore.Mesh(boot, backoff=Backoff(0.05, 1.6, 0.2, 0.5)) as mesh:
                        mesh.wait_ready(TARGET, timeout=10)
                        outcomes = [mesh_get(mesh, h) for h in headers]
                        st = mesh.stats()["shop"]
                        retries = st.get("upstream_rq_retry", 0)
                        ejections = st.get("outlier_detection.ejections_enforced_total", 0)
                        overflows = st.get("upstream_rq_retry_overflow", 0)
            results[side] = {"statuses": [s for s, _ in outcomes], "max_time": max(t for _, t in outcomes),
                             "delayed": [t > 0.2 for _, t in outcomes], "retries": retries,
                             "ejections": ejections, "overflows": overflows, "hits": [u.hits for u in ups]}
        finally:
            for u in ups:
                u.close()
    envoy, ours = results["envoy"], results["meshcore"]
    where = f"{scenario}: envoy {envoy} meshcore {ours}"
    assert ours["statuses"] == envoy["statuses"], where
    assert ours["ejections"] == envoy["ejections"], where
    if scenario == "retry_and_eject":
        # both eject the failing host after 3 consecutive 5xx: it saw exactly 3 requests, each retried
        assert envoy["hits"][0] == ours["hits"][0] == 3 and envoy["retries"] == ours["retries"] == 3, where
    elif scenario == "retries_exhausted":
        assert envoy["retries"] == ours["retries"] == 2 * n_requests, where
    elif scenario == "per_try_timeout":
        # the round-robin start differs run to run: compare the invariant, one retry per slow pick
        assert ours["retries"] == ours["hits"][0] and envoy["retries"] == envoy["hits"][0], where
        assert envoy["max_time"] < 0.58 and ours["max_time"] < 0.58, where  # the slow host takes 0.6 s
    elif scenario == "retry_budget":
        assert envoy["retries"] == ours["retries"] == 0, where
        assert envoy["overflows"] == ours["overflows"] == n_requests, where
    elif scenario == "router_retry_headers":
        assert envoy["retries"] == ours["retries"] == 2 * (1 + 3 + 1 + 1), where
        assert envoy["hits"] == ours["hits"] == [13, 13], where  # 14 requests + 12 retries, round robin
    elif scenario == "router_headers_external":
        assert envoy["retries"] == ours["retries"] == 0, where
    elif scenario == "router_headers_xff":
        assert envoy["retries"] == ours["retries"] == 2 * (1 + 2), where
    elif scenario == "router_timeout_headers":
        assert envoy["statuses"] == [504, 200, 200] * 2, where
    elif scenario == "fault_headers":
        assert ours["delayed"] == envoy["delayed"], where  # the 250 ms header delay, same requests
        assert sum(envoy["delayed"]) == 2 and set(envoy["statuses"]) == {200, 429, 503}, where
    else:
        assert 0.18 < ours["max_time"] < 0.58 and 0.18 < envoy["max_time"] < 0.58, where
