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
"name": ..., "resource": {...}}``). Field names may be camelCase or snake_case.

Parsing is as strict as Envoy's JSON/YAML loading: an unknown field, an unknown enum value name,
a value of the wrong type, a non-string ``@type``, a string that is not valid UTF-8 (a lone
surrogate) and nesting deeper than :data:`MAX_DEPTH` levels are errors. Binary resources
(messages, ``Any``) keep protobuf's rule: unknown fields are ignored.

``Any`` values (``typed_config`` ...) are parsed as their ``@type`` strictly. A type meshcore's
protobuf registry lacks is looked up among the installed Envoy/xDS protos of its package
(imported on first use). If that package exists but has no such message, the ``@type`` is an
error (Envoy rejects unknown types too). A type from a package meshcore does not ship (Istio's
``istio.*`` filters, a vendor's extension) cannot be checked here: it is kept, unchecked, as an
``xds.type.v3.TypedStruct`` holding its type URL and fields, which is how Envoy itself accepts
typed configs as JSON, and meshcore's decoders then report the wrapped type as unsupported where
it matters.

Errors raise :class:`~meshcore.errors.ConfigError` naming the source, the resource and the field
path, e.g. ``ConfigError("file.yaml", "resources[3].lb_policy", "Cluster 'c1': unknown enum value
'LEAST_REQUESTS' ...")``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.message import Message

from ..errors import ConfigError
from ._decode import is_map, is_repeated, json_fields, type_name
from .model import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS

__all__ = [
    "MAX_DEPTH", "Resources", "MESSAGE_CLASSES", "parse_resources", "parse_resource", "load_resource_file",
    "decode_document", "resource_name", "type_url_of",
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


# -- strict proto3-JSON parsing ---------------------------------------------------------------------

#: Deepest nesting of objects and lists inside one resource (a ``typed_per_filter_config``
#: Struct 1,000 levels deep would otherwise exhaust the interpreter's recursion limit).
MAX_DEPTH = 100

_TYPED_STRUCT_URL = "type.googleapis.com/xds.type.v3.TypedStruct"
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+\Z")
# Roots of the proto packages installed with meshcore (xds-protos): a package under one of these
# that is not installed, or a message its package lacks, is unknown to Envoy as well.
_PROTO_ROOTS = frozenset({"envoy", "xds", "udpa", "validate", "google"})
_import_lock = threading.Lock()
_imported_packages: Set[str] = set()  # installed packages already imported (never a missing one)


def _safe(text: str) -> str:
    """``text`` with lone surrogates escaped, fit for an error message."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _import_package(package: str) -> bool:
    """Import every ``*_pb2`` module of an installed proto package (registering its messages);
    whether the package is installed. Only packages under :data:`_PROTO_ROOTS` are looked at.
    Only installed packages are remembered: the ``@type`` values of a file (any names at all)
    must not grow a table that lives as long as the process."""
    with _import_lock:
        if package in _imported_packages:
            return True
        known = False
        if package.split(".", 1)[0] in _PROTO_ROOTS:
            try:
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError):
                spec = None
            locations = list(spec.submodule_search_locations or ()) if spec is not None else []
            for directory in locations:
                known = True
                try:
                    files = sorted(os.listdir(directory))
                except OSError:
                    continue
                for filename in files:
                    if filename.endswith("_pb2.py"):
                        try:
                            importlib.import_module(f"{package}.{filename[:-3]}")
                        except Exception as exc:  # a module that does not import: its types stay unknown
                            logger.debug("cannot import %s.%s: %s", package, filename[:-3], exc)
        if known:
            _imported_packages.add(package)
        return known


def _find_type(name: str) -> Tuple[Optional[Any], bool]:
    """``(descriptor or None, whether the name's package is one meshcore has the protos of)``."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindMessageTypeByName(name), True
    except KeyError:
        pass
    if not _TYPE_NAME.match(name):
        return None, False
    known = _import_package(name.rpartition(".")[0])
    try:
        return pool.FindMessageTypeByName(name), True
    except KeyError:
        return None, known


class _StrictJson:
    """Checks one resource's proto3 JSON against its descriptor and returns a copy ready for
    ``json_format.ParseDict`` (unknown ``Any`` types wrapped in TypedStruct). Every problem is a
    ``ConfigError(source, where + field path, "<Kind> '<name>': reason")``."""

    def __init__(self, source: str, where: str, label: str) -> None:
        self.source = source
        self.where = where
        self.label = label

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.source, _join(self.where, path), f"{self.label}: {reason}")

    def message(self, value: Any, desc: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels")
        full = desc.full_name
        if full == "google.protobuf.Any":
            return self.any(value, path, depth)
        if full.startswith("google.protobuf."):  # well-known types have their own JSON forms
            self.plain(value, path, depth)
            return value
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object ({full}), got {_kind(value)}")
        fields = json_fields(desc)
        out: Dict[str, Any] = {}
        seen: Set[str] = set()
        for key, item in value.items():
            if not isinstance(key, str):
                raise self.fail(path, f"field names must be strings, got {_kind(key)} {key!r}")
            f = fields.get(key)
            if f is None:
                raise self.fail(_join(path, _safe(key)), f'unknown field "{_safe(key)}" in {full}')
            if f.name in seen:
                raise self.fail(_join(path, f.name), f"given twice ({f.name} and {f.json_name})")
            seen.add(f.name)
            out[key] = self.field(f, item, _join(path, f.name), depth + 1)
        return out

    def field(self, f: Any, value: Any, path: str, depth: int) -> Any:
        if value is None:
            return None
        if is_map(f):
            if not isinstance(value, Mapping):
                raise self.fail(path, f"expected an object (a map), got {_kind(value)}")
            vf = f.message_type.fields_by_name["value"]
            out = {}
            for key, item in value.items():
                if isinstance(key, str):
                    self.string(key, path)
                out[key] = self.value(vf, item, f"{path}[{_safe(str(key))}]", depth + 1)
            return out
        if is_repeated(f):
            if not isinstance(value, list):
                raise self.fail(path, f"expected a list, got {_kind(value)}")
            return [self.value(f, item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        return self.value(f, value, path, depth)

    def value(self, f: Any, value: Any, path: str, depth: int) -> Any:
        if f.message_type is not None:
            return self.message(value, f.message_type, path, depth)
        if isinstance(value, str):
            self.string(value, path)
            enum = f.enum_type
            if enum is not None and value not in enum.values_by_name:
                names = ", ".join(v.name for v in enum.values)
                raise self.fail(path, f"unknown enum value '{_safe(value)}' for {enum.full_name} (one of: {names})")
        return value

    def any(self, value: Any, path: str, depth: int) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object with @type (google.protobuf.Any), got {_kind(value)}")
        if not value:
            return value
        type_url = value.get("@type")
        if type_url is None:
            raise self.fail(path, "@type is missing (google.protobuf.Any)")
        if not isinstance(type_url, str):
            raise self.fail(_join(path, "@type"), f"must be a string, got {_kind(type_url)}")
        self.string(type_url, _join(path, "@type"))
        rest = {k: v for k, v in value.items() if k != "@type"}
        name = type_name(type_url)
        desc, known_package = _find_type(name)
        if desc is None:
            if known_package or not _TYPE_NAME.match(name):
                raise self.fail(_join(path, "@type"), f"unknown type {_safe(type_url)!r}")
            self.plain(rest, path, depth)
            logger.debug("%s: %s: type %s is not known here; kept unchecked", self.source,
                         _join(self.where, path), type_url)
            return {"@type": _TYPED_STRUCT_URL, "typeUrl": type_url, "value": rest}
        if desc.full_name.startswith("google.protobuf."):  # {"@type": ..., "value": <its JSON>}
            self.plain(rest, path, depth)
            return value
        out = self.message(rest, desc, path, depth)
        out["@type"] = type_url
        return out

    def plain(self, value: Any, path: str, depth: int) -> None:
        """Any JSON (Struct, wrappers, durations...): depth, string keys, valid strings."""
        stack: List[Tuple[Any, int]] = [(value, depth)]
        while stack:
            node, d = stack.pop()
            if isinstance(node, str):
                self.string(node, path)
            elif isinstance(node, (Mapping, list)):
                if d > MAX_DEPTH:
                    raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels")
                if isinstance(node, Mapping):
                    for key, item in node.items():
                        if not isinstance(key, str):
                            raise self.fail(path, f"object keys must be strings, got {_kind(key)} {key!r}")
                        self.string(key, path)
                        stack.append((item, d + 1))
                else:
                    stack.extend((item, d + 1) for item in node)

    def string(self, text: str, path: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(path, f"invalid UTF-8 in '{_safe(text)[:80]}' (a lone surrogate)") from None

    def locate(self, value: Any, desc: Any, path: str) -> Tuple[str, str]:
        """After ``ParseDict`` failed: the deepest field that fails on its own, and why."""
        if isinstance(value, Mapping) and desc.full_name == "google.protobuf.Any" and "@type" in value:
            inner, _ = _find_type(type_name(str(value["@type"])))
            if inner is not None and not inner.full_name.startswith("google.protobuf."):
                return self.locate({k: v for k, v in value.items() if k != "@type"}, inner, path)
        if not isinstance(value, Mapping) or desc.full_name.startswith("google.protobuf."):
            return path, _parse_problem(value, desc) or "invalid value"
        fields = json_fields(desc)
        for key, item in value.items():
            f = fields[key]
            sub = _join(path, f.name)
            reason = _parse_problem({key: item}, desc)
            if reason is None:
                continue
            if f.message_type is not None and item is not None:
                if is_map(f) and isinstance(item, Mapping):
                    vf = f.message_type.fields_by_name["value"]
                    for k, v in item.items():
                        if vf.message_type is not None and _parse_problem(v, vf.message_type):
                            return self.locate(v, vf.message_type, f"{sub}[{_safe(str(k))}]")
                elif is_repeated(f) and isinstance(item, list):
                    for i, v in enumerate(item):
                        if _parse_problem(v, f.message_type):
                            return self.locate(v, f.message_type, f"{sub}[{i}]")
                elif not is_map(f) and not is_repeated(f):
                    return self.locate(item, f.message_type, sub)
            return sub, reason
        return path, _parse_problem(value, desc) or "invalid value"


def _parse_problem(value: Any, desc: Any) -> Optional[str]:
    """Why ``ParseDict`` rejects ``value`` as a ``desc`` message (None: it does not)."""
    from google.protobuf import message_factory

    try:
        json_format.ParseDict(value, message_factory.GetMessageClass(desc)())
    except Exception as exc:  # the protobuf runtime's errors on odd input vary (SystemError...)
        return _clean(exc)
    return None


_FAILED_TO_PARSE = re.compile(r"^(Failed to parse \w+ field: )+")
_AT = re.compile(r" at [\w.\[\]\"]+\.?$")


def _clean(exc: BaseException) -> str:
    text = _safe(str(exc)).split("\n", 1)[0]
    text = _AT.sub("", _FAILED_TO_PARSE.sub("", text)).strip()
    return text or type(exc).__name__


def _join(base: str, path: str) -> str:
    if not path:
        return base
    if not base:
        return path
    return base + path if path.startswith("[") else f"{base}.{path}"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _label(cls: type, body: Mapping[str, Any]) -> str:
    """``Cluster 'c1'``: the kind and, when the body has one, the name of a resource."""
    kind = cls.DESCRIPTOR.name
    keys = ("cluster_name", "clusterName") if cls is endpoint_pb2.ClusterLoadAssignment else ("name",)
    for key in keys:
        name = body.get(key)
        if isinstance(name, str) and name:
            return f"{kind} '{_safe(name)}'"
    return kind


def _parse_strict(body: Mapping[str, Any], cls: type, source: str, where: str) -> Message:
    checker = _StrictJson(source, where, _label(cls, body))
    ready = checker.message(body, cls.DESCRIPTOR, "", 0)
    message = cls()
    try:
        json_format.ParseDict(ready, message)
    except Exception:  # noqa: BLE001 -- ParseError, TypeError, OverflowError, SystemError ...
        path, reason = checker.locate(ready, cls.DESCRIPTOR, "")
        raise checker.fail(path, reason) from None
    return message


def _decode_dict(obj: Mapping[str, Any], type_url: Optional[str], source: str, where: str) -> Message:
    """One resource dict (maybe with ``@type``, maybe Resource-wrapped) -> message."""
    declared = obj.get("@type")
    if declared is not None and not isinstance(declared, str):
        raise ConfigError(source, _join(where, "@type"), f"must be a string, got {_kind(declared)}")
    if declared == _RESOURCE_WRAPPER:
        inner = obj.get("resource")
        if not isinstance(inner, Mapping):
            raise ConfigError(source, where, "Resource wrapper without a 'resource' object")
        wrapper_fields = json_fields(discovery_pb2.Resource.DESCRIPTOR)
        for key in obj:
            if key != "@type" and key not in wrapper_fields:
                raise ConfigError(source, _join(where, _safe(str(key))),
                                  f'unknown field "{_safe(str(key))}" in {discovery_pb2.Resource.DESCRIPTOR.full_name}')
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
    return _parse_strict(body, cls, source, where)


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


def decode_document(text: Union[str, bytes], source: str) -> Any:
    """A YAML or JSON document (told apart by content) -> Python objects; ``ConfigError(source,
    "(document)", ...)`` when it cannot be read. YAML anchors that expand to far more nodes than
    the text has characters (an "alias bomb") are refused."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(source, "(document)", f"not UTF-8: {exc}") from None
    try:
        doc = _decode_text(text, source)
    except RecursionError:
        raise ConfigError(source, "(document)", f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    _check_size(doc, 16 * len(text) + 1024, source)
    return doc


def _check_size(doc: Any, budget: int, source: str) -> None:
    stack = [doc]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(source, "(document)", "too many nodes for its size (YAML aliases expanding "
                                                    "without bound?)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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
        raise ConfigError(source, "(document)", f"invalid YAML/JSON: {_yaml_problem(exc)}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp out of range
        raise ConfigError(source, "(document)", f"invalid YAML: {_safe(str(exc))}") from None


def _yaml_problem(exc: Any) -> str:
    """PyYAML's message without its ``in "<unicode string>"`` lines: ``line L, column C: problem``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return _safe(str(exc)).replace('in "<unicode string>", ', "")
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return _safe(f"{where}: {problem}" + (f" ({context})" if context else ""))


def load_resource_file(path: Union[str, "os.PathLike[str]"]) -> Resources:
    """Read a YAML or JSON resource file -> ``{type_url: {name: message}}`` (see :func:`parse_resources`)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # the path once
        raise ConfigError(source, "(file)", f"cannot read: {reason}") from None
    return parse_resources(decode_document(text, source), source)
