"""The four xDS resource types meshcore subscribes to: message class, name, decoder, deletion rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Optional

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from .model import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = ["ResourceType", "RESOURCE_TYPES", "RESOURCE_WRAPPER"]

#: ``envoy.service.discovery.v3.Resource`` inside a SotW response (xds.config.resource-in-sotw).
RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"


# Every decoder takes ``providers``: the bootstrap's certificate provider instance names (None
# when there is no bootstrap, for example resources from a file: the names are then not checked).


def _listener(msg: Any, providers: Optional[Collection[str]] = None) -> Any:
    from .listener_config import listener_spec

    return listener_spec(msg)


def _route(msg: Any, providers: Optional[Collection[str]] = None) -> Any:
    from .route_config import route_config_spec

    return route_config_spec(msg)


def _cluster(msg: Any, providers: Optional[Collection[str]] = None) -> Any:
    from .cluster_config import cluster_spec

    return cluster_spec(msg, providers)


def _endpoints(msg: Any, providers: Optional[Collection[str]] = None) -> Any:
    from .endpoint_config import endpoints_spec

    return endpoints_spec(msg)


@dataclass(frozen=True)
class ResourceType:
    type_url: str
    message_class: Any
    name_field: str
    decode: Callable[..., Any]  # (message, providers=None) -> model; raises ConfigError
    #: SotW: every response carries the full set, so a cached name missing from it is deleted
    #: (LDS, CDS). RDS and EDS responses may be partial: absence means nothing.
    full_state_in_sotw: bool

    def name_of(self, msg: Any) -> str:
        return getattr(msg, self.name_field)


RESOURCE_TYPES: Dict[str, ResourceType] = {
    LISTENER: ResourceType(LISTENER, listener_pb2.Listener, "name", _listener, True),
    ROUTE: ResourceType(ROUTE, route_pb2.RouteConfiguration, "name", _route, False),
    CLUSTER: ResourceType(CLUSTER, cluster_pb2.Cluster, "name", _cluster, True),
    ENDPOINT: ResourceType(ENDPOINT, endpoint_pb2.ClusterLoadAssignment, "cluster_name", _endpoints, False),
}
