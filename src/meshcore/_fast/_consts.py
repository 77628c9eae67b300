"""Plain constants of the request path (both ``call`` twins), defined here so that ``_fast``
imports nothing from the layers above it; those layers import them from here and re-export
them under their old names (``meshcore.stats``, ``meshcore.resilience.retry``,
``meshcore.resilience.router_headers``, ``meshcore.telemetry.record``). Imports nothing.
"""

from __future__ import annotations

from typing import List, Tuple

__all__ = ["BUCKETS_MS", "COUNTER_NAMES", "CONNECT_FAILURE", "RESET", "TIMEOUT", "TIMEOUT_MS",
           "PER_TRY_TIMEOUT_MS", "RETRY_ON", "RETRY_GRPC_ON", "MAX_RETRIES", "RETRIABLE_STATUS_CODES",
           "ROUTER_HEADERS", "ACTIVE"]

# -- stats (meshcore.stats) ---------------------------------------------------------------------

#: Envoy's default histogram bucket bounds (milliseconds).
BUCKETS_MS: Tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                                 300000, 600000, 1800000, 3600000)

#: The counters the request path keeps in C (``ClusterCounters.counter_values`` order).
COUNTER_NAMES: Tuple[str, ...] = (
    "upstream_rq_total", "upstream_rq_retry", "upstream_rq_retry_overflow", "upstream_rq_pending_overflow",
    "upstream_cx_connect_fail", "upstream_rq_per_try_timeout", "upstream_rq_rx_reset", "upstream_rq_5xx_local")

# -- upstream failure kinds (meshcore.resilience.retry) -----------------------------------------

CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"  # a per-try timeout (Envoy: 504 upstream request timeout)

# -- the router's x-envoy-* request headers (meshcore.resilience.router_headers) ----------------

TIMEOUT_MS = "x-envoy-upstream-rq-timeout-ms"
PER_TRY_TIMEOUT_MS = "x-envoy-upstream-rq-per-try-timeout-ms"
RETRY_ON = "x-envoy-retry-on"
RETRY_GRPC_ON = "x-envoy-retry-grpc-on"
MAX_RETRIES = "x-envoy-max-retries"
RETRIABLE_STATUS_CODES = "x-envoy-retriable-status-codes"

ROUTER_HEADERS = frozenset({TIMEOUT_MS, PER_TRY_TIMEOUT_MS, RETRY_ON, RETRY_GRPC_ON, MAX_RETRIES,
                            RETRIABLE_STATUS_CODES})

# -- telemetry (meshcore.telemetry.record) ------------------------------------------------------

#: ``[n]``: how many Telemetry objects of the process have a sink (plus one while tracing is on).
#: The request path's first test (one list read) before it looks at its own mesh's sinks. Only
#: ``meshcore.telemetry.record.active_add`` changes it (under one process-wide lock: meshes
#: change it concurrently).
ACTIVE: List[int] = [0]
