"""``meshcore.xds.load_balancer_arguments`` and ``LoadBalancer.from_xds`` on real xDS configs.

The fixtures are real configs from Istio, Envoy Gateway and the Envoy examples; see
tests/fixtures/README.md. Config dumps hold their resources
in ``Any`` values with ``@type``, and :func:`resources` unpacks them. The tests that build a load
balancer take conftest's ``LB`` fixture: ``lb_c.LoadBalancer`` and ``lb_py.LoadBalancer``, ids ``c``
and ``py``.
"""

from __future__ import annotations

import collections
import copy
import json
import pathlib
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from google.protobuf import any_pb2, json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from meshcore import ConfigError, Endpoint, HealthStatus, Locality
from meshcore._fast import lb_py
from meshcore.xds import load_balancer_arguments

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

CLUSTER_TYPE = "envoy.config.cluster.v3.Cluster"
CLA_TYPE = "envoy.config.endpoint.v3.ClusterLoadAssignment"
UINT32_MAX = 0xFFFFFFFF



# -- fixture helpers ------------------------------------------------------------------------------


def load_json(rel: str) -> Any:
    return json.loads((FIXTURES / rel).read_text())


def load_yaml(rel: str) -> Any:
    import yaml

    return yaml.safe_load((FIXTURES / rel).read_text())


def resources(dump: Any, type_name: str) -> Iterator[Dict[str, Any]]:
    """Every ``Any`` of ``type_name`` in a config dump: ``static_clusters[].cluster``,
    ``dynamic_active_clusters[].cluster``, ``*_endpoint_configs[].endpoint_config``, ...
    (found by ``@type`` wherever it is), with the ``@type`` key still in place."""
    if isinstance(dump, dict):
        if str(dump.get("@type", "")).rsplit("/", 1)[-1] == type_name:
            yield dump
            return
        for value in dump.values():
            yield from resources(value, type_name)
    elif isinstance(dump, list):
        for value in dump:
            yield from resources(value, type_name)


def eds_name(cluster: Dict[str, Any]) -> str:
    """The EDS resource name of a cluster (``service_name``, or the cluster name)."""
    eds = cluster.get("eds_cluster_config", cluster.get("edsClusterConfig", {}))
    return eds.get("service_name", eds.get("serviceName")) or cluster["name"]


def eds_cluster(name: str) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}


def keys(endpoints: List[Endpoint]) -> set:
    return {ep.key for ep in endpoints}


def pick_counts(lb: Any, n: int, hashed: bool = False, seed: int = 7) -> collections.Counter:
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        ep = lb.pick(hash=rng.getrandbits(64)) if hashed else lb.pick()
        counts[None if ep is None else ep.key] += 1
        if ep is not None:
            lb.release(ep)
    return counts


def check_builds_and_picks(lb_cls: Any, cluster: Any, cla: Any) -> List[Endpoint]:
    """from_xds builds, and picks land in the converted endpoint set (or None if it is empty)."""
    endpoints, policy, _ = load_balancer_arguments(cluster, cla)
    lb = lb_cls.from_xds(cluster, cla, seed=1)
    assert lb.policy == policy
    assert keys(lb.endpoints) == keys(endpoints)
    for _ in range(20):
        ep = lb.pick(hash=random.getrandbits(64)) if policy in ("RING_HASH", "MAGLEV") else lb.pick()
        if endpoints:
            assert ep is not None and ep.key in keys(endpoints)
            lb.release(ep)
        else:
            assert ep is None
    return endpoints


# -- Istio ----------------------------------------------------------------------------------------


def test_istio_config_dump_clusters_with_their_assignments(LB: Any) -> None:
    dump = load_json("istio/config_dump.json")
    clusters = {c["name"]: c for c in resources(dump, CLUSTER_TYPE)}
    clas = {c["cluster_name"]: c for c in resources(dump, CLA_TYPE)}
    assert set(clusters) == {"agent", "prometheus_stats", "inbound-vip|8000|http|httpbin.default.svc.cluster.local"}
    seen = {}
    for name, cluster in clusters.items():
        cla = clas.get(eds_name(cluster))  # prometheus_stats has one; agent has only its inline one
        seen[name] = keys(check_builds_and_picks(LB, cluster, cla))
    assert seen == {
        "agent": {"127.0.0.1:15020"},
        "prometheus_stats": {"127.0.0.1:15000"},
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local": set(),  # EDS, no assignment in the dump
    }


def test_istio_config_dump_internal_address_is_rejected() -> None:
    # The dump's only dynamic CLA (for a cluster not in the dump) points at an internal listener.
    dump = load_json("istio/config_dump.json")
    (cla,) = [c for c in resources(dump, CLA_TYPE) if c["cluster_name"].startswith("inbound-vip|8100")]
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments(eds_cluster(cla["cluster_name"]), cla)
    assert info.value.resource == cla["cluster_name"]
    assert info.value.field == "endpoints[0].lb_endpoints[0].endpoint.address.envoy_internal_address"


def test_istio_endpoint_dump_all_assignments(LB: Any) -> None:
    clas = list(resources(load_json("istio/endpoint/configdump.json"), CLA_TYPE))
    assert len(clas) == 37
    converted: Dict[str, List[Endpoint]] = {}
    for cla in clas:
        name = cla["cluster_name"]
        if name in ("sds-grpc", "xds-grpc"):  # unix-socket (pipe) addresses
            with pytest.raises(ConfigError) as info:
                load_balancer_arguments(eds_cluster(name), cla)
            assert (info.value.resource, info.value.field) == (
                name, "endpoints[0].lb_endpoints[0].endpoint.address.pipe")
            continue
        endpoints = check_builds_and_picks(LB, eds_cluster(name), cla)
        _, policy, options = load_balancer_arguments(eds_cluster(name), cla)
        assert (policy, options) == ("ROUND_ROBIN", {"overprovisioning_factor": 140})
        raw = sum(len(lle.get("lb_endpoints", [])) for lle in cla.get("endpoints", []))
        assert len(endpoints) == raw
        converted[name] = endpoints
    assert len(converted) == 35
    everything = [ep for eps in converted.values() for ep in eps]
    assert len(everything) == 34  # the README's 36 HEALTHY endpoints minus the two pipe ones
    assert all(ep.health is HealthStatus.HEALTHY for ep in everything)
    # Each Istio locality is empty with a weight equal to its endpoint count.
    eds = [ep for name, eps in converted.items() if name.startswith("outbound|") for ep in eps]
    assert all(ep.locality == Locality() for ep in eds)
    per_cluster = {name: eps for name, eps in converted.items() if name.startswith("outbound|")}
    assert all(ep.locality_weight == len(eps) for eps in per_cluster.values() for ep in eps)
    reviews = converted["outbound|9080||reviews.default.svc.cluster.local"]
    versions = sorted(ep.metadata["istio"]["workload"].split(";")[3] for ep in reviews)  # type: ignore[index]
    assert versions == ["v1", "v2", "v3"]
    tls = [ep.metadata["envoy.transport_socket_match"] for ep in reviews]  # type: ignore[index]
    assert tls == [{"tlsMode": "istio"}] * 3
    assert all(ep.hash_key is None and ep.hostname == "" for ep in reviews)


def test_istio_gateway_cluster_with_unregistered_typed_configs(LB: Any) -> None:
    # Istio's cluster carries an istio.metadata_exchange filter whose type is in no xds-protos
    # module, plus TLS transport_socket_matches: only the LB fields are parsed.
    dump = load_json("istio/http_config.json")
    (cluster,) = resources(dump, CLUSTER_TYPE)
    assert load_balancer_arguments(cluster) == ([], "LEAST_REQUEST", {})
    check_builds_and_picks(LB, cluster, None)


# -- Envoy Gateway ----------------------------------------------------------------------------------

LOCALITY = {"locality_weighted": True}
GATEWAY_EXPECTED: Dict[str, Optional[Tuple[str, Dict[str, Any]]]] = {
    "first-route-dest": ("ROUND_ROBIN", LOCALITY),
    "second-route-dest": ("RANDOM", LOCALITY),
    "third-route-dest": ("LEAST_REQUEST", LOCALITY),
    "fourth-route-dest": ("MAGLEV", {}),
    "fifth-route-dest": ("LEAST_REQUEST", LOCALITY),  # slowStartConfig: accepted, not modelled
    "sixth-route-dest": ("ROUND_ROBIN", LOCALITY),  # slowStartConfig: accepted, not modelled
    "seventh-route-dest": ("MAGLEV", {}),
    "eighth-route-dest": ("MAGLEV", {"table_size": 524287}),
    "ninth-route-dest": ("MAGLEV", {}),
    "tenth-route-dest": ("MAGLEV", {}),
    "eleventh-route-dest": None,  # override_host (header override) only
    "twelfth-route-dest": None,
    "thirteen-route-dest": None,
    "fourteenth-route-dest": ("MAGLEV", {}),
    "fifteenth-route-dest": ("MAGLEV", {}),
    "sixteenth-route-dest": None,  # client_side_weighted_round_robin only
    "seventeenth-route-dest": None,
}


def gateway_pairs(stem: str) -> List[Tuple[Dict[str, Any], Optional[Dict[str, Any]]]]:
    clusters = load_yaml(f"envoy-gateway/{stem}.clusters.yaml")
    clas = {c["clusterName"]: c for c in load_yaml(f"envoy-gateway/{stem}.endpoints.yaml")}
    return [(c, clas.get(eds_name(c))) for c in clusters]


def test_envoy_gateway_load_balancer_policies() -> None:
    pairs = gateway_pairs("load-balancer")
    assert [c["name"] for c, _ in pairs] == list(GATEWAY_EXPECTED)
    for cluster, cla in pairs:
        expected = GATEWAY_EXPECTED[cluster["name"]]
        if expected is None:
            with pytest.raises(ConfigError) as info:
                load_balancer_arguments(cluster, cla)
            assert (info.value.resource, info.value.field) == (cluster["name"], "load_balancing_policy")
            assert ("override_host" in str(info.value)) or ("client_side_weighted_round_robin" in str(info.value))
            continue
        endpoints, policy, options = load_balancer_arguments(cluster, cla)
        assert (policy, options) == expected, cluster["name"]
        assert endpoints == [
            Endpoint("1.2.3.4", 50000, health=HealthStatus.UNKNOWN,
                     locality=Locality(f"{cluster['name']}/backend/0"), locality_weight=1)
        ]


def test_envoy_gateway_load_balancer_builds(LB: Any) -> None:
    for cluster, cla in gateway_pairs("load-balancer"):
        if GATEWAY_EXPECTED[cluster["name"]] is not None:
            assert keys(check_builds_and_picks(LB, cluster, cla)) == {"1.2.3.4:50000"}


def test_override_host_is_skipped_for_a_later_supported_policy() -> None:
    cluster, cla = gateway_pairs("load-balancer")[10]
    assert cluster["name"] == "eleventh-route-dest"
    cluster = copy.deepcopy(cluster)
    cluster["loadBalancingPolicy"]["policies"].append({"typedExtensionConfig": {
        "name": "random",
        "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random"},
    }})
    assert load_balancer_arguments(cluster, cla)[1:] == ("RANDOM", {})


def test_weighted_zones_round_robin_shares(LB: Any) -> None:
    cluster, cla = gateway_pairs("http-route-weighted-zones")[0]
    assert load_balancer_arguments(cluster, cla)[1:] == ("ROUND_ROBIN", LOCALITY)
    lb = LB.from_xds(cluster, cla, seed=3)
    n = 9100
    counts = pick_counts(lb, n)
    zone = {"1.2.3.4:8080": "a", "2.3.4.5:8080": "a", "3.4.5.6:8080": "b", "4.5.6.7:8080": "c"}
    shares = collections.Counter()
    for key, c in counts.items():
        shares[zone[key]] += c / n
    assert shares["a"] == pytest.approx(70 / 91, abs=0.01)
    assert shares["b"] == pytest.approx(20 / 91, abs=0.01)
    assert shares["c"] == pytest.approx(1 / 91, abs=0.01)
    # Inside us-east-1a the two hosts share evenly.
    assert counts["1.2.3.4:8080"] / n == pytest.approx(35 / 91, abs=0.01)


def test_weighted_zones_maglev_shares(LB: Any) -> None:
    cluster, cla = gateway_pairs("http-route-weighted-zones")[1]
    assert load_balancer_arguments(cluster, cla)[1:] == ("MAGLEV", LOCALITY)
    lb = LB.from_xds(cluster, cla, seed=3)
    counts = pick_counts(lb, 20000, hashed=True)
    assert counts["10.0.0.1:8080"] / 20000 == pytest.approx(0.8, abs=0.015)
    assert counts["10.0.0.2:8080"] / 20000 == pytest.approx(0.2, abs=0.015)


def test_weighted_zones_wrr_locality_over_cswrr_is_unsupported() -> None:
    cluster, cla = gateway_pairs("http-route-weighted-zones")[2]
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments(cluster, cla)
    assert (info.value.resource, info.value.field) == (cluster["name"], "load_balancing_policy")
    assert "wrr_locality(client_side_weighted_round_robin" in str(info.value)


# -- Envoy examples: locality-load-balancing ---------------------------------------------------------


def example_cluster(unhealthy: Tuple[str, ...] = ()) -> Dict[str, Any]:
    (cluster,) = load_yaml("envoy-examples/locality-load-balancing/envoy.yaml")["static_resources"]["clusters"]
    cluster = copy.deepcopy(cluster)
    for lle in cluster["load_assignment"]["endpoints"]:
        for lbe in lle["lb_endpoints"]:
            if lbe["endpoint"]["hostname"] in unhealthy:
                lbe["health_status"] = "UNHEALTHY"
    return cluster


def test_locality_example_conversion() -> None:
    endpoints, policy, options = load_balancer_arguments(example_cluster())
    assert (policy, options) == ("ROUND_ROBIN", LOCALITY)
    # STRICT_DNS: the address stays the DNS name (no resolution); the hostname is given here.
    assert [(ep.address, ep.port, ep.priority, ep.locality, ep.locality_weight) for ep in endpoints] == [
        ("backend-local-1", 8080, 0, Locality("local", "zone-1"), 1),
        ("backend-local-2", 8080, 1, Locality("local", "zone-2"), 1),
        ("backend-remote-1", 8080, 1, Locality("remote", "zone-1"), 1),
        ("backend-remote-2", 8080, 2, Locality("remote", "zone-2"), 1),
    ]


@pytest.mark.parametrize(
    "unhealthy, expected",
    [
        ((), {"backend-local-1:8080": 1.0}),  # example.rst: all healthy -> 100% local-1
        (("backend-local-1",), {"backend-local-2:8080": 0.5, "backend-remote-1:8080": 0.5}),
        # P1 is 50% healthy: 50 * 1.4 = 70% stays there, 30% spills to P2 (observed 69/31).
        (("backend-local-1", "backend-local-2"), {"backend-remote-1:8080": 0.7, "backend-remote-2:8080": 0.3}),
    ],
    ids=["all-healthy", "local-1-down", "local-1-and-2-down"],
)
def test_locality_example_spillover(LB: Any, unhealthy: Tuple[str, ...], expected: Dict[str, float]) -> None:
    lb = LB.from_xds(example_cluster(unhealthy), seed=11)
    n = 4000
    counts = pick_counts(lb, n)
    assert set(counts) == set(expected)
    for key, share in expected.items():
        assert counts[key] / n == pytest.approx(share, abs=0.03)


# -- input forms ------------------------------------------------------------------------------------


def as_message(cls: Any, data: Dict[str, Any]) -> Any:
    msg = cls()
    json_format.ParseDict({k: v for k, v in data.items() if k != "@type"}, msg)
    return msg


def input_forms(cluster: Dict[str, Any], cla: Optional[Dict[str, Any]]) -> List[Tuple[Any, Any]]:
    """The same resources as given (dicts), as messages, as Any, and as snake_case/camelCase dicts."""
    c_msg = as_message(cluster_pb2.Cluster, cluster)
    l_msg = None if cla is None else as_message(endpoint_pb2.ClusterLoadAssignment, cla)

    def packed(m: Any) -> Any:
        if m is None:
            return None
        a = any_pb2.Any()
        a.Pack(m)
        return a

    def as_dict(m: Any, snake: bool) -> Any:
        return None if m is None else json_format.MessageToDict(m, preserving_proto_field_name=snake)

    return [
        (cluster, cla),
        (c_msg, l_msg),
        (packed(c_msg), packed(l_msg)),
        (as_dict(c_msg, True), as_dict(l_msg, True)),
        (as_dict(c_msg, False), as_dict(l_msg, False)),
    ]


def test_message_any_and_dict_inputs_agree() -> None:
    cases = [
        gateway_pairs("http-route-weighted-zones")[0],
        gateway_pairs("http-route-weighted-zones")[1],
        gateway_pairs("load-balancer")[7],
        (example_cluster(), None),
        (eds_cluster("reviews"), next(
            c for c in resources(load_json("istio/endpoint/configdump.json"), CLA_TYPE)
            if c["cluster_name"].startswith("outbound|9080||reviews")
        )),
    ]
    for cluster, cla in cases:
        results = [load_balancer_arguments(c, l) for c, l in input_forms(cluster, cla)]
        assert all(r == results[0] for r in results[1:]), cluster["name"]
        assert results[0][0] or cla is None


def test_message_and_camel_case_dict_build_the_same_lb(LB: Any) -> None:
    cluster, cla = gateway_pairs("http-route-weighted-zones")[0]
    (_, _), (c_msg, l_msg), *_ = input_forms(cluster, cla)
    a = LB.from_xds(cluster, cla, seed=5)
    b = LB.from_xds(c_msg, l_msg, seed=5)
    assert [a.pick() for _ in range(200)] == [b.pick() for _ in range(200)]


def test_wrong_inputs() -> None:
    with pytest.raises(TypeError):
        load_balancer_arguments(endpoint_pb2.ClusterLoadAssignment())
    with pytest.raises(TypeError):
        load_balancer_arguments("cluster")  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments({"@type": f"type.googleapis.com/{CLA_TYPE}", "name": "x"})
    assert (info.value.resource, info.value.field) == ("x", "@type")


# -- policy mapping -----------------------------------------------------------------------------------

LBP = "type.googleapis.com/envoy.extensions.load_balancing_policies"


def typed(*configs: Dict[str, Any]) -> Dict[str, Any]:
    entries = [{"typed_extension_config": {"name": f"p{i}", "typed_config": c}} for i, c in enumerate(configs)]
    return {"policies": entries}


@pytest.mark.parametrize(
    "cluster, expected",
    [
        ({"lb_policy": "RANDOM", "common_lb_config": {"locality_weighted_lb_config": {}}}, ("RANDOM", LOCALITY)),
        ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {
            "choice_count": 3, "active_request_bias": {"default_value": 0.5, "runtime_key": "k"}}},
         ("LEAST_REQUEST", {"choice_count": 3, "active_request_bias": 0.5})),
        ({"type": "STRICT_DNS", "lb_policy": "RING_HASH",
          "ring_hash_lb_config": {"minimum_ring_size": "8", "maximum_ring_size": "64", "hash_function": "XX_HASH"},
          "common_lb_config": {"healthy_panic_threshold": {"value": 25.5},
                               "consistent_hashing_lb_config": {"use_hostname_for_hashing": True}}},
         ("RING_HASH", {"minimum_ring_size": 8, "maximum_ring_size": 64, "healthy_panic_threshold": 25.5,
                        "use_hostname_for_hashing": True})),
        ({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": "13"},
          "common_lb_config": {"locality_weighted_lb_config": {}}},
         ("MAGLEV", {"table_size": 13, "locality_weighted": True})),
        # Typed wins over lb_policy; common_lb_config locality/hashing fields do not apply to it.
        ({"lb_policy": "MAGLEV", "common_lb_config": {"locality_weighted_lb_config": {}},
          "load_balancing_policy": typed({"@type": f"{LBP}.round_robin.v3.RoundRobin"})},
         ("ROUND_ROBIN", {})),
        ({"load_balancing_policy": typed({"@type": f"{LBP}.least_request.v3.LeastRequest", "choice_count": 4,
                                          "active_request_bias": {"default_value": 0, "runtime_key": "k"},
                                          "locality_lb_config": {"zone_aware_lb_config": {}}})},
         ("LEAST_REQUEST", {"choice_count": 4, "active_request_bias": 0.0})),
        ({"load_balancing_policy": typed({"@type": f"{LBP}.ring_hash.v3.RingHash", "use_hostname_for_hashing": True,
                                          "locality_weighted_lb_config": {}})},
         ("RING_HASH", {"use_hostname_for_hashing": True, "locality_weighted": True})),
        # consistent_hashing_lb_config set: the deprecated top-level field is ignored (as in Envoy).
        ({"load_balancing_policy": typed({"@type": f"{LBP}.ring_hash.v3.RingHash", "use_hostname_for_hashing": True,
                                          "consistent_hashing_lb_config": {}})},
         ("RING_HASH", {})),
        ({"load_balancing_policy": typed({"@type": f"{LBP}.maglev.v3.Maglev", "table_size": 7,
                                          "consistent_hashing_lb_config": {"use_hostname_for_hashing": True}})},
         ("MAGLEV", {"table_size": 7, "use_hostname_for_hashing": True})),
        ({"load_balancing_policy": typed({
            "@type": f"{LBP}.wrr_locality.v3.WrrLocality",
            "endpoint_picking_policy": typed({"@type": f"{LBP}.round_robin.v3.RoundRobin"}),
        })},
         ("ROUND_ROBIN", LOCALITY)),
        # First supported wins: CSWRR, an unregistered custom type, a TypedStruct custom policy
        # and wrr_locality over CSWRR are skipped.
        ({"load_balancing_policy": typed(
            {"@type": f"{LBP}.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"},
            {"@type": "type.googleapis.com/acme.lb.v1.Magic", "spell": {"@type": "x.y.Z"}},
            {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": "acme.com/Custom", "value": {"a": 1}},
            {"@type": f"{LBP}.wrr_locality.v3.WrrLocality", "endpoint_picking_policy": typed(
                {"@type": f"{LBP}.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"})},
            {"@type": f"{LBP}.random.v3.Random"},
            {"@type": f"{LBP}.round_robin.v3.RoundRobin"},
        )}, ("RANDOM", {})),
        # A supported policy given as a TypedStruct is decoded.
        ({"load_balancing_policy": typed({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                                          "type_url": f"{LBP}.maglev.v3.Maglev", "value": {"tableSize": 11}})},
         ("MAGLEV", {"table_size": 11})),
    ],
    ids=["legacy-random", "legacy-lr", "legacy-ring", "legacy-maglev", "typed-over-legacy", "typed-lr",
         "typed-ring-deprecated-hostname", "typed-ring-chl-wins", "typed-maglev", "wrr-locality-rr",
         "first-supported", "typed-struct"],
)
def test_policy_mapping(cluster: Dict[str, Any], expected: Tuple[str, Dict[str, Any]]) -> None:
    cluster = {"name": "c", **cluster}
    assert load_balancer_arguments(cluster)[1:] == expected
    try:
        message = as_message(cluster_pb2.Cluster, cluster)
    except json_format.ParseError:  # an unregistered Any type: only the dict form can say it
        assert "acme.lb.v1.Magic" in json.dumps(cluster)
        return
    assert load_balancer_arguments(message)[1:] == expected


def test_lb_options_are_valid_for_the_constructor() -> None:
    cluster = {"name": "c", "type": "STRICT_DNS", "lb_policy": "RING_HASH",
               "ring_hash_lb_config": {"minimum_ring_size": "8", "maximum_ring_size": "64"},
               "common_lb_config": {"healthy_panic_threshold": {"value": 25.5},
                                    "consistent_hashing_lb_config": {"use_hostname_for_hashing": True}}}
    lb = lb_py.LoadBalancer.from_xds(cluster, cla_dict())
    assert lb.config.healthy_panic_threshold == 25  # Envoy truncates: uint64_t(100 * (25.5 / 100.0))
    assert lb.config.use_hostname_for_hashing and lb.config.maximum_ring_size == 64


# -- endpoint mapping ---------------------------------------------------------------------------------


def cla_dict(*lles: Dict[str, Any], name: str = "cla", **extra: Any) -> Dict[str, Any]:
    if not lles:
        lles = (lle(lbe("10.0.0.1")),)
    return {"cluster_name": name, "endpoints": list(lles), **extra}


def lle(*lbes: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
    return {"lb_endpoints": list(lbes), **fields}


def lbe(address: str, port: int = 80, **fields: Any) -> Dict[str, Any]:
    endpoint = fields.pop("endpoint", {})
    return {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}, **endpoint}, **fields}


def test_endpoint_fields() -> None:
    cla = cla_dict(
        lle(
            lbe("10.0.0.1", 8080, load_balancing_weight=5, health_status="DEGRADED",
                endpoint={"hostname": "a.example", "additional_addresses": [
                    {"address": {"socket_address": {"address": "::1", "port_value": 1}}}]},
                metadata={"filter_metadata": {"envoy.lb": {"hash_key": "k1", "n": 1}, "istio": {"workload": "w"}}}),
            lbe("2001:DB8::1", 81, load_balancing_weight=0, health_status="DRAINING",
                metadata={"filter_metadata": {"envoy.lb": {"hash_key": 7}}}),
            locality={"region": "r", "zone": "z", "sub_zone": "s"}, load_balancing_weight=3,
        ),
        lle(lbe("10.0.0.3"), priority=1),
        policy={"overprovisioning_factor": 200, "weighted_priority_health": True},
    )
    endpoints, policy, options = load_balancer_arguments(eds_cluster("c"), cla)
    assert (policy, options) == ("ROUND_ROBIN", {"overprovisioning_factor": 200, "weighted_priority_health": True})
    a, b, c = endpoints
    assert a == Endpoint("10.0.0.1", 8080, weight=5, health=HealthStatus.DEGRADED, locality=Locality("r", "z", "s"),
                         locality_weight=3, hostname="a.example", hash_key="k1",
                         metadata={"envoy.lb": {"hash_key": "k1", "n": 1.0}, "istio": {"workload": "w"}})
    assert b == Endpoint("2001:db8::1", 81, weight=1, health=HealthStatus.DRAINING, locality=Locality("r", "z", "s"),
                         locality_weight=3, metadata={"envoy.lb": {"hash_key": 7.0}})
    assert b.key == "[2001:db8::1]:81" and b.hash_key is None  # a non-string hash_key is ignored
    assert c == Endpoint("10.0.0.3", 80, priority=1, health=HealthStatus.UNKNOWN)


def test_locality_weight_is_recorded_like_envoy() -> None:
    cla = cla_dict(
        lle(lbe("10.0.0.1"), load_balancing_weight=9),  # no locality: weight not recorded ...
        lle(lbe("10.0.0.2"), locality={"zone": "a"}),  # locality without weight: not recorded
        lle(lbe("10.0.0.3"), locality={"zone": "b"}, load_balancing_weight=2),
        lle(lbe("10.0.0.4"), locality={"zone": "b"}, load_balancing_weight=5),  # same locality: last wins
        lle(lbe("10.0.0.5"), locality={"zone": "b"}, load_balancing_weight=4, priority=1),
        lle(lbe("10.0.0.6"), locality={}, load_balancing_weight=0),  # ... but an explicit empty one is
    )
    endpoints, _, _ = load_balancer_arguments(eds_cluster("c"), cla)
    assert [(ep.address, ep.locality.zone, ep.priority, ep.locality_weight) for ep in endpoints] == [
        ("10.0.0.1", "", 0, 0),  # the locality {} entry below applies to the same (empty) locality
        ("10.0.0.2", "a", 0, None),
        ("10.0.0.3", "b", 0, 5),
        ("10.0.0.4", "b", 0, 5),
        ("10.0.0.5", "b", 1, 4),
        ("10.0.0.6", "", 0, 0),
    ]
    endpoints, _, _ = load_balancer_arguments(eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1"), load_balancing_weight=9)))
    assert endpoints[0].locality_weight is None


def test_dns_cluster_hostname_defaults_to_the_dns_name() -> None:
    cla = cla_dict(lle(lbe("svc.example"), lbe("other.example", endpoint={"hostname": "given"})))
    expected = {"STRICT_DNS": ["svc.example", "given"], "STATIC": ["", "given"], "EDS": ["", "given"]}
    for kind, hostnames in expected.items():
        endpoints, _, _ = load_balancer_arguments({"name": "c", "type": kind, "load_assignment": cla})
        assert [ep.hostname for ep in endpoints] == hostnames
    logical = {"name": "c", "type": "LOGICAL_DNS", "load_assignment": cla_dict(lle(lbe("x.example")))}
    endpoints, _, _ = load_balancer_arguments(logical)
    assert endpoints[0].hostname == "x.example"


def test_explicit_assignment_wins_over_inline_and_eds_without_any_is_empty() -> None:
    cluster = {"name": "c", "type": "STATIC", "load_assignment": cla_dict(lle(lbe("10.0.0.1")))}
    assert keys(load_balancer_arguments(cluster, cla_dict(lle(lbe("10.0.0.9"))))[0]) == {"10.0.0.9:80"}
    assert load_balancer_arguments(eds_cluster("c")) == ([], "ROUND_ROBIN", {})


# -- invalid configs -----------------------------------------------------------------------------------

BIG = UINT32_MAX - 1
STATIC = {"name": "c", "type": "STATIC"}
TYPED_PATH = "load_balancing_policy.policies[0].typed_extension_config.typed_config"


def _invalid_cases() -> List[Any]:
    cases = [
        # (id, cluster, cla, resource, field)
        ("priority-gap", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1")), lle(lbe("10.0.0.2"), priority=2)),
         "cla", "endpoints[1].priority"),
        ("no-priority-0", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1"), priority=1)), "cla", "endpoints[0].priority"),
        ("host-weight-sum", eds_cluster("c"),
         cla_dict(lle(lbe("10.0.0.1", load_balancing_weight=BIG), lbe("10.0.0.2", load_balancing_weight=2))),
         "cla", "endpoints[0].lb_endpoints[1].load_balancing_weight"),
        ("locality-weight-sum", eds_cluster("c"),
         cla_dict(lle(lbe("10.0.0.1"), locality={"zone": "a"}, load_balancing_weight=BIG),
                  lle(lbe("10.0.0.2"), locality={"zone": "b"}, load_balancing_weight=2)),
         "cla", "endpoints[1].load_balancing_weight"),
        ("port-0", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1", 0))), "cla",
         "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
        ("port-65536", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1"), lbe("10.0.0.1", 65536))), "cla",
         "endpoints[0].lb_endpoints[1].endpoint.address.socket_address.port_value"),
        ("empty-address", eds_cluster("c"), cla_dict(lle(lbe(""))), "cla",
         "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
        ("named-port", eds_cluster("c"),
         cla_dict(lle({"endpoint": {"address": {"socket_address": {"address": "a", "named_port": "http"}}}})),
         "cla", "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.named_port"),
        ("pipe", eds_cluster("c"), cla_dict(lle({"endpoint": {"address": {"pipe": {"path": "/s"}}}})), "cla",
         "endpoints[0].lb_endpoints[0].endpoint.address.pipe"),
        ("no-address", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1"), {"endpoint": {"hostname": "h"}})), "cla",
         "endpoints[0].lb_endpoints[1].endpoint.address"),
        ("endpoint-name", eds_cluster("c"), cla_dict(lle({"endpoint_name": "e"})), "cla",
         "endpoints[0].lb_endpoints[0].endpoint_name"),
        ("leds", eds_cluster("c"),
         cla_dict({"leds_cluster_locality_config": {"leds_collection_name": "x"}}), "cla",
         "endpoints[0].leds_cluster_locality_config"),
        ("drop-overloads", eds_cluster("c"),
         cla_dict(policy={"drop_overloads": [{"category": "x", "drop_percentage": {"numerator": 5}}]}),
         "cla", "policy.drop_overloads[0]"),
        ("overprovisioning-0", eds_cluster("c"), cla_dict(policy={"overprovisioning_factor": 0}), "cla",
         "policy.overprovisioning_factor"),
        ("cla-without-name", eds_cluster("c"), {"endpoints": [lle(lbe("10.0.0.1", 0))]}, "c",
         "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
        ("inline-assignment", {**STATIC, "load_assignment": cla_dict(lle(lbe("10.0.0.1", 0)), name="c")}, None, "c",
         "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
        ("logical-dns-two-hosts", {"name": "c", "type": "LOGICAL_DNS",
                                   "load_assignment": cla_dict(lle(lbe("a.example"), lbe("b.example")))},
         None, "c", "load_assignment.endpoints"),
        # policy
        ("only-cswrr", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"})},
         None, "c", "load_balancing_policy"),
        ("empty-policy-list", {**STATIC, "load_balancing_policy": {}}, None, "c", "load_balancing_policy"),
        ("cluster-provided", {**STATIC, "lb_policy": "CLUSTER_PROVIDED"}, None, "c", "lb_policy"),
        ("policy-config-enum", {**STATIC, "lb_policy": "LOAD_BALANCING_POLICY_CONFIG"}, None, "c", "lb_policy"),
        ("legacy-choice-count",
         {**STATIC, "lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 1}},
         None, "c", "least_request_lb_config.choice_count"),
        ("typed-choice-count", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.least_request.v3.LeastRequest", "choice_count": 1})},
         None, "c", f"{TYPED_PATH}.choice_count"),
        ("wrr-locality-child-choice-count", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.wrr_locality.v3.WrrLocality", "endpoint_picking_policy": typed(
                {"@type": f"{LBP}.least_request.v3.LeastRequest", "choice_count": 1})})},
         None, "c",
         f"{TYPED_PATH}.endpoint_picking_policy.policies[0].typed_extension_config.typed_config.choice_count"),
        ("full-scan", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.least_request.v3.LeastRequest", "selection_method": "FULL_SCAN"})},
         None, "c", f"{TYPED_PATH}.selection_method"),
        ("legacy-min-gt-max", {**STATIC, "lb_policy": "RING_HASH",
                               "ring_hash_lb_config": {"minimum_ring_size": 100, "maximum_ring_size": 10}},
         None, "c", "ring_hash_lb_config.minimum_ring_size"),
        ("typed-max-below-default-min", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.ring_hash.v3.RingHash", "maximum_ring_size": 100})},
         None, "c", f"{TYPED_PATH}.maximum_ring_size"),
        ("legacy-murmur",
         {**STATIC, "lb_policy": "RING_HASH", "ring_hash_lb_config": {"hash_function": "MURMUR_HASH_2"}},
         None, "c", "ring_hash_lb_config.hash_function"),
        ("typed-murmur", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.ring_hash.v3.RingHash", "hash_function": "MURMUR_HASH_2"})},
         None, "c", f"{TYPED_PATH}.hash_function"),
        ("legacy-table-size", {**STATIC, "lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 100}},
         None, "c", "maglev_lb_config.table_size"),
        ("typed-table-size", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.maglev.v3.Maglev", "table_size": 65536})}, None, "c", f"{TYPED_PATH}.table_size"),
        ("legacy-hash-balance", {**STATIC, "lb_policy": "MAGLEV",
                                 "common_lb_config": {"consistent_hashing_lb_config": {"hash_balance_factor": 150}}},
         None, "c", "common_lb_config.consistent_hashing_lb_config.hash_balance_factor"),
        ("typed-hash-balance", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.ring_hash.v3.RingHash", "hash_balance_factor": 150})},
         None, "c", f"{TYPED_PATH}.hash_balance_factor"),
        ("typed-hash-policy", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.maglev.v3.Maglev",
             "consistent_hashing_lb_config": {"hash_policy": [{"header": {"header_name": "x"}}]}})},
         None, "c", f"{TYPED_PATH}.consistent_hashing_lb_config.hash_policy"),
        ("hostname-hashing-on-static", {**STATIC, "lb_policy": "RING_HASH", "common_lb_config": {
            "consistent_hashing_lb_config": {"use_hostname_for_hashing": True}}},
         None, "c", "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing"),
        ("panic-threshold", {**STATIC, "common_lb_config": {"healthy_panic_threshold": {"value": 150}}},
         None, "c", "common_lb_config.healthy_panic_threshold.value"),
        ("original-dst", {"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}, None, "c", "type"),
        ("aggregate", {"name": "c", "cluster_type": {"name": "envoy.clusters.aggregate"}}, None, "c", "cluster_type"),
        ("subset", {**STATIC, "lb_subset_config": {"subset_selectors": [{"keys": ["version"]}]}}, None, "c",
         "lb_subset_config.subset_selectors"),
        # parse errors
        ("unknown-cla-field", eds_cluster("c"),
         cla_dict(lle({"endpoint": {"address": {"socketAddress": {"address": "a", "portVal": 1}}}})), "cla",
         "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.portVal"),
        ("bad-enum", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1", healthStatus="FOO"))), "cla",
         "endpoints[0].lb_endpoints[0].health_status"),
        ("bad-int", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1", "x"))), "cla",  # type: ignore[arg-type]
         "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
        ("negative-weight", eds_cluster("c"), cla_dict(lle(lbe("10.0.0.1"), lbe("10.0.0.2", loadBalancingWeight=-1))),
         "cla", "endpoints[0].lb_endpoints[1].load_balancing_weight"),
        ("unknown-cluster-field", {**STATIC, "lbPolcy": "RANDOM"}, None, "c", "lbPolcy"),
        ("bad-typed-config-field", {**STATIC, "load_balancing_policy": typed(
            {"@type": f"{LBP}.maglev.v3.Maglev", "tableSise": 7})},
         None, "c", f"{TYPED_PATH}.tableSise"),
        ("bad-inline-cla-field",
         {**STATIC, "load_assignment": {"cluster_name": "c", "endpoints": [{"priority": "high"}]}},
         None, "c", "load_assignment.endpoints[0].priority"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("cluster, cla, resource, field", _invalid_cases())
def test_invalid_config(cluster: Dict[str, Any], cla: Optional[Dict[str, Any]], resource: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments(cluster, cla)
    assert (info.value.resource, info.value.field) == (resource, field), str(info.value)
    assert resource in str(info.value) and field in str(info.value)
    # The same through LoadBalancer.from_xds.
    with pytest.raises(ConfigError):
        lb_py.LoadBalancer.from_xds(cluster, cla)


def test_invalid_message_values() -> None:
    # Things a dict cannot express but a message (e.g. decoded from the wire) can.
    cla = as_message(endpoint_pb2.ClusterLoadAssignment, cla_dict(lle(lbe("10.0.0.1"), lbe("10.0.0.2"))))
    cla.endpoints[0].lb_endpoints[1].health_status = 42  # open enum: unknown value kept
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments(as_message(cluster_pb2.Cluster, eds_cluster("c")), cla)
    assert (info.value.resource, info.value.field) == ("cla", "endpoints[0].lb_endpoints[1].health_status")

    cluster = as_message(cluster_pb2.Cluster, {"name": "c", "load_balancing_policy": typed(
        {"@type": f"{LBP}.round_robin.v3.RoundRobin"})})
    cluster.load_balancing_policy.policies[0].typed_extension_config.typed_config.value = b"\xff\xff"
    with pytest.raises(ConfigError) as info:
        load_balancer_arguments(cluster)
    assert info.value.field == TYPED_PATH
