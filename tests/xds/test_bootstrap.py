"""The xDS bootstrap loader: real Istio/go-control-plane bootstraps, gRPC's env-var rules, error
field paths, A47 listener names, and channels built from the result that actually connect."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

import meshcore
from meshcore import ConfigError
from meshcore.xds.bootstrap import (
    Bootstrap,
    BootstrapError,
    ChannelCreds,
    XdsServer,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ISTIO_GRPC = FIXTURES / "istio" / "grpc-bootstrap.json"
ISTIO_GRPCGEN = FIXTURES / "istio" / "xds_bootstrap.json"
ISTIO_ENVOY = FIXTURES / "istio" / "default_golden.json"
GCP_ADS = FIXTURES / "go-control-plane" / "bootstrap-ads.yaml"

CONNECT_TIMEOUT = 5.0


def _minimal(**extra: Any) -> Dict[str, Any]:
    return {"xds_servers": [{"server_uri": "localhost:15010", "channel_creds": [{"type": "insecure"}]}], **extra}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP_CONFIG", raising=False)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (``sun_path`` is limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mcbs", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(address: str, creds: Optional[grpc.ServerCredentials] = None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    server.start()
    return server, port


def _connects(server: XdsServer, target: Optional[str] = None, timeout: float = CONNECT_TIMEOUT) -> bool:
    creds = server.channel_credentials()
    target = target or server.grpc_target()
    options = server.channel_options()
    channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


# -- real bootstraps ----------------------------------------------------------------------------


def test_istio_agent_grpc_bootstrap():
    b = Bootstrap.load(ISTIO_GRPC)
    assert b.source == str(ISTIO_GRPC)
    (server,) = b.xds_servers
    assert server.server_uri == "unix:///etc/istio/XDS" == server.grpc_target()
    assert server.creds_type == "insecure" and server.channel_credentials() is None
    assert server.server_features == ("xds_v3",)
    assert not server.ignore_resource_deletion and not server.fail_on_data_errors
    assert b.node_id == "sidecar~127.0.0.1~pod1.fake-namespace~fake-namespace.svc.cluster.local"
    assert b.node.metadata["GENERATOR"] == "grpc"
    assert list(b.node.metadata["PILOT_SAN"]) == ["istiod.istio-system.svc"]
    assert not b.node.HasField("locality") or b.node.locality.ListFields() == []
    assert b.node.cluster == ""
    assert b.server_listener_resource_name_template == "xds.istio.io/grpc/lds/inbound/%s"
    assert b.client_default_listener_resource_name_template == "%s"
    assert b.api_type == "GRPC" and not b.delta
    provider = b.certificate_providers["default"]
    assert provider.plugin_name == "file_watcher"
    assert provider.certificate_file == "/cert/path/cert-chain.pem"
    assert provider.private_key_file == "/cert/path/key.pem"
    assert provider.ca_certificate_file == "/cert/path/root-cert.pem"
    assert provider.refresh_interval == 900.0


def test_node_reaches_the_discovery_request():
    b = Bootstrap.load(ISTIO_GRPC)
    wire = discovery_pb2.DiscoveryRequest(node=b.node, type_url="x").SerializeToString()
    node = discovery_pb2.DiscoveryRequest.FromString(wire).node
    assert node.id == b.node_id
    assert node.metadata["GENERATOR"] == "grpc"
    assert node.metadata["INSTANCE_IPS"] == "127.0.0.1"
    assert node.user_agent_name == "meshcore"
    assert node.user_agent_version.startswith(meshcore.__version__ + " python 3.")
    assert list(node.client_features) == ["xds.config.resource-in-sotw", "xds.config.supports-resource-in-sotw"]
    assert "envoy.lb.does_not_support_overprovisioning" not in node.client_features


def test_bootstrap_values_for_grpc_filled_node_fields_are_replaced():
    data = _minimal(node={"id": "n", "user_agent_name": "evil", "client_features": ["x"]})
    node = Bootstrap.from_dict(data).node
    assert node.user_agent_name == "meshcore" and "x" not in node.client_features


def test_istio_grpcgen_bootstrap_with_typos():
    b = Bootstrap.load(str(ISTIO_GRPCGEN))
    assert b.xds_servers[0].grpc_target() == "localhost:14057"
    assert b.node_id == "sidecar~127.0.1.1~echo.test~cluster.local"
    assert b.node.metadata["NAMESPACE"] == "test"
    assert not b.node.HasField("locality")  # "localisty" is ignored, like gRPC does
    assert b.certificate_providers["default"].certificate_file.endswith("cert-chain.pem")


def test_istio_envoy_bootstrap_delta_ads_over_pipe():
    b = Bootstrap.load(ISTIO_ENVOY)
    assert b.api_type == "DELTA_GRPC" and b.delta
    (server,) = b.xds_servers
    assert server.grpc_target() == "unix:///tmp/XDS"
    assert server.creds_type == "insecure"
    assert b.node_id == "sidecar~1.2.3.4~foo~bar"
    assert b.node.cluster == "istio-proxy"
    assert b.node.metadata["PROXY_CONFIG"]["discoveryAddress"] == "istio-pilot:15010"
    assert b.node.metadata["ENVOY_STATUS_PORT"] == 15021
    assert b.certificate_providers == {} and b.authorities == {}


def test_go_control_plane_yaml_bootstrap():
    b = Bootstrap.load(GCP_ADS)
    assert b.api_type == "GRPC"
    assert [s.grpc_target() for s in b.xds_servers] == ["127.0.0.1:18000"]
    assert (b.node_id, b.node.cluster) == ("test-id", "test-cluster")


def test_envoy_bootstrap_variants():
    base = json.loads(ISTIO_ENVOY.read_text())
    clusters = base["static_resources"]["clusters"]
    xds = next(c for c in clusters if c["name"] == "xds-grpc")
    pipe = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]

    pipe["path"] = "./etc/istio/proxy/XDS"
    assert Bootstrap.from_dict(base).xds_servers[0].grpc_target() == "unix:./etc/istio/proxy/XDS"
    pipe["path"] = "@xds"
    assert Bootstrap.from_dict(base).xds_servers[0].grpc_target() == "unix-abstract:xds"

    v6 = copy.deepcopy(base)
    ep = next(c for c in v6["static_resources"]["clusters"] if c["name"] == "xds-grpc")
    ep["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
        "socket_address": {"address": "::1", "port_value": "15010"}}
    assert Bootstrap.from_dict(v6).xds_servers[0].grpc_target() == "[::1]:15010"

    google = copy.deepcopy(base)
    services = [{"google_grpc": {"target_uri": "dns:///istiod:15010"}}]
    google["dynamic_resources"]["ads_config"]["grpc_services"] = services
    google["dynamic_resources"]["ads_config"]["api_type"] = "AGGREGATED_GRPC"
    b = Bootstrap.from_dict(google)
    assert (b.xds_servers[0].grpc_target(), b.api_type) == ("dns:///istiod:15010", "GRPC")


def test_envoy_bootstrap_camel_case():
    data = {
        "node": {"id": "n1", "cluster": "c1", "locality": {"region": "r", "subZone": "s"}},
        "dynamicResources": {"adsConfig": {"apiType": "DELTA_GRPC",
                                           "grpcServices": [{"envoyGrpc": {"clusterName": "xds"}}]}},
        "staticResources": {"clusters": [{"name": "xds", "loadAssignment": {"clusterName": "xds", "endpoints": [
            {"lbEndpoints": [{"endpoint": {"address": {
                "socketAddress": {"address": "10.0.0.1", "portValue": 15010}}}}]}]}}]},
    }
    b = Bootstrap.from_dict(data)
    assert (b.xds_servers[0].grpc_target(), b.api_type, b.node_id) == ("10.0.0.1:15010", "DELTA_GRPC", "n1")
    assert (b.node.locality.region, b.node.locality.sub_zone) == ("r", "s")


def test_meshcore_extension_selects_delta():
    assert Bootstrap.from_dict(_minimal(meshcore={"api_type": "DELTA_GRPC"})).api_type == "DELTA_GRPC"
    assert Bootstrap.from_dict(_minimal(meshcore={})).api_type == "GRPC"


def test_unknown_fields_are_ignored_everywhere():
    data = {
        "xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "insecure", "extra": 1}],
                         "server_features": ["xds_v3", "something_new"], "future": {}}],
        "node": {"id": "n", "locality": {"zone": "z", "planet": "mars"}, "new_field": [1]},
        "authorities": {"a": {"xds_servers": [], "fallback_on_reachability_only": True}},
        "certificate_providers": {"p": {"plugin_name": "spiffe", "config": {"anything": 1}, "x": 2}},
        "allowed_grpc_services": {},
        "brand_new_top_level": {"x": 1},
    }
    b = Bootstrap.from_dict(data)
    assert b.node.locality.zone == "z"
    assert b.certificate_providers["p"].plugin_name == "spiffe"
    assert b.authorities["a"].client_listener_resource_name_template == "xdstp://a/envoy.config.listener.v3.Listener/%s"


def test_servers_in_order_with_features_and_creds_choice():
    data = {"xds_servers": [
        {"server_uri": "dns:///primary:443", "channel_creds": [{"type": "google_default"}, {"type": "insecure"}],
         "server_features": ["ignore_resource_deletion", "fail_on_data_errors", "resource_timer_is_transient_error",
                             "trusted_xds_server"]},
        {"server_uri": "secondary:15010", "channel_creds": [{"type": "tls", "config": {}}, {"type": "insecure"}]},
    ]}
    primary, fallback = Bootstrap.from_dict(data).xds_servers
    assert primary.grpc_target() == "dns:///primary:443" and primary.creds_type == "insecure"
    assert primary.ignore_resource_deletion and primary.fail_on_data_errors
    assert primary.resource_timer_is_transient_error and primary.trusted_xds_server
    assert fallback.creds_type == "tls"


def test_servers_compare_and_hash_like_a47_dedup_keys():
    a = Bootstrap.from_dict(_minimal()).xds_servers[0]
    b = XdsServer("localhost:15010", (ChannelCreds("insecure"),), (), source="x", path="authorities[x].xds_servers[0]")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    tls = ChannelCreds("tls", {"ca_certificate_file": "/ca.pem"})
    assert XdsServer("h:1", (tls,)) != XdsServer("h:1", (ChannelCreds("tls", {}),))
    with pytest.raises(TypeError):
        tls.config["ca_certificate_file"] = "/other"  # type: ignore[index]


def test_channel_options_lift_message_limits():
    options = dict(Bootstrap.from_dict(_minimal()).xds_servers[0].channel_options())
    assert options["grpc.max_receive_message_length"] == -1
    assert options["grpc.max_send_message_length"] == -1
    assert options["grpc.keepalive_time_ms"] >= 300_000  # grpc-go servers' default MinTime


# -- where the bootstrap comes from -------------------------------------------------------------


def test_env_file_wins_over_inline_config(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(ISTIO_GRPCGEN))
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", ISTIO_GRPC.read_text())
    b = Bootstrap.load()
    assert b.xds_servers[0].grpc_target() == "localhost:14057" and b.source == str(ISTIO_GRPCGEN)


def test_env_inline_config(monkeypatch):
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", "")  # empty counts as unset
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", ISTIO_GRPC.read_text())
    b = Bootstrap.load()
    assert b.xds_servers[0].grpc_target() == "unix:///etc/istio/XDS"
    assert b.source == "GRPC_XDS_BOOTSTRAP_CONFIG"


def test_env_yaml_file(monkeypatch):
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(GCP_ADS))
    assert Bootstrap.load().node_id == "test-id"


def test_no_bootstrap_configured_says_how():
    with pytest.raises(BootstrapError) as info:
        Bootstrap.load()
    assert "GRPC_XDS_BOOTSTRAP" in str(info.value) and "GRPC_XDS_BOOTSTRAP_CONFIG" in str(info.value)


def test_env_file_missing(monkeypatch, tmp_path):
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(missing))
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", json.dumps(_minimal()))
    with pytest.raises(BootstrapError) as info:
        Bootstrap.load()
    assert info.value.resource == str(missing)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_load_accepts_paths_and_mappings():
    assert Bootstrap.load(_minimal()).source == "<dict>"
    assert Bootstrap.load(ISTIO_GRPC).node_id == Bootstrap.from_json(ISTIO_GRPC.read_text()).node_id
    with pytest.raises(TypeError):
        Bootstrap.load(42)  # type: ignore[arg-type]


def test_broken_json_and_yaml(tmp_path):
    with pytest.raises(BootstrapError) as info:
        Bootstrap.from_json('{"xds_servers": [', source="inline")
    assert (info.value.resource, info.value.field) == ("inline", "(root)") and "line 1" in str(info.value)
    bad = tmp_path / "b.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(BootstrapError) as info:
        Bootstrap.load(bad)
    assert info.value.resource == str(bad) and "YAML" in str(info.value)


# -- errors name the field ----------------------------------------------------------------------

_SERVER = {"server_uri": "a:1", "channel_creds": [{"type": "insecure"}]}


def _with_server(**changes: Any) -> Dict[str, Any]:
    server = {**_SERVER, **changes}
    return {"xds_servers": [{k: v for k, v in server.items() if v is not _DROP}]}


_DROP = object()


@pytest.mark.parametrize("data, field", [
    ([], "(root)"),
    ({}, "xds_servers"),
    ({"xds_servers": {"server_uri": "a:1"}}, "xds_servers"),
    ({"xds_servers": []}, "xds_servers"),
    ({"xds_servers": ["a:1"]}, "xds_servers[0]"),
    (_with_server(server_uri=_DROP), "xds_servers[0].server_uri"),
    (_with_server(server_uri=""), "xds_servers[0].server_uri"),
    (_with_server(server_uri=15010), "xds_servers[0].server_uri"),
    (_with_server(channel_creds=_DROP), "xds_servers[0].channel_creds"),
    (_with_server(channel_creds=[]), "xds_servers[0].channel_creds"),
    (_with_server(channel_creds=[{"type": "google_default"}]), "xds_servers[0].channel_creds"),
    (_with_server(channel_creds=[{"config": {}}]), "xds_servers[0].channel_creds[0].type"),
    (_with_server(channel_creds=[{"type": "insecure", "config": []}]), "xds_servers[0].channel_creds[0].config"),
    (_with_server(channel_creds=[{"type": "tls", "config": {"certificate_file": "c.pem"}}]),
     "xds_servers[0].channel_creds[0].config.private_key_file"),
    (_with_server(channel_creds=[{"type": "tls", "config": {"private_key_file": "k.pem"}}]),
     "xds_servers[0].channel_creds[0].config.certificate_file"),
    (_with_server(channel_creds=[{"type": "tls", "config": {"ca_certificate_file": 1}}]),
     "xds_servers[0].channel_creds[0].config.ca_certificate_file"),
    (_with_server(server_features="xds_v3"), "xds_servers[0].server_features"),
    (_with_server(server_features=["xds_v3", 3]), "xds_servers[0].server_features[1]"),
    ({"xds_servers": [_SERVER, {"server_uri": "b:1"}]}, "xds_servers[1].channel_creds"),
    (_minimal(node="n"), "node"),
    (_minimal(node={"id": 7}), "node.id"),
    (_minimal(node={"locality": []}), "node.locality"),
    (_minimal(node={"locality": {"zone": 1}}), "node.locality.zone"),
    (_minimal(node={"metadata": ["x"]}), "node.metadata"),
    (_minimal(server_listener_resource_name_template=1), "server_listener_resource_name_template"),
    (_minimal(client_default_listener_resource_name_template=[]), "client_default_listener_resource_name_template"),
    (_minimal(authorities=[]), "authorities"),
    (_minimal(authorities={"a": {"client_listener_resource_name_template": "xdstp://b/x/%s"}}),
     "authorities[a].client_listener_resource_name_template"),
    (_minimal(authorities={"a": {"client_listener_resource_name_template": "a/%s"}}),
     "authorities[a].client_listener_resource_name_template"),
    (_minimal(authorities={"a": {"xds_servers": [{"channel_creds": []}]}}), "authorities[a].xds_servers[0].server_uri"),
    (_minimal(certificate_providers={"d": {"config": {}}}), "certificate_providers[d].plugin_name"),
    (_minimal(certificate_providers={"d": {"plugin_name": "file_watcher", "config": {}}}),
     "certificate_providers[d].config"),
    (_minimal(certificate_providers={"d": {"plugin_name": "file_watcher", "config": {
        "ca_certificate_file": "ca.pem", "refresh_interval": "ten minutes"}}}),
     "certificate_providers[d].config.refresh_interval"),
    (_minimal(meshcore={"api_type": "REST"}), "meshcore.api_type"),
    (_minimal(meshcore="delta"), "meshcore"),
    ({"static_resources": {}}, "dynamic_resources.ads_config"),
    ({"dynamic_resources": {"ads_config": {"api_type": "REST", "grpc_services": []}}},
     "dynamic_resources.ads_config.api_type"),
    ({"dynamic_resources": {"ads_config": {"grpc_services": []}}}, "dynamic_resources.ads_config.grpc_services"),
    ({"dynamic_resources": {"ads_config": {"grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}}},
     "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name"),
    ({"dynamic_resources": {"ads_config": {"grpc_services": [{"google_grpc": {
        "target_uri": "x:1", "channel_credentials": {"ssl_credentials": {}}}}]}}},
     "dynamic_resources.ads_config.grpc_services[0].google_grpc.channel_credentials"),
])
def test_errors_name_the_field(data, field):
    with pytest.raises(BootstrapError) as info:
        Bootstrap.from_dict(data, source="test.json")
    assert info.value.resource == "test.json"
    assert info.value.field == field, str(info.value)


def _envoy_with_cluster(cluster: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "static_resources": {"clusters": [{"name": "other"}, {"name": "xds", **cluster}]},
    }


_EP0 = "static_resources.clusters[1].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"


@pytest.mark.parametrize("cluster, field, words", [
    ({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {}}},
     "static_resources.clusters[1].transport_socket", "TLS in Envoy bootstraps is not supported"),
    ({"transport_socket": {"name": "tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}}},
     "static_resources.clusters[1].transport_socket", "TLS"),
    ({"load_assignment": {"endpoints": [{"lb_endpoints": []}]}}, "static_resources.clusters[1].load_assignment",
     "no endpoint address"),
    ({"load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
        "socket_address": {"address": "h", "port_value": 0}}}}]}]}},
     _EP0 + ".socket_address.port_value", "port"),
    ({"load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
        "envoy_internal_address": {}}}}]}]}},
     _EP0, "pipe"),
])
def test_envoy_bootstrap_errors(cluster, field, words):
    with pytest.raises(BootstrapError) as info:
        Bootstrap.from_dict(_envoy_with_cluster(cluster))
    assert info.value.field == field and words in str(info.value)


def test_plain_tcp_transport_socket_is_fine():
    cluster = {"transport_socket": {"name": "envoy.transport_sockets.raw_buffer"},
               "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                   "socket_address": {"address": "istiod.istio-system.svc", "port_value": 15010}}}}]}]}}
    target = Bootstrap.from_dict(_envoy_with_cluster(cluster)).xds_servers[0].grpc_target()
    assert target == "istiod.istio-system.svc:15010"


# -- A47 listener names and authorities ---------------------------------------------------------

_FEDERATED = _minimal(
    client_default_listener_resource_name_template="xdstp://mesh/envoy.config.listener.v3.Listener/%s",
    authorities={
        "mesh": {},
        "other": {"client_listener_resource_name_template": "xdstp://other/envoy.config.listener.v3.Listener/grpc/%s",
                  "xds_servers": [{"server_uri": "other-cp:443", "channel_creds": [{"type": "insecure"}]}]},
    },
)


@pytest.mark.parametrize("data, target, name", [
    (_minimal(), "reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local:9080"),
    (_minimal(), "xds:///reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local:9080"),
    (_minimal(), "xds:reviews:9080", "reviews:9080"),
    (_minimal(), "xds:///a b", "a b"),  # plain template: no encoding
    (_minimal(client_default_listener_resource_name_template="grpc/client/%s?x=%s"), "xds:///svc:80",
     "grpc/client/svc:80?x=svc:80"),
    (_FEDERATED, "xds:///svc.ns:80", "xdstp://mesh/envoy.config.listener.v3.Listener/svc.ns:80"),
    # query and fragment are not part of the name (gRPC parses the target as a URI) ...
    (_FEDERATED, "xds:///a b/c?d#e", "xdstp://mesh/envoy.config.listener.v3.Listener/a%20b/c"),
    # ... but encoded ones are, and are encoded again for xdstp:
    (_FEDERATED, "xds:///c%3Fd%23e", "xdstp://mesh/envoy.config.listener.v3.Listener/c%3Fd%23e"),
    (_FEDERATED, "xds:///x%20y", "xdstp://mesh/envoy.config.listener.v3.Listener/x%20y"),
    (_FEDERATED, "xds://mesh/svc:80", "xdstp://mesh/envoy.config.listener.v3.Listener/svc:80"),
    (_FEDERATED, "xds://other/svc.ns/v1;x=1@[::1]",
     "xdstp://other/envoy.config.listener.v3.Listener/grpc/svc.ns/v1;x=1@%5B::1%5D"),
])
def test_listener_name(data, target, name):
    assert Bootstrap.from_dict(data).listener_name(target) == name


def test_listener_name_unknown_authority_and_bad_targets():
    b = Bootstrap.from_dict(_FEDERATED, source="fed.json")
    with pytest.raises(BootstrapError) as info:
        b.listener_name("xds://nowhere/svc:80")
    assert (info.value.resource, info.value.field) == ("fed.json", "authorities[nowhere]")
    for target in ("dns:///svc:80", "xds:///", ""):
        with pytest.raises(ValueError):
            b.listener_name(target)


def test_servers_for_follows_the_authority():
    b = Bootstrap.from_dict(_FEDERATED)
    top = b.xds_servers
    assert b.servers_for("reviews:9080") == top
    assert b.servers_for(b.listener_name("xds:///svc:80")) == top  # "mesh" has no servers of its own
    assert [s.server_uri for s in b.servers_for(b.listener_name("xds://other/svc:80"))] == ["other-cp:443"]
    assert [s.server_uri for s in b.servers_for("xdstp://other/envoy.config.cluster.v3.Cluster/c")] == ["other-cp:443"]
    with pytest.raises(BootstrapError):
        b.servers_for("xdstp://nowhere/envoy.config.cluster.v3.Cluster/c")


# -- channels built from the bootstrap connect --------------------------------------------------


def test_insecure_unix_target_connects(sock_dir):
    sock = sock_dir / "xds.sock"
    server, _ = _serve(f"unix://{sock}")
    try:
        entry = {"server_uri": f"unix://{sock}", "channel_creds": [{"type": "insecure"}]}
        b = Bootstrap.from_dict({"xds_servers": [entry]})
        assert _connects(b.xds_servers[0])
    finally:
        server.stop(None)


def test_istio_style_unix_dot_target_is_absolute_in_grpcio(sock_dir, monkeypatch, tmp_path):
    """``unix:///./etc/istio/proxy/XDS`` means ``/./etc/istio/proxy/XDS``: absolute, cwd-independent."""
    sock = sock_dir / "XDS"
    server, _ = _serve(f"unix://{sock}")
    try:
        monkeypatch.chdir(tmp_path)  # not "/": a cwd-relative reading would miss the socket
        uri = "unix:///." + str(sock)
        b = Bootstrap.from_dict({"xds_servers": [{"server_uri": uri, "channel_creds": [{"type": "insecure"}]}]})
        assert b.xds_servers[0].grpc_target() == uri
        assert _connects(b.xds_servers[0])
    finally:
        server.stop(None)


def test_envoy_relative_pipe_target_is_cwd_relative(sock_dir, monkeypatch):
    server, _ = _serve(f"unix://{sock_dir / 'XDS'}")
    try:
        data = _envoy_with_cluster({"load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"pipe": {"path": "./XDS"}}}}]}]}})
        target = Bootstrap.from_dict(data).xds_servers[0]
        assert target.grpc_target() == "unix:./XDS"
        monkeypatch.chdir(sock_dir)
        assert _connects(target)
    finally:
        server.stop(None)


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Dict[str, Path]:
    """Self-signed CA-capable cert for localhost (openssl CLI; ``cryptography`` is not installed)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("certs")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return {"cert": cert, "key": key}


def _tls(config: Dict[str, Any], uri: str = "localhost:1") -> XdsServer:
    data = {"xds_servers": [{"server_uri": uri, "channel_creds": [{"type": "tls", "config": config}]}]}
    return Bootstrap.from_dict(data, source="tls.json").xds_servers[0]


def test_tls_channel_credentials(certs):
    ca, cert, key = str(certs["cert"]), str(certs["cert"]), str(certs["key"])
    for config in ({}, {"ca_certificate_file": ca},
                   {"ca_certificate_file": ca, "certificate_file": cert, "private_key_file": key}):
        server = _tls(config)
        assert server.creds_type == "tls"
        assert isinstance(server.channel_credentials(), grpc.ChannelCredentials)


def test_tls_files_are_read_at_call_time(tmp_path, certs):
    ca = tmp_path / "ca.pem"
    server = _tls({"ca_certificate_file": str(ca)})  # loading does not touch the file
    with pytest.raises(BootstrapError) as info:
        server.channel_credentials()
    assert info.value.resource == "tls.json"
    assert info.value.field == "xds_servers[0].channel_creds[0].config.ca_certificate_file"
    shutil.copy(certs["cert"], ca)
    assert isinstance(server.channel_credentials(), grpc.ChannelCredentials)


def test_tls_channel_connects_and_verifies(certs):
    key_pair = (certs["key"].read_bytes(), certs["cert"].read_bytes())
    server, port = _serve("localhost:0", grpc.ssl_server_credentials([key_pair]))
    try:
        assert _connects(_tls({"ca_certificate_file": str(certs["cert"])}, f"localhost:{port}"))
        # grpcio's default roots do not trust the self-signed cert: the CA file really is used
        assert not _connects(_tls({}, f"localhost:{port}"), timeout=1.0)
    finally:
        server.stop(None)


def test_missing_client_key_file_names_the_field(tmp_path, certs):
    server = _tls({"certificate_file": str(certs["cert"]), "private_key_file": str(tmp_path / "gone.pem")})
    with pytest.raises(BootstrapError) as info:
        server.channel_credentials()
    assert info.value.field == "xds_servers[0].channel_creds[0].config.private_key_file"
    assert "gone.pem" in str(info.value)


def test_no_supported_creds_on_a_hand_built_server():
    server = XdsServer("h:1", (ChannelCreds("google_default"),))
    with pytest.raises(BootstrapError) as info:
        _ = server.creds_type
    assert info.value.field == "xds_servers[0].channel_creds"
