"""Client-library integrations: meshcore routing under the HTTP clients people already use.

* :mod:`meshcore.integrations.httpx` -- ``MeshTransport`` / ``AsyncMeshTransport`` for ``httpx``
  and its fork ``httpx2`` (mount them on ``*.svc.cluster.local``).
* :mod:`meshcore.integrations.requests` -- ``MeshAdapter``, a ``requests`` ``HTTPAdapter``.
* :mod:`meshcore.integrations.aiohttp` -- ``MeshSession``, a per-request-routing wrapper of an
  ``aiohttp.ClientSession``.
* :mod:`meshcore.integrations.grpc` -- a ``grpc.Channel`` look-alike picking an endpoint per call.

The HTTP ones route every request (``Mesh.request``), run it under the route's policies
(``Call.run``: fault injection, retries, timeouts, circuit breakers, outlier detection) and send
each attempt to the picked endpoint's ``ip:port`` with the logical ``Host`` header and, for TLS,
the logical host as SNI and verification name. Direct responses, redirects and fault-filter aborts are answered
locally, as Envoy would. Upstream failures surface as the client library's own exceptions; mesh
decisions without an upstream (no route, no healthy endpoint, circuit breaker open, route
timeout) are raised as the library's exceptions too, with the meshcore error as ``__cause__``.

Importing this package imports none of the client libraries; the helpers below are shared by the
integration modules and are not public API.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..errors import Unavailable
from ..resilience.router_headers import ROUTER_HEADERS

__all__: List[str] = []


class _Reply(NamedTuple):
    """A response made without an upstream: status, header pairs, body."""

    status: int
    headers: List[Tuple[str, str]]
    body: bytes


def _target(url: str) -> str:
    """The ``host:port`` target ``Mesh.request`` derives from ``url`` (default ports 80/443)."""
    from ..mesh import parse_url

    return parse_url(url)[3]


def _first_use(mesh: Any, url: str) -> Optional[str]:
    """The target to wait for when ``url``'s target has no configuration yet (else ``None``)."""
    target = _target(url)
    return target if mesh.config(target) is None else None


def _route(mesh: Any, url: str, method: str, headers: Any, ready_timeout: float) -> Any:
    """``mesh.request``; the first request to a target waits up to ``ready_timeout`` for its
    configuration (like a gRPC channel that is still resolving) instead of failing at once."""
    try:
        return mesh.request(url, method, headers)
    except Unavailable:
        target = _first_use(mesh, url) if ready_timeout > 0 else None
        if target is None:
            raise
    mesh.wait_ready(target, ready_timeout)
    return mesh.request(url, method, headers)


async def _aroute(mesh: Any, url: str, method: str, headers: Any, ready_timeout: float,
                  timeout: Optional[float] = None) -> Any:
    """:func:`_route` for event loops (the wait for configuration runs in a thread); ``timeout``
    is the caller's deadline for the whole request (``Mesh.request(timeout=)``)."""
    kw = {"timeout": timeout} if timeout else {}
    try:
        return mesh.request(url, method, headers, **kw)
    except Unavailable:
        target = _first_use(mesh, url) if ready_timeout > 0 else None
        if target is None:
            raise
    await asyncio.to_thread(mesh.wait_ready, target, ready_timeout)
    return mesh.request(url, method, headers, **kw)


def _local_reply(call: Any) -> Optional[_Reply]:
    """The answer of a direct-response or redirect route (``None``: the route has an upstream)."""
    route = call.route
    if route.direct_response is not None:
        status, body = route.direct_response
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
        headers = [("content-type", "text/plain")] if data else []
        return _Reply(int(status), headers, data)
    if route.redirect is not None:
        return _Reply(int(route.redirect_code or 301), [("location", route.redirect)], b"")
    return None


def _fault_reply(exc: Any) -> _Reply:
    """Envoy's local reply for a fault-filter abort (gRPC aborts: a trailers-only 200)."""
    if exc.http_status is None and exc.grpc_status is not None:
        return _Reply(200, [("content-type", "application/grpc"), ("grpc-status", str(exc.grpc_status)),
                            ("grpc-message", "fault filter abort")], b"")
    return _Reply(int(exc.http_status or 503), [("content-type", "text/plain")], b"fault filter abort")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _info(call: Any) -> Dict[str, Any]:
    """What the mesh did for a request: cluster, last endpoint, route name, attempts made."""
    attempts = call.attempts
    return {"cluster": call.cluster, "endpoint": attempts[-1].address if attempts else None,
            "route": call.route.route_name, "attempts": len(attempts)}


def _drop_router_headers(headers: Any) -> Any:
    """Remove the router's x-envoy-* request headers from a (case-insensitive) header mapping:
    Envoy never sends them upstream (its router consumes them on internal requests, its
    connection manager strips them from external ones). Returns ``headers``."""
    for name in ROUTER_HEADERS:
        if name in headers:
            del headers[name]
    return headers


def _retries_possible(call: Any) -> bool:
    """Whether the route may send the request more than once (then its body must be replayable)."""
    policy = call.retry_policy
    return policy is not None and getattr(policy, "num_retries", 1) > 0


def _min_timeout(value: Optional[float], cap: Optional[float]) -> Optional[float]:
    """``value`` bounded by ``cap`` (``None`` means unbounded for either). A cap that is already
    spent (the route deadline passed during a back-off) becomes 1 ms: sockets reject <= 0."""
    if cap is None:
        return value
    cap = max(cap, 0.001)
    if value is None:
        return cap
    return min(value, cap)
