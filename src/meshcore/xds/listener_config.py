"""Listener (xDS v3) to :class:`~meshcore.xds.model.ListenerSpec`: a client-side API listener.

:func:`listener_spec` accepts an ``envoy.config.listener.v3.Listener`` message, an ``Any`` holding
one, or a proto3-JSON dict (only ``name``, ``address`` and ``api_listener`` are parsed). Errors are
:class:`~meshcore.errors.ConfigError` naming the listener and the snake_case field path, for
example ``api_listener.api_listener.http_filters[1].typed_config``.

Rules (gRPC A27/A39, with Envoy's HttpConnectionManager checks where Envoy has them):

* ``api_listener.api_listener`` must be an ``HttpConnectionManager``. A listener with only
  ``address``/``filter_chains`` is a server listener, which a client cannot use. Istio sends
  client listeners with both ``address`` (the service VIP) and ``api_listener``: accepted, and the
  socket address is recorded as ``"ip:port"``; ``filter_chains`` are ignored.
* ``route_specifier``: ``rds`` with a config source of ``ads`` or ``self`` and a non-empty
  ``route_config_name``, or an inline ``route_config`` (validated by
  :func:`~meshcore.xds.route_config.route_config_spec`; its errors name the listener, under
  ``api_listener.api_listener.route_config.``). ``scoped_routes`` or nothing is an error.
* ``http_filters``: non-empty, unique non-empty names, the router last (and only last), and the
  last filter must be the router. Supported: ``envoy.extensions.filters.http.router.v3.Router``
  and ``envoy.extensions.filters.http.fault.v3.HTTPFault`` (-> :class:`FaultSpec`), also wrapped
  in ``xds.type.v3.TypedStruct`` or ``udpa.type.v1.TypedStruct``. Filters that cannot change what
  a client sends or where, ``envoy.extensions.filters.http.cors.v3.Cors`` (browser CORS; no
  browser here) and ``envoy.extensions.filters.http.grpc_stats.v3.FilterConfig`` (statistics),
  are accepted and left out of ``http_filters``. Any other type, a filter without
  ``typed_config`` (for example one using ECDS ``config_discovery``) and a disabled router are
  errors unless the filter is ``is_optional``, in which case it is skipped. This includes
  ``stateful_session``, which Istio adds for persistent sessions: meshcore cannot keep sessions
  sticky, so it refuses rather than silently balancing them. Other ``disabled`` filters are
  kept with ``disabled=True``.
* ``common_http_protocol_options.max_stream_duration`` -> ``max_stream_duration`` in seconds
  (0 means no limit and is recorded as ``None``).

Fault filter: ``delay`` (``fixed_delay`` > 0 or ``header_delay``) and ``abort`` (``http_status`` in
200..599, ``grpc_status`` or ``header_abort``) must say which, as Envoy requires; percentages are
``FractionalPercent`` (unset = 0) scaled to per million and capped at 100%, with the denominator
kept (the unit of the ``x-envoy-fault-*-request-percentage`` headers); ``max_active_faults`` (unset:
unlimited), ``upstream_cluster`` and ``headers`` are kept. ``downstream_nodes`` and
``response_rate_limit`` are errors (not supported; ignoring them would inject faults Envoy would
not). Runtime keys are ignored (their defaults apply). An ``HTTPFault`` in a route's or virtual
host's ``typed_per_filter_config`` is decoded the same way (``fault_spec``).

Where this differs from Envoy 1.40 (tests/xds/test_listener_config.py checks each against a real
Envoy): empty ``http_filters`` (Envoy adds a router), duplicate filter names, an empty
``route_config_name``, ``config_discovery`` filters and known Envoy filters other than those above
are errors here, as in gRPC; a missing ``stat_prefix`` is fine here (gRPC control planes such as
Istio leave it unset, Envoy requires it); ``self`` config sources are accepted (Envoy refuses them
in a static bootstrap, where there is no "self").
"""

from __future__ import annotations

import ipaddress

from typing import Any, Dict, List, Optional, Set, Tuple

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

from .._model import host_key
from ..errors import ConfigError
from ._decode import per_million, seconds, type_name, unpack
from .lb_config import _coerce
from .model import FaultSpec, HttpFilterSpec, ListenerSpec
from .route_config import _Ctx, _header_matcher, route_config_spec

try:  # registered so that dicts naming these filters parse
    from envoy.extensions.filters.http.cors.v3 import cors_pb2 as _cors_pb2
    from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as _grpc_stats_pb2
except ImportError:  # pragma: no cover  (older xds-protos)
    _cors_pb2 = _grpc_stats_pb2 = None

__all__ = ["listener_spec"]

_HCM = http_connection_manager_pb2.HttpConnectionManager
_HCM_NAME = _HCM.DESCRIPTOR.full_name
_ROUTER = router_pb2.Router.DESCRIPTOR.full_name
_FAULT = fault_pb2.HTTPFault.DESCRIPTOR.full_name
_FILTERS = {_ROUTER: router_pb2.Router, _FAULT: fault_pb2.HTTPFault}
#: Accepted and dropped: no effect on a client's requests.
NO_EFFECT_FILTERS = frozenset({
    "envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
})
_P = "api_listener.api_listener."
_LISTENER_FIELDS = frozenset({"name", "address", "api_listener"})


def listener_spec(listener: Any) -> ListenerSpec:
    """Validate and convert a client (API) Listener; raise ``ConfigError`` naming the field."""
    lis = _coerce(listener, listener_pb2.Listener, "name", "Listener", trim=_LISTENER_FIELDS)
    name = lis.name or "Listener"
    if not lis.api_listener.HasField("api_listener"):
        raise ConfigError(
            name, "api_listener",
            "not an API listener: a listener with only address/filter_chains is a server listener",
        )
    any_ = lis.api_listener.api_listener
    if type_name(any_.type_url) != _HCM_NAME:
        raise ConfigError(name, "api_listener.api_listener", f"expected {_HCM_NAME}, got {any_.type_url!r}")
    hcm, _ = unpack(any_, {_HCM_NAME: _HCM}, name, "api_listener.api_listener")

    route_config_name: Optional[str] = None
    inline = None
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        route_config_name = _rds(hcm.rds, name)
    elif which == "route_config":
        try:
            inline = route_config_spec(hcm.route_config)
        except ConfigError as e:
            field = f"{_P}route_config.{e.field}" if e.field else f"{_P}route_config"
            raise ConfigError(name, field, e.reason) from None
    elif which == "scoped_routes":
        raise ConfigError(name, f"{_P}scoped_routes", "scoped routes are not supported; use rds or route_config")
    else:
        raise ConfigError(name, f"{_P}route_specifier", "is required: set rds or route_config")

    filters = _http_filters(hcm, name)
    max_stream_duration = hcm_max_stream_duration(hcm, name, _P)
    address = None
    if lis.address.WhichOneof("address") == "socket_address":
        sa = lis.address.socket_address
        address = host_key(sa.address, sa.port_value)
    return ListenerSpec(name=name, route_config_name=route_config_name, inline_route_config=inline,
                        http_filters=filters, max_stream_duration=max_stream_duration, address=address,
                        use_remote_address=hcm.use_remote_address.value,
                        xff_num_trusted_hops=hcm.xff_num_trusted_hops,
                        internal_cidrs=_internal_cidrs(hcm, name))


def _internal_cidrs(hcm: Any, name: str) -> Tuple[Any, ...]:
    """``internal_address_config.cidr_ranges`` as ipaddress networks (host bits masked, as
    Envoy's CidrRange does); an unparsable prefix or a length beyond the family's is an error."""
    out = []
    for i, cidr in enumerate(hcm.internal_address_config.cidr_ranges):
        field = f"{_P}internal_address_config.cidr_ranges[{i}]"
        try:
            address = ipaddress.ip_address(cidr.address_prefix)
        except ValueError:
            raise ConfigError(name, f"{field}.address_prefix",
                              f"malformed IP address: {cidr.address_prefix!r}") from None
        length = cidr.prefix_len.value
        if length > address.max_prefixlen:
            raise ConfigError(name, f"{field}.prefix_len", f"{length} exceeds {address.max_prefixlen} bits")
        out.append(ipaddress.ip_network(f"{address}/{length}", strict=False))
    return tuple(out)


# -- shared with sidecar_listener (the HCM of an Envoy sidecar's filter chains) --------------------


def rds_route_config_name(rds: Any, name: str, prefix: str) -> str:
    """An HCM's ``rds``: the route config name, which must be non-empty, from an ``ads`` or
    ``self`` config source (``prefix``: the HCM's field path, ending in ``.``)."""
    source = rds.config_source.WhichOneof("config_source_specifier")
    if source not in ("ads", "self"):
        raise ConfigError(
            name, f"{prefix}rds.config_source" + (f".{source}" if source else ""),
            f"the RDS config source must be ads or self, got {source or 'none'}",
        )
    if not rds.route_config_name:
        raise ConfigError(name, f"{prefix}rds.route_config_name", "must not be empty")
    return rds.route_config_name


def hcm_max_stream_duration(hcm: Any, name: str, prefix: str) -> Optional[float]:
    """``common_http_protocol_options.max_stream_duration`` in seconds (``None``: no limit)."""
    if not hcm.common_http_protocol_options.HasField("max_stream_duration"):
        return None
    value = seconds(hcm.common_http_protocol_options.max_stream_duration, name,
                    f"{prefix}common_http_protocol_options.max_stream_duration")
    return value or None


def _rds(rds: Any, name: str) -> str:
    return rds_route_config_name(rds, name, _P)


def _http_filters(hcm: Any, name: str) -> Tuple[HttpFilterSpec, ...]:
    entries = hcm.http_filters
    if not len(entries):
        raise ConfigError(name, f"{_P}http_filters", "must not be empty (the router filter is required)")
    last = len(entries) - 1
    seen: Set[str] = set()
    out: List[HttpFilterSpec] = []
    for i, f in enumerate(entries):
        path = f"{_P}http_filters[{i}]"
        if not f.name:
            raise ConfigError(name, f"{path}.name", "value length must be at least 1 characters")
        if f.name in seen:
            raise ConfigError(name, f"{path}.name", f"duplicate HTTP filter name {f.name!r}")
        seen.add(f.name)
        which = f.WhichOneof("config_type")
        if which != "typed_config":
            if i == last:
                raise ConfigError(name, path, f"filter {f.name!r} is last, but the last filter must be the router")
            if f.is_optional:
                continue
            if which == "config_discovery":
                raise ConfigError(name, f"{path}.config_discovery", "filter config discovery (ECDS) is not supported")
            raise ConfigError(name, f"{path}.typed_config", f"filter {f.name!r} has no typed_config")
        msg, type_ = unpack(f.typed_config, _FILTERS, name, f"{path}.typed_config")
        if type_ == _ROUTER:
            if i != last:
                raise ConfigError(name, path, f"terminal filter {f.name!r} (router) must be the last filter")
            if f.disabled:
                raise ConfigError(name, f"{path}.disabled", "the last (terminal) filter cannot be disabled")
        elif i == last:
            raise ConfigError(name, path, f"filter {f.name!r} ({type_ or 'no type'}) is last, but the last filter "
                              "must be the router")
        if msg is None:
            if type_ in NO_EFFECT_FILTERS or f.is_optional:
                continue
            raise ConfigError(name, f"{path}.typed_config", f"unsupported HTTP filter type {type_!r} "
                              "(supported: Router, HTTPFault; mark the filter is_optional to skip it)")
        config = fault_spec(msg, name, f"{path}.typed_config") if type_ == _FAULT else None
        out.append(HttpFilterSpec(f.name, type_, config, f.disabled))
    return tuple(out)


#: FractionalPercent.DenominatorType (HUNDRED, TEN_THOUSAND, MILLION) -> denominator
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def fault_spec(msg: Any, name: str, path: str) -> FaultSpec:
    """``HTTPFault`` -> :class:`FaultSpec` (the module docstring lists the rules)."""
    fields: Dict[str, Any] = {}
    if msg.HasField("delay"):
        delay, dpath = msg.delay, f"{path}.delay"
        which = delay.WhichOneof("fault_delay_secifier")
        if which == "fixed_delay":
            fields["fixed_delay"] = seconds(delay.fixed_delay, name, f"{dpath}.fixed_delay", positive=True)
        elif which == "header_delay":
            fields["header_delay"] = True
        else:
            raise ConfigError(name, dpath, "fault_delay_secifier is required: set fixed_delay or header_delay")
        fields["delay_per_million"] = per_million(delay.percentage, name, f"{dpath}.percentage")
        fields["delay_percent_denominator"] = _DENOMINATORS[delay.percentage.denominator]
    if msg.HasField("abort"):
        abort, apath = msg.abort, f"{path}.abort"
        which = abort.WhichOneof("error_type")
        if which == "http_status":
            if not 200 <= abort.http_status < 600:
                raise ConfigError(name, f"{apath}.http_status", "value must be inside range [200, 600)")
            fields["abort_http_status"] = abort.http_status
        elif which == "grpc_status":
            fields["abort_grpc_status"] = abort.grpc_status
        elif which == "header_abort":
            fields["header_abort"] = True
        else:
            raise ConfigError(name, apath, "error_type is required: set http_status, grpc_status or header_abort")
        fields["abort_per_million"] = per_million(abort.percentage, name, f"{apath}.percentage")
        fields["abort_percent_denominator"] = _DENOMINATORS[abort.percentage.denominator]
    if msg.HasField("max_active_faults"):
        fields["max_active_faults"] = msg.max_active_faults.value
    if msg.upstream_cluster:
        fields["upstream_cluster"] = msg.upstream_cluster
    if len(msg.headers):
        ctx = _Ctx(name)
        fields["headers"] = tuple(_header_matcher(ctx, h, f"{path}.headers[{i}]") for i, h in enumerate(msg.headers))
    if len(msg.downstream_nodes):
        raise ConfigError(name, f"{path}.downstream_nodes", "not supported")
    if msg.HasField("response_rate_limit"):
        raise ConfigError(name, f"{path}.response_rate_limit", "not supported")
    return FaultSpec(**fields)
