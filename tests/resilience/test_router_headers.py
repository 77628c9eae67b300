"""The router's x-envoy-* request headers and Envoy's internal-request rule (unit level; the
end-to-end comparison with a real Envoy is tests/interop/test_resilience_vs_envoy.py)."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from meshcore._route_model import RetryPolicy
from meshcore.resilience.router_headers import apply_router_headers, is_internal_request, router_headers_of
from meshcore.xds.model import ListenerSpec


def listener(use_remote_address=False, hops=0, cidrs=("10.0.0.0/8",)):
    return ListenerSpec("l", "r", None, use_remote_address=use_remote_address, xff_num_trusted_hops=hops,
                        internal_cidrs=tuple(ipaddress.ip_network(c) for c in cidrs))


def test_router_headers_are_found_case_insensitively_and_repeats_joined():
    assert router_headers_of({"Accept": "*/*", "Host": "x"}) is None
    assert router_headers_of([("X-Envoy-Retry-On", "5xx"), ("x-envoy-retry-on", "reset"), (b"x", b"y")]) == {
        "x-envoy-retry-on": "5xx,reset"}
    assert router_headers_of({"x-envoy-upstream-rq-timeout-ms": 250}) == {"x-envoy-upstream-rq-timeout-ms": "250"}


@pytest.mark.parametrize("found,policy,timeout", [
    # Envoy RetryStateImpl: no route policy + x-envoy-retry-on -> RetryPolicyImpl defaults (1 retry)
    ({"x-envoy-retry-on": "5xx"}, RetryPolicy(retry_on=("5xx",), num_retries=1), 2.0),
    ({"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "4"}, RetryPolicy(retry_on=("5xx",), num_retries=4), 2.0),
    # max-retries only counts when some retry condition is set
    ({"x-envoy-max-retries": "4"}, None, 2.0),
    ({"x-envoy-retry-on": "nonsense", "x-envoy-max-retries": "4"}, RetryPolicy(retry_on=("nonsense",)), 2.0),
    ({"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "-1"}, RetryPolicy(retry_on=("5xx",)), 2.0),
    # router.cc finalTimeout: the timeout header replaces the route's; 0 disables; junk is ignored
    ({"x-envoy-upstream-rq-timeout-ms": "250"}, None, 0.25),
    ({"x-envoy-upstream-rq-timeout-ms": "0"}, None, None),
    ({"x-envoy-upstream-rq-timeout-ms": "1.5"}, None, 2.0),
    ({"x-envoy-upstream-rq-per-try-timeout-ms": "100"}, RetryPolicy(per_try_timeout=0.1), 2.0),
    ({"x-envoy-retry-grpc-on": "unavailable", "x-envoy-retriable-status-codes": "503, 418,x"},
     RetryPolicy(retry_on=("unavailable",), retriable_status_codes=(503, 418)), 2.0),
])
def test_apply_router_headers(found, policy, timeout):
    assert apply_router_headers(None, 2.0, found) == (policy, timeout)


def test_headers_add_to_the_route_policy():
    route = RetryPolicy(retry_on=("gateway-error",), num_retries=2, retriable_status_codes=(409,), base_interval=0.1)
    policy, _ = apply_router_headers(route, None, {"x-envoy-retry-on": "reset",
                                                   "x-envoy-retriable-status-codes": "500"})
    assert policy == RetryPolicy(retry_on=("gateway-error", "reset"), num_retries=2,
                                 retriable_status_codes=(409, 500), base_interval=0.1)
    assert route.retry_on == ("gateway-error",)  # the route's own policy is untouched


@pytest.mark.parametrize("spec,headers,source_ip,internal", [
    # Envoy 1.40 (conn_manager_utility.cc): no internal_address_config -> nothing is internal
    (listener(cidrs=()), {"x-forwarded-for": "10.0.0.1"}, None, False),
    (listener(), {"x-forwarded-for": "10.0.0.1"}, None, True),
    (listener(), {"x-forwarded-for": " 10.0.0.1 "}, None, True),
    (listener(), {"x-forwarded-for": "10.0.0.1,10.0.0.2"}, None, False),  # not a single address
    (listener(), [("x-forwarded-for", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")], None, False),
    (listener(), {"x-forwarded-for": "8.8.8.8"}, None, False),
    (listener(), {"x-forwarded-for": "junk"}, None, False),
    (listener(), {}, None, False),  # use_remote_address false and no XFF: external
    (listener(hops=1), {"x-forwarded-for": "10.0.0.1"}, None, False),  # a skipped hop is never single
    # use_remote_address: the caller's own address (loopback unless source_ip), and no XFF
    (listener(True, cidrs=("127.0.0.0/8",)), {}, None, True),
    (listener(True, cidrs=("127.0.0.0/8",)), {"x-forwarded-for": "127.0.0.1"}, None, False),
    (listener(True, cidrs=("127.0.0.0/8",)), {}, "10.1.1.1", False),
    (listener(True, 2, cidrs=("10.0.0.0/8",)), None, "10.1.1.1", True),
    (listener(True, cidrs=("fd00::/8",)), [], "fd00::1", True),
])
def test_internal_requests(spec, headers, source_ip, internal):
    assert is_internal_request(spec, headers, source_ip) is internal


def test_cidr_ranges_decoded_and_validated():
    from meshcore.errors import ConfigError
    from meshcore.xds.listener_config import listener_spec

    HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

    def lis(cidrs):
        return {"name": "t", "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "r"},
            "use_remote_address": True, "xff_num_trusted_hops": 1,
            "internal_address_config": {"cidr_ranges": cidrs},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}

    spec = listener_spec(lis([{"address_prefix": "10.1.2.3", "prefix_len": 8}]))
    assert spec.use_remote_address and spec.xff_num_trusted_hops == 1
    assert spec.internal_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ConfigError) as e:
        listener_spec(lis([{"address_prefix": "10.1.2", "prefix_len": 8}]))
    assert e.value.field.endswith("internal_address_config.cidr_ranges[0].address_prefix")
    with pytest.raises(ConfigError) as e:
        listener_spec(lis([{"address_prefix": "10.0.0.0", "prefix_len": 33}]))
    assert e.value.field.endswith("internal_address_config.cidr_ranges[0].prefix_len")


@pytest.mark.parametrize("shape", [dict, list, tuple, "items"])
def test_both_request_paths_apply_router_headers(tmp_path, mesh_cls, shape):
    """The compiled request path pre-scans dicts and lists of pairs in C; every shape gives the
    same timeouts and retry policy as the pure path."""
    HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    data = {
        "listeners": [{"name": "svc.local:80", "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "r"},
            "use_remote_address": True,
            "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}],
        "routes": [{"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "c", "timeout": "5s"}}]}]}],
        "clusters": [{"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.1",
                                                                           "port_value": 80}}}}]}]}}],
    }
    path = os.path.join(str(tmp_path), "r.json")
    with open(path, "w") as f:
        json.dump(data, f)
    pairs = [("Accept", "*/*"), ("X-Envoy-Upstream-Rq-Timeout-Ms", "300"), ("x-envoy-retry-on", "5xx")]
    headers = {"dict": dict(pairs), "list": list(pairs), "tuple": tuple(pairs), "items": dict(pairs).items()}[
        shape if isinstance(shape, str) else shape.__name__]
    with mesh_cls.from_file(path, watch=False) as mesh:
        mesh.wait_ready("svc.local:80", timeout=5)
        call = mesh.request("http://svc.local/", headers=headers)
        assert call.deadline - call.started == pytest.approx(0.3)
        assert call.retry_policy.retry_on == ("5xx",) and call.retry_policy.num_retries == 1
        plain = mesh.request("http://svc.local/", headers={"accept": "*/*"})
        assert plain.deadline - plain.started == pytest.approx(5.0) and plain.retry_policy is None
        external = mesh.request("http://svc.local/", headers={**dict(pairs), "x-forwarded-for": "127.0.0.1"})
        assert external.deadline - external.started == pytest.approx(5.0)  # XFF present: external
