"""Inbound (server) Listeners shaped as istiod's proxyless generator writes them
(``pilot/pkg/networking/grpcgen/lds.go`` ``buildInboundListeners``; ``security.md`` §1.2), for tests.

* name ``xds.istio.io/grpc/lds/inbound/<ip:port>``, ``address`` the host part and the port, no
  ``listener_filters``, no ``use_original_dst``;
* one filter chain without ``filter_chain_match``: ``inbound-mtls`` (STRICT, or PERMISSIVE with the
  pod label ``security.istio.io/tlsMode=istio``) with a DownstreamTlsContext
  (``require_client_certificate: true``, the provider instances of ``buildCommonTLSContext``, new and
  deprecated fields, no SAN matcher, no ALPN), or ``inbound-plaintext``;
* one network filter ``inbound-hcm<suffix>``: an HCM without ``stat_prefix``, an inline route
  configuration ``inbound`` (one nameless virtual host ``*``, ``prefix: /``,
  ``non_forwarding_action``) and the HTTP filters ``envoy.filters.http.rbac.DENY`` (if DENY
  policies), ``envoy.filters.http.rbac`` (if ALLOW policies), ``envoy.filters.http.router``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2, json_format

PREFIX = "xds.istio.io/grpc/lds/inbound/"
TEMPLATE = PREFIX + "%s"


def pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def common_tls_context(instance: str = "default") -> tls_pb2.CommonTlsContext:
    """``grpcgen.buildCommonTLSContext(nil)``: new and deprecated provider fields, no SAN list."""
    c = tls_pb2.CommonTlsContext()
    c.tls_certificate_provider_instance.instance_name = instance
    c.tls_certificate_provider_instance.certificate_name = "default"
    c.tls_certificate_certificate_provider_instance.instance_name = instance
    c.tls_certificate_certificate_provider_instance.certificate_name = "default"
    cvc = c.combined_validation_context
    cvc.default_validation_context.ca_certificate_provider_instance.instance_name = instance
    cvc.default_validation_context.ca_certificate_provider_instance.certificate_name = "ROOTCA"
    cvc.validation_context_certificate_provider_instance.instance_name = instance
    cvc.validation_context_certificate_provider_instance.certificate_name = "ROOTCA"
    return c


def downstream_tls(instance: str = "default") -> tls_pb2.DownstreamTlsContext:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=common_tls_context(instance))
    ctx.require_client_certificate.value = True
    return ctx


def rbac_filter(action: str, policies: Mapping[str, Any]) -> rbac_pb2.RBAC:
    """An RBAC HTTP filter config; ``policies``: name -> Policy message or proto3-JSON dict."""
    rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.Action.Value(action))
    for name, policy in policies.items():
        if isinstance(policy, dict):
            policy = json_format.ParseDict(policy, rbac_config_pb2.Policy())
        rules.policies[name].CopyFrom(policy)
    return rbac_pb2.RBAC(rules=rules)


def inbound_route_config() -> route_pb2.RouteConfiguration:
    route = rc.Route(match=rc.RouteMatch(prefix="/"))
    route.non_forwarding_action.SetInParent()
    return route_pb2.RouteConfiguration(name="inbound", virtual_hosts=[rc.VirtualHost(domains=["*"], routes=[route])])


def hcm(deny: Optional[Mapping[str, Any]] = None, allow: Optional[Mapping[str, Any]] = None,
        route_config: Optional[route_pb2.RouteConfiguration] = None) -> hcm_pb2.HttpConnectionManager:
    h = hcm_pb2.HttpConnectionManager()
    h.route_config.CopyFrom(route_config if route_config is not None else inbound_route_config())
    if deny:
        h.http_filters.add(name="envoy.filters.http.rbac.DENY", typed_config=pack(rbac_filter("DENY", deny)))
    if allow:
        h.http_filters.add(name="envoy.filters.http.rbac", typed_config=pack(rbac_filter("ALLOW", allow)))
    h.http_filters.add(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
    return h


def inbound_listener(port: int, *, mode: str = "STRICT", host: str = "0.0.0.0",
                     deny: Optional[Mapping[str, Any]] = None, allow: Optional[Mapping[str, Any]] = None,
                     instance: str = "default") -> listener_pb2.Listener:
    """``buildInboundListeners`` for ``<host>:<port>``: ``mode`` STRICT (``inbound-mtls``) or
    PERMISSIVE / DISABLE (``inbound-plaintext``; grpcgen serves PERMISSIVE as plaintext)."""
    suffix = "mtls" if mode == "STRICT" else "plaintext"
    chain = lc.FilterChain(name="inbound-" + suffix)
    chain.filters.add(name="inbound-hcm" + suffix, typed_config=pack(hcm(deny, allow)))
    if suffix == "mtls":
        chain.transport_socket.CopyFrom(base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=pack(downstream_tls(instance))))
    address = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
    return listener_pb2.Listener(name=f"{PREFIX}{host}:{port}", address=address, filter_chains=[chain])
