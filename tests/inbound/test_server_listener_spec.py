"""``meshcore.xds.server_listener``: server Listeners decoded with gRPC's rules (A36/A29/A39/A41) and as an
Envoy sidecar's ``virtualInbound``; A36/Envoy filter chain matching on the decoded spec.

* istiod grpcgen's inbound listeners (``inbound-mtls`` / ``inbound-plaintext``, RBAC DENY then ALLOW,
  the inline ``inbound`` route configuration with ``non_forwarding_action``), as messages and as proto3 JSON.
* Filter chain selection: destination prefix (longest), source type, source prefix and port, transport
  protocol, no backtracking, the default chain, the A36 never-matching fields, server names and ALPN when a
  TLS inspector runs (Envoy shape), inspectors disabled per port.
* Every NACK rule of the gRPC shape (one mutation of a valid listener each), and what stays accepted.
* The Envoy shape on istiod's sidecar ``virtualInbound`` (STRICT, PERMISSIVE): chains per port, Istio ALPNs,
  passthrough chains, SDS certificates, unsupported filters recorded instead of NACKed.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import pytest
from google.protobuf import json_format

from meshcore import ConfigError
from meshcore.controlplane import istio_sidecar
from meshcore.xds.model import CertificateRef, DownstreamTlsSpec
from meshcore.xds.server_listener import (
    InboundChain, ServerListenerSpec, ServerResourceDecoder, downstream_tls_spec, server_listener_spec,
    server_route_config,
)

from .grpcgen_inbound import downstream_tls, inbound_listener, inbound_route_config, pack

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = T + "envoy.extensions.filters.http.router.v3.Router"
RBAC = T + "envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_PER_ROUTE = T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
FAULT = T + "envoy.extensions.filters.http.fault.v3.HTTPFault"
TLS_CTX = T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
RAW = T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
TLS_INSPECTOR = {"name": "envoy.filters.listener.tls_inspector",
                 "typed_config": {"@type": T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}
PROVIDERS = {"default"}

DENY = {"deny-evil-0": {"permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/x/sa/evil"}}}]}}
ALLOW = {"allow-default-0": {"permissions": [{"any": True}],
                             "principals": [{"authenticated": {"principal_name": {"prefix": "spiffe://cluster.local/"}}}]}}


def hcm_dict(**over: Any) -> Dict[str, Any]:
    d = {"@type": HCM,
         "route_config": {"name": "inbound", "virtual_hosts": [
             {"domains": ["*"], "routes": [{"match": {"prefix": "/"}, "non_forwarding_action": {}}]}]},
         "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}
    d.update(over)
    return d


def chain(name: str, match: Optional[Dict[str, Any]] = None, **over: Any) -> Dict[str, Any]:
    fc: Dict[str, Any] = {"name": name, "filters": [{"name": "hcm", "typed_config": hcm_dict()}]}
    if match is not None:
        fc["filter_chain_match"] = match
    fc.update(over)
    return fc


def listener(chains: List[Dict[str, Any]], default: Optional[Dict[str, Any]] = None, **over: Any) -> Dict[str, Any]:
    d: Dict[str, Any] = {"name": "lis", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
                         "filter_chains": chains}
    if default is not None:
        d["default_filter_chain"] = default
    d.update(over)
    return d


def tls_socket(**ctx: Any) -> Dict[str, Any]:
    body = json_format.MessageToDict(downstream_tls(), preserving_proto_field_name=True)
    body.update(ctx)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": TLS_CTX, **body}}


def pick(spec: ServerListenerSpec, src: str = "10.1.2.3", sport: int = 40000, dst: str = "10.0.0.9",
         dport: int = 8080, tls: bool = False, sni: Optional[str] = None, alpn: Any = None) -> Optional[str]:
    c = spec.select(src, sport, dst, dport, tls, sni, alpn)
    return None if c is None else c.name


# -- istiod's proxyless (grpcgen) inbound listeners -----------------------------------------------------------


def test_grpcgen_strict_listener() -> None:
    spec = server_listener_spec(inbound_listener(8080, deny=DENY, allow=ALLOW), PROVIDERS)
    assert spec.name == "xds.istio.io/grpc/lds/inbound/0.0.0.0:8080" and spec.address == ("0.0.0.0", 8080)
    assert spec.shape == "grpc" and spec.unsupported == () and spec.default_filter_chain is None
    (c,) = spec.filter_chains
    assert c.name == "inbound-mtls" and c.kind == "http" and c.mtls and c.unsupported == ()
    assert c.tls == DownstreamTlsSpec(identity=CertificateRef("provider", "default", "default"),
                                      roots=CertificateRef("provider", "default", "ROOTCA"),
                                      require_client_certificate=True)
    assert [name for name, _ in c.rbac_filters] == ["envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac"]
    assert [cfg.rules.action for _, cfg in c.rbac_filters] == [1, 0]  # DENY, ALLOW
    assert list(c.rbac_filters[1][1].rules.policies) == ["allow-default-0"]
    assert c.http_filters == ("envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac", "envoy.filters.http.router")
    assert c.stat_prefix == "" and c.route_config_name is None and c.route_config.name == "inbound"
    route = c.route("server.default.svc.cluster.local:8080", "/pkg.Svc/Method", [("content-type", "application/grpc")],
                    "POST")
    assert route is not None and route.action == "non_forwarding" and route.serves and route.virtual_host == ""
    assert dict(route.filter_overrides) == {}
    # A36: no listener filters, so neither TLS nor ports decide; every connection gets the one chain
    for args in [dict(tls=True), dict(tls=False), dict(dport=1), dict(src="127.0.0.1", dst="127.0.0.1")]:
        assert pick(spec, **args) == "inbound-mtls"
    assert "inbound-mtls" in repr(c) and "mTLS" in repr(c)


@pytest.mark.parametrize("mode", ["PERMISSIVE", "DISABLE"])
def test_grpcgen_plaintext_listener(mode: str) -> None:
    spec = server_listener_spec(inbound_listener(9090, mode=mode, allow=ALLOW), PROVIDERS)
    (c,) = spec.filter_chains
    assert c.name == "inbound-plaintext" and c.tls is None and not c.mtls
    assert [n for n, _ in c.rbac_filters] == ["envoy.filters.http.rbac"]
    assert pick(spec, tls=False) == pick(spec, tls=True) == "inbound-plaintext"


def test_json_and_any_inputs_decode_alike() -> None:
    msg = inbound_listener(8080, deny=DENY)
    from_json = server_listener_spec(json_format.MessageToDict(msg), PROVIDERS)

    from_any = server_listener_spec(pack(msg), PROVIDERS)
    for spec in (from_json, from_any):
        (c,) = spec.filter_chains
        assert c.tls == server_listener_spec(msg).filter_chains[0].tls
        assert [n for n, _ in c.rbac_filters] == ["envoy.filters.http.rbac.DENY"]


def test_rbac_engine_is_refused_rather_than_skipped_without_the_rbac_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshcore.xds.server_listener as sl

    monkeypatch.setattr(sl, "rbac_engine_class", lambda: None)
    monkeypatch.setattr(sl, "_ENGINE", [])
    spec = server_listener_spec(inbound_listener(8080, allow=ALLOW))
    (c,) = spec.filter_chains
    with pytest.raises(ConfigError, match="meshcore.rbac is not available"):
        c.rbac
    assert server_listener_spec(inbound_listener(8080)).filter_chains[0].rbac is None  # no RBAC filters


# -- filter chain matching ----------------------------------------------------------------------------------


def test_destination_prefix_longest_match_and_default_chain() -> None:
    spec = server_listener_spec(listener([
        chain("wide", {"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}),
        chain("narrow", {"prefix_ranges": [{"address_prefix": "10.0.7.0", "prefix_len": 24}]}),
        chain("v6", {"prefix_ranges": [{"address_prefix": "fd00::", "prefix_len": 8}]}),
    ], default=chain("default")))
    assert pick(spec, dst="10.0.7.9") == "narrow"
    assert pick(spec, dst="10.9.9.9") == "wide"
    assert pick(spec, dst="192.168.1.1") == "default"
    assert pick(spec, dst="fd00::1", src="fd00::2") == "v6"
    assert pick(spec, dst="::ffff:10.0.7.9", src="::ffff:10.1.1.1") == "narrow"  # v4-mapped on a dual-stack socket
    no_default = server_listener_spec(listener([chain("narrow", {"prefix_ranges": [
        {"address_prefix": "10.0.7.0", "prefix_len": 24}]})]))
    assert pick(no_default, dst="10.9.9.9") is None


def test_source_type_prefix_and_port() -> None:
    spec = server_listener_spec(listener([
        chain("local", {"source_type": "SAME_IP_OR_LOOPBACK"}),
        chain("external", {"source_type": "EXTERNAL"}),
        chain("pod-net", {"source_type": "EXTERNAL", "source_prefix_ranges": [{"address_prefix": "10.244.0.0",
                                                                              "prefix_len": 16}]}),
        chain("pod-net-port", {"source_type": "EXTERNAL", "source_ports": [5000],
                               "source_prefix_ranges": [{"address_prefix": "10.244.0.0", "prefix_len": 16}]}),
    ]))
    assert pick(spec, src="127.0.0.1", dst="127.0.0.1") == "local"
    assert pick(spec, src="10.0.0.9", dst="10.0.0.9") == "local"  # same IP as the destination
    assert pick(spec, src="10.1.1.1") == "external"
    assert pick(spec, src="10.244.3.3") == "pod-net"
    assert pick(spec, src="10.244.3.3", sport=5000) == "pod-net-port"


def test_no_backtracking_after_the_most_specific_level() -> None:
    # the /24 wins the destination level; its only chain needs source port 1: nothing further down
    # matches, and Envoy (and A36) then use the default chain, not the less specific /8 chain
    spec = server_listener_spec(listener([
        chain("narrow-port-1", {"prefix_ranges": [{"address_prefix": "10.0.7.0", "prefix_len": 24}],
                                "source_ports": [1]}),
        chain("wide", {"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}),
    ], default=chain("default")))
    assert pick(spec, dst="10.0.7.9", sport=1) == "narrow-port-1"
    assert pick(spec, dst="10.0.7.9", sport=2) == "default"
    assert pick(spec, dst="10.1.0.1", sport=2) == "wide"


def test_a36_never_matching_fields_and_raw_buffer() -> None:
    spec = server_listener_spec(listener([
        chain("port", {"destination_port": 8080}),
        chain("sni", {"server_names": ["server.example"]}),
        chain("alpn", {"application_protocols": ["h2"]}),
        chain("tls", {"transport_protocol": "tls"}),
        chain("raw", {"transport_protocol": "raw_buffer"}),
        chain("any"),
    ]))
    for tls in (False, True):  # A36: no inspector, every connection is raw_buffer without SNI or ALPN
        assert pick(spec, tls=tls, dport=8080, sni="server.example", alpn=["h2"]) == "raw"
    only_never = server_listener_spec(listener([chain("tls", {"transport_protocol": "tls"})],
                                               default=chain("default")))
    assert pick(only_never, tls=True) == "default"


def test_envoy_matching_with_a_tls_inspector() -> None:
    spec = server_listener_spec(listener([
        chain("exact", {"server_names": ["api.example.com"], "transport_protocol": "tls"}),
        chain("wild", {"server_names": ["*.example.com"], "transport_protocol": "tls"}),
        chain("wilder", {"server_names": ["*.com"], "transport_protocol": "tls"}),
        chain("h2", {"transport_protocol": "tls", "application_protocols": ["h2"]}),
        chain("istio", {"transport_protocol": "tls", "application_protocols": ["istio-http/1.1", "istio-h2"]}),
        chain("tls", {"transport_protocol": "tls"}),
        chain("raw", {"transport_protocol": "raw_buffer"}),
        chain("p9", {"destination_port": 9000}),
    ], listener_filters=[TLS_INSPECTOR]), shape="envoy")
    assert spec.unsupported == () and spec.tls_inspector
    assert pick(spec, tls=True, sni="API.example.com") == "exact"
    assert pick(spec, tls=True, sni="www.example.com") == "wild"
    assert pick(spec, tls=True, sni="a.b.example.com") == "wild"
    assert pick(spec, tls=True, sni="other.com") == "wilder"
    assert pick(spec, tls=True, sni="other.org", alpn=["istio-h2", "h2"]) == "istio"  # the client's first that a chain lists
    assert pick(spec, tls=True, alpn=["h2"]) == "h2"
    assert pick(spec, tls=True, alpn=["http/1.1"]) == "tls"
    assert pick(spec, tls=False) == "raw"
    assert pick(spec, tls=True, dport=9000) == "p9"


def test_envoy_inspector_disabled_for_a_port() -> None:
    inspector = dict(TLS_INSPECTOR, filter_disabled={"destination_port_range": {"start": 9000, "end": 9001}})
    spec = server_listener_spec(listener([chain("tls", {"transport_protocol": "tls"}),
                                          chain("raw", {"transport_protocol": "raw_buffer"})],
                                         listener_filters=[inspector]), shape="envoy")
    assert pick(spec, tls=True, dport=8080) == "tls"
    assert pick(spec, tls=True, dport=9000) == "raw"  # nothing detects TLS there


# -- the gRPC shape's NACK rules -------------------------------------------------------------------------------


def _base() -> Dict[str, Any]:
    return listener([chain("inbound-mtls", transport_socket=tls_socket())])


def _tls(d: Dict[str, Any]) -> Dict[str, Any]:
    return d["filter_chains"][0]["transport_socket"]["typed_config"]


def _hcm(d: Dict[str, Any]) -> Dict[str, Any]:
    return d["filter_chains"][0]["filters"][0]["typed_config"]


def _set(path: Callable[[Dict[str, Any]], Dict[str, Any]], **values: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(d: Dict[str, Any]) -> None:
        path(d).update(values)
    return mutate


def _filters(*entries: Dict[str, Any]) -> Callable[[Dict[str, Any]], None]:
    return _set(_hcm, http_filters=list(entries))


ROUTER_F = {"name": "router", "typed_config": {"@type": ROUTER}}
RBAC_F = {"name": "rbac", "typed_config": {"@type": RBAC, "rules": {"action": "ALLOW"}}}
FAULT_F = {"name": "fault", "typed_config": {"@type": FAULT}}


def _del_identity(d: Dict[str, Any]) -> None:
    c = _tls(d)["common_tls_context"]
    del c["tls_certificate_provider_instance"], c["tls_certificate_certificate_provider_instance"]


def _sds_identity(d: Dict[str, Any]) -> None:
    _del_identity(d)
    _tls(d)["common_tls_context"]["tls_certificate_sds_secret_configs"] = [{"name": "default"}]


def _sds_roots(d: Dict[str, Any]) -> None:
    _tls(d)["common_tls_context"]["combined_validation_context"]["validation_context_sds_secret_config"] = {"name": "ROOTCA"}


def _no_validation(d: Dict[str, Any]) -> None:
    del _tls(d)["common_tls_context"]["combined_validation_context"]


def _two_chains(d: Dict[str, Any]) -> None:
    d["filter_chains"].append(chain("second"))


def _overlap_after_masking(d: Dict[str, Any]) -> None:
    d["filter_chains"] = [chain("a", {"prefix_ranges": [{"address_prefix": "10.0.0.1", "prefix_len": 8}]}),
                          chain("b", {"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8},
                                                        {"address_prefix": "192.168.0.0", "prefix_len": 16}]})]


def _route_action(d: Dict[str, Any]) -> None:
    _hcm(d)["route_config"]["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"] = {
        "unknown": {"@type": T + "google.protobuf.Duration", "value": "1s"}}


NACKS = [
    ("listener_filters", lambda d: d.update(listener_filters=[TLS_INSPECTOR]), "listener_filters"),
    ("use_original_dst", lambda d: d.update(use_original_dst=True), "use_original_dst"),
    ("no address", lambda d: d.pop("address"), "address"),
    ("pipe address", lambda d: d.update(address={"pipe": {"path": "/tmp/x"}}), "address"),
    ("api_listener", lambda d: d.update(api_listener={"api_listener": hcm_dict()}), "api_listener"),
    ("filter_chain_matcher", lambda d: d.update(filter_chain_matcher={}), "filter_chain_matcher"),
    ("socket name", lambda d: d["filter_chains"][0]["transport_socket"].update(name="tls"), "transport_socket.name"),
    ("socket type", lambda d: d["filter_chains"][0]["transport_socket"].update(
        typed_config={"@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}),
     "unsupported transport socket"),
    ("socket without config", lambda d: d["filter_chains"][0]["transport_socket"].pop("typed_config"),
     "typed_config"),
    ("no identity", _del_identity, "identity certificate"),
    ("SDS identity", _sds_identity, "tls_certificate_sds_secret_configs"),
    ("SDS roots", _sds_roots, "validation_context_sds_secret_config"),
    ("client cert without roots", _no_validation, "require_client_certificate"),
    ("require_sni", _set(_tls, require_sni=True), "require_sni"),
    ("ocsp", _set(_tls, ocsp_staple_policy="STRICT_STAPLING"), "STRICT_STAPLING"),
    ("unknown provider", lambda d: _tls(d)["common_tls_context"]["tls_certificate_provider_instance"].update(
        instance_name="other"), 'unrecognized certificate provider instance name: "other"'),
    ("inline certificate", lambda d: _tls(d)["common_tls_context"].update(
        tls_certificates=[{"certificate_chain": {"filename": "/x"}}]), "tls_certificates"),
    ("trusted_ca", lambda d: _tls(d)["common_tls_context"]["combined_validation_context"]["default_validation_context"]
     .update(trusted_ca={"filename": "/x"}), "trusted_ca"),
    ("custom handshaker", lambda d: _tls(d)["common_tls_context"].update(custom_handshaker={"name": "x"}),
     "custom_handshaker"),
    ("fault filter", _filters(FAULT_F, ROUTER_F), "not supported on servers"),
    ("router not last", _filters(ROUTER_F, RBAC_F), "must be the last filter"),
    ("last not router", _filters(RBAC_F), "last filter must be the router"),
    ("no filters", _filters(), "must not be empty"),
    ("only optional filters", _filters(dict(FAULT_F, is_optional=True)), "must not be empty"),
    ("duplicate filter names", _filters(dict(RBAC_F, name="x"), dict(ROUTER_F, name="x")), "duplicate"),
    ("disabled RBAC", _filters(dict(RBAC_F, disabled=True), ROUTER_F), "disabled"),
    ("filter without config", _filters({"name": "x"}, ROUTER_F), "no typed_config"),
    ("ECDS filter", _filters({"name": "x", "config_discovery": {"config_source": {"ads": {}}}}, ROUTER_F),
     "ECDS"),
    ("xff hops", _set(_hcm, xff_num_trusted_hops=1), "xff_num_trusted_hops"),
    ("ip detection", _set(_hcm, original_ip_detection_extensions=[{"name": "x"}]),
     "original_ip_detection_extensions"),
    ("no route specifier", lambda d: _hcm(d).pop("route_config"), "route_specifier"),
    ("scoped routes", lambda d: (_hcm(d).pop("route_config"), _hcm(d).update(scoped_routes={})), "scoped"),
    ("rds from a file", lambda d: (_hcm(d).pop("route_config"), _hcm(d).update(
        rds={"route_config_name": "r", "config_source": {"path_config_source": {"path": "/x"}}})), "ads or self"),
    ("bad inline route", lambda d: _hcm(d)["route_config"]["virtual_hosts"][0].update(domains=[]), "domains"),
    ("unknown per-route config", _route_action, "no filter implementation"),
    ("tcp_proxy", lambda d: d["filter_chains"][0].update(filters=[{"name": "tcp", "typed_config": {
        "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "x", "cluster": "c"}}]),
     "unsupported network filter"),
    ("no network filters", lambda d: d["filter_chains"][0].update(filters=[]), "no HttpConnectionManager"),
    ("duplicate network filters", lambda d: d["filter_chains"][0]["filters"].append(
        d["filter_chains"][0]["filters"][0]), "duplicate network filter name"),
    ("unnamed network filter", lambda d: d["filter_chains"][0]["filters"][0].update(name=""), "need a name"),
    ("proxy protocol", lambda d: d["filter_chains"][0].update(use_proxy_proto=True), "PROXY protocol"),
    ("two catch-all chains", _two_chains, "overlapping matching rules"),
    ("overlap after masking", _overlap_after_masking, "overlapping matching rules"),
    ("prefix too long", lambda d: d["filter_chains"][0].update(filter_chain_match={"prefix_ranges": [
        {"address_prefix": "10.0.0.0", "prefix_len": 33}]}), "prefix_len"),
    ("only never-matching chains", lambda d: d["filter_chains"][0].update(
        filter_chain_match={"destination_port": 8080}), "no filter chain can match"),
    ("bad default chain", lambda d: d.update(default_filter_chain={"name": "d", "filters": []}),
     "default_filter_chain.filters"),
]


@pytest.mark.parametrize("mutate,text", [pytest.param(m, t, id=i) for i, m, t in NACKS])
def test_grpc_shape_nacks(mutate: Callable[[Dict[str, Any]], Any], text: str) -> None:
    server_listener_spec(_base(), PROVIDERS)  # the base is fine
    d = copy.deepcopy(_base())
    mutate(d)
    with pytest.raises(ConfigError) as info:
        server_listener_spec(d, PROVIDERS)
    assert info.value.resource == "lis"
    assert text in str(info.value)


def test_accepted_variants() -> None:
    d = _base()
    d["filter_chains"][0]["transport_socket"] = {"name": "envoy.transport_sockets.raw_buffer",
                                                 "typed_config": {"@type": RAW}}
    _hcm(d)["http_filters"].insert(0, dict(FAULT_F, is_optional=True))  # skipped
    (c,) = server_listener_spec(d, PROVIDERS).filter_chains
    assert c.tls is None and c.http_filters == ("envoy.filters.http.router",)
    # plain TLS: no validation context, no client certificate asked for
    d = _base()
    _no_validation(d)
    _tls(d)["require_client_certificate"] = False
    (c,) = server_listener_spec(d, PROVIDERS).filter_chains
    assert c.tls.roots is None and not c.tls.require_client_certificate and not c.mtls
    # a SAN matcher is allowed on a server (A29: the server may support it), with roots
    d = _base()
    _tls(d)["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}]
    _tls(d)["common_tls_context"]["alpn_protocols"] = ["h2"]
    (c,) = server_listener_spec(d, PROVIDERS).filter_chains
    assert [(m.san_type, m.matcher.kind, m.matcher.value) for m in c.tls.san_matchers] == \
        [("URI", "prefix", "spiffe://cluster.local/")]
    assert c.tls.alpn_protocols == ("h2",)
    # providers None: instance names unchecked (no bootstrap)
    assert server_listener_spec(_base()).filter_chains[0].tls.identity.name == "default"
    # chains that never match are fine next to a default chain
    d = _base()
    d["filter_chains"][0]["filter_chain_match"] = {"server_names": ["x.example"]}
    d["default_filter_chain"] = chain("default")
    assert pick(server_listener_spec(d, PROVIDERS)) == "default"


def test_downstream_tls_spec_directly() -> None:
    spec = downstream_tls_spec(downstream_tls(), providers={"default"})
    assert spec.require_client_certificate and spec.roots == CertificateRef("provider", "default", "ROOTCA")
    with pytest.raises(ValueError, match="shape"):
        downstream_tls_spec(downstream_tls(), shape="istio")


# -- route configurations -----------------------------------------------------------------------------------


def test_route_config_actions_and_per_route_overrides() -> None:
    rc = inbound_route_config()
    vh = rc.virtual_hosts[0]
    vh.typed_per_filter_config["envoy.filters.http.rbac"].Pack(
        json_format.ParseDict({"config": {"@type": RBAC_PER_ROUTE}, "disabled": True},
                              _filter_config()))
    r0 = vh.routes[0]
    r0.match.prefix = "/admin"
    per_route = json_format.ParseDict({"rbac": {"rules": {"action": "DENY", "policies": {"no-admin": {
        "permissions": [{"any": True}], "principals": [{"any": True}]}}}}}, _rbac_per_route())
    r0.typed_per_filter_config["envoy.filters.http.rbac"].Pack(per_route)
    forward = vh.routes.add(name="fwd")
    forward.match.prefix = "/fwd"
    forward.route.cluster = "somewhere"
    rest = vh.routes.add(name="rest")
    rest.match.prefix = "/"
    rest.non_forwarding_action.SetInParent()
    cfg = server_route_config(rc)
    admin = cfg.route("a", "/admin/x")
    assert admin.action == "non_forwarding" and admin.serves
    assert admin.filter_overrides["envoy.filters.http.rbac"] == per_route  # the route's over the host's
    other = cfg.route("a", "/other")
    assert other.name == "rest" and other.filter_overrides == {"envoy.filters.http.rbac": None}  # disabled here
    fwd = cfg.route("a", "/fwd")
    assert fwd.action == "route" and not fwd.serves  # gRPC fails RPCs on forwarding routes
    assert len(cfg.routes) == 3 and cfg.spec.virtual_hosts[0].name == "#0"  # gRPC needs no host names
    with pytest.raises(ConfigError, match="virtual host name must not be empty"):
        server_route_config(rc, shape="envoy")  # Envoy does
    vh.name = "inbound|http|80"
    assert server_route_config(rc, shape="envoy").route("a", "/fwd").serves  # a sidecar's route to the app


def _filter_config() -> Any:
    from envoy.config.route.v3 import route_components_pb2

    return route_components_pb2.FilterConfig()


def _rbac_per_route() -> Any:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    return rbac_pb2.RBACPerRoute()


def test_optional_unknown_per_route_config_is_kept_raw() -> None:
    rc = inbound_route_config()
    cfg = _filter_config()
    cfg.is_optional = True
    cfg.config.type_url = T + "some.Unknown"
    rc.virtual_hosts[0].routes[0].typed_per_filter_config["x"].Pack(cfg)
    route = server_route_config(rc).route("a", "/")
    assert route.filter_overrides["x"].type_url == T + "some.Unknown"


def test_resource_decoder_dispatches_by_registered_name() -> None:
    from meshcore.xds.listener_config import listener_spec

    decoder = ServerResourceDecoder(lambda msg, providers=None: listener_spec(msg), "listener")
    msg = inbound_listener(8080)
    with pytest.raises(ConfigError, match="server listener"):
        decoder(msg)  # not registered: the client decoder refuses a server listener, as before
    decoder.names.add(msg.name)
    assert isinstance(decoder(msg, providers={"default"}), ServerListenerSpec)
    with pytest.raises(ConfigError, match="unrecognized"):
        decoder(msg, providers={"other"})


# -- the Envoy shape: istiod's sidecar virtualInbound -----------------------------------------------------------


def _virtual_inbound(mode: str) -> Any:
    desc = {"services": [{"name": "server", "namespace": "default", "vip": "10.96.0.5",
                          "ports": [{"port": 80, "name": "http", "protocol": "http", "target_port": 8080},
                                    {"port": 9000, "name": "tcp", "protocol": "tcp"}],
                          "endpoints": [{"ip": "10.0.0.9"}]}],
            "proxy": {"ip": "10.0.0.9"}, "mesh": {"mtls_mode": mode}}
    (vi,) = [lis for lis in istio_sidecar.build(desc)["listeners"] if lis.name == "virtualInbound"]
    return vi


ISTIO_HTTP11 = ["istio-http/1.1", "istio", "http/1.1"]


def test_envoy_shape_strict_virtual_inbound() -> None:
    spec = server_listener_spec(_virtual_inbound("STRICT"), shape="envoy")
    assert spec.unsupported == () and spec.use_original_dst and spec.tls_inspector
    assert all(c.unsupported == () for c in spec.chains)
    c = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ISTIO_HTTP11)
    assert c.name == "0.0.0.0_8080" and c.kind == "http" and c.mtls
    assert c.tls.identity == CertificateRef("sds", "default") and c.tls.roots == CertificateRef("sds", "ROOTCA")
    assert c.tls.alpn_protocols == ("h2", "http/1.1") and c.tls.min_version == "TLSv1_2"
    assert c.normalize_path and c.stat_prefix == "inbound_0.0.0.0_8080;"
    assert c.route("server.default.svc.cluster.local:80", "/x").serves
    # STRICT HTTP port: one {tls} chain, any ALPN; plaintext gets nothing (Envoy closes)
    assert pick(spec, tls=True, alpn=["h2"]) == "0.0.0.0_8080"
    assert pick(spec, tls=False, alpn=["http/1.1"]) is None
    tcp = spec.select("10.1.1.1", 40000, "10.0.0.9", 9000, True, None, ["istio-peer-exchange", "istio"])
    assert tcp.name == "0.0.0.0_9000" and tcp.kind == "tcp" and tcp.route_config is None and tcp.mtls
    # a port no Service declares: Istio's passthrough chains (still mTLS under STRICT)
    assert pick(spec, dport=5555, tls=True, alpn=ISTIO_HTTP11) == "virtualInbound-catchall-http"
    assert pick(spec, dport=5555, tls=True, alpn=["h2"]) == "virtualInbound"
    assert pick(spec, dport=5555, tls=False) is None


def test_envoy_shape_permissive_virtual_inbound() -> None:
    spec = server_listener_spec(_virtual_inbound("PERMISSIVE"), shape="envoy")
    assert spec.unsupported == () and spec.http_inspector
    mtls = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ISTIO_HTTP11)
    plain = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, False, None, ["http/1.1"])
    assert mtls.name == plain.name == "0.0.0.0_8080" and mtls.mtls and plain.tls is None
    assert pick(spec, tls=True, alpn=["h2"]) is None  # plain TLS without Istio's ALPN: no chain


def test_envoy_shape_records_what_it_cannot_honour() -> None:
    vi = _virtual_inbound("STRICT")
    for fc in vi.filter_chains:
        if fc.name == "0.0.0.0_8080":
            from envoy.extensions.filters.network.http_connection_manager.v3 import (
                http_connection_manager_pb2 as hcm_pb2,
            )
            from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

            h = hcm_pb2.HttpConnectionManager()
            fc.filters[-1].typed_config.Unpack(h)
            authz = h.http_filters.add(name="envoy.filters.http.ext_authz")
            authz.typed_config.Pack(ext_authz_pb2.ExtAuthz())
            h.http_filters.insert(0, authz)
            del h.http_filters[-1]
            fc.filters[-1].typed_config.Pack(h)
    spec = server_listener_spec(vi, shape="envoy")
    c = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ISTIO_HTTP11)
    assert any("ext_authz" in u for u in c.unsupported)
    other = spec.select("10.1.1.1", 40000, "10.0.0.9", 9000, True, None, ["istio"])
    assert other.unsupported == ()
    # listener-wide: an unknown listener filter -> nothing can be selected
    vi.listener_filters.add(name="custom.listener.filter")
    spec = server_listener_spec(vi, shape="envoy")
    assert spec.unsupported and spec.select("10.1.1.1", 1, "10.0.0.9", 8080, True, None, ISTIO_HTTP11) is None


def test_bad_shape_argument() -> None:
    with pytest.raises(ValueError, match="shape"):
        server_listener_spec(inbound_listener(8080), shape="sidecar")


def test_chain_is_immutable() -> None:
    (c,) = server_listener_spec(inbound_listener(8080)).filter_chains
    assert isinstance(c, InboundChain)
    with pytest.raises(Exception):
        c.name = "x"  # type: ignore[misc]
