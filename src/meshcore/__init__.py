"""meshcore: a proxyless service-mesh data plane for Python (Envoy semantics, in process)."""

from __future__ import annotations

import logging

from ._fast import IMPLEMENTATION, LoadBalancer, RouteTable, _xds_hook, xxh64
from ._routing import RouteMatch
from ._model import Endpoint, HealthStatus, Locality
from ._options import POLICIES, LbConfig
from .errors import ConfigError, MeshClosed, MeshError, NoRoute, NotReady, Unavailable

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATION",
    "POLICIES",
    "ConfigError",
    "Endpoint",
    "HealthStatus",
    "LbConfig",
    "LoadBalancer",
    "Locality",
    "Call",
    "CertificatesUnavailable",
    "CircuitBreakerOpen",
    "FileCertificateSource",
    "FaultAbort",
    "Mesh",
    "MeshClosed",
    "MeshError",
    "NoRoute",
    "NotReady",
    "PeerCertificate",
    "Pick",
    "RbacEngine",
    "RouteMatch",
    "RouteTable",
    "TlsHandshakeError",
    "Unavailable",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamTls",
    "WorkloadIdentity",
    "__version__",
    "xxh64",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _load_balancer_arguments(cluster: object, load_assignment: object = None) -> tuple:
    from .xds.lb_config import load_balancer_arguments

    return load_balancer_arguments(cluster, load_assignment)


def _route_config_spec(route_configuration: object) -> object:
    from .xds.route_config import route_config_spec

    return route_config_spec(route_configuration)


# LoadBalancer.from_xds and RouteTable.from_xds (both twins) decode through these: ``_fast``
# imports nothing above it, so the package plugs in the xDS layer (imported on first use).
_xds_hook.register("load_balancer", _load_balancer_arguments)
_xds_hook.register("route_config", _route_config_spec)

_LAZY = {"Mesh": "mesh", "Pick": "mesh", "Call": "call", "CircuitBreakerOpen": "call", "FaultAbort": "call",
         "UpstreamError": "call", "UpstreamTimeout": "call", "CertificatesUnavailable": "tls",
         "FileCertificateSource": "tls", "TlsHandshakeError": "tls", "UpstreamTls": "tls", "WorkloadIdentity": "tls",
         "RbacEngine": "rbac", "PeerCertificate": "rbac"}  # the xDS layer imports grpc: loaded on first use


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
