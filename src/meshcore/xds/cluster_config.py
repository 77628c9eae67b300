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
* ``transport_socket``: ``UpstreamTlsContext`` -> :class:`UpstreamTlsSpec` (see :func:`_tls`),
  ``RawBuffer`` -> plaintext, anything else (for example Istio's ``internal_upstream``) is an
  error. ``transport_socket_matches`` is ignored: gRPC NACKs it, but Istio's Envoy-sidecar
  clusters carry it (auto-mTLS by endpoint ``tlsMode`` metadata, with SDS certificates meshcore
  cannot load anyway), and ignoring it means always taking the plaintext fallback. Istio's
  proxyless generator sets ``transport_socket`` instead.
* ``typed_extension_protocol_options``: the ``HttpProtocolOptions`` entry (key
  ``envoy.extensions.upstreams.http.v3.HttpProtocolOptions`` or
  ``envoy.upstreams.http.http_protocol_options``) sets ``http2`` for an explicit
  ``http2_protocol_options``; explicit HTTP/3 is an error; ``use_downstream_protocol_config``
  and ``auto_config`` mean HTTP/1.1 here (there is no downstream, and ALPN is not modelled).
  Other keys are ignored (Envoy rejects names it has no extension for). The deprecated
  cluster-level ``http2_protocol_options`` also sets ``http2``.
* ``alt_stat_name`` is copied.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from ..errors import ConfigError
from ._decode import seconds, unpack
from .lb_config import _CLUSTER_LB_FIELDS, _coerce, assignment_arguments, cluster_lb_arguments
from .model import CircuitBreakers, ClusterSpec, OutlierDetectionSpec, UpstreamTlsSpec
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
    "transport_socket", "typed_extension_protocol_options", "http2_protocol_options", "alt_stat_name",
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


def cluster_spec(cluster: Any) -> ClusterSpec:
    """Validate and convert a Cluster; raise ``ConfigError`` naming the field."""
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
        fields["tls"] = _transport_socket(c.transport_socket, name)
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


# -- transport socket and protocol options ------------------------------------------------------


def _transport_socket(ts: Any, name: str) -> Optional[UpstreamTlsSpec]:
    if not ts.name:
        raise ConfigError(name, "transport_socket.name", "value length must be at least 1 characters")
    if not ts.HasField("typed_config"):
        raise ConfigError(
            name, "transport_socket.typed_config", f"Didn't find a registered implementation for {ts.name!r}"
        )
    msg, type_name = unpack(ts.typed_config, _SOCKETS, name, "transport_socket.typed_config")
    if msg is None:
        raise ConfigError(
            name, "transport_socket.typed_config",
            f"unsupported transport socket {type_name} (supported: UpstreamTlsContext, RawBuffer)",
        )
    if type_name == _RAW_NAME:
        return None
    return _tls(msg, name, "transport_socket.typed_config")


def _tls(ctx: Any, name: str, path: str) -> UpstreamTlsSpec:
    """``UpstreamTlsContext`` -> :class:`UpstreamTlsSpec`, following gRPC's client rules (A29).

    Certificates come only from certificate provider instances (named in the bootstrap's
    ``certificate_providers``; the caller checks the names exist): the identity from
    ``tls_certificate_provider_instance`` (or the deprecated
    ``tls_certificate_certificate_provider_instance``), the roots from the validation context's
    ``ca_certificate_provider_instance`` (or the deprecated
    ``validation_context_certificate_provider_instance``, as Istio's proxyless generator sends).
    A root provider is required. SDS, inline or file certificates, ``tls_params``,
    ``custom_handshaker``, custom validators, SPKI/hash pins, CRLs, signed-certificate-timestamp
    checks and typed SAN matchers are errors; SAN matchers must be ``exact`` (case-sensitive).
    ``sni`` is limited to 255 bytes (Envoy).
    """
    sni = ctx.sni
    if len(sni.encode()) > 255:
        raise ConfigError(name, f"{path}.sni", "value length must be at most 255 bytes")
    common = ctx.common_tls_context
    cpath = f"{path}.common_tls_context"
    for field in ("tls_certificates", "tls_certificate_sds_secret_configs"):
        if len(getattr(common, field)):
            raise ConfigError(
                name, f"{cpath}.{field}",
                "only certificate provider instances are supported (tls_certificate_provider_instance)",
            )
    for field in ("tls_params", "custom_handshaker", "custom_tls_certificate_selector",
                  "tls_certificate_certificate_provider"):
        if common.HasField(field):
            raise ConfigError(name, f"{cpath}.{field}", "not supported")

    identity = ""
    for field in ("tls_certificate_provider_instance", "tls_certificate_certificate_provider_instance"):
        if common.HasField(field):
            identity = _instance(getattr(common, field), name, f"{cpath}.{field}")
            break

    roots = ""
    sans: Tuple[str, ...] = ()
    which = common.WhichOneof("validation_context_type")
    vpath = f"{cpath}.{which}"
    if which == "validation_context":
        roots, sans = _validation_context(common.validation_context, name, vpath)
    elif which == "combined_validation_context":
        combined = common.combined_validation_context
        if combined.HasField("validation_context_sds_secret_config"):
            raise ConfigError(name, f"{vpath}.validation_context_sds_secret_config", "SDS is not supported")
        if combined.HasField("validation_context_certificate_provider"):
            raise ConfigError(name, f"{vpath}.validation_context_certificate_provider", "not supported")
        roots, sans = _validation_context(combined.default_validation_context, name,
                                          f"{vpath}.default_validation_context")
        if not roots and combined.HasField("validation_context_certificate_provider_instance"):
            roots = _instance(combined.validation_context_certificate_provider_instance, name,
                              f"{vpath}.validation_context_certificate_provider_instance")
    elif which == "validation_context_certificate_provider_instance":
        roots = _instance(common.validation_context_certificate_provider_instance, name, vpath)
    elif which is not None:
        raise ConfigError(name, vpath, "not supported (use a certificate provider instance)")
    if not roots:
        raise ConfigError(
            name, cpath, "a CA certificate provider instance is required "
            "(validation_context.ca_certificate_provider_instance)",
        )
    return UpstreamTlsSpec(sni=sni, certificate_provider_instance=identity, ca_provider_instance=roots,
                           match_subject_alt_names=sans)


def _instance(instance: Any, name: str, path: str) -> str:
    if not instance.instance_name:
        raise ConfigError(name, f"{path}.instance_name", "value length must be at least 1 characters")
    return instance.instance_name


_UNSUPPORTED_VALIDATION = (
    "trusted_ca", "watched_directory", "crl", "custom_validator_config", "system_root_certs",
)
_UNSUPPORTED_VALIDATION_LISTS = (
    "verify_certificate_spki", "verify_certificate_hash", "match_typed_subject_alt_names",
)


def _validation_context(vc: Any, name: str, path: str) -> Tuple[str, Tuple[str, ...]]:
    """``(root provider instance name or "", exact SAN values)`` of a CertificateValidationContext."""
    for field in _UNSUPPORTED_VALIDATION:
        if vc.HasField(field):
            raise ConfigError(name, f"{path}.{field}", "not supported (use ca_certificate_provider_instance)")
    for field in _UNSUPPORTED_VALIDATION_LISTS:
        if len(getattr(vc, field)):
            raise ConfigError(name, f"{path}.{field}", "not supported")
    if vc.HasField("require_signed_certificate_timestamp") and vc.require_signed_certificate_timestamp.value:
        raise ConfigError(name, f"{path}.require_signed_certificate_timestamp", "not supported")
    roots = ""
    if vc.HasField("ca_certificate_provider_instance"):
        roots = _instance(vc.ca_certificate_provider_instance, name, f"{path}.ca_certificate_provider_instance")
    sans = []
    for i, m in enumerate(vc.match_subject_alt_names):
        if m.WhichOneof("match_pattern") != "exact" or m.ignore_case:
            raise ConfigError(name, f"{path}.match_subject_alt_names[{i}]",
                              "only exact, case-sensitive subject alt name matchers are supported")
        sans.append(m.exact)
    return roots, tuple(sans)


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
