"""Concise builders for the xDS messages tests and demos serve.

>>> lis = api_listener("greeter", route_config_name="greeter-route")
>>> rc = route_config("greeter-route", [virtual_host("vh", ["greeter"], [route(cluster="greeter-cluster")])])
>>> cl = cluster("greeter-cluster", eds_service_name="greeter-endpoints")
>>> cla = assignment("greeter-endpoints", [("127.0.0.1", 50051)])

Every ``LocalityLbEndpoints`` built here has a locality and a ``load_balancing_weight`` (gRPC
drops localities without one). Nested config sources are ADS (``{ads: {}}``, API version V3).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import (
    api_listener_pb2,
    listener_components_pb2,
    listener_pb2,
)
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

__all__ = [
    "ads_config_source", "pack", "router_filter", "http_connection_manager", "api_listener", "http_listener",
    "route_config", "virtual_host", "route", "cluster", "assignment", "locality_endpoints",
]

_HCM_FILTER = "envoy.filters.network.http_connection_manager"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: An endpoint: ``("host", port)``, ``("host", port, weight)``, ``"host:port"`` or a dict with
#: ``address``, ``port`` and optional ``weight`` / ``health`` (``"HEALTHY"``, ``"UNHEALTHY"``, ...).
EndpointLike = Union[str, Tuple[Any, ...], Mapping[str, Any]]


def pack(message: Message) -> any_pb2.Any:
    """``message`` in an ``Any``."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def ads_config_source() -> config_source_pb2.ConfigSource:
    """``{ads: {}, resource_api_version: V3}``."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def router_filter() -> hcm_pb2.HttpFilter:
    """The terminal ``envoy.filters.http.router`` filter."""
    return hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))


def http_connection_manager(route_config_name: Optional[str] = None,
                            route_config: Optional[route_pb2.RouteConfiguration] = None,
                            filters: Optional[Sequence[hcm_pb2.HttpFilter]] = None,
                            stat_prefix: str = "http") -> hcm_pb2.HttpConnectionManager:
    """An HCM using RDS over ADS (``route_config_name``) or an inline ``route_config``.

    ``filters`` defaults to the router alone; a list not ending with the router gets it appended.
    """
    if (route_config_name is None) == (route_config is None):
        raise ValueError("give exactly one of route_config_name and route_config")
    chain = list(filters) if filters is not None else []
    if not chain or chain[-1].name != "envoy.filters.http.router":
        chain.append(router_filter())
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, http_filters=chain)
    if route_config_name is not None:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=route_config_name))
    else:
        hcm.route_config.CopyFrom(route_config)
    return hcm


def api_listener(name: str, route_config_name: Optional[str] = None,
                 route_config: Optional[route_pb2.RouteConfiguration] = None,
                 filters: Optional[Sequence[hcm_pb2.HttpFilter]] = None) -> listener_pb2.Listener:
    """A client-side (proxyless gRPC) listener: ``api_listener`` = HCM (``name`` = the ``xds:///`` target)."""
    hcm = http_connection_manager(route_config_name, route_config, filters)
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm)))


def http_listener(name: str, port: int = 0, route_config_name: Optional[str] = None,
                  route_config: Optional[route_pb2.RouteConfiguration] = None,
                  filters: Optional[Sequence[hcm_pb2.HttpFilter]] = None, address: str = "127.0.0.1",
                  stat_prefix: Optional[str] = None) -> listener_pb2.Listener:
    """An Envoy socket listener on ``address:port`` with one HCM filter chain."""
    hcm = http_connection_manager(route_config_name, route_config, filters, stat_prefix or name)
    chain = listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
        name=_HCM_FILTER, typed_config=pack(hcm))])
    return listener_pb2.Listener(name=name, address=_address(address, port), filter_chains=[chain])


def route_config(name: str, vhosts: Iterable[route_components_pb2.VirtualHost]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(vhosts))


def virtual_host(name: str, domains: Iterable[str] = ("*",),
                 routes: Iterable[route_components_pb2.Route] = ()) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))


def route(prefix: Optional[str] = None, path: Optional[str] = None, cluster: Optional[str] = None,
          weighted: Optional[Mapping[str, int]] = None,
          headers: Optional[Union[Mapping[str, str], Iterable[route_components_pb2.HeaderMatcher]]] = None,
          name: str = "", direct: Optional[Tuple[int, str]] = None,
          timeout: Optional[float] = None) -> route_components_pb2.Route:
    """A route matching ``path`` (exact) or ``prefix`` (default ``"/"``) and ``headers``
    (``{name: exact value}`` or HeaderMatchers), to ``cluster``, ``weighted`` clusters
    (``{name: weight}``) or a ``direct`` response ``(status, body)``."""
    if path is not None and prefix is not None:
        raise ValueError("give path or prefix, not both")
    match = (route_components_pb2.RouteMatch(path=path) if path is not None
             else route_components_pb2.RouteMatch(prefix="/" if prefix is None else prefix))
    if headers:
        if isinstance(headers, Mapping):
            match.headers.extend(route_components_pb2.HeaderMatcher(
                name=k, string_match=string_pb2.StringMatcher(exact=v)) for k, v in headers.items())
        else:
            match.headers.extend(headers)
    result = route_components_pb2.Route(name=name, match=match)
    if sum(x is not None for x in (cluster, weighted, direct)) != 1:
        raise ValueError("give exactly one of cluster, weighted and direct")
    if direct is not None:
        status, body = direct
        result.direct_response.CopyFrom(route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body)))
        return result
    action = route_components_pb2.RouteAction()
    if cluster is not None:
        action.cluster = cluster
    else:
        assert weighted is not None
        action.weighted_clusters.clusters.extend(
            route_components_pb2.WeightedCluster.ClusterWeight(name=n, weight=wrappers_pb2.UInt32Value(value=w))
            for n, w in weighted.items())
    if timeout is not None:
        action.timeout.CopyFrom(_duration(timeout))
    result.route.CopyFrom(action)
    return result


def cluster(name: str, lb_policy: str = "ROUND_ROBIN", eds_service_name: Optional[str] = None,
            connect_timeout: float = 1.0, type: str = "EDS",
            endpoints: Optional[Sequence[EndpointLike]] = None, http2: bool = False) -> cluster_pb2.Cluster:
    """A Cluster: ``type`` EDS (over ADS, ``eds_service_name`` optional) or STATIC/STRICT_DNS/LOGICAL_DNS
    with ``endpoints`` in an inline load assignment. ``http2`` asks for HTTP/2 upstream connections."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.DiscoveryType.Value(type),
                            lb_policy=cluster_pb2.Cluster.LbPolicy.Value(lb_policy),
                            connect_timeout=_duration(connect_timeout))
    if type == "EDS":
        c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
        if eds_service_name:
            c.eds_cluster_config.service_name = eds_service_name
    elif endpoints is not None:
        c.load_assignment.CopyFrom(assignment(name, endpoints))
    if http2:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        c.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    return c


def assignment(cluster_name: str, endpoints: Sequence[EndpointLike] = (),
               localities: Optional[Sequence[Mapping[str, Any]]] = None, priority: int = 0,
               locality: Tuple[str, str, str] = ("local", "z1", ""),
               weight: int = 1) -> endpoint_pb2.ClusterLoadAssignment:
    """A ClusterLoadAssignment named ``cluster_name`` (the EDS service name).

    Either ``endpoints`` in one locality (``locality`` = (region, zone, sub_zone), ``weight``,
    ``priority``), or ``localities``: dicts with ``endpoints`` and optional ``region``, ``zone``,
    ``sub_zone``, ``weight`` (default 1) and ``priority`` (default 0).
    """
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    if localities is None:
        region, zone, sub_zone = locality
        cla.endpoints.append(locality_endpoints(endpoints, region, zone, sub_zone, weight, priority))
    else:
        for spec in localities:
            cla.endpoints.append(locality_endpoints(
                spec.get("endpoints", ()), spec.get("region", "local"), spec.get("zone", ""),
                spec.get("sub_zone", ""), spec.get("weight", 1), spec.get("priority", 0)))
    return cla


def locality_endpoints(endpoints: Sequence[EndpointLike], region: str = "local", zone: str = "z1",
                       sub_zone: str = "", weight: int = 1,
                       priority: int = 0) -> endpoint_components_pb2.LocalityLbEndpoints:
    """One locality with its weight and priority."""
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight), priority=priority,
        lb_endpoints=[_lb_endpoint(e) for e in endpoints])


def _lb_endpoint(spec: EndpointLike) -> endpoint_components_pb2.LbEndpoint:
    fields: Dict[str, Any]
    if isinstance(spec, str):
        host, _, port = spec.rpartition(":")
        fields = {"address": host.strip("[]"), "port": int(port)}
    elif isinstance(spec, Mapping):
        fields = dict(spec)
    else:
        fields = dict(zip(("address", "port", "weight"), spec))
    ep = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_address(fields["address"], int(fields["port"]))))
    if fields.get("weight") is not None:
        ep.load_balancing_weight.value = int(fields["weight"])
    if fields.get("health") is not None:
        ep.health_status = health_check_pb2.HealthStatus.Value(fields["health"])
    return ep


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))

