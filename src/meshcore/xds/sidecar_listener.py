"""The Listeners istiod writes for an Envoy *sidecar*, and the outbound path a connection takes.

:func:`sidecar_listener_spec` decodes any ``envoy.config.listener.v3.Listener`` (a message, an
``Any`` holding one, or proto3 JSON; JSON types meshcore has no protos for, such as Istio's own
filters, are kept as ``TypedStruct`` as :mod:`meshcore.xds.resource_file` does) into a
:class:`SidecarListenerSpec`. It does not raise on shapes meshcore need not act on (inbound and
internal listeners, TLS chains, filters it does not run, the unified ``filter_chain_matcher``):
what meshcore cannot honour is recorded, with a reason, in ``unsupported`` of the listener (for
what concerns the whole listener) or of a :class:`FilterChainSpec`; the consumer refuses traffic
whose resolution carries any. Only input that is not a Listener at all raises
:class:`~meshcore.errors.ConfigError`.

:func:`resolve_outbound` answers "where does the sidecar send a plaintext connection from the
application to ``host:port``", as Envoy 1.40 does for the connection iptables redirects to the
``use_original_dst`` listener (Istio's ``virtualOutbound``):

1. The listener: Envoy hands the connection to the listener bound to the original destination
   address (``ConnectionHandlerImpl::getBalancedHandlerByAddress``): exactly ``ip:port`` (Istio
   names it ``<vip>_<port>``: a TCP service's VIP), else the wildcard of the address family,
   ``0.0.0.0:port`` (``0.0.0.0_<port>``: HTTP ports) or ``[::]:port``; with neither, the
   ``use_original_dst`` listener keeps it and its own chains decide (Istio's
   ``virtualOutbound``: ``PassthroughCluster`` under ``ALLOW_ANY``, ``BlackHoleCluster`` under
   ``REGISTRY_ONLY``). Listeners are found by address (``address`` and ``additional_addresses``);
   the names are only a fast path. Without a ``use_original_dst`` listener the address lookup is
   still done (as if the application connected to that listener directly).
2. The filter chain (``FilterChainManagerImpl::findFilterChain``; :func:`select_filter_chains`, which
   the inbound side (:mod:`meshcore.xds.server_listener`) shares): the fields of
   ``FilterChainMatch`` are levels, in this order: ``destination_port``, ``prefix_ranges``
   (destination IP), ``server_names``, ``transport_protocol``, ``application_protocols``,
   ``direct_source_prefix_ranges``, ``source_type``, ``source_prefix_ranges``, ``source_ports``.
   At each level only the chains with the most specific value matching the connection stay
   (a port equal to the destination's over "any port"; the longest prefix containing the IP,
   unset = ``0.0.0.0/0`` and ``::/0``; the exact protocol over unset; ...). There is no
   backtracking: when the most specific value at a level leads to no chain further down, the
   ``default_filter_chain`` is used (none: Envoy closes the connection), even if a less
   specific branch would have matched. The connection's values here:

   * destination: ``vip`` if given, else ``host`` when it is an IP literal, else unknown (then
     only catch-all prefix ranges match, and only ``0.0.0.0:port`` is looked up);
   * no SNI (plaintext): only chains without ``server_names`` match;
   * transport protocol ``raw_buffer`` (what Envoy sets when no listener filter detected TLS);
   * application protocols: what the HTTP inspector reports, ``http/1.1`` (``protocol="http"``)
     or ``h2c`` (``protocol="h2c"``: HTTP/2 with prior knowledge, gRPC), when the listener (or
     the ``use_original_dst`` listener that handed the connection over) has an
     ``http_inspector`` not disabled for the port; nothing for ``protocol="tcp"`` or without one;
   * source (direct and real): ``source_ip``, the application pod's IP; unknown by default, and
     then only chains without source ranges match. ``source_type``: Envoy's
     ``isSameIpOrLoopback`` -- the connection is local when the source is loopback or equals the
     destination IP, so an application connecting from its pod IP to a service VIP is
     ``EXTERNAL`` (iptables keeps the pod IP as source); unknown source counts as external;
   * source port: ``source_port`` (0 = unknown: only chains without ``source_ports``).

3. What the chain leads to (:class:`OutboundResolution`): ``"http"`` (an HttpConnectionManager:
   RDS name or inline route config, its settings, the HTTP filters), ``"tcp"`` (a ``tcp_proxy``),
   ``"passthrough"`` / ``"blackhole"`` (a ``tcp_proxy`` to Istio's ``PassthroughCluster`` /
   ``BlackHoleCluster``: recognised by those names), ``"other"`` (a chain meshcore cannot follow:
   another terminal filter, a ``filter_chain_matcher``) or ``"none"`` (no listener, or no chain
   and no default chain: Envoy closes the connection). HTTP-level fallbacks (Istio's
   ``allow_any`` virtual host routing unknown hosts to ``PassthroughCluster``) are the route
   configuration's business, not this module's.

HTTP filters (in an HCM) -- meshcore runs the router and the fault filter
(:func:`~meshcore.xds.listener_config.fault_spec`; both kept in ``HcmSpec.http_filters`` as
:func:`~meshcore.xds.listener_config.listener_spec` keeps them); every other filter is either
*ignored* (it cannot change which upstream a client's request goes to, nor whether it is sent or
answered locally) or *unsupported* (it can; recorded with the reason). Classified by the
configuration's type (``TypedStruct`` unwrapped), never by filter name:

================================================  ==========  ====================================
type                                              verdict     why
================================================  ==========  ====================================
``io.istio.http.peer_metadata.Config``            ignored     istio.metadata_exchange /
                                                              peer_metadata: telemetry metadata
``istio...alpn.v2alpha1.FilterConfig``            ignored     istio.alpn: the upstream TLS ALPN
                                                              (meshcore's mesh TLS sets Istio's)
``stats.PluginConfig``                            ignored     istio.stats: metrics
``...http.wasm.v3.Wasm`` (Istio stats / MX)       ignored     Istio's telemetry plugins (code
                                                              ``envoy.wasm.stats`` /
                                                              ``envoy.wasm.metadata_exchange``, the
                                                              ``*-filter.compiled.wasm`` files, or
                                                              root id ``stats_outbound`` /
                                                              ``stats_inbound``)
``...http.wasm.v3.Wasm`` (anything else)          unsupported a plugin can do anything
``...http.grpc_stats.v3.FilterConfig``            ignored     statistics
``...http.cors.v3.Cors``                          ignored     browser CORS (as listener_config);
                                                              a preflight a client itself sends to
                                                              a route with a CORS policy goes
                                                              upstream instead of being answered
``...http.grpc_web.v3.GrpcWeb``                   ignored     acts only on ``application/grpc-web``
                                                              requests; Istio puts it on the
                                                              server's inbound chain too, which
                                                              translates them there
``...http.compressor.v3.Compressor``              ignored     response compression; with a
                                                              ``request_direction_config``:
                                                              unsupported (changes the body sent)
``...http.rbac.v3.RBAC`` (shadow rules only)      ignored     dry run: logs, never denies
``...http.rbac.v3.RBAC`` (``rules``/``matcher``)  unsupported can deny a request
``...http.ext_authz.v3.ExtAuthz``                 unsupported can deny or change a request
``...http.ext_proc.v3.ExternalProcessor``         unsupported can change anything
``...http.lua.v3.Lua``                            unsupported can change anything
``...http.ratelimit.v3.RateLimit``,               unsupported can answer 429 locally
``...http.local_ratelimit.v3.LocalRateLimit``
``...http.stateful_session.v3.StatefulSession``   unsupported pins requests to a host; even an
                                                              empty one (Istio's
                                                              ``PILOT_ENABLE_PERSISTENT_SESSION_FILTER``)
                                                              is turned on per route
``...http.header_mutation.v3.HeaderMutation``     unsupported changes headers before routing
``...http.jwt_authn.v3.JwtAuthentication``        unsupported can deny a request
``...http.buffer.v3.Buffer``                      unsupported can answer 413 locally
``...http.health_check.v3.HealthCheck``           unsupported answers locally
Istio Mixer / authn (``istio.mixer...``,          unsupported Istio < 1.8 policy checks / authn
``istio.envoy.config.filter.http.authn...``)
anything else, a filter without ``typed_config``  unsupported unknown effect
or with ``config_discovery`` (ECDS)
================================================  ==========  ====================================

A *disabled* unsupported filter stays unsupported (a route's ``typed_per_filter_config`` can
enable it, and route configs do not keep those overrides). The router must be last (and nothing
after it) and must not have ``upstream_http_filters``; an empty ``http_filters`` gets Envoy's
implicit router.

Network filters: ``...http_connection_manager.v3.HttpConnectionManager`` and
``...tcp_proxy.v3.TcpProxy`` are the terminal filters meshcore follows (``kind`` ``"http"`` /
``"tcp"``; they must be last). Ignored: ``envoy.tcp.metadataexchange.config.MetadataExchange``
(istio.metadata_exchange), ``stats.PluginConfig`` (istio.stats), Istio's stats Wasm, and a
network RBAC with shadow rules only. Unsupported, with everything else:
``...connection_limit.v3.ConnectionLimit`` (closes connections beyond a count meshcore does not
keep), local/global rate limits, ext_authz, an enforcing RBAC, Istio Mixer, ``set_filter_state``
(``connect_authority``: shapes the upstream connection), ``sni_cluster``, ``redis_proxy`` and
other protocol proxies (``kind="other"`` when terminal).

HCM settings meshcore must apply to a request on that chain are on :class:`HcmSpec`:
``normalize_path`` (Istio sets it), ``merge_slashes``, ``path_with_escaped_slashes_action``
(``IMPLEMENTATION_SPECIFIC_DEFAULT`` recorded as Envoy's default, ``KEEP_UNCHANGED``),
``strip_matching_host_port`` / ``strip_any_host_port``, ``strip_trailing_host_dot`` and
``max_stream_duration``. ``ignore_port_in_host_matching`` belongs to the RouteConfiguration
(:class:`~meshcore._route_model.RouteConfigSpec`, inline here or from RDS). Unsupported:
``scoped_routes``, ``early_header_mutation_extensions``, ``path_normalization_options``, an RDS
source other than ``ads``/``self``.

``tcp_proxy`` -> :class:`TcpProxySpec` (cluster or weighted clusters, idle timeout with Envoy's
default of 1 hour, ``max_downstream_connection_duration``, hash policy); ``metadata_match``,
``tunneling_config`` and ``on_demand`` are unsupported.
"""

from __future__ import annotations

import ipaddress
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.compressor.v3 import compressor_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as net_wasm_pb2
from google.protobuf import any_pb2
from google.protobuf import message as _message

from .._route_model import RouteConfigSpec
from ..errors import ConfigError
from ._decode import seconds, type_name, unpack
from .listener_config import (
    _FAULT, _FILTERS, _HCM, _HCM_NAME, _ROUTER, fault_spec, hcm_max_stream_duration, rds_route_config_name,
)
from .model import LISTENER, HttpFilterSpec
from .route_config import route_config_spec

__all__ = [
    "FilterChainMatchSpec", "HcmSpec", "TcpProxySpec", "FilterChainSpec", "SidecarListenerSpec",
    "OutboundResolution", "sidecar_listener_spec", "resolve_outbound", "select_filter_chains",
    "IGNORED_HTTP_FILTERS", "UNSUPPORTED_HTTP_FILTERS", "IGNORED_NETWORK_FILTERS", "UNSUPPORTED_NETWORK_FILTERS",
    "PASSTHROUGH_CLUSTER", "BLACKHOLE_CLUSTER",
]

_E = "envoy.extensions.filters."
_TCP_PROXY = tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
_HTTP_WASM = http_wasm_pb2.Wasm.DESCRIPTOR.full_name
_NET_WASM = net_wasm_pb2.Wasm.DESCRIPTOR.full_name
_HTTP_RBAC = http_rbac_pb2.RBAC.DESCRIPTOR.full_name
_NET_RBAC = net_rbac_pb2.RBAC.DESCRIPTOR.full_name
_COMPRESSOR = compressor_pb2.Compressor.DESCRIPTOR.full_name
_STATS = "stats.PluginConfig"

#: Istio's well-known clusters a ``tcp_proxy`` leads to when nothing else matches.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"

#: HTTP filter types that cannot change where a request goes or whether it is sent (type -> why).
#: Wasm, RBAC and Compressor are decided per configuration (module docstring).
IGNORED_HTTP_FILTERS: Mapping[str, str] = {
    "io.istio.http.peer_metadata.Config": "Istio peer metadata exchange (telemetry)",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig":
        "istio.alpn sets the upstream TLS ALPN, which meshcore's mesh TLS sets itself",
    _STATS: "istio.stats (metrics)",
    _E + "http.grpc_stats.v3.FilterConfig": "gRPC statistics",
    _E + "http.cors.v3.Cors": "browser CORS",
    _E + "http.grpc_web.v3.GrpcWeb": "translates grpc-web requests only; the server's inbound chain does too",
    _COMPRESSOR: "response compression",
}
#: HTTP filter types known to change routing or to answer/deny locally (type -> why). Any type
#: in neither table is unsupported as unknown.
UNSUPPORTED_HTTP_FILTERS: Mapping[str, str] = {
    _E + "http.ext_authz.v3.ExtAuthz": "external authorization can deny or change a request",
    _E + "http.ext_proc.v3.ExternalProcessor": "external processing can change anything",
    _E + "http.lua.v3.Lua": "a Lua script can change anything",
    _HTTP_WASM: "a Wasm plugin (not Istio's stats or metadata exchange) can change anything",
    _HTTP_RBAC: "RBAC with enforced rules can deny a request",
    _E + "http.ratelimit.v3.RateLimit": "rate limiting can answer 429 locally",
    _E + "http.local_ratelimit.v3.LocalRateLimit": "rate limiting can answer 429 locally",
    _E + "http.stateful_session.v3.StatefulSession":
        "stateful sessions pin requests to a host (an empty one is enabled per route)",
    _E + "http.header_mutation.v3.HeaderMutation": "header mutation changes headers before routing",
    _E + "http.jwt_authn.v3.JwtAuthentication": "JWT authentication can deny a request",
    _E + "http.buffer.v3.Buffer": "buffering can answer 413 locally",
    _E + "http.health_check.v3.HealthCheck": "health checking answers locally",
    "istio.mixer.v1.config.client.HttpClientConfig": "Istio Mixer (before 1.8): policy checks can deny a request",
    "istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig": "Istio authentication (before 1.5) can deny a request",
}
#: Network filter types that are observability only (type -> why).
IGNORED_NETWORK_FILTERS: Mapping[str, str] = {
    "envoy.tcp.metadataexchange.config.MetadataExchange": "Istio TCP metadata exchange (telemetry)",
    _STATS: "istio.stats (metrics)",
}
#: Network filter types known to change or refuse connections (type -> why).
UNSUPPORTED_NETWORK_FILTERS: Mapping[str, str] = {
    _E + "network.connection_limit.v3.ConnectionLimit": "closes connections beyond a limit meshcore does not keep",
    _E + "network.local_ratelimit.v3.LocalRateLimit": "rate limiting can refuse connections",
    _E + "network.ratelimit.v3.RateLimit": "rate limiting can refuse connections",
    _E + "network.ext_authz.v3.ExtAuthz": "external authorization can refuse connections",
    _NET_RBAC: "RBAC with enforced rules can refuse connections",
    _NET_WASM: "a Wasm plugin (not Istio's stats) can change anything",
    _E + "network.set_filter_state.v3.Config": "sets filter state that shapes the upstream connection",
    _E + "network.sni_cluster.v3.SniCluster": "picks the cluster from SNI",
    _E + "network.sni_dynamic_forward_proxy.v3.FilterConfig": "picks the upstream from SNI",
    _E + "network.redis_proxy.v3.RedisProxy": "a Redis proxy routes commands itself",
    "istio.mixer.v1.config.client.TcpClientConfig": "Istio Mixer (before 1.8): policy checks can refuse connections",
}

_HTTP_CLASSES = dict(_FILTERS)
_HTTP_CLASSES.update({_HTTP_WASM: http_wasm_pb2.Wasm, _HTTP_RBAC: http_rbac_pb2.RBAC,
                      _COMPRESSOR: compressor_pb2.Compressor})
_NET_CLASSES = {_HCM_NAME: _HCM, _TCP_PROXY: tcp_proxy_pb2.TcpProxy, _NET_WASM: net_wasm_pb2.Wasm,
                _NET_RBAC: net_rbac_pb2.RBAC}
_TERMINAL = {_HCM_NAME: "http", _TCP_PROXY: "tcp", _E + "network.redis_proxy.v3.RedisProxy": "other",
             _E + "network.thrift_proxy.v3.ThriftProxy": "other", _E + "network.dubbo_proxy.v3.DubboProxy": "other",
             _E + "network.direct_response.v3.Config": "other", _E + "network.echo.v3.Echo": "other"}

# Istio's own telemetry as Wasm (istio/istio 1.5-1.2x: null-VM code names, the compiled files)
_ISTIO_WASM_CODE = frozenset({"envoy.wasm.stats", "envoy.wasm.metadata_exchange"})
_ISTIO_WASM_FILES = frozenset({"stats-filter.compiled.wasm", "metadata-exchange-filter.compiled.wasm",
                               "stats-filter.wasm", "metadata-exchange-filter.wasm"})
_ISTIO_WASM_ROOTS = frozenset({"stats_outbound", "stats_inbound"})

# listener filters: type (or the name, for name-only v2 entries) -> role
_LF = "envoy.extensions.filters.listener."
_LISTENER_FILTER_TYPES = {
    _LF + "original_dst.v3.OriginalDst": "original_dst",
    _LF + "tls_inspector.v3.TlsInspector": "tls_inspector",
    _LF + "http_inspector.v3.HttpInspector": "http_inspector",
    _LF + "original_src.v3.OriginalSrc": "original_src",
}
_LISTENER_FILTER_NAMES = {
    f"envoy.{mid}{role}": role
    for role in ("original_dst", "tls_inspector", "http_inspector", "original_src")
    for mid in ("filters.listener.", "listener.")
}
_TLS_SOCKET_TYPES = frozenset({"envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"})
_RAW_SOCKET_TYPES = frozenset({"envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"})
_ESCAPED_SLASHES = {0: "KEEP_UNCHANGED", 1: "KEEP_UNCHANGED", 2: "REJECT_REQUEST", 3: "UNESCAPE_AND_REDIRECT",
                    4: "UNESCAPE_AND_FORWARD"}
_SOURCE_TYPES = {0: "ANY", 1: "SAME_IP_OR_LOOPBACK", 2: "EXTERNAL"}
_CATCH_ALL = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_IDLE_DEFAULT = 3600.0  # TcpProxy.idle_timeout unset: 1 hour


# -- the model ----------------------------------------------------------------------------------

Network = Any  # ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FilterChainMatchSpec:
    """A ``FilterChainMatch``; empty / 0 / ``"ANY"`` = no requirement. Ranges are ipaddress
    networks (host bits masked, as Envoy's ``CidrRange``); server names lower-cased."""

    destination_port: int = 0
    prefix_ranges: Tuple[Network, ...] = ()
    server_names: Tuple[str, ...] = ()
    transport_protocol: str = ""
    application_protocols: Tuple[str, ...] = ()
    direct_source_prefix_ranges: Tuple[Network, ...] = ()
    source_type: str = "ANY"  # "ANY" | "SAME_IP_OR_LOOPBACK" | "EXTERNAL"
    source_prefix_ranges: Tuple[Network, ...] = ()
    source_ports: Tuple[int, ...] = ()


@dataclass(frozen=True)
class HcmSpec:
    """An HttpConnectionManager on a sidecar filter chain."""

    route_config_name: Optional[str] = None  # RDS (Istio: the port, "9080")
    route_config: Optional[RouteConfigSpec] = None  # inline
    http_filters: Tuple[HttpFilterSpec, ...] = ()  # the ones meshcore runs: fault, router (in order)
    ignored_filters: Tuple[str, ...] = ()  # names of filters with no effect on a client (module doc)
    unsupported: Tuple[str, ...] = ()  # "<path> '<name>' (<type>): <why>"
    normalize_path: bool = False
    merge_slashes: bool = False
    path_with_escaped_slashes_action: str = "KEEP_UNCHANGED"
    strip_matching_host_port: bool = False
    strip_any_host_port: bool = False
    strip_trailing_host_dot: bool = False
    max_stream_duration: Optional[float] = None  # seconds; None = no limit


@dataclass(frozen=True)
class TcpProxySpec:
    """A ``tcp_proxy`` (``cluster`` or ``weighted_clusters``, never both)."""

    cluster: str = ""
    weighted_clusters: Tuple[Tuple[str, int], ...] = ()  # (cluster, weight)
    idle_timeout: Optional[float] = _IDLE_DEFAULT  # seconds; None = disabled (0s); unset = 1 h
    max_downstream_connection_duration: Optional[float] = None
    hash_policy: Tuple[str, ...] = ()  # "source_ip" | "filter_state:<key>"
    stat_prefix: str = ""

    @property
    def clusters(self) -> Tuple[str, ...]:
        return (self.cluster,) if self.cluster else tuple(c for c, _ in self.weighted_clusters)


@dataclass(frozen=True)
class FilterChainSpec:
    """A filter chain. ``kind``: ``"http"`` (last network filter an HCM, ``hcm`` set), ``"tcp"``
    (a ``tcp_proxy``, ``tcp`` set) or ``"other"``. ``unsupported`` holds the chain's own
    problems and its HCM's (``hcm.unsupported``)."""

    name: str
    match: FilterChainMatchSpec
    kind: str
    hcm: Optional[HcmSpec] = None
    tcp: Optional[TcpProxySpec] = None
    unsupported: Tuple[str, ...] = ()
    filters: Tuple[str, ...] = ()  # network filter names, in order
    transport_socket: str = ""  # type of the chain's transport socket; "" = raw buffer (plaintext)

    @property
    def terminates_tls(self) -> bool:
        return self.transport_socket in _TLS_SOCKET_TYPES


@dataclass(frozen=True)
class SidecarListenerSpec:
    """A Listener as a sidecar sees it (see the module docstring)."""

    name: str
    address: Optional[Tuple[str, int]]  # (ip, port); None: internal / pipe / no address
    filter_chains: Tuple[FilterChainSpec, ...] = ()
    default_filter_chain: Optional[FilterChainSpec] = None
    use_original_dst: bool = False
    listener_filters: Tuple[str, ...] = ()  # names
    additional_addresses: Tuple[Tuple[str, int], ...] = ()
    bind_to_port: bool = True
    traffic_direction: str = "UNSPECIFIED"  # "INBOUND" | "OUTBOUND" | "UNSPECIFIED"
    #: an HTTP inspector runs on this listener; ``http_inspector_disabled`` is its
    #: ``filter_disabled`` predicate (nested tuples, see ``_predicate``), None = never disabled
    http_inspector: bool = False
    http_inspector_disabled: Any = None
    has_filter_chain_matcher: bool = False  # the unified matcher replaces filter_chain_match
    unsupported: Tuple[str, ...] = ()  # listener-wide (listener filters, matcher, invalid matches)

    @property
    def addresses(self) -> Tuple[Tuple[str, int], ...]:
        return ((self.address,) if self.address else ()) + self.additional_addresses


@dataclass(frozen=True)
class OutboundResolution:
    """Where a connection to ``host:port`` goes (:func:`resolve_outbound`).

    ``kind``: ``"http"`` (``hcm``), ``"tcp"`` (``tcp``), ``"passthrough"`` / ``"blackhole"``
    (``tcp`` to ``PassthroughCluster`` / ``BlackHoleCluster``), ``"other"`` or ``"none"``.
    ``unsupported`` non-empty: meshcore cannot do what the sidecar would (refuse the traffic).
    ``reason`` says how the resolution went, for logs."""

    kind: str
    reason: str
    host: str
    port: int
    destination_ip: Optional[str] = None
    listener: Optional[str] = None  # name of the listener whose chains decided
    via_original_dst: bool = False  # reached through the use_original_dst listener (virtualOutbound)
    chain: Optional[FilterChainSpec] = None
    chain_index: Optional[int] = None  # index in filter_chains; None for the default chain / none
    default_chain: bool = False
    hcm: Optional[HcmSpec] = None
    tcp: Optional[TcpProxySpec] = None
    unsupported: Tuple[str, ...] = ()

    @property
    def route_config_name(self) -> Optional[str]:
        return self.hcm.route_config_name if self.hcm is not None else None

    @property
    def cluster(self) -> Optional[str]:
        return (self.tcp.cluster or None) if self.tcp is not None else None


# -- decoding -------------------------------------------------------------------------------------


def _listener_message(obj: Any) -> Any:
    cls = listener_pb2.Listener
    full_name = cls.DESCRIPTOR.full_name
    if isinstance(obj, _message.Message):
        if isinstance(obj, any_pb2.Any):
            if type_name(obj.type_url) != full_name:
                raise ConfigError("Listener", "type_url", f"expected {full_name}, got {obj.type_url!r}")
            out = cls()
            try:
                out.ParseFromString(obj.value)
            except _message.DecodeError as e:
                raise ConfigError("Listener", "value", f"cannot decode {full_name}: {e}") from None
            return out
        if obj.DESCRIPTOR.full_name != full_name:
            raise TypeError(f"expected a {full_name} message, got {obj.DESCRIPTOR.full_name}")
        if type(obj) is not cls:
            out = cls()
            out.ParseFromString(obj.SerializeToString())
            return out
        return obj
    if isinstance(obj, Mapping):
        from .resource_file import _decode_dict  # strict JSON; unknown (Istio) types -> TypedStruct

        return _decode_dict(obj, LISTENER, "Listener", "listener")
    raise TypeError(f"expected a {full_name} message, an Any or a dict, got {type(obj).__name__}")


def _config_type(any_: Any, resource: str, path: str) -> str:
    """The type of a typed config, through a TypedStruct; ``""`` when it cannot be read."""
    try:
        return unpack(any_, {}, resource, path)[1]
    except ConfigError:
        return ""


def _cidr(r: Any, resource: str, path: str, problems: List[str]) -> Optional[Network]:
    try:
        address = ipaddress.ip_address(r.address_prefix)
    except ValueError:
        problems.append(f"{path}.address_prefix: malformed IP address {r.address_prefix!r} "
                        "(Envoy rejects the listener)")
        return None
    length = r.prefix_len.value
    if length > address.max_prefixlen:
        problems.append(f"{path}.prefix_len: {length} exceeds {address.max_prefixlen} bits (Envoy rejects the listener)")
        return None
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


def _match_spec(m: Any, resource: str, path: str, problems: List[str]) -> FilterChainMatchSpec:
    def ranges(field: str) -> Tuple[Network, ...]:
        out = []
        for i, r in enumerate(getattr(m, field)):
            net = _cidr(r, resource, f"{path}.{field}[{i}]", problems)
            if net is not None:
                out.append(net)
        return tuple(out)

    if m.address_suffix or m.HasField("suffix_len"):
        problems.append(f"{path}: address_suffix / suffix_len are not implemented (Envoy rejects the listener)")
    names = []
    for n in m.server_names:
        if "*" in n and not n.startswith("*."):
            problems.append(f"{path}.server_names: partial wildcard {n!r} (Envoy rejects the listener)")
        names.append(n.lower())
    return FilterChainMatchSpec(
        destination_port=m.destination_port.value,
        prefix_ranges=ranges("prefix_ranges"),
        server_names=tuple(names),
        transport_protocol=m.transport_protocol,
        application_protocols=tuple(m.application_protocols),
        direct_source_prefix_ranges=ranges("direct_source_prefix_ranges"),
        source_type=_SOURCE_TYPES.get(m.source_type, "ANY"),
        source_prefix_ranges=ranges("source_prefix_ranges"),
        source_ports=tuple(m.source_ports),
    )


def _note(path: str, name: str, type_: str, why: str) -> str:
    return f"{path} {name!r} ({type_ or 'no type'}): {why}"


def _istio_wasm(msg: Any) -> bool:
    """Istio's stats / metadata-exchange Wasm (null VM code name, compiled file or root id)."""
    cfg = msg.config
    local = cfg.vm_config.code.local
    if local.inline_string in _ISTIO_WASM_CODE:
        return True
    if local.filename and posixpath.basename(local.filename) in _ISTIO_WASM_FILES:
        return True
    return cfg.root_id in _ISTIO_WASM_ROOTS


def _rbac_enforces(msg: Any) -> bool:
    return msg.HasField("rules") or msg.HasField("matcher")


def _hcm_spec(hcm: Any, resource: str, prefix: str) -> HcmSpec:
    """An HCM (``prefix``: its field path, ending in ``.``); problems go to ``unsupported``."""
    problems: List[str] = []
    route_config_name: Optional[str] = None
    inline: Optional[RouteConfigSpec] = None
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        try:
            route_config_name = rds_route_config_name(hcm.rds, resource, prefix)
        except ConfigError as e:
            if hcm.rds.route_config_name:
                route_config_name = hcm.rds.route_config_name
            problems.append(f"{e.field}: {e.reason}")
    elif which == "route_config":
        try:
            inline = route_config_spec(hcm.route_config)
        except ConfigError as e:
            field = f"{prefix}route_config.{e.field}" if e.field else f"{prefix}route_config"
            problems.append(f"{field}: {e.reason}")
    elif which == "scoped_routes":
        problems.append(f"{prefix}scoped_routes: scoped routes are not supported")
    else:
        problems.append(f"{prefix}route_specifier: no route configuration (rds or route_config)")
    if len(hcm.early_header_mutation_extensions):
        problems.append(f"{prefix}early_header_mutation_extensions: change headers before routing")
    if hcm.HasField("path_normalization_options"):
        problems.append(f"{prefix}path_normalization_options: not supported")
    filters, ignored = _http_filters(hcm, resource, prefix, problems)
    try:
        max_stream_duration = hcm_max_stream_duration(hcm, resource, prefix)
    except ConfigError as e:
        problems.append(f"{e.field}: {e.reason}")
        max_stream_duration = None
    return HcmSpec(
        route_config_name=route_config_name, route_config=inline, http_filters=filters,
        ignored_filters=ignored, unsupported=tuple(problems),
        normalize_path=hcm.normalize_path.value,
        merge_slashes=hcm.merge_slashes,
        path_with_escaped_slashes_action=_ESCAPED_SLASHES.get(hcm.path_with_escaped_slashes_action, "KEEP_UNCHANGED"),
        strip_matching_host_port=hcm.strip_matching_host_port,
        strip_any_host_port=hcm.strip_any_host_port,
        strip_trailing_host_dot=hcm.strip_trailing_host_dot,
        max_stream_duration=max_stream_duration,
    )


def _http_filters(hcm: Any, resource: str, prefix: str,
                  problems: List[str]) -> Tuple[Tuple[HttpFilterSpec, ...], Tuple[str, ...]]:
    entries = hcm.http_filters
    if not len(entries):  # Envoy adds the router
        return (HttpFilterSpec("envoy.filters.http.router", _ROUTER),), ()
    last = len(entries) - 1
    out: List[HttpFilterSpec] = []
    ignored: List[str] = []
    for i, f in enumerate(entries):
        path = f"{prefix}http_filters[{i}]"
        which = f.WhichOneof("config_type")
        if which != "typed_config":
            why = ("configured through ECDS (config_discovery), which meshcore does not fetch"
                   if which == "config_discovery" else "no typed_config: unknown filter")
            problems.append(_note(path, f.name, "", why))
            continue
        try:
            msg, type_ = unpack(f.typed_config, _HTTP_CLASSES, resource, f"{path}.typed_config")
        except ConfigError as e:
            problems.append(_note(path, f.name, type_name(f.typed_config.type_url), f"{e.field}: {e.reason}"))
            continue
        if type_ == _ROUTER:
            if i != last:
                problems.append(_note(path, f.name, type_, "the router must be the last filter (Envoy rejects this)"))
            elif f.disabled:
                problems.append(_note(path, f.name, type_, "the last (terminal) filter cannot be disabled"))
            if len(msg.upstream_http_filters):
                problems.append(_note(path, f.name, type_, "upstream_http_filters are not supported"))
            out.append(HttpFilterSpec(f.name, type_, None, f.disabled))
            continue
        if i == last:
            problems.append(_note(path, f.name, type_, "the last filter must be the router (Envoy rejects this)"))
        if type_ == _FAULT:
            try:
                config = fault_spec(msg, resource, f"{path}.typed_config")
            except ConfigError as e:
                problems.append(_note(path, f.name, type_, f"{e.field}: {e.reason}"))
                continue
            out.append(HttpFilterSpec(f.name, type_, config, f.disabled))
            continue
        why = _http_filter_problem(msg, type_)
        if why is None:
            ignored.append(f.name)
        else:
            if f.disabled:
                why += " (disabled here, but a route's typed_per_filter_config can enable it)"
            problems.append(_note(path, f.name, type_, why))
    return tuple(out), tuple(ignored)


def _http_filter_problem(msg: Any, type_: str) -> Optional[str]:
    """None when a (non-router, non-fault) HTTP filter can be ignored, else why not."""
    if type_ == _HTTP_WASM:
        return None if _istio_wasm(msg) else UNSUPPORTED_HTTP_FILTERS[type_]
    if type_ == _HTTP_RBAC:
        return UNSUPPORTED_HTTP_FILTERS[type_] if _rbac_enforces(msg) else None
    if type_ == _COMPRESSOR and msg.HasField("request_direction_config"):
        return "request compression changes the body the upstream receives"
    if type_ in IGNORED_HTTP_FILTERS:
        return None
    return UNSUPPORTED_HTTP_FILTERS.get(type_, "unknown HTTP filter: its effect on a request is unknown")


def _tcp_proxy_spec(tp: Any, resource: str, prefix: str, problems: List[str]) -> TcpProxySpec:
    which = tp.WhichOneof("cluster_specifier")
    cluster = ""
    weighted: Tuple[Tuple[str, int], ...] = ()
    if which == "cluster":
        cluster = tp.cluster
        if not cluster:
            problems.append(f"{prefix}cluster: must not be empty")
    elif which == "weighted_clusters":
        weighted = tuple((c.name, c.weight) for c in tp.weighted_clusters.clusters)
        if not weighted:
            problems.append(f"{prefix}weighted_clusters: no clusters")
        for i, (name, weight) in enumerate(weighted):  # the ClusterWeight PGV rules Envoy enforces
            if not name:
                problems.append(f"{prefix}weighted_clusters.clusters[{i}].name: value length must be at least 1")
            if weight < 1:
                problems.append(f"{prefix}weighted_clusters.clusters[{i}].weight: value must be greater than or "
                                f"equal to 1")
        if any(c.HasField("metadata_match") for c in tp.weighted_clusters.clusters):
            problems.append(f"{prefix}weighted_clusters.clusters.metadata_match: subset selection is not supported")
    else:
        problems.append(f"{prefix}cluster_specifier: no cluster (Envoy rejects this)")
    for field, why in (("metadata_match", "subset selection is not supported"),
                       ("tunneling_config", "tunneling (CONNECT/HBONE) is not supported"),
                       ("on_demand", "on-demand clusters are not supported")):
        if tp.HasField(field):
            problems.append(f"{prefix}{field}: {why}")
    durations: Dict[str, Optional[float]] = {}
    for field in ("idle_timeout", "max_downstream_connection_duration"):
        if tp.HasField(field):
            try:
                durations[field] = seconds(getattr(tp, field), resource, prefix + field) or None
            except ConfigError as e:
                problems.append(f"{e.field}: {e.reason}")
    idle = durations.get("idle_timeout") if tp.HasField("idle_timeout") else _IDLE_DEFAULT
    hashes = []
    for i, h in enumerate(tp.hash_policy):
        kind = h.WhichOneof("policy_specifier")
        if kind == "source_ip":
            hashes.append("source_ip")
        elif kind == "filter_state":
            hashes.append(f"filter_state:{h.filter_state.key}")
        else:
            problems.append(f"{prefix}hash_policy[{i}]: no policy")
    return TcpProxySpec(cluster=cluster, weighted_clusters=weighted, idle_timeout=idle,
                        max_downstream_connection_duration=durations.get("max_downstream_connection_duration"),
                        hash_policy=tuple(hashes), stat_prefix=tp.stat_prefix)


def _chain_spec(fc: Any, resource: str, where: str, listener_problems: List[str]) -> FilterChainSpec:
    match = _match_spec(fc.filter_chain_match, resource, f"{where}.filter_chain_match", listener_problems)
    problems: List[str] = []
    hcm: Optional[HcmSpec] = None
    tcp: Optional[TcpProxySpec] = None
    kind = "other"
    names = tuple(f.name for f in fc.filters)
    last = len(fc.filters) - 1
    if last < 0:
        problems.append(f"{where}.filters: no network filters (Envoy closes the connection)")
    for i, f in enumerate(fc.filters):
        path = f"{where}.filters[{i}]"
        which = f.WhichOneof("config_type")
        if which != "typed_config":
            why = ("configured through ECDS (config_discovery), which meshcore does not fetch"
                   if which == "config_discovery" else "no typed_config: unknown filter")
            problems.append(_note(path, f.name, "", why))
            continue
        try:
            msg, type_ = unpack(f.typed_config, _NET_CLASSES, resource, f"{path}.typed_config")
        except ConfigError as e:
            problems.append(_note(path, f.name, type_name(f.typed_config.type_url), f"{e.field}: {e.reason}"))
            continue
        terminal = _TERMINAL.get(type_)
        if terminal is not None and i != last:
            problems.append(_note(path, f.name, type_, "a terminal filter must be the last one (Envoy rejects this)"))
        elif terminal is None and i == last:
            problems.append(_note(path, f.name, type_, "the last network filter must be a terminal filter"))
        if type_ == _HCM_NAME:
            hcm = _hcm_spec(msg, resource, f"{path}.typed_config.")
            problems.extend(hcm.unsupported)
        elif type_ == _TCP_PROXY:
            tcp = _tcp_proxy_spec(msg, resource, f"{path}.typed_config.", problems)
        elif type_ == _NET_WASM:
            if not _istio_wasm(msg):
                problems.append(_note(path, f.name, type_, UNSUPPORTED_NETWORK_FILTERS[type_]))
        elif type_ == _NET_RBAC:
            if _rbac_enforces(msg):
                problems.append(_note(path, f.name, type_, UNSUPPORTED_NETWORK_FILTERS[type_]))
        elif type_ not in IGNORED_NETWORK_FILTERS:
            why = UNSUPPORTED_NETWORK_FILTERS.get(type_, "unknown network filter: its effect is unknown")
            problems.append(_note(path, f.name, type_, why))
        if i == last and terminal is not None:
            kind = terminal
    if kind == "http" and hcm is None or kind == "tcp" and tcp is None:
        kind = "other"
    transport = ""
    if fc.HasField("transport_socket"):
        ts = fc.transport_socket
        if ts.HasField("typed_config"):
            transport = _config_type(ts.typed_config, resource, f"{where}.transport_socket.typed_config")
        else:
            transport = ts.name
        if transport in _RAW_SOCKET_TYPES or transport == "envoy.transport_sockets.raw_buffer":
            transport = ""
        elif transport == "envoy.transport_sockets.tls":
            transport = next(iter(_TLS_SOCKET_TYPES))
    if fc.HasField("use_proxy_proto") and fc.use_proxy_proto.value:
        problems.append(f"{where}.use_proxy_proto: expects a PROXY protocol header")
    return FilterChainSpec(name=fc.name, match=match, kind=kind, hcm=hcm, tcp=tcp, unsupported=tuple(problems),
                           filters=names, transport_socket=transport)


def _predicate(p: Any, depth: int = 0) -> Any:
    """``ListenerFilterChainMatchPredicate`` -> ("any",) | ("port", start, end) | ("or"/"and",
    (preds...)) | ("not", pred) | ("never",) for what cannot be evaluated here."""
    rule = p.WhichOneof("rule")
    if depth > 50:
        return ("never",)
    if rule == "any_match":
        return ("any",) if p.any_match else ("never",)
    if rule == "destination_port_range":
        return ("port", p.destination_port_range.start, p.destination_port_range.end)
    if rule in ("or_match", "and_match"):
        return (rule.split("_")[0], tuple(_predicate(r, depth + 1) for r in getattr(p, rule).rules))
    if rule == "not_match":
        return ("not", _predicate(p.not_match, depth + 1))
    return ("never",)


def _predicate_matches(p: Any, port: int) -> bool:
    op = p[0]
    if op == "any":
        return True
    if op == "port":
        return p[1] <= port < p[2]
    if op == "or":
        return any(_predicate_matches(r, port) for r in p[1])
    if op == "and":
        return all(_predicate_matches(r, port) for r in p[1])
    if op == "not":
        return not _predicate_matches(p[1], port)
    return False


def _socket_address(address: Any) -> Optional[Tuple[str, int]]:
    if address.WhichOneof("address") != "socket_address":
        return None
    sa = address.socket_address
    if sa.WhichOneof("port_specifier") == "named_port":
        return None
    try:
        ip = str(ipaddress.ip_address(sa.address))
    except ValueError:
        ip = sa.address
    return ip, sa.port_value


def sidecar_listener_spec(listener_msg: Any) -> SidecarListenerSpec:
    """Decode a sidecar's Listener (message, ``Any`` or proto3-JSON dict); see the module doc.

    Raises ``ConfigError``/``TypeError`` only when the input is not a Listener."""
    lis = _listener_message(listener_msg)
    name = lis.name
    resource = name or "Listener"
    problems: List[str] = []
    names = []
    http_inspector = False
    http_disabled = None
    for i, lf in enumerate(lis.listener_filters):
        names.append(lf.name)
        which = lf.WhichOneof("config_type")
        if which == "typed_config":
            role = _LISTENER_FILTER_TYPES.get(_config_type(lf.typed_config, resource,
                                                           f"listener_filters[{i}].typed_config"))
        elif which is None:
            role = _LISTENER_FILTER_NAMES.get(lf.name)  # v2 name-only entries
        else:
            role = None
        if role is None:
            problems.append(f"listener_filters[{i}] {lf.name!r}: unknown listener filter (it may change the "
                            "connection or the filter chain selection)")
        elif role == "http_inspector":
            if lf.HasField("filter_disabled"):
                disabled = _predicate(lf.filter_disabled)
                if disabled != ("any",):
                    http_inspector = True
                    http_disabled = disabled if http_disabled is None else ("and", (http_disabled, disabled))
            else:
                http_inspector = True
                http_disabled = None
    if lis.HasField("filter_chain_matcher"):
        problems.append("filter_chain_matcher: the unified filter chain matcher is not supported")
    if lis.HasField("fcds_config"):
        problems.append("fcds_config: filter chain discovery is not supported")
    chains = tuple(_chain_spec(fc, resource, f"filter_chains[{i}]", problems) for i, fc in enumerate(lis.filter_chains))
    default = _chain_spec(lis.default_filter_chain, resource, "default_filter_chain", problems) \
        if lis.HasField("default_filter_chain") else None
    return SidecarListenerSpec(
        name=name,
        address=_socket_address(lis.address) if lis.HasField("address") else None,
        filter_chains=chains,
        default_filter_chain=default,
        use_original_dst=lis.use_original_dst.value,
        listener_filters=tuple(names),
        additional_addresses=tuple(a for a in (_socket_address(x.address) for x in lis.additional_addresses) if a),
        bind_to_port=lis.bind_to_port.value if lis.HasField("bind_to_port") else
        not (lis.HasField("deprecated_v1") and lis.deprecated_v1.HasField("bind_to_port")
             and not lis.deprecated_v1.bind_to_port.value),
        traffic_direction=base_pb2.TrafficDirection.Name(lis.traffic_direction),
        http_inspector=http_inspector,
        http_inspector_disabled=http_disabled,
        has_filter_chain_matcher=lis.HasField("filter_chain_matcher"),
        unsupported=tuple(problems),
    )


# -- resolution -----------------------------------------------------------------------------------

_ALPN = {"http": ("http/1.1",), "h2c": ("h2c",), "tcp": ()}


def _ip(text: Optional[str]) -> Optional[Any]:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _find(listeners: Mapping[str, SidecarListenerSpec], name: str, address: Tuple[str, int],
          scan: Iterable[SidecarListenerSpec]) -> Optional[SidecarListenerSpec]:
    spec = listeners.get(name)
    if spec is not None and address in spec.addresses:
        return spec
    for spec in scan:
        if address in spec.addresses:
            return spec
    return None


def _virtual(listeners: Mapping[str, SidecarListenerSpec]) -> Optional[SidecarListenerSpec]:
    spec = listeners.get("virtualOutbound")
    if spec is not None and spec.use_original_dst:
        return spec
    found = [s for s in listeners.values() if s.use_original_dst]
    found.sort(key=lambda s: s.traffic_direction != "OUTBOUND")
    return found[0] if found else None


def _narrow_ranges(cands: List[Tuple[int, Any]], field: str, ip: Optional[Any]) -> List[Tuple[int, Any]]:
    """Longest prefix containing ``ip`` (unset = catch-all; unknown ip: catch-all only)."""
    best: Optional[Network] = None
    for _, c in cands:
        for net in getattr(c.match, field) or _CATCH_ALL:
            if ip is None:
                ok = net.prefixlen == 0 and net.version == 4
            else:
                ok = net.version == ip.version and ip in net
            if ok and (best is None or net.prefixlen > best.prefixlen):
                best = net
    if best is None:
        return []
    return [(i, c) for i, c in cands if best in (getattr(c.match, field) or _CATCH_ALL)]


def _narrow_server_names(cands: List[Tuple[int, Any]], server_name: str) -> List[Tuple[int, Any]]:
    """Envoy's server-name level: the exact name, else the longest ``*.suffix`` wildcard
    (``*.b.c`` before ``*.c``), else the chains without ``server_names`` (also for no SNI)."""
    if server_name:
        hit = [(i, c) for i, c in cands if server_name in c.match.server_names]
        if hit:
            return hit
        pos = server_name.find(".", 1)
        while 0 <= pos < len(server_name) - 1:
            wildcard = "*" + server_name[pos:]
            hit = [(i, c) for i, c in cands if wildcard in c.match.server_names]
            if hit:
                return hit
            pos = server_name.find(".", pos + 1)
    return [(i, c) for i, c in cands if not c.match.server_names]


def select_filter_chains(chains: Sequence[Any], *, port: int, dst: Optional[Any], server_name: str = "",
                         transport: str = "raw_buffer", alpns: Sequence[str] = (), src: Optional[Any] = None,
                         src_port: int = 0, direct_src: Optional[Any] = None) -> List[Tuple[int, Any]]:
    """Envoy's ``FilterChainManagerImpl::findFilterChain``, level by level, no backtracking:
    ``(index, chain)`` of the chains left (normally one; none: the default chain applies).

    ``chains``: anything with a ``match`` (:class:`FilterChainMatchSpec`). The connection's
    values: ``port`` the destination port (0: unknown, only chains without ``destination_port``),
    ``dst``/``src``/``direct_src`` ipaddress objects or ``None`` (unknown: only catch-all ranges;
    ``direct_src`` defaults to ``src``), ``server_name`` the SNI (lower case; ``""``: none),
    ``transport`` the detected transport protocol (``"raw_buffer"`` or ``"tls"``), ``alpns`` the
    application protocols a listener filter reported, in the client's order, ``src_port`` (0:
    unknown, only chains without ``source_ports``)."""
    cands = [(i, c) for i, c in enumerate(chains)]
    exact = [(i, c) for i, c in cands if c.match.destination_port == port] if port else []
    cands = exact or [(i, c) for i, c in cands if c.match.destination_port == 0]
    cands = _narrow_ranges(cands, "prefix_ranges", dst)
    cands = _narrow_server_names(cands, server_name)
    tp = [(i, c) for i, c in cands if c.match.transport_protocol == transport] if transport else []
    cands = tp or [(i, c) for i, c in cands if not c.match.transport_protocol]
    for alpn in alpns:
        hit = [(i, c) for i, c in cands if alpn in c.match.application_protocols]
        if hit:
            cands = hit
            break
    else:
        cands = [(i, c) for i, c in cands if not c.match.application_protocols]
    cands = _narrow_ranges(cands, "direct_source_prefix_ranges", src if direct_src is None else direct_src)
    local = src is not None and (src.is_loopback or src == dst)
    typed = [(i, c) for i, c in cands if c.match.source_type == ("SAME_IP_OR_LOOPBACK" if local else "EXTERNAL")]
    cands = typed or [(i, c) for i, c in cands if c.match.source_type == "ANY"]
    cands = _narrow_ranges(cands, "source_prefix_ranges", src)
    by_port = [(i, c) for i, c in cands if src_port and src_port in c.match.source_ports]
    return by_port or [(i, c) for i, c in cands if not c.match.source_ports]


def _select_chain(chains: Sequence[FilterChainSpec], port: int, dst: Optional[Any], alpns: Tuple[str, ...],
                  src: Optional[Any], src_port: int) -> List[Tuple[int, FilterChainSpec]]:
    """The outbound case: a plaintext connection from the application (no SNI, ``raw_buffer``)."""
    return select_filter_chains(chains, port=port, dst=dst, alpns=alpns, src=src, src_port=src_port)


def _describe(listener: SidecarListenerSpec) -> str:
    where = f"{listener.address[0]}:{listener.address[1]}" if listener.address else "no address"
    return f"listener {listener.name or '(unnamed)'} ({where})"


def resolve_outbound(listeners: Mapping[str, SidecarListenerSpec], host: str, port: int, *,
                     vip: Optional[str] = None, protocol: str = "http", source_ip: Optional[str] = None,
                     source_port: int = 0) -> OutboundResolution:
    """The listener, filter chain and destination of a plaintext connection from the application
    to ``host:port`` (module docstring). ``listeners``: name -> :class:`SidecarListenerSpec`
    (everything LDS delivered); ``vip``: the destination IP (a service's ClusterIP) when known;
    ``protocol``: ``"http"`` (HTTP/1.1), ``"h2c"`` (HTTP/2 prior knowledge) or ``"tcp"``."""
    if protocol not in _ALPN:
        raise ValueError(f"protocol must be 'http', 'h2c' or 'tcp', not {protocol!r}")
    dst = _ip(vip) or _ip(host)
    dst_text = str(dst) if dst is not None else None
    base: Dict[str, Any] = {"host": host, "port": port, "destination_ip": dst_text}
    virtual = _virtual(listeners)
    scan = [s for s in listeners.values() if s.address is not None or s.additional_addresses]
    target = None
    if dst is not None:
        name = f"{dst}_{port}" if dst.version == 4 else f"[{dst}]_{port}"
        target = _find(listeners, name, (str(dst), port), scan)
    if target is None:
        wildcard = "::" if dst is not None and dst.version == 6 else "0.0.0.0"
        target = _find(listeners, f"{wildcard}_{port}", (wildcard, port), scan)
    handed_off = target is not None and virtual is not None and target is not virtual
    if target is None:
        target = virtual
    if target is None:
        return OutboundResolution(kind="none", reason=f"no listener for {dst_text or host}:{port} and no "
                                  "use_original_dst listener (virtualOutbound)", **base)
    base.update(listener=target.name, via_original_dst=virtual is not None)
    problems = list(target.unsupported)
    if target.has_filter_chain_matcher:
        return OutboundResolution(kind="other", reason=f"{_describe(target)} selects chains with a "
                                  "filter_chain_matcher", unsupported=tuple(problems), **base)
    inspect = target.http_inspector and not (target.http_inspector_disabled is not None
                                             and _predicate_matches(target.http_inspector_disabled, port))
    if handed_off and virtual.http_inspector and not (
            virtual.http_inspector_disabled is not None and _predicate_matches(virtual.http_inspector_disabled, port)):
        inspect = True
    alpns = _ALPN[protocol] if inspect else ()
    src = _ip(source_ip)
    picked = _select_chain(target.filter_chains, port, dst, alpns, src, source_port)
    how = f"{_describe(target)}" + (" via the use_original_dst listener" if handed_off else "")
    if len(picked) > 1:
        problems.append("filter chains " + ", ".join(str(i) for i, _ in picked) + " match the connection "
                        "equally (Envoy rejects overlapping filter chain matches)")
    if picked:
        index, chain = picked[0]
        how += f", filter chain {index}" + (f" {chain.name!r}" if chain.name else "")
        is_default = False
    else:
        index, chain = None, target.default_filter_chain
        if chain is None:
            return OutboundResolution(kind="none", reason=how + ": no filter chain matches and there is no "
                                      "default_filter_chain (Envoy closes the connection)",
                                      unsupported=tuple(problems), **base)
        how += ", default_filter_chain" + (f" {chain.name!r}" if chain.name else "")
        is_default = True
    problems.extend(chain.unsupported)
    if chain.transport_socket:
        why = "terminates TLS" if chain.terminates_tls else f"has transport socket {chain.transport_socket}"
        problems.append(f"the selected filter chain {why}: a plaintext connection fails there")
    kind = chain.kind
    if kind == "tcp" and chain.tcp is not None:
        if chain.tcp.cluster == PASSTHROUGH_CLUSTER:
            kind = "passthrough"
        elif chain.tcp.cluster == BLACKHOLE_CLUSTER:
            kind = "blackhole"
        how += f" -> tcp_proxy {', '.join(chain.tcp.clusters)}"
    elif kind == "http" and chain.hcm is not None:
        h = chain.hcm
        how += (f" -> HttpConnectionManager rds {h.route_config_name!r}" if h.route_config_name is not None
                else " -> HttpConnectionManager with an inline route config")
        if protocol == "tcp":
            problems.append("a raw TCP connection reaches an HttpConnectionManager")
    else:
        how += " -> " + (", ".join(chain.filters) or "no network filters")
    return OutboundResolution(kind=kind, reason=how, chain=chain, chain_index=index, default_chain=is_default,
                              hcm=chain.hcm, tcp=chain.tcp, unsupported=tuple(problems), **base)
