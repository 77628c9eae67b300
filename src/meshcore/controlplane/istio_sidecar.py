"""What istiod sends an Envoy *sidecar*: LDS/RDS/CDS/EDS built from a small mesh description.

:func:`build` turns a plain-dict description of a Kubernetes mesh (services, VirtualServices,
DestinationRules, the sidecar's own namespace/IP/locality) into the resources istiod's sidecar
generator (the ``GENERATOR=""`` default, not gRPC's proxyless ``grpcgen``) pushes to an Envoy
sidecar in that namespace, as ``envoy.config.*.v3`` protobuf messages::

    {"listeners": [Listener...], "routes": [RouteConfiguration...],
     "clusters": [Cluster...], "endpoints": [ClusterLoadAssignment...]}

:func:`generated` makes a random but valid description (for differential tests and scale
benchmarks); it is deterministic for a seed.

The shapes follow istio/istio (master, 2026-08, commit 86c9f01) and were checked against the
real config dumps in ``tests/fixtures/istio/`` and ``istioctl/pkg/authz/testdata/configdump.yaml``:

* LDS -- ``pilot/pkg/networking/core/listener.go`` (``buildSidecarOutboundListener``,
  ``buildListenerFromEntry``, ``buildSidecarOutboundHTTPListenerOpts``), ``listener_builder.go``
  (``buildVirtualOutboundListener``, ``buildHTTPConnectionManager``, ``appendMxFilter``),
  ``listener_inbound.go`` (virtualInbound chains, ``populateListenerFilters``),
  ``filterchain_options.go`` (inbound filter chain matches per mTLS mode), ``networkfilter.go``,
  ``tls.go`` (``buildSidecarOutboundTCPFilterChainOpts``), ``tracing.go``,
  ``pilot/pkg/xds/filters/filters.go`` (the filter messages),
  ``pilot/pkg/security/authn/utils/utils.go`` (``BuildInboundTLS``).
* RDS -- ``pilot/pkg/networking/core/httproute.go`` (``buildSidecarOutboundHTTPRouteConfig``,
  ``generateVirtualHostDomains``, ``GenerateAltVirtualHosts``, ``dedupeDomains``,
  ``buildCatchAllVirtualHost``), ``pilot/pkg/networking/core/route/route.go``
  (``BuildSidecarVirtualHostWrapper``, ``TranslateRoute``, ``TranslateRouteMatch``,
  ``TranslateFault``, ``GetRouteOperation``, ``ConsistentHashToHashPolicy``),
  ``route/retry/retry.go`` (``ConvertPolicy``).
* CDS -- ``pilot/pkg/networking/core/cluster.go`` (``buildOutboundClusters``, inbound clusters),
  ``cluster_builder.go`` (``buildCluster``, ``buildSubsetCluster``, ``applyDestinationRule``,
  Passthrough/BlackHole/InboundPassthrough clusters), ``cluster_traffic_policy.go``
  (connection pool -> circuit breakers, outlier detection, load balancer), ``cluster_tls.go``
  (auto-mTLS ``transport_socket_matches``), ``loadbalancer/loadbalancer.go`` (locality LB).
* EDS -- ``pilot/pkg/xds/endpoints/endpoint_builder.go`` (``BuildClusterLoadAssignment``,
  ``buildEnvoyLbEndpoint``), ``mtls_checker.go``, ``pilot/pkg/networking/util/util.go``
  (``AppendLbEndpointMetadata``), ``loadbalancer.go`` (``applyLocalityFailover``,
  ``applyLocalityWeights``).

Mesh-wide settings are istiod's defaults (``pkg/config/mesh/mesh.go``): connect timeout 10s,
ALLOW_ANY outbound, PASSTHROUGH inbound, auto-mTLS on, locality LB enabled, no access log,
tracing on with 1% sampling, metrics via the ``istio.stats`` filters, metadata exchange on,
ambient/HBONE off. See :func:`build` for the description format and the options.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, filter_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    grpc_service_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.request_id.uuid.v3 import uuid_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.metadata.v3 import metadata_pb2 as type_metadata_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from udpa.type.v1 import typed_struct_pb2

__all__ = ["build", "generated", "SUPPORTED_PROTOCOLS"]

#: Port protocols understood in a description (Istio ``protocol.Parse`` names, lower case).
SUPPORTED_PROTOCOLS = ("http", "http2", "grpc", "grpc-web", "tcp")
_HTTP_PROTOCOLS = frozenset(("http", "http2", "grpc", "grpc-web"))
_H2_PROTOCOLS = frozenset(("http2", "grpc", "grpc-web"))

_WILDCARD = "0.0.0.0"
_CLUSTER_ID = "Kubernetes"
_ROOT_NAMESPACE = "istio-system"
_MAX_U32 = 4294967295
_MAX_SECONDS = 9223372035  # cluster_builder.go maxSecondsValue
_INBOUND_PASSTHROUGH_BIND = "127.0.0.6"

# filter / extension names (pkg/wellknown, pilot/pkg/xds/filters)
_HCM = "envoy.filters.network.http_connection_manager"
_TCP_PROXY = "envoy.filters.network.tcp_proxy"
_MX = "istio.metadata_exchange"
_STATS = "istio.stats"
_ALPN = "istio.alpn"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_RAW_SOCKET = "envoy.transport_sockets.raw_buffer"
_HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TS_MATCH_KEY = "envoy.transport_socket_match"

# type URLs of Istio's own Envoy extensions (istio/proxy; in no xds-protos module)
_MX_TYPE = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
_PEER_METADATA_TYPE = "type.googleapis.com/io.istio.http.peer_metadata.Config"

_PLAINTEXT_HTTP_ALPNS = ["http/1.1", "h2c"]
_MTLS_HTTP_ALPNS = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
_ALL_ISTIO_MTLS_ALPNS = ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
_MTLS_TCP_MXC_ALPNS = ["istio-peer-exchange", "istio"]
_SUPPORTED_CIPHERS = [
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256",
]
_DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
_GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
_HTTP_STATUS_TEXT = frozenset(
    [100, 101, 102, 103] + list(range(200, 209)) + [226] + list(range(300, 309)) + list(range(400, 419))
    + [421, 422, 423, 424, 425, 426, 428, 429, 431, 451] + list(range(500, 509)) + [510, 511]
)

# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _seconds(value: Any) -> float:
    """A Go/proto duration (``"1.5s"``, ``"100ms"``, ``"1h30m"``) or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if not text:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"bad duration {value!r}")
    return total


def _dur(value: Any) -> duration_pb2.Duration:
    secs = _seconds(value)
    whole = int(math.floor(secs))
    return duration_pb2.Duration(seconds=whole, nanos=int(round((secs - whole) * 1e9)))


_ZERO = duration_pb2.Duration()


def _pack(message: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(message)
    return a


def _typed_struct(type_url: str, fields: Mapping[str, Any]) -> any_pb2.Any:
    """``protoconv.TypedStructWithFields``: a ``udpa.type.v1.TypedStruct`` in an ``Any``."""
    value = struct_pb2.Struct()
    value.update(fields)
    return _pack(typed_struct_pb2.TypedStruct(type_url=type_url, value=value))


@functools.lru_cache(maxsize=None)
def _snake(key: str) -> str:
    if key == "consecutive5xxErrors":  # the proto field is consecutive_5xx_errors
        return "consecutive_5xx_errors"
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _camel(d: Optional[Mapping[str, Any]], key: str, default: Any = None) -> Any:
    """``d[key]`` for an Istio camelCase key, also accepting its snake_case spelling."""
    if not d:
        return default
    if key in d:
        return d[key]
    return d.get(_snake(key), default)


def _u32(v: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=v)


def _ipv6_compliant(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _domain_name(host: str, port: int) -> str:  # net.JoinHostPort
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _subset_key(subset: str, fqdn: str, port: int, direction: str = "outbound") -> str:
    return f"{direction}|{port}|{subset}|{fqdn}"


def _sni_key(subset: str, fqdn: str, port: int) -> str:  # model.BuildDNSSrvSubsetKey
    return f"outbound_.{port}_.{subset}_.{fqdn}"


def _address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def _locality(label: str) -> base_pb2.Locality:
    parts = (label.split("/") + ["", "", ""])[:3] if label else ["", "", ""]
    return base_pb2.Locality(region=parts[0], zone=parts[1], sub_zone=parts[2])


def _config_path(kind: str, namespace: str, name: str) -> str:
    """``util.BuildConfigInfoMetadata``'s ``istio.config`` value (networking.istio.io/v1)."""
    return f"/apis/networking.istio.io/v1/namespaces/{namespace}/{kind}/{name}"


def _string_matcher(m: Mapping[str, Any]) -> Optional[string_pb2.StringMatcher]:
    if "exact" in m:
        return string_pb2.StringMatcher(exact=m["exact"])
    if "prefix" in m:
        return string_pb2.StringMatcher(prefix=m["prefix"])
    if "regex" in m:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=m["regex"]))
    return None


# -------------------------------------------------------------------------------------------------
# the description
# -------------------------------------------------------------------------------------------------


@dataclass
class _Port:
    number: int
    name: str
    protocol: str
    target: int

    @property
    def is_http(self) -> bool:
        return self.protocol in _HTTP_PROTOCOLS

    @property
    def is_h2(self) -> bool:
        return self.protocol in _H2_PROTOCOLS


@dataclass
class _Endpoint:
    ip: str
    locality: str
    labels: Dict[str, str]
    weight: int
    service_account: str
    workload: str
    healthy: bool

    @property
    def tls_mode(self) -> str:
        return self.labels.get("security.istio.io/tlsMode", "")


@dataclass
class _Service:
    name: str
    namespace: str
    fqdn: str
    vip: str
    ports: List[_Port]
    endpoints: List[_Endpoint]
    service_accounts: List[str] = field(default_factory=list)

    def port(self, number: int) -> Optional[_Port]:
        for p in self.ports:
            if p.number == number:
                return p
        return None


@dataclass
class _Config:
    kind: str
    name: str
    namespace: str
    spec: Dict[str, Any]


def _split_config(raw: Mapping[str, Any], kind: str) -> _Config:
    """``{"name", "namespace", **spec}`` or Kubernetes style ``{"metadata": {...}, "spec": {...}}``."""
    if "spec" in raw or "metadata" in raw:
        meta = raw.get("metadata") or {}
        return _Config(kind, meta.get("name", ""), meta.get("namespace", "default"), dict(raw.get("spec") or {}))
    spec = {k: v for k, v in raw.items() if k not in ("name", "namespace")}
    return _Config(kind, raw.get("name", ""), raw.get("namespace", "default"), spec)


class _Mesh:
    def __init__(self, desc: Mapping[str, Any], proxy_namespace: str) -> None:
        mesh = dict(desc.get("mesh") or {})
        self.domain = mesh.get("domain_suffix", mesh.get("domainSuffix", "cluster.local"))
        self.trust_domain = mesh.get("trust_domain", mesh.get("trustDomain", self.domain))
        self.mesh_id = mesh.get("mesh_id", mesh.get("meshId", self.trust_domain))
        self.mtls_mode = str(mesh.get("mtls_mode", mesh.get("mtlsMode", "PERMISSIVE"))).upper()
        if self.mtls_mode not in ("PERMISSIVE", "STRICT", "DISABLE"):
            raise ValueError(f"mesh.mtls_mode must be PERMISSIVE, STRICT or DISABLE, got {self.mtls_mode!r}")
        self.outbound_policy = str(mesh.get("outbound_traffic_policy",
                                            mesh.get("outboundTrafficPolicy", "ALLOW_ANY"))).upper()
        if self.outbound_policy not in ("ALLOW_ANY", "REGISTRY_ONLY"):
            raise ValueError(f"mesh.outbound_traffic_policy must be ALLOW_ANY or REGISTRY_ONLY, got "
                             f"{self.outbound_policy!r}")
        self.outbound_port = int(mesh.get("proxy_listen_port", mesh.get("proxyListenPort", 15001)))
        self.inbound_port = int(mesh.get("proxy_inbound_listen_port", mesh.get("proxyInboundListenPort", 15006)))
        self.connect_timeout = _dur(mesh.get("connect_timeout", mesh.get("connectTimeout", "10s")))
        self.trace_sampling = float(mesh.get("trace_sampling", mesh.get("traceSampling", 1.0)))

        proxy = dict(desc.get("proxy") or {})
        self.namespace = proxy_namespace
        self.proxy_ip = proxy.get("ip", "")
        self.proxy_locality = _locality(proxy.get("locality", ""))
        self.proxy_labels: Dict[str, str] = dict(proxy.get("labels") or {})
        self.dns_domain = f"{proxy_namespace}.svc.{self.domain}"

        self.services: List[_Service] = [self._service(s) for s in desc.get("services") or []]
        seen = set()
        for s in self.services:
            if s.fqdn in seen:
                raise ValueError(f"duplicate service {s.fqdn}")
            seen.add(s.fqdn)
        self.services.sort(key=lambda s: s.fqdn)
        self.by_fqdn = {s.fqdn: s for s in self.services}

        self.virtual_services = [self._virtual_service(v) for v in desc.get("virtual_services") or []]
        self.destination_rules = [self._destination_rule(d) for d in desc.get("destination_rules") or []]
        self._dr_by_host: Dict[str, List[_Config]] = {}
        for dr in self.destination_rules:
            self._dr_by_host.setdefault(dr.spec["host"], []).append(dr)

    # -- parsing --------------------------------------------------------------------------------

    def resolve(self, host: str, namespace: str) -> str:
        """``host.ResolveShortnameToFQDN``: a name without a dot is ``<name>.<ns>.svc.<domain>``."""
        host = host.strip().lower()
        if "." not in host and host != "*":
            return f"{host}.{namespace}.svc.{self.domain}"
        return host

    def _service(self, raw: Mapping[str, Any]) -> _Service:
        name, ns = raw["name"], raw.get("namespace", "default")
        ports = []
        for p in raw.get("ports") or []:
            proto = str(p.get("protocol", "http")).lower()
            if proto not in SUPPORTED_PROTOCOLS:
                raise ValueError(f"service {name}.{ns}: protocol {proto!r} not supported "
                                 f"(use one of {', '.join(SUPPORTED_PROTOCOLS)})")
            number = int(p["port"])
            ports.append(_Port(number, p.get("name") or f"{proto}-{number}", proto,
                               int(p.get("target_port", p.get("targetPort", number)))))
        if len({p.number for p in ports}) != len(ports):
            raise ValueError(f"service {name}.{ns}: duplicate port numbers")
        eps = []
        for e in raw.get("endpoints") or []:
            labels = {str(k): str(v) for k, v in (e.get("labels") or {}).items()}
            eps.append(_Endpoint(
                ip=e["ip"], locality=e.get("locality", ""), labels=labels, weight=int(e.get("weight", 1)),
                service_account=e.get("service_account", e.get("serviceAccount", "default")),
                workload=e.get("workload", labels.get("app", name)), healthy=bool(e.get("healthy", True)),
            ))
        vip = raw.get("vip", raw.get("address", ""))
        if not vip:
            raise ValueError(f"service {name}.{ns}: a ClusterIP (vip) is required (headless services are not modelled)")
        sas = sorted({f"spiffe://{self.trust_domain}/ns/{ns}/sa/{e.service_account}" for e in eps})
        return _Service(name, ns, f"{name}.{ns}.svc.{self.domain}", vip, ports, eps, sas)

    def _virtual_service(self, raw: Mapping[str, Any]) -> _Config:
        cfg = _split_config(raw, "virtual-service")
        cfg.spec["hosts"] = [self.resolve(h, cfg.namespace) for h in cfg.spec.get("hosts") or []]
        for h in cfg.spec.get("http") or []:
            for dst in h.get("route") or []:
                d = dst.get("destination") or {}
                d["host"] = self.resolve(d.get("host", ""), cfg.namespace)
        return cfg

    def _destination_rule(self, raw: Mapping[str, Any]) -> _Config:
        cfg = _split_config(raw, "destination-rule")
        cfg.spec["host"] = self.resolve(cfg.spec.get("host", ""), cfg.namespace)
        return cfg

    # -- lookups ----------------------------------------------------------------------------------

    def destination_rule(self, fqdn: str) -> Optional[_Config]:
        """The DR a sidecar in the proxy's namespace uses for ``fqdn``: proxy namespace first, then
        the service's namespace, then the root namespace (``SidecarScope.DestinationRule``)."""
        drs = self._dr_by_host.get(fqdn)
        if not drs:
            return None
        svc = self.by_fqdn.get(fqdn)
        for ns in (self.namespace, svc.namespace if svc else None, _ROOT_NAMESPACE):
            for dr in drs:
                if dr.namespace == ns:
                    return dr
        return None

    def service_mtls_mode(self) -> str:
        """``BestEffortInferServiceMTLSMode`` with only the mesh-wide PeerAuthentication."""
        return self.mtls_mode


# -------------------------------------------------------------------------------------------------
# shared messages (pilot/pkg/xds/filters/filters.go)
# -------------------------------------------------------------------------------------------------


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    """``pkg/model.ConstructSdsSecretConfig``: SDS from the agent's ``sds-grpc`` cluster."""
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC, set_node_on_first_message_only=True,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="sds-grpc"))]),
        initial_fetch_timeout=_ZERO, resource_api_version=config_source_pb2.V3))


_ADS = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                      initial_fetch_timeout=_ZERO, resource_api_version=config_source_pb2.V3)
_RAW_BUFFER_SOCKET = base_pb2.TransportSocket(name=_RAW_SOCKET, typed_config=_pack(raw_buffer_pb2.RawBuffer()))
_PREVIOUS_HOSTS = route_components_pb2.RetryPolicy.RetryHostPredicate(
    name="envoy.retry_host_predicates.previous_hosts", typed_config=_pack(previous_hosts_pb2.PreviousHostsPredicate()))
_PREVIOUS_PRIORITIES = route_components_pb2.RetryPolicy.RetryPriority(
    name="envoy.retry_priorities.previous_priorities",
    typed_config=_pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2)))
_HTTP_FILTER = hcm_pb2.HttpFilter


@functools.lru_cache(maxsize=None)
def _istio_message_classes() -> Tuple[Any, Any]:
    """``stats.PluginConfig`` (istio/proxy ``istio_stats/config.proto``) and
    ``istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`` (istio/api), the two message
    types of Istio's own Envoy filters that istiod packs directly into an ``Any``, as dynamic
    classes registered in the default descriptor pool (so ``json_format`` can render them). Only
    the fields istiod sets are declared."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    F = descriptor_pb2.FieldDescriptorProto
    files = []
    stats = descriptor_pb2.FileDescriptorProto(name="meshcore/istio/stats_config.proto", package="stats",
                                               syntax="proto3")
    plugin = stats.message_type.add(name="PluginConfig")
    plugin.field.add(name="disable_host_header_fallback", json_name="disableHostHeaderFallback", number=6,
                     type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    files.append(("stats.PluginConfig", stats))
    alpn = descriptor_pb2.FileDescriptorProto(name="meshcore/istio/alpn_config.proto",
                                              package="istio.envoy.config.filter.http.alpn.v2alpha1", syntax="proto3")
    cfg = alpn.message_type.add(name="FilterConfig")
    proto_enum = cfg.enum_type.add(name="Protocol")
    for i, n in enumerate(("HTTP10", "HTTP11", "HTTP2")):
        proto_enum.value.add(name=n, number=i)
    override = cfg.nested_type.add(name="AlpnOverride")
    override.field.add(name="upstream_protocol", json_name="upstreamProtocol", number=1, type=F.TYPE_ENUM,
                       label=F.LABEL_OPTIONAL,
                       type_name=".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.Protocol")
    override.field.add(name="alpn_override", json_name="alpnOverride", number=2, type=F.TYPE_STRING,
                       label=F.LABEL_REPEATED)
    cfg.field.add(name="alpn_override", json_name="alpnOverride", number=1, type=F.TYPE_MESSAGE,
                  label=F.LABEL_REPEATED,
                  type_name=".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride")
    files.append(("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", alpn))
    classes = []
    for full_name, fdp in files:
        try:
            desc = pool.FindMessageTypeByName(full_name)
        except KeyError:
            pool.Add(fdp)
            desc = pool.FindMessageTypeByName(full_name)
        classes.append(message_factory.GetMessageClass(desc))
    return classes[0], classes[1]


class _Filters:
    """The filter messages one build uses (``istio_proxy_extensions=False`` leaves out the
    extensions only Istio's Envoy build has: metadata exchange, ALPN override, stats)."""

    def __init__(self, istio_ext: bool) -> None:
        self.istio_ext = istio_ext
        mx_cfg = {"protocol": "istio-peer-exchange", "enable_discovery": True}
        self.cluster_mx = filter_pb2.Filter(name=_MX, typed_config=_typed_struct(_MX_TYPE, mx_cfg))
        self.listener_mx = listener_components_pb2.Filter(name=_MX, typed_config=_typed_struct(_MX_TYPE, mx_cfg))
        plugin_config, alpn_config = _istio_message_classes()
        # generateStatsConfig: disableHostHeaderFallback only on inbound listeners
        self.stats_out_any = _pack(plugin_config())
        self.stats_in_any = _pack(plugin_config(disable_host_header_fallback=True))
        self.tcp_stats_out = listener_components_pb2.Filter(name=_STATS, typed_config=self.stats_out_any)
        self.tcp_stats_in = listener_components_pb2.Filter(name=_STATS, typed_config=self.stats_in_any)
        self.http_mx_out = _HTTP_FILTER(name=_MX, typed_config=_typed_struct(_PEER_METADATA_TYPE, {
            "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            "upstream_propagation": [{"istio_headers": {}}]}))
        self.http_mx_in = _HTTP_FILTER(name=_MX, typed_config=_typed_struct(_PEER_METADATA_TYPE, {
            "downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            "downstream_propagation": [{"istio_headers": {}}]}))
        self.grpc_stats = _HTTP_FILTER(name="envoy.filters.http.grpc_stats", typed_config=_pack(
            grpc_stats_pb2.FilterConfig(emit_filter_state=True, stats_for_all_methods=wrappers_pb2.BoolValue(value=False))))
        alpn = alpn_config()
        for proto, alpns in ((0, ["istio-http/1.0", "istio", "http/1.0"]), (1, ["istio-http/1.1", "istio", "http/1.1"]),
                             (2, ["istio-h2", "istio", "h2"])):
            alpn.alpn_override.add(upstream_protocol=proto, alpn_override=alpns)
        self.alpn = _HTTP_FILTER(name=_ALPN, typed_config=_pack(alpn))
        self.fault = _HTTP_FILTER(name="envoy.filters.http.fault", typed_config=_pack(fault_pb2.HTTPFault()))
        self.cors = _HTTP_FILTER(name="envoy.filters.http.cors", typed_config=_pack(cors_pb2.Cors()))
        self.http_stats_out = _HTTP_FILTER(name=_STATS, typed_config=self.stats_out_any)
        self.http_stats_in = _HTTP_FILTER(name=_STATS, typed_config=self.stats_in_any)
        self.router = _HTTP_FILTER(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))
        self.tls_inspector_any = _pack(tls_inspector_pb2.TlsInspector(initial_read_buffer_size=_u32(512)))
        self.http_inspector_any = _pack(http_inspector_pb2.HttpInspector())
        self.original_dst = listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=_pack(original_dst_pb2.OriginalDst()))

    def outbound_http_filters(self) -> List[hcm_pb2.HttpFilter]:
        if not self.istio_ext:
            return [self.grpc_stats, self.fault, self.cors, self.router]
        return [self.http_mx_out, self.grpc_stats, self.alpn, self.fault, self.cors, self.http_stats_out, self.router]

    def inbound_http_filters(self) -> List[hcm_pb2.HttpFilter]:
        if not self.istio_ext:
            return [self.grpc_stats, self.fault, self.cors, self.router]
        return [self.http_mx_in, self.grpc_stats, self.fault, self.cors, self.http_stats_in, self.router]

    def tcp_stats(self, inbound: bool) -> List[listener_components_pb2.Filter]:
        if not self.istio_ext:
            return []
        return [self.tcp_stats_in if inbound else self.tcp_stats_out]

    def listener_mx_filters(self) -> List[listener_components_pb2.Filter]:
        return [self.listener_mx] if self.istio_ext else []


def _tcp_proxy(cluster: str, stat_prefix: Optional[str] = None, idle: Any = None,
               max_duration: Any = None, hash_source_ip: bool = False) -> listener_components_pb2.Filter:
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix or cluster, cluster=cluster)
    if idle is not None:
        tp.idle_timeout.CopyFrom(_dur(idle))
    if max_duration is not None:
        tp.max_downstream_connection_duration.CopyFrom(_dur(max_duration))
    if hash_source_ip:
        tp.hash_policy.add().source_ip.SetInParent()
    return listener_components_pb2.Filter(name=_TCP_PROXY, typed_config=_pack(tp))


# -------------------------------------------------------------------------------------------------
# the builder
# -------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, mesh: _Mesh, *, domains_with_port: bool, absolute_fqdn: bool, retry_503: bool,
                 istio_ext: bool) -> None:
        self.m = mesh
        self.domains_with_port = domains_with_port
        self.absolute_fqdn = absolute_fqdn
        self.retry_503 = retry_503
        self.f = _Filters(istio_ext)
        self.tracing = self._tracing()
        self.request_id = hcm_pb2.RequestIDExtension(typed_config=_pack(uuid_pb2.UuidRequestIdConfig(
            use_request_id_for_trace_sampling=wrappers_pb2.BoolValue(value=True))))
        self.default_sds = _sds("default")
        self.root_sds = _sds("ROOTCA")
        self.eds_clusters: List[Tuple[cluster_pb2.Cluster, _Service, _Port, str, Dict[str, Any]]] = []

    # -- tracing (tracing.go configureTracingFromTelemetry, legacy mesh-config path) ----------------

    def _tracing(self) -> hcm_pb2.HttpConnectionManager.Tracing:
        labels = self.m.proxy_labels
        literal = {
            "istio.canonical_revision": labels.get("service.istio.io/canonical-revision") or "latest",
            "istio.canonical_service": labels.get("service.istio.io/canonical-name") or "unknown",
            "istio.cluster_id": _CLUSTER_ID,
            "istio.mesh_id": self.m.mesh_id,
            "istio.namespace": self.m.namespace,
        }
        tags = [custom_tag_pb2.CustomTag(tag=k, literal=custom_tag_pb2.CustomTag.Literal(value=v))
                for k, v in literal.items()]
        for tag, key in (("istio.authorization.dry_run.allow_policy.name", "istio_dry_run_allow_shadow_effective_policy_id"),
                         ("istio.authorization.dry_run.allow_policy.result", "istio_dry_run_allow_shadow_engine_result"),
                         ("istio.authorization.dry_run.deny_policy.name", "istio_dry_run_deny_shadow_effective_policy_id"),
                         ("istio.authorization.dry_run.deny_policy.result", "istio_dry_run_deny_shadow_engine_result")):
            md = custom_tag_pb2.CustomTag.Metadata(metadata_key=type_metadata_pb2.MetadataKey(
                key="envoy.filters.http.rbac", path=[type_metadata_pb2.MetadataKey.PathSegment(key=key)]))
            md.kind.request.SetInParent()
            tags.append(custom_tag_pb2.CustomTag(tag=tag, metadata=md))
        tags.sort(key=lambda t: t.tag)
        return hcm_pb2.HttpConnectionManager.Tracing(
            client_sampling=percent_pb2.Percent(value=100.0), random_sampling=percent_pb2.Percent(value=self.m.trace_sampling),
            overall_sampling=percent_pb2.Percent(value=100.0), custom_tags=tags)

    # -- HCM (listener_builder.go buildHTTPConnectionManager) ---------------------------------------

    def _hcm(self, stat_prefix: str, *, inbound: bool, rds: str = "", route_config: Any = None,
             http2: bool = False) -> hcm_pb2.HttpConnectionManager:
        h = hcm_pb2.HttpConnectionManager(
            stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO,
            path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED,
            normalize_path=wrappers_pb2.BoolValue(value=True), use_remote_address=wrappers_pb2.BoolValue(value=False),
            upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
            stream_idle_timeout=_ZERO, tracing=self.tracing, request_id_extension=self.request_id,
            proxy_100_continue=True,
            http_filters=self.f.inbound_http_filters() if inbound else self.f.outbound_http_filters(),
        )
        if inbound:
            h.server_name = "istio-envoy"
            h.forward_client_cert_details = hcm_pb2.HttpConnectionManager.APPEND_FORWARD
            h.set_current_client_cert_details.subject.value = True
            h.set_current_client_cert_details.dns = True
            h.set_current_client_cert_details.uri = True
            if http2:
                h.http2_protocol_options.SetInParent()
        if rds:
            h.rds.config_source.CopyFrom(_ADS)
            h.rds.route_config_name = rds
        else:
            h.route_config.CopyFrom(route_config)
        return h

    def _hcm_filter(self, h: hcm_pb2.HttpConnectionManager) -> listener_components_pb2.Filter:
        return listener_components_pb2.Filter(name=_HCM, typed_config=_pack(h))

    # -- RDS ----------------------------------------------------------------------------------------

    def _retry_policy(self, retries: Optional[Mapping[str, Any]], hash_policy: bool) -> Optional[route_components_pb2.RetryPolicy]:
        """``retry.ConvertPolicy`` (route/retry/retry.go)."""
        out = route_components_pb2.RetryPolicy(retry_on=_DEFAULT_RETRY_ON, num_retries=_u32(2),
                                               host_selection_retry_max_attempts=5)
        if self.retry_503:  # Istio < 1.24 (#52111 "exclude unsafe 503 from default RetryPolicy")
            out.retriable_status_codes.append(503)
        if not hash_policy:
            out.retry_host_predicate.append(_PREVIOUS_HOSTS)
        if retries is None:
            return out
        attempts = int(_camel(retries, "attempts", 0) or 0)
        if attempts <= 0:
            return None
        out.num_retries.value = attempts
        retry_on = _camel(retries, "retryOn")
        if retry_on:
            names, codes = [], []
            for part in str(retry_on).split(","):
                part = part.strip()
                if not part:
                    continue
                if part.isdigit() and int(part) in _HTTP_STATUS_TEXT:
                    codes.append(int(part))
                else:
                    names.append(part)
            out.retry_on = ",".join(names)
            del out.retriable_status_codes[:]
            out.retriable_status_codes.extend(codes)
            if codes and "retriable-status-codes" not in out.retry_on:
                out.retry_on += ",retriable-status-codes"
        per_try = _camel(retries, "perTryTimeout")
        if per_try is not None:
            out.per_try_timeout.CopyFrom(_dur(per_try))
        ignore_prev = _camel(retries, "retryIgnorePreviousHosts")
        if ignore_prev is not None:
            del out.retry_host_predicate[:]
            if ignore_prev:
                out.retry_host_predicate.append(_PREVIOUS_HOSTS)
        if _camel(retries, "retryRemoteLocalities"):
            out.retry_priority.CopyFrom(_PREVIOUS_PRIORITIES)
        backoff = _camel(retries, "backoff")
        if backoff is not None:
            out.retry_back_off.base_interval.CopyFrom(_dur(backoff))
        return out

    @staticmethod
    def _fractional(pct: Any, legacy_percent: Any = None) -> Optional[percent_pb2.FractionalPercent]:
        """``translatePercentToFractionalPercent`` (per million) / ``translateIntegerToFractionalPercent``."""
        fp = percent_pb2.FractionalPercent
        if pct is not None:
            value = pct.get("value", 0) if isinstance(pct, Mapping) else pct
            return fp(numerator=int(float(value) * 10000), denominator=fp.MILLION)
        if legacy_percent is not None:
            return fp(numerator=int(legacy_percent), denominator=fp.HUNDRED)
        return None

    def _fault(self, fault: Mapping[str, Any]) -> Optional[fault_pb2.HTTPFault]:
        """``TranslateFault``."""
        out = fault_pb2.HTTPFault()
        delay = fault.get("delay")
        if delay:
            fixed = _camel(delay, "fixedDelay")
            if fixed is not None:
                out.delay.fixed_delay.CopyFrom(_dur(fixed))
                pct = self._fractional(delay.get("percentage"), delay.get("percent", 0))
                out.delay.percentage.CopyFrom(pct)
        abort = fault.get("abort")
        if abort:
            status, grpc = _camel(abort, "httpStatus"), _camel(abort, "grpcStatus")
            if status is not None or grpc is not None:
                if status is not None:
                    out.abort.http_status = int(status)
                else:
                    out.abort.grpc_status = _GRPC_CODES[str(grpc).upper()] if not str(grpc).isdigit() else int(grpc)
                pct = self._fractional(abort.get("percentage"))
                if pct is not None:
                    out.abort.percentage.CopyFrom(pct)
        if not out.HasField("delay") and not out.HasField("abort"):
            return None
        return out

    def _route_match(self, match: Optional[Mapping[str, Any]]) -> route_components_pb2.RouteMatch:
        """``TranslateRouteMatch``."""
        rm = route_components_pb2.RouteMatch(prefix="/")
        if match is None:
            return rm
        headers = []
        for name, sm in (match.get("headers") or {}).items():
            headers.append(self._header_matcher(name, sm))
        for name, sm in (_camel(match, "withoutHeaders") or {}).items():
            hm = self._header_matcher(name, sm)
            hm.invert_match = True
            if not hm.present_match:
                hm.treat_missing_header_as_empty = True
            headers.append(hm)
        headers.sort(key=lambda h: h.name)
        uri = match.get("uri")
        if uri:
            if "exact" in uri:
                rm.path = uri["exact"]
            elif "prefix" in uri:
                rm.prefix = uri["prefix"]
            elif "regex" in uri:
                rm.safe_regex.regex = uri["regex"]
        rm.case_sensitive.value = not bool(_camel(match, "ignoreUriCase", False))
        for key, header in (("method", ":method"), ("authority", ":authority"), ("scheme", ":scheme")):
            if match.get(key) is not None:
                headers.append(self._header_matcher(header, match[key]))
        rm.headers.extend(headers)
        return rm

    @staticmethod
    def _header_matcher(name: str, sm: Optional[Mapping[str, Any]]) -> route_components_pb2.HeaderMatcher:
        hm = route_components_pb2.HeaderMatcher(name=name)
        if not sm or sm.get("regex") == "*":
            hm.present_match = True
            return hm
        em = _string_matcher(sm)
        if em is not None:
            hm.string_match.CopyFrom(em)
        return hm

    @staticmethod
    def _is_catch_all(r: route_components_pb2.Route) -> bool:
        m = r.match
        which = m.WhichOneof("path_specifier")
        catchall = (which == "prefix" and m.prefix == "/") or (which == "safe_regex" and m.safe_regex.regex == ".*")
        return catchall and not m.headers and not m.query_parameters and not m.dynamic_metadata

    def _hash_policy(self, ch: Optional[Mapping[str, Any]]) -> Optional[route_components_pb2.RouteAction.HashPolicy]:
        """``ConsistentHashToHashPolicy``."""
        if not ch:
            return None
        hp = route_components_pb2.RouteAction.HashPolicy()
        if _camel(ch, "httpHeaderName"):
            hp.header.header_name = _camel(ch, "httpHeaderName")
        elif _camel(ch, "httpCookie"):
            cookie = _camel(ch, "httpCookie")
            hp.cookie.name = cookie["name"]
            if cookie.get("path"):
                hp.cookie.path = cookie["path"]
            if cookie.get("ttl") is not None:
                hp.cookie.ttl.CopyFrom(_dur(cookie["ttl"]))
        elif _camel(ch, "useSourceIp"):
            hp.connection_properties.source_ip = True
        elif _camel(ch, "httpQueryParameterName"):
            hp.query_parameter.name = _camel(ch, "httpQueryParameterName")
        else:
            return None
        return hp

    def _traffic_policy_for_port(self, tp: Optional[Mapping[str, Any]], port: int) -> Optional[Dict[str, Any]]:
        """``util.GetPortLevelTrafficPolicy``: a matching portLevelSettings entry replaces the policy."""
        if tp is None:
            return None
        for pls in _camel(tp, "portLevelSettings") or []:
            if int((pls.get("port") or {}).get("number", -1)) == port:
                return {k: pls[k] for k in ("connectionPool", "loadBalancer", "outlierDetection", "tls") if k in pls}
        return dict(tp)

    def _merged_subset_policy(self, tp: Optional[Mapping[str, Any]], subset_tp: Optional[Mapping[str, Any]],
                              port: int) -> Optional[Dict[str, Any]]:
        """``util.MergeSubsetTrafficPolicy``."""
        original = self._traffic_policy_for_port(tp, port)
        if subset_tp is None:
            return original
        has_pls = any(int((p.get("port") or {}).get("number", -1)) == port
                      for p in _camel(subset_tp, "portLevelSettings") or [])
        sub = self._traffic_policy_for_port(subset_tp, port) or {}
        if original is None:
            return sub
        merged = dict(original)
        for key in ("connectionPool", "outlierDetection", "loadBalancer", "tls"):
            if key in sub or has_pls:
                merged[key] = sub.get(key)
        return merged

    def _consistent_hash_for(self, host: str, subset: str, port: Optional[int]) -> Optional[Mapping[str, Any]]:
        """``HashForHTTPDestination`` / ``hashForService``."""
        dr = self.m.destination_rule(host)
        if dr is None:
            return None
        tp = _camel(dr.spec, "trafficPolicy") or {}
        ch = _camel(_camel(tp, "loadBalancer"), "consistentHash")
        if port is not None:
            for pls in _camel(tp, "portLevelSettings") or []:
                if int((pls.get("port") or {}).get("number", -1)) == port:
                    pch = _camel(_camel(pls, "loadBalancer"), "consistentHash")
                    if pch:
                        ch = pch
        if subset:
            for s in dr.spec.get("subsets") or []:
                if s.get("name") == subset:
                    sch = _camel(_camel(_camel(s, "trafficPolicy"), "loadBalancer"), "consistentHash")
                    if sch:
                        ch = sch
                    break
        return ch

    def _destination_cluster(self, dst: Mapping[str, Any], listen_port: int) -> str:
        """``GetDestinationCluster``."""
        host = dst.get("host", "")
        if not host:
            return "UnknownService"
        svc = self.m.by_fqdn.get(host)
        port = listen_port
        if dst.get("port") and dst["port"].get("number"):
            port = int(dst["port"]["number"])
        elif svc is not None and len(svc.ports) == 1:
            port = svc.ports[0].number
        return _subset_key(dst.get("subset", ""), host, port)

    def _translate_route(self, vs: _Config, http: Mapping[str, Any], match: Optional[Mapping[str, Any]],
                         listen_port: int) -> Optional[route_components_pb2.Route]:
        """``TranslateRoute`` (destinations, retries, timeout, fault; no redirect/rewrite/mirror/headers)."""
        if match is not None:
            if match.get("port") and int(match["port"]) != listen_port:
                return None
            if match.get("gateways"):
                if "mesh" not in match["gateways"]:
                    return None
            else:
                src = _camel(match, "sourceLabels") or {}
                if any(self.m.proxy_labels.get(k) != v for k, v in src.items()):
                    return None
                src_ns = _camel(match, "sourceNamespace")
                if src_ns and src_ns != self.m.namespace:
                    return None
        name = http.get("name", "")
        if match is not None and match.get("name"):
            name = f"{name}.{match['name']}"
        r = route_components_pb2.Route(name=name, match=self._route_match(match))
        r.metadata.filter_metadata["istio"].update({"config": _config_path(vs.kind, vs.namespace, vs.name)})
        for unsupported in ("redirect", "directResponse", "rewrite", "mirror", "mirrors", "headers", "corsPolicy",
                            "delegate"):
            if http.get(unsupported) is not None:
                raise ValueError(f"VirtualService {vs.namespace}/{vs.name}: http.{unsupported} is not modelled")
        action = r.route
        timeout = http.get("timeout")
        action.timeout.CopyFrom(_dur(timeout) if timeout is not None else _ZERO)
        action.max_grpc_timeout.CopyFrom(action.timeout)
        dests = http.get("route") or []
        consistent = False
        if len(dests) == 1:
            d = dests[0].get("destination") or {}
            action.cluster = self._destination_cluster(d, listen_port)
            ch = self._consistent_hash_for(d.get("host", ""), d.get("subset", ""), (d.get("port") or {}).get("number"))
            hp = self._hash_policy(ch)
            if hp is not None:
                action.hash_policy.append(hp)
            consistent = ch is not None
        else:
            for dst in dests:
                weight = int(dst.get("weight", 0) or 0)
                if weight == 0:
                    continue
                d = dst.get("destination") or {}
                action.weighted_clusters.clusters.add(name=self._destination_cluster(d, listen_port),
                                                      weight=_u32(weight))
                hp = self._hash_policy(self._consistent_hash_for(d.get("host", ""), d.get("subset", ""),
                                                                 (d.get("port") or {}).get("number")))
                if hp is not None:
                    action.hash_policy.append(hp)
        policy = self._retry_policy(http.get("retries"), consistent)
        if policy is not None:
            action.retry_policy.CopyFrom(policy)
        r.decorator.operation = self._operation(r, vs.name, listen_port)
        fault = http.get("fault")
        if fault is not None:
            hf = self._fault(fault)
            if hf is not None:
                r.typed_per_filter_config["envoy.filters.http.fault"].CopyFrom(_pack(hf))
        return r

    @staticmethod
    def _operation(r: route_components_pb2.Route, vs_name: str, port: int) -> str:
        """``GetRouteOperation``."""
        m = r.match
        which = m.WhichOneof("path_specifier")
        path = "/*"
        if which == "prefix":
            path = m.prefix + "*"
        elif which == "path":
            path = m.path
        elif which == "safe_regex":
            path = m.safe_regex.regex
        c = r.route.cluster
        if c.count("|") == 3:
            _, p, _, h = c.split("|")
            return f"{h}:{p}{path}"
        return f"{vs_name}:{port}{path}"

    def _vs_routes(self, vs: _Config, listen_port: int) -> List[route_components_pb2.Route]:
        """``BuildHTTPRoutesForVirtualService``."""
        out: List[route_components_pb2.Route] = []
        for http in vs.spec.get("http") or []:
            catchall = False
            matches = http.get("match") or []
            if not matches:
                r = self._translate_route(vs, http, None, listen_port)
                if r is not None:
                    out.append(r)
                catchall = True
            else:
                for m in matches:
                    r = self._translate_route(vs, http, m, listen_port)
                    if r is not None:
                        out.append(r)
                        if self._is_catch_all(r):
                            catchall = True
                            break
            if catchall:
                break
        return out

    def _default_route(self, cluster: str, operation: str, hash_policy: Any) -> route_components_pb2.Route:
        """``BuildDefaultHTTPOutboundRoute``."""
        r = route_components_pb2.Route(name="default", match=route_components_pb2.RouteMatch(prefix="/"),
                                       decorator=route_components_pb2.Decorator(operation=operation))
        r.route.cluster = cluster
        r.route.retry_policy.CopyFrom(self._retry_policy(None, False))
        r.route.timeout.CopyFrom(_ZERO)
        r.route.max_grpc_timeout.CopyFrom(_ZERO)
        if hash_policy is not None:
            r.route.hash_policy.append(hash_policy)
        return r

    def _alt_hosts(self, hostname: str, port: int) -> List[str]:
        """``GenerateAltVirtualHosts`` for a Kubernetes proxy (DNS domain ``<ns>.svc.<domain>``)."""
        out: List[str] = []
        if self.absolute_fqdn:
            out.append(hostname + ".")
            if port:
                out.append(_domain_name(hostname + ".", port))
        suffix = f".svc.{self.m.domain}"
        if not hostname.endswith(suffix):
            return out
        ih = hostname.find(".svc.")
        ns = hostname.find(".")
        if ih <= 0 or ns + 1 >= len(hostname) or ns + 1 > ih:
            return out
        short, name_ns = hostname[:ns], hostname[:ih]
        if hostname[ns + 1:ih] == self.m.namespace:
            names = [short, name_ns + ".svc", name_ns]
        else:
            names = [name_ns, name_ns + ".svc"]
        for n in names:
            out.append(n)
            if port:
                out.append(_domain_name(n, port))
        return out

    def _vhost_domains(self, svc: _Service, port: int) -> Tuple[List[str], List[str]]:
        """``generateVirtualHostDomains``."""
        p = port if self.domains_with_port else 0
        alt = self._alt_hosts(svc.fqdn, p)
        domains = [_ipv6_compliant(svc.fqdn)] + ([_domain_name(svc.fqdn, p)] if p else []) + alt
        if svc.vip and svc.vip != "0.0.0.0":
            domains.append(_ipv6_compliant(svc.vip))
            if p:
                domains.append(_domain_name(svc.vip, p))
        return domains, alt

    def _virtual_hosts(self, port: int) -> List[route_components_pb2.VirtualHost]:
        """``BuildSidecarOutboundVirtualHosts`` + ``BuildSidecarVirtualHostWrapper`` for one port."""
        # servicesByName holds every service with this port; only HTTP ports get virtual hosts
        on_port = {s.fqdn: s for s in self.m.services if s.port(port) is not None}
        registry = {f: s for f, s in on_port.items() if s.port(port).is_http}  # type: ignore[union-attr]
        vses = []
        for vs in self.m.virtual_services:
            if "mesh" not in (vs.spec.get("gateways") or ["mesh"]):
                continue
            if port == 80 or any(h in on_port for h in vs.spec["hosts"]):
                vses.append(vs)
        wrappers: List[Tuple[List[str], List[_Service], List[route_components_pb2.Route]]] = []
        for vs in vses:
            routes = self._vs_routes(vs, port)
            if not routes:
                continue
            hosts = [h for h in vs.spec["hosts"] if h not in on_port and "*" not in h]
            services = [registry[h] for h in vs.spec["hosts"] if h in registry]
            if not services and port != 80:
                continue
            wrappers.append((hosts, services, routes))
        covered = {s.fqdn for _, svcs, _ in wrappers for s in svcs}
        for fqdn in sorted(registry):
            if fqdn in covered:
                continue
            svc = registry[fqdn]
            hp = self._hash_policy(self._consistent_hash_for(fqdn, "", port))
            wrappers.append(([], [svc], [self._default_route(_subset_key("", fqdn, port), f"{fqdn}:{port}/*", hp)]))

        known_fqdn = set()
        for _, svcs, _ in wrappers:
            for s in svcs:
                known_fqdn.update((_domain_name(s.fqdn, port), s.fqdn))
        names: set = set()
        seen_domains: set = set()
        vhosts = []

        def add(hostname: str, svc: Optional[_Service], routes: List[route_components_pb2.Route]) -> None:
            name = _domain_name(hostname, port)
            if name in names:
                return
            names.add(name)
            if svc is None:
                domains, alt = [_ipv6_compliant(hostname)] + ([name] if self.domains_with_port else []), []
            else:
                domains, alt = self._vhost_domains(svc, port)
            kept = []
            for d in domains:
                low = d.lower()
                if low in seen_domains or (d in alt and d in known_fqdn):
                    continue
                kept.append(d)
                seen_domains.add(low)
            if kept:
                vhosts.append(route_components_pb2.VirtualHost(name=name, domains=kept, routes=routes,
                                                               include_request_attempt_count=True))

        for hosts, svcs, routes in wrappers:
            for h in hosts:
                add(h, None, routes)
            for s in svcs:
                add(s.fqdn, s, routes)
        vhosts.sort(key=lambda v: v.name)
        return vhosts

    def _catch_all_vhost(self) -> route_components_pb2.VirtualHost:
        """``buildCatchAllVirtualHost``."""
        if self.m.outbound_policy == "ALLOW_ANY":
            r = route_components_pb2.Route(name="allow_any", match=route_components_pb2.RouteMatch(prefix="/"))
            r.route.cluster = "PassthroughCluster"
            r.route.timeout.CopyFrom(_ZERO)
            r.route.max_grpc_timeout.CopyFrom(_ZERO)
            return route_components_pb2.VirtualHost(name="allow_any", domains=["*"], routes=[r],
                                                    include_request_attempt_count=True)
        r = route_components_pb2.Route(name="block_all", match=route_components_pb2.RouteMatch(prefix="/"))
        r.direct_response.status = 502
        return route_components_pb2.VirtualHost(name="block_all", domains=["*"], routes=[r],
                                                include_request_attempt_count=True)

    def route_config(self, port: int) -> route_pb2.RouteConfiguration:
        """``buildSidecarOutboundHTTPRouteConfig`` for RDS name ``"<port>"``."""
        rc = route_pb2.RouteConfiguration(name=str(port), virtual_hosts=self._virtual_hosts(port),
                                          validate_clusters=wrappers_pb2.BoolValue(value=False),
                                          max_direct_response_body_size_bytes=_u32(1024 * 1024))
        rc.virtual_hosts.append(self._catch_all_vhost())
        if not self.domains_with_port:
            rc.ignore_port_in_host_matching = True
        return rc

    # -- CDS ------------------------------------------------------------------------------------

    def _common_upstream_tls(self, alpn: Sequence[str]) -> tls_pb2.CommonTlsContext:
        ctx = tls_pb2.CommonTlsContext(tls_params=tls_common_pb2.TlsParameters(
            tls_minimum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_2,
            tls_maximum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_3))
        ctx.alpn_protocols.extend(alpn)
        return ctx

    def _istio_mutual(self, sni: str, sans: Sequence[str], h2: bool) -> base_pb2.TransportSocket:
        """``buildUpstreamClusterTLSContext`` for ISTIO_MUTUAL (cluster_tls.go)."""
        alpn = ["istio-peer-exchange", "istio", "h2"] if h2 else ["istio-peer-exchange", "istio"]
        if not self.f.istio_ext:  # DisableMxALPN: no metadata exchange to announce
            alpn = ["istio", "h2"] if h2 else ["istio"]
        ctx = tls_pb2.UpstreamTlsContext(common_tls_context=self._common_upstream_tls(alpn), sni=sni)
        c = ctx.common_tls_context
        c.tls_certificate_sds_secret_configs.append(self.default_sds)
        c.combined_validation_context.default_validation_context.SetInParent()
        for san in sans:
            c.combined_validation_context.default_validation_context.match_subject_alt_names.add(exact=san)
        c.combined_validation_context.validation_context_sds_secret_config.CopyFrom(self.root_sds)
        return base_pb2.TransportSocket(name=_TLS_SOCKET, typed_config=_pack(ctx))

    def _simple_tls(self, tls: Mapping[str, Any], h2: bool, hpo: hpo_pb2.HttpProtocolOptions) -> base_pb2.TransportSocket:
        """``constructUpstreamTLS`` for SIMPLE (no credentialName, no client certificate)."""
        ctx = tls_pb2.UpstreamTlsContext(common_tls_context=self._common_upstream_tls([]), sni=tls.get("sni", ""))
        sans = list(_camel(tls, "subjectAltNames") or [])
        if not ctx.sni:
            hpo.upstream_http_protocol_options.auto_sni = True
            if not sans and not _camel(tls, "insecureSkipVerify"):
                hpo.upstream_http_protocol_options.auto_san_validation = True
        if _camel(tls, "insecureSkipVerify"):
            ctx.common_tls_context.validation_context.SetInParent()
        else:
            ca = _camel(tls, "caCertificates") or "system"
            cvc = ctx.common_tls_context.combined_validation_context
            cvc.default_validation_context.SetInParent()
            for san in sans:
                cvc.default_validation_context.match_subject_alt_names.add(exact=san)
            cvc.validation_context_sds_secret_config.CopyFrom(_sds(f"file-root:{ca}"))
        if h2:
            ctx.common_tls_context.alpn_protocols.append("h2")
        return base_pb2.TransportSocket(name=_TLS_SOCKET, typed_config=_pack(ctx))

    def _apply_connection_pool(self, c: cluster_pb2.Cluster, pool: Optional[Mapping[str, Any]],
                               hpo: hpo_pb2.HttpProtocolOptions) -> None:
        """``applyConnectionPool`` (+ the default circuit breakers istiod always writes)."""
        pool = pool or {}
        th = circuit_breaker_pb2.CircuitBreakers.Thresholds(
            max_connections=_u32(_MAX_U32), max_pending_requests=_u32(_MAX_U32),
            max_requests=_u32(_MAX_U32), max_retries=_u32(_MAX_U32))
        http = pool.get("http") or {}
        tcp = pool.get("tcp") or {}
        if int(_camel(http, "http2MaxRequests", 0) or 0) > 0:
            th.max_requests.value = int(_camel(http, "http2MaxRequests"))
        if int(_camel(http, "http1MaxPendingRequests", 0) or 0) > 0:
            th.max_pending_requests.value = int(_camel(http, "http1MaxPendingRequests"))
        if int(_camel(http, "maxRetries", 0) or 0) > 0:
            th.max_retries.value = int(_camel(http, "maxRetries"))
        c.connect_timeout.CopyFrom(self.m.connect_timeout)
        if _camel(tcp, "connectTimeout") is not None:
            c.connect_timeout.CopyFrom(_dur(_camel(tcp, "connectTimeout")))
        if int(_camel(tcp, "maxConnections", 0) or 0) > 0:
            th.max_connections.value = int(_camel(tcp, "maxConnections"))
        c.circuit_breakers.thresholds.append(th)
        idle = _camel(http, "idleTimeout")
        if idle is None:
            idle = _camel(tcp, "idleTimeout")
        mrpc = int(_camel(http, "maxRequestsPerConnection", 0) or 0)
        mcd = _camel(tcp, "maxConnectionDuration")
        mcs = int(_camel(http, "maxConcurrentStreams", 0) or 0)
        if idle is not None or mrpc > 0 or mcd is not None or mcs > 0:
            common = hpo.common_http_protocol_options
            common.SetInParent()
            if idle is not None:
                common.idle_timeout.CopyFrom(_dur(idle))
            if mrpc > 0:
                common.max_requests_per_connection.value = mrpc
            if mcd is not None:
                common.max_connection_duration.CopyFrom(_dur(mcd))
            if mcs > 0 and hpo.explicit_http_config.HasField("http2_protocol_options"):
                hpo.explicit_http_config.http2_protocol_options.max_concurrent_streams.value = mcs
        if _camel(http, "useClientProtocol"):
            hpo.use_downstream_protocol_config.http_protocol_options.SetInParent()
            hpo.use_downstream_protocol_config.http2_protocol_options.SetInParent()

    @staticmethod
    def _apply_outlier_detection(c: cluster_pb2.Cluster, od: Optional[Mapping[str, Any]]) -> None:
        """``applyOutlierDetection``."""
        if od is None:
            return
        out = outlier_detection_pb2.OutlierDetection(enforcing_success_rate=_u32(0))
        v = _camel(od, "consecutive5xxErrors")
        if v is not None:
            v = int(v)
            out.consecutive_5xx.value = v
            out.enforcing_consecutive_5xx.value = 100 if v > 0 else 0
        v = _camel(od, "consecutiveGatewayErrors")
        if v is not None:
            v = int(v)
            out.consecutive_gateway_failure.value = v
            out.enforcing_consecutive_gateway_failure.value = 100 if v > 0 else 0
        if _camel(od, "interval") is not None:
            out.interval.CopyFrom(_dur(_camel(od, "interval")))
        if _camel(od, "baseEjectionTime") is not None:
            out.base_ejection_time.CopyFrom(_dur(_camel(od, "baseEjectionTime")))
        if int(_camel(od, "maxEjectionPercent", 0) or 0) > 0:
            out.max_ejection_percent.value = int(_camel(od, "maxEjectionPercent"))
        if _camel(od, "splitExternalLocalOriginErrors"):
            out.split_external_local_origin_errors = True
            lof = int(_camel(od, "consecutiveLocalOriginFailures", 0) or 0)
            if lof > 0:
                out.consecutive_local_origin_failure.value = lof
                out.enforcing_consecutive_local_origin_failure.value = 100
            out.enforcing_local_origin_success_rate.value = 0
        c.outlier_detection.CopyFrom(out)
        min_health = int(_camel(od, "minHealthPercent", 0) or 0)
        if min_health >= 0:
            c.common_lb_config.healthy_panic_threshold.SetInParent()
            c.common_lb_config.healthy_panic_threshold.value = float(min_health)

    def _locality_setting(self, lb: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
        """``GetEffectiveLbSetting``: the DR's localityLbSetting, else the mesh default (enabled)."""
        setting = _camel(lb, "localityLbSetting")
        if setting is not None:
            if setting.get("enabled") is False:
                return None
            if _camel(setting, "failoverPriority"):
                raise ValueError("localityLbSetting.failoverPriority is not modelled")
            return setting
        return {"enabled": True}

    def _apply_load_balancer(self, c: cluster_pb2.Cluster, lb: Optional[Mapping[str, Any]]) -> None:
        """``applyLoadBalancer`` + ``ApplyRingHashLoadBalancer`` + ``LocalityLBSettings.ApplyToCluster``."""
        setting = self._locality_setting(lb) or {}
        failover_on = c.HasField("outlier_detection")
        if (failover_on and setting.get("failover")) or setting.get("distribute"):
            c.common_lb_config.locality_weighted_lb_config.SetInParent()
        if c.type == cluster_pb2.Cluster.ORIGINAL_DST:
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            return
        simple = str((lb or {}).get("simple", "")).upper()
        if simple in ("LEAST_CONN", "LEAST_REQUEST"):
            c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        elif simple == "RANDOM":
            c.lb_policy = cluster_pb2.Cluster.RANDOM
        elif simple == "ROUND_ROBIN":
            c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        elif simple == "PASSTHROUGH":
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            c.type = cluster_pb2.Cluster.ORIGINAL_DST
        else:
            c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        ch = _camel(lb, "consistentHash")
        if not ch:
            return
        if ch.get("maglev") is not None:
            c.lb_policy = cluster_pb2.Cluster.MAGLEV
            if int(_camel(ch["maglev"], "tableSize", 0) or 0):
                c.maglev_lb_config.table_size.value = int(_camel(ch["maglev"], "tableSize"))
        elif _camel(ch, "ringHash") is not None:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            size = int(_camel(_camel(ch, "ringHash"), "minimumRingSize", 0) or 0)
            if size:
                c.ring_hash_lb_config.minimum_ring_size.value = size
        else:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            c.ring_hash_lb_config.minimum_ring_size.value = int(_camel(ch, "minimumRingSize", 0) or 0) or 1024

    def _service_metadata(self, c: cluster_pb2.Cluster, services: Sequence[_Service]) -> None:
        c.metadata.filter_metadata["istio"].update(
            {"services": [{"host": s.fqdn, "name": s.name, "namespace": s.namespace} for s in services]})

    def _apply_traffic_policy(self, c: cluster_pb2.Cluster, svc: _Service, port: _Port,
                              policy: Optional[Mapping[str, Any]], sni: str) -> hpo_pb2.HttpProtocolOptions:
        """``applyTrafficPolicy`` for an outbound cluster; returns the HttpProtocolOptions to attach."""
        policy = policy or {}
        pool = _camel(policy, "connectionPool") or {}
        hpo = hpo_pb2.HttpProtocolOptions()
        h2_upgrade = str(_camel(pool.get("http"), "h2UpgradePolicy", "") or "").upper()
        if port.is_h2 or (h2_upgrade == "UPGRADE" and not _camel(pool.get("http"), "useClientProtocol")):
            hpo.explicit_http_config.http2_protocol_options.SetInParent()
        self._apply_connection_pool(c, pool, hpo)
        h2 = hpo.explicit_http_config.HasField("http2_protocol_options")  # isHttp2Cluster
        self._apply_outlier_detection(c, _camel(policy, "outlierDetection"))
        self._apply_load_balancer(c, _camel(policy, "loadBalancer"))
        tls = policy.get("tls")
        mode = str((tls or {}).get("mode", "")).upper() if tls else ""
        if tls is None:
            if self.m.service_mtls_mode() != "DISABLE":
                ts = self._istio_mutual(sni, svc.service_accounts, h2)
                if c.type != cluster_pb2.Cluster.ORIGINAL_DST:
                    c.transport_socket_matches.add(name="tlsMode-istio", transport_socket=ts).match.update(
                        {"tlsMode": "istio"})
                    m = c.transport_socket_matches.add(name="tlsMode-disabled", transport_socket=_RAW_BUFFER_SOCKET)
                    m.match.SetInParent()
                else:
                    c.transport_socket.CopyFrom(ts)
        elif mode == "ISTIO_MUTUAL":
            sans = list(_camel(tls, "subjectAltNames") or svc.service_accounts)
            c.transport_socket.CopyFrom(self._istio_mutual(tls.get("sni") or sni, sans, h2))
        elif mode == "SIMPLE":
            c.transport_socket.CopyFrom(self._simple_tls(tls, h2, hpo))
        elif mode not in ("DISABLE", ""):
            raise ValueError(f"DestinationRule tls mode {mode!r} is not modelled (ISTIO_MUTUAL, SIMPLE, DISABLE)")
        return hpo

    @staticmethod
    def _finish_hpo(c: cluster_pb2.Cluster, hpo: hpo_pb2.HttpProtocolOptions) -> None:
        """``clusterWrapper.build``: attach HttpProtocolOptions if any were set."""
        if hpo.ByteSize() == 0:
            return
        if hpo.WhichOneof("upstream_protocol_options") is None:
            hpo.explicit_http_config.http_protocol_options.SetInParent()
        c.typed_extension_protocol_options[_HPO].CopyFrom(_pack(hpo))

    def _outbound_cluster(self, svc: _Service, port: _Port, subset: str, policy: Optional[Mapping[str, Any]],
                          dr: Optional[_Config]) -> cluster_pb2.Cluster:
        name = _subset_key(subset, svc.fqdn, port.number)
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, alt_stat_name=name + ";")
        c.common_lb_config.SetInParent()
        self._service_metadata(c, [svc])
        hpo = self._apply_traffic_policy(c, svc, port, policy, _sni_key(subset, svc.fqdn, port.number))
        if c.type == cluster_pb2.Cluster.EDS:
            c.eds_cluster_config.service_name = name
            c.eds_cluster_config.eds_config.CopyFrom(_ADS)
        if self.f.istio_ext:
            c.filters.append(self.f.cluster_mx)
        if dr is not None:
            md = c.metadata.filter_metadata["istio"]
            md.update({"config": _config_path(dr.kind, dr.namespace, dr.name)})
            if subset:
                md.update({"subset": subset})
            if str(((policy or {}).get("tls") or {}).get("mode", "")).upper() in ("SIMPLE", "MUTUAL"):
                md.update({"alpn_override": "false"})
        self._finish_hpo(c, hpo)
        return c

    def outbound_clusters(self) -> List[cluster_pb2.Cluster]:
        """``buildOutboundClusters`` (one default cluster + one per DestinationRule subset, per port)."""
        out = []
        for svc in self.m.services:
            dr = self.m.destination_rule(svc.fqdn)
            tp = _camel(dr.spec, "trafficPolicy") if dr else None
            for port in svc.ports:
                policy = self._traffic_policy_for_port(tp, port.number)
                c = self._outbound_cluster(svc, port, "", policy, dr)
                out.append(c)
                if c.type == cluster_pb2.Cluster.EDS:
                    self.eds_clusters.append((c, svc, port, "", policy or {}))
                for s in (dr.spec.get("subsets") or []) if dr else []:
                    sp = self._merged_subset_policy(tp, _camel(s, "trafficPolicy"), port.number)
                    sc = self._outbound_cluster(svc, port, s["name"], sp, dr)
                    out.append(sc)
                    if sc.type == cluster_pb2.Cluster.EDS:
                        self.eds_clusters.append((sc, svc, port, s["name"], dict(sp or {}, _labels=s.get("labels") or {})))
        return out

    def static_clusters(self) -> Tuple[List[cluster_pb2.Cluster], cluster_pb2.Cluster]:
        """BlackHoleCluster, PassthroughCluster (outbound) and InboundPassthroughCluster."""
        bh = cluster_pb2.Cluster(name="BlackHoleCluster", type=cluster_pb2.Cluster.STATIC,
                                 connect_timeout=self.m.connect_timeout, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
                                 alt_stat_name="BlackHoleCluster;")
        passthrough_hpo = hpo_pb2.HttpProtocolOptions()
        passthrough_hpo.common_http_protocol_options.idle_timeout.CopyFrom(_dur(300))
        passthrough_hpo.use_downstream_protocol_config.http_protocol_options.SetInParent()
        passthrough_hpo.use_downstream_protocol_config.http2_protocol_options.SetInParent()

        def passthrough(name: str) -> cluster_pb2.Cluster:
            c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST,
                                    connect_timeout=self.m.connect_timeout,
                                    lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED, alt_stat_name=name + ";")
            c.typed_extension_protocol_options[_HPO].CopyFrom(_pack(passthrough_hpo))
            c.circuit_breakers.thresholds.add(max_connections=_u32(_MAX_U32), max_pending_requests=_u32(_MAX_U32),
                                              max_requests=_u32(_MAX_U32), max_retries=_u32(_MAX_U32))
            return c

        pt = passthrough("PassthroughCluster")
        if self.f.istio_ext:
            pt.filters.append(self.f.cluster_mx)
        inbound = passthrough("InboundPassthroughCluster")
        inbound.upstream_bind_config.source_address.CopyFrom(
            address_pb2.SocketAddress(address=_INBOUND_PASSTHROUGH_BIND, port_value=0))
        return [bh, pt], inbound

    # -- EDS ------------------------------------------------------------------------------------

    def _endpoint_metadata(self, svc: _Service, ep: _Endpoint, mtls: bool) -> base_pb2.Metadata:
        md = base_pb2.Metadata()
        if mtls and ep.tls_mode and ep.tls_mode != "disabled":
            md.filter_metadata[_TS_MATCH_KEY].update({"tlsMode": ep.tls_mode})
        labels = ep.labels
        canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
                     or labels.get("app") or ep.workload)
        revision = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
                    or labels.get("version") or "latest")
        if revision == "latest":
            revision = ""
        md.filter_metadata["istio"].update(
            {"workload": f"{ep.workload};{svc.namespace};{canonical};{revision};{_CLUSTER_ID}"})
        return md

    def _mtls_enabled(self, policy: Mapping[str, Any], ep: _Endpoint) -> bool:
        """``mtlsChecker.checkMtlsEnabled`` (DR tls mode, else the endpoint's label and the mesh mode)."""
        tls = policy.get("tls")
        if tls is not None and tls.get("mode"):
            return str(tls["mode"]).upper() == "ISTIO_MUTUAL"
        if ep.tls_mode != "istio":
            return False
        return self.m.mtls_mode != "DISABLE"

    def _cla(self, c: cluster_pb2.Cluster, svc: _Service, port: _Port, policy: Mapping[str, Any]) -> endpoint_pb2.ClusterLoadAssignment:
        """``EndpointBuilder.BuildClusterLoadAssignment``."""
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=c.name)
        subset_labels = policy.get("_labels") or {}
        # the subset's own TLS mode wins for the mTLS check (tlsModeForDestinationRule)
        by_locality: Dict[str, List[Tuple[_Endpoint, endpoint_components_pb2.LbEndpoint]]] = {}
        for ep in svc.endpoints:
            if not ep.healthy:
                continue
            if any(ep.labels.get(k) != v for k, v in subset_labels.items()):
                continue
            lbe = endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=_address(ep.ip, port.target)),
                health_status=health_check_pb2.HEALTHY, load_balancing_weight=_u32(ep.weight),
                metadata=self._endpoint_metadata(svc, ep, self._mtls_enabled(policy, ep)))
            by_locality.setdefault(ep.locality, []).append((ep, lbe))
        for label in sorted(by_locality):
            entries = by_locality[label]
            lle = cla.endpoints.add(lb_endpoints=[e for _, e in entries])
            lle.locality.CopyFrom(_locality(label))
            lle.load_balancing_weight.value = min(_MAX_U32, sum(e.weight for e, _ in entries))
        if not cla.endpoints:
            return cla
        setting = self._locality_setting(_camel(policy, "loadBalancer"))
        if setting is None:
            return cla
        if setting.get("distribute"):
            self._apply_locality_weights(cla, setting["distribute"])
        elif _camel(policy, "outlierDetection") is not None:
            self._apply_locality_failover(cla, setting.get("failover") or [])
        return cla

    def _locality_match(self, loc: base_pb2.Locality, rule: str) -> bool:
        parts = (rule.split("/") + ["", "", ""])[:3]
        region, zone, sub = parts
        return ((region == "*" or loc.region == region) and (zone in ("*", "") or loc.zone == zone)
                and (sub in ("*", "") or loc.sub_zone == sub))

    def _apply_locality_weights(self, cla: endpoint_pb2.ClusterLoadAssignment, distribute: Sequence[Mapping[str, Any]]) -> None:
        """``applyLocalityWeights``."""
        for rule in distribute:
            if not self._locality_match(self.m.proxy_locality, rule.get("from", "")):
                continue
            mismatched = set(range(len(cla.endpoints)))
            for loc, weight in (rule.get("to") or {}).items():
                dest: Dict[int, int] = {}
                for i, lle in enumerate(cla.endpoints):
                    if i in mismatched and self._locality_match(lle.locality, loc):
                        mismatched.discard(i)
                        dest[i] = lle.load_balancing_weight.value if lle.HasField("load_balancing_weight") else 1
                total = sum(dest.values())
                for i, orig in dest.items():
                    w = orig * int(weight) / total if total else 0
                    if w > 0:
                        cla.endpoints[i].load_balancing_weight.value = int(math.ceil(w))
            for i in mismatched:
                del cla.endpoints[i].lb_endpoints[:]
            return

    def _apply_locality_failover(self, cla: endpoint_pb2.ClusterLoadAssignment, failover: Sequence[Mapping[str, Any]]) -> None:
        """``applyLocalityFailover``: priorities by locality match with the proxy, then compacted."""
        proxy = self.m.proxy_locality
        by_priority: Dict[int, List[int]] = {}
        for i, lle in enumerate(cla.endpoints):
            loc = lle.locality
            if proxy.region == loc.region:
                prio = 0 if proxy.zone == loc.zone and proxy.sub_zone == loc.sub_zone else (1 if proxy.zone == loc.zone else 2)
            else:
                prio = 3
                for f in failover:
                    if f.get("from") == proxy.region:
                        if loc.region != f.get("to"):
                            prio = 4
                        break
            prio = lle.priority * 5 + prio
            lle.priority = prio
            by_priority.setdefault(prio, []).append(i)
        for rank, prio in enumerate(sorted(by_priority)):
            if rank != prio:
                for i in by_priority[prio]:
                    cla.endpoints[i].priority = rank

    def endpoints(self) -> List[endpoint_pb2.ClusterLoadAssignment]:
        return [self._cla(c, svc, port, policy) for c, svc, port, _, policy in self.eds_clusters]

    # -- LDS: outbound --------------------------------------------------------------------------

    def _http_listener(self, port: int) -> listener_pb2.Listener:
        """``buildListenerFromEntry`` for an HTTP port: ``0.0.0.0_<port>`` with RDS ``"<port>"``."""
        name = f"{_WILDCARD}_{port}"
        l = listener_pb2.Listener(name=name, address=_address(_WILDCARD, port),
                                  traffic_direction=base_pb2.OUTBOUND, continue_on_listener_filters_timeout=True,
                                  bind_to_port=wrappers_pb2.BoolValue(value=False), listener_filters_timeout=_ZERO)
        l.listener_filters.add(name="envoy.filters.listener.http_inspector", typed_config=self.f.http_inspector_any)
        hcm = self._hcm(f"outbound_{name};", inbound=False, rds=str(port))
        chain = l.filter_chains.add(filters=[self._hcm_filter(hcm)], transport_socket_connect_timeout=_dur(15))
        chain.filter_chain_match.application_protocols.extend(_PLAINTEXT_HTTP_ALPNS)
        chain.filter_chain_match.transport_protocol = "raw_buffer"
        l.default_filter_chain.CopyFrom(self._passthrough_chain())
        return l

    def _passthrough_chain(self) -> listener_components_pb2.FilterChain:
        """``buildOutboundCatchAllNetworkFiltersOnly`` as the ``PassthroughFilterChain``."""
        target = "PassthroughCluster" if self.m.outbound_policy == "ALLOW_ANY" else "BlackHoleCluster"
        fc = listener_components_pb2.FilterChain(name="PassthroughFilterChain",
                                                 filters=self.f.tcp_stats(False) + [_tcp_proxy(target)])
        fc.filter_chain_match.SetInParent()
        return fc

    def _tcp_listener(self, svc: _Service, port: _Port) -> listener_pb2.Listener:
        """``<vip>_<port>`` with the service's TCP proxy chain (``buildSidecarOutboundTCPFilterChainOpts``)."""
        cluster_port = svc.ports[0].number if len(svc.ports) == 1 else port.number
        cluster = _subset_key("", svc.fqdn, cluster_port)
        dr = self.m.destination_rule(svc.fqdn)
        tp = (_camel(dr.spec, "trafficPolicy") or {}) if dr else {}
        tcp = _camel(_camel(tp, "connectionPool"), "tcp") or {}
        ch = _camel(_camel(tp, "loadBalancer"), "consistentHash") or {}
        filters = self.f.tcp_stats(False) + [_tcp_proxy(
            cluster, idle=_camel(tcp, "idleTimeout"), max_duration=_camel(tcp, "maxConnectionDuration"),
            hash_source_ip=bool(_camel(ch, "useSourceIp")))]
        l = listener_pb2.Listener(name=f"{svc.vip}_{port.number}", address=_address(svc.vip, port.number),
                                  traffic_direction=base_pb2.OUTBOUND, continue_on_listener_filters_timeout=True,
                                  bind_to_port=wrappers_pb2.BoolValue(value=False), listener_filters_timeout=_ZERO)
        l.filter_chains.add(filters=filters, transport_socket_connect_timeout=_dur(15))
        return l

    def outbound_listeners(self) -> List[listener_pb2.Listener]:
        """``buildSidecarOutboundListeners`` for the catch-all egress listener (no Sidecar resource)."""
        keyed: Dict[Tuple[str, int], listener_pb2.Listener] = {}
        for svc in self.m.services:
            for port in svc.ports:
                if port.is_http:
                    key = (_WILDCARD, port.number)
                    if key not in keyed:
                        keyed[key] = self._http_listener(port.number)
                else:
                    key = (svc.vip, port.number)
                    if key not in keyed:
                        keyed[key] = self._tcp_listener(svc, port)
        return [keyed[k] for k in sorted(keyed, key=lambda k: (k[1], k[0]))]

    def http_ports(self) -> List[int]:
        return sorted({p.number for s in self.m.services for p in s.ports if p.is_http})

    def virtual_outbound(self) -> listener_pb2.Listener:
        """``buildVirtualOutboundListener``."""
        l = listener_pb2.Listener(name="virtualOutbound", address=_address(_WILDCARD, self.m.outbound_port),
                                  use_original_dst=wrappers_pb2.BoolValue(value=True), traffic_direction=base_pb2.OUTBOUND)
        bh = l.filter_chains.add(name="virtualOutbound-blackhole",
                                 filters=self.f.tcp_stats(False) + [_tcp_proxy("BlackHoleCluster")])
        bh.filter_chain_match.destination_port.value = self.m.outbound_port
        target = "PassthroughCluster" if self.m.outbound_policy == "ALLOW_ANY" else "BlackHoleCluster"
        l.filter_chains.add(name="virtualOutbound-catchall-tcp", filters=self.f.tcp_stats(False) + [_tcp_proxy(target)])
        return l

    # -- LDS: inbound (listener_inbound.go) -------------------------------------------------------

    def _downstream_tls(self, tcp: bool) -> base_pb2.TransportSocket:
        """``authn_utils.BuildInboundTLS``."""
        ctx = tls_pb2.DownstreamTlsContext(require_client_certificate=wrappers_pb2.BoolValue(value=True))
        c = ctx.common_tls_context
        if tcp and self.f.istio_ext:
            c.alpn_protocols.extend(["istio-peer-exchange", "h2", "http/1.1"])
        else:
            c.alpn_protocols.extend(["h2", "http/1.1"])
        c.tls_params.cipher_suites.extend(_SUPPORTED_CIPHERS)
        c.tls_params.tls_minimum_protocol_version = tls_common_pb2.TlsParameters.TLSv1_2
        c.tls_params.tls_maximum_protocol_version = tls_common_pb2.TlsParameters.TLSv1_3
        c.tls_certificate_sds_secret_configs.append(self.default_sds)
        c.combined_validation_context.default_validation_context.SetInParent()
        c.combined_validation_context.validation_context_sds_secret_config.CopyFrom(self.root_sds)
        return base_pb2.TransportSocket(name=_TLS_SOCKET, typed_config=_pack(ctx))

    def _match_options(self, protocol: str) -> List[Tuple[List[str], str, str, bool]]:
        """``getFilterChainMatchOptions``: (ALPNs, transport protocol, "http"/"tcp", TLS) per chain."""
        mode = self.m.mtls_mode
        if protocol == "http":
            return {"STRICT": [([], "tls", "http", True)],
                    "PERMISSIVE": [(_ALL_ISTIO_MTLS_ALPNS, "tls", "http", True), ([], "raw_buffer", "http", False)],
                    "DISABLE": [([], "raw_buffer", "http", False)]}[mode]
        if protocol == "auto":
            return {"STRICT": [(_MTLS_HTTP_ALPNS, "tls", "http", True), ([], "tls", "tcp", True)],
                    "PERMISSIVE": [(_MTLS_HTTP_ALPNS, "tls", "http", True), (_PLAINTEXT_HTTP_ALPNS, "raw_buffer", "http", False),
                                   (_MTLS_TCP_MXC_ALPNS, "tls", "tcp", True), ([], "raw_buffer", "tcp", False),
                                   ([], "tls", "tcp", False)],
                    "DISABLE": [(_PLAINTEXT_HTTP_ALPNS, "raw_buffer", "http", False), ([], "raw_buffer", "tcp", False)]}[mode]
        return {"STRICT": [([], "tls", "tcp", True)],
                "PERMISSIVE": [(_ALL_ISTIO_MTLS_ALPNS, "tls", "tcp", True), ([], "tls", "tcp", False),
                               ([], "raw_buffer", "tcp", False)],
                "DISABLE": [([], "raw_buffer", "tcp", False)]}[mode]

    def _inbound_route_config(self, cluster: str, svc_port: int, operation: str, grpc: bool) -> route_pb2.RouteConfiguration:
        """``buildSidecarInboundHTTPRouteConfig`` + ``BuildDefaultHTTPInboundRoute``."""
        r = route_components_pb2.Route(name="default", match=route_components_pb2.RouteMatch(prefix="/"),
                                       decorator=route_components_pb2.Decorator(operation=operation))
        r.route.cluster = cluster
        r.route.timeout.CopyFrom(_ZERO)
        r.route.max_stream_duration.max_stream_duration.CopyFrom(_ZERO)
        r.route.max_stream_duration.grpc_timeout_header_max.CopyFrom(_ZERO)
        if not grpc:
            r.route.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(retry_on="reset-before-request",
                                                                          num_retries=_u32(2)))
        vh = route_components_pb2.VirtualHost(name=f"inbound|http|{svc_port}", domains=["*"], routes=[r])
        return route_pb2.RouteConfiguration(name=cluster, virtual_hosts=[vh],
                                            validate_clusters=wrappers_pb2.BoolValue(value=False))

    def _inbound_chains(self, *, target_port: int, svc_port: int, protocol: str, cluster: str, host: str,
                        passthrough: bool) -> List[listener_components_pb2.FilterChain]:
        """``inboundChainForOpts``."""
        chains = []
        h2 = protocol in _H2_PROTOCOLS
        lp = "http" if protocol in _HTTP_PROTOCOLS else ("auto" if passthrough else "tcp")
        for alpns, transport, kind, tls in self._match_options(lp):
            fc = listener_components_pb2.FilterChain()
            fc.filter_chain_match.application_protocols.extend(alpns)
            fc.filter_chain_match.transport_protocol = transport
            if target_port > 0:
                fc.filter_chain_match.destination_port.value = target_port
            if kind == "http":
                fc.name = "virtualInbound-catchall-http" if passthrough else f"{_WILDCARD}_{target_port}"
                stat = f"{cluster};" if passthrough else f"inbound_{_WILDCARD}_{target_port};"
                rc = self._inbound_route_config(cluster, svc_port, _domain_name(host, svc_port) + "/*",
                                                protocol in ("grpc", "grpc-web"))
                fc.filters.extend(self.f.listener_mx_filters())
                fc.filters.append(self._hcm_filter(self._hcm(stat, inbound=True, route_config=rc, http2=h2)))
            else:
                fc.name = "virtualInbound" if passthrough else f"{_WILDCARD}_{target_port}"
                fc.filters.extend(self.f.listener_mx_filters() + self.f.tcp_stats(True) + [_tcp_proxy(cluster)])
            if tls:
                fc.transport_socket.CopyFrom(self._tls_in_http if kind == "http" else self._tls_in_tcp)
            chains.append(fc)
        return chains

    def _service_targets(self) -> List[Tuple[_Service, _Port]]:
        """The proxy's ``ServiceTargets``: (service, port) for every service with the proxy IP as an endpoint."""
        if not self.m.proxy_ip:
            return []
        out = []
        for svc in self.m.services:
            if any(e.ip == self.m.proxy_ip for e in svc.endpoints):
                out.extend((svc, p) for p in svc.ports)
        return out

    def _inbound_targets(self) -> List[Tuple[_Service, _Port, List[_Service]]]:
        by_port: Dict[int, Tuple[_Service, _Port, List[_Service]]] = {}
        for svc, port in self._service_targets():
            if port.target in by_port:
                first = by_port[port.target]
                if first[1].number == port.number and svc not in first[2]:
                    first[2].append(svc)
                continue
            by_port[port.target] = (svc, port, [svc])
        return [by_port[p] for p in sorted(by_port)]

    def virtual_inbound(self) -> listener_pb2.Listener:
        """``inboundVirtualListener``: blackhole, passthrough chains, then one set per service port."""
        self._tls_in_http = self._downstream_tls(tcp=False)
        self._tls_in_tcp = self._downstream_tls(tcp=True)
        l = listener_pb2.Listener(name="virtualInbound", address=_address(_WILDCARD, self.m.inbound_port),
                                  traffic_direction=base_pb2.INBOUND, continue_on_listener_filters_timeout=True,
                                  listener_filters_timeout=_ZERO)
        bh = l.filter_chains.add(name="virtualInbound-blackhole",
                                 filters=self.f.listener_mx_filters() + self.f.tcp_stats(True) + [_tcp_proxy("BlackHoleCluster")])
        bh.filter_chain_match.destination_port.value = self.m.inbound_port
        l.filter_chains.extend(self._inbound_chains(target_port=0, svc_port=0, protocol="auto",
                                                    cluster="InboundPassthroughCluster", host="", passthrough=True))
        for svc, port, _ in self._inbound_targets():
            l.filter_chains.extend(self._inbound_chains(
                target_port=port.target, svc_port=port.number, protocol=port.protocol,
                cluster=_subset_key("", "", port.target, "inbound"), host=svc.fqdn, passthrough=False))
        l.listener_filters.append(self.f.original_dst)
        l.listener_filters.extend(self._inspectors(l))
        return l

    def _inspectors(self, l: listener_pb2.Listener) -> List[listener_components_pb2.ListenerFilter]:
        """``populateListenerFilters``: TLS/HTTP inspectors, disabled on ports that do not need them."""
        tls: Dict[int, bool] = {}
        http: Dict[int, bool] = {}
        for fc in l.filter_chains:
            port = fc.filter_chain_match.destination_port.value
            tls[port] = tls.get(port, False) or fc.filter_chain_match.transport_protocol == "tls"
            http[port] = http.get(port, False) or any(a in ("http/1.1", "h2c")
                                                      for a in fc.filter_chain_match.application_protocols)
        out = []
        if any(tls.values()):
            f = listener_components_pb2.ListenerFilter(name="envoy.filters.listener.tls_inspector",
                                                       typed_config=self.f.tls_inspector_any)
            if tls.get(0, False):
                ports = sorted(p for p, on in tls.items() if p and not on)
                if ports:
                    f.filter_disabled.CopyFrom(self._exclude_ports(ports))
            else:
                ports = sorted(p for p, on in tls.items() if p and on)
                if ports:
                    f.filter_disabled.not_match.CopyFrom(self._exclude_ports(ports))
            out.append(f)
        if any(http.values()):
            f = listener_components_pb2.ListenerFilter(name="envoy.filters.listener.http_inspector",
                                                       typed_config=self.f.http_inspector_any)
            ports = sorted(p for p, on in http.items() if not on)
            if ports:
                f.filter_disabled.CopyFrom(self._exclude_ports(ports))
            out.append(f)
        return out

    @staticmethod
    def _exclude_ports(ports: Sequence[int]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
        """``listenerPredicateExcludePorts``."""
        rules = [listener_components_pb2.ListenerFilterChainMatchPredicate(
            destination_port_range=range_pb2.Int32Range(start=p, end=p + 1)) for p in ports]
        if len(rules) > 1:
            return listener_components_pb2.ListenerFilterChainMatchPredicate(
                or_match=listener_components_pb2.ListenerFilterChainMatchPredicate.MatchSet(rules=rules))
        return rules[0]

    def inbound_clusters(self) -> List[cluster_pb2.Cluster]:
        """``buildInboundClustersFromServiceInstances`` (inbound traffic policy PASSTHROUGH: ORIGINAL_DST)."""
        out = []
        for svc, port, services in self._inbound_targets():
            name = _subset_key("", "", port.target, "inbound")
            c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, alt_stat_name=name + ";",
                                    lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
                                    cleanup_interval=duration_pb2.Duration(seconds=_MAX_SECONDS))
            c.common_lb_config.SetInParent()
            self._service_metadata(c, services)
            hpo = hpo_pb2.HttpProtocolOptions()
            if port.is_h2:
                hpo.explicit_http_config.http2_protocol_options.SetInParent()
            dr = self.m.destination_rule(svc.fqdn)
            policy = self._traffic_policy_for_port(_camel(dr.spec, "trafficPolicy"), port.number) if dr else None
            if dr is not None and _camel(dr.spec, "trafficPolicy") is not None:
                c.metadata.filter_metadata["istio"].update({"config": _config_path(dr.kind, dr.namespace, dr.name)})
            self._apply_connection_pool(c, _camel(policy, "connectionPool"), hpo)
            c.upstream_bind_config.source_address.CopyFrom(
                address_pb2.SocketAddress(address=_INBOUND_PASSTHROUGH_BIND, port_value=0))
            self._finish_hpo(c, hpo)
            out.append(c)
        return out


def build(mesh_desc: Mapping[str, Any], *, proxy_namespace: str = "default", domains_with_port: bool = False,
          absolute_fqdn: Optional[bool] = None, retry_503: Optional[bool] = None,
          istio_proxy_extensions: bool = True) -> Dict[str, List[Any]]:
    """The LDS/RDS/CDS/EDS resources istiod sends a sidecar in ``proxy_namespace``.

    Returns ``{"listeners": [...], "routes": [...], "clusters": [...], "endpoints": [...]}`` of
    ``envoy.config.listener.v3.Listener``, ``envoy.config.route.v3.RouteConfiguration``,
    ``envoy.config.cluster.v3.Cluster`` and ``envoy.config.endpoint.v3.ClusterLoadAssignment``
    messages (one CLA per EDS cluster, same order as the clusters).

    ``mesh_desc``::

        {
          "services": [{
            "name": "reviews", "namespace": "default", "vip": "10.96.0.20",
            "ports": [{"port": 9080, "protocol": "http", "name": "http", "target_port": 9080}],
            "endpoints": [{"ip": "10.244.0.7", "locality": "us-east1/us-east1-b/rack1",
                           "labels": {"app": "reviews", "version": "v1", "security.istio.io/tlsMode": "istio"},
                           "weight": 1, "service_account": "bookinfo-reviews", "workload": "reviews-v1",
                           "healthy": True}]}],
          "virtual_services": [{"name": "reviews", "namespace": "default", "hosts": ["reviews"],
            "http": [{"name": "jason",
                      "match": [{"headers": {"end-user": {"exact": "jason"}}, "uri": {"prefix": "/api"}}],
                      "route": [{"destination": {"host": "reviews", "subset": "v2"}, "weight": 80},
                                {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}],
                      "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure"},
                      "timeout": "10s",
                      "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 5}},
                                "abort": {"httpStatus": 503, "percentage": {"value": 1}}}},
                     {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}],
          "destination_rules": [{"name": "reviews", "namespace": "default", "host": "reviews",
            "trafficPolicy": {
              "loadBalancer": {"simple": "ROUND_ROBIN"},   # or {"consistentHash": {"httpHeaderName": "x-user"}}
              "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "1s"},
                                 "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 100, "maxRetries": 3}},
              "outlierDetection": {"consecutive5xxErrors": 5, "consecutiveGatewayErrors": 3, "interval": "10s",
                                   "baseEjectionTime": "30s", "maxEjectionPercent": 50},
              "tls": {"mode": "ISTIO_MUTUAL"}},              # ISTIO_MUTUAL | DISABLE | SIMPLE
            "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {...}}]}],
          "proxy": {"ip": "10.244.0.9", "locality": "us-east1/us-east1-b", "labels": {"app": "productpage"}},
          "mesh": {"mtls_mode": "PERMISSIVE", "outbound_traffic_policy": "ALLOW_ANY",
                   "proxy_listen_port": 15001, "proxy_inbound_listen_port": 15006, "connect_timeout": "10s"},
        }

    VirtualService / DestinationRule entries may also be Kubernetes objects (``{"metadata": {...},
    "spec": {...}}``); keys inside a spec are Istio's camelCase (snake_case is accepted too). Short
    hosts resolve against the config's namespace (``reviews`` -> ``reviews.<ns>.svc.cluster.local``).
    Only ``services`` is required. A service port's protocol is ``http``, ``http2``, ``grpc``,
    ``grpc-web`` or ``tcp``; every service needs a VIP (no headless services). ``proxy.ip`` makes the
    proxy an instance of every service listing that IP as an endpoint (its inbound chains/clusters).

    Options: ``domains_with_port`` writes every vhost domain also as ``host:port`` and leaves out
    ``ignore_port_in_host_matching`` (istiod < 1.16, before istio/istio#40475); ``absolute_fqdn`` adds
    the trailing-dot FQDN domain (istiod >= 1.27, #56008; default: ``not domains_with_port``);
    ``retry_503`` adds 503 to the retriable status codes of the default retry policy and of
    VirtualService retries without ``retryOn`` (istiod < 1.24, #52111; default: ``domains_with_port``);
    ``istio_proxy_extensions=False`` leaves out the filters only Istio's Envoy build has
    (``istio.metadata_exchange``, ``istio.alpn``, ``istio.stats``) so that an upstream Envoy accepts
    the rest (istiod's ``PILOT_ENABLE_METADATA_EXCHANGE=false``/``PILOT_ENABLE_ALPN_FILTER=false``
    plus no Telemetry metrics; ALPNs then drop ``istio-peer-exchange``).
    """
    if absolute_fqdn is None:
        absolute_fqdn = not domains_with_port
    if retry_503 is None:
        retry_503 = domains_with_port
    mesh = _Mesh(mesh_desc, proxy_namespace)
    b = _Builder(mesh, domains_with_port=domains_with_port, absolute_fqdn=absolute_fqdn, retry_503=retry_503,
                 istio_ext=istio_proxy_extensions)
    clusters = b.outbound_clusters()
    outbound_static, inbound_passthrough = b.static_clusters()
    clusters.extend(outbound_static)
    clusters.extend(b.inbound_clusters())
    clusters.append(inbound_passthrough)
    listeners = b.outbound_listeners()
    listeners.append(b.virtual_outbound())
    listeners.append(b.virtual_inbound())
    routes = [b.route_config(p) for p in b.http_ports()]
    return {"listeners": listeners, "routes": routes, "clusters": clusters, "endpoints": b.endpoints()}


# -------------------------------------------------------------------------------------------------
# random meshes
# -------------------------------------------------------------------------------------------------

_PORT_POOL = {
    "http": [80, 8080, 9080, 8000, 3000, 5000],
    "http2": [8081, 9081],
    "grpc": [50051, 9090, 7070],
    "grpc-web": [8443],
    "tcp": [6379, 3306, 5432, 9092, 27017, 7000],
}
_REGIONS = ["us-east1", "us-west1", "europe-west1"]
_RETRY_ON = ["5xx", "gateway-error", "connect-failure", "refused-stream", "reset", "retriable-4xx", "503",
             "cancelled", "unavailable", "deadline-exceeded"]


def _ip(base: Tuple[int, int], n: int) -> str:
    return f"10.{base[0] + (n >> 16)}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def generated(n_services: int, seed: int = 0, *, n_namespaces: Optional[int] = None, proxy_namespace: str = "default",
              vs_fraction: float = 0.35, dr_fraction: float = 0.45, tcp_fraction: float = 0.15,
              max_endpoints: int = 4) -> Dict[str, Any]:
    """A random valid mesh description with ``n_services`` services (same seed, same mesh).

    Services get 1-2 ports (http/http2/grpc/grpc-web/tcp), 1..``max_endpoints`` endpoints in
    a few localities with ``app``/``version``/``security.istio.io/tlsMode`` labels and service
    accounts; about ``vs_fraction`` of the HTTP services get a VirtualService (uri/header matches,
    weighted subsets, retries, timeouts, faults) and ``dr_fraction`` of all services a
    DestinationRule (simple or consistent-hash LB, connection pool, outlier detection, locality
    distribute/failover, ISTIO_MUTUAL/DISABLE/SIMPLE TLS, subsets with their own policies). The
    proxy is the first endpoint of the first service in ``proxy_namespace``.
    """
    rng = random.Random(seed)
    if n_namespaces is None:
        n_namespaces = max(1, min(20, n_services // 40))
    namespaces = [proxy_namespace] + [f"ns-{i}" for i in range(1, n_namespaces)]
    services: List[Dict[str, Any]] = []
    vses: List[Dict[str, Any]] = []
    drs: List[Dict[str, Any]] = []
    ep_counter = 0
    localities = [f"{r}/{r}-{z}" + (f"/rack{s}" if s else "") for r in _REGIONS for z in "ab" for s in (0, 1)]
    for i in range(n_services):
        ns = namespaces[i % len(namespaces)]
        name = f"svc-{i}"
        if rng.random() < tcp_fraction:
            protos = ["tcp"]
        else:
            protos = [rng.choice(["http", "http", "http", "http2", "grpc", "grpc-web"])]
            if rng.random() < 0.2:
                protos.append(rng.choice(["http", "grpc", "tcp"]))
        ports: List[Dict[str, Any]] = []
        for proto in protos:
            choices = [p for p in _PORT_POOL[proto] if all(p != q["port"] for q in ports)]
            port = rng.choice(choices)
            target = port if rng.random() < 0.7 else port + 1000
            ports.append({"port": port, "name": f"{proto}-{port}", "protocol": proto, "target_port": target})
        versions = ["v1", "v2", "v3"][: rng.randint(1, 3)]
        eps = []
        for _ in range(rng.randint(1, max_endpoints)):
            ep_counter += 1
            version = rng.choice(versions)
            labels = {"app": name, "version": version}
            r = rng.random()
            if r < 0.8:
                labels["security.istio.io/tlsMode"] = "istio"
            elif r < 0.9:
                labels["security.istio.io/tlsMode"] = "disabled"
            eps.append({"ip": _ip((244, 0), ep_counter), "locality": rng.choice(localities), "labels": labels,
                        "weight": rng.choice([1, 1, 1, 2, 3]), "service_account": rng.choice([name, "default"]),
                        "workload": f"{name}-{version}"})
        services.append({"name": name, "namespace": ns, "vip": _ip((96, 0), i + 1), "ports": ports, "endpoints": eps})

        host = rng.choice([name, f"{name}.{ns}.svc.cluster.local"])
        subsets: List[str] = []
        if rng.random() < dr_fraction:
            dr = _random_dr(rng, name, ns, host, versions)
            drs.append(dr)
            subsets = [s["name"] for s in dr.get("subsets", [])]
        http_ports = [p for p in ports if p["protocol"] != "tcp"]
        if http_ports and rng.random() < vs_fraction:
            vses.append(_random_vs(rng, name, ns, host, subsets, ports))
    proxy_svc = next(s for s in services if s["namespace"] == proxy_namespace)
    proxy_ep = proxy_svc["endpoints"][0]
    return {
        "services": services, "virtual_services": vses, "destination_rules": drs,
        "proxy": {"ip": proxy_ep["ip"], "locality": proxy_ep["locality"], "labels": dict(proxy_ep["labels"])},
    }


def _random_traffic_policy(rng: random.Random, top: bool) -> Dict[str, Any]:
    tp: Dict[str, Any] = {}
    if rng.random() < 0.5:
        if rng.random() < 0.3:
            ch = rng.choice([{"httpHeaderName": "x-user"}, {"useSourceIp": True},
                             {"httpCookie": {"name": "session", "ttl": "3600s", "path": "/"}},
                             {"httpQueryParameterName": "id"}])
            if rng.random() < 0.3:
                ch["ringHash"] = {"minimumRingSize": rng.choice([512, 2048])}
            elif rng.random() < 0.2:
                ch["maglev"] = {"tableSize": 65537}
            tp["loadBalancer"] = {"consistentHash": ch}
        else:
            tp["loadBalancer"] = {"simple": rng.choice(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "LEAST_CONN"])}
    if rng.random() < 0.4:
        pool: Dict[str, Any] = {}
        if rng.random() < 0.7:
            pool["tcp"] = {"maxConnections": rng.randint(1, 1000)}
            if rng.random() < 0.5:
                pool["tcp"]["connectTimeout"] = rng.choice(["250ms", "1s", "3s"])
        if rng.random() < 0.7:
            pool["http"] = {"http1MaxPendingRequests": rng.randint(1, 100), "http2MaxRequests": rng.randint(1, 1000),
                            "maxRetries": rng.randint(1, 10)}
            if rng.random() < 0.3:
                pool["http"]["maxRequestsPerConnection"] = rng.randint(1, 100)
            if rng.random() < 0.2:
                pool["http"]["idleTimeout"] = "30s"
        tp["connectionPool"] = pool
    if rng.random() < 0.4:
        tp["outlierDetection"] = {"consecutive5xxErrors": rng.randint(1, 10),
                                  "consecutiveGatewayErrors": rng.randint(0, 5),
                                  "interval": rng.choice(["1s", "5s", "10s"]),
                                  "baseEjectionTime": rng.choice(["30s", "1m"]),
                                  "maxEjectionPercent": rng.choice([10, 50, 100])}
        if top and rng.random() < 0.4:
            r = rng.random()
            lb = tp.setdefault("loadBalancer", {"simple": "ROUND_ROBIN"})
            if "consistentHash" not in lb:
                if r < 0.5:
                    lb["localityLbSetting"] = {"enabled": True, "failover": [{"from": "us-east1", "to": "us-west1"}]}
                else:
                    lb["localityLbSetting"] = {"enabled": True, "distribute": [
                        {"from": "us-east1/*", "to": {"us-east1/*": 80, "us-west1/*": 20}},
                        {"from": "*", "to": {"*": 100}}]}
    if rng.random() < 0.3:
        mode = rng.choice(["ISTIO_MUTUAL", "ISTIO_MUTUAL", "DISABLE", "SIMPLE"])
        tp["tls"] = {"mode": mode}
        if mode == "SIMPLE" and rng.random() < 0.5:
            tp["tls"]["sni"] = "backend.example.com"
    return tp


def _random_dr(rng: random.Random, name: str, ns: str, host: str, versions: List[str]) -> Dict[str, Any]:
    dr: Dict[str, Any] = {"name": name, "namespace": ns, "host": host}
    tp = _random_traffic_policy(rng, True)
    if tp:
        dr["trafficPolicy"] = tp
    if rng.random() < 0.7:
        subsets = []
        for v in versions:
            s: Dict[str, Any] = {"name": v, "labels": {"version": v}}
            if rng.random() < 0.25:
                s["trafficPolicy"] = _random_traffic_policy(rng, False)
            subsets.append(s)
        dr["subsets"] = subsets
    return dr


def _random_vs(rng: random.Random, name: str, ns: str, host: str, subsets: List[str],
               ports: List[Dict[str, Any]]) -> Dict[str, Any]:
    http_routes = []
    for j in range(rng.randint(1, 3)):
        route: Dict[str, Any] = {"name": f"r{j}"}
        last = j == 2 or rng.random() < 0.3
        if not last:
            matches = []
            for _ in range(rng.randint(1, 2)):
                m: Dict[str, Any] = {}
                kind = rng.random()
                if kind < 0.4:
                    m["uri"] = {"prefix": rng.choice(["/api", "/v1/", "/static"])}
                elif kind < 0.6:
                    m["uri"] = {"exact": rng.choice(["/login", "/health"])}
                elif kind < 0.75:
                    m["uri"] = {"regex": rng.choice(["/api/v[0-9]+/.*", "/users/[a-z]+"])}
                if rng.random() < 0.5 or not m:
                    m["headers"] = {rng.choice(["end-user", "x-canary"]): rng.choice(
                        [{"exact": "jason"}, {"prefix": "test"}, {"regex": "^(a|b)+$"}])}
                matches.append(m)
            route["match"] = matches
        dest_port = {"number": ports[0]["port"]} if len(ports) > 1 else None

        def dest(subset: str = "") -> Dict[str, Any]:
            d: Dict[str, Any] = {"host": host}
            if subset:
                d["subset"] = subset
            if dest_port and ports[0]["protocol"] != "tcp":
                d["port"] = dict(dest_port)
            return d

        if len(subsets) >= 2 and rng.random() < 0.6:
            picked = rng.sample(subsets, 2)
            w = rng.choice([50, 80, 90, 100])
            route["route"] = [{"destination": dest(picked[0]), "weight": w},
                              {"destination": dest(picked[1]), "weight": 100 - w}]
            if w == 100:
                route["route"][1]["weight"] = 0
        else:
            route["route"] = [{"destination": dest(rng.choice(subsets) if subsets and rng.random() < 0.5 else "")}]
        if rng.random() < 0.4:
            route["retries"] = {"attempts": rng.randint(0, 5), "perTryTimeout": rng.choice(["1s", "2s", "500ms"]),
                                "retryOn": ",".join(rng.sample(_RETRY_ON, rng.randint(1, 3)))}
        if rng.random() < 0.4:
            route["timeout"] = rng.choice(["1s", "5s", "15s", "0s"])
        if rng.random() < 0.2:
            fault: Dict[str, Any] = {}
            if rng.random() < 0.5:
                fault["delay"] = {"fixedDelay": rng.choice(["100ms", "2s"]), "percentage": {"value": rng.choice([1, 10.5, 50])}}
            if rng.random() < 0.6 or not fault:
                if rng.random() < 0.7:
                    fault["abort"] = {"httpStatus": rng.choice([400, 500, 503]), "percentage": {"value": rng.choice([1, 5])}}
                else:
                    fault["abort"] = {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 2}}
            route["fault"] = fault
        http_routes.append(route)
        if last:
            break
    vs: Dict[str, Any] = {"name": name, "namespace": ns, "hosts": [host], "http": http_routes}
    return vs
