"""Cluster (xDS v3) to :class:`~meshcore.xds.model.ClusterSpec`, with Envoy's and gRPC's validation.

:func:`cluster_spec` accepts an ``envoy.config.cluster.v3.Cluster`` message, an ``Any`` holding
one, or a proto3-JSON dict (camelCase or snake_case; only the fields read below are parsed, so
typed configs meshcore never reads need no registered descriptor). Every error is a
:class:`~meshcore.errors.ConfigError` naming the cluster and the snake_case field path; the first
error found is reported.

Kinds. ``type`` EDS, STATIC, STRICT_DNS or LOGICAL_DNS, or ``cluster_type`` whose
``typed_config`` is ``envoy.extensions.clusters.aggregate.v3.ClusterConfig`` (Envoy picks the
factory by that type; a ``cluster_type`` named ``envoy.clusters.aggregate`` without a config
counts as an empty one). ORIGINAL_DST and other custom cluster types are errors.

* EDS: ``eds_cluster_config.eds_config`` must be ``ads`` or ``self`` (gRPC; Envoy also takes
  ``api_config_source`` and files, which a client of one ADS server cannot follow). A missing
  ``eds_cluster_config`` or config source is an error, as in Envoy. ``eds_service_name`` is
  ``service_name`` or the cluster name (required for ``xdstp:`` cluster names, as gRPC does).
* STATIC / STRICT_DNS / LOGICAL_DNS: the inline ``load_assignment`` becomes ``endpoints`` through
  :func:`~meshcore.xds.lb_config.assignment_arguments` (Envoy's validation; STATIC addresses
  must be IP literals). None is an empty list, except for LOGICAL_DNS, which needs one host.
* Aggregate: ``clusters`` in order, at least one (Envoy's rule), duplicates dropped after their
  first occurrence (gRPC). Envoy requires ``lb_policy: CLUSTER_PROVIDED``; meshcore also accepts
  the default (ROUND_ROBIN, which is what gRPC control planes leave) and records
  ``policy="CLUSTER_PROVIDED"`` either way: the children's own policies pick the endpoints.
  Any other ``lb_policy`` or a ``load_balancing_policy`` is an error, as in Envoy.

Load balancing: :func:`~meshcore.xds.lb_config.cluster_lb_arguments` (its module docstring lists
what is supported). ``lb_options``/``endpoint_options`` are sorted ``(name, value)`` tuples.

Other fields, with Envoy's defaults and checks:

* ``connect_timeout``: 5 s when unset; must be > 0 and a valid duration.
* ``circuit_breakers``: the first ``thresholds`` entry with priority DEFAULT (HIGH is ignored):
  1024 connections / pending / requests, 3 retries; ``retry_budget`` becomes
  ``(budget_percent, min_retry_concurrency)`` with defaults 20.0 and 3, the percent in 0..100.
* ``outlier_detection``: every field with Envoy's default; ``interval``, ``base_ejection_time``
  and ``max_ejection_time`` must be > 0, ``max_ejection_time_jitter`` >= 0, the percentages
  (``max_ejection_percent``, ``enforcing_*``, ``failure_percentage_threshold``) <= 100, and
  ``max_ejection_time`` >= ``base_ejection_time``. An unset ``max_ejection_time`` is recorded as
  max(300 s, base_ejection_time), which is what Envoy 1.40 accepts. ``monitors`` is ignored.
* ``transport_socket``: ``UpstreamTlsContext`` -> :class:`UpstreamTlsSpec`, ``RawBuffer`` ->
  plaintext (``tls`` None), anything else (for example Istio's ``internal_upstream``) is an
  error; ``name`` and ``typed_config`` are required. ``transport_socket_matches`` (Istio's
  sidecar auto-mTLS) -> :class:`TransportSocketMatchSpec` each (``name`` required, ``match``
  as sorted hashable ``(key, value)`` pairs, the socket validated like ``transport_socket``).
  ``transport_socket_matcher`` (the matcher-tree form) is an error. TLS details below.
* ``typed_extension_protocol_options``: the ``HttpProtocolOptions`` entry (key
  ``envoy.extensions.upstreams.http.v3.HttpProtocolOptions`` or
  ``envoy.upstreams.http.http_protocol_options``) sets ``http2`` for an explicit
  ``http2_protocol_options``; explicit HTTP/3 is an error; ``use_downstream_protocol_config``
  and ``auto_config`` mean HTTP/1.1 here (there is no downstream, and ALPN is not modelled).
  Other keys are ignored (Envoy rejects names it has no extension for). The deprecated
  cluster-level ``http2_protocol_options`` also sets ``http2``.
* ``alt_stat_name`` is copied.

TLS (``UpstreamTlsContext``), Envoy's meaning with gRPC A29's limits (see :func:`_tls`):

* Identity (optional: none is one-way TLS): ``tls_certificate_provider_instance``, else the
  deprecated ``tls_certificate_certificate_provider_instance`` -> ``CertificateRef("provider",
  instance_name, certificate_name)``; else ``tls_certificate_sds_secret_configs`` (exactly one;
  Envoy refuses more for clients) -> ``CertificateRef("sds", name)`` (Istio: ``default``; the
  ``sds_config`` is not used, the mesh's certificate source resolves the name). Inline or file
  ``tls_certificates``, ``custom_handshaker``, ``custom_tls_certificate_selector`` and
  ``tls_certificate_certificate_provider`` are errors.
* Roots (required, A29): ``ca_certificate_provider_instance`` of ``validation_context`` or of
  ``combined_validation_context.default_validation_context``, else the deprecated
  ``validation_context_certificate_provider_instance`` (top level or in the combined context,
  as Istio's proxyless generator sends), else ``validation_context_sds_secret_config`` (top
  level or combined; Istio sidecars: ``ROOTCA``). ``trusted_ca``, ``watched_directory``,
  ``system_root_certs``, ``crl``, ``custom_validator_config``, ``max_verify_depth``,
  ``verify_certificate_spki``/``_hash``, ``require_signed_certificate_timestamp: true``,
  ``allow_expired_certificate: true`` and ``trust_chain_verification: ACCEPT_UNTRUSTED`` are
  errors (nothing may verify less than Envoy would). ``only_verify_leaf_cert_crl`` is ignored
  (meaningless without ``crl``).
* SAN matchers: ``match_typed_subject_alt_names`` (DNS, URI, EMAIL, IP_ADDRESS; OTHER_NAME and
  unspecified types are errors), else the deprecated untyped ``match_subject_alt_names`` (type
  ``""``: any SAN of those four types); full StringMatcher semantics (``_decode.string_matcher``).
* ``sni`` (at most 255 bytes), ``auto_host_sni``, ``auto_sni_san_validation``, ``alpn_protocols``
  (split on ``,``, empty entries dropped, as Envoy does; over 255 bytes is an error) and
  ``tls_params`` (min/max version, ``cipher_suites``; min above max is an error, and so is a
  cipher this OpenSSL does not accept alone, as Envoy refuses one BoringSSL does not; A29 NACKs
  ``tls_params`` but Envoy honours it and Istio's sidecar clusters set it) are recorded.
  ``ecdh_curves``, ``signature_algorithms``, ``compliance_policies``, ``key_log``,
  ``allow_renegotiation``, ``max_session_keys`` and ``enforce_rsa_key_usage`` are ignored.
* With ``providers`` (the bootstrap's ``certificate_providers`` names), a provider instance
  name it does not define is an error (A29).
"""

from __future__ import annotations

import functools
from typing import Any, Collection, Dict, List, Optional, Tuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from ..errors import ConfigError
from ._decode import seconds, string_matcher, unpack
from .lb_config import _CLUSTER_LB_FIELDS, _coerce, assignment_arguments, cluster_lb_arguments
from .model import (
    CertificateRef,
    CircuitBreakers,
    ClusterSpec,
    OutlierDetectionSpec,
    SanMatcherSpec,
    TransportSocketMatchSpec,
    UpstreamTlsSpec,
)
from .route_config import check_pgv

__all__ = ["cluster_spec"]

_Cluster = cluster_pb2.Cluster
_KINDS = {
    _Cluster.EDS: "EDS",
    _Cluster.STATIC: "STATIC",
    _Cluster.STRICT_DNS: "STRICT_DNS",
    _Cluster.LOGICAL_DNS: "LOGICAL_DNS",
}
_AGGREGATE_NAME = "envoy.clusters.aggregate"
_AGGREGATE = {aggregate_pb2.ClusterConfig.DESCRIPTOR.full_name: aggregate_pb2.ClusterConfig}
_TLS_NAME = tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
_RAW_NAME = raw_buffer_pb2.RawBuffer.DESCRIPTOR.full_name
_SOCKETS = {_TLS_NAME: tls_pb2.UpstreamTlsContext, _RAW_NAME: raw_buffer_pb2.RawBuffer}
_HPO = http_protocol_options_pb2.HttpProtocolOptions
_HPO_CLASSES = {_HPO.DESCRIPTOR.full_name: _HPO}
_HPO_KEYS = (_HPO.DESCRIPTOR.full_name, "envoy.upstreams.http.http_protocol_options")

# Cluster fields parsed from a dict (the rest is only checked to be a known field name).
_CLUSTER_FIELDS = _CLUSTER_LB_FIELDS | {
    "eds_cluster_config", "connect_timeout", "circuit_breakers", "outlier_detection",
    "transport_socket", "transport_socket_matches", "transport_socket_matcher", "typed_extension_protocol_options",
    "http2_protocol_options", "alt_stat_name",
}

_DEFAULT_BREAKERS = CircuitBreakers()
_PRIORITIES = frozenset({0, 1})  # RoutingPriority DEFAULT, HIGH
_BUDGET_PERCENT = 20.0
_MIN_RETRY_CONCURRENCY = 3

_OUTLIER_DEFAULTS = OutlierDetectionSpec()
# OutlierDetection fields (all UInt32Value) that Envoy's proto validation caps at 100.
_PERCENTS = frozenset({
    "max_ejection_percent", "enforcing_consecutive_5xx", "enforcing_success_rate",
    "enforcing_consecutive_gateway_failure", "enforcing_consecutive_local_origin_failure",
    "enforcing_local_origin_success_rate", "failure_percentage_threshold", "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
})
_POSITIVE_DURATIONS = frozenset({"interval", "base_ejection_time", "max_ejection_time"})
_DEFAULT_MAX_EJECTION_TIME = 300.0
_MODELLED = frozenset(OutlierDetectionSpec.__dataclass_fields__)  # type: ignore[attr-defined]


def cluster_spec(cluster: Any, providers: Optional[Collection[str]] = None) -> ClusterSpec:
    """Validate and convert a Cluster; raise ``ConfigError`` naming the field.

    ``providers``: the certificate provider instance names the bootstrap defines (its
    ``certificate_providers`` mapping will do); a TLS context naming another instance is an
    error (A29). ``None`` skips that check (resources from a file, no bootstrap).
    """
    c = _coerce(cluster, _Cluster, "name", "Cluster", trim=_CLUSTER_FIELDS)
    name = c.name
    if not name:
        raise ConfigError("Cluster", "name", "value length must be at least 1 characters")

    fields: Dict[str, Any] = {}
    if c.WhichOneof("cluster_discovery_type") == "cluster_type":
        kind = "AGGREGATE"
        fields["aggregate_clusters"] = _aggregate_children(c, name)
        fields["policy"] = _aggregate_policy(c, name)
    else:
        kind = _KINDS.get(c.type, "")
        if not kind:
            if c.type == _Cluster.ORIGINAL_DST:
                raise ConfigError(name, "type", "ORIGINAL_DST clusters are not supported")
            raise ConfigError(name, "type", f"unknown cluster type {c.type}")
        policy, lb_options = cluster_lb_arguments(c)
        fields["policy"] = policy
        if lb_options:
            fields["lb_options"] = tuple(sorted(lb_options.items()))
        if kind == "EDS":
            fields["eds_service_name"] = _eds_service_name(c, name)
        else:
            endpoints, endpoint_options = _inline_endpoints(c, name)
            fields["endpoints"] = tuple(endpoints)
            if endpoint_options:
                fields["endpoint_options"] = tuple(sorted(endpoint_options.items()))

    if c.HasField("connect_timeout"):
        fields["connect_timeout"] = seconds(c.connect_timeout, name, "connect_timeout", positive=True)
    if c.HasField("circuit_breakers"):
        fields["circuit_breakers"] = _circuit_breakers(c.circuit_breakers, name)
    if c.HasField("outlier_detection"):
        fields["outlier_detection"] = _outlier_detection(c.outlier_detection, name)
    if c.HasField("transport_socket"):
        fields["tls"] = _transport_socket(c.transport_socket, name, "transport_socket", providers)
    if len(c.transport_socket_matches):
        fields["transport_socket_matches"] = _socket_matches(c, name, providers)
    if c.HasField("transport_socket_matcher"):
        raise ConfigError(name, "transport_socket_matcher", "not supported (use transport_socket_matches)")
    if c.HasField("http2_protocol_options") or len(c.typed_extension_protocol_options):
        fields["http2"] = _http2(c, name)
    if c.alt_stat_name:
        fields["alt_stat_name"] = c.alt_stat_name
    check_pgv(c, name)  # Envoy's proto validation and duration checks, after the specific ones
    return ClusterSpec(name=name, kind=kind, **fields)


# -- discovery ----------------------------------------------------------------------------------


def _aggregate_children(c: Any, name: str) -> Tuple[str, ...]:
    ct = c.cluster_type
    if ct.HasField("typed_config"):
        config, type_name = unpack(ct.typed_config, _AGGREGATE, name, "cluster_type.typed_config")
        if config is None:
            raise ConfigError(
                name, "cluster_type", f"custom cluster type {ct.name!r} ({type_name}) is not supported"
            )
    elif ct.name == _AGGREGATE_NAME:
        config = aggregate_pb2.ClusterConfig()
    else:
        raise ConfigError(name, "cluster_type", f"custom cluster type {ct.name!r} is not supported")
    if not len(config.clusters):
        raise ConfigError(name, "cluster_type.typed_config.clusters", "value must contain at least 1 item(s)")
    return tuple(dict.fromkeys(config.clusters))  # ordered; duplicates keep their first place


def _aggregate_policy(c: Any, name: str) -> str:
    if c.HasField("load_balancing_policy"):
        raise ConfigError(
            name, "load_balancing_policy",
            "an aggregate cluster's load balancing is provided by its clusters; use lb_policy CLUSTER_PROVIDED",
        )
    if c.lb_policy not in (_Cluster.CLUSTER_PROVIDED, _Cluster.ROUND_ROBIN):
        got = _Cluster.LbPolicy.Name(c.lb_policy) if c.lb_policy in _Cluster.LbPolicy.values() else c.lb_policy
        raise ConfigError(name, "lb_policy", f"an aggregate cluster needs lb_policy CLUSTER_PROVIDED, got {got}")
    return "CLUSTER_PROVIDED"


def _eds_service_name(c: Any, name: str) -> str:
    if not c.HasField("eds_cluster_config"):
        raise ConfigError(name, "eds_cluster_config", "cannot create an EDS cluster without an EDS config")
    eds = c.eds_cluster_config
    source = eds.eds_config.WhichOneof("config_source_specifier")
    if source not in ("ads", "self"):
        raise ConfigError(
            name, "eds_cluster_config.eds_config" + (f".{source}" if source else ""),
            f"the EDS config source must be ads or self, got {source or 'none'}",
        )
    if eds.service_name:
        return eds.service_name
    if name.startswith("xdstp:"):
        raise ConfigError(name, "eds_cluster_config.service_name", "required for an xdstp: cluster name")
    return name


def _inline_endpoints(c: Any, name: str) -> Tuple[List[Any], Dict[str, Any]]:
    if not c.HasField("load_assignment"):
        if c.type == _Cluster.LOGICAL_DNS:
            raise ConfigError(name, "load_assignment", "LOGICAL_DNS clusters must have a single host")
        return [], {}
    return assignment_arguments(c.load_assignment, name, c.type, field_prefix="load_assignment.")


# -- circuit breakers and outlier detection -----------------------------------------------------


def _circuit_breakers(cb: Any, name: str) -> CircuitBreakers:
    chosen = None
    for i, t in enumerate(cb.thresholds):
        if t.priority not in _PRIORITIES:
            raise ConfigError(
                name, f"circuit_breakers.thresholds[{i}].priority", "value must be one of the defined enum values"
            )
        if chosen is None and t.priority == 0:
            chosen = (i, t)
    if chosen is None:
        return _DEFAULT_BREAKERS
    i, t = chosen
    d = _DEFAULT_BREAKERS
    budget = None
    if t.HasField("retry_budget"):
        rb = t.retry_budget
        percent = rb.budget_percent.value if rb.HasField("budget_percent") else _BUDGET_PERCENT
        if not 0.0 <= percent <= 100.0:  # also rejects NaN
            raise ConfigError(
                name, f"circuit_breakers.thresholds[{i}].retry_budget.budget_percent.value",
                "value must be inside range [0, 100]",
            )
        concurrency = rb.min_retry_concurrency.value if rb.HasField("min_retry_concurrency") else _MIN_RETRY_CONCURRENCY
        budget = (percent, concurrency)
    return CircuitBreakers(
        max_connections=t.max_connections.value if t.HasField("max_connections") else d.max_connections,
        max_pending_requests=(
            t.max_pending_requests.value if t.HasField("max_pending_requests") else d.max_pending_requests
        ),
        max_requests=t.max_requests.value if t.HasField("max_requests") else d.max_requests,
        max_retries=t.max_retries.value if t.HasField("max_retries") else d.max_retries,
        retry_budget=budget,
    )


def _outlier_detection(od: Any, name: str) -> OutlierDetectionSpec:
    values: Dict[str, Any] = {}
    for fd, value in od.ListFields():  # only the fields that are set
        field = fd.name
        if field not in _MODELLED:
            continue  # monitors
        path = f"outlier_detection.{field}"
        if fd.message_type is None:  # split_external_local_origin_errors (plain bool)
            values[field] = value
        elif fd.message_type.full_name == "google.protobuf.Duration":
            values[field] = seconds(value, name, path, positive=field in _POSITIVE_DURATIONS)
        else:  # UInt32Value / BoolValue
            v = value.value
            if field in _PERCENTS and v > 100:
                raise ConfigError(name, f"{path}.value", "value must be less than or equal to 100")
            values[field] = v
    base = values.get("base_ejection_time", _OUTLIER_DEFAULTS.base_ejection_time)
    if "max_ejection_time" in values:
        if values["max_ejection_time"] < base:
            raise ConfigError(
                name, "outlier_detection.max_ejection_time",
                "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
            )
    else:
        values["max_ejection_time"] = max(_DEFAULT_MAX_EJECTION_TIME, base)
    return OutlierDetectionSpec(**values)


# -- transport sockets ----------------------------------------------------------------------------

_TLS_VERSIONS = {0: "", 1: "TLSv1_0", 2: "TLSv1_1", 3: "TLSv1_2", 4: "TLSv1_3"}  # TlsParameters.TlsProtocol
_SAN_TYPES = {1: "EMAIL", 2: "DNS", 3: "URI", 4: "IP_ADDRESS"}  # SubjectAltNameMatcher.SanType
_OTHER_NAME = 5
_ACCEPT_UNTRUSTED = 1  # CertificateValidationContext.TrustChainVerification
_ROOTS_ONLY_FROM = "roots come only from ca_certificate_provider_instance or an SDS validation context secret"
_NO_TRUSTED_CA_SAN = "SAN-based verification of peer certificates without trusted CA is insecure and not allowed"
_UNSUPPORTED_COMMON = {
    "custom_handshaker": "custom handshakers are not supported (gRPC A29)",
    "custom_tls_certificate_selector": "custom TLS certificate selectors are not supported",
    "tls_certificate_certificate_provider": "not supported (use tls_certificate_provider_instance)",
}
_UNSUPPORTED_VALIDATION = {
    "trusted_ca": f"inline or file CA certificates are not supported: {_ROOTS_ONLY_FROM}",
    "watched_directory": f"not supported: {_ROOTS_ONLY_FROM}",
    "system_root_certs": f"system root certificates are not supported: {_ROOTS_ONLY_FROM}",
    "crl": "certificate revocation lists are not supported (gRPC A29)",
    "custom_validator_config": "custom certificate validators are not supported (gRPC A29)",
    "max_verify_depth": "not supported: the certificate chain depth cannot be limited",
}
_UNSUPPORTED_VALIDATION_LISTS = {
    "verify_certificate_spki": "certificate pinning is not supported (gRPC A29)",
    "verify_certificate_hash": "certificate pinning is not supported (gRPC A29)",
}


def _transport_socket(
    ts: Any, name: str, path: str, providers: Optional[Collection[str]]
) -> Optional[UpstreamTlsSpec]:
    """A ``TransportSocket``: ``UpstreamTlsContext`` -> :class:`UpstreamTlsSpec`, ``RawBuffer`` ->
    ``None`` (plaintext); anything else is an error."""
    if not ts.name:
        raise ConfigError(name, f"{path}.name", "value length must be at least 1 characters")
    if not ts.HasField("typed_config"):
        raise ConfigError(
            name, f"{path}.typed_config", f"Didn't find a registered implementation for {ts.name!r}"
        )
    msg, type_name = unpack(ts.typed_config, _SOCKETS, name, f"{path}.typed_config")
    if msg is None:
        raise ConfigError(
            name, f"{path}.typed_config",
            f"unsupported transport socket {type_name} (supported: UpstreamTlsContext, RawBuffer)",
        )
    if type_name == _RAW_NAME:
        return None
    return _tls(msg, name, f"{path}.typed_config", providers)


def _socket_matches(c: Any, name: str, providers: Optional[Collection[str]]) -> Tuple[TransportSocketMatchSpec, ...]:
    out = []
    for i, m in enumerate(c.transport_socket_matches):
        path = f"transport_socket_matches[{i}]"
        if not m.name:
            raise ConfigError(name, f"{path}.name", "value length must be at least 1 characters")
        tls = _transport_socket(m.transport_socket, name, f"{path}.transport_socket", providers)
        out.append(TransportSocketMatchSpec(m.name, _frozen(json_format.MessageToDict(m.match)), tls))
    return tuple(out)


def _frozen(value: Any) -> Any:
    """A JSON value (from a ``Struct``) as a hashable one: objects -> key-sorted ``(key, value)``
    tuples, lists -> tuples."""
    if isinstance(value, dict):
        return tuple(sorted(((k, _frozen(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _tls(ctx: Any, name: str, path: str, providers: Optional[Collection[str]]) -> UpstreamTlsSpec:
    """``UpstreamTlsContext`` -> :class:`UpstreamTlsSpec` (Envoy's meaning, gRPC A29's limits).

    Identity: ``tls_certificate_provider_instance``, else the deprecated
    ``tls_certificate_certificate_provider_instance``, else the one
    ``tls_certificate_sds_secret_configs`` entry (by name; its ``sds_config`` is not used: the
    mesh's certificate source resolves the name); none is one-way TLS. Roots: see
    :func:`_roots`. ``providers`` (instance names from the bootstrap, ``None`` = unchecked)
    makes an unknown provider instance name an error (A29).
    """
    sni = ctx.sni
    if len(sni.encode("utf-8", "surrogatepass")) > 255:
        raise ConfigError(name, f"{path}.sni", "value length must be at most 255 bytes")
    common = ctx.common_tls_context
    cpath = f"{path}.common_tls_context"
    for field, reason in _UNSUPPORTED_COMMON.items():
        if common.HasField(field):
            raise ConfigError(name, f"{cpath}.{field}", reason)
    if len(common.tls_certificates):
        raise ConfigError(
            name, f"{cpath}.tls_certificates",
            "inline or file certificates are not supported: meshcore takes the identity only from a "
            "certificate provider instance (tls_certificate_provider_instance) or an SDS secret name "
            "(tls_certificate_sds_secret_configs)",
        )
    fields: Dict[str, Any] = {}
    if common.HasField("tls_params"):  # (first: Envoy refuses unknown cipher suites whatever else)
        fields.update(_tls_params(common.tls_params, name, f"{cpath}.tls_params"))
    identity = _identity(common, name, cpath, providers)
    roots, san_matchers = _roots(common, name, cpath, providers)
    alpn = _alpn(common.alpn_protocols, name, f"{cpath}.alpn_protocols")
    return UpstreamTlsSpec(
        sni=sni, identity=identity, roots=roots, san_matchers=san_matchers, alpn_protocols=alpn,
        auto_host_sni=ctx.auto_host_sni, auto_sni_san_validation=ctx.auto_sni_san_validation, **fields,
    )


def _identity(common: Any, name: str, cpath: str, providers: Optional[Collection[str]]) -> Optional[CertificateRef]:
    for field in ("tls_certificate_provider_instance", "tls_certificate_certificate_provider_instance"):
        if common.HasField(field):
            return _provider(getattr(common, field), name, f"{cpath}.{field}", providers)
    sds = common.tls_certificate_sds_secret_configs
    if len(sds) > 1:
        raise ConfigError(name, f"{cpath}.tls_certificate_sds_secret_configs",
                          "Multiple TLS certificates are not supported for client contexts")
    if len(sds) == 1:
        return _sds(sds[0], name, f"{cpath}.tls_certificate_sds_secret_configs[0]")
    return None


def _provider(instance: Any, name: str, path: str, providers: Optional[Collection[str]]) -> CertificateRef:
    """A ``CertificateProviderPluginInstance`` (or the deprecated ``CertificateProviderInstance``)."""
    instance_name = instance.instance_name
    if not instance_name:
        raise ConfigError(name, f"{path}.instance_name", "value length must be at least 1 characters")
    if providers is not None and instance_name not in providers:
        raise ConfigError(name, f"{path}.instance_name",
                          f'unrecognized certificate provider instance name: "{instance_name}"')
    return CertificateRef("provider", instance_name, instance.certificate_name)


def _sds(config: Any, name: str, path: str) -> CertificateRef:
    if not config.name:
        raise ConfigError(name, f"{path}.name", "value length must be at least 1 characters")
    return CertificateRef("sds", config.name)


def _roots(
    common: Any, name: str, cpath: str, providers: Optional[Collection[str]]
) -> Tuple[CertificateRef, Tuple[SanMatcherSpec, ...]]:
    """The roots and SAN matchers of a CommonTlsContext's ``validation_context_type``.

    ``validation_context`` (roots from its ``ca_certificate_provider_instance``),
    ``combined_validation_context`` (roots from ``default_validation_context``'s
    ``ca_certificate_provider_instance``, else the deprecated
    ``validation_context_certificate_provider_instance``, else ``validation_context_sds_secret_config``),
    or the top-level deprecated ``validation_context_certificate_provider_instance`` or
    ``validation_context_sds_secret_config`` (roots only). No roots is an error (A29; Envoy
    refuses SAN matchers without a trusted CA).
    """
    which = common.WhichOneof("validation_context_type")
    vpath = f"{cpath}.{which}"
    if which == "validation_context_certificate_provider_instance":
        return _provider(common.validation_context_certificate_provider_instance, name, vpath, providers), ()
    if which == "validation_context_sds_secret_config":
        return _sds(common.validation_context_sds_secret_config, name, vpath), ()
    if which == "validation_context_certificate_provider":
        raise ConfigError(name, vpath, "not supported (use ca_certificate_provider_instance)")
    roots: Optional[CertificateRef] = None
    sans: Tuple[SanMatcherSpec, ...] = ()
    if which == "validation_context":
        roots, sans = _validation_context(common.validation_context, name, vpath, providers)
    elif which == "combined_validation_context":
        combined = common.combined_validation_context
        if combined.HasField("validation_context_certificate_provider"):
            raise ConfigError(name, f"{vpath}.validation_context_certificate_provider",
                              "not supported (use ca_certificate_provider_instance)")
        roots, sans = _validation_context(combined.default_validation_context, name,
                                          f"{vpath}.default_validation_context", providers)
        if roots is None and combined.HasField("validation_context_certificate_provider_instance"):
            roots = _provider(combined.validation_context_certificate_provider_instance, name,
                              f"{vpath}.validation_context_certificate_provider_instance", providers)
        if roots is None and combined.HasField("validation_context_sds_secret_config"):
            roots = _sds(combined.validation_context_sds_secret_config, name,
                         f"{vpath}.validation_context_sds_secret_config")
    if roots is None:
        if sans:
            raise ConfigError(name, vpath, _NO_TRUSTED_CA_SAN)
        raise ConfigError(
            name, cpath if which is None else vpath,
            "no root certificates: a client needs a validation context with ca_certificate_provider_instance "
            "or an SDS validation context secret (gRPC A29)",
        )
    return roots, sans


def _validation_context(
    vc: Any, name: str, path: str, providers: Optional[Collection[str]]
) -> Tuple[Optional[CertificateRef], Tuple[SanMatcherSpec, ...]]:
    """``(roots from ca_certificate_provider_instance or None, SAN matchers)`` of a
    CertificateValidationContext; whatever would verify less than Envoy is an error."""
    for field, reason in _UNSUPPORTED_VALIDATION.items():
        if vc.HasField(field):
            raise ConfigError(name, f"{path}.{field}", reason)
    for field, reason in _UNSUPPORTED_VALIDATION_LISTS.items():
        if len(getattr(vc, field)):
            raise ConfigError(name, f"{path}.{field}", reason)
    if vc.require_signed_certificate_timestamp.value:
        raise ConfigError(name, f"{path}.require_signed_certificate_timestamp",
                          "signed certificate timestamps are not supported (gRPC A29)")
    if vc.allow_expired_certificate:
        raise ConfigError(name, f"{path}.allow_expired_certificate",
                          "accepting expired certificates is not supported: peer certificates are always fully verified")
    if vc.trust_chain_verification:
        if vc.trust_chain_verification == _ACCEPT_UNTRUSTED:
            raise ConfigError(name, f"{path}.trust_chain_verification",
                              "ACCEPT_UNTRUSTED is not supported: peer certificates are always verified")
        raise ConfigError(name, f"{path}.trust_chain_verification",
                          f"value must be one of the defined enum values (got {vc.trust_chain_verification})")
    roots = None
    if vc.HasField("ca_certificate_provider_instance"):
        roots = _provider(vc.ca_certificate_provider_instance, name, f"{path}.ca_certificate_provider_instance",
                          providers)
    sans = []
    if len(vc.match_typed_subject_alt_names):  # the untyped list is then ignored (Envoy)
        for i, m in enumerate(vc.match_typed_subject_alt_names):
            sans.append(_typed_san(m, name, f"{path}.match_typed_subject_alt_names[{i}]"))
    else:
        for i, m in enumerate(vc.match_subject_alt_names):
            sans.append(SanMatcherSpec("", string_matcher(m, name, f"{path}.match_subject_alt_names[{i}]")))
    return roots, tuple(sans)


def _typed_san(m: Any, name: str, path: str) -> SanMatcherSpec:
    san_type = _SAN_TYPES.get(m.san_type)
    if san_type is None:
        if m.san_type == 0:
            reason = "a SAN type is required (SAN_TYPE_UNSPECIFIED)"
        elif m.san_type == _OTHER_NAME:
            reason = "OTHER_NAME subject alt name matchers are not supported"
        else:
            reason = f"value must be one of the defined enum values (got {m.san_type})"
        raise ConfigError(name, f"{path}.san_type", reason)
    if not m.HasField("matcher"):
        raise ConfigError(name, f"{path}.matcher", "value is required")
    return SanMatcherSpec(san_type, string_matcher(m.matcher, name, f"{path}.matcher"))


def _tls_params(tp: Any, name: str, path: str) -> Dict[str, Any]:
    """``min_version``/``max_version``/``cipher_suites`` of TlsParameters. ``ecdh_curves``,
    ``signature_algorithms`` and ``compliance_policies`` are accepted and ignored (the TLS
    library's defaults apply)."""
    versions = []
    for field in ("tls_minimum_protocol_version", "tls_maximum_protocol_version"):
        v = getattr(tp, field)
        if v not in _TLS_VERSIONS:
            raise ConfigError(name, f"{path}.{field}", f"value must be one of the defined enum values (got {v})")
        versions.append(v)
    low, high = versions
    if low and high and low > high:
        raise ConfigError(
            name, f"{path}.tls_minimum_protocol_version",
            f"minimum TLS version {_TLS_VERSIONS[low]} is above the maximum {_TLS_VERSIONS[high]}",
        )
    suites = tuple(tp.cipher_suites)
    rejected = [c for s in suites for c in s.strip("[]").split("|") if c and not _cipher_known(c)]
    if rejected:  # Envoy refuses the context; meshcore cannot honour a suite OpenSSL does not know
        raise ConfigError(name, f"{path}.cipher_suites",
                          f"Failed to initialize cipher suites {':'.join(suites)}. The following ciphers were "
                          f"rejected when tried individually: {', '.join(rejected)}")
    return {"min_version": _TLS_VERSIONS[low], "max_version": _TLS_VERSIONS[high], "cipher_suites": suites}


@functools.lru_cache(maxsize=256)
def _cipher_known(cipher: str) -> bool:
    """Whether this process's OpenSSL accepts ``cipher`` alone (Envoy tries each one so too; TLS 1.3
    suite names are not cipher-list entries there either)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(cipher)
    except (ssl.SSLError, ValueError):
        return False
    return True


def _alpn(protocols: Any, name: str, path: str) -> Tuple[str, ...]:
    """Envoy joins ``alpn_protocols`` with ``,`` and splits the result again, dropping empty
    entries; a protocol of more than 255 bytes is an error."""
    out = []
    for i, entry in enumerate(protocols):
        for protocol in entry.split(","):
            if len(protocol.encode("utf-8", "surrogatepass")) > 255:
                raise ConfigError(name, f"{path}[{i}]", "Invalid ALPN protocol string (more than 255 bytes)")
            if protocol:
                out.append(protocol)
    return tuple(out)


# -- protocol options -----------------------------------------------------------------------------


def _http2(c: Any, name: str) -> bool:
    http2 = c.HasField("http2_protocol_options")  # deprecated cluster-level field
    options = c.typed_extension_protocol_options
    for key in _HPO_KEYS:
        if key not in options:
            continue
        path = f"typed_extension_protocol_options[{key}]"
        hpo, type_name = unpack(options[key], _HPO_CLASSES, name, path)
        if hpo is None:
            raise ConfigError(name, path, f"expected {_HPO.DESCRIPTOR.full_name}, got {type_name}")
        which = hpo.WhichOneof("upstream_protocol_options")
        if which is None:
            raise ConfigError(name, path, "upstream_protocol_options is required")
        if which == "explicit_http_config":
            protocol = hpo.explicit_http_config.WhichOneof("protocol_config")
            if protocol is None:
                raise ConfigError(name, f"{path}.explicit_http_config", "protocol_config is required")
            if protocol == "http3_protocol_options":
                raise ConfigError(
                    name, f"{path}.explicit_http_config.http3_protocol_options", "HTTP/3 is not supported"
                )
            http2 = protocol == "http2_protocol_options"
        else:
            http2 = False
    return http2
