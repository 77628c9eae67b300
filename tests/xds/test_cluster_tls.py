"""``cluster_spec``'s TLS decoding: ``transport_socket`` / ``transport_socket_matches`` with
``UpstreamTlsContext`` -> ``UpstreamTlsSpec`` (Envoy's meaning, gRPC A29's limits).

Covers istiod's proxyless (grpcgen) shape and an Istio sidecar's auto-mTLS shape exactly as
shared/docs/security.md §1.1 and §3.4 give them (built as protobuf messages), every Cluster of
the real Istio config dumps in tests/fixtures/istio, every NACK with its field path and reason,
and the bootstrap ``certificate_providers`` check, also over a real ADS stream.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, struct_pb2

from meshcore import ConfigError
from meshcore._route_model import StringMatchSpec
from meshcore.xds.cluster_config import cluster_spec
from meshcore.xds.model import CLUSTER, CertificateRef, SanMatcherSpec, TransportSocketMatchSpec, UpstreamTlsSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_support import FIXTURES, RAW_BUFFER, TLS, UDPA_TYPED_STRUCT, load_json, resources  # noqa: E402

NAME = "outbound|9080||reviews.default.svc.cluster.local"
SPIFFE = ("spiffe://cluster.local/ns/default/sa/bookinfo-reviews", "spiffe://cluster.local/ns/default/sa/default")
TS = "transport_socket.typed_config"
CTX = f"{TS}.common_tls_context"
VC = f"{CTX}.validation_context"
COMBINED = f"{CTX}.combined_validation_context"
DVC = f"{COMBINED}.default_validation_context"
SDS_CONFIG = {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                    "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}
IDENTITY = {"instance_name": "default", "certificate_name": "default"}
ROOTS = {"instance_name": "default", "certificate_name": "ROOTCA"}
ROOTS_VC = {"ca_certificate_provider_instance": ROOTS}
PROVIDER_IDENTITY = CertificateRef("provider", "default", "default")
PROVIDER_ROOTS = CertificateRef("provider", "default", "ROOTCA")


def exact_untyped(*values: str) -> Tuple[SanMatcherSpec, ...]:
    return tuple(SanMatcherSpec("", StringMatchSpec("exact", v)) for v in values)


# -- protobuf builders (the shapes istiod writes) ------------------------------------------------


def _pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def eds_cluster(name: str = NAME) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.service_name = name
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def tls_socket(ctx: tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(ctx))


def grpcgen_context(sans: Tuple[str, ...] = SPIFFE, *, current: bool = True, legacy: bool = True
                    ) -> tls_pb2.UpstreamTlsContext:
    """pilot/pkg/networking/grpcgen ``buildCommonTLSContext`` (security.md §1.1): since istio#58257
    both the current (14, ca_certificate_provider_instance) and the deprecated (11, 4) fields."""
    ctx = tls_pb2.UpstreamTlsContext()
    common = ctx.common_tls_context
    if current:
        common.tls_certificate_provider_instance.CopyFrom(
            common_pb2.CertificateProviderPluginInstance(instance_name="default", certificate_name="default"))
    if legacy:
        common.tls_certificate_certificate_provider_instance.CopyFrom(
            tls_pb2.CommonTlsContext.CertificateProviderInstance(instance_name="default", certificate_name="default"))
    combined = common.combined_validation_context
    dvc = combined.default_validation_context
    if current:
        dvc.ca_certificate_provider_instance.CopyFrom(
            common_pb2.CertificateProviderPluginInstance(instance_name="default", certificate_name="ROOTCA"))
    for s in sans:
        dvc.match_subject_alt_names.add(exact=s)
    if legacy:
        combined.validation_context_certificate_provider_instance.CopyFrom(
            tls_pb2.CommonTlsContext.CertificateProviderInstance(instance_name="default", certificate_name="ROOTCA"))
    return ctx


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    sds = secret_pb2.SdsSecretConfig(name=name)
    api = sds.sds_config.api_config_source
    api.api_type = config_source_pb2.ApiConfigSource.GRPC
    api.transport_api_version = config_source_pb2.V3
    api.grpc_services.append(grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="sds-grpc")))
    sds.sds_config.resource_api_version = config_source_pb2.V3
    return sds


SIDECAR_SNI = "outbound_.9080_._.reviews.default.svc.cluster.local"


def sidecar_auto_mtls(name: str = NAME) -> cluster_pb2.Cluster:
    """pilot/pkg/networking/core/cluster_tls.go auto-mTLS (security.md §3.4)."""
    ctx = tls_pb2.UpstreamTlsContext(sni=SIDECAR_SNI)
    common = ctx.common_tls_context
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    common.alpn_protocols.extend(["istio-peer-exchange", "istio"])
    common.tls_certificate_sds_secret_configs.append(_sds("default"))
    combined = common.combined_validation_context
    for s in SPIFFE:
        combined.default_validation_context.match_subject_alt_names.add(exact=s)
    combined.validation_context_sds_secret_config.CopyFrom(_sds("ROOTCA"))
    c = eds_cluster(name)
    istio = c.transport_socket_matches.add(name="tlsMode-istio", transport_socket=tls_socket(ctx))
    istio.match.update({"tlsMode": "istio"})
    c.transport_socket_matches.add(name="tlsMode-disabled", transport_socket=base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=_pack(raw_buffer_pb2.RawBuffer())))
    return c


SIDECAR_TLS = UpstreamTlsSpec(
    sni=SIDECAR_SNI, identity=CertificateRef("sds", "default"), roots=CertificateRef("sds", "ROOTCA"),
    san_matchers=exact_untyped(*SPIFFE), alpn_protocols=("istio-peer-exchange", "istio"),
    min_version="TLSv1_2", max_version="TLSv1_3",
)


# -- dict builders (for the many small variants) ---------------------------------------------------


def eds(name: str = NAME, **fields: Any) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, **fields}


def socket(common: Dict[str, Any], **ctx: Any) -> Dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": TLS, "common_tls_context": common, **ctx}}


def with_roots(**common: Any) -> Dict[str, Any]:
    return {"validation_context": dict(ROOTS_VC), **common}


def tls_of(common: Dict[str, Any], providers: Any = None, **ctx: Any) -> Optional[UpstreamTlsSpec]:
    return cluster_spec(eds(transport_socket=socket(common, **ctx)), providers).tls


def error_of(config: Any, providers: Any = None) -> Tuple[str, str, str]:
    with pytest.raises(ConfigError) as info:
        cluster_spec(config, providers)
    return info.value.resource, info.value.field, info.value.reason


# -- istiod's proxyless shape (security.md §1.1) -------------------------------------------------


def test_grpcgen_shape_exact() -> None:
    c = eds_cluster()
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context()))
    spec = cluster_spec(c, {"default"})
    assert spec.tls == UpstreamTlsSpec(identity=PROVIDER_IDENTITY, roots=PROVIDER_ROOTS,
                                       san_matchers=exact_untyped(*SPIFFE))
    assert (spec.tls.certificate_provider_instance, spec.tls.ca_provider_instance) == ("default", "default")
    assert spec.transport_socket_matches == ()
    again = cluster_spec(cluster_pb2.Cluster.FromString(c.SerializeToString()), {"default"})
    assert again == spec and hash(again) == hash(spec)
    assert cluster_spec(_pack(c)) == cluster_spec(json_format.MessageToDict(c)) == spec


@pytest.mark.parametrize("current, legacy", [(True, False), (False, True), (True, True)])
def test_grpcgen_current_and_deprecated_fields(current: bool, legacy: bool) -> None:
    c = eds_cluster()
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context(current=current, legacy=legacy)))
    assert cluster_spec(c, {"default"}).tls == UpstreamTlsSpec(
        identity=PROVIDER_IDENTITY, roots=PROVIDER_ROOTS, san_matchers=exact_untyped(*SPIFFE))


def test_grpcgen_without_service_accounts_has_no_san_check() -> None:
    c = eds_cluster()
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context(sans=())))
    tls = cluster_spec(c).tls
    assert tls is not None and tls.san_matchers == () and tls.roots == PROVIDER_ROOTS


def test_current_fields_win_over_deprecated_ones() -> None:
    ctx = grpcgen_context()
    common = ctx.common_tls_context
    common.tls_certificate_certificate_provider_instance.instance_name = "old"
    common.combined_validation_context.validation_context_certificate_provider_instance.instance_name = "old"
    c = eds_cluster()
    c.transport_socket.CopyFrom(tls_socket(ctx))
    # only the instances in use are checked against the bootstrap: "old" is not looked up
    tls = cluster_spec(c, {"default"}).tls
    assert tls is not None and (tls.identity, tls.roots) == (PROVIDER_IDENTITY, PROVIDER_ROOTS)


# -- Istio sidecar auto-mTLS (security.md §3.4) ---------------------------------------------------


def test_sidecar_auto_mtls_shape() -> None:
    c = sidecar_auto_mtls()
    spec = cluster_spec(c, frozenset())  # SDS names are not bootstrap provider instances
    assert spec.tls is None  # no transport_socket: the matches decide per endpoint
    assert spec.transport_socket_matches == (
        TransportSocketMatchSpec("tlsMode-istio", (("tlsMode", "istio"),), SIDECAR_TLS),
        TransportSocketMatchSpec("tlsMode-disabled", (), None),
    )
    assert hash(spec) == hash(cluster_spec(json_format.MessageToDict(c)))
    assert cluster_spec(json_format.MessageToDict(c, preserving_proto_field_name=True)) == spec


def test_socket_match_values_are_plain_and_hashable() -> None:
    c = sidecar_auto_mtls()
    c.transport_socket_matches[0].match.update({"n": 2, "on": True, "list": ["a", {"z": 1, "b": None}],
                                                "obj": {"y": "1", "x": [1.5]}})
    spec = cluster_spec(c)
    match = dict(spec.transport_socket_matches[0].match)
    assert [k for k, _ in spec.transport_socket_matches[0].match] == sorted(match)
    assert match["tlsMode"] == "istio" and match["n"] == 2 and match["on"] is True
    assert match["list"] == ("a", (("b", None), ("z", 1)))
    assert match["obj"] == (("x", (1.5,)), ("y", "1"))
    hash(spec)


def test_transport_socket_and_matches_together() -> None:
    c = sidecar_auto_mtls()
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context()))
    spec = cluster_spec(c, {"default"})
    assert spec.tls is not None and spec.tls.identity == PROVIDER_IDENTITY
    assert len(spec.transport_socket_matches) == 2


# -- real config dumps ------------------------------------------------------------------------------

# A waypoint's cluster to Envoy's internal listener (internal_upstream transport socket).
KNOWN_NACKS = {"inbound-vip|8000|http|httpbin.default.svc.cluster.local": "transport_socket.typed_config"}


def _known_types(node: Any) -> Any:
    """``node`` without the objects whose ``@type`` the protobuf pool does not know (Istio's own
    filters), so ``json_format`` can parse the rest."""
    pool = descriptor_pool.Default()
    if isinstance(node, dict):
        t = node.get("@type")
        if isinstance(t, str):
            try:
                pool.FindMessageTypeByName(t.rpartition("/")[2])
            except KeyError:
                return None
        out = {}
        for k, v in node.items():
            v2 = _known_types(v)
            if v2 is not None:
                out[k] = v2
        return out
    if isinstance(node, list):
        return [v2 for v2 in (_known_types(v) for v in node) if v2 is not None]
    return node


def _dump_files() -> List[str]:
    return sorted(glob.glob(str(FIXTURES / "istio" / "**" / "*.json"), recursive=True))


def _dump_clusters() -> List[Tuple[str, Dict[str, Any]]]:
    out = []
    for path in _dump_files():
        with open(path) as f:
            dump = json.load(f)
        for c in resources(dump, "envoy.config.cluster.v3.Cluster"):
            out.append((os.path.relpath(path, FIXTURES), c))
    return out


DUMP_CLUSTERS = _dump_clusters()


def test_dumps_hold_tls_clusters() -> None:
    assert len(DUMP_CLUSTERS) >= 4
    assert any("transport_socket_matches" in c for _, c in DUMP_CLUSTERS)


@pytest.mark.parametrize("where, config", DUMP_CLUSTERS, ids=[f"{w}:{c['name']}" for w, c in DUMP_CLUSTERS])
def test_every_dump_cluster_decodes(where: str, config: Dict[str, Any]) -> None:
    body = {k: v for k, v in _known_types(config).items() if k != "@type"}
    msg = json_format.ParseDict(body, cluster_pb2.Cluster())
    name = msg.name
    if name in KNOWN_NACKS:
        assert error_of(msg)[:2] == (name, KNOWN_NACKS[name])
        return
    spec = cluster_spec(msg)
    assert spec == cluster_spec(config)  # the dict path (unknown typed configs trimmed) agrees
    hash(spec)
    for m in msg.transport_socket_matches:
        assert any(s.name == m.name for s in spec.transport_socket_matches)
    if msg.name == "outbound|9080|v1|productpage.default.svc.cluster.local":  # http_config.json
        istio, disabled = spec.transport_socket_matches
        assert istio.match == (("tlsMode", "istio"),) and disabled == TransportSocketMatchSpec("tlsMode-disabled")
        assert istio.tls == UpstreamTlsSpec(
            sni="outbound_.9080_.v1_.productpage.default.svc.cluster.local",
            identity=CertificateRef("sds", "default"), roots=CertificateRef("sds", "ROOTCA"),
            san_matchers=exact_untyped("spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                                       "spiffe://cluster.local/ns/default/sa/default"),
            alpn_protocols=("istio-peer-exchange", "istio"), min_version="TLSv1_2", max_version="TLSv1_3")


def _v2_tls_clusters() -> List[Dict[str, Any]]:
    """The 2019 dump's v2 clusters with a ``tls_context`` (file certificates, Istio's pre-SDS
    mTLS), converted to v3: ``tls_context`` -> ``transport_socket``, ``verify_subject_alt_name``
    -> exact ``match_subject_alt_names``."""
    out = []
    for c in resources(load_json("istio/productpage-v1-7bbd79f8fd-k6j79.json"), "envoy.api.v2.Cluster"):
        if "tls_context" not in c:
            continue
        ctx = copy.deepcopy(c["tls_context"])
        vc = ctx["common_tls_context"]["validation_context"]
        vc["match_subject_alt_names"] = [{"exact": s} for s in vc.pop("verify_subject_alt_name", [])]
        out.append(eds(c["name"], transport_socket={"name": "envoy.transport_sockets.tls",
                                                    "typed_config": {"@type": TLS, **ctx}}))
    return out


def test_v2_dump_file_certificates_are_refused_clearly() -> None:
    clusters = _v2_tls_clusters()
    assert len(clusters) == 16
    for c in clusters:
        resource, field, reason = error_of(c)
        assert (resource, field) == (c["name"], f"{CTX}.tls_certificates")
        assert "certificate provider instance" in reason and "SDS" in reason


# -- the bootstrap's certificate providers (A29) -------------------------------------------------


@pytest.mark.parametrize("current, legacy, field", [
    (True, True, f"{CTX}.tls_certificate_provider_instance.instance_name"),
    (False, True, f"{CTX}.tls_certificate_certificate_provider_instance.instance_name"),
])
def test_unknown_identity_provider(current: bool, legacy: bool, field: str) -> None:
    c = eds_cluster()
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context(current=current, legacy=legacy)))
    for providers in ({}, {"other": object()}, frozenset({"x"})):
        assert error_of(c, providers) == (
            NAME, field, 'unrecognized certificate provider instance name: "default"')
    assert cluster_spec(c, {"default": object()}).tls is not None  # a bootstrap mapping will do
    assert cluster_spec(c).tls is not None  # None: not checked


@pytest.mark.parametrize("common, field", [
    ({"tls_certificate_provider_instance": IDENTITY,
      "validation_context": {"ca_certificate_provider_instance": {"instance_name": "roots"}}},
     f"{VC}.ca_certificate_provider_instance.instance_name"),
    ({"validation_context_certificate_provider_instance": {"instance_name": "roots"}},
     f"{CTX}.validation_context_certificate_provider_instance.instance_name"),
    ({"combined_validation_context": {"default_validation_context": {},
                                      "validation_context_certificate_provider_instance": {"instance_name": "roots"}}},
     f"{COMBINED}.validation_context_certificate_provider_instance.instance_name"),
])
def test_unknown_roots_provider(common: Dict[str, Any], field: str) -> None:
    assert error_of(eds(transport_socket=socket(common)), {"default"}) == (
        NAME, field, 'unrecognized certificate provider instance name: "roots"')
    assert tls_of(common, {"default", "roots"}) is not None


def test_unknown_provider_in_a_socket_match() -> None:
    c = sidecar_auto_mtls()
    c.transport_socket_matches[0].transport_socket.CopyFrom(tls_socket(grpcgen_context()))
    resource, field, _ = error_of(c, {"nope"})
    assert field == ("transport_socket_matches[0].transport_socket.typed_config.common_tls_context"
                     ".tls_certificate_provider_instance.instance_name")


def test_sds_names_are_not_provider_instances() -> None:
    common = {"tls_certificate_sds_secret_configs": [{"name": "default"}], "validation_context_sds_secret_config": {
        "name": "ROOTCA"}}
    assert tls_of(common, set()) == UpstreamTlsSpec(identity=CertificateRef("sds", "default"),
                                                    roots=CertificateRef("sds", "ROOTCA"))


def test_xds_client_checks_the_bootstrap_providers() -> None:
    """Over a real ADS stream: a cluster naming a provider instance the bootstrap lacks is NACKed
    with the field; one naming a defined instance is accepted."""
    from meshcore.controlplane import ControlPlane
    from meshcore.xds.bootstrap import Bootstrap
    from meshcore.xds.cache import ACKED, NACKED
    from meshcore.xds.client import Backoff, XdsClient

    good, bad = eds_cluster("good"), eds_cluster("bad")
    good.transport_socket.CopyFrom(tls_socket(grpcgen_context()))
    ctx = grpcgen_context()
    ctx.common_tls_context.tls_certificate_provider_instance.instance_name = "x"
    bad.transport_socket.CopyFrom(tls_socket(ctx))
    with ControlPlane() as cp:
        cp.set_resources([good, bad])
        boot = Bootstrap.from_dict({
            "xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "meshcore-test"},
            "certificate_providers": {"default": {"plugin_name": "file_watcher", "config": {
                "certificate_file": "/nonexistent/cert-chain.pem", "private_key_file": "/nonexistent/key.pem",
                "ca_certificate_file": "/nonexistent/root-cert.pem"}}},
        })
        client = XdsClient(boot, backoff=Backoff(initial=0.05, maximum=0.5)).start()
        try:
            client.watch(CLUSTER, "good")
            client.watch(CLUSTER, "bad")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                g, b = client.entry(CLUSTER, "good"), client.entry(CLUSTER, "bad")
                if g is not None and b is not None and g.status == ACKED and b.status == NACKED:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("no ACK/NACK in time")
            assert g.spec.tls.identity == PROVIDER_IDENTITY
            assert b.error == (f"bad: field {CTX}.tls_certificate_provider_instance.instance_name: "
                               'unrecognized certificate provider instance name: "x"')
        finally:
            client.close()


def test_resource_file_path_does_not_check_providers(tmp_path: Any) -> None:
    from meshcore.xds.file_source import FileSource

    c = eds_cluster("c")
    c.transport_socket.CopyFrom(tls_socket(grpcgen_context()))
    c.eds_cluster_config.Clear()
    c.type = cluster_pb2.Cluster.STATIC
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"clusters": [json_format.MessageToDict(c)]}))
    src = FileSource(str(path), watch=False)
    src.watch(CLUSTER, "c")
    entry = src.entry(CLUSTER, "c")
    assert entry is not None and entry.spec.tls.identity == PROVIDER_IDENTITY, entry.error


# -- SAN matchers -----------------------------------------------------------------------------------


def test_typed_san_matchers() -> None:
    vc = dict(ROOTS_VC, match_typed_subject_alt_names=[
        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
        {"san_type": "DNS", "matcher": {"exact": "*.example.com"}},
        {"san_type": "EMAIL", "matcher": {"suffix": "@example.com", "ignore_case": True}},
        {"san_type": "IP_ADDRESS", "matcher": {"safe_regex": {"regex": "10\\.0\\.0\\.[0-9]+"}}},
        {"san_type": "DNS", "matcher": {"contains": "svc"}},
    ], match_subject_alt_names=[{"safe_regex": {"regex": "("}}])  # ignored: the typed list is set (Envoy)
    tls = tls_of({"validation_context": vc})
    assert tls is not None
    kinds = [(m.san_type, m.matcher.kind, m.matcher.value, m.matcher.ignore_case) for m in tls.san_matchers]
    assert kinds == [("URI", "prefix", "spiffe://cluster.local/", False), ("DNS", "exact", "*.example.com", False),
                     ("EMAIL", "suffix", "@example.com", True), ("IP_ADDRESS", "regex", "10\\.0\\.0\\.[0-9]+", False),
                     ("DNS", "contains", "svc", False)]
    regex = tls.san_matchers[3].matcher
    assert regex.matches("10.0.0.12") and not regex.matches("10.0.0.12x")  # RE2, whole string
    assert hash(tls) == hash(tls_of({"validation_context": copy.deepcopy(vc)}))


def test_untyped_san_matchers_full_string_matcher() -> None:
    vc = dict(ROOTS_VC, match_subject_alt_names=[
        {"exact": "spiffe://cluster.local/ns/a/sa/b"}, {"prefix": "spiffe://", "ignore_case": True},
        {"suffix": ".svc"}, {"contains": "/ns/"}, {"safe_regex": {"regex": "spiffe://[^/]+/ns/a/.*"}}])
    tls = tls_of({"validation_context": vc})
    assert tls is not None
    assert [(m.san_type, m.matcher.kind) for m in tls.san_matchers] == [
        ("", "exact"), ("", "prefix"), ("", "suffix"), ("", "contains"), ("", "regex")]
    assert tls.san_matchers[1].matcher.matches("SPIFFE://x")


def test_san_matchers_with_sds_roots() -> None:
    common = {"combined_validation_context": {
        "default_validation_context": {"match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"exact": SPIFFE[0]}}]},
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS_CONFIG}}}
    assert tls_of(common) == UpstreamTlsSpec(roots=CertificateRef("sds", "ROOTCA"), san_matchers=(
        SanMatcherSpec("URI", StringMatchSpec("exact", SPIFFE[0])),))


# -- roots and identity sources ---------------------------------------------------------------------


@pytest.mark.parametrize("common, identity, roots", [
    ({"validation_context": ROOTS_VC}, None, PROVIDER_ROOTS),  # one-way TLS (Istio SIMPLE)
    ({"validation_context_certificate_provider_instance": ROOTS}, None, PROVIDER_ROOTS),
    ({"validation_context_sds_secret_config": {"name": "ROOTCA"}}, None, CertificateRef("sds", "ROOTCA")),
    ({"combined_validation_context": {"default_validation_context": ROOTS_VC,
                                      "validation_context_sds_secret_config": {"name": "ROOTCA"}}},
     None, PROVIDER_ROOTS),  # the provider instance first
    ({"combined_validation_context": {
        "default_validation_context": {},
        "validation_context_certificate_provider_instance": {"instance_name": "legacy"},
        "validation_context_sds_secret_config": {"name": "ROOTCA"}}}, None, CertificateRef("provider", "legacy")),
    ({"combined_validation_context": {"validation_context_sds_secret_config": {"name": "ROOTCA"}}},
     None, CertificateRef("sds", "ROOTCA")),
    ({"tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS_CONFIG}], "validation_context": ROOTS_VC},
     CertificateRef("sds", "default"), PROVIDER_ROOTS),
    ({"tls_certificate_provider_instance": IDENTITY, "tls_certificate_sds_secret_configs": [{"name": "default"}],
      "validation_context": ROOTS_VC}, PROVIDER_IDENTITY, PROVIDER_ROOTS),  # the provider instance wins (A29)
])
def test_identity_and_roots_sources(common: Dict[str, Any], identity: Any, roots: Any) -> None:
    tls = tls_of(common)
    assert tls is not None and (tls.identity, tls.roots) == (identity, roots)


def test_typed_struct_wrapped_context() -> None:
    ts = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UDPA_TYPED_STRUCT, "type_url": TLS,
        "value": {"sni": "a.example", "common_tls_context": {"validation_context": ROOTS_VC}}}}
    assert cluster_spec(eds(transport_socket=ts)).tls == UpstreamTlsSpec(sni="a.example", roots=PROVIDER_ROOTS)


def test_raw_buffer_is_plaintext() -> None:
    raw = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}
    assert cluster_spec(eds(transport_socket=raw)).tls is None


# -- sni, alpn, tls_params and the accepted-and-ignored fields -------------------------------------


def test_sni_alpn_params_and_flags() -> None:
    common = with_roots(
        alpn_protocols=["istio-h2", "istio,h2", ""],  # Envoy joins with "," and splits again
        tls_params={"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
                    "cipher_suites": ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"],
                    "ecdh_curves": ["X25519"], "signature_algorithms": ["ecdsa_secp256r1_sha256"],
                    "compliance_policies": ["FIPS_202205"]},
        key_log={"path": "/tmp/keys"})
    tls = tls_of(common, sni="a" * 255, auto_host_sni=True, auto_sni_san_validation=True,
                 allow_renegotiation=True, max_session_keys=4, enforce_rsa_key_usage=True)
    assert tls == UpstreamTlsSpec(
        sni="a" * 255, roots=PROVIDER_ROOTS, alpn_protocols=("istio-h2", "istio", "h2"),
        min_version="TLSv1_2", max_version="TLSv1_3",
        cipher_suites=("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
        auto_host_sni=True, auto_sni_san_validation=True)


@pytest.mark.parametrize("params, versions", [
    ({}, ("", "")),
    ({"tls_minimum_protocol_version": "TLS_AUTO", "tls_maximum_protocol_version": "TLS_AUTO"}, ("", "")),
    ({"tls_minimum_protocol_version": "TLSv1_0"}, ("TLSv1_0", "")),
    ({"tls_maximum_protocol_version": "TLSv1_1"}, ("", "TLSv1_1")),
    ({"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}, ("TLSv1_3", "TLSv1_3")),
])
def test_tls_versions(params: Dict[str, Any], versions: Tuple[str, str]) -> None:
    tls = tls_of(with_roots(tls_params=params))
    assert tls is not None and (tls.min_version, tls.max_version) == versions


def test_accepted_validation_defaults() -> None:
    vc = dict(ROOTS_VC, allow_expired_certificate=False, trust_chain_verification="VERIFY_TRUST_CHAIN",
              require_signed_certificate_timestamp=False, only_verify_leaf_cert_crl=True)
    assert tls_of({"validation_context": vc}) == UpstreamTlsSpec(roots=PROVIDER_ROOTS)


# -- NACKs ----------------------------------------------------------------------------------------

BAD_VC: List[Tuple[str, Dict[str, Any], str, str]] = [
    ("trusted-ca-file", {"trusted_ca": {"filename": "/etc/certs/root-cert.pem"}}, "trusted_ca",
     "inline or file CA certificates are not supported"),
    ("trusted-ca-inline", {"trusted_ca": {"inline_string": "-----BEGIN CERTIFICATE-----"}}, "trusted_ca",
     "inline or file CA certificates are not supported"),
    ("watched-directory", {"watched_directory": {"path": "/etc/certs"}}, "watched_directory", "not supported"),
    ("system-roots", {"system_root_certs": {}}, "system_root_certs", "system root certificates are not supported"),
    ("crl", {"crl": {"filename": "/etc/crl.pem"}}, "crl", "certificate revocation lists are not supported"),
    ("custom-validator", {"custom_validator_config": {"name": "envoy.tls.cert_validator.spiffe"}},
     "custom_validator_config", "custom certificate validators are not supported"),
    ("max-verify-depth", {"max_verify_depth": 3}, "max_verify_depth", "not supported"),
    ("spki", {"verify_certificate_spki": ["A" * 44]}, "verify_certificate_spki", "certificate pinning"),
    ("hash", {"verify_certificate_hash": ["a" * 64]}, "verify_certificate_hash", "certificate pinning"),
    ("sct", {"require_signed_certificate_timestamp": True}, "require_signed_certificate_timestamp",
     "signed certificate timestamps are not supported"),
    ("allow-expired", {"allow_expired_certificate": True}, "allow_expired_certificate",
     "accepting expired certificates is not supported"),
    ("accept-untrusted", {"trust_chain_verification": "ACCEPT_UNTRUSTED"}, "trust_chain_verification",
     "ACCEPT_UNTRUSTED is not supported"),
    ("trust-chain-undefined", {"trust_chain_verification": 7}, "trust_chain_verification",
     "value must be one of the defined enum values (got 7)"),
    ("san-unspecified", {"match_typed_subject_alt_names": [{"matcher": {"exact": "x"}}]},
     "match_typed_subject_alt_names[0].san_type", "SAN_TYPE_UNSPECIFIED"),
    ("san-other-name", {"match_typed_subject_alt_names": [
        {"san_type": "URI", "matcher": {"exact": "x"}},
        {"san_type": "OTHER_NAME", "oid": "1.3.6.1.4.1.311.20.2.3", "matcher": {"exact": "x"}}]},
     "match_typed_subject_alt_names[1].san_type", "OTHER_NAME subject alt name matchers are not supported"),
    ("san-undefined-type", {"match_typed_subject_alt_names": [{"san_type": 9, "matcher": {"exact": "x"}}]},
     "match_typed_subject_alt_names[0].san_type", "value must be one of the defined enum values (got 9)"),
    ("san-no-matcher", {"match_typed_subject_alt_names": [{"san_type": "DNS"}]},
     "match_typed_subject_alt_names[0].matcher", "value is required"),
    ("san-typed-empty-matcher", {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {}}]},
     "match_typed_subject_alt_names[0].matcher", "string matcher has no match pattern"),
    ("san-typed-bad-regex", {"match_typed_subject_alt_names": [
        {"san_type": "URI", "matcher": {"safe_regex": {"regex": "("}}}]},
     "match_typed_subject_alt_names[0].matcher.safe_regex.regex", "invalid regex"),
    ("san-untyped-empty-prefix", {"match_subject_alt_names": [{"exact": "a"}, {"prefix": ""}]},
     "match_subject_alt_names[1].prefix", "value length must be at least 1"),
    ("san-untyped-regex-ignore-case", {"match_subject_alt_names": [{"safe_regex": {"regex": "a"}, "ignore_case": True}]},
     "match_subject_alt_names[0].ignore_case", "ignore_case has no effect for safe_regex"),
    ("san-untyped-regex-too-big", {"match_subject_alt_names": [{"safe_regex": {"regex": "a{1000}"}}]},
     "match_subject_alt_names[0].safe_regex.regex", "too complex"),
    ("san-untyped-custom", {"match_subject_alt_names": [{"custom": {"name": "x"}}]},
     "match_subject_alt_names[0].custom", "unsupported string matcher"),
    ("ca-provider-empty-name", {"ca_certificate_provider_instance": {"instance_name": ""}},
     "ca_certificate_provider_instance.instance_name", "value length must be at least 1 characters"),
]


@pytest.mark.parametrize("vc, field, reason", [c[1:] for c in BAD_VC], ids=[c[0] for c in BAD_VC])
def test_validation_context_nacks(vc: Dict[str, Any], field: str, reason: str) -> None:
    # the same rule in a plain and in a combined validation context
    plain = {"validation_context": dict(ROOTS_VC, **vc)}
    resource, got_field, got_reason = error_of(eds(transport_socket=socket(plain)))
    assert (resource, got_field) == (NAME, f"{VC}.{field}") and reason in got_reason, got_reason
    combined = {"combined_validation_context": {"default_validation_context": dict(ROOTS_VC, **vc),
                                                "validation_context_sds_secret_config": {"name": "ROOTCA"}}}
    resource, got_field, got_reason = error_of(eds(transport_socket=socket(combined)))
    assert (resource, got_field) == (NAME, f"{DVC}.{field}") and reason in got_reason, got_reason


NO_ROOTS = "no root certificates"
BAD_CONTEXT: List[Tuple[str, Dict[str, Any], Dict[str, Any], str, str]] = [
    ("no-validation-context", {}, {}, CTX, NO_ROOTS),
    ("identity-only", {"tls_certificate_provider_instance": IDENTITY}, {}, CTX, NO_ROOTS),
    ("sds-identity-only", {"tls_certificate_sds_secret_configs": [{"name": "default"}]}, {}, CTX, NO_ROOTS),
    ("validation-context-without-roots", {"validation_context": {}}, {}, VC, NO_ROOTS),
    ("combined-without-roots", {"combined_validation_context": {"default_validation_context": {}}}, {},
     COMBINED, NO_ROOTS),
    ("san-without-roots", {"validation_context": {"match_subject_alt_names": [{"exact": "a"}]}}, {}, VC,
     "SAN-based verification of peer certificates without trusted CA is insecure and not allowed"),
    ("typed-san-without-roots", {"combined_validation_context": {"default_validation_context": {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": "a"}}]}}}, {}, COMBINED,
     "SAN-based verification of peer certificates without trusted CA is insecure and not allowed"),
    ("inline-certificates", with_roots(tls_certificates=[{"certificate_chain": {"inline_string": "x"},
                                                          "private_key": {"inline_string": "y"}}]), {},
     f"{CTX}.tls_certificates", "meshcore takes the identity only from a certificate provider instance"),
    ("file-certificates", with_roots(tls_certificates=[{"certificate_chain": {"filename": "/etc/certs/cert-chain.pem"}}]),
     {}, f"{CTX}.tls_certificates", "inline or file certificates are not supported"),
    ("two-sds-certificates", with_roots(tls_certificate_sds_secret_configs=[{"name": "a"}, {"name": "b"}]), {},
     f"{CTX}.tls_certificate_sds_secret_configs", "Multiple TLS certificates are not supported for client contexts"),
    ("sds-certificate-no-name", with_roots(tls_certificate_sds_secret_configs=[{"sds_config": SDS_CONFIG}]), {},
     f"{CTX}.tls_certificate_sds_secret_configs[0].name", "value length must be at least 1 characters"),
    ("sds-roots-no-name", {"validation_context_sds_secret_config": {"sds_config": SDS_CONFIG}}, {},
     f"{CTX}.validation_context_sds_secret_config.name", "value length must be at least 1 characters"),
    ("combined-sds-roots-no-name", {"combined_validation_context": {
        "default_validation_context": {}, "validation_context_sds_secret_config": {"sds_config": SDS_CONFIG}}}, {},
     f"{COMBINED}.validation_context_sds_secret_config.name", "value length must be at least 1 characters"),
    ("identity-provider-empty-name", with_roots(tls_certificate_provider_instance={"instance_name": ""}), {},
     f"{CTX}.tls_certificate_provider_instance.instance_name", "value length must be at least 1 characters"),
    ("legacy-identity-provider-empty-name", with_roots(tls_certificate_certificate_provider_instance={}), {},
     f"{CTX}.tls_certificate_certificate_provider_instance.instance_name", "at least 1 characters"),
    ("custom-handshaker", with_roots(custom_handshaker={"name": "h"}), {}, f"{CTX}.custom_handshaker",
     "custom handshakers are not supported"),
    ("custom-certificate-selector", with_roots(custom_tls_certificate_selector={"name": "s"}), {},
     f"{CTX}.custom_tls_certificate_selector", "not supported"),
    ("certificate-provider", with_roots(tls_certificate_certificate_provider={"name": "p"}), {},
     f"{CTX}.tls_certificate_certificate_provider", "not supported"),
    ("validation-certificate-provider", {"validation_context_certificate_provider": {"name": "p"}}, {},
     f"{CTX}.validation_context_certificate_provider", "not supported"),
    ("combined-validation-certificate-provider", {"combined_validation_context": {
        "default_validation_context": ROOTS_VC, "validation_context_certificate_provider": {"name": "p"}}}, {},
     f"{COMBINED}.validation_context_certificate_provider", "not supported"),
    ("min-above-max", with_roots(tls_params={"tls_minimum_protocol_version": "TLSv1_3",
                                             "tls_maximum_protocol_version": "TLSv1_2"}), {},
     f"{CTX}.tls_params.tls_minimum_protocol_version", "minimum TLS version TLSv1_3 is above the maximum TLSv1_2"),
    ("min-undefined", with_roots(tls_params={"tls_minimum_protocol_version": 9}), {},
     f"{CTX}.tls_params.tls_minimum_protocol_version", "defined enum values (got 9)"),
    ("max-undefined", with_roots(tls_params={"tls_maximum_protocol_version": 5}), {},
     f"{CTX}.tls_params.tls_maximum_protocol_version", "defined enum values (got 5)"),
    ("alpn-too-long", with_roots(alpn_protocols=["h2", "x" * 256]), {}, f"{CTX}.alpn_protocols[1]",
     "Invalid ALPN protocol string"),
    ("sni-too-long", with_roots(), {"sni": "a" * 256}, f"{TS}.sni", "value length must be at most 255 bytes"),
    ("sni-too-long-bytes", with_roots(), {"sni": "é" * 128}, f"{TS}.sni", "at most 255 bytes"),
]


@pytest.mark.parametrize("common, ctx, field, reason", [c[1:] for c in BAD_CONTEXT], ids=[c[0] for c in BAD_CONTEXT])
def test_tls_context_nacks(common: Dict[str, Any], ctx: Dict[str, Any], field: str, reason: str) -> None:
    resource, got_field, got_reason = error_of(eds(transport_socket=socket(common, **ctx)))
    assert (resource, got_field) == (NAME, field) and reason in got_reason, (got_field, got_reason)
    # the same context in a transport_socket_matches entry: the same rule under that entry's path
    match_field = field.replace("transport_socket.", "transport_socket_matches[1].transport_socket.", 1)
    matches = [{"name": "ok", "match": {"tlsMode": "istio"}, "transport_socket": socket(with_roots())},
               {"name": "bad", "transport_socket": socket(common, **ctx)}]
    resource, got_field, got_reason = error_of(eds(transport_socket_matches=matches))
    assert (resource, got_field) == (NAME, match_field) and reason in got_reason, (got_field, got_reason)


RAW = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}
INTERNAL = {"name": "internal_upstream", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"}}
BAD_SOCKETS: List[Tuple[str, Dict[str, Any], str, str]] = [
    ("socket-no-name", {"transport_socket": {"typed_config": {"@type": RAW_BUFFER}}}, "transport_socket.name",
     "value length must be at least 1 characters"),
    ("socket-no-typed-config", {"transport_socket": {"name": "envoy.transport_sockets.tls"}},
     "transport_socket.typed_config", "Didn't find a registered implementation"),
    ("socket-unsupported", {"transport_socket": INTERNAL}, "transport_socket.typed_config",
     "unsupported transport socket envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"),
    ("match-no-name", {"transport_socket_matches": [{"match": {}, "transport_socket": RAW}]},
     "transport_socket_matches[0].name", "value length must be at least 1 characters"),
    ("match-no-socket", {"transport_socket_matches": [{"name": "a", "transport_socket": RAW}, {"name": "b"}]},
     "transport_socket_matches[1].transport_socket.name", "value length must be at least 1 characters"),
    ("match-socket-no-typed-config", {"transport_socket_matches": [
        {"name": "a", "transport_socket": {"name": "envoy.transport_sockets.tls"}}]},
     "transport_socket_matches[0].transport_socket.typed_config", "Didn't find a registered implementation"),
    ("match-socket-unsupported", {"transport_socket_matches": [{"name": "a", "transport_socket": INTERNAL}]},
     "transport_socket_matches[0].transport_socket.typed_config", "unsupported transport socket"),
    ("socket-matcher", {"transport_socket_matcher": {"on_no_match": {"action": {
        "name": "a", "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "x"}}}}},
     "transport_socket_matcher", "not supported"),
]


@pytest.mark.parametrize("fields, field, reason", [c[1:] for c in BAD_SOCKETS], ids=[c[0] for c in BAD_SOCKETS])
def test_transport_socket_nacks(fields: Dict[str, Any], field: str, reason: str) -> None:
    resource, got_field, got_reason = error_of(eds(**fields))
    assert (resource, got_field) == (NAME, field) and reason in got_reason, (got_field, got_reason)


def test_transport_socket_matcher_message_is_refused() -> None:
    c = eds_cluster()
    c.transport_socket_matcher.on_no_match.action.name = "raw"
    c.transport_socket_matcher.on_no_match.action.typed_config.Pack(struct_pb2.Value(string_value="x"))
    assert error_of(c)[1:] == ("transport_socket_matcher", "not supported (use transport_socket_matches)")


def test_string_matcher_moved_to_decode_and_still_in_route_config() -> None:
    from meshcore.xds import _decode, route_config

    assert route_config.compile_regex is _decode.compile_regex
    assert route_config.MAX_PROGRAM_SIZE == _decode.MAX_PROGRAM_SIZE == 100
    m = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="a+"))
    spec = _decode.string_matcher(m, "r", "w")
    assert spec == StringMatchSpec("regex", "a+") and spec.matches("aaa")
