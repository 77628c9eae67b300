"""Server (inbound) Listeners: gRFC A36 as istiod's proxyless generator sends them, and an Envoy
sidecar's ``virtualInbound``.

:func:`server_listener_spec` decodes an ``envoy.config.listener.v3.Listener`` (a message, an
``Any`` holding one, or a proto3-JSON dict) into a :class:`ServerListenerSpec`: its filter
chains as :class:`InboundChain` objects and what selects between them
(:meth:`ServerListenerSpec.select`). A chain carries its TLS
(:class:`~meshcore.xds.model.DownstreamTlsSpec`, :func:`downstream_tls_spec`), the
HttpConnectionManager's RBAC HTTP filters in filter order (``rbac_filters``; ``rbac`` is the
:class:`meshcore.RbacEngine` built from them) and its route configuration
(:class:`InboundRouteConfig`: which route a request takes, the route's action and its
``typed_per_filter_config``, e.g. ``RBACPerRoute``).

Two shapes.

``shape="grpc"`` -- gRPC's rules (A36 servers, A29 TLS, A39 HTTP filters, A41 RBAC; grpc-go's
``unmarshal_lds.go``/``filter_chain.go``). This is what istiod's ``grpcgen`` sends for
``xds.istio.io/grpc/lds/inbound/<ip:port>``: one chain without ``filter_chain_match``
(``inbound-mtls`` with a DownstreamTlsContext, or ``inbound-plaintext``), an HCM with an inline
route configuration (virtual host ``*``, ``prefix: /``, ``non_forwarding_action``) and the HTTP
filters ``envoy.filters.http.rbac.DENY``, ``envoy.filters.http.rbac``, router. Everything below
is a NACK (:class:`~meshcore.errors.ConfigError` naming the field):

* ``api_listener`` set (a client listener); ``listener_filters`` not empty; ``use_original_dst``
  true; no ``address`` or not a TCP ``socket_address`` with a ``port_value``;
  ``filter_chain_matcher`` or ``fcds_config`` (they would select chains differently).
* A filter chain (every entry of ``filter_chains`` and ``default_filter_chain``, also those that
  can never match): a ``filter_chain_match`` Envoy rejects (malformed CIDR, prefix length beyond
  the family, ``address_suffix``, a partial server-name wildcard, an unknown ``source_type``);
  ``use_proxy_proto``; network filters without a unique non-empty name, without
  ``typed_config`` or of a type other than HttpConnectionManager; no HttpConnectionManager
  (the first one is used, later ones are only validated); a ``transport_socket`` whose name is
  not ``envoy.transport_sockets.tls`` or whose config is not a DownstreamTlsContext (a
  ``RawBuffer`` config is plaintext), or a DownstreamTlsContext :func:`downstream_tls_spec`
  rejects.
* Two chains whose matchers overlap after A36's normalization (each matcher as the cartesian
  product of its fields' values, CIDRs masked; an absent range differs from ``/0``); no chain
  that can match and no ``default_filter_chain``.
* HttpConnectionManager: ``xff_num_trusted_hops`` not 0 or ``original_ip_detection_extensions``
  (A41); no route specifier, ``scoped_routes``, an ``rds`` source other than ``ads``/``self`` or
  an empty name; an inline route configuration :func:`server_route_config` rejects. HTTP
  filters (A39, server side): unique non-empty names; only RBAC
  (``envoy.extensions.filters.http.rbac.v3.RBAC``) and the router are supported, anything else
  (a filter without ``typed_config`` too) is a NACK unless ``is_optional`` (then skipped); a
  ``disabled`` filter (a route could enable it); none left; the router not last, or anything
  after it. With :mod:`meshcore.rbac` installed each RBAC config must build
  (``RbacEngine.from_xds``; A41's NACKs).

A36 filter chain matching: there are no listener filters and no original destination, so the
connection's destination port is unknown, its transport protocol is ``raw_buffer`` and it has
no SNI and no application protocols. Chains matching on ``destination_port``,
``server_names``, ``application_protocols`` or a ``transport_protocol`` other than
``raw_buffer`` never match (they are still validated); the rest is Envoy's algorithm below.

``shape="envoy"`` -- an Envoy sidecar's inbound listener (istiod's ``virtualInbound``:
``use_original_dst``, ``tls_inspector`` and ``http_inspector`` with per-port
``filter_disabled`` predicates, per-port chains with ``destination_port``,
``transport_protocol`` ``tls``/``raw_buffer`` and ``application_protocols``, Istio's
passthrough chains, SDS certificates ``default``/``ROOTCA``, SAN prefix matchers). Nothing is
NACKed (LDS accepted the listener already): what meshcore cannot honour is recorded with the
reason in ``unsupported`` of the listener (unknown listener filters, ``filter_chain_matcher``,
overlapping matchers: nothing can be selected) or of the chain (an integration must refuse the
connections of such a chain). Network filters: HttpConnectionManager (``kind="http"``),
``tcp_proxy`` (``kind="tcp"``; plain TCP to the application, no L7 policy), Istio's metadata
exchange and stats are ignored, anything else (an enforcing network RBAC, ext_authz, rate
limits, ...) is unsupported (see :mod:`meshcore.xds.sidecar_listener`'s tables). HTTP filters:
RBAC is kept (shadow-only configs too: the engine treats them as no-ops), the router must be
last, an ``HTTPFault`` with a delay or abort is unsupported (an empty one, Istio's inbound
default, is ignored), the rest as the sidecar decoder classifies it (telemetry ignored; ext_authz,
jwt_authn, Lua, Wasm other than Istio's, rate limits ... unsupported). TLS as for ``grpc``,
except that SDS secrets are accepted for the identity (one) and the roots.

Filter chain selection (Envoy's ``FilterChainManagerImpl::findFilterChain``, shared with the
outbound side: :func:`~meshcore.xds.sidecar_listener.select_filter_chains`): level by level,
``destination_port``, destination ``prefix_ranges``, ``server_names`` (exact, then the longest
``*.`` wildcard), ``transport_protocol``, ``application_protocols`` (the first of the client's
protocols some chain lists), ``direct_source_prefix_ranges``, ``source_type``
(``SAME_IP_OR_LOOPBACK``: the source is loopback or equals the destination), source
``prefix_ranges``, ``source_ports``; at each level the most specific value wins and there is no
backtracking; no chain left: the ``default_filter_chain`` (none: refuse the connection). In the
Envoy shape what the connection shows depends on the inspectors that run for its destination
port: with the TLS inspector, a TLS connection has transport ``tls``, its SNI and its offered
ALPN list; without it, every connection is ``raw_buffer`` with no SNI and no ALPN; the HTTP
inspector reports a plaintext connection's protocol (``http/1.0``, ``http/1.1``, ``h2c``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import itertools
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from .._fast import RouteTable
from .._route_model import RouteConfigSpec
from ..errors import ConfigError
from ._decode import type_name, unpack
from .cluster_config import (
    _NO_TRUSTED_CA_SAN, _UNSUPPORTED_COMMON, _alpn, _provider, _sds, _tls_params, _validation_context,
)
from .listener_config import _HCM, _HCM_NAME, rds_route_config_name
from .model import DownstreamTlsSpec
from .route_config import route_config_spec
from .sidecar_listener import (
    _FAULT, _HTTP_CLASSES, _LISTENER_FILTER_NAMES, _LISTENER_FILTER_TYPES, _NET_CLASSES, _NET_RBAC, _NET_WASM,
    _ROUTER, _TCP_PROXY, _TERMINAL, IGNORED_NETWORK_FILTERS, UNSUPPORTED_NETWORK_FILTERS, FilterChainMatchSpec,
    _http_filter_problem, _istio_wasm, _listener_message, _match_spec, _predicate, _predicate_matches,
    _rbac_enforces, _socket_address, _tcp_proxy_spec, select_filter_chains,
)

__all__ = [
    "SHAPES", "InboundRoute", "InboundRouteConfig", "InboundChain", "ServerListenerSpec",
    "server_listener_spec", "downstream_tls_spec", "server_route_config", "rbac_engine_class",
    "ServerResourceDecoder", "RBAC_TYPE", "RBAC_PER_ROUTE_TYPE",
]

log = logging.getLogger(__name__)

SHAPES = ("grpc", "envoy")
RBAC_TYPE = http_rbac_pb2.RBAC.DESCRIPTOR.full_name
RBAC_PER_ROUTE_TYPE = http_rbac_pb2.RBACPerRoute.DESCRIPTOR.full_name
_TLS_SOCKET_NAME = "envoy.transport_sockets.tls"
_DOWNSTREAM = tls_pb2.DownstreamTlsContext
_DOWNSTREAM_NAME = _DOWNSTREAM.DESCRIPTOR.full_name
_RAW_NAME = raw_buffer_pb2.RawBuffer.DESCRIPTOR.full_name
_SOCKETS = {_DOWNSTREAM_NAME: _DOWNSTREAM, _RAW_NAME: raw_buffer_pb2.RawBuffer}
_LENIENT_STAPLING = tls_pb2.DownstreamTlsContext.LENIENT_STAPLING
_GRPC_HTTP_FILTERS = {_ROUTER: router_pb2.Router, RBAC_TYPE: http_rbac_pb2.RBAC}
_FILTER_CONFIG = route_components_pb2.FilterConfig.DESCRIPTOR.full_name
_OVERRIDE_TYPES = {RBAC_PER_ROUTE_TYPE: http_rbac_pb2.RBACPerRoute, _FAULT: fault_pb2.HTTPFault,
                   _ROUTER: router_pb2.Router, _FILTER_CONFIG: route_components_pb2.FilterConfig}
_NO_SDS_ROOTS = ("validation_context_sds_secret_config is not supported: the roots must come from a certificate "
                 "provider instance (gRPC A29)")
#: Placeholder cluster standing for ``non_forwarding_action`` while the route table is built
#: (a NUL never occurs in a real cluster name a control plane sends for a server).
_NON_FORWARDING = "\x00meshcore:non_forwarding_action"
_MAX_MATCH_COMBINATIONS = 100_000
_ROUTER_NAME = "envoy.filters.http.router"


def _check_shape(shape: str) -> bool:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    return shape == "grpc"


# -- the RBAC engine (meshcore.rbac, another module's job) ----------------------------------------

_ENGINE: List[Any] = []


def rbac_engine_class() -> Optional[Any]:
    """``meshcore.rbac.RbacEngine``, or ``None`` while that package is not there (yet). Callers
    must not read ``None`` as "no RBAC": :attr:`InboundChain.rbac` then refuses."""
    if _ENGINE:
        return _ENGINE[0]
    spec = importlib.util.find_spec(__name__.rsplit(".", 2)[0] + ".rbac")
    if spec is None or spec.origin is None:  # absent, or a directory without __init__ (being written)
        return None
    from .. import rbac  # errors inside the package propagate

    cls = getattr(rbac, "RbacEngine", None)
    if cls is None:
        return None
    _ENGINE.append(cls)
    return cls


# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboundRoute:
    """The route a request to a server takes (static: one object per configured route).

    ``action``: ``"non_forwarding"``, ``"route"`` (to a cluster), ``"redirect"``,
    ``"direct_response"`` or ``"filter_action"``. ``serves``: the server handles the request
    itself (gRPC shape: only ``non_forwarding``; gRPC fails other RPCs with UNAVAILABLE. Envoy
    shape: ``non_forwarding`` and ``route``, the sidecar's route to the local application).
    ``filter_overrides``: the route's ``typed_per_filter_config`` over its virtual host's over
    the route configuration's, by HTTP filter name: an ``RBACPerRoute`` (or ``HTTPFault``)
    message, another type as the ``Any`` received, ``None`` when a ``FilterConfig`` disables the
    filter on this route."""

    virtual_host: str
    name: str
    action: str
    serves: bool
    filter_overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class InboundRouteConfig:
    """A server HttpConnectionManager's route configuration (inline or from RDS).

    ``spec`` is the :class:`~meshcore._route_model.RouteConfigSpec` (matching semantics are the
    client's: Envoy's, with ``non_forwarding_action`` routes standing in as routes to a
    placeholder cluster); :meth:`route` matches a request."""

    __slots__ = ("name", "spec", "_table", "_routes")

    def __init__(self, name: str, spec: RouteConfigSpec, routes: Mapping[int, InboundRoute]) -> None:
        self.name = name
        self.spec = spec
        self._table = RouteTable(spec)
        self._routes = dict(routes)

    def route(self, authority: Optional[str], path: str, headers: Any = None,
              method: str = "GET") -> Optional[InboundRoute]:
        """The route of a request (``None``: no virtual host or route matches; Envoy answers 404,
        gRPC UNAVAILABLE). ``headers``: a mapping or ``(name, value)`` pairs."""
        m = self._table.match(authority, path, headers, method)
        if m is None:
            return None
        return self._routes.get(id(m.route))

    @property
    def routes(self) -> Tuple[InboundRoute, ...]:
        return tuple(self._routes.values())

    def __repr__(self) -> str:
        return f"InboundRouteConfig({self.name!r}, {len(self._routes)} routes)"


@dataclass(frozen=True)
class InboundChain:
    """One filter chain of a server listener: what a connection it accepts gets.

    * ``tls``: ``None`` for plaintext; else the server TLS to apply
      (:class:`~meshcore.xds.model.DownstreamTlsSpec`).
    * ``kind``: ``"http"`` (an HttpConnectionManager), ``"tcp"`` (Envoy shape: a ``tcp_proxy``
      to the application: no L7 policy) or ``"other"``.
    * ``rbac_filters``: ``(filter name, RBAC message)`` of the HCM's RBAC HTTP filters in filter
      order (Istio: ``envoy.filters.http.rbac.DENY`` then ``envoy.filters.http.rbac``);
      ``rbac``: the :class:`meshcore.RbacEngine` built from them (``None`` when there are none).
    * ``route_config``: :class:`InboundRouteConfig` (``route(...)`` is a shortcut);
      ``route_config_name`` the RDS name when it came from RDS.
    * HCM settings an integration applies before RBAC sees the request: ``normalize_path``,
      ``merge_slashes`` (:func:`meshcore.xds.envoy_shape.normalize_path`),
      ``use_remote_address`` / ``xff_num_trusted_hops`` (Envoy's remote address).
    * ``unsupported``: what meshcore cannot honour on this chain (Envoy shape); an integration
      must refuse the connections such a chain is selected for. Always empty in the gRPC shape
      (the listener is NACKed instead).

    A connection keeps the chain object it was accepted with: a configuration update builds new
    chains and never changes this one.
    """

    name: str
    match: FilterChainMatchSpec = field(default_factory=FilterChainMatchSpec)
    kind: str = "http"
    tls: Optional[DownstreamTlsSpec] = None
    rbac_filters: Tuple[Tuple[str, Any], ...] = ()
    route_config: Optional[InboundRouteConfig] = None
    route_config_name: Optional[str] = None
    stat_prefix: str = ""
    http_filters: Tuple[str, ...] = ()  # HTTP filter names in order (as configured)
    normalize_path: bool = False
    merge_slashes: bool = False
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    unsupported: Tuple[str, ...] = ()
    shape: str = "grpc"
    _engine: List[Any] = field(default_factory=list, compare=False, repr=False)
    _per_route: Dict[int, Tuple[InboundRoute, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rbac(self) -> Optional[Any]:
        """The :class:`meshcore.RbacEngine` of the chain's RBAC filters (built once; ``None``
        without RBAC filters). ``remote_ip`` as the HCM decides it: the peer in the gRPC shape
        (A41), ``use_remote_address`` / ``xff_num_trusted_hops`` in the Envoy shape. Raises
        :class:`~meshcore.errors.ConfigError` when the chain has RBAC filters and
        :mod:`meshcore.rbac` is not available: never "no RBAC" by accident."""
        if not self.rbac_filters:
            return None
        if self._engine:
            return self._engine[0]
        cls = rbac_engine_class()
        if cls is None:
            raise ConfigError(self.name or "filter chain", "rbac",
                              "the chain has RBAC filters but meshcore.rbac is not available: refuse its requests")
        self._engine.append(_make_engine(cls, self))
        return self._engine[0]

    def rbac_for(self, route: Optional[InboundRoute]) -> Optional[Any]:
        """The RBAC engine for a request that took ``route`` (from :meth:`route`): :attr:`rbac`
        with the route's ``RBACPerRoute`` / ``FilterConfig`` overrides of the chain's RBAC filters
        applied (``RbacEngine.for_route``; compiled once per route). ``None`` route: :attr:`rbac`."""
        engine = self.rbac
        if engine is None or route is None:
            return engine
        hit = self._per_route.get(id(route))
        if hit is not None and hit[0] is route:
            return hit[1]
        names = {name for name, _ in self.rbac_filters}
        overrides = {k: v for k, v in route.filter_overrides.items() if k in names}
        result = engine.for_route(overrides) if overrides else engine
        if len(self._per_route) >= 4096:
            self._per_route.clear()
        self._per_route[id(route)] = (route, result)
        return result

    def route(self, authority: Optional[str], path: str, headers: Any = None,
              method: str = "GET") -> Optional[InboundRoute]:
        """``route_config.route(...)``; ``None`` without a route configuration (``tcp`` chains)."""
        rc = self.route_config
        return rc.route(authority, path, headers, method) if rc is not None else None

    @property
    def mtls(self) -> bool:
        """The chain requires a verified client certificate (Istio STRICT)."""
        return self.tls is not None and self.tls.require_client_certificate

    def __repr__(self) -> str:
        mode = "mTLS" if self.mtls else ("TLS" if self.tls is not None else "plaintext")
        rbac = ", rbac=" + "+".join(n for n, _ in self.rbac_filters) if self.rbac_filters else ""
        bad = f", {len(self.unsupported)} unsupported" if self.unsupported else ""
        return f"InboundChain({self.name!r}, {self.kind}, {mode}{rbac}{bad})"


@dataclass(frozen=True)
class ServerListenerSpec:
    """A server listener (see the module docstring); :meth:`select` picks a connection's chain."""

    name: str
    shape: str
    address: Optional[Tuple[str, int]]
    filter_chains: Tuple[InboundChain, ...] = ()
    default_filter_chain: Optional[InboundChain] = None
    additional_addresses: Tuple[Tuple[str, int], ...] = ()
    use_original_dst: bool = False  # ``use_original_dst`` or an ``original_dst`` listener filter (Envoy shape)
    #: Envoy shape: a TLS / HTTP inspector runs, and its ``filter_disabled`` predicate (nested
    #: tuples, ``None`` = never disabled)
    tls_inspector: bool = False
    tls_inspector_disabled: Any = None
    http_inspector: bool = False
    http_inspector_disabled: Any = None
    unsupported: Tuple[str, ...] = ()  # listener-wide (Envoy shape): no chain can be selected

    @property
    def addresses(self) -> Tuple[Tuple[str, int], ...]:
        return ((self.address,) if self.address else ()) + self.additional_addresses

    @property
    def chains(self) -> Tuple[InboundChain, ...]:
        """Every chain, the default one last."""
        return self.filter_chains + ((self.default_filter_chain,) if self.default_filter_chain else ())

    @property
    def route_config_names(self) -> Tuple[str, ...]:
        """The RDS names the chains need (sorted, unique)."""
        return tuple(sorted({c.route_config_name for c in self.chains if c.route_config_name and
                             c.route_config is None}))

    def with_route_configs(self, configs: Mapping[str, InboundRouteConfig]) -> "ServerListenerSpec":
        """A copy whose RDS chains carry their route configuration from ``configs`` (by name)."""
        def fill(c: Optional[InboundChain]) -> Optional[InboundChain]:
            if c is None or not c.route_config_name or c.route_config is not None:
                return c
            return dataclasses.replace(c, route_config=configs[c.route_config_name], _engine=list(c._engine),
                                       _per_route={})

        return dataclasses.replace(self, filter_chains=tuple(fill(c) for c in self.filter_chains),  # type: ignore
                                   default_filter_chain=fill(self.default_filter_chain))

    def select(self, source_ip: Optional[str], source_port: int, destination_ip: Optional[str],
               destination_port: int, tls: bool, server_name: Optional[str] = None,
               alpn: Optional[Iterable[str]] = None) -> Optional[InboundChain]:
        """The chain of a new connection (``None``: no chain and no default chain, or nothing can
        be selected; refuse the connection without sending a byte).

        ``tls``: the client's first bytes are a TLS ClientHello. ``server_name``/``alpn``: its SNI
        and offered ALPN list (TLS), or for a plaintext connection what Envoy's HTTP inspector
        would report (``("http/1.1",)``, ``("h2c",)``; ``None`` for anything else). The gRPC
        shape ignores ``destination_port``, ``tls``, ``server_name`` and ``alpn`` (A36: nothing
        inspects them)."""
        if self.unsupported:
            return None
        src = _ip(source_ip)
        dst = _ip(destination_ip)
        if self.shape == "grpc":
            port, transport, sni, alpns = 0, "raw_buffer", "", ()
        else:
            port = int(destination_port or 0)
            transport, sni, alpns = "raw_buffer", "", ()
            if tls and self.tls_inspector and not _disabled(self.tls_inspector_disabled, port):
                transport = "tls"
                sni = (server_name or "").lower()
                alpns = tuple(alpn or ())
            elif not tls and self.http_inspector and not _disabled(self.http_inspector_disabled, port):
                alpns = tuple(alpn or ())
        picked = select_filter_chains(self.filter_chains, port=port, dst=dst, server_name=sni, transport=transport,
                                      alpns=alpns, src=src, src_port=int(source_port or 0))
        if picked:
            return picked[0][1]
        return self.default_filter_chain


def _disabled(predicate: Any, port: int) -> bool:
    return predicate is not None and _predicate_matches(predicate, port)


def _ip(text: Optional[str]) -> Optional[Any]:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


# -- decoding helpers: NACK (gRPC shape) or record (Envoy shape) -----------------------------------


class _Ctx:
    """The listener being decoded: its name, the shape, the providers, and where problems go."""

    __slots__ = ("resource", "strict", "shape", "providers")

    def __init__(self, resource: str, shape: str, providers: Optional[Collection[str]]) -> None:
        self.resource = resource
        self.shape = shape
        self.strict = shape == "grpc"
        self.providers = providers

    def fail(self, problems: List[str], field: str, reason: str) -> None:
        """gRPC shape: NACK; Envoy shape: record the problem and go on."""
        if self.strict:
            raise ConfigError(self.resource, field, reason)
        problems.append(f"{field}: {reason}")

    def record(self, problems: List[str], err: ConfigError) -> None:
        if self.strict:
            raise err
        problems.append(f"{err.field}: {err.reason}" if err.field else err.reason)


# -- TLS ------------------------------------------------------------------------------------------


def downstream_tls_spec(ctx: Any, resource: str = "DownstreamTlsContext", path: str = "",
                        providers: Optional[Collection[str]] = None, *, shape: str = "grpc") -> DownstreamTlsSpec:
    """``DownstreamTlsContext`` -> :class:`~meshcore.xds.model.DownstreamTlsSpec`; raises
    ``ConfigError`` naming the field (``path``: the context's own path).

    A29's server rules: an identity certificate is required
    (``tls_certificate_provider_instance``, or the deprecated
    ``tls_certificate_certificate_provider_instance``; Envoy shape: also one
    ``tls_certificate_sds_secret_configs`` entry); ``validation_context_sds_secret_config`` is
    refused in the gRPC shape (Envoy shape: the SDS roots, Istio's ``ROOTCA``); no validation
    context is plain TLS; ``require_client_certificate`` without a validation context,
    ``require_sni``, an ``ocsp_staple_policy`` other than ``LENIENT_STAPLING``, inline or file
    certificates and whatever the client side refuses for verifying less (``trusted_ca``, CRLs,
    pinning, ``allow_expired_certificate``, custom handshakers/validators; see
    :mod:`meshcore.xds.cluster_config`) are errors. SAN matchers (typed, or the untyped
    deprecated list) are kept; they need roots. ``providers``: the bootstrap's certificate
    provider instance names (an unknown one is an error); ``None`` does not check.
    """
    grpc = _check_shape(shape)
    p = f"{path}." if path else ""
    if ctx.require_sni.value:
        raise ConfigError(resource, f"{p}require_sni", "requiring SNI is not supported (gRPC A29)")
    if ctx.ocsp_staple_policy != _LENIENT_STAPLING:
        policy = _DOWNSTREAM.OcspStaplePolicy.Name(ctx.ocsp_staple_policy) \
            if ctx.ocsp_staple_policy in _DOWNSTREAM.OcspStaplePolicy.values() else str(ctx.ocsp_staple_policy)
        raise ConfigError(resource, f"{p}ocsp_staple_policy",
                          f"{policy} is not supported: only LENIENT_STAPLING (gRPC A29)")
    cpath = f"{p}common_tls_context"
    if not ctx.HasField("common_tls_context"):
        raise ConfigError(resource, cpath, "a server needs a CommonTlsContext naming its identity certificate")
    common = ctx.common_tls_context
    for fname, reason in _UNSUPPORTED_COMMON.items():
        if common.HasField(fname):
            raise ConfigError(resource, f"{cpath}.{fname}", reason)
    if len(common.tls_certificates):
        raise ConfigError(resource, f"{cpath}.tls_certificates",
                          "inline or file certificates are not supported: the identity comes from a certificate "
                          "provider instance" + ("" if grpc else " or an SDS secret name"))
    identity = None
    for fname in ("tls_certificate_provider_instance", "tls_certificate_certificate_provider_instance"):
        if common.HasField(fname):
            identity = _provider(getattr(common, fname), resource, f"{cpath}.{fname}", providers)
            break
    sds = common.tls_certificate_sds_secret_configs
    if identity is None and len(sds):
        spath = f"{cpath}.tls_certificate_sds_secret_configs"
        if grpc:
            raise ConfigError(resource, spath, "SDS certificates are not supported: the identity must come from "
                              "tls_certificate_provider_instance (gRPC A29)")
        if len(sds) > 1:
            raise ConfigError(resource, spath, "several server certificates (chosen by SNI or key type) are not "
                              "supported")
        identity = _sds(sds[0], resource, f"{spath}[0]")
    if identity is None:
        raise ConfigError(resource, f"{cpath}.tls_certificate_provider_instance",
                          "a server needs an identity certificate (tls_certificate_provider_instance; gRPC A29)")
    roots, sans = _server_roots(common, resource, cpath, providers, grpc)
    require = ctx.require_client_certificate.value
    if require and roots is None:
        raise ConfigError(resource, f"{p}require_client_certificate",
                          "require_client_certificate is set, but there is no validation context (root "
                          "certificates) to verify client certificates with (gRPC A29)")
    fields: Dict[str, Any] = {}
    if common.HasField("tls_params"):
        fields.update(_tls_params(common.tls_params, resource, f"{cpath}.tls_params"))
    alpn = _alpn(common.alpn_protocols, resource, f"{cpath}.alpn_protocols")
    return DownstreamTlsSpec(identity=identity, roots=roots, require_client_certificate=require,
                             san_matchers=sans, alpn_protocols=alpn, **fields)


def _server_roots(common: Any, resource: str, cpath: str, providers: Optional[Collection[str]],
                  grpc: bool) -> Tuple[Optional[Any], Tuple[Any, ...]]:
    which = common.WhichOneof("validation_context_type")
    if which is None:
        return None, ()
    vpath = f"{cpath}.{which}"
    if which == "validation_context_certificate_provider_instance":
        return _provider(common.validation_context_certificate_provider_instance, resource, vpath, providers), ()
    if which == "validation_context_sds_secret_config":
        if grpc:
            raise ConfigError(resource, vpath, _NO_SDS_ROOTS)
        return _sds(common.validation_context_sds_secret_config, resource, vpath), ()
    if which == "validation_context_certificate_provider":
        raise ConfigError(resource, vpath, "not supported (use ca_certificate_provider_instance)")
    if which == "validation_context":
        roots, sans = _validation_context(common.validation_context, resource, vpath, providers)
    else:
        combined = common.combined_validation_context
        if combined.HasField("validation_context_certificate_provider"):
            raise ConfigError(resource, f"{vpath}.validation_context_certificate_provider",
                              "not supported (use ca_certificate_provider_instance)")
        if grpc and combined.HasField("validation_context_sds_secret_config"):
            raise ConfigError(resource, f"{vpath}.validation_context_sds_secret_config", _NO_SDS_ROOTS)
        roots, sans = _validation_context(combined.default_validation_context, resource,
                                          f"{vpath}.default_validation_context", providers)
        if roots is None and combined.HasField("validation_context_certificate_provider_instance"):
            roots = _provider(combined.validation_context_certificate_provider_instance, resource,
                              f"{vpath}.validation_context_certificate_provider_instance", providers)
        if roots is None and combined.HasField("validation_context_sds_secret_config"):
            roots = _sds(combined.validation_context_sds_secret_config, resource,
                         f"{vpath}.validation_context_sds_secret_config")
    if roots is None and sans:
        raise ConfigError(resource, vpath, _NO_TRUSTED_CA_SAN)
    return roots, sans


def _transport_socket(ts: Any, ctx: _Ctx, path: str) -> Optional[DownstreamTlsSpec]:
    """A chain's transport socket: DownstreamTlsContext -> spec, RawBuffer -> ``None`` (plaintext)."""
    if not ts.HasField("typed_config"):
        raise ConfigError(ctx.resource, f"{path}.typed_config",
                          f"transport socket {ts.name!r} has no typed_config (gRPC A29: unknown transport socket)")
    msg, type_ = unpack(ts.typed_config, _SOCKETS, ctx.resource, f"{path}.typed_config")
    if msg is None:
        raise ConfigError(ctx.resource, f"{path}.typed_config",
                          f"unsupported transport socket {type_ or ts.name!r} (supported: DownstreamTlsContext, "
                          "RawBuffer)")
    if type_ == _RAW_NAME:
        return None
    if ctx.strict and ts.name != _TLS_SOCKET_NAME:
        raise ConfigError(ctx.resource, f"{path}.name",
                          f"transport socket name must be {_TLS_SOCKET_NAME!r}, got {ts.name!r} (gRPC A29)")
    return downstream_tls_spec(msg, ctx.resource, f"{path}.typed_config", ctx.providers, shape=ctx.shape)


# -- route configuration ----------------------------------------------------------------------------


def server_route_config(rc: Any, resource: Optional[str] = None, path: str = "", *, shape: str = "grpc",
                        providers: Optional[Collection[str]] = None) -> InboundRouteConfig:
    """A server's ``RouteConfiguration`` -> :class:`InboundRouteConfig`; raises ``ConfigError``
    (on ``resource``, under ``path``; default: the route configuration's own name).

    Validated as a client's (:func:`~meshcore.xds.route_config.route_config_spec`), with
    ``non_forwarding_action`` allowed. gRPC shape: virtual hosts without a name or with a
    duplicate one (gRPC does not require names; istiod's ``inbound`` host has none) are renamed
    ``#<index>`` for the table; a ``typed_per_filter_config`` of an unknown type is an error
    unless its ``FilterConfig`` is ``is_optional`` (A39). With :mod:`meshcore.rbac` installed, an
    ``RBACPerRoute``'s ``rbac`` must build."""
    grpc = _check_shape(shape)
    resource = resource or rc.name or "RouteConfiguration"
    prefix = f"{path}." if path else ""
    work = route_pb2.RouteConfiguration()
    work.CopyFrom(rc)
    actions: List[List[str]] = []
    names: Set[str] = set()
    for vi, vh in enumerate(work.virtual_hosts):
        if grpc and (not vh.name or vh.name in names):
            new = f"#{vi}"
            while new in names or any(new == other.name for other in rc.virtual_hosts):
                new += "#"
            vh.name = new
        names.add(vh.name)
        kinds = []
        for r in vh.routes:
            kind = r.WhichOneof("action") or ""
            if kind == "non_forwarding_action":
                r.route.cluster = _NON_FORWARDING
            kinds.append(kind)
        actions.append(kinds)
    try:
        spec = route_config_spec(work)
    except ConfigError as e:
        raise ConfigError(resource, f"{prefix}{e.field}" if e.field else (path or "(route_config)"), e.reason) from None
    base = _overrides(rc.typed_per_filter_config, resource, f"{prefix}typed_per_filter_config", grpc)
    routes: Dict[int, InboundRoute] = {}
    if len(spec.virtual_hosts) != len(rc.virtual_hosts):  # pragma: no cover  (route_config_spec keeps them all)
        raise ConfigError(resource, path or "(route_config)", "virtual hosts were dropped while decoding")
    for vi, (vh, vspec) in enumerate(zip(rc.virtual_hosts, spec.virtual_hosts)):
        vwhere = f"{prefix}virtual_hosts[{vh.name or vi}]"
        vh_over = dict(base)
        vh_over.update(_overrides(vh.typed_per_filter_config, resource, f"{vwhere}.typed_per_filter_config", grpc))
        if len(vspec.routes) != len(vh.routes):  # pragma: no cover
            raise ConfigError(resource, vwhere, "routes were dropped while decoding")
        for ri, (r, rspec) in enumerate(zip(vh.routes, vspec.routes)):
            over = dict(vh_over)
            over.update(_overrides(r.typed_per_filter_config, resource,
                                   f"{vwhere}.routes[{r.name or ri}].typed_per_filter_config", grpc))
            kind = actions[vi][ri]
            action = kind[:-len("_action")] if kind.endswith("_action") else kind
            serves = action == "non_forwarding" or (not grpc and action == "route")
            routes[id(rspec)] = InboundRoute(virtual_host=vh.name, name=r.name, action=action, serves=serves,
                                             filter_overrides=MappingProxyType(over))
    return InboundRouteConfig(rc.name, spec, routes)


def _overrides(configs: Any, resource: str, where: str, grpc: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in sorted(configs):
        any_ = configs[name]
        path = f"{where}[{name}]"
        msg, type_ = unpack(any_, _OVERRIDE_TYPES, resource, path)
        optional = False
        if type_ == _FILTER_CONFIG:
            if msg.disabled:
                out[name] = None
                continue
            optional = msg.is_optional
            any_, path = msg.config, path + ".config"
            msg, type_ = unpack(any_, _OVERRIDE_TYPES, resource, path)
        if msg is None:
            if grpc and not optional:
                raise ConfigError(resource, path, f"no filter implementation for {type_ or 'an empty config'!r} "
                                  "(mark the FilterConfig is_optional to skip it; gRPC A39)")
            out[name] = any_
            continue
        if type_ == RBAC_PER_ROUTE_TYPE and msg.HasField("rbac"):
            _validate_rbac([msg.rbac], resource, f"{path}.rbac")
        out[name] = msg
    return out


def _validate_rbac(configs: List[Any], resource: str, path: str) -> Optional[Any]:
    """Build an engine for ``configs`` (RBAC configs or ``(name, config)`` pairs) when
    :mod:`meshcore.rbac` is installed: its ConfigError, re-rooted under ``path``, is the NACK.
    ``None`` without the package."""
    cls = rbac_engine_class()
    if cls is None:
        return None
    try:
        return cls.from_xds(configs)
    except ConfigError as e:
        raise ConfigError(resource, f"{path}.{e.field}" if e.field else path, e.reason) from None


def _make_engine(cls: Any, chain: "InboundChain") -> Any:
    """The chain's engine: its RBAC filters by name (``for_route`` overrides key on them)."""
    if chain.shape == "grpc":  # A41: remote_ip is the peer; xff_num_trusted_hops is 0
        return cls.from_xds(list(chain.rbac_filters), use_remote_address=True)
    return cls.from_xds(list(chain.rbac_filters), use_remote_address=chain.use_remote_address,
                        xff_num_trusted_hops=chain.xff_num_trusted_hops)


# -- HttpConnectionManager --------------------------------------------------------------------------


def _hcm(hcm: Any, ctx: _Ctx, prefix: str, problems: List[str]) -> Dict[str, Any]:
    """The chain fields of an HttpConnectionManager (``prefix``: its path, ending in ``.``)."""
    out: Dict[str, Any] = {
        "stat_prefix": hcm.stat_prefix, "normalize_path": hcm.normalize_path.value,
        "merge_slashes": hcm.merge_slashes, "use_remote_address": hcm.use_remote_address.value,
        "xff_num_trusted_hops": hcm.xff_num_trusted_hops,
    }
    if ctx.strict:
        if hcm.xff_num_trusted_hops:
            ctx.fail(problems, f"{prefix}xff_num_trusted_hops", "must be unset or 0 (gRPC A41)")
        if len(hcm.original_ip_detection_extensions):
            ctx.fail(problems, f"{prefix}original_ip_detection_extensions", "must be empty (gRPC A41)")
    else:
        if len(hcm.original_ip_detection_extensions):
            ctx.fail(problems, f"{prefix}original_ip_detection_extensions",
                     "custom original IP detection changes the remote address RBAC sees")
        if hcm.HasField("path_normalization_options"):
            ctx.fail(problems, f"{prefix}path_normalization_options", "not supported")
        if len(hcm.early_header_mutation_extensions):
            ctx.fail(problems, f"{prefix}early_header_mutation_extensions", "change headers before RBAC")
    which = hcm.WhichOneof("route_specifier")
    try:
        if which == "rds":
            out["route_config_name"] = rds_route_config_name(hcm.rds, ctx.resource, prefix)
        elif which == "route_config":
            out["route_config"] = server_route_config(hcm.route_config, ctx.resource, f"{prefix}route_config",
                                                      shape=ctx.shape, providers=ctx.providers)
        elif which == "scoped_routes":
            ctx.fail(problems, f"{prefix}scoped_routes", "scoped routes are not supported; use rds or route_config")
        else:
            ctx.fail(problems, f"{prefix}route_specifier", "is required: set rds or route_config")
    except ConfigError as e:
        ctx.record(problems, e)
    names, rbac = (_grpc_http_filters if ctx.strict else _envoy_http_filters)(hcm, ctx, prefix, problems)
    out["http_filters"] = names
    out["rbac_filters"] = rbac
    return out


def _grpc_http_filters(hcm: Any, ctx: _Ctx, prefix: str,
                       problems: List[str]) -> Tuple[Tuple[str, ...], Tuple[Tuple[str, Any], ...]]:
    """A39's server rules: RBAC and the router only (optional others skipped), router last."""
    resource = ctx.resource
    seen: Set[str] = set()
    kept: List[Tuple[str, str, Any, str]] = []
    for i, f in enumerate(hcm.http_filters):
        path = f"{prefix}http_filters[{i}]"
        if not f.name:
            raise ConfigError(resource, f"{path}.name", "value length must be at least 1 characters")
        if f.name in seen:
            raise ConfigError(resource, f"{path}.name", f"duplicate HTTP filter name {f.name!r}")
        seen.add(f.name)
        which = f.WhichOneof("config_type")
        if which != "typed_config":
            if f.is_optional:
                continue
            what = "filter config discovery (ECDS) is not supported" if which == "config_discovery" else \
                f"filter {f.name!r} has no typed_config"
            raise ConfigError(resource, f"{path}.{which or 'typed_config'}", what)
        msg, type_ = unpack(f.typed_config, _GRPC_HTTP_FILTERS, resource, f"{path}.typed_config")
        if msg is None:
            if f.is_optional:
                continue
            raise ConfigError(resource, f"{path}.typed_config",
                              f"HTTP filter {f.name!r} ({type_ or 'no type'}) is not supported on servers (supported: "
                              "RBAC, Router; mark the filter is_optional to skip it)")
        if f.disabled:
            raise ConfigError(resource, f"{path}.disabled",
                              "disabled HTTP filters are not supported on servers (a route could enable them)")
        kept.append((f.name, type_, msg, path))
    if not kept:
        raise ConfigError(resource, f"{prefix}http_filters", "must not be empty (the router filter is required)")
    last = len(kept) - 1
    rbac = []
    for j, (name, type_, msg, path) in enumerate(kept):
        if type_ == _ROUTER and j != last:
            raise ConfigError(resource, path, f"terminal filter {name!r} (router) must be the last filter")
        if j == last and type_ != _ROUTER:
            raise ConfigError(resource, path, f"filter {name!r} is last, but the last filter must be the router")
        if type_ == RBAC_TYPE:
            _validate_rbac([(name, msg)], resource, f"{path}.typed_config")
            rbac.append((name, msg))
    return tuple(k[0] for k in kept), tuple(rbac)


def _envoy_http_filters(hcm: Any, ctx: _Ctx, prefix: str,
                        problems: List[str]) -> Tuple[Tuple[str, ...], Tuple[Tuple[str, Any], ...]]:
    """What a sidecar's inbound HCM runs: RBAC kept, the router last, the rest classified."""
    entries = hcm.http_filters
    if not len(entries):  # Envoy adds the router
        return (_ROUTER_NAME,), ()
    last = len(entries) - 1
    names: List[str] = []
    rbac: List[Tuple[str, Any]] = []
    for i, f in enumerate(entries):
        path = f"{prefix}http_filters[{i}]"
        names.append(f.name)
        which = f.WhichOneof("config_type")
        if which != "typed_config":
            problems.append(f"{path} {f.name!r}: " + (
                "configured through ECDS (config_discovery), which meshcore does not fetch"
                if which == "config_discovery" else "no typed_config: unknown filter"))
            continue
        try:
            msg, type_ = unpack(f.typed_config, _HTTP_CLASSES, ctx.resource, f"{path}.typed_config")
        except ConfigError as e:
            ctx.record(problems, e)
            continue
        if type_ == _ROUTER:
            if i != last:
                problems.append(f"{path} {f.name!r}: the router must be the last filter (Envoy rejects this)")
            elif f.disabled:
                problems.append(f"{path} {f.name!r}: the last (terminal) filter cannot be disabled")
            if len(msg.upstream_http_filters):
                problems.append(f"{path} {f.name!r}: upstream_http_filters are not supported")
            continue
        if i == last:
            problems.append(f"{path} {f.name!r}: the last filter must be the router (Envoy rejects this)")
        if type_ == RBAC_TYPE:
            if f.disabled:
                problems.append(f"{path} {f.name!r}: a disabled RBAC filter (a route could enable it) is not "
                                "supported")
                continue
            try:
                _validate_rbac([(f.name, msg)], ctx.resource, f"{path}.typed_config")
            except ConfigError as e:
                ctx.record(problems, e)
                continue
            rbac.append((f.name, msg))
            continue
        if type_ == _FAULT:
            if msg.HasField("delay") or msg.HasField("abort"):
                problems.append(f"{path} {f.name!r}: the sidecar would inject faults into requests to this server")
            continue
        if msg is None and f.is_optional:
            continue  # Envoy skips an optional filter it has no implementation for
        why = _http_filter_problem(msg, type_)
        if why is not None:
            problems.append(f"{path} {f.name!r} ({type_ or 'no type'}): {why}")
    return tuple(names), tuple(rbac)


# -- filter chains ------------------------------------------------------------------------------------


def _chain(fc: Any, ctx: _Ctx, where: str, listener_problems: List[str]) -> InboundChain:
    mproblems: List[str] = []
    mpath = f"{where}.filter_chain_match"
    match = _match_spec(fc.filter_chain_match, ctx.resource, mpath, mproblems)
    if fc.filter_chain_match.source_type not in (0, 1, 2):
        mproblems.append(f"{mpath}.source_type: unknown value {fc.filter_chain_match.source_type}")
    for text in mproblems:
        if ctx.strict:
            raise ConfigError(ctx.resource, mpath, text)
        listener_problems.append(text)
    problems: List[str] = []
    fields: Dict[str, Any] = {}
    kind = "other"
    if ctx.strict:
        fields = _grpc_network_filters(fc, ctx, where)
        kind = "http"
    else:
        kind, fields = _envoy_network_filters(fc, ctx, where, problems)
    tls = None
    if fc.HasField("transport_socket"):
        try:
            tls = _transport_socket(fc.transport_socket, ctx, f"{where}.transport_socket")
        except ConfigError as e:
            ctx.record(problems, e)
    if fc.HasField("use_proxy_proto") and fc.use_proxy_proto.value:
        ctx.fail(problems, f"{where}.use_proxy_proto", "the PROXY protocol is not supported")
    chain = InboundChain(name=fc.name, match=match, kind=kind, tls=tls, shape=ctx.shape, **fields)
    cls = rbac_engine_class() if chain.rbac_filters else None
    if cls is not None:
        try:
            _precompile(cls, chain)
        except ConfigError as e:
            ctx.record(problems, ConfigError(ctx.resource, f"{where}.rbac", str(e)))
    if problems:
        chain = dataclasses.replace(chain, unsupported=tuple(problems), _engine=[], _per_route={})
    return chain


def _precompile(cls: Any, chain: InboundChain) -> None:
    """Build the chain's engine and its routes' (the RBACPerRoute overrides): errors are the
    listener's NACK (gRPC shape) or make the chain unsupported (Envoy shape)."""
    chain._engine.append(_make_engine(cls, chain))
    if chain.route_config is not None:
        for route in chain.route_config.routes:
            chain.rbac_for(route)


def _grpc_network_filters(fc: Any, ctx: _Ctx, where: str) -> Dict[str, Any]:
    """A36: unique named filters, HttpConnectionManager only, at least one (the first is used)."""
    resource = ctx.resource
    seen: Set[str] = set()
    used: Optional[Dict[str, Any]] = None
    for i, f in enumerate(fc.filters):
        path = f"{where}.filters[{i}]"
        if not f.name:
            raise ConfigError(resource, f"{path}.name", "network filters need a name")
        if f.name in seen:
            raise ConfigError(resource, f"{path}.name", f"duplicate network filter name {f.name!r}")
        seen.add(f.name)
        if f.WhichOneof("config_type") != "typed_config":
            raise ConfigError(resource, path, f"network filter {f.name!r} has no typed_config")
        msg, type_ = unpack(f.typed_config, {_HCM_NAME: _HCM}, resource, f"{path}.typed_config")
        if msg is None:
            raise ConfigError(resource, f"{path}.typed_config",
                              f"unsupported network filter {type_ or 'with no type'!r} (servers support only "
                              "HttpConnectionManager; gRPC A36)")
        fields = _hcm(msg, ctx, f"{path}.typed_config.", [])
        if used is None:
            used = fields
    if used is None:
        raise ConfigError(resource, f"{where}.filters", "no HttpConnectionManager filter (gRPC A36)")
    return used


def _envoy_network_filters(fc: Any, ctx: _Ctx, where: str, problems: List[str]) -> Tuple[str, Dict[str, Any]]:
    """A sidecar chain's network filters: the terminal one decides the kind."""
    fields: Dict[str, Any] = {}
    kind = "other"
    last = len(fc.filters) - 1
    if last < 0:
        problems.append(f"{where}.filters: no network filters (Envoy closes the connection)")
    for i, f in enumerate(fc.filters):
        path = f"{where}.filters[{i}]"
        if f.WhichOneof("config_type") != "typed_config":
            problems.append(f"{path} {f.name!r}: no typed_config (ECDS or unknown filter)")
            continue
        try:
            msg, type_ = unpack(f.typed_config, _NET_CLASSES, ctx.resource, f"{path}.typed_config")
        except ConfigError as e:
            ctx.record(problems, e)
            continue
        terminal = _TERMINAL.get(type_)
        if terminal is not None and i != last:
            problems.append(f"{path} {f.name!r}: a terminal filter must be the last one (Envoy rejects this)")
        elif terminal is None and i == last:
            problems.append(f"{path} {f.name!r}: the last network filter must be a terminal filter")
        if type_ == _HCM_NAME:
            if not fields:
                fields = _hcm(msg, ctx, f"{path}.typed_config.", problems)
        elif type_ == _TCP_PROXY:
            tcp = _tcp_proxy_spec(msg, ctx.resource, f"{path}.typed_config.", problems)
            fields.setdefault("stat_prefix", tcp.stat_prefix)
        elif type_ == _NET_WASM:
            if not _istio_wasm(msg):
                problems.append(f"{path} {f.name!r}: {UNSUPPORTED_NETWORK_FILTERS[type_]}")
        elif type_ == _NET_RBAC:
            if _rbac_enforces(msg):
                problems.append(f"{path} {f.name!r}: network RBAC with enforced rules is not supported on servers "
                                "(only the HTTP RBAC filter)")
        elif type_ not in IGNORED_NETWORK_FILTERS:
            why = UNSUPPORTED_NETWORK_FILTERS.get(type_, "unknown network filter: its effect is unknown")
            problems.append(f"{path} {f.name!r} ({type_ or 'no type'}): {why}")
        if i == last and terminal is not None:
            kind = terminal
    if kind == "http" and "http_filters" not in fields:
        kind = "other"
    return kind, fields


def _normalized_keys(chain: InboundChain) -> Tuple[int, Iterable[Tuple[Any, ...]]]:
    m = chain.match
    axes = ([m.destination_port], list(m.prefix_ranges) or [None], list(m.server_names) or [None],
            [m.transport_protocol], list(m.application_protocols) or [None],
            list(m.direct_source_prefix_ranges) or [None], [m.source_type],
            list(m.source_prefix_ranges) or [None], list(m.source_ports) or [None])
    size = 1
    for axis in axes:
        size *= len(axis)
    return size, itertools.product(*axes)


def _overlaps(chains: Tuple[InboundChain, ...]) -> Optional[str]:
    """A36's uniqueness check: the first two chains whose normalized matchers share a
    combination (``None``: all distinct)."""
    seen: Dict[Tuple[Any, ...], int] = {}
    total = 0
    for i, chain in enumerate(chains):
        size, keys = _normalized_keys(chain)
        total += size
        if total > _MAX_MATCH_COMBINATIONS:
            return (f"the filter chain matchers have more than {_MAX_MATCH_COMBINATIONS} combinations; "
                    "too many to check for overlaps")
        for key in keys:
            other = seen.setdefault(key, i)
            if other != i:
                return (f"filter chains {other} {chains[other].name!r} and {i} {chain.name!r} have overlapping "
                        "matching rules (multiple filter chains with the same matching rules are defined)")
    return None


def _can_match_a36(chain: InboundChain) -> bool:
    m = chain.match
    return not (m.destination_port or m.server_names or m.application_protocols
                or m.transport_protocol not in ("", "raw_buffer"))


# -- the listener ---------------------------------------------------------------------------------------


def server_listener_spec(listener: Any, providers: Optional[Collection[str]] = None, *,
                         shape: str = "grpc") -> ServerListenerSpec:
    """Decode a server Listener (message, ``Any`` or proto3-JSON dict); see the module docstring.

    ``providers``: the bootstrap's certificate provider instance names (``None``: unchecked).
    gRPC shape: raises :class:`~meshcore.errors.ConfigError` (the NACK text) for anything A36,
    A29, A39 and A41 reject. Envoy shape: raises only for input that is not a server Listener."""
    strict = _check_shape(shape)
    lis = _listener_message(listener)
    resource = lis.name or "Listener"
    ctx = _Ctx(resource, shape, providers)
    problems: List[str] = []
    if lis.HasField("api_listener"):
        raise ConfigError(resource, "api_listener", "a client (API) listener, not a server listener")
    tls_inspector = http_inspector = False
    tls_disabled = http_disabled = None
    original_dst = lis.use_original_dst.value
    if strict:
        if len(lis.listener_filters):
            raise ConfigError(resource, "listener_filters",
                              f"unsupported field 'listener_filters' contains {len(lis.listener_filters)} entries "
                              "(gRPC A36)")
        if lis.use_original_dst.value:
            raise ConfigError(resource, "use_original_dst", "must not be true (gRPC A36)")
    else:
        for i, lf in enumerate(lis.listener_filters):
            which = lf.WhichOneof("config_type")
            if which == "typed_config":
                role = _LISTENER_FILTER_TYPES.get(type_name(lf.typed_config.type_url))
                if role is None:
                    try:
                        role = _LISTENER_FILTER_TYPES.get(unpack(lf.typed_config, {}, resource,
                                                                 f"listener_filters[{i}].typed_config")[1])
                    except ConfigError:
                        role = None
            elif which is None:
                role = _LISTENER_FILTER_NAMES.get(lf.name)
            else:
                role = None
            if role is None:
                problems.append(f"listener_filters[{i}] {lf.name!r}: unknown listener filter (it may change the "
                                "connection or the filter chain selection)")
                continue
            if role == "original_dst":
                original_dst = True
            if role not in ("tls_inspector", "http_inspector"):
                continue  # original_dst: the destination is the socket's; original_src: upstream only
            disabled = _predicate(lf.filter_disabled) if lf.HasField("filter_disabled") else None
            if disabled == ("any",):
                continue
            if role == "tls_inspector":
                tls_disabled = _either_runs(tls_inspector, tls_disabled, disabled)
                tls_inspector = True
            else:
                http_disabled = _either_runs(http_inspector, http_disabled, disabled)
                http_inspector = True
    address = None
    if lis.HasField("address"):
        if lis.address.WhichOneof("address") != "socket_address":
            ctx.fail(problems, "address", "must be a socket_address (gRPC A36)")
        else:
            sa = lis.address.socket_address
            if sa.WhichOneof("port_specifier") != "port_value":
                ctx.fail(problems, "address.socket_address", "needs a port_value")
            elif strict and sa.protocol != 0:
                ctx.fail(problems, "address.socket_address.protocol", "must be TCP")
            address = _socket_address(lis.address)
    elif strict:
        raise ConfigError(resource, "address", "a server listener needs an address (gRPC A36)")
    for fname, reason in (("filter_chain_matcher", "the unified filter chain matcher is not supported"),
                          ("fcds_config", "filter chain discovery is not supported")):
        if lis.HasField(fname):
            ctx.fail(problems, fname, reason)
    chains = tuple(_chain(fc, ctx, f"filter_chains[{fc.name or i}]", problems)
                   for i, fc in enumerate(lis.filter_chains))
    default = _chain(lis.default_filter_chain, ctx, "default_filter_chain", problems) \
        if lis.HasField("default_filter_chain") else None
    overlap = _overlaps(chains)
    if overlap is not None:
        ctx.fail(problems, "filter_chains", overlap)
    if strict and default is None and not any(_can_match_a36(c) for c in chains):
        raise ConfigError(resource, "filter_chains",
                          "no filter chain can match and there is no default_filter_chain (gRPC A36: chains "
                          "matching on destination_port, server_names, application_protocols or a transport_protocol "
                          "other than raw_buffer never match)")
    extra = tuple(a for a in (_socket_address(x.address) for x in lis.additional_addresses) if a)
    return ServerListenerSpec(
        name=lis.name, shape=shape, address=address, filter_chains=chains, default_filter_chain=default,
        additional_addresses=extra, use_original_dst=original_dst,
        tls_inspector=tls_inspector, tls_inspector_disabled=tls_disabled,
        http_inspector=http_inspector, http_inspector_disabled=http_disabled, unsupported=tuple(problems))


def _either_runs(present: bool, current: Any, new: Any) -> Any:
    """The ``filter_disabled`` of two instances of one inspector: it is off only where both are
    (``None``: never disabled)."""
    if not present:
        return new
    if current is None or new is None:
        return None
    return ("and", (current, new))


# -- the XdsClient's decoders for server resources -------------------------------------------------------


class ServerResourceDecoder:
    """An xDS decoder (``decoder(message, providers=None)``) that decodes the resource names in
    :attr:`names` as server resources (LDS: :func:`server_listener_spec`; RDS:
    :func:`server_route_config`) and every other name with ``base``. A server name whose Listener
    is a client (API) listener goes to ``base`` too: the serving side reports it."""

    def __init__(self, base: Any, kind: str, shape: str = "grpc") -> None:
        if kind not in ("listener", "route"):
            raise ValueError(f"kind must be 'listener' or 'route', got {kind!r}")
        _check_shape(shape)
        self.base = base
        self.kind = kind
        self.shape = shape
        self.names: Set[str] = set()

    def __call__(self, msg: Any, providers: Optional[Collection[str]] = None) -> Any:
        if msg.name in self.names:
            if self.kind == "route":
                return server_route_config(msg, shape=self.shape, providers=providers)
            if not msg.HasField("api_listener"):
                return server_listener_spec(msg, providers, shape=self.shape)
        return self.base(msg, providers=providers)
