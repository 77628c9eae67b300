"""The node meshcore presents in the Envoy shape (what istio-agent sends for an Envoy sidecar, no
GENERATOR, so istiod picks its sidecar generator) and in the gRPC shape (the bootstrap unchanged)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import pytest
from google.protobuf import json_format

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.bootstrap import (
    DEFAULT_ISTIO_VERSION,
    SHAPES,
    Bootstrap,
    BootstrapError,
    node_for_shape,
    sidecar_node,
)
from meshcore.xds.client import Backoff, XdsClient
from meshcore.xds.model import CLUSTER, LISTENER

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ISTIO_GRPC = FIXTURES / "istio" / "grpc-bootstrap.json"

POD_PORTS = ('[\n  {"name":"http","containerPort":9080,"protocol":"TCP"}\n'
             '  ,{"containerPort":15090,"protocol":"TCP","hostIP":"x"}\n]')

#: What Istio's injection template gives a sidecar container (plus the pod's labels as JSON).
SIDECAR_ENV = {
    "POD_NAME": "reviews-v1-7f99cc4496-gdxfn",
    "POD_NAMESPACE": "bookinfo",
    "INSTANCE_IP": "10.244.1.7",
    "SERVICE_ACCOUNT": "bookinfo-reviews",
    "HOST_IP": "172.18.0.2",
    "ISTIO_META_POD_PORTS": POD_PORTS,
    "ISTIO_META_APP_CONTAINERS": "reviews",
    "ISTIO_META_CLUSTER_ID": "Kubernetes",
    "ISTIO_META_NODE_NAME": "kind-worker",
    "ISTIO_META_INTERCEPTION_MODE": "REDIRECT",
    "ISTIO_META_WORKLOAD_NAME": "reviews-v1",
    "ISTIO_META_OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1",
    "ISTIO_META_MESH_ID": "cluster.local",
    "TRUST_DOMAIN": "cluster.local",
    "PATH": "/usr/bin",
}

EXPECTED_METADATA: Dict[str, Any] = {
    "NAME": "reviews-v1-7f99cc4496-gdxfn",
    "NAMESPACE": "bookinfo",
    "SERVICE_ACCOUNT": "bookinfo-reviews",
    "INSTANCE_IPS": "10.244.1.7",
    "ISTIO_VERSION": DEFAULT_ISTIO_VERSION,
    "POD_PORTS": '[{"name":"http","containerPort":9080,"protocol":"TCP"},{"containerPort":15090,"protocol":"TCP"}]',
    "APP_CONTAINERS": "reviews",
    "CLUSTER_ID": "Kubernetes",
    "NODE_NAME": "kind-worker",
    "INTERCEPTION_MODE": "REDIRECT",
    "WORKLOAD_NAME": "reviews-v1",
    "OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1",
    "MESH_ID": "cluster.local",
}


def metadata(node: Any) -> Dict[str, Any]:
    return json_format.MessageToDict(node.metadata)


def test_sidecar_node_from_the_environment() -> None:
    node = sidecar_node(None, SIDECAR_ENV, pod_info_dir=None)
    assert node.id == "sidecar~10.244.1.7~reviews-v1-7f99cc4496-gdxfn.bookinfo~bookinfo.svc.cluster.local"
    assert metadata(node) == EXPECTED_METADATA
    assert "GENERATOR" not in metadata(node)
    assert node.cluster == "reviews-v1.bookinfo"  # no app label: the workload name
    assert node.user_agent_name == "meshcore" and list(node.client_features)


def test_sidecar_node_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith(("ISTIO_META", "POD_", "INSTANCE_IP", "SERVICE_ACCOUNT", "PROXY_CONFIG")):
            monkeypatch.delenv(key)
    for key, value in SIDECAR_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ISTIO_METAJSON_LABELS", '{"app":"reviews","version":"v1"}')
    monkeypatch.setenv("ISTIO_META_GENERATOR", "grpc")  # ignored in the Envoy shape
    boot = Bootstrap.from_dict({"xds_servers": [{"server_uri": "istiod.istio-system.svc:15010",
                                                 "channel_creds": [{"type": "insecure"}]}]})
    envoy = boot.for_shape("envoy", pod_info_dir=None)
    assert envoy is not boot and envoy.xds_servers == boot.xds_servers
    meta = metadata(envoy.node)
    labels = {"app": "reviews", "version": "v1"}
    assert meta == {**EXPECTED_METADATA, "LABELS": labels, "STATIC_LABELS": labels, **labels}
    assert envoy.node.cluster == "reviews.bookinfo"
    assert envoy.node.id.startswith("sidecar~10.244.1.7~")
    assert boot.for_shape("grpc") is boot


def test_istio_agent_bootstrap_loses_generator_and_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    boot = Bootstrap.load(ISTIO_GRPC)
    assert metadata(boot.node)["GENERATOR"] == "grpc"
    with caplog.at_level(logging.INFO, logger="meshcore.xds.bootstrap"):
        envoy = boot.for_shape("envoy", {"ISTIO_META_CLUSTER_ID": "Kubernetes", "ISTIO_META_ISTIO_VERSION": "1.99"},
                               pod_info_dir=None)
    assert any("GENERATOR" in r.getMessage() and "removed" in r.getMessage() for r in caplog.records)
    meta = metadata(envoy.node)
    assert meta == {
        "INSTANCE_IPS": "127.0.0.1",
        "ISTIO_VERSION": "version",  # the bootstrap's values win over the environment
        "METADATA_DISCOVERY": "false",
        "PILOT_SAN": ["istiod.istio-system.svc"],
        "WORKLOAD_IDENTITY_SOCKET_FILE": "socket",
        "CLUSTER_ID": "Kubernetes",
    }
    assert envoy.node.id == boot.node.id == "sidecar~127.0.0.1~pod1.fake-namespace~fake-namespace.svc.cluster.local"
    assert envoy.node.cluster == "istio-proxy"
    # the gRPC shape: unchanged, GENERATOR included; the original bootstrap is untouched
    assert boot.for_shape("grpc") is boot and metadata(boot.node)["GENERATOR"] == "grpc"
    assert node_for_shape(boot.node, "grpc") is boot.node
    with pytest.raises(ValueError, match="unknown shape"):
        boot.for_shape("linkerd")
    assert SHAPES == ("grpc", "envoy")


def test_node_id_is_built_when_the_bootstrap_has_none_of_the_sidecar_kind() -> None:
    from meshcore.xds.bootstrap import _Reader

    node = _Reader("<test>").node({"id": "meshcore-test", "metadata": {"GENERATOR": "grpc", "KEEP": 1}}, "node")
    out = sidecar_node(node, {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.9"}, pod_info_dir=None,
                       dns_domain="ns.svc.example.org")
    assert out.id == "sidecar~10.0.0.9~p.ns~ns.svc.example.org"
    assert metadata(out) == {"KEEP": 1, "NAME": "p", "NAMESPACE": "ns", "INSTANCE_IPS": "10.0.0.9",
                             "ISTIO_VERSION": DEFAULT_ISTIO_VERSION}
    assert metadata(node)["GENERATOR"] == "grpc"  # the input node is not modified
    # IPv6 and extra addresses, de-duplicated
    out = sidecar_node(None, {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "fd00::0:7"},
                       instance_ips=["fd00::7", "10.1.1.1"], pod_info_dir=None)
    assert out.id == "sidecar~fd00::7~p.ns~ns.svc.cluster.local"
    assert metadata(out)["INSTANCE_IPS"] == "fd00::7,10.1.1.1"


def test_missing_environment_is_named() -> None:
    with pytest.raises(BootstrapError) as info:
        sidecar_node(None, {"POD_NAMESPACE": "ns"}, pod_info_dir=None)
    assert info.value.field == "node.id"
    assert "POD_NAME, INSTANCE_IP are not set" in str(info.value)


@pytest.mark.parametrize("key, value, expected", [
    ("ISTIO_META_LABELS", "app=x", "LABELS is an object of strings"),
    ("ISTIO_META_ENVOY_STATUS_PORT", "15021", "ENVOY_STATUS_PORT is a number"),
    ("ISTIO_META_DNS_CAPTURE", "yes", "DNS_CAPTURE is a boolean"),
    ("ISTIO_META_PILOT_SAN", "istiod", "PILOT_SAN is a list of strings"),
    ("ISTIO_META_POD_PORTS", "8080", "expected a JSON list"),
    ("ISTIO_METAJSON_X", '{"NAMESPACE": 3}', "NAMESPACE is a string"),
])
def test_metadata_the_agent_would_refuse(key: str, value: str, expected: str) -> None:
    """Values istiod's node metadata struct cannot hold: the agent fails to start on them (and
    istiod would reject the stream), so meshcore refuses them up front."""
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1", key: value}
    with pytest.raises(BootstrapError, match=expected):
        sidecar_node(None, env, pod_info_dir=None)


def test_agent_encodings() -> None:
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1",
           "ISTIO_META_DNS_CAPTURE": "1", "ISTIO_META_ENABLE_HBONE": "0", "ISTIO_META_CUSTOM": "anything",
           "ISTIO_METAJSON_ANNOTATIONS": '{"ANNOTATIONS": {"a": "b"}, "extra": [1, 2]}',
           "ISTIO_META_INSTANCE_IPS": "1.2.3.4",  # replaced by the addresses found, as the agent does
           "PROXY_CONFIG": json.dumps({"concurrency": 2, "proxyMetadata": {"ISTIO_META_DNS_AUTO_ALLOCATE": "true",
                                                                        "ISTIO_META_CUSTOM": "from proxy config"}})}
    meta = metadata(sidecar_node(None, env, pod_info_dir=None))
    assert meta["DNS_CAPTURE"] == "true" and meta["ENABLE_HBONE"] == "0"
    assert meta["CUSTOM"] == "anything"  # the environment wins over proxyMetadata
    assert meta["DNS_AUTO_ALLOCATE"] == "true"
    assert meta["ANNOTATIONS"] == {"a": "b"} and meta["extra"] == [1, 2]
    assert meta["INSTANCE_IPS"] == "10.0.0.1"
    assert meta["PROXY_CONFIG"]["concurrency"] == 2
    assert meta["ISTIO_VERSION"] == DEFAULT_ISTIO_VERSION
    meta = metadata(sidecar_node(None, {**env, "ISTIO_META_ISTIO_VERSION": "1.28.1"}, pod_info_dir=None,
                                 istio_version="1.0.0"))
    assert meta["ISTIO_VERSION"] == "1.28.1"
    meta = metadata(sidecar_node(None, {"POD_NAME": "p", "POD_NAMESPACE": "ns", "ISTIO_META_INSTANCE_IPS": "1.2.3.4"},
                                 pod_info_dir=None))
    assert meta["INSTANCE_IPS"] == "1.2.3.4"  # no address found: the given one stays


def test_pod_info_files(tmp_path: Path) -> None:
    (tmp_path / "labels").write_text('app="ratings"\npod-template-hash="5d8b9"\n'
                                     'istio-locality="us-east1.us-east1-b"\nversion="v2"')
    (tmp_path / "annotations").write_text('kubectl.kubernetes.io/default-container="ratings"\n'
                                          'sidecar.istio.io/status="{\\"initContainers\\":[\\"istio-init\\"]}"')
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.1",
           "ISTIO_METAJSON_LABELS": '{"static": "yes"}'}
    node = sidecar_node(None, env, pod_info_dir=str(tmp_path))
    meta = metadata(node)
    assert meta["LABELS"] == {"static": "yes", "app": "ratings", "istio-locality": "us-east1/us-east1-b",
                              "version": "v2"}
    assert meta["STATIC_LABELS"] == {"static": "yes"}
    assert meta["ANNOTATIONS"] == {"kubectl.kubernetes.io/default-container": "ratings",
                                   "sidecar.istio.io/status": '{"initContainers":["istio-init"]}'}
    assert (node.locality.region, node.locality.zone, node.locality.sub_zone) == ("us-east1", "us-east1-b", "")
    assert node.cluster == "ratings.ns"
    # no such directory: nothing read
    assert "ANNOTATIONS" not in metadata(sidecar_node(None, env, pod_info_dir=str(tmp_path / "none")))


def test_the_envoy_shape_node_reaches_the_control_plane() -> None:
    env = dict(SIDECAR_ENV)
    with ControlPlane() as cp:
        cp.set_resources([b.cluster("c1")])
        boot = Bootstrap.from_dict({
            "xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}]}],
            "node": {"id": "ignored-id", "metadata": {"GENERATOR": "grpc"}},
        }).for_shape("envoy", env, pod_info_dir=None)
        client = XdsClient(boot, wildcard_types=(LISTENER, CLUSTER), backoff=Backoff(initial=0.05)).start()
        try:
            assert client.wait_wildcard_ready(CLUSTER, 5)
            first = [e for e in cp.history if e["dir"] == "req"][0]
            assert first["node"]["id"] == (
                "sidecar~10.244.1.7~reviews-v1-7f99cc4496-gdxfn.bookinfo~bookinfo.svc.cluster.local")
            assert first["node"]["metadata"] == EXPECTED_METADATA
        finally:
            client.close()
