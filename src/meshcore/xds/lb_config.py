"""Cluster + ClusterLoadAssignment (xDS v3) to ``LoadBalancer`` arguments.

:func:`load_balancer_arguments` turns an ``envoy.config.cluster.v3.Cluster`` and an
``envoy.config.endpoint.v3.ClusterLoadAssignment`` into ``(endpoints, policy, options)`` for
``LoadBalancer(endpoints, policy=policy, **options)``. ``LoadBalancer.from_xds`` calls it. Each
input may be a message (or a ``google.protobuf.Any`` holding one) or a proto3-JSON dict, in
camelCase or snake_case, optionally with an ``@type`` key as config dumps write it. Dicts go
through ``json_format.ParseDict``. Only the load-balancing fields of a Cluster dict are parsed, so
typed configs we never read (transport sockets, Istio's ``filters``) need no registered
descriptor. Unknown top-level keys are still rejected, and an ``Any`` of an unregistered type
inside the parsed part is kept as a ``TypedStruct``. Every error is a
:class:`~meshcore.errors.ConfigError` naming the resource (the cluster name, or for a separate
assignment its ``cluster_name``) and the snake_case field path.

The two halves are also available separately, for decoders that receive the resources one at a
time (``cluster_config``, ``endpoint_config``): :func:`cluster_lb_arguments` gives the cluster's
``(policy, options)`` and :func:`assignment_arguments` an assignment's ``(endpoints,
endpoint_options)``. :func:`assignment_arguments` is the stricter of the two: it also applies
Envoy's proto-validation limits and requires IP literals for STATIC and EDS (see its docstring).

Policy (Envoy 1.40 precedence):

* ``load_balancing_policy`` wins over ``lb_policy``. The first entry in ``policies`` that meshcore
  supports is used. Envoy and gRPC do the same with the extensions they have. Supported:
  ``round_robin``, ``least_request`` (``choice_count``, ``active_request_bias.default_value``),
  ``random``, ``ring_hash`` (ring sizes, ``use_hostname_for_hashing`` from
  ``consistent_hashing_lb_config`` when that is set, else the deprecated top-level field),
  ``maglev`` (``table_size``, ``consistent_hashing_lb_config``), and ``wrr_locality`` wrapping
  one of these, which becomes that child policy with ``locality_weighted=True``. Locality
  weighting comes from ``locality_lb_config.locality_weighted_lb_config`` (RR, LR, random) or
  ``locality_weighted_lb_config`` (ring hash, Maglev). Entries we do not support are skipped:
  ``client_side_weighted_round_robin``, ``override_host`` (its header or metadata override would
  change picks; we do not silently drop to its ``fallback_policy``), ``subset``, ``pick_first``,
  ``cluster_provided``, custom and ``TypedStruct`` ones, and ``wrr_locality`` over an unsupported
  child. If nothing is left, the error is on ``load_balancing_policy``.
* Otherwise ``lb_policy`` is used: ROUND_ROBIN, LEAST_REQUEST (``least_request_lb_config``),
  RANDOM, RING_HASH (``ring_hash_lb_config``) and MAGLEV (``maglev_lb_config``), together with
  ``common_lb_config.locality_weighted_lb_config`` and
  ``common_lb_config.consistent_hashing_lb_config``. This is Envoy's legacy-to-typed
  conversion. CLUSTER_PROVIDED and LOAD_BALANCING_POLICY_CONFIG (without a
  ``load_balancing_policy``) are errors.
* ``common_lb_config.healthy_panic_threshold`` applies on both paths. The other
  ``common_lb_config`` locality and hashing fields apply only to ``lb_policy``. With typed
  policies Envoy ignores them as well.

Endpoints: ``LocalityLbEndpoints`` in order, then their ``lb_endpoints``. Only
``socket_address`` with ``port_value`` is accepted. ``load_balancing_weight`` unset means 1; an
explicit 0 is also kept as 1 by ``Endpoint``, although Envoy's PGV (``gte: 1``) would NACK it. The
locality weight is recorded the way Envoy records it
(``PriorityStateManager::initializePriorityFor``): only from a ``LocalityLbEndpoints`` with both
``locality`` and ``load_balancing_weight`` set, keyed by (priority, locality), last one wins. Every
endpoint of that locality and priority gets the recorded weight, or ``None`` if none was recorded
(Envoy treats that as 0 under locality weighting). ``hash_key`` is
``metadata.filter_metadata["envoy.lb"]["hash_key"]``, and ``metadata`` is the ``filter_metadata``
as plain dicts. For STRICT_DNS and LOGICAL_DNS clusters an empty ``endpoint.hostname`` becomes the
DNS name, as in Envoy's ``DnsClusterImpl::ResolveTarget``. ``additional_addresses``,
``health_check_config``, LocalityLbEndpoints ``metadata`` and ``proximity``, and
``endpoint_stale_after`` are ignored. With an explicit ``load_assignment`` argument the
cluster's inline one is ignored. With neither (an EDS cluster before its first assignment) the
endpoint list is empty.

ConfigError is raised for configs Envoy (or gRPC) would NACK and for settings that would change
picks in ways meshcore cannot reproduce:

* invalid values, via :meth:`LbConfig.from_options` re-raised with xDS field paths:
  ``choice_count < 2``, ``minimum_ring_size > maximum_ring_size`` or ring sizes out of range,
  Maglev ``table_size`` not prime or too large, ``healthy_panic_threshold`` outside 0..100, and
  ``overprovisioning_factor`` 0;
* priorities that are not contiguous from 0, e.g. {0, 2}. gRPC's EDS validation NACKs this.
  **Envoy accepts it** and leaves the missing priority as an empty host set, which only
  shifts load. meshcore follows gRPC;
* the sum of host weights in one ``LocalityLbEndpoints``, or of locality weights in one
  priority, above 4294967295;
* port 0 or above 65535, an empty address, ``named_port``, ``pipe`` or
  ``envoy_internal_address`` addresses, ``endpoint_name`` (named endpoints), LEDS
  (``leds_cluster_locality_config``) and ``load_balancer_endpoints``;
* ring hash ``hash_function: MURMUR_HASH_2``, ``hash_balance_factor`` > 0 (bounded load), a
  cluster-level ``consistent_hashing_lb_config.hash_policy`` (Envoy would hash with it instead of
  the route's hash), least request ``selection_method: FULL_SCAN`` or ``enable_full_scan``;
* ``common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing`` on a cluster that is
  not STRICT_DNS. Envoy rejects this in ``ClusterFactoryImplBase::create``;
* ORIGINAL_DST and custom ``cluster_type`` clusters (an aggregate cluster must be expanded by the
  caller), ``lb_subset_config`` with selectors, non-zero ``policy.drop_overloads``, and a
  LOGICAL_DNS assignment that is not exactly one locality with one endpoint.

Accepted but not modelled, so picks can differ from Envoy's: ``slow_start_config`` (RR and LR;
meshcore has no slow start yet), ``zone_aware_lb_config`` (no local cluster), active
``health_checks`` and ``ignore_new_hosts_until_first_hc`` (health comes from EDS
``health_status`` only), ``outlier_detection`` (drive ``set_ejected`` yourself), the runtime
keys of ``RuntimeDouble`` values (their ``default_value`` is used), and DNS resolution: a
STRICT_DNS or LOGICAL_DNS endpoint stays a single endpoint named by its DNS name, whereas Envoy
makes one host per resolved IP, hashed by ``ip:port``.
"""

from __future__ import annotations

import importlib
import math
import re
import socket
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf import message as _message

# Registers the descriptors so that Any values in dicts and messages resolve.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2  # noqa: F401

from .._model import Endpoint, HealthStatus, Locality, _normalise_address, trusted_endpoint
from .._options import LbConfig
from ..errors import ConfigError
from ._decode import is_map, is_repeated, json_fields

__all__ = ["assignment_arguments", "cluster_lb_arguments", "load_balancer_arguments"]

for _name in (
    "client_side_weighted_round_robin", "override_host", "pick_first", "subset", "cluster_provided",
):  # policies we skip: registered only so that dicts naming them parse
    try:
        importlib.import_module(f"envoy.extensions.load_balancing_policies.{_name}.v3.{_name}_pb2")
    except ImportError:  # pragma: no cover  (older xds-protos)
        pass
try:
    from udpa.type.v1 import typed_struct_pb2 as _udpa_typed_struct_pb2  # noqa: F401
except ImportError:  # pragma: no cover
    pass

_UINT32_MAX = 0xFFFFFFFF
_MAX_POLICY_DEPTH = 16  # gRPC's recursion limit for nested LB policy configs
_TYPED_STRUCT_URL = "type.googleapis.com/xds.type.v3.TypedStruct"
_TYPED_STRUCTS = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})

_Cluster = cluster_pb2.Cluster
_Cla = endpoint_pb2.ClusterLoadAssignment
_DNS_TYPES = frozenset({_Cluster.STRICT_DNS, _Cluster.LOGICAL_DNS})
_IP_TYPES = frozenset({_Cluster.STATIC, _Cluster.EDS})  # Envoy parses these addresses as IPs
_MAX_PRIORITY = 128  # LocalityLbEndpoints.priority: (validate.rules).uint32.lte
_HEALTH = tuple(HealthStatus)  # indexed by the EDS enum value (0..5, contiguous)
_HEALTH_COUNT = len(_HEALTH)
_AF_INET = socket.AF_INET
_inet_pton = socket.inet_pton
_NO_LOCALITY = Locality()
_RingHash = ring_hash_pb2.RingHash
_LeastRequest = least_request_pb2.LeastRequest

# Cluster fields that influence endpoint selection; a Cluster dict is trimmed to these before
# parsing.
_CLUSTER_LB_FIELDS = frozenset({
    "name", "type", "cluster_type", "lb_policy", "load_balancing_policy", "common_lb_config",
    "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config", "round_robin_lb_config",
    "original_dst_lb_config", "lb_subset_config", "load_assignment",
})

_LEGACY_POLICIES = {
    _Cluster.ROUND_ROBIN: "ROUND_ROBIN",
    _Cluster.LEAST_REQUEST: "LEAST_REQUEST",
    _Cluster.RANDOM: "RANDOM",
    _Cluster.RING_HASH: "RING_HASH",
    _Cluster.MAGLEV: "MAGLEV",
}

Options = Dict[str, Any]
Where = Dict[str, Tuple[str, str]]  # option name -> (resource, xDS field path), for errors


def load_balancer_arguments(
    cluster: Any, load_assignment: Any = None
) -> Tuple[List[Endpoint], str, Options]:
    """Return ``(endpoints, policy, options)`` for ``LoadBalancer`` from xDS resources.

    ``cluster`` is an ``envoy.config.cluster.v3.Cluster`` and ``load_assignment`` an
    ``envoy.config.endpoint.v3.ClusterLoadAssignment``. Each may be a message, an ``Any``, or a
    proto3-JSON dict. With ``load_assignment=None`` the cluster's inline ``load_assignment`` is used
    (STATIC, STRICT_DNS, LOGICAL_DNS), or no endpoints if it has none. The options are validated.
    Anything invalid or unsupported raises :class:`ConfigError`; the module docstring lists what.
    """
    c = _coerce(cluster, _Cluster, "name", "Cluster", trim=_CLUSTER_LB_FIELDS)
    name = c.name or "Cluster"
    _check_cluster(c, name)
    policy, options, where = _lb_policy(c, name)

    endpoints: List[Endpoint] = []
    cla: Optional[_message.Message] = None
    resource, prefix = name, ""
    if load_assignment is not None:
        cla = _coerce(load_assignment, _Cla, "cluster_name", name)
        resource, prefix = cla.cluster_name or name, ""
    elif c.HasField("load_assignment"):
        cla, resource, prefix = c.load_assignment, name, "load_assignment."
    if cla is not None:
        endpoints = _endpoints(cla, resource, prefix, c.type, options, where)

    _validate(policy, options, where, name)
    return endpoints, policy, options


def cluster_lb_arguments(cluster: Any) -> Tuple[str, Options]:
    """``(policy, options)`` for ``LoadBalancer`` from a Cluster alone (its load-balancing fields).

    The cluster part of :func:`load_balancer_arguments`, with the same rules and errors; the
    options are validated. The cluster's ``load_assignment`` is not read: pass it to
    :func:`assignment_arguments`.
    """
    c = _coerce(cluster, _Cluster, "name", "Cluster", trim=_CLUSTER_LB_FIELDS)
    name = c.name or "Cluster"
    _check_cluster(c, name)
    policy, options, where = _lb_policy(c, name)
    if options:  # the policy name comes from our own table; only option values can be wrong
        _validate(policy, options, where, name)
    return policy, options


def assignment_arguments(
    load_assignment: Any,
    resource_name: Optional[str] = None,
    cluster_type: int = _Cluster.EDS,
    *,
    field_prefix: str = "",
) -> Tuple[List[Endpoint], Options]:
    """``(endpoints, endpoint_options)`` from a ClusterLoadAssignment.

    ``endpoint_options`` holds the ``LoadBalancer`` options an assignment sets:
    ``overprovisioning_factor`` and ``weighted_priority_health``. Errors name ``resource_name``
    (default: the assignment's ``cluster_name``) and ``field_prefix`` + the field path; a
    cluster's inline assignment passes the cluster name and ``"load_assignment."``.
    ``cluster_type`` (a ``Cluster.DiscoveryType``) selects the DNS rules (hostnames, the
    LOGICAL_DNS shape) as in :func:`load_balancer_arguments`.

    Stricter than :func:`load_balancer_arguments`, which keeps its lenient behaviour: this also
    applies the checks of Envoy's proto validation (an empty ``cluster_name``; a
    ``load_balancing_weight`` of 0 on a ``LocalityLbEndpoints`` or an ``LbEndpoint``; a
    priority above 128; a health-check port above 65535; a non-positive
    ``endpoint_stale_after``; an empty drop ``category``), and for STATIC and EDS clusters it
    rejects addresses that are not IP literals, as Envoy does ("malformed IP address").
    """
    cla = _coerce(load_assignment, _Cla, "cluster_name", resource_name or "ClusterLoadAssignment")
    resource = resource_name or cla.cluster_name or "ClusterLoadAssignment"
    options: Options = {}
    where: Where = {}
    endpoints = _endpoints(cla, resource, field_prefix, cluster_type, options, where, strict=True)
    factor = options.get("overprovisioning_factor")
    if factor is not None and factor < 1:
        res, path = where["overprovisioning_factor"]
        raise ConfigError(res, path, "value must be greater than 0")
    return endpoints, options


def _validate(policy: str, options: Options, where: Where, name: str) -> None:
    """:meth:`LbConfig.from_options`, with its errors re-raised on the xDS field paths."""
    try:
        LbConfig.from_options(policy, options, resource=name)
    except ConfigError as e:
        res, path = where.get(e.field) or where["policy"]
        raise ConfigError(res, path, e.reason) from None


# -- parsing ------------------------------------------------------------------------------------


def _coerce(obj: Any, cls: Any, name_field: str, default_resource: str, trim: Any = None) -> Any:
    """A message of type ``cls`` from a message, an ``Any`` or a proto3-JSON mapping."""
    full_name = cls.DESCRIPTOR.full_name
    if isinstance(obj, _message.Message):
        if isinstance(obj, any_pb2.Any):
            if _type_name(obj.type_url) != full_name:
                raise ConfigError(default_resource, "type_url", f"expected {full_name}, got {obj.type_url!r}")
            out = cls()
            try:
                obj.Unpack(out)
            except _message.DecodeError as e:
                raise ConfigError(default_resource, "value", f"cannot decode {full_name}: {e}") from None
            return out
        if obj.DESCRIPTOR.full_name != full_name:
            raise TypeError(f"expected a {full_name} message, got {obj.DESCRIPTOR.full_name}")
        if type(obj) is not cls:  # same message from another pool or generated module
            out = cls()
            out.ParseFromString(obj.SerializeToString())
            return out
        return obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a {full_name} message or dict, got {type(obj).__name__}")

    fields = json_fields(cls.DESCRIPTOR)
    resource = default_resource
    for key in (name_field, _snake_to_camel(name_field)):
        if isinstance(obj.get(key), str) and obj[key]:
            resource = obj[key]
            break
    data: Dict[str, Any] = {}
    for key, value in obj.items():
        if key == "@type":
            if _type_name(str(value)) != full_name:
                raise ConfigError(resource, "@type", f"expected {full_name}, got {value!r}")
            continue
        field = fields.get(key)
        if field is None:
            raise ConfigError(resource, str(key), f'unknown field "{key}" in {full_name}')
        if trim is None or field.name in trim:
            data[key] = value
    msg = cls()
    try:
        data = _fix_anys(data, cls.DESCRIPTOR)
        json_format.ParseDict(data, msg)
    except _PARSE_ERRORS as e:
        # AttributeError: ParseDict's reply to a non-string "@type"; RecursionError: nesting
        # deeper than Python's stack (protobuf's own depth limit is 100).
        try:
            path, reason = _locate(data, cls.DESCRIPTOR, "")
        except RecursionError:
            path, reason = "", "nested too deep"
        raise ConfigError(resource, path or "<root>", reason or _clean(e)) from None
    return msg


def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def _find_message(type_url: str) -> Optional[Any]:
    try:
        return descriptor_pool.Default().FindMessageTypeByName(_type_name(type_url))
    except KeyError:
        return None


def _fix_anys(node: Any, desc: Any) -> Any:
    """Copy of a JSON message with every ``Any`` of an unregistered type made a TypedStruct.

    ``ParseDict`` cannot parse an ``Any`` whose descriptor is unknown (a custom LB policy, a
    vendor's typed metadata). As a ``TypedStruct`` it keeps its type URL and contents, and the
    policy walk reports it as unsupported. Struct-typed fields are data and are left alone.
    """
    if not isinstance(node, dict):
        return node
    fields = json_fields(desc)
    out = {}
    for key, value in node.items():
        f = fields.get(key)
        if f is not None and f.message_type is not None:
            if is_map(f):
                vf = f.message_type.fields_by_name["value"]
                if vf.message_type is not None and isinstance(value, dict):
                    value = {k: _fix_value(v, vf.message_type) for k, v in value.items()}
            elif is_repeated(f):
                if isinstance(value, list):
                    value = [_fix_value(v, f.message_type) for v in value]
            else:
                value = _fix_value(value, f.message_type)
        out[key] = value
    return out


_WRAPPERS = frozenset(f"google.protobuf.{t}Value" for t in
                      ("UInt32", "Int32", "UInt64", "Int64", "Bool", "Double", "Float", "String", "Bytes"))


def _fix_value(value: Any, desc: Any) -> Any:
    if desc.full_name == "google.protobuf.Any":
        if not isinstance(value, dict) or not isinstance(value.get("@type"), str):
            return value
        inner = _find_message(value["@type"])
        if inner is None:
            rest = {k: v for k, v in value.items() if k != "@type"}
            return {"@type": _TYPED_STRUCT_URL, "type_url": value["@type"], "value": rest}
        if inner.full_name.startswith("google.protobuf.") or inner.full_name in _TYPED_STRUCTS:
            return value
        return _fix_anys(value, inner)  # "@type" is not a field: copied as is
    if desc.full_name == "google.protobuf.Duration" and isinstance(value, dict) and set(value) <= {"seconds", "nanos"}:
        # Envoy's YAML loader also takes {seconds: N, nanos: M}; proto3 JSON wants "N.Ms".
        try:
            seconds, nanos = int(value.get("seconds", 0)), int(value.get("nanos", 0))
        except (TypeError, ValueError):
            return value
        sign = "-" if seconds < 0 or nanos < 0 else ""
        return f"{sign}{abs(seconds)}.{abs(nanos):09d}s"
    if (desc.full_name in _WRAPPERS and isinstance(value, dict) and set(value) == {"value"}):
        return value["value"]  # Envoy's loader also takes {value: N} for wrapper types
    if desc.full_name.startswith("google.protobuf."):
        return value  # well-known types (Struct, wrappers, Duration, ...) have no Any inside
    return _fix_anys(value, desc)


def _message_class(desc: Any) -> Any:
    return message_factory.GetMessageClass(desc)


_PARSE_ERRORS = (json_format.ParseError, TypeError, ValueError, AttributeError, RecursionError)


def _parse_error(node: Any, desc: Any) -> Optional[Exception]:
    try:
        json_format.ParseDict(node, _message_class(desc)())
    except _PARSE_ERRORS as e:
        return e
    return None


def _locate(node: Any, desc: Any, path: str) -> Tuple[str, str]:
    """The deepest field of a JSON message that fails to parse, and why."""
    if not isinstance(node, dict):
        err = _parse_error(node, desc)
        return path, _clean(err) if err else "invalid value"
    fields = json_fields(desc)
    for key, value in node.items():
        if key == "@type":
            continue
        f = fields.get(key)
        sub = f"{path}.{f.name if f else key}" if path else (f.name if f else str(key))
        if f is None:
            return sub, f'unknown field "{key}" in {desc.full_name}'
        err = _parse_error({key: value}, desc)
        if err is None:
            continue
        return _locate_field(f, value, sub) or (sub, _clean(err))
    err = _parse_error(node, desc)  # e.g. two members of one oneof
    return path, _clean(err) if err else "invalid value"


def _locate_field(f: Any, value: Any, path: str) -> Optional[Tuple[str, str]]:
    mt = f.message_type
    if mt is None:
        return None
    if is_map(f):
        vf = mt.fields_by_name["value"]
        if vf.message_type is not None and isinstance(value, dict):
            for k, v in value.items():
                found = _locate_element(v, vf.message_type, f"{path}[{k}]")
                if found:
                    return found
        return None
    if is_repeated(f):
        if isinstance(value, list):
            for i, v in enumerate(value):
                found = _locate_element(v, mt, f"{path}[{i}]")
                if found:
                    return found
        return None
    return _locate_element(value, mt, path)


def _locate_element(value: Any, desc: Any, path: str) -> Optional[Tuple[str, str]]:
    err = _parse_error(value, desc)
    if err is None:
        return None
    if desc.full_name == "google.protobuf.Any" and isinstance(value, dict):
        inner = _find_message(str(value.get("@type", "")))
        if inner is None:
            if not isinstance(value.get("@type"), str):
                return f"{path}.@type", f"must be a type URL string, got {value.get('@type')!r}"
            return path, f"unknown Any type {value.get('@type')!r}"
        if not inner.full_name.startswith("google.protobuf."):
            return _locate(value, inner, path)
        return path, _clean(err)
    if desc.full_name.startswith("google.protobuf."):
        return path, _clean(err)
    return _locate(value, desc, path)


_PREFIX = re.compile(r"^(Failed to parse \w+ field: )+")
_AT = re.compile(r" at [\w.\[\]]+$")


def _clean(err: Optional[Exception]) -> str:
    """protobuf's message without its "Failed to parse X field:" chain and " at Msg.field" tail."""
    text = _PREFIX.sub("", str(err or "invalid value")).split("\n", 1)[0].rstrip(".")
    return _AT.sub("", text) or "invalid value"


# -- cluster and policy -------------------------------------------------------------------------


def _check_cluster(c: Any, name: str) -> None:
    if c.WhichOneof("cluster_discovery_type") == "cluster_type":
        raise ConfigError(
            name, "cluster_type",
            f"custom cluster type {c.cluster_type.name!r} is not supported "
            "(expand aggregate clusters before building a load balancer)",
        )
    if c.type == _Cluster.ORIGINAL_DST:
        raise ConfigError(name, "type", "ORIGINAL_DST clusters are not supported")
    if len(c.lb_subset_config.subset_selectors):
        raise ConfigError(name, "lb_subset_config.subset_selectors", "subset load balancing is not supported")
    chl = c.common_lb_config.consistent_hashing_lb_config
    if chl.use_hostname_for_hashing and c.type != _Cluster.STRICT_DNS:
        raise ConfigError(
            name, "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing",
            "Cannot use hostname for consistent hashing loadbalancing for cluster of type: "
            f"'{_enum_name(_Cluster.DiscoveryType, c.type)}'",
        )


def _enum_name(enum: Any, value: int) -> str:
    """An enum value's name, or its number when the enum does not define it."""
    return enum.Name(value) if value in enum.values() else str(value)


def _lb_policy(c: Any, name: str) -> Tuple[str, Options, Where]:
    options: Options = {}
    where: Where = {}
    common = c.common_lb_config
    if common.HasField("healthy_panic_threshold"):
        options["healthy_panic_threshold"] = common.healthy_panic_threshold.value
        where["healthy_panic_threshold"] = (name, "common_lb_config.healthy_panic_threshold.value")

    if c.HasField("load_balancing_policy"):
        skipped: List[str] = []
        found = _typed_policy(c.load_balancing_policy, "load_balancing_policy", name, 0, skipped)
        if found is None:
            listed = ", ".join(skipped) if skipped else "an empty list"
            raise ConfigError(
                name, "load_balancing_policy",
                f"no supported load balancing policy in {listed}; meshcore supports round_robin, "
                "least_request, random, ring_hash, maglev and wrr_locality over one of them",
            )
        policy, typed_options, typed_where = found
        options.update(typed_options)
        where.update(typed_where)
        return policy, options, where

    policy = _LEGACY_POLICIES.get(c.lb_policy)
    if c.lb_policy == _Cluster.LOAD_BALANCING_POLICY_CONFIG:
        raise ConfigError(name, "lb_policy", "LOAD_BALANCING_POLICY_CONFIG requires load_balancing_policy")
    if policy is None:
        if c.lb_policy not in _Cluster.LbPolicy.values():  # Envoy: enum.defined_only
            raise ConfigError(name, "lb_policy", f"value must be one of the defined enum values (got {c.lb_policy})")
        raise ConfigError(
            name, "lb_policy",
            f"{_Cluster.LbPolicy.Name(c.lb_policy)} is not supported "
            "(supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
        )
    where["policy"] = (name, "lb_policy")
    if common.HasField("locality_weighted_lb_config"):
        options["locality_weighted"] = True
    if policy == "LEAST_REQUEST":
        _least_request(c.least_request_lb_config, "least_request_lb_config", name, options, where)
    elif policy == "RING_HASH":
        rh = c.ring_hash_lb_config
        _ring_sizes(rh, "ring_hash_lb_config", name, options, where)
        if rh.hash_function == _Cluster.RingHashLbConfig.MURMUR_HASH_2:
            raise ConfigError(
                name, "ring_hash_lb_config.hash_function", "MURMUR_HASH_2 is not supported (use XX_HASH)"
            )
    elif policy == "MAGLEV":
        _table_size(c.maglev_lb_config, "maglev_lb_config", name, options, where)
    if policy in ("RING_HASH", "MAGLEV") and common.HasField("consistent_hashing_lb_config"):
        chl = common.consistent_hashing_lb_config
        _hash_balance(chl, "common_lb_config.consistent_hashing_lb_config", name)
        if chl.use_hostname_for_hashing:
            options["use_hostname_for_hashing"] = True
    return policy, options, where


_Handler = Callable[[Any, str, str, int, List[str]], Optional[Tuple[str, Options, Where]]]


def _typed_policy(
    lbp: Any, path: str, name: str, depth: int, skipped: List[str]
) -> Optional[Tuple[str, Options, Where]]:
    """The first supported entry of a ``LoadBalancingPolicy``, or ``None``."""
    if depth > _MAX_POLICY_DEPTH:
        raise ConfigError(name, path, f"load balancing policies nested more than {_MAX_POLICY_DEPTH} deep")
    for i, entry in enumerate(lbp.policies):
        epath = f"{path}.policies[{i}].typed_extension_config.typed_config"
        any_ = entry.typed_extension_config.typed_config
        type_name = _type_name(any_.type_url)
        handler_cls = _HANDLERS.get(type_name)
        msg = None
        if handler_cls is not None:
            msg = handler_cls[0]()
            try:
                any_.Unpack(msg)
            except _message.DecodeError as e:
                raise ConfigError(name, epath, f"cannot decode {type_name}: {e}") from None
        elif type_name in _TYPED_STRUCTS:
            msg, inner_url = _from_typed_struct(any_, type_name, epath, name)
            if msg is not None:
                handler_cls = _HANDLERS[msg.DESCRIPTOR.full_name]
            else:
                type_name = f"{type_name}({_type_name(inner_url)})"
        if handler_cls is None or msg is None:
            skipped.append(_short(type_name) or entry.typed_extension_config.name or "<no typed_config>")
            continue
        found = handler_cls[1](msg, epath, name, depth, skipped)
        if found is not None:
            return found
    return None


def _short(type_name: str) -> str:
    """``round_robin.v3.RoundRobin`` for Envoy's LB policy types, else the full name."""
    prefix = "envoy.extensions.load_balancing_policies."
    return type_name[len(prefix):] if type_name.startswith(prefix) else type_name


def _from_typed_struct(any_: Any, type_name: str, path: str, name: str) -> Tuple[Optional[Any], str]:
    """``(policy message, inner type URL)`` of a TypedStruct; no message if unsupported."""
    ts = _message_class(descriptor_pool.Default().FindMessageTypeByName(type_name))()
    try:
        any_.Unpack(ts)
    except _message.DecodeError as e:
        raise ConfigError(name, path, f"cannot decode {type_name}: {e}") from None
    handler = _HANDLERS.get(_type_name(ts.type_url))
    if handler is None:
        return None, ts.type_url
    msg = handler[0]()
    try:
        json_format.ParseDict(json_format.MessageToDict(ts.value), msg)
    except (json_format.ParseError, TypeError, ValueError) as e:
        raise ConfigError(name, f"{path}.value", _clean(e)) from None
    return msg, ts.type_url


def _locality_weighted(locality_lb_config: Any, options: Options) -> None:
    if locality_lb_config.HasField("locality_weighted_lb_config"):
        options["locality_weighted"] = True


def _round_robin(msg: Any, path: str, name: str, depth: int, skipped: List[str]) -> Tuple[str, Options, Where]:
    options: Options = {}
    _locality_weighted(msg.locality_lb_config, options)
    return "ROUND_ROBIN", options, {"policy": (name, path)}


def _random(msg: Any, path: str, name: str, depth: int, skipped: List[str]) -> Tuple[str, Options, Where]:
    options: Options = {}
    _locality_weighted(msg.locality_lb_config, options)
    return "RANDOM", options, {"policy": (name, path)}


def _typed_least_request(
    msg: Any, path: str, name: str, depth: int, skipped: List[str]
) -> Tuple[str, Options, Where]:
    options: Options = {}
    where: Where = {"policy": (name, path)}
    _least_request(msg, path, name, options, where)
    if msg.selection_method == _LeastRequest.FULL_SCAN:
        raise ConfigError(name, f"{path}.selection_method", "FULL_SCAN is not supported (use N_CHOICES)")
    if msg.enable_full_scan.value:
        raise ConfigError(name, f"{path}.enable_full_scan", "full scan is not supported")
    _locality_weighted(msg.locality_lb_config, options)
    return "LEAST_REQUEST", options, where


def _least_request(msg: Any, path: str, name: str, options: Options, where: Where) -> None:
    """Fields shared by the typed ``LeastRequest`` and the legacy ``LeastRequestLbConfig``."""
    if msg.HasField("choice_count"):
        options["choice_count"] = msg.choice_count.value
        where["choice_count"] = (name, f"{path}.choice_count")
    if msg.HasField("active_request_bias"):
        options["active_request_bias"] = msg.active_request_bias.default_value
        where["active_request_bias"] = (name, f"{path}.active_request_bias.default_value")


def _ring_sizes(msg: Any, path: str, name: str, options: Options, where: Where) -> None:
    for field in ("minimum_ring_size", "maximum_ring_size"):
        if msg.HasField(field):
            options[field] = getattr(msg, field).value
            where[field] = (name, f"{path}.{field}")
    # LbConfig reports min > max on minimum_ring_size; blame max when min is the default.
    where.setdefault("minimum_ring_size", where.get("maximum_ring_size", (name, path)))


def _table_size(msg: Any, path: str, name: str, options: Options, where: Where) -> None:
    if msg.HasField("table_size"):
        options["table_size"] = msg.table_size.value
        where["table_size"] = (name, f"{path}.table_size")


def _hash_balance(msg: Any, path: str, name: str) -> None:
    if msg.hash_balance_factor.value:
        raise ConfigError(
            name, f"{path}.hash_balance_factor",
            "bounded-load consistent hashing (hash_balance_factor > 0) is not supported",
        )


def _consistent_hashing(msg: Any, path: str, name: str, options: Options) -> None:
    """Typed RingHash / Maglev ``consistent_hashing_lb_config``."""
    chl = msg.consistent_hashing_lb_config
    cpath = f"{path}.consistent_hashing_lb_config"
    _hash_balance(chl, cpath, name)
    if len(chl.hash_policy):
        raise ConfigError(
            name, f"{cpath}.hash_policy",
            "a cluster-level hash_policy is not supported (configure it on the route and pass the hash to pick())",
        )
    if chl.use_hostname_for_hashing:
        options["use_hostname_for_hashing"] = True


def _typed_ring_hash(msg: Any, path: str, name: str, depth: int, skipped: List[str]) -> Tuple[str, Options, Where]:
    options: Options = {}
    where: Where = {"policy": (name, path)}
    if msg.hash_function == _RingHash.MURMUR_HASH_2:
        raise ConfigError(name, f"{path}.hash_function", "MURMUR_HASH_2 is not supported (use XX_HASH)")
    _ring_sizes(msg, path, name, options, where)
    if msg.HasField("consistent_hashing_lb_config"):  # then the deprecated fields are ignored
        _consistent_hashing(msg, path, name, options)
    else:
        _hash_balance(msg, path, name)
        if msg.use_hostname_for_hashing:
            options["use_hostname_for_hashing"] = True
    if msg.HasField("locality_weighted_lb_config"):
        options["locality_weighted"] = True
    return "RING_HASH", options, where


def _typed_maglev(msg: Any, path: str, name: str, depth: int, skipped: List[str]) -> Tuple[str, Options, Where]:
    options: Options = {}
    where: Where = {"policy": (name, path)}
    _table_size(msg, path, name, options, where)
    _consistent_hashing(msg, path, name, options)
    if msg.HasField("locality_weighted_lb_config"):
        options["locality_weighted"] = True
    return "MAGLEV", options, where


def _wrr_locality(
    msg: Any, path: str, name: str, depth: int, skipped: List[str]
) -> Optional[Tuple[str, Options, Where]]:
    # gRPC's xds_wrr_locality takes any child; Envoy's own wrr_locality only accepts
    # client_side_weighted_round_robin (ENVOY_BUG otherwise). We follow gRPC.
    inner: List[str] = []
    found = _typed_policy(msg.endpoint_picking_policy, f"{path}.endpoint_picking_policy", name, depth + 1, inner)
    if found is None:
        skipped.append(f"wrr_locality({', '.join(inner) or 'empty'})")
        return None
    policy, options, where = found
    options["locality_weighted"] = True
    return policy, options, where


_HANDLERS: Dict[str, Tuple[Any, _Handler]] = {
    round_robin_pb2.RoundRobin.DESCRIPTOR.full_name: (round_robin_pb2.RoundRobin, _round_robin),
    least_request_pb2.LeastRequest.DESCRIPTOR.full_name: (least_request_pb2.LeastRequest, _typed_least_request),
    random_pb2.Random.DESCRIPTOR.full_name: (random_pb2.Random, _random),
    ring_hash_pb2.RingHash.DESCRIPTOR.full_name: (ring_hash_pb2.RingHash, _typed_ring_hash),
    maglev_pb2.Maglev.DESCRIPTOR.full_name: (maglev_pb2.Maglev, _typed_maglev),
    wrr_locality_pb2.WrrLocality.DESCRIPTOR.full_name: (wrr_locality_pb2.WrrLocality, _wrr_locality),
}


# -- endpoints ----------------------------------------------------------------------------------


def _endpoints(
    cla: Any, resource: str, prefix: str, cluster_type: int, options: Options, where: Where,
    strict: bool = False,
) -> List[Endpoint]:
    """The endpoints of an assignment; its policy options go into ``options``/``where``.

    ``strict`` adds the proto-validation checks :func:`assignment_arguments` documents.
    Field paths are built only when an error is raised: this runs once per endpoint update.
    """
    if strict and not cla.cluster_name:
        raise ConfigError(resource, f"{prefix}cluster_name", "value length must be at least 1 characters")
    policy = cla.policy
    if policy.HasField("overprovisioning_factor"):
        options["overprovisioning_factor"] = policy.overprovisioning_factor.value
        where["overprovisioning_factor"] = (resource, f"{prefix}policy.overprovisioning_factor")
    if policy.weighted_priority_health:
        options["weighted_priority_health"] = True
    if strict and policy.HasField("endpoint_stale_after"):
        stale = policy.endpoint_stale_after
        if stale.seconds < 0 or stale.nanos < 0 or not (stale.seconds or stale.nanos):
            raise ConfigError(resource, f"{prefix}policy.endpoint_stale_after", "value must be greater than 0s")
    for i, drop in enumerate(policy.drop_overloads):
        if strict and not drop.category:
            raise ConfigError(
                resource, f"{prefix}policy.drop_overloads[{i}].category", "value length must be at least 1 characters"
            )
        if drop.drop_percentage.numerator:
            raise ConfigError(resource, f"{prefix}policy.drop_overloads[{i}]", "drop_overloads are not supported")

    lles = cla.endpoints
    dns = cluster_type in _DNS_TYPES
    need_ip = strict and cluster_type in _IP_TYPES
    if cluster_type == _Cluster.LOGICAL_DNS and (len(lles) != 1 or len(lles[0].lb_endpoints) != 1):
        raise ConfigError(
            resource, f"{prefix}endpoints",
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        )

    # Locality weights as Envoy records them: (priority, locality) -> weight, last one wins.
    localities: List[Locality] = []
    recorded: Dict[Tuple[int, Locality], Tuple[int, int]] = {}  # -> (weight, index of the LLE)
    priorities = set()
    for i, lle in enumerate(lles):
        kind = lle.WhichOneof("lb_config")
        if kind is not None:
            path = f"{prefix}endpoints[{i}]"
            if kind == "leds_cluster_locality_config":
                raise ConfigError(resource, f"{path}.leds_cluster_locality_config", "LEDS is not supported")
            if kind == "load_balancer_endpoints":
                raise ConfigError(resource, f"{path}.load_balancer_endpoints", "not supported; use lb_endpoints")
        has_weight = lle.HasField("load_balancing_weight")
        priority = lle.priority
        if strict:
            if has_weight and not lle.load_balancing_weight.value:
                raise ConfigError(
                    resource, f"{prefix}endpoints[{i}].load_balancing_weight",
                    "value must be greater than or equal to 1",
                )
            if priority > _MAX_PRIORITY:
                raise ConfigError(
                    resource, f"{prefix}endpoints[{i}].priority", f"value must be less than or equal to {_MAX_PRIORITY}"
                )
        priorities.add(priority)
        if lle.HasField("locality"):
            pl = lle.locality
            loc = Locality(pl.region, pl.zone, pl.sub_zone)
            if has_weight:
                recorded[(priority, loc)] = (lle.load_balancing_weight.value, i)
        else:
            loc = _NO_LOCALITY
        localities.append(loc)

    for p in range(len(priorities)):
        if p not in priorities:
            first = next(i for i, lle in enumerate(lles) if lle.priority > p)
            raise ConfigError(
                resource, f"{prefix}endpoints[{first}].priority",
                f"priorities must be contiguous from 0; missing priority {p}",
            )
    sums: Dict[int, int] = {}
    last: Dict[int, int] = {}
    for (p, _), (weight, i) in recorded.items():
        sums[p] = sums.get(p, 0) + weight
        last[p] = max(last.get(p, i), i)
    for p, total in sums.items():
        if total > _UINT32_MAX:
            raise ConfigError(
                resource, f"{prefix}endpoints[{last[p]}].load_balancing_weight",
                f"The sum of weights of all localities at the same priority exceeds {_UINT32_MAX}",
            )

    endpoints: List[Endpoint] = []
    append = endpoints.append
    for i, lle in enumerate(lles):
        loc = localities[i]
        priority = lle.priority
        lw = recorded.get((priority, loc))
        locality_weight = None if lw is None else lw[0]
        total = 0
        for k, lbe in enumerate(lle.lb_endpoints):
            if lbe.HasField("load_balancing_weight"):
                weight = lbe.load_balancing_weight.value
                if not weight and strict:
                    raise ConfigError(
                        resource, f"{_lbe_path(prefix, i, k)}.load_balancing_weight",
                        "value must be greater than or equal to 1",
                    )
                total += weight or 1
            else:
                weight = 1
                total += 1
            if total > _UINT32_MAX:
                raise ConfigError(
                    resource, f"{_lbe_path(prefix, i, k)}.load_balancing_weight",
                    f"The sum of weights of all upstream hosts in a locality exceeds {_UINT32_MAX}",
                )
            append(_endpoint(lbe, prefix, i, k, resource, dns, need_ip, strict, weight, priority, loc, locality_weight))
    return endpoints


def _lbe_path(prefix: str, i: int, k: int) -> str:
    return f"{prefix}endpoints[{i}].lb_endpoints[{k}]"


def _endpoint(
    lbe: Any, prefix: str, i: int, k: int, resource: str, dns: bool, need_ip: bool, strict: bool,
    weight: int, priority: int, locality: Locality, locality_weight: Optional[int],
) -> Endpoint:
    kind = lbe.WhichOneof("host_identifier")
    if kind != "endpoint":
        path = _lbe_path(prefix, i, k)
        if kind == "endpoint_name":
            raise ConfigError(resource, f"{path}.endpoint_name", "named endpoints are not supported")
        raise ConfigError(resource, f"{path}.endpoint", "missing endpoint")
    ep = lbe.endpoint
    address = ep.address
    kind = address.WhichOneof("address")
    if kind != "socket_address":
        where = f"{_lbe_path(prefix, i, k)}.endpoint.address" + (f".{kind}" if kind else "")
        raise ConfigError(resource, where, f"only socket_address is supported, got {kind or 'no address'}")
    sa = address.socket_address
    port = sa.port_value
    host = sa.address
    if not 0 < port <= 65535 or not host:  # a named_port leaves port_value 0
        sa_path = f"{_lbe_path(prefix, i, k)}.endpoint.address.socket_address"
        if sa.WhichOneof("port_specifier") == "named_port":
            raise ConfigError(resource, f"{sa_path}.named_port", "named_port is not supported; use port_value")
        if not 0 < port <= 65535:
            raise ConfigError(resource, f"{sa_path}.port_value", f"port must be in 1..65535, got {port}")
        raise ConfigError(resource, f"{sa_path}.address", "address must not be empty")
    try:
        _inet_pton(_AF_INET, host)  # accepts only canonical dotted quads: nothing to normalise
        address_key = host
    except ValueError:  # "embedded null character": no address (IP or DNS name) has one
        raise ConfigError(
            resource, f"{_lbe_path(prefix, i, k)}.endpoint.address.socket_address.address",
            f"malformed address {host!r}: contains a NUL character",
        ) from None
    except OSError:
        if need_ip and not _is_ipv6_literal(host):
            raise ConfigError(
                resource, f"{_lbe_path(prefix, i, k)}.endpoint.address.socket_address.address",
                f"malformed IP address: {host} (only STRICT_DNS and LOGICAL_DNS clusters resolve names)",
            ) from None
        address_key = _normalise_address(host)
    if strict and ep.HasField("health_check_config") and ep.health_check_config.port_value > 65535:
        raise ConfigError(
            resource, f"{_lbe_path(prefix, i, k)}.endpoint.health_check_config.port_value",
            "value must be less than or equal to 65535",
        )
    status = lbe.health_status
    if not 0 <= status < _HEALTH_COUNT:
        raise ConfigError(resource, f"{_lbe_path(prefix, i, k)}.health_status", f"unknown health status {status}")
    if lbe.HasField("metadata"):
        metadata, hash_key = _metadata(lbe.metadata, resource, prefix, i, k)
    else:
        metadata = hash_key = None
    return trusted_endpoint(
        address_key, port, weight, _HEALTH[status], priority, locality, locality_weight,
        ep.hostname or (host if dns else ""),  # DnsClusterImpl::ResolveTarget
        metadata, hash_key,
    )


def _is_ipv6_literal(address: str) -> bool:
    """An IPv6 literal as ``inet_pton`` reads it, optionally with a ``%scope`` (Envoy accepts one)."""
    try:
        _inet_pton(socket.AF_INET6, address.split("%", 1)[0])
        return True
    except OSError:
        return False


def _metadata(
    md: Any, resource: str, prefix: str, i: int, k: int
) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``filter_metadata`` as plain dicts, and the ``envoy.lb`` ``hash_key`` (non-empty string)."""
    fm = md.filter_metadata
    if not len(fm):
        return None, None
    try:
        plain = {key: _struct(fm[key]) for key in fm}  # key iteration: faster than items() on upb maps
    except RecursionError:  # protobuf's depth limit (100) normally stops this first
        raise ConfigError(resource, f"{_lbe_path(prefix, i, k)}.metadata.filter_metadata", "nested too deep") from None
    except ValueError as e:
        raise ConfigError(resource, f"{_lbe_path(prefix, i, k)}.metadata.filter_metadata", str(e)) from None
    hash_key = None
    lb = plain.get("envoy.lb")
    if lb is not None:
        value = lb.get("hash_key")
        if isinstance(value, str) and value:
            hash_key = value
    return plain, hash_key


def _struct(struct: Any) -> Dict[str, Any]:
    """A ``google.protobuf.Struct`` as ``json_format.MessageToDict`` gives it, several times faster."""
    fields = struct.fields
    return {key: _value(fields[key]) for key in fields}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError(f"{number} cannot be represented in JSON")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    return None  # null_value, or no kind set
