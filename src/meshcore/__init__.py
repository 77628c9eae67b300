"""meshcore: a proxyless service-mesh data plane for Python (Envoy semantics, in process)."""

from __future__ import annotations

import logging

from ._fast import IMPLEMENTATION, LoadBalancer, RouteTable, xxh64
from ._routing import RouteMatch
from ._model import Endpoint, HealthStatus, Locality
from ._options import POLICIES, LbConfig
from .errors import ConfigError

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
    "RouteMatch",
    "RouteTable",
    "__version__",
    "xxh64",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
