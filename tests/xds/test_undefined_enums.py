"""Undefined enum numbers (possible on the wire: proto3 enums are open) in any enum field of a
Cluster, RouteConfiguration, Listener or ClusterLoadAssignment never escape decoding as anything
but ConfigError (Envoy's ``enum.defined_only`` rejects most of them)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.descriptor import FieldDescriptor

from meshcore.errors import ConfigError
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE
from meshcore.xds.resource_types import RESOURCE_TYPES


def _enum_paths(descriptor, prefix=(), depth=0):
    """(field path, field) for every singular enum field reachable through singular messages."""
    for f in descriptor.fields:
        if f.is_repeated if hasattr(f, "is_repeated") else f.label == FieldDescriptor.LABEL_REPEATED:
            continue
        if f.type == FieldDescriptor.TYPE_ENUM:
            yield prefix + (f.name,), f
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3 and not f.message_type.full_name.startswith("google."):
            yield from _enum_paths(f.message_type, prefix + (f.name,), depth + 1)


def _base(type_url):
    if type_url == CLUSTER:
        return cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.EDS,
                                   eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(service_name="c"))
    if type_url == ROUTE:
        rc = route_pb2.RouteConfiguration(name="r")
        vh = rc.virtual_hosts.add(name="vh", domains=["*"])
        r = vh.routes.add(name="x")
        r.match.prefix = "/"
        r.route.cluster = "c"
        return rc
    if type_url == LISTENER:
        return listener_pb2.Listener(name="l")
    return endpoint_pb2.ClusterLoadAssignment(cluster_name="c")


CASES = [(t, ".".join(path)) for t in (CLUSTER, ROUTE, LISTENER, ENDPOINT)
         for path, _ in _enum_paths(_base(t).DESCRIPTOR)]


@pytest.mark.parametrize("type_url,path", CASES, ids=[f"{t.rsplit('.', 1)[-1]}:{p}" for t, p in CASES])
def test_undefined_enum_number_is_config_error_or_accepted(type_url, path):
    msg = _base(type_url)
    target = msg
    parts = path.split(".")
    for name in parts[:-1]:
        target = getattr(target, name)
    setattr(target, parts[-1], 12345)
    try:
        RESOURCE_TYPES[type_url].decode(msg)
    except ConfigError:
        pass
