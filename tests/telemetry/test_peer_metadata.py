"""Istio's HTTP metadata exchange (``x-envoy-peer-metadata``): decoding what a real Istio sidecar
sends (built here from istio/proxy's field list, extensions/common/metadata_object.cc
``convertWorkloadMetadataToStruct``), round-tripping ours, EDS ``istio.workload``."""

from __future__ import annotations

import base64

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshcore.telemetry import peer_metadata as pm


def sidecar_header(pad: bool = True) -> str:
    """What a sidecar of pod reviews-v1-7d8f9-abcde (Deployment reviews-v1, namespace default)
    sends: the Struct convertWorkloadMetadataToStruct builds, serialized deterministically,
    base64 (Envoy's Base64::encode pads)."""
    st = struct_pb2.Struct()
    st.fields["NAME"].string_value = "reviews-v1-7d8f9-abcde"
    st.fields["NAMESPACE"].string_value = "default"
    st.fields["WORKLOAD_NAME"].string_value = "reviews-v1"
    st.fields["CLUSTER_ID"].string_value = "Kubernetes"
    labels = st.fields["LABELS"].struct_value
    labels.fields["service.istio.io/canonical-name"].string_value = "reviews"
    labels.fields["service.istio.io/canonical-revision"].string_value = "v1"
    labels.fields["app"].string_value = "reviews"
    labels.fields["version"].string_value = "v1"
    st.fields["OWNER"].string_value = "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1"
    st.fields["REGION"].string_value = "us-east1"
    st.fields["AVAILABILITY_ZONE"].string_value = "us-east1-b"
    out = base64.b64encode(st.SerializeToString(deterministic=True)).decode()
    return out if pad else out.rstrip("=")


@pytest.mark.parametrize("pad", [True, False])
def test_decode_what_an_istio_sidecar_sends(pad):
    value = sidecar_header(pad)
    assert pad or not value.endswith("=")
    d = pm.decode(value)
    assert d["WORKLOAD_NAME"] == "reviews-v1" and d["LABELS"]["app"] == "reviews"
    w = pm.workload_of(d)
    assert (w.name, w.namespace, w.workload_name, w.cluster_id) == ("reviews-v1-7d8f9-abcde", "default",
                                                                    "reviews-v1", "Kubernetes")
    assert (w.canonical_name, w.canonical_revision, w.app_name, w.app_version) == ("reviews", "v1", "reviews", "v1")
    assert (w.workload_type, w.region, w.zone, w.identity) == ("deployment", "us-east1", "us-east1-b", "")
    assert w.owner == "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1"
    # re-encoding what we read gives the sidecar's bytes back (same fields, deterministic order)
    assert pm.encode(pm.struct_of(w)) == sidecar_header(True)
    assert pm.decode_cached(value) is pm.decode_cached(value)  # shared, decoded once


def test_decode_rejects_garbage():
    assert pm.decode("not base64 !!") is None
    assert pm.decode(base64.b64encode(b"\xff\xff\xff").decode()) is None
    assert pm.decode("") is None and pm.decode(None) is None


def test_qualified_labels_win_and_unknown_owner_kinds():
    w = pm.workload_of({"WORKLOAD_NAME": "x", "NAMESPACE": "n", "OWNER": "kubernetes://apis/v1/namespaces/n/foos/x",
                        "LABELS": {"app": "a", "app.kubernetes.io/name": "qa", "version": "1",
                                   "app.kubernetes.io/version": "q1", "team": "t"}}, additional_labels=("team",))
    assert (w.app_name, w.app_version, w.labels, w.workload_type, w.owner) == ("qa", "q1", (("team", "t"),), "", None)
    assert pm.workload_of({"OWNER": "kubernetes://apis/apps/v1/namespaces/n/cronjobs/x", "WORKLOAD_NAME": "x"}
                          ).workload_type == "cronjob"


def test_struct_of_leaves_out_empty_fields_but_keeps_labels():
    assert pm.struct_of(pm.Workload()) == {"LABELS": {}}
    value = pm.encode({"LABELS": {}})
    raw = struct_pb2.Struct()
    raw.ParseFromString(base64.b64decode(value))
    assert raw.fields["LABELS"].WhichOneof("kind") == "struct_value"


def test_endpoint_metadata():
    w = pm.from_endpoint("reviews-v2;default;reviews;v2;Kubernetes")
    assert (w.workload_name, w.namespace, w.canonical_name, w.canonical_revision, w.cluster_id) == (
        "reviews-v2", "default", "reviews", "v2", "Kubernetes")
    assert pm.from_endpoint("a;b;c;d") is None


def test_our_exchange_from_the_bootstrap_node():
    node = base_pb2.Node(id="sidecar~10.1.2.3~productpage-v1-123.default~default.svc.cluster.local")
    node.metadata.update({"WORKLOAD_NAME": "productpage-v1", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
                          "MESH_ID": "cluster.local", "ISTIO_VERSION": "1.28.0", "NAME": "productpage-v1-123",
                          "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
                          "LABELS": {"app": "productpage", "version": "v1",
                                     "service.istio.io/canonical-name": "productpage",
                                     "service.istio.io/canonical-revision": "v1", "pod-template-hash": "123"}})
    node.locality.region, node.locality.zone = "r1", "z1"
    ex = pm.local_exchange(node)
    assert ex.headers[0] == ("x-envoy-peer-metadata-id", node.id)
    assert ex.headers[1][0] == "x-envoy-peer-metadata"
    assert ex.headers_bytes == tuple((k.encode(), v.encode()) for k, v in ex.headers)
    sent = pm.decode(ex.value)
    # what MXPropagationMethod::computeValue sends: Istio's fields only (no MESH_ID, ISTIO_VERSION,
    # no other labels), OWNER rebuilt, locality from the node
    assert sent == {"NAME": "productpage-v1-123", "NAMESPACE": "default", "WORKLOAD_NAME": "productpage-v1",
                    "CLUSTER_ID": "Kubernetes", "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/"
                                                         "productpage-v1",
                    "REGION": "r1", "AVAILABILITY_ZONE": "z1",
                    "LABELS": {"app": "productpage", "version": "v1", "service.istio.io/canonical-name": "productpage",
                               "service.istio.io/canonical-revision": "v1"}}
    # deterministic: map keys sorted on the wire
    raw = base64.b64decode(ex.value)
    keys = [k.encode() for k in sorted(sent)]
    positions = [raw.index(k) for k in keys]
    assert positions == sorted(positions)


def test_strip_pairs():
    pairs = [(b"content-type", b"x"), (b"X-Envoy-Peer-Metadata", b"abc"), (b"x-envoy-peer-metadata-id", b"id")]
    kept, value = pm.strip_pairs(pairs)
    assert kept == [(b"content-type", b"x")] and value == "abc"
    same = [("a", "b")]
    assert pm.strip_pairs(same) == (same, None) and pm.strip_pairs(same)[0] is same
