"""HTTP fault injection (``envoy.filters.http.fault``), applied before a request is routed upstream.

Per request: with probability ``delay_per_million`` wait ``fixed_delay``; with probability
``abort_per_million`` answer with ``abort_http_status`` (or ``abort_grpc_status``) without
contacting the upstream. Header-controlled faults read ``x-envoy-fault-delay-request`` (ms) and
``x-envoy-fault-abort-request`` (HTTP status) / ``x-envoy-fault-abort-grpc-request`` when the
filter enables them; ``x-envoy-fault-*-percentage`` headers are not modelled (100 %% of the
configured percentage applies). ``upstream_cluster`` restricts the fault to requests routed to
that cluster and ``headers`` to requests whose headers all match (route header-matcher
semantics). Not modelled: ``max_active_faults``.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, NamedTuple, Optional

__all__ = ["FaultDecision", "decide_fault"]


class FaultDecision(NamedTuple):
    delay: float  # seconds; 0: none
    abort_http_status: Optional[int]
    abort_grpc_status: Optional[int]

    @property
    def aborts(self) -> bool:
        return self.abort_http_status is not None or self.abort_grpc_status is not None


NO_FAULT = FaultDecision(0.0, None, None)


def _header_int(headers: Mapping[str, str], name: str) -> Optional[int]:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def decide_fault(spec: Any, headers: Mapping[str, str], rng: random.Random, cluster: Optional[str] = None) -> FaultDecision:
    """The fault a request gets under ``spec`` (a ``FaultSpec``); ``headers`` are lower-cased."""
    if spec is None or (spec.upstream_cluster and spec.upstream_cluster != cluster):
        return NO_FAULT
    if spec.headers:
        from .._fast.routes_py import _header_matches

        lists = {k: [v] for k, v in headers.items()}
        if not all(_header_matches(h, lists) for h in spec.headers):
            return NO_FAULT
    delay = 0.0
    if spec.delay_per_million and rng.randrange(1_000_000) < spec.delay_per_million:
        if spec.header_delay:
            ms = _header_int(headers, "x-envoy-fault-delay-request")
            delay = (ms or 0) / 1000.0
        elif spec.fixed_delay:
            delay = spec.fixed_delay
    http_status = grpc_status = None
    if spec.abort_per_million and rng.randrange(1_000_000) < spec.abort_per_million:
        if spec.header_abort:
            http_status = _header_int(headers, "x-envoy-fault-abort-request")
            grpc_status = _header_int(headers, "x-envoy-fault-abort-grpc-request")
        else:
            http_status, grpc_status = spec.abort_http_status, spec.abort_grpc_status
    return FaultDecision(delay, http_status, grpc_status)
