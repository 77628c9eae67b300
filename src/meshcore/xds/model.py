"""Protobuf-free models of the xDS resources meshcore acts on (Listener, Cluster, ClusterLoadAssignment).

The decoders (``listener_config.listener_spec``, ``cluster_config.cluster_spec``,
``endpoint_config.endpoints_spec``) validate a resource and return one of these immutable
values; RouteConfigurations become :class:`~meshcore._route_model.RouteConfigSpec`
(``route_config.route_config_spec``). The snapshot builder and the data plane only ever see
these models, never protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .._model import Endpoint
from .._route_model import RouteConfigSpec, StringMatchSpec

__all__ = [
    "LISTENER", "ROUTE", "CLUSTER", "ENDPOINT", "TYPE_URLS", "SHORT_NAMES",
    "FaultSpec", "HttpFilterSpec", "ListenerSpec",
    "CircuitBreakers", "OutlierDetectionSpec", "CertificateRef", "SanMatcherSpec", "UpstreamTlsSpec",
    "DownstreamTlsSpec", "TransportSocketMatchSpec", "ClusterSpec", "EndpointsSpec",
]

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
#: The four resource types, in the order a proxyless client walks them (LDS -> RDS -> CDS -> EDS).
TYPE_URLS: Tuple[str, ...] = (LISTENER, ROUTE, CLUSTER, ENDPOINT)
#: Short names used in logs, CLI output and resource files.
SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}


# -- Listener ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """``envoy.extensions.filters.http.fault.v3.HTTPFault`` (what a client can apply).

    Percentages are per million (``FractionalPercent`` scaled, capped at 100%); the
    ``*_percent_denominator`` fields keep the configured denominator (100, 10_000 or 1_000_000),
    the unit of the ``x-envoy-fault-*-request-percentage`` headers. ``None`` means "not
    configured"; ``max_active_faults`` ``None`` is unlimited.
    """

    delay_per_million: int = 0
    fixed_delay: Optional[float] = None  # seconds
    abort_per_million: int = 0
    abort_http_status: Optional[int] = None
    abort_grpc_status: Optional[int] = None
    max_active_faults: Optional[int] = None
    # header-controlled faults (x-envoy-fault-*) are enabled by ``header_delay``/``header_abort``
    header_delay: bool = False
    header_abort: bool = False
    # the fault applies only to requests routed to this cluster ("" = any) ...
    upstream_cluster: str = ""
    # ... and only to requests whose headers all match (HeaderMatchSpec values; () = any request)
    headers: Tuple[Any, ...] = ()
    # FractionalPercent denominators of the delay / abort percentages (unit of the percentage headers)
    delay_percent_denominator: int = 100
    abort_percent_denominator: int = 100


@dataclass(frozen=True, slots=True)
class HttpFilterSpec:
    name: str
    type_name: str  # full proto message name of the typed config ("" when none)
    config: Any = None  # FaultSpec for the fault filter; None for the router
    disabled: bool = False  # HttpFilter.disabled: off unless a route's typed_per_filter_config enables it


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """A client-side (API) listener: an HttpConnectionManager with RDS or an inline route config."""

    name: str
    route_config_name: Optional[str]  # RDS resource name; None when the route config is inline
    inline_route_config: Optional[RouteConfigSpec]
    http_filters: Tuple[HttpFilterSpec, ...] = ()
    max_stream_duration: Optional[float] = None  # HCM common_http_protocol_options, seconds
    address: Optional[str] = None  # "ip:port" when the listener also has a socket address (Istio)
    # Which requests are internal (their x-envoy-* router headers honoured): the HCM's
    # use_remote_address, xff_num_trusted_hops and internal_address_config.cidr_ranges
    # (ipaddress networks; none: no address is internal, Envoy 1.40's default).
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    internal_cidrs: Tuple[Any, ...] = ()


# -- Cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """``circuit_breakers.thresholds`` for priority DEFAULT (Envoy defaults)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    # retry_budget: (budget_percent, min_retry_concurrency) or None
    retry_budget: Optional[Tuple[float, int]] = None


@dataclass(frozen=True, slots=True)
class OutlierDetectionSpec:
    """``config.cluster.v3.OutlierDetection`` with Envoy's defaults (times in seconds, percents 0..100)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    split_external_local_origin_errors: bool = False
    successful_active_health_check_uneject_host: bool = True
    always_eject_one_host: bool = False


@dataclass(frozen=True, slots=True)
class CertificateRef:
    """Where a TLS context's identity (certificate chain + key) or roots come from.

    ``kind`` is ``"provider"``: a bootstrap ``certificate_providers`` instance (``name``; A29's
    ``CertificateProviderPluginInstance``, ``certificate_name`` kept for the record: ``file_watcher``
    ignores it), or ``"sds"``: an SDS secret (``name``, Istio's ``default`` for the workload identity
    and ``ROOTCA`` for the roots), resolved from the mesh's certificate source.
    """

    kind: str
    name: str
    certificate_name: str = ""


@dataclass(frozen=True, slots=True)
class SanMatcherSpec:
    """One subject-alt-name matcher of a validation context.

    ``san_type`` is ``"DNS"``, ``"URI"``, ``"EMAIL"`` or ``"IP_ADDRESS"`` (typed
    ``match_typed_subject_alt_names``), or ``""`` for the deprecated untyped
    ``match_subject_alt_names``, which Envoy tries against the DNS, URI, email and IP SANs.
    ``matcher`` is a :class:`~meshcore._route_model.StringMatchSpec`; a DNS matcher of kind
    ``exact`` also accepts a wildcard SAN covering the value (RFC 6125, as Envoy does).
    """

    san_type: str
    matcher: StringMatchSpec


@dataclass(frozen=True, slots=True)
class UpstreamTlsSpec:
    """``envoy.transport_sockets.tls`` UpstreamTlsContext, reduced to what a client connection needs.

    ``roots`` is required (A29: no validation context, no TLS); ``identity`` is ``None`` for one-way
    TLS (Istio ``SIMPLE``). An empty ``san_matchers`` means no SAN check (chain validation only).
    ``alpn_protocols`` empty: the client offers Istio's values for its protocol (see
    :mod:`meshcore.tls.upstream`). Versions are ``"TLSv1_0"`` .. ``"TLSv1_3"`` or ``""`` for
    Envoy's client defaults (TLS 1.2 .. 1.3).
    """

    sni: str = ""
    identity: Optional[CertificateRef] = None
    roots: Optional[CertificateRef] = None
    san_matchers: Tuple[SanMatcherSpec, ...] = ()
    alpn_protocols: Tuple[str, ...] = ()
    min_version: str = ""
    max_version: str = ""
    cipher_suites: Tuple[str, ...] = ()
    auto_host_sni: bool = False
    auto_sni_san_validation: bool = False

    @property
    def certificate_provider_instance(self) -> str:
        """The identity's certificate provider instance name ("" when none or from SDS)."""
        ref = self.identity
        return ref.name if ref is not None and ref.kind == "provider" else ""

    @property
    def ca_provider_instance(self) -> str:
        """The roots' certificate provider instance name ("" when from SDS)."""
        ref = self.roots
        return ref.name if ref is not None and ref.kind == "provider" else ""


@dataclass(frozen=True, slots=True)
class DownstreamTlsSpec:
    """``envoy.transport_sockets.tls`` DownstreamTlsContext of a server (inbound) filter chain.

    ``identity`` (required) is the server's certificate chain and key; ``roots`` the CA bundle
    client certificates are verified with (``None``: no validation context, so no client
    certificate is asked for: plain TLS). ``require_client_certificate``: a connection without a
    (verified) client certificate is refused; it is never true without ``roots``. Empty
    ``san_matchers``: any client certificate that chains to ``roots`` is accepted (Istio's
    proxyless servers; Istio sidecars match ``spiffe://<trust domain>/`` prefixes).
    ``alpn_protocols`` empty: the server picks its own (``h2``/``http/1.1``). Versions are
    ``"TLSv1_0"`` .. ``"TLSv1_3"`` or ``""`` for the defaults. Decoded by
    :func:`meshcore.xds.server_listener.downstream_tls_spec` (A29's server rules).
    """

    identity: CertificateRef
    roots: Optional[CertificateRef] = None
    require_client_certificate: bool = False
    san_matchers: Tuple[SanMatcherSpec, ...] = ()
    alpn_protocols: Tuple[str, ...] = ()
    min_version: str = ""
    max_version: str = ""
    cipher_suites: Tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TransportSocketMatchSpec:
    """One ``Cluster.transport_socket_matches`` entry (Istio's auto-mTLS).

    ``match`` holds the sorted ``(key, value)`` pairs an endpoint's
    ``filter_metadata["envoy.transport_socket_match"]`` must all carry (empty: every endpoint);
    ``tls`` is ``None`` for ``raw_buffer`` (plaintext).
    """

    name: str
    match: Tuple[Tuple[str, Any], ...] = ()
    tls: Optional[UpstreamTlsSpec] = None


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One validated ``config.cluster.v3.Cluster``.

    ``kind`` is ``"EDS"``, ``"STATIC"``, ``"STRICT_DNS"``, ``"LOGICAL_DNS"`` or ``"AGGREGATE"``.
    ``eds_service_name`` is the ClusterLoadAssignment name to subscribe to (EDS only:
    ``eds_cluster_config.service_name`` or else the cluster name). ``policy``/``lb_options`` are
    the ``LoadBalancer`` arguments from the cluster alone; ``endpoints``/``endpoint_options``
    come from an inline ``load_assignment`` (non-EDS kinds; ``None`` for EDS and aggregate).
    ``aggregate_clusters`` is the ordered child list of an aggregate cluster (duplicates removed);
    its ``policy`` is ``"CLUSTER_PROVIDED"``: the children's own policies pick the endpoints.
    ``lb_options`` and ``endpoint_options`` are tuples of ``(name, value)`` pairs, sorted, so
    the spec is hashable and two specs with the same options compare equal.
    """

    name: str
    kind: str
    eds_service_name: str = ""
    policy: str = "ROUND_ROBIN"
    lb_options: Tuple[Tuple[str, Any], ...] = ()
    endpoints: Optional[Tuple[Endpoint, ...]] = None
    endpoint_options: Tuple[Tuple[str, Any], ...] = ()
    aggregate_clusters: Tuple[str, ...] = ()
    connect_timeout: float = 5.0
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    outlier_detection: Optional[OutlierDetectionSpec] = None
    tls: Optional[UpstreamTlsSpec] = None
    transport_socket_matches: Tuple[TransportSocketMatchSpec, ...] = ()
    http2: bool = False  # typed_extension_protocol_options asks for HTTP/2 upstream
    alt_stat_name: str = ""


@dataclass(frozen=True, slots=True)
class EndpointsSpec:
    """One validated ``config.endpoint.v3.ClusterLoadAssignment``.

    ``endpoint_options`` are the ``LoadBalancer`` options the assignment sets
    (``overprovisioning_factor``, ``weighted_priority_health``), sorted ``(name, value)`` pairs.
    """

    name: str  # the assignment's cluster_name (the EDS resource name)
    endpoints: Tuple[Endpoint, ...]
    endpoint_options: Tuple[Tuple[str, Any], ...] = ()
