"""``meshcore.xds.endpoint_config.endpoints_spec`` and ``lb_config.assignment_arguments``: the EDS
rules, the real assignments in tests/fixtures, equality with ``Endpoint``'s own constructor (the
decoder builds endpoints without it, for speed), decode cost, and a differential test against
Envoy 1.40 (the assignment inside a STATIC cluster; see decoder_support.py).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

import pytest
from google.protobuf import any_pb2, json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from meshcore import ConfigError, Endpoint, HealthStatus, Locality
from meshcore.xds.cluster_config import cluster_spec
from meshcore.xds.endpoint_config import endpoints_spec
from meshcore.xds.lb_config import assignment_arguments, load_balancer_arguments
from meshcore.xds.model import EndpointsSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_support import (  # noqa: E402
    Case, bootstrap, check_documented, check_envoy, check_meshcore, envoy_verdicts, lb_endpoint, load_json,
    load_yaml, resources, runs,
)

CLA = "envoy.config.endpoint.v3.ClusterLoadAssignment"
NAME = "outbound|9080||reviews.default.svc.cluster.local"
UINT32_MAX = 0xFFFFFFFF


def cla(*lles: Dict[str, Any], name: str = NAME, **fields: Any) -> Dict[str, Any]:
    return {"cluster_name": name, "endpoints": list(lles), **fields}


def lle(*lbes: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
    return {"lb_endpoints": list(lbes), **fields}


def error_of(config: Any) -> tuple:
    with pytest.raises(ConfigError) as info:
        endpoints_spec(config)
    return info.value.resource, info.value.field


# -- the model ------------------------------------------------------------------------------------


def test_endpoints_spec() -> None:
    spec = endpoints_spec(cla(
        lle(lb_endpoint("10.0.0.1", 80, health_status="HEALTHY", load_balancing_weight=3,
                        metadata={"filter_metadata": {"envoy.lb": {"hash_key": "h1"}, "istio": {"v": [1, "x", None]}}}),
            lb_endpoint("10.0.0.2", 80, health_status="DRAINING"),
            locality={"region": "r", "zone": "z"}, load_balancing_weight=7),
        lle(lb_endpoint("2001:DB8::1", 81, endpoint={"hostname": "b.example"}), priority=1),
        policy={"overprovisioning_factor": 140, "weighted_priority_health": True},
    ))
    assert isinstance(spec, EndpointsSpec) and spec.name == NAME
    assert spec.endpoint_options == (("overprovisioning_factor", 140), ("weighted_priority_health", True))
    a, b, c = spec.endpoints
    assert a == Endpoint("10.0.0.1", 80, weight=3, health=HealthStatus.HEALTHY, locality=Locality("r", "z"),
                         locality_weight=7, hash_key="h1",
                         metadata={"envoy.lb": {"hash_key": "h1"}, "istio": {"v": [1.0, "x", None]}})
    assert b.health is HealthStatus.DRAINING and b.locality_weight == 7
    assert c.key == "[2001:db8::1]:81" and c.priority == 1 and c.hostname == "b.example" and c.locality_weight is None


def test_empty_assignment_and_inputs() -> None:
    assert endpoints_spec({"cluster_name": "c"}) == EndpointsSpec("c", ())
    msg = json_format.ParseDict(cla(lle(lb_endpoint())), endpoint_pb2.ClusterLoadAssignment())
    packed = any_pb2.Any()
    packed.Pack(msg)
    camel = json_format.MessageToDict(msg)
    assert endpoints_spec(msg) == endpoints_spec(packed) == endpoints_spec(camel)
    assert endpoints_spec(msg) == endpoints_spec(cla(lle(lb_endpoint())))


@pytest.mark.parametrize("config, field", [
    ({"endpoints": []}, "cluster_name"),
    (cla(lle(lb_endpoint(load_balancing_weight=0))), "endpoints[0].lb_endpoints[0].load_balancing_weight"),
    (cla(lle(lb_endpoint(), load_balancing_weight=0)), "endpoints[0].load_balancing_weight"),
    (cla(lle(lb_endpoint(), priority=129)), "endpoints[0].priority"),
    (cla(lle(lb_endpoint()), lle(lb_endpoint(port=81), priority=2)), "endpoints[1].priority"),
    (cla(lle(lb_endpoint("backend.example"))), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
    (cla(lle(lb_endpoint("[::1]"))), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
    (cla(lle(lb_endpoint("1.2.3.04"))), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
    (cla(lle(lb_endpoint(""))), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
    (cla(lle(lb_endpoint(port=0))), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
    (cla(lle({"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "named_port": "http"}}}})),
     "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.named_port"),
    (cla(lle({"endpoint": {"address": {"pipe": {"path": "/s"}}}})),
     "endpoints[0].lb_endpoints[0].endpoint.address.pipe"),
    (cla(lle({"endpoint": {}})), "endpoints[0].lb_endpoints[0].endpoint.address"),
    (cla(lle({})), "endpoints[0].lb_endpoints[0].endpoint"),
    (cla(lle({"endpoint_name": "e"})), "endpoints[0].lb_endpoints[0].endpoint_name"),
    (cla(lle(lb_endpoint(endpoint={"health_check_config": {"port_value": 70000}}))),
     "endpoints[0].lb_endpoints[0].endpoint.health_check_config.port_value"),
    (cla(policy={"overprovisioning_factor": 0}), "policy.overprovisioning_factor"),
    (cla(policy={"endpoint_stale_after": "0s"}), "policy.endpoint_stale_after"),
    (cla(policy={"drop_overloads": [{"category": "", "drop_percentage": {}}]}), "policy.drop_overloads[0].category"),
    (cla(policy={"drop_overloads": [{"category": "lb", "drop_percentage": {"numerator": 1}}]}),
     "policy.drop_overloads[0]"),
    (cla({"leds_cluster_locality_config": {"leds_collection_name": "x"}}), "endpoints[0].leds_cluster_locality_config"),
    (cla(lle(lb_endpoint(load_balancing_weight=UINT32_MAX), lb_endpoint(port=81, load_balancing_weight=1))),
     "endpoints[0].lb_endpoints[1].load_balancing_weight"),
    (cla(lle(lb_endpoint(), locality={"zone": "a"}, load_balancing_weight=UINT32_MAX),
         lle(lb_endpoint(port=81), locality={"zone": "b"}, load_balancing_weight=1)),
     "endpoints[1].load_balancing_weight"),
])
def test_assignment_errors(config: Dict[str, Any], field: str) -> None:
    resource = config.get("cluster_name") or "ClusterLoadAssignment"
    assert error_of(config) == (resource, field)


def test_unknown_health_status_from_binary() -> None:
    msg = json_format.ParseDict(cla(lle(lb_endpoint())), endpoint_pb2.ClusterLoadAssignment())
    msg.endpoints[0].lb_endpoints[0].health_status = 9
    assert error_of(msg) == (NAME, "endpoints[0].lb_endpoints[0].health_status")


def test_metadata_nan_is_a_config_error() -> None:
    msg = json_format.ParseDict(cla(lle(lb_endpoint())), endpoint_pb2.ClusterLoadAssignment())
    msg.endpoints[0].lb_endpoints[0].metadata.filter_metadata["x"].fields["n"].number_value = float("nan")
    assert error_of(msg) == (NAME, "endpoints[0].lb_endpoints[0].metadata.filter_metadata")


def test_ip_rules_depend_on_the_cluster_type() -> None:
    config = cla(lle(lb_endpoint("backend.example")))
    for dns in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS):
        endpoints, _ = assignment_arguments(config, "c", dns)
        assert [e.hostname for e in endpoints] == ["backend.example"]
    with pytest.raises(ConfigError):
        assignment_arguments(config, "c", cluster_pb2.Cluster.STATIC)
    endpoints, _ = assignment_arguments(cla(lle(lb_endpoint("fe80::1%lo"), lb_endpoint("::ffff:1.2.3.4", 81))), "c")
    assert [e.address for e in endpoints] == ["fe80::1%lo", "::ffff:1.2.3.4"]


def test_field_prefix_and_resource_name() -> None:
    with pytest.raises(ConfigError) as info:
        assignment_arguments(cla(lle(lb_endpoint(port=0))), "my-cluster", field_prefix="load_assignment.")
    assert (info.value.resource, info.value.field) == (
        "my-cluster", "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value")


def test_load_balancer_arguments_stays_lenient() -> None:
    # The strict rules are assignment_arguments' only: load_balancer_arguments keeps its behaviour.
    cluster = {"name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    lenient = cla(lle(lb_endpoint("backend.example", load_balancing_weight=0), load_balancing_weight=0, priority=0),
                  name="")
    endpoints, _, _ = load_balancer_arguments(cluster, lenient)
    assert [(e.address, e.weight) for e in endpoints] == [("backend.example", 1)]
    with pytest.raises(ConfigError):
        assignment_arguments(lenient)


# -- the fast endpoint builder equals Endpoint(...) ----------------------------------------------


def test_endpoint_slots_are_the_ones_the_builder_sets() -> None:
    # _model.trusted_endpoint sets these slots directly; a new Endpoint field must be added there.
    assert Endpoint.__slots__ == ("address", "port", "weight", "health", "priority", "locality",
                                  "locality_weight", "hostname", "metadata", "hash_key", "key")


def _reference(config: Dict[str, Any], dns: bool) -> List[Endpoint]:
    """Endpoints built with Endpoint's constructor and json_format (independent of lb_config)."""
    msg = json_format.ParseDict(config, endpoint_pb2.ClusterLoadAssignment())
    weights: Dict[Any, int] = {}
    for x in msg.endpoints:
        if x.HasField("locality") and x.HasField("load_balancing_weight"):
            weights[(x.priority, Locality(x.locality.region, x.locality.zone, x.locality.sub_zone))] = \
                x.load_balancing_weight.value
    out = []
    for x in msg.endpoints:
        loc = Locality(x.locality.region, x.locality.zone, x.locality.sub_zone)
        for e in x.lb_endpoints:
            md = {k: json_format.MessageToDict(v) for k, v in e.metadata.filter_metadata.items()} or None
            hk = (md or {}).get("envoy.lb", {}).get("hash_key")
            sa = e.endpoint.address.socket_address
            out.append(Endpoint(
                sa.address, sa.port_value,
                weight=e.load_balancing_weight.value if e.HasField("load_balancing_weight") else 1,
                health=e.health_status, priority=x.priority, locality=loc,
                locality_weight=weights.get((x.priority, loc)),
                hostname=e.endpoint.hostname or (sa.address if dns else ""),
                metadata=md, hash_key=hk if isinstance(hk, str) else None))
    return out


_ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "0.0.0.0", "255.255.255.255", "::1", "::", "2001:DB8:0:0::1",
                              "::ffff:10.1.2.3", "fe80::1%eth0", "1:2:3:4:5:6:7:8", "::2"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.text(max_size=5),
                     st.floats(allow_nan=False, allow_infinity=False, width=64))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=6)
_METADATA = st.dictionaries(st.sampled_from(["envoy.lb", "istio", "x"]),
                            st.dictionaries(st.sampled_from(["hash_key", "a", "b"]), _VALUES, max_size=3), max_size=2)


@st.composite
def _assignments(draw: Any) -> Dict[str, Any]:
    lles = []
    for p in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 2))):
            entry: Dict[str, Any] = {"priority": p, "lb_endpoints": []}
            if draw(st.booleans()):
                entry["locality"] = {"zone": draw(st.sampled_from(["a", "b"]))}
            if draw(st.booleans()):
                entry["load_balancing_weight"] = draw(st.integers(1, 1000))
            for _ in range(draw(st.integers(0, 3))):
                lbe: Dict[str, Any] = lb_endpoint(draw(_ADDRESSES), draw(st.integers(1, 65535)),
                                                  health_status=draw(st.integers(0, 5)))
                if draw(st.booleans()):
                    lbe["load_balancing_weight"] = draw(st.integers(1, 100))
                if draw(st.booleans()):
                    lbe["endpoint"]["hostname"] = draw(st.sampled_from(["", "h.example"]))
                md = draw(_METADATA)
                if md:
                    lbe["metadata"] = {"filter_metadata": md}
                entry["lb_endpoints"].append(lbe)
            lles.append(entry)
    return cla(*lles)


@settings(max_examples=150, deadline=None)
@given(_assignments(), st.sampled_from([cluster_pb2.Cluster.EDS, cluster_pb2.Cluster.STRICT_DNS]))
def test_decoded_endpoints_equal_constructor_built_ones(config: Dict[str, Any], kind: int) -> None:
    expected = _reference(config, dns=kind == cluster_pb2.Cluster.STRICT_DNS)
    endpoints, _ = assignment_arguments(config, "c", kind)
    assert endpoints == expected
    for got, want in zip(endpoints, expected, strict=True):
        assert (got.key, got.metadata, got.hash_key, type(got.health)) == (
            want.key, want.metadata, want.hash_key, type(want.health))
    cluster = {"name": "c", "type": cluster_pb2.Cluster.DiscoveryType.Name(kind),
               "eds_cluster_config": {"eds_config": {"ads": {}}}}
    assert load_balancer_arguments(cluster, config)[0] == expected


# -- fixtures -------------------------------------------------------------------------------------


def test_istio_endpoint_dump() -> None:
    clas = list(resources(load_json("istio/endpoint/configdump.json"), CLA))
    assert len(clas) == 37
    specs: Dict[str, EndpointsSpec] = {}
    for config in clas:
        name = config["cluster_name"]
        if name in ("sds-grpc", "xds-grpc"):  # unix-socket (pipe) addresses
            assert error_of(config) == (name, "endpoints[0].lb_endpoints[0].endpoint.address.pipe")
            continue
        specs[name] = endpoints_spec(config)
    assert len(specs) == 35
    assert all(s.endpoint_options == (("overprovisioning_factor", 140),) for s in specs.values())
    everything = [e for s in specs.values() for e in s.endpoints]
    assert len(everything) == 34 and all(e.health is HealthStatus.HEALTHY for e in everything)
    reviews = specs["outbound|9080||reviews.default.svc.cluster.local"].endpoints
    assert sorted(e.metadata["istio"]["workload"].split(";")[3] for e in reviews) == ["v1", "v2", "v3"]  # type: ignore
    assert all(e.locality_weight == 3 for e in reviews)


def test_istio_config_dump_assignments_are_rejected() -> None:
    found = {c["cluster_name"]: c for c in resources(load_json("istio/config_dump.json"), CLA)}
    # Envoy's endpoint config dump writes load_balancing_weight 0 for a locality without a weight;
    # sent as config, Envoy's own validation refuses it (see the differential cases below).
    assert error_of(found["prometheus_stats"]) == ("prometheus_stats", "endpoints[0].load_balancing_weight")
    name = "inbound-vip|8100|http|httpbin.default.svc.cluster.local"
    assert error_of(found[name]) == (name, "endpoints[0].lb_endpoints[0].endpoint.address.envoy_internal_address")


@pytest.mark.parametrize("path", ["envoy-gateway/load-balancer.endpoints.yaml",
                                  "envoy-gateway/http-route-weighted-zones.endpoints.yaml"])
def test_envoy_gateway_assignments(path: str) -> None:
    for config in load_yaml(path):
        spec = endpoints_spec(config)
        cluster = {"name": spec.name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}
        assert list(spec.endpoints) == load_balancer_arguments(cluster, config)[0]
        assert spec.endpoints and all(e.locality != Locality() for e in spec.endpoints)


def test_static_cluster_and_eds_assignment_agree() -> None:
    config = cla(lle(lb_endpoint("10.0.0.1", 80), lb_endpoint("10.0.0.2", 80), locality={"zone": "a"},
                     load_balancing_weight=2), policy={"overprovisioning_factor": 150}, name="s")
    spec = cluster_spec({"name": "s", "type": "STATIC", "load_assignment": config})
    eds = endpoints_spec(config)
    assert spec.endpoints == eds.endpoints and spec.endpoint_options == eds.endpoint_options


# -- cost -----------------------------------------------------------------------------------------


def test_decode_cost_is_small() -> None:
    """10-endpoint Istio-like assignments: about 70 us each on the 2-core CI machine; fail only
    on an order-of-magnitude regression (the target is 10,000 clusters x 10 endpoints << 2 s)."""
    msgs = [json_format.ParseDict(cla(lle(*[
        lb_endpoint(f"10.{i // 256}.{i % 256}.{k}", 9080, health_status="HEALTHY", load_balancing_weight=1,
                    metadata={"filter_metadata": {"istio": {"workload": f"w{i};default;w;v1;Kubernetes"}}})
        for k in range(10)], locality={"region": "r"}, load_balancing_weight=10),
        policy={"overprovisioning_factor": 140}, name=f"c{i}"), endpoint_pb2.ClusterLoadAssignment())
        for i in range(500)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for m in msgs:
            endpoints_spec(m)
        best = min(best, (time.perf_counter() - start) / len(msgs))
    assert best < 400e-6, f"{best * 1e6:.0f} us per 10-endpoint assignment"


# -- differential test against Envoy 1.40 ---------------------------------------------------------


def _cases() -> List[Case]:
    C = Case
    fixture = {c["cluster_name"]: c for c in resources(load_json("istio/config_dump.json"), CLA)}
    prometheus = {k: v for k, v in fixture["prometheus_stats"].items() if k != "@type"}
    reviews = next(c for c in resources(load_json("istio/endpoint/configdump.json"), CLA)
                   if c["cluster_name"] == "outbound|9080||reviews.default.svc.cluster.local")
    reviews = {k: v for k, v in reviews.items() if k != "@type"}
    return [
        # accepted by both
        C("full", cla(
            lle(lb_endpoint("10.0.0.1", 80, load_balancing_weight=5, health_status="DEGRADED",
                            metadata={"filter_metadata": {"envoy.lb": {"hash_key": "k"}}},
                            endpoint={"health_check_config": {"port_value": 65535}}),
                locality={"region": "r", "zone": "a"}, load_balancing_weight=UINT32_MAX),
            lle(lb_endpoint("::1", 80), lb_endpoint("::ffff:1.2.3.4", 81), lb_endpoint("fe80::1%lo", 82), priority=1),
            policy={"overprovisioning_factor": 200, "weighted_priority_health": True, "endpoint_stale_after": "1s",
                    "drop_overloads": [{"category": "lb", "drop_percentage": {"numerator": 0}}]}, name="full")),
        C("empty", cla(name="empty")),
        C("priorities", cla(*[lle(lb_endpoint(port=1000 + p), priority=p) for p in range(129)], name="priorities")),
        C("istio-reviews", dict(reviews, cluster_name="istio-reviews")),
        # rejected by both
        C("istio-config-dump-locality-weight-0", dict(prometheus, cluster_name="istio-config-dump-locality-weight-0"),
          "endpoints[0].load_balancing_weight", "LoadBalancingWeight: value must be greater than or equal to 1"),
        C("endpoint-weight-0", cla(lle(lb_endpoint(load_balancing_weight=0)), name="endpoint-weight-0"),
          "endpoints[0].lb_endpoints[0].load_balancing_weight",
          "LbEndpointValidationError.LoadBalancingWeight: value must be greater than or equal to 1"),
        C("priority-129", cla(lle(lb_endpoint(), priority=129), name="priority-129"),
          "endpoints[0].priority", "Priority: value must be less than or equal to 128"),
        C("hostname", cla(lle(lb_endpoint("backend.example")), name="hostname"),
          "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address", "malformed IP address"),
        C("no-cluster-name", cla(lle(lb_endpoint()), name=""),
          "cluster_name", "ClusterName: value length must be at least 1 characters"),
        C("overprovisioning-0", cla(name="overprovisioning-0", policy={"overprovisioning_factor": 0}),
          "policy.overprovisioning_factor", "OverprovisioningFactor: value must be greater than 0"),
        # documented differences
        C("priority-gap", cla(lle(lb_endpoint()), lle(lb_endpoint(port=81), priority=2), name="priority-gap"),
          "endpoints[1].priority", None, why="gRPC NACKs non-contiguous priorities; Envoy leaves the gap empty"),
        C("port-0", cla(lle(lb_endpoint(port=0)), name="port-0"),
          "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value", None,
          why="a client cannot connect to port 0"),
        C("drop-overload", cla(name="drop-overload", policy={"drop_overloads": [
            {"category": "lb", "drop_percentage": {"numerator": 1}}]}), "policy.drop_overloads[0]", None,
          why="drop_overloads are not implemented"),
        C("pipe", cla(lle({"endpoint": {"address": {"pipe": {"path": "/tmp/meshcore.sock"}}}}), name="pipe"),
          "endpoints[0].lb_endpoints[0].endpoint.address.pipe", None, why="only socket addresses are supported"),
    ]


CASES = _cases()


def _resource(case: Case) -> str:
    return case.config.get("cluster_name") or "ClusterLoadAssignment"


def test_cases_are_documented() -> None:
    check_documented(CASES)
    assert runs(CASES) <= 7


@pytest.mark.parametrize("case", CASES, ids=str)
def test_meshcore_verdict(case: Case) -> None:
    check_meshcore(endpoints_spec, case, _resource(case))
    # the same assignment inline in a STATIC cluster: the same verdict, on load_assignment.<field>
    static = _static(case)
    if case.field is None:
        cluster_spec(static)
    else:
        with pytest.raises(ConfigError) as info:
            cluster_spec(static)
        assert (info.value.resource, info.value.field) == (static["name"], "load_assignment." + case.field)


def _static(case: Case) -> Dict[str, Any]:
    return {"name": f"static-{case.name}", "type": "STATIC", "load_assignment": case.config}


@pytest.fixture(scope="module")
def envoy_says() -> Dict[str, Any]:
    return envoy_verdicts(CASES, lambda cases: bootstrap(clusters=[_static(c) for c in cases]))


@pytest.mark.envoy
@pytest.mark.parametrize("case", CASES, ids=str)
def test_envoy_verdict(case: Case, envoy_says: Dict[str, Any]) -> None:
    check_envoy(case, envoy_says[case.name])


