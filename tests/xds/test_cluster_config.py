"""``meshcore.xds.cluster_config.cluster_spec``: every rule, the real Istio and Envoy Gateway
clusters in tests/fixtures, Istio's proxyless (grpcgen) shapes, and a differential test against
Envoy 1.40 (``envoy --mode validate``; see decoder_support.py) with the documented differences.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict, List, Sequence

import pytest
from google.protobuf import any_pb2, json_format

from envoy.config.cluster.v3 import cluster_pb2
from meshcore import ConfigError, Endpoint, HealthStatus
from meshcore.xds.cluster_config import cluster_spec
from meshcore.xds.lb_config import cluster_lb_arguments, load_balancer_arguments
from meshcore._route_model import StringMatchSpec
from meshcore.xds.model import (
    CertificateRef,
    CircuitBreakers,
    ClusterSpec,
    OutlierDetectionSpec,
    SanMatcherSpec,
    TransportSocketMatchSpec,
    UpstreamTlsSpec,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_support import (  # noqa: E402
    AGGREGATE, HPO_NAME, RAW_BUFFER, TLS, TYPE, UDPA_TYPED_STRUCT, XDS_TYPED_STRUCT, Case, bootstrap,
    check_documented, check_envoy, check_meshcore, envoy_verdicts, lb_endpoint, load_json, load_yaml,
    resources, runs,
)

CLUSTER = "envoy.config.cluster.v3.Cluster"
NAME = "outbound|9080||reviews.default.svc.cluster.local"
UINT32_MAX = 0xFFFFFFFF


def eds(name: str = NAME, **fields: Any) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, **fields}


def static(name: str, *addresses: str, type_: str = "STATIC", **fields: Any) -> Dict[str, Any]:
    return {"name": name, "type": type_, "load_assignment": {"cluster_name": name, "endpoints": [
        {"lb_endpoints": [lb_endpoint(a, 8080 + i) for i, a in enumerate(addresses)]}]}, **fields}


def aggregate(name: str, children: List[str], **fields: Any) -> Dict[str, Any]:
    return {"name": name, "cluster_type": {"name": "envoy.clusters.aggregate",
                                           "typed_config": {"@type": AGGREGATE, "clusters": children}}, **fields}


def tls_socket(common: Dict[str, Any], **ctx: Any) -> Dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": TLS, "common_tls_context": common, **ctx}}


def hpo(value: Dict[str, Any], key: str = HPO_NAME) -> Dict[str, Any]:
    return {key: {"@type": TYPE + HPO_NAME, **value}}


def error_of(config: Any) -> tuple:
    with pytest.raises(ConfigError) as info:
        cluster_spec(config)
    return info.value.resource, info.value.field


ROOTS = {"instance_name": "default", "certificate_name": "ROOTCA"}
IDENTITY = {"instance_name": "default", "certificate_name": "default"}
SPIFFE = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def istio_mutual(sans: Sequence[str] = (SPIFFE,), legacy: bool = True, current: bool = True) -> Dict[str, Any]:
    """The UpstreamTlsContext Istio's grpcgen builds for ISTIO_MUTUAL (pilot/pkg/networking/grpcgen:
    ``buildCommonTLSContext``): current fields, the deprecated ones older gRPC reads, or both."""
    common: Dict[str, Any] = {}
    combined: Dict[str, Any] = {"default_validation_context": {"match_subject_alt_names": [{"exact": s} for s in sans]}}
    if current:
        common["tls_certificate_provider_instance"] = IDENTITY
        combined["default_validation_context"]["ca_certificate_provider_instance"] = ROOTS
    if legacy:
        common["tls_certificate_certificate_provider_instance"] = IDENTITY
        combined["validation_context_certificate_provider_instance"] = ROOTS
    common["combined_validation_context"] = combined
    return tls_socket(common)


# -- kinds ---------------------------------------------------------------------------------------


def test_eds_cluster_defaults() -> None:
    spec = cluster_spec(eds())
    assert spec == ClusterSpec(name=NAME, kind="EDS", eds_service_name=NAME)
    assert spec.endpoints is None and spec.connect_timeout == 5.0 and spec.circuit_breakers == CircuitBreakers()
    assert spec.outlier_detection is None and spec.tls is None and not spec.http2


def test_eds_service_name_and_self_source() -> None:
    spec = cluster_spec(eds(eds_cluster_config={"eds_config": {"self": {}}, "service_name": "other"}))
    assert spec.eds_service_name == "other"


@pytest.mark.parametrize("eds_cluster_config, field", [
    (None, "eds_cluster_config"),
    ({}, "eds_cluster_config.eds_config"),
    ({"eds_config": {"path_config_source": {"path": "/x"}}}, "eds_cluster_config.eds_config.path_config_source"),
    ({"eds_config": {"api_config_source": {"api_type": "GRPC"}}}, "eds_cluster_config.eds_config.api_config_source"),
])
def test_eds_config_source_must_be_ads_or_self(eds_cluster_config: Any, field: str) -> None:
    config = eds()
    if eds_cluster_config is None:
        del config["eds_cluster_config"]
    else:
        config["eds_cluster_config"] = eds_cluster_config
    assert error_of(config) == (NAME, field)


def test_xdstp_eds_cluster_needs_service_name() -> None:
    name = "xdstp://authority/envoy.config.cluster.v3.Cluster/c"
    assert error_of(eds(name)) == (name, "eds_cluster_config.service_name")


def test_static_and_dns_clusters_use_the_inline_assignment() -> None:
    spec = cluster_spec(static("s", "10.0.0.1", "10.0.0.2"))
    assert spec.kind == "STATIC" and spec.eds_service_name == ""
    assert [e.key for e in spec.endpoints] == ["10.0.0.1:8080", "10.0.0.2:8081"]
    assert all(e.hostname == "" for e in spec.endpoints)
    dns = cluster_spec(static("d", "a.example", "b.example", type_="STRICT_DNS"))
    assert dns.kind == "STRICT_DNS" and [e.hostname for e in dns.endpoints] == ["a.example", "b.example"]
    logical = cluster_spec(static("l", "a.example", type_="LOGICAL_DNS"))
    assert logical.kind == "LOGICAL_DNS" and len(logical.endpoints) == 1
    assert cluster_spec({"name": "empty", "type": "STRICT_DNS"}).endpoints == ()
    assert cluster_spec({"name": "default-type"}).kind == "STATIC"  # proto default


def test_inline_assignment_errors_name_the_cluster() -> None:
    assert error_of(static("s", "not-an-ip")) == (
        "s", "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address")
    assert error_of(static("l", "a.example", "b.example", type_="LOGICAL_DNS")) == ("l", "load_assignment.endpoints")
    assert error_of({"name": "l", "type": "LOGICAL_DNS"}) == ("l", "load_assignment")
    config = static("s", "10.0.0.1")
    config["load_assignment"]["policy"] = {"overprovisioning_factor": 0}
    assert error_of(config) == ("s", "load_assignment.policy.overprovisioning_factor")


def test_inline_assignment_options() -> None:
    config = static("s", "10.0.0.1")
    config["load_assignment"]["policy"] = {"overprovisioning_factor": 200, "weighted_priority_health": True}
    spec = cluster_spec(config)
    assert spec.endpoint_options == (("overprovisioning_factor", 200), ("weighted_priority_health", True))


def test_aggregate_cluster() -> None:
    spec = cluster_spec(aggregate("agg", ["primary", "secondary", "primary"], lb_policy="CLUSTER_PROVIDED"))
    assert spec.kind == "AGGREGATE"
    assert spec.aggregate_clusters == ("primary", "secondary")  # duplicates keep their first place
    assert spec.policy == "CLUSTER_PROVIDED" and spec.endpoints is None and spec.eds_service_name == ""
    # gRPC control planes leave lb_policy at its default; accepted (Envoy requires CLUSTER_PROVIDED).
    assert cluster_spec(aggregate("agg", ["a"])).policy == "CLUSTER_PROVIDED"


def test_aggregate_cluster_type_is_found_by_its_config_type() -> None:
    config = aggregate("agg", ["a"])
    config["cluster_type"]["name"] = "any.name"
    assert cluster_spec(config).aggregate_clusters == ("a",)
    wrapped = aggregate("agg", [])
    wrapped["cluster_type"]["typed_config"] = {"@type": XDS_TYPED_STRUCT, "type_url": AGGREGATE,
                                               "value": {"clusters": ["x", "y"]}}
    assert cluster_spec(wrapped).aggregate_clusters == ("x", "y")


@pytest.mark.parametrize("config, field", [
    (aggregate("agg", []), "cluster_type.typed_config.clusters"),
    ({"name": "agg", "cluster_type": {"name": "envoy.clusters.aggregate"}}, "cluster_type.typed_config.clusters"),
    (aggregate("agg", ["a"], lb_policy="RING_HASH"), "lb_policy"),
    (aggregate("agg", ["a"], load_balancing_policy={"policies": [{"typed_extension_config": {
        "name": "rr",
        "typed_config": {"@type": TYPE + "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}}}]}),
     "load_balancing_policy"),
    ({"name": "agg", "cluster_type": {"name": "envoy.clusters.redis"}}, "cluster_type"),
    ({"name": "agg", "cluster_type": {"name": "x", "typed_config": {
        "@type": TYPE + "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"}}}, "cluster_type"),
    ({"name": "o", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}, "type"),
    ({"name": "", "type": "EDS"}, "name"),
])
def test_cluster_kind_errors(config: Dict[str, Any], field: str) -> None:
    assert error_of(config)[1] == field


def test_unknown_cluster_type_enum_from_binary() -> None:
    msg = cluster_pb2.Cluster(name="c")
    msg.type = 17  # not a DiscoveryType (proto3 enums are open)
    assert error_of(msg) == ("c", "type")


# -- load balancing -------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {},
    {"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 3}},
    {"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": 64, "maximum_ring_size": 4096}},
    {"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 5}},
    {"common_lb_config": {"healthy_panic_threshold": {"value": 0}, "locality_weighted_lb_config": {}}},
    {"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": "x", "typed_config": {
        "@type": TYPE + "envoy.extensions.load_balancing_policies.random.v3.Random"}}}]}},
])
def test_lb_policy_matches_cluster_lb_arguments(fields: Dict[str, Any]) -> None:
    config = eds(**fields)
    spec = cluster_spec(config)
    policy, options = cluster_lb_arguments(config)
    assert (spec.policy, spec.lb_options) == (policy, tuple(sorted(options.items())))
    _, policy2, options2 = load_balancer_arguments(config)
    assert (policy2, options2) == (policy, options)


def test_lb_errors_keep_lb_config_paths() -> None:
    assert error_of(eds(lb_policy="LEAST_REQUEST", least_request_lb_config={"choice_count": 1})) == (
        NAME, "least_request_lb_config.choice_count")
    assert error_of(eds(lb_policy="CLUSTER_PROVIDED")) == (NAME, "lb_policy")


# -- timeouts, breakers, outlier detection ------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("0.25s", 0.25), ("10s", 10.0), ("0.000000001s", 1e-9),
                                             ("9223372035.999999999s", 9223372035.999999999)])
def test_connect_timeout(value: str, expected: float) -> None:
    assert cluster_spec(eds(connect_timeout=value)).connect_timeout == pytest.approx(expected)


@pytest.mark.parametrize("value", ["-1s", "0s", "-0.5s", "9223372036s"])
def test_connect_timeout_errors(value: str) -> None:
    assert error_of(eds(connect_timeout=value)) == (NAME, "connect_timeout")


def test_connect_timeout_invalid_nanos_from_binary() -> None:
    msg = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.EDS)
    msg.eds_cluster_config.eds_config.ads.SetInParent()
    msg.connect_timeout.seconds, msg.connect_timeout.nanos = 1, 1_000_000_000
    assert error_of(msg) == ("c", "connect_timeout")


def test_circuit_breakers() -> None:
    spec = cluster_spec(eds(circuit_breakers={"thresholds": [
        {"priority": "HIGH", "max_requests": 1},
        {"max_connections": 10, "max_requests": 20, "retry_budget": {"budget_percent": {"value": 50}}},
        {"max_connections": 99},  # a second DEFAULT entry: Envoy uses the first
    ]}))
    assert spec.circuit_breakers == CircuitBreakers(max_connections=10, max_pending_requests=1024,
                                                    max_requests=20, max_retries=3, retry_budget=(50.0, 3))
    default_budget = cluster_spec(eds(circuit_breakers={"thresholds": [{"retry_budget": {}}]}))
    assert default_budget.circuit_breakers.retry_budget == (20.0, 3)
    only_high = cluster_spec(eds(circuit_breakers={"thresholds": [{"priority": "HIGH", "max_requests": 1}]}))
    assert only_high.circuit_breakers == CircuitBreakers()
    assert error_of(eds(circuit_breakers={"thresholds": [{"retry_budget": {"budget_percent": {"value": 100.5}}}]})) == (
        NAME, "circuit_breakers.thresholds[0].retry_budget.budget_percent.value")
    msg = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    msg.circuit_breakers.thresholds.add().priority = 5
    assert error_of(msg) == ("c", "circuit_breakers.thresholds[0].priority")


def test_outlier_detection_defaults_and_values() -> None:
    assert cluster_spec(eds(outlier_detection={})).outlier_detection == OutlierDetectionSpec()
    values = {
        "consecutive_5xx": 7, "consecutive_gateway_failure": 3, "consecutive_local_origin_failure": 2,
        "interval": "1.5s", "base_ejection_time": "20s", "max_ejection_time": "60s",
        "max_ejection_time_jitter": "0s", "max_ejection_percent": 100, "enforcing_consecutive_5xx": 0,
        "enforcing_consecutive_gateway_failure": 100, "enforcing_consecutive_local_origin_failure": 1,
        "enforcing_success_rate": 2, "enforcing_local_origin_success_rate": 3, "enforcing_failure_percentage": 4,
        "enforcing_failure_percentage_local_origin": 5, "success_rate_minimum_hosts": 6,
        "success_rate_request_volume": 7, "success_rate_stdev_factor": 8, "failure_percentage_threshold": 9,
        "failure_percentage_minimum_hosts": 10, "failure_percentage_request_volume": 11,
        "split_external_local_origin_errors": True, "successful_active_health_check_uneject_host": False,
        "always_eject_one_host": True,
    }
    spec = cluster_spec(eds(outlier_detection=values)).outlier_detection
    expected = {k: v for k, v in values.items()}
    expected.update(interval=1.5, base_ejection_time=20.0, max_ejection_time=60.0, max_ejection_time_jitter=0.0)
    assert spec == OutlierDetectionSpec(**expected)
    # every model field is decoded (a new field in the model needs a decoder entry)
    assert set(values) == set(OutlierDetectionSpec.__dataclass_fields__)  # type: ignore[attr-defined]


def test_outlier_detection_unset_max_ejection_time_follows_base() -> None:
    od = cluster_spec(eds(outlier_detection={"base_ejection_time": "400s"})).outlier_detection
    assert od is not None and od.max_ejection_time == 400.0
    od = cluster_spec(eds(outlier_detection={"base_ejection_time": "1s"})).outlier_detection
    assert od is not None and od.max_ejection_time == 300.0


@pytest.mark.parametrize("od, field", [
    ({"interval": "0s"}, "outlier_detection.interval"),
    ({"base_ejection_time": "0s"}, "outlier_detection.base_ejection_time"),
    ({"max_ejection_time": "0s"}, "outlier_detection.max_ejection_time"),
    ({"max_ejection_time": "10s"}, "outlier_detection.max_ejection_time"),  # < default base 30 s
    ({"base_ejection_time": "400s", "max_ejection_time": "300s"}, "outlier_detection.max_ejection_time"),
    ({"max_ejection_time_jitter": "-1s"}, "outlier_detection.max_ejection_time_jitter"),
    ({"interval": "-1s"}, "outlier_detection.interval"),
    ({"max_ejection_percent": 101}, "outlier_detection.max_ejection_percent.value"),
    ({"enforcing_consecutive_5xx": 101}, "outlier_detection.enforcing_consecutive_5xx.value"),
    ({"enforcing_consecutive_gateway_failure": 101}, "outlier_detection.enforcing_consecutive_gateway_failure.value"),
    ({"enforcing_consecutive_local_origin_failure": 101},
     "outlier_detection.enforcing_consecutive_local_origin_failure.value"),
    ({"enforcing_success_rate": 101}, "outlier_detection.enforcing_success_rate.value"),
    ({"enforcing_local_origin_success_rate": 101}, "outlier_detection.enforcing_local_origin_success_rate.value"),
    ({"enforcing_failure_percentage": 101}, "outlier_detection.enforcing_failure_percentage.value"),
    ({"enforcing_failure_percentage_local_origin": 101},
     "outlier_detection.enforcing_failure_percentage_local_origin.value"),
    ({"failure_percentage_threshold": 101}, "outlier_detection.failure_percentage_threshold.value"),
])
def test_outlier_detection_errors(od: Dict[str, Any], field: str) -> None:
    assert error_of(eds(outlier_detection=od)) == (NAME, field)


def test_outlier_detection_unbounded_counts_are_fine() -> None:
    od = cluster_spec(eds(outlier_detection={"consecutive_5xx": UINT32_MAX, "success_rate_stdev_factor": 10**9}))
    assert od.outlier_detection is not None and od.outlier_detection.consecutive_5xx == UINT32_MAX


# -- TLS ------------------------------------------------------------------------------------------


# Every TLS rule (identity, roots, SAN matchers, tls_params, transport_socket_matches, the
# bootstrap's certificate providers) is tested in test_cluster_tls.py.


def test_tls_summary() -> None:
    spec = cluster_spec(eds(transport_socket=istio_mutual()))
    assert spec.tls == UpstreamTlsSpec(
        identity=CertificateRef("provider", "default", "default"), roots=CertificateRef("provider", "default", "ROOTCA"),
        san_matchers=(SanMatcherSpec("", StringMatchSpec("exact", SPIFFE)),))
    raw = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}
    assert cluster_spec(eds(transport_socket=raw)).tls is None
    assert error_of(eds(transport_socket=tls_socket({}))) == (NAME, "transport_socket.typed_config.common_tls_context")


# -- protocol options, names --------------------------------------------------------------------


@pytest.mark.parametrize("fields, http2", [
    ({}, False),
    ({"typed_extension_protocol_options": hpo({"explicit_http_config": {"http2_protocol_options": {}}})}, True),
    ({"typed_extension_protocol_options": hpo({"explicit_http_config": {"http2_protocol_options": {}}},
                                              key="envoy.upstreams.http.http_protocol_options")}, True),
    ({"typed_extension_protocol_options": hpo({"explicit_http_config": {"http_protocol_options": {}}})}, False),
    ({"typed_extension_protocol_options": hpo({"use_downstream_protocol_config": {}})}, False),
    ({"typed_extension_protocol_options": hpo({"auto_config": {}})}, False),
    ({"typed_extension_protocol_options": {"envoy.filters.network.tcp_proxy": {"@type": RAW_BUFFER}}}, False),
    ({"typed_extension_protocol_options": {HPO_NAME: {
        "@type": XDS_TYPED_STRUCT, "type_url": TYPE + HPO_NAME,
        "value": {"explicit_http_config": {"http2_protocol_options": {}}}}}}, True),
    ({"http2_protocol_options": {}}, True),  # deprecated cluster field
])
def test_http2(fields: Dict[str, Any], http2: bool) -> None:
    assert cluster_spec(eds(**fields)).http2 is http2


@pytest.mark.parametrize("value, field", [
    ({}, f"typed_extension_protocol_options[{HPO_NAME}]"),
    ({"explicit_http_config": {}}, f"typed_extension_protocol_options[{HPO_NAME}].explicit_http_config"),
    ({"explicit_http_config": {"http3_protocol_options": {}}},
     f"typed_extension_protocol_options[{HPO_NAME}].explicit_http_config.http3_protocol_options"),
])
def test_http_protocol_options_errors(value: Dict[str, Any], field: str) -> None:
    assert error_of(eds(typed_extension_protocol_options=hpo(value))) == (NAME, field)
    wrong = {HPO_NAME: {"@type": RAW_BUFFER}}
    assert error_of(eds(typed_extension_protocol_options=wrong)) == (
        NAME, f"typed_extension_protocol_options[{HPO_NAME}]")


def test_alt_stat_name_and_hashable_spec() -> None:
    spec = cluster_spec(eds(alt_stat_name="reviews", lb_policy="RING_HASH",
                            ring_hash_lb_config={"minimum_ring_size": 64}))
    assert spec.alt_stat_name == "reviews"
    assert spec.lb_options == (("minimum_ring_size", 64),)
    assert hash(spec) == hash(cluster_spec(copy.deepcopy(eds(alt_stat_name="reviews", lb_policy="RING_HASH",
                                                                 ring_hash_lb_config={"minimum_ring_size": 64}))))


def test_message_any_and_camel_case_inputs_agree() -> None:
    config = eds(connect_timeout="2s", transport_socket=istio_mutual(),
                 outlier_detection={"interval": "3s", "max_ejection_percent": 50})
    msg = json_format.ParseDict(config, cluster_pb2.Cluster())
    packed = any_pb2.Any()
    packed.Pack(msg)
    camel = json_format.MessageToDict(msg)  # camelCase keys
    assert "connectTimeout" in camel
    assert cluster_spec(msg) == cluster_spec(packed) == cluster_spec(config) == cluster_spec(camel)


def test_unknown_top_level_field_is_an_error() -> None:
    assert error_of({**eds(), "bogus": 1}) == (NAME, "bogus")


# -- fixtures -------------------------------------------------------------------------------------


def test_istio_config_dump_clusters() -> None:
    clusters = {c["name"]: c for c in resources(load_json("istio/config_dump.json"), CLUSTER)}
    assert set(clusters) == {"agent", "prometheus_stats", "inbound-vip|8000|http|httpbin.default.svc.cluster.local"}
    agent = cluster_spec(clusters["agent"])
    assert (agent.kind, agent.connect_timeout) == ("STATIC", 0.25)
    assert agent.endpoints == (Endpoint("127.0.0.1", 15020, health=HealthStatus.UNKNOWN),)
    assert [e.key for e in cluster_spec(clusters["prometheus_stats"]).endpoints] == ["127.0.0.1:15000"]
    # A waypoint's cluster to Envoy's internal listener: its transport socket is internal_upstream,
    # which only exists inside an Envoy.
    assert error_of(clusters["inbound-vip|8000|http|httpbin.default.svc.cluster.local"]) == (
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local", "transport_socket.typed_config")


def test_istio_sidecar_subset_cluster() -> None:
    (cluster,) = resources(load_json("istio/http_config.json"), CLUSTER)
    spec = cluster_spec(cluster)
    assert spec.kind == "EDS" and spec.eds_service_name == "outbound|9080|v1|productpage.default.svc.cluster.local"
    assert (spec.policy, spec.lb_options, spec.connect_timeout) == ("LEAST_REQUEST", (), 10.0)
    assert spec.circuit_breakers == CircuitBreakers(UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX)
    assert spec.tls is None  # no transport_socket: SDS-based auto-mTLS through transport_socket_matches
    istio, disabled = spec.transport_socket_matches
    assert istio.match == (("tlsMode", "istio"),) and istio.tls is not None
    assert (istio.tls.identity, istio.tls.roots) == (CertificateRef("sds", "default"), CertificateRef("sds", "ROOTCA"))
    assert disabled == TransportSocketMatchSpec("tlsMode-disabled")


GATEWAY_FILES = ("envoy-gateway/load-balancer.clusters.yaml", "envoy-gateway/http-route-weighted-zones.clusters.yaml")


@pytest.mark.parametrize("path", GATEWAY_FILES)
def test_envoy_gateway_clusters(path: str) -> None:
    clusters = load_yaml(path)
    decoded = 0
    for cluster in clusters:
        try:
            expected = load_balancer_arguments(cluster)
        except ConfigError as e:  # unsupported policy: cluster_spec reports the same error
            assert error_of(cluster) == (e.resource, e.field)
            continue
        spec = cluster_spec(cluster)
        assert (spec.policy, dict(spec.lb_options)) == expected[1:]
        assert spec.kind == "EDS" and spec.eds_service_name
        decoded += 1
    assert decoded >= 2


def test_istio_grpcgen_clusters() -> None:
    # pilot/pkg/networking/grpcgen/cds.go: edsCluster(name) + ISTIO_MUTUAL + ApplyRingHashLoadBalancer
    base = {"name": NAME, "type": "EDS",
            "eds_cluster_config": {"service_name": NAME, "eds_config": {"ads": {}}}}
    assert cluster_spec(base) == ClusterSpec(name=NAME, kind="EDS", eds_service_name=NAME)
    ring = dict(base, lb_policy="RING_HASH", ring_hash_lb_config={"minimum_ring_size": 1024})
    spec = cluster_spec(dict(ring, transport_socket=istio_mutual()))
    assert spec.policy == "RING_HASH" and spec.tls is not None
    assert spec.tls.san_matchers == (SanMatcherSpec("", StringMatchSpec("exact", SPIFFE)),)
    assert (spec.tls.certificate_provider_instance, spec.tls.ca_provider_instance) == ("default", "default")


# -- differential test against Envoy 1.40 ---------------------------------------------------------

NEWTLS = {"tls_certificate_provider_instance": IDENTITY,
          "validation_context": {"ca_certificate_provider_instance": ROOTS}}
SDS = {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
ROOT_SDS = {"name": "ROOTCA", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
SIDECAR_TLS = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
               "alpn_protocols": ["istio-peer-exchange", "istio"], "tls_certificate_sds_secret_configs": [SDS],
               "combined_validation_context": {"default_validation_context": {"match_subject_alt_names": [
                   {"exact": SPIFFE}]}, "validation_context_sds_secret_config": ROOT_SDS}}
RAW = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}
TSC = "transport_socket.typed_config.common_tls_context"


def _cases() -> List[Case]:
    def e(name: str, **fields: Any) -> Dict[str, Any]:
        return eds(name, **fields)

    C = Case
    return [
        # accepted by both
        C("eds", e("eds", eds_cluster_config={"eds_config": {"ads": {}}, "service_name": "svc"})),
        C("static", static("static", "10.0.0.1", "::1", "fe80::1%lo")),
        C("strict-dns", static("strict-dns", "a.example", "b.example", type_="STRICT_DNS")),
        C("strict-dns-empty", {"name": "strict-dns-empty", "type": "STRICT_DNS"}),
        C("logical-dns", static("logical-dns", "a.example", type_="LOGICAL_DNS")),
        C("timeouts", e("timeouts", connect_timeout="9223372035.999999999s",
                        outlier_detection={"interval": "0.000000001s", "max_ejection_time_jitter": "0s"})),
        C("aggregate", aggregate("aggregate", ["eds", "static", "eds"], lb_policy="CLUSTER_PROVIDED")),
        C("aggregate-any-name", dict(aggregate("aggregate-any-name", ["eds"], lb_policy="CLUSTER_PROVIDED"),
                                     cluster_type={"name": "x", "typed_config": {
                                         "@type": AGGREGATE, "clusters": ["eds"]}})),
        C("outlier", e("outlier", outlier_detection={
            "max_ejection_percent": 100, "enforcing_success_rate": 100, "failure_percentage_threshold": 100,
            "base_ejection_time": "400s", "consecutive_5xx": UINT32_MAX})),
        C("breakers", e("breakers", circuit_breakers={"thresholds": [
            {"priority": "HIGH"}, {"max_requests": 1, "retry_budget": {"budget_percent": {"value": 100}}}]})),
        C("tls", e("tls", transport_socket=tls_socket(NEWTLS, sni="a" * 255))),
        C("tls-params", e("tls-params", transport_socket=tls_socket(dict(NEWTLS, tls_params={
            "tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
            "cipher_suites": ["ECDHE-ECDSA-AES128-GCM-SHA256"], "ecdh_curves": ["X25519"]})))),
        C("tls-typed-sans", e("tls-typed-sans", transport_socket=tls_socket(dict(SIDECAR_TLS, combined_validation_context={
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
                {"san_type": "DNS", "matcher": {"safe_regex": {"regex": "[a-z]+\\.example"}}}]},
            "validation_context_sds_secret_config": ROOT_SDS})))),
        C("tls-sds-sidecar", e("tls-sds-sidecar", transport_socket=tls_socket(SIDECAR_TLS, sni="outbound_.9080_._.r"))),
        C("socket-matches", e("socket-matches", transport_socket_matches=[
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls_socket(SIDECAR_TLS)},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": RAW}])),
        C("raw-buffer", e("raw-buffer", transport_socket={"name": "raw", "typed_config": {"@type": RAW_BUFFER}})),
        C("http2", e("http2", typed_extension_protocol_options=hpo(
            {"explicit_http_config": {"http2_protocol_options": {}}}))),
        C("http2-legacy-key", e("http2-legacy-key", typed_extension_protocol_options=hpo(
            {"auto_config": {}}, key="envoy.upstreams.http.http_protocol_options"))),
        C("ring-hash", e("ring-hash", lb_policy="RING_HASH",
                         ring_hash_lb_config={"minimum_ring_size": 8, "maximum_ring_size": 8})),
        C("maglev", e("maglev", lb_policy="MAGLEV", maglev_lb_config={"table_size": 5})),
        C("panic", e("panic", common_lb_config={"healthy_panic_threshold": {"value": 100}})),
        # rejected by both
        C("connect-timeout-negative", e("connect-timeout-negative", connect_timeout="-1s"),
          "connect_timeout", "Expected positive duration"),
        C("connect-timeout-zero", e("connect-timeout-zero", connect_timeout="0s"),
          "connect_timeout", "ConnectTimeout: value must be greater than 0s"),
        C("connect-timeout-huge", e("connect-timeout-huge", connect_timeout="9223372036s"),
          "connect_timeout", "Duration out-of-range"),
        C("outlier-percent", e("outlier-percent", outlier_detection={"max_ejection_percent": 101}),
          "outlier_detection.max_ejection_percent.value",
          "MaxEjectionPercent: value must be less than or equal to 100"),
        C("outlier-interval", e("outlier-interval", outlier_detection={"interval": "0s"}),
          "outlier_detection.interval", "Interval: value must be greater than 0s"),
        C("outlier-max-below-base", e("outlier-max-below-base", outlier_detection={"max_ejection_time": "10s"}),
          "outlier_detection.max_ejection_time", "max_ejection_time cannot be smaller than base_ejection_time"),
        C("outlier-jitter", e("outlier-jitter", outlier_detection={"max_ejection_time_jitter": "-1s"}),
          "outlier_detection.max_ejection_time_jitter", "Expected positive duration"),
        C("retry-budget", e("retry-budget", circuit_breakers={"thresholds": [
            {"retry_budget": {"budget_percent": {"value": 101}}}]}),
          "circuit_breakers.thresholds[0].retry_budget.budget_percent.value", "BudgetPercent"),
        C("aggregate-empty", aggregate("aggregate-empty", [], lb_policy="CLUSTER_PROVIDED"),
          "cluster_type.typed_config.clusters", "value must contain at least 1 item(s)"),
        C("cluster-provided-eds", e("cluster-provided-eds", lb_policy="CLUSTER_PROVIDED"),
          "lb_policy", "cluster provided LB specified but cluster"),
        C("eds-no-config", {"name": "eds-no-config", "type": "EDS"},
          "eds_cluster_config", "cannot create an EDS cluster without an EDS config"),
        C("eds-no-source", {"name": "eds-no-source", "type": "EDS", "eds_cluster_config": {}},
          "eds_cluster_config.eds_config", "Missing config source specifier"),
        C("logical-dns-none", {"name": "logical-dns-none", "type": "LOGICAL_DNS"},
          "load_assignment", "LOGICAL_DNS clusters must have a single host"),
        C("static-hostname", static("static-hostname", "backend.example"),
          "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
          "malformed IP address"),
        C("ring-min-gt-max", e("ring-min-gt-max", lb_policy="RING_HASH",
                               ring_hash_lb_config={"minimum_ring_size": 2048, "maximum_ring_size": 1024}),
          "ring_hash_lb_config.minimum_ring_size", "minimum_ring_size (2048) > maximum_ring_size (1024)"),
        C("maglev-not-prime", e("maglev-not-prime", lb_policy="MAGLEV", maglev_lb_config={"table_size": 100}),
          "maglev_lb_config.table_size", "The table size of maglev must be prime number"),
        C("sni-too-long", e("sni-too-long", transport_socket=tls_socket(NEWTLS, sni="a" * 256)),
          "transport_socket.typed_config.sni", "Sni: value length must be at most 255 bytes"),
        C("tls-two-sds", e("tls-two-sds", transport_socket=tls_socket(dict(
            SIDECAR_TLS, tls_certificate_sds_secret_configs=[SDS, dict(SDS, name="other")]))),
          f"{TSC}.tls_certificate_sds_secret_configs", "Multiple TLS certificates are not supported for client contexts"),
        C("tls-san-no-roots", e("tls-san-no-roots", transport_socket=tls_socket({"validation_context": {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SPIFFE}}]}})),
          f"{TSC}.validation_context", "SAN-based verification of peer certificates without trusted CA"),
        C("tls-allow-expired-no-roots", e("tls-allow-expired-no-roots", transport_socket=tls_socket({
            "validation_context": {"allow_expired_certificate": True}})),
          f"{TSC}.validation_context.allow_expired_certificate", "Certificate validity period is always ignored"),
        C("socket-match-no-name", e("socket-match-no-name", transport_socket_matches=[
            {"match": {}, "transport_socket": RAW}]), "transport_socket_matches[0].name",
          "TransportSocketMatchValidationError.Name: value length must be at least 1"),
        C("socket-match-no-socket", e("socket-match-no-socket", transport_socket_matches=[{"name": "m"}]),
          "transport_socket_matches[0].transport_socket.name", "Didn't find a registered implementation for ''"),
        C("protocol-options-empty", e("protocol-options-empty", typed_extension_protocol_options=hpo({})),
          f"typed_extension_protocol_options[{HPO_NAME}]", "upstream_protocol_options"),
        # documented differences
        C("original-dst", {"name": "original-dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"},
          "type", None,
          why="ORIGINAL_DST routes to the downstream connection's original destination: a client has none"),
        C("eds-api-config-source", e("eds-api-config-source", eds_cluster_config={"eds_config": {"api_config_source": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}}}),
          "eds_cluster_config.eds_config.api_config_source", None,
          why="gRPC: the EDS source must be the ADS stream (ads or self)"),
        C("eds-self", e("eds-self", eds_cluster_config={"eds_config": {"self": {}}}), None,
          "Missing config source specifier",
          why="'self' means the server that sent the cluster; Envoy has none for a static cluster"),
        C("aggregate-default-policy", aggregate("aggregate-default-policy", ["eds"]), None,
          "cluster provided LB not specified",
          why="gRPC control planes leave lb_policy unset on aggregate clusters; gRPC accepts that"),
        C("istio-mutual", e("istio-mutual", transport_socket=istio_mutual()), None,
          "ValidationContextSdsSecretConfig: value is required",
          why="Istio's proxyless TLS shape: certificate provider instances, which Envoy does not take here"),
        C("tls-no-roots", e("tls-no-roots", transport_socket=tls_socket({})),
          TSC, None, why="gRPC A29: a client needs roots (Envoy then skips verification)"),
        C("tls-sds-no-roots", e("tls-sds-no-roots", transport_socket=tls_socket({
            "tls_certificate_sds_secret_configs": [SDS]})),
          TSC, None, why="gRPC A29: a client needs roots (Envoy then skips verification)"),
        C("tls-provider-roots-sans", e("tls-provider-roots-sans", transport_socket=tls_socket(dict(
            NEWTLS, validation_context={"ca_certificate_provider_instance": ROOTS,
                                        "match_subject_alt_names": [{"exact": SPIFFE}]}))),
          None, "SAN-based verification of peer certificates without trusted CA",
          why="Envoy does not count ca_certificate_provider_instance as a trusted CA when it checks SAN "
              "matchers; in gRPC (A29) and Istio's proxyless shape that instance is the trusted CA"),
        C("tls-allow-expired", e("tls-allow-expired", transport_socket=tls_socket(dict(
            SIDECAR_TLS, combined_validation_context={
                "default_validation_context": {"allow_expired_certificate": True},
                "validation_context_sds_secret_config": ROOT_SDS}))),
          f"{TSC}.combined_validation_context.default_validation_context.allow_expired_certificate", None,
          why="meshcore never verifies less than fully (security must not fail open)"),
        C("tls-min-above-max", e("tls-min-above-max", transport_socket=tls_socket(dict(SIDECAR_TLS, tls_params={
            "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_2"}))),
          f"{TSC}.tls_params.tls_minimum_protocol_version", None,
          why="Envoy only fails when it builds the SSL context (no secrets in validate mode): refused up front"),
        C("internal-upstream", e("internal-upstream", transport_socket={"name": "internal_upstream", "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "transport_socket": {"name": "raw", "typed_config": {"@type": RAW_BUFFER}}}}),
          "transport_socket.typed_config", None, why="Envoy-internal listeners do not exist outside Envoy"),
        C("protocol-options-unknown-key", e("protocol-options-unknown-key", typed_extension_protocol_options={
            "meshcore.unknown": {"@type": RAW_BUFFER}}), None, "Didn't find a registered network or http filter",
          why="meshcore reads only the HttpProtocolOptions entry and ignores names it has no use for"),
        C("subset", e("subset", lb_subset_config={"subset_selectors": [{"keys": ["version"]}]}),
          "lb_subset_config.subset_selectors", None, why="subset load balancing is not supported"),
        C("murmur", e("murmur", lb_policy="RING_HASH", ring_hash_lb_config={"hash_function": "MURMUR_HASH_2"}),
          "ring_hash_lb_config.hash_function", None, why="meshcore hashes with xxHash only"),
    ]


CASES = _cases()


def test_cases_are_documented() -> None:
    check_documented(CASES)
    assert runs(CASES) <= 29  # one Envoy run per case Envoy rejects, plus one for all it accepts


@pytest.mark.parametrize("case", CASES, ids=str)
def test_meshcore_verdict(case: Case) -> None:
    check_meshcore(cluster_spec, case, case.name)


@pytest.fixture(scope="module")
def envoy_says() -> Dict[str, Any]:
    return envoy_verdicts(CASES, lambda cases: bootstrap(clusters=[c.config for c in cases]))


@pytest.mark.envoy
@pytest.mark.parametrize("case", CASES, ids=str)
def test_envoy_verdict(case: Case, envoy_says: Dict[str, Any]) -> None:
    check_envoy(case, envoy_says[case.name])
