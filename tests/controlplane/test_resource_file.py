"""meshcore.xds.resource_file: every accepted shape, YAML and JSON, camelCase, and errors that name
the file and the resource."""

from __future__ import annotations

import json
import textwrap

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from meshcore.controlplane import builders as b
from meshcore.errors import ConfigError
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS
from meshcore.xds.resource_file import (
    load_resource_file,
    parse_resource,
    parse_resources,
)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

LISTENER_DICT = {
    "@type": LISTENER, "name": "greeter",
    "api_listener": {"api_listener": {
        "@type": HCM, "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"},
                              "route_config_name": "greeter-route"},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}},
}
ROUTE_DICT = {"@type": ROUTE, "name": "greeter-route", "virtual_hosts": [
    {"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": ""}, "route": {"cluster": "greeter-cluster"}}]}]}
CLUSTER_DICT = {"@type": CLUSTER, "name": "greeter-cluster", "type": "EDS", "connect_timeout": "1s",
                "eds_cluster_config": {"eds_config": {"ads": {}}, "service_name": "greeter-endpoints"}}
ENDPOINT_DICT = {"@type": ENDPOINT, "cluster_name": "greeter-endpoints", "endpoints": [{
    "locality": {"zone": "z1"}, "load_balancing_weight": 1,
    "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 50051}}}}]}]}
ALL = [LISTENER_DICT, ROUTE_DICT, CLUSTER_DICT, ENDPOINT_DICT]


def _untyped(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "@type"}


def _check_all(result: dict) -> None:
    assert set(result) == set(TYPE_URLS)
    assert list(result[LISTENER]) == ["greeter"]
    assert list(result[ROUTE]) == ["greeter-route"]
    assert list(result[CLUSTER]) == ["greeter-cluster"]
    assert list(result[ENDPOINT]) == ["greeter-endpoints"]
    hcm = hcm_pb2.HttpConnectionManager()
    assert result[LISTENER]["greeter"].api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == "greeter-route"
    assert result[CLUSTER]["greeter-cluster"].connect_timeout.seconds == 1
    cla = result[ENDPOINT]["greeter-endpoints"]
    assert cla.endpoints[0].load_balancing_weight.value == 1
    assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 50051


@pytest.mark.parametrize("shape", ["list", "resources", "by_kind", "by_kind_typed", "by_type_url", "wrapped"])
def test_shapes(shape: str) -> None:
    doc = {
        "list": ALL,
        "resources": {"version_info": "7", "resources": ALL},
        "by_kind": {"listeners": [_untyped(LISTENER_DICT)], "routes": [_untyped(ROUTE_DICT)],
                    "clusters": [_untyped(CLUSTER_DICT)], "endpoints": [_untyped(ENDPOINT_DICT)]},
        "by_kind_typed": {"listeners": [LISTENER_DICT], "route_configs": [ROUTE_DICT],
                          "clusters": [CLUSTER_DICT], "load_assignments": [ENDPOINT_DICT]},
        "by_type_url": {LISTENER: {"greeter": LISTENER_DICT}, ROUTE: {"greeter-route": ROUTE_DICT},
                        CLUSTER: {"greeter-cluster": CLUSTER_DICT}, ENDPOINT: {"greeter-endpoints": ENDPOINT_DICT}},
        "wrapped": [{"@type": "type.googleapis.com/envoy.service.discovery.v3.Resource", "name": "greeter",
                     "version": "abc", "resource": LISTENER_DICT}] + ALL[1:],
    }[shape]
    _check_all(parse_resources(doc))


def test_single_resource_and_empty_document() -> None:
    result = parse_resources(CLUSTER_DICT)
    assert list(result[CLUSTER]) == ["greeter-cluster"] and not result[LISTENER]
    assert parse_resources([]) == {url: {} for url in TYPE_URLS}
    assert parse_resources(None) == {url: {} for url in TYPE_URLS}


def test_messages_any_and_resource_wrapper() -> None:
    cl = b.cluster("c1")
    packed = any_pb2.Any()
    packed.Pack(b.assignment("e1", [("127.0.0.1", 1)]))
    wrapper = discovery_pb2.Resource(name="l1", resource=b.pack(b.api_listener("l1", "r1")))
    result = parse_resources([cl, packed, wrapper])
    assert result[CLUSTER]["c1"] == cl
    assert list(result[ENDPOINT]) == ["e1"] and list(result[LISTENER]) == ["l1"]
    assert parse_resource(cl) == (CLUSTER, "c1", cl)


def test_bootstrap_static_resources_and_config_dump() -> None:
    bootstrap = {"node": {"id": "x"}, "static_resources": {"listeners": [_untyped(LISTENER_DICT)],
                                                          "clusters": [_untyped(CLUSTER_DICT)]}}
    result = parse_resources(bootstrap)
    assert list(result[LISTENER]) == ["greeter"] and list(result[CLUSTER]) == ["greeter-cluster"]
    dump = {"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
         "dynamic_listeners": [{"name": "greeter", "active_state": {"version_info": "1", "listener": LISTENER_DICT}}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
         "dynamic_active_clusters": [{"version_info": "1", "cluster": CLUSTER_DICT}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
         "dynamic_route_configs": [{"route_config": ROUTE_DICT}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
         "dynamic_endpoint_configs": [{"endpoint_config": ENDPOINT_DICT}]},
    ]}
    _check_all(parse_resources(dump))


def test_camel_case_and_unknown_fields() -> None:
    camel = {"@type": CLUSTER, "name": "c", "type": "EDS", "connectTimeout": "2.5s", "lbPolicy": "LEAST_REQUEST",
             "edsClusterConfig": {"edsConfig": {"ads": {}}, "serviceName": "svc"}}
    cl = parse_resources([camel])[CLUSTER]["c"]
    assert cl.connect_timeout.seconds == 2 and cl.connect_timeout.nanos == 500_000_000
    assert cl.eds_cluster_config.service_name == "svc"
    assert cl.lb_policy == cl.LEAST_REQUEST
    # an unknown field is an error, as in Envoy's JSON/YAML loading (binary protobuf ignores them)
    e = _error([{**camel, "someFutureField": {"x": 1}}], "f.yaml")
    assert (e.resource, e.field) == ("f.yaml", "resources[0].someFutureField")
    assert "Cluster 'c'" in e.reason and "unknown field" in e.reason


def test_yaml_and_json_files(tmp_path) -> None:
    yaml_text = textwrap.dedent(f"""\
        # a comment: this is YAML
        listeners:
        - name: greeter
          api_listener:
            api_listener:
              "@type": {HCM}
              rds:
                config_source: {{ads: {{}}, resource_api_version: V3}}
                route_config_name: greeter-route
              http_filters:
              - name: envoy.filters.http.router
                typed_config: {{"@type": {ROUTER}}}
        routes:
        - name: greeter-route
          virtualHosts:
          - {{name: vh, domains: ["*"], routes: [{{match: {{prefix: ""}}, route: {{cluster: greeter-cluster}}}}]}}
        clusters:
        - name: greeter-cluster
          type: EDS
          connect_timeout: 1s
          eds_cluster_config: {{eds_config: {{ads: {{}}}}, service_name: greeter-endpoints}}
        endpoints:
        - cluster_name: greeter-endpoints
          endpoints:
          - locality: {{zone: z1}}
            load_balancing_weight: 1
            lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 50051}}}}}}
        """)
    y = tmp_path / "resources.yaml"
    y.write_text(yaml_text)
    _check_all(load_resource_file(y))
    j = tmp_path / "resources.json"
    j.write_text(json.dumps({"resources": ALL}))
    _check_all(load_resource_file(str(j)))
    # content decides, not the extension
    odd = tmp_path / "resources.txt"
    odd.write_text(json.dumps(ALL))
    _check_all(load_resource_file(odd))


def _error(doc, source="<resources>") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_resources(doc, source)
    return info.value


def test_errors_name_source_and_index() -> None:
    e = _error([CLUSTER_DICT, ROUTE_DICT, LISTENER_DICT, {"@type": "type.googleapis.com/foo.Bar", "name": "x"}],
               "file.yaml")
    assert (e.resource, e.field) == ("file.yaml", "resources[3]")
    assert "unknown @type" in e.reason and "foo.Bar" in str(e)
    e = _error({"resources": [CLUSTER_DICT, _untyped(ROUTE_DICT)]})
    assert e.field == "resources[1]" and "missing @type" in e.reason
    e = _error({"clusters": [CLUSTER_DICT, {**CLUSTER_DICT, "connect_timeout": "soon"}]}, "x.json")
    assert (e.resource, e.field) == ("x.json", "clusters[1].connect_timeout") and "Cluster 'greeter-cluster'" in e.reason
    e = _error({"clusters": [ROUTE_DICT]})
    assert e.field == "clusters[0]" and "was expected" in e.reason
    e = _error([CLUSTER_DICT, {**CLUSTER_DICT, "lb_policy": "MAGLEV"}])
    assert e.field == "resources[1]" and "duplicate" in e.reason and "resources[0]" in e.reason
    e = _error([{"@type": CLUSTER, "type": "EDS"}])
    assert e.field == "resources[0]" and "without a name" in e.reason
    e = _error([{"@type": ENDPOINT, "endpoints": []}])
    assert "cluster_name" in e.reason
    e = _error({"something": 1})
    assert e.field == "(document)"
    e = _error([42])
    assert e.field == "resources[0]" and "object" in e.reason
    # a type in a proto package meshcore has, but not a message of it: unknown to Envoy too
    e = _error([{"@type": LISTENER, "name": "l", "api_listener": {"api_listener": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.NoSuch"}}}])
    assert e.field == "resources[0].api_listener.api_listener.@type" and "unknown type" in e.reason
    # the same name in two types is fine
    assert parse_resources([{**CLUSTER_DICT, "name": "x"}, {**ROUTE_DICT, "name": "x"}])


def test_file_errors(tmp_path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_resource_file(missing)
    assert info.value.resource == str(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n  - {name: x\n")
    with pytest.raises(ConfigError) as info:
        load_resource_file(bad)
    assert info.value.resource == str(bad) and info.value.field == "(document)"
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"- {{'@type': {CLUSTER}, name: ok, type: EDS}}\n- {{'@type': {CLUSTER}, name: ok}}\n")
    with pytest.raises(ConfigError) as info:
        load_resource_file(wrong)
    assert (info.value.resource, info.value.field) == (str(wrong), "resources[1]")


def test_unknown_type_packages_are_not_remembered() -> None:
    """The table of imported proto packages holds installed packages only: a file's made-up
    ``@type`` names (any number of them) leave nothing behind."""
    from meshcore.xds import resource_file

    for i in range(3):
        pkg = f"envoy.no_such_package_{i}.v3"
        route = {"@type": ROUTE, "name": f"r{i}", "virtual_hosts": [{
            "name": "vh", "domains": ["*"],
            "typed_per_filter_config": {"f": {"@type": f"type.googleapis.com/{pkg}.Thing", "x": 1}}}]}
        parse_resource(route)  # an uninstalled package: kept unchecked (TypedStruct)
        assert pkg not in resource_file._imported_packages
    route = {"@type": ROUTE, "name": "ok", "virtual_hosts": [{
        "name": "vh", "domains": ["*"],
        "typed_per_filter_config": {"f": {"@type": "type.googleapis.com/envoy.config.rbac.v3.NoSuchMessage"}}}]}
    with pytest.raises(ConfigError, match="unknown type"):  # an installed package lacking the message
        parse_resource(route)
    assert "envoy.config.rbac.v3" in resource_file._imported_packages
