"""Load xDS resources (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment) from files.

Shared by the client's static source and the reference control plane. A document (YAML or JSON,
told apart by content) may have any of these shapes:

* a list of resources, each with an ``"@type"``;
* ``{"resources": [...]}`` (a ``DiscoveryResponse``-like body; ``version_info`` etc. are ignored);
* ``{"listeners": [...], "routes": [...], "clusters": [...], "endpoints": [...]}`` (``"@type"``
  optional there; ``route_configs``/``route_configurations``/``load_assignments`` are aliases);
* one resource with an ``"@type"``;
* ``{type_url: {name: resource}}`` (what :func:`parse_resources` returns);
* an Envoy bootstrap's ``static_resources`` (``{"static_resources": {"listeners", "clusters"}}``)
  or an admin ``/config_dump`` (``{"configs": [...]}``; static and dynamic active resources).

A resource may also be wrapped in a ``envoy.service.discovery.v3.Resource`` (``{"@type": ...Resource,
"name": ..., "resource": {...}}``). Field names may be camelCase or snake_case; unknown fields are
ignored. Errors raise :class:`~meshcore.errors.ConfigError` naming the source and the resource
(``ConfigError("file.yaml", "resources[3]", "unknown @type ...")``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from ..errors import ConfigError
from .model import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS

__all__ = [
    "Resources", "MESSAGE_CLASSES", "parse_resources", "parse_resource", "load_resource_file",
    "resource_name", "type_url_of",
]

logger = logging.getLogger(__name__)

#: ``{type_url: {name: message}}``.
Resources = Dict[str, Dict[str, Message]]

#: The four resource types and their protobuf classes.
MESSAGE_CLASSES: Dict[str, type] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}

_RESOURCE_WRAPPER = "type.googleapis.com/" + discovery_pb2.Resource.DESCRIPTOR.full_name

# Keys of the "by kind" shape -> type URL.
_KIND_KEYS: Dict[str, str] = {
    "listeners": LISTENER,
    "routes": ROUTE, "route_configs": ROUTE, "route_configurations": ROUTE,
    "routeConfigs": ROUTE, "routeConfigurations": ROUTE,
    "clusters": CLUSTER,
    "endpoints": ENDPOINT, "load_assignments": ENDPOINT, "loadAssignments": ENDPOINT,
    "cluster_load_assignments": ENDPOINT, "clusterLoadAssignments": ENDPOINT,
}

# Envoy admin config_dump sections: list key -> (keys leading to the resource, type URL).
_DUMP_SECTIONS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "static_listeners": (("listener",), LISTENER),
    "dynamic_listeners": (("active_state", "listener"), LISTENER),
    "static_route_configs": (("route_config",), ROUTE),
    "dynamic_route_configs": (("route_config",), ROUTE),
    "static_clusters": (("cluster",), CLUSTER),
    "dynamic_active_clusters": (("cluster",), CLUSTER),
    "static_endpoint_configs": (("endpoint_config",), ENDPOINT),
    "dynamic_endpoint_configs": (("endpoint_config",), ENDPOINT),
}

# Extension messages that commonly appear inside ``Any`` fields; importing them registers their
# descriptors so that json_format can decode ``typed_config`` and friends.
_EXTENSION_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.network.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.filters.http.health_check.v3.health_check_pb2",
    "envoy.extensions.filters.http.stateful_session.v3.stateful_session_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
    "envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2",
    "envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.clusters.aggregate.v3.cluster_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.load_balancing_policies.round_robin.v3.round_robin_pb2",
    "envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2",
    "envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2",
    "envoy.extensions.load_balancing_policies.maglev.v3.maglev_pb2",
    "envoy.extensions.load_balancing_policies.random.v3.random_pb2",
    "envoy.extensions.load_balancing_policies.wrr_locality.v3.wrr_locality_pb2",
    ("envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3."
     "client_side_weighted_round_robin_pb2"),
    "envoy.extensions.load_balancing_policies.pick_first.v3.pick_first_pb2",
    "xds.type.v3.typed_struct_pb2",
    "udpa.type.v1.typed_struct_pb2",
)


def _register_extensions() -> None:
    for module in _EXTENSION_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an older xds-protos: decode what we can
            logger.debug("extension module %s not available: %s", module, exc)


_register_extensions()


def resource_name(message: Message) -> str:
    """The xDS name of a resource (``ClusterLoadAssignment.cluster_name`` for EDS, else ``name``)."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return getattr(message, "name", "")


def type_url_of(message: Message) -> str:
    """``type.googleapis.com/<full message name>`` of a message."""
    return "type.googleapis.com/" + message.DESCRIPTOR.full_name


def _decode_dict(obj: Mapping[str, Any], type_url: Optional[str], source: str, where: str) -> Message:
    """One resource dict (maybe with ``@type``, maybe Resource-wrapped) -> message."""
    declared = obj.get("@type")
    if declared is not None and not isinstance(declared, str):
        raise ConfigError(source, where, f"@type must be a string, not {type(declared).__name__}")
    if declared == _RESOURCE_WRAPPER:
        inner = obj.get("resource")
        if not isinstance(inner, Mapping):
            raise ConfigError(source, where, "Resource wrapper without a 'resource' object")
        message = _decode_dict(inner, type_url, source, where + ".resource")
        wrapper_name = obj.get("name")
        if wrapper_name and wrapper_name != resource_name(message):
            raise ConfigError(source, where, f"Resource wrapper name {wrapper_name!r} differs from the "
                                             f"resource's name {resource_name(message)!r}")
        return message
    if declared is None:
        if type_url is None:
            raise ConfigError(source, where, "missing @type")
        declared = type_url
    elif type_url is not None and declared != type_url:
        raise ConfigError(source, where, f"@type {declared} where {type_url} was expected")
    cls = MESSAGE_CLASSES.get(declared)
    if cls is None:
        raise ConfigError(source, where, f"unknown @type {declared!r} (expected one of {', '.join(TYPE_URLS)})")
    body = {k: v for k, v in obj.items() if k != "@type"}
    try:
        return json_format.ParseDict(body, cls(), ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(source, where, f"invalid {cls.DESCRIPTOR.name}: {exc}") from None


def parse_resource(item: Union[Message, Mapping[str, Any]], source: str = "<resources>", where: str = "resource",
                   type_url: Optional[str] = None) -> Tuple[str, str, Message]:
    """One resource -> ``(type_url, name, message)``.

    ``item`` is a message of one of the four types, an ``Any`` or ``discovery.v3.Resource`` holding
    one, or a dict (see the module docstring). ``type_url`` is the type expected (None: any of the
    four). Raises ``ConfigError(source, where, ...)``.
    """
    if isinstance(item, Message):
        message = _unwrap_message(item, source, where)
        url = type_url_of(message)
        if url not in MESSAGE_CLASSES:
            raise ConfigError(source, where, f"unsupported message type {message.DESCRIPTOR.full_name}")
        if type_url is not None and url != type_url:
            raise ConfigError(source, where, f"@type {url} where {type_url} was expected")
    elif isinstance(item, Mapping):
        message = _decode_dict(item, type_url, source, where)
        url = type_url_of(message)
    else:
        raise ConfigError(source, where, f"a resource must be an object, not {type(item).__name__}")
    name = resource_name(message)
    if not name:
        field = "cluster_name" if url == ENDPOINT else "name"
        raise ConfigError(source, where, f"{message.DESCRIPTOR.name} without a {field}")
    return url, name, message


def _unwrap_message(item: Message, source: str, where: str) -> Message:
    if isinstance(item, discovery_pb2.Resource):
        if not item.HasField("resource"):
            raise ConfigError(source, where, "Resource wrapper without a resource")
        item = item.resource
    if isinstance(item, any_pb2.Any):
        cls = MESSAGE_CLASSES.get(item.type_url)
        if cls is None:
            raise ConfigError(source, where, f"unknown @type {item.type_url!r}")
        message = cls()
        if not item.Unpack(message):
            raise ConfigError(source, where, f"cannot unpack {item.type_url}")
        return message
    return item


def _entries(obj: Any, source: str) -> Iterator[Tuple[Any, str, Optional[str]]]:
    """Yield ``(resource, where, expected type_url)`` for every resource of a document."""
    if isinstance(obj, Message):
        yield obj, "resource", None
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield item, f"resources[{i}]", None
    elif isinstance(obj, Mapping):
        if "@type" in obj:
            yield obj, "resource", None
            return
        matched = False
        for url in MESSAGE_CLASSES:  # the {type_url: {name: resource}} result shape itself
            if url in obj:
                matched = True
                by_name = obj[url]
                if not isinstance(by_name, Mapping):
                    raise ConfigError(source, url, "must map names to resources")
                for name, item in by_name.items():
                    yield item, f"{url}[{name!r}]", url
        if "resources" in obj:
            matched = True
            items = obj["resources"]
            if not isinstance(items, list):
                raise ConfigError(source, "resources", "must be a list")
            for i, item in enumerate(items):
                yield item, f"resources[{i}]", None
        for key, url in _KIND_KEYS.items():
            if key in obj:
                matched = True
                items = obj[key]
                if items is None:
                    continue
                if not isinstance(items, list):
                    raise ConfigError(source, key, "must be a list")
                for i, item in enumerate(items):
                    yield item, f"{key}[{i}]", url
        static = obj.get("static_resources", obj.get("staticResources"))
        if static is not None:
            matched = True
            if not isinstance(static, Mapping):
                raise ConfigError(source, "static_resources", "must be an object")
            for key, url in (("listeners", LISTENER), ("clusters", CLUSTER)):
                for i, item in enumerate(static.get(key) or ()):
                    yield item, f"static_resources.{key}[{i}]", url
        if "configs" in obj:
            matched = True
            yield from _config_dump_entries(obj["configs"], source)
        if not matched:
            raise ConfigError(source, "(document)", "no resources found: expected a list, 'resources', "
                                                    "'listeners'/'routes'/'clusters'/'endpoints' or one resource "
                                                    "with '@type'")
    elif obj is None:
        return
    else:
        raise ConfigError(source, "(document)", f"expected a list or an object, not {type(obj).__name__}")


def _config_dump_entries(configs: Any, source: str) -> Iterator[Tuple[Any, str, Optional[str]]]:
    if not isinstance(configs, list):
        raise ConfigError(source, "configs", "must be a list")
    for c, section in enumerate(configs):
        if not isinstance(section, Mapping):
            continue
        for key, (path, url) in _DUMP_SECTIONS.items():
            for i, entry in enumerate(section.get(key) or ()):
                value: Any = entry
                for step in path:
                    value = value.get(step) if isinstance(value, Mapping) else None
                if value is not None:
                    yield value, f"configs[{c}].{key}[{i}]", url


def parse_resources(obj: Any, source: str = "<resources>") -> Resources:
    """A decoded document (see the module docstring) -> ``{type_url: {name: message}}``.

    All four type URLs are always present in the result. Two resources of one type with the same
    name are an error.
    """
    result: Resources = {url: {} for url in TYPE_URLS}
    seen: Dict[Tuple[str, str], str] = {}
    for item, where, expected in _entries(obj, source):
        url, name, message = parse_resource(item, source, where, expected)
        first = seen.get((url, name))
        if first is not None:
            raise ConfigError(source, where, f"duplicate {url.rsplit('.', 1)[-1]} name {name!r} (first at {first})")
        seen[(url, name)] = where
        result[url][name] = message
    return result


def _decode_text(text: str, source: str) -> Any:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # maybe YAML flow style; let the YAML parser report
    try:
        import yaml
    except ImportError:
        raise ConfigError(source, "(document)", "not JSON, and pyyaml is not installed to read YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "(document)", f"invalid YAML/JSON: {exc}") from None


def load_resource_file(path: Union[str, "os.PathLike[str]"]) -> Resources:
    """Read a YAML or JSON resource file -> ``{type_url: {name: message}}`` (see :func:`parse_resources`)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc}") from None
    return parse_resources(_decode_text(text, source), source)
