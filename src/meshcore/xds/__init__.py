"""The xDS layer (pure Python): bootstrap, the ADS client, resource decoders, publishing.

* :class:`~meshcore.xds.bootstrap.Bootstrap`: gRPC (and Envoy) bootstrap files.
* :class:`~meshcore.xds.client.XdsClient`: one ADS stream (SotW or delta) and the resource cache.
* Decoders from xDS resources (messages or proto3-JSON dicts) to meshcore's protobuf-free models:
  :func:`listener_spec`, :func:`route_config_spec`, :func:`cluster_spec`, :func:`endpoints_spec`,
  and :func:`load_balancer_arguments` for ``LoadBalancer``.
* :class:`~meshcore.xds.publisher.ConfigPublisher`: make-before-break snapshots for ``Mesh``.
"""

from __future__ import annotations

from .bootstrap import Bootstrap, BootstrapError
from .cluster_config import cluster_spec
from .endpoint_config import endpoints_spec
from .lb_config import assignment_arguments, cluster_lb_arguments, load_balancer_arguments
from .listener_config import listener_spec
from .route_config import route_config_spec

__all__ = [
    "Bootstrap",
    "BootstrapError",
    "assignment_arguments",
    "cluster_lb_arguments",
    "cluster_spec",
    "endpoints_spec",
    "listener_spec",
    "load_balancer_arguments",
    "route_config_spec",
]
