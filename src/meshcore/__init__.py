"""meshcore: a proxyless service-mesh data plane for Python (Envoy semantics, in process)."""

from __future__ import annotations

import logging

from ._fast import IMPLEMENTATION, LoadBalancer, RouteTable, xxh64
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
