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
the logical host as SNI and verification name. Where the cluster's transport socket is mesh TLS
(``Mesh.upstream_tls``: CDS ``transport_socket`` / ``transport_socket_matches``), the attempt's
connection is made with the mesh's client context under the plaintext ``http://`` request (Istio's
ALPN, the workload certificate, the peer's SANs checked before any byte) in a pool of its own;
TLS failures are the library's connect errors (see :mod:`meshcore.tls`). Direct responses, redirects and fault-filter aborts are answered
locally, as Envoy would. Upstream failures surface as the client library's own exceptions; mesh
decisions without an upstream (no route, no healthy endpoint, circuit breaker open, route
timeout) are raised as the library's exceptions too, with the meshcore error as ``__cause__``.

Importing this package imports none of the client libraries; the helpers below are shared by the
integration modules and are not public API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from http import HTTPStatus
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from ..errors import NotReady
from ..resilience.router_headers import ROUTER_HEADERS

__all__: List[str] = []

log = logging.getLogger(__name__)


class _Reply(NamedTuple):
    """A response made without an upstream: status, header pairs, body."""

    status: int
    headers: List[Tuple[str, str]]
    body: bytes


def _live_strip() -> Callable[[Any], Tuple[Any, Optional[str]]]:
    """The live core's ``strip_peer_pairs`` (compiled where built; the twins answer alike)."""
    from .._compat import USE_EXTENSIONS

    if USE_EXTENSIONS:
        try:
            from .._fast.call_c import strip_peer_pairs
            return strip_peer_pairs  # type: ignore[no-any-return]
        except ImportError:  # pragma: no cover  (sdist installed without a compiler)
            pass
    from .._fast.exchange_py import strip_peer_pairs as pure
    return pure


#: ``(header pairs without Istio's exchange headers, the x-envoy-peer-metadata value or None)``
#: of a response (``telemetry.peer_metadata.strip_pairs``, compiled where built)
_strip_peer_pairs = _live_strip()


def _route(mesh: Any, url: str, method: str, headers: Any, ready_timeout: float) -> Any:
    """``mesh.request``. The mesh itself waits for a target's first configuration where it may
    block; where it did not (its ``ready_timeout`` is 0), the first request to a target waits
    up to ``ready_timeout`` here, like a gRPC channel that is still resolving."""
    try:
        return mesh.request(url, method, headers)
    except NotReady as e:
        if ready_timeout <= 0:
            raise
        target = e.target
    mesh.wait_ready(target, ready_timeout)
    return mesh.request(url, method, headers)


async def _aroute(mesh: Any, url: str, method: str, headers: Any, ready_timeout: float,
                  timeout: Optional[float] = None) -> Any:
    """:func:`_route` for event loops: the mesh never blocks a loop's thread, so the first
    request to a target waits for its configuration in a worker thread; ``timeout`` is the
    caller's deadline for the whole request (``Mesh.request(timeout=)``)."""
    kw = {"timeout": timeout} if timeout else {}
    try:
        return mesh.request(url, method, headers, **kw)
    except NotReady as e:
        if ready_timeout <= 0:
            raise
        target = e.target
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


# -- mesh context on errors --------------------------------------------------------------------------


def _context(call: Any = None, target: Optional[str] = None) -> Dict[str, Any]:
    """What the mesh did for a failed request: target, cluster, attempts made, last endpoint."""
    if call is None:
        return {"target": target, "cluster": None, "attempts": 0, "endpoint": None, "route": None}
    attempts = getattr(call, "attempts", None) or []
    route = getattr(call, "route", None)
    return {"target": getattr(call, "target", target), "cluster": getattr(call, "cluster", None),
            "attempts": len(attempts), "endpoint": attempts[-1].address if attempts else None,
            "route": getattr(route, "route_name", None)}


def _add_context(exc: BaseException, call: Any = None, target: Optional[str] = None) -> BaseException:
    """Attach the mesh context to ``exc`` (once): as ``exc.meshcore`` (a dict) and as a PEP 678
    note (``add_note`` on Python >= 3.11; on 3.10 the note goes to ``__notes__``, which tools
    such as pytest and ``exceptiongroup`` print). Returns ``exc``."""
    if getattr(exc, "meshcore", None) is not None:
        return exc
    info = _context(call, target)
    note = (f"meshcore: target {info['target']}, cluster {info['cluster']}, {info['attempts']} attempt(s), "
            f"last endpoint {info['endpoint']}" + (f", route {info['route']!r}" if info["route"] else ""))
    try:
        exc.meshcore = info  # type: ignore[attr-defined]
        add_note = getattr(exc, "add_note", None)
        if add_note is not None:
            add_note(note)
        else:  # Python 3.10: no add_note; the attribute is what 3.11 would set
            notes = getattr(exc, "__notes__", None)
            exc.__notes__ = [*(notes or ()), note]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type with __slots__: leave it as it is
        log.debug("cannot annotate %r with %s", exc, note)
    return exc


# -- per-cluster pools that close when their cluster leaves -------------------------------------------


class _Slot:
    """One pool of an integration (an inner transport, a pool manager ...) and its requests in flight."""

    __slots__ = ("key", "cluster", "pool", "inflight", "retired", "removals")

    def __init__(self, key: Any, cluster: str, pool: Any) -> None:
        self.key = key
        self.cluster = cluster
        self.pool = pool
        self.inflight = 0
        self.retired = False
        self.removals = -1  # the table's removal count when its cluster was last seen live (-1: not)


class _ClusterPools:
    """The per-cluster pools of one integration instance.

    ``acquire(key, cluster)`` returns the slot for ``key`` (``key[0]`` is not special: ``cluster``
    names the cluster the pool belongs to), made with ``make(key)`` on first use and counted in
    flight until ``release(slot)``. When the cluster leaves the mesh's configuration (the mesh
    calls ``_clusters_removed``) its slots leave the table; each is closed with ``close(pool)``
    as soon as it has no request in flight -- at once when idle, else by the ``release`` of its
    last request. A release also retires a slot whose cluster is no longer live (a request
    that was routed just before the removal and made its slot just after); it asks the mesh
    only when a removal was announced since the slot's cluster was last seen live (otherwise
    it is still live: a removal of it retires the slot). ``close`` may be a
    coroutine function (async integrations): closing then happens on the event loop that used
    the pools.
    """

    def __init__(self, mesh: Any, make: Callable[[Any], Any], close: Callable[[Any], Any],
                 is_async: bool = False) -> None:
        self._mesh = mesh
        self._make = make
        self._close = close
        self._async = is_async
        self._lock = threading.Lock()
        self._slots: Dict[Any, _Slot] = {}
        self._loop: Any = None
        self._loop_thread: Optional[int] = None
        self._tasks: Set[Any] = set()
        self._removals = 0  # cluster removals announced so far
        self.closed_pools = 0  # pools closed because their cluster left (tests, introspection)
        listeners = getattr(mesh, "_cluster_listeners", None)
        if listeners is not None:
            listeners.add(self)

    def __len__(self) -> int:
        return len(self._slots)

    def _live(self, cluster: str) -> bool:
        live = getattr(self._mesh, "_is_live_cluster", None)
        return live is None or live(cluster)

    def pools(self) -> Dict[Any, Any]:
        with self._lock:
            return {k: s.pool for k, s in self._slots.items()}

    def acquire(self, key: Any, cluster: str) -> _Slot:
        if self._async:  # async pools change only on their event loop (removals hop onto it): no lock
            slot = self._slots.get(key)
            if slot is not None:
                slot.inflight += 1
                return slot
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(key, cluster, self._make(key))
                if self._live(cluster):
                    slot.removals = self._removals
                log.debug("pool for cluster %r (%r)", cluster, key)
            slot.inflight += 1
        if self._async and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return slot

    def release(self, slot: _Slot) -> Optional[Any]:
        """Count ``slot``'s request done; returns the pool to close now (``None``: none). Sync
        pools are closed here; async callers ``await _ClusterPools.aclose_pool(...)`` it."""
        if self._async:
            slot.inflight -= 1
            if slot.inflight > 0 or not slot.retired and slot.removals == self._removals:
                return None  # in use, or live when last seen and no cluster left since
        with self._lock:
            if not self._async:
                slot.inflight -= 1
            if slot.inflight > 0:
                return None
            if not slot.retired:
                if slot.removals == self._removals:
                    return None  # live when last seen and no cluster left since: still live
                if self._live(slot.cluster):
                    slot.removals = self._removals
                    return None
                slot.retired = True
                if self._slots.get(slot.key) is slot:
                    del self._slots[slot.key]
            pool = slot.pool
            slot.pool = None  # closed once
        if pool is None:
            return None
        self.closed_pools += 1
        log.debug("closing the pool of removed cluster %r", slot.cluster)
        if not self._async:
            self._close(pool)
            return None
        return pool

    async def arelease(self, slot: _Slot) -> None:
        pool = self.release(slot)
        if pool is not None:
            await self._close(pool)

    def _clusters_removed(self, names: Set[str]) -> None:
        """The mesh's hook (any thread): retire the pools of ``names``; close the idle ones. Async
        pools: on their event loop (their requests count themselves there without a lock)."""
        loop = self._loop
        if loop is not None and self._loop_thread != threading.get_ident():
            try:
                loop.call_soon_threadsafe(self._retire, names)
                return
            except RuntimeError:  # the loop closed: no request of it is in flight
                pass
        self._retire(names)

    def _retire(self, names: Set[str]) -> None:
        closing: List[Any] = []
        with self._lock:
            self._removals += 1
            for key, slot in list(self._slots.items()):
                if slot.cluster in names:
                    slot.retired = True
                    del self._slots[key]
                    if slot.inflight <= 0 and slot.pool is not None:
                        closing.append(slot.pool)
                        slot.pool = None
        if not closing:
            return
        self.closed_pools += len(closing)
        log.debug("closing %d idle pool(s) of removed clusters %s", len(closing), sorted(names))
        if not self._async:
            for pool in closing:
                self._close_quietly(pool)
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # never used on a loop (nothing opened) or its loop is gone
        if asyncio._get_running_loop() is loop:  # on it (the removal hopped there)
            self._spawn_closes(closing)
            return
        try:
            loop.call_soon_threadsafe(self._spawn_closes, closing)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _close_quietly(self, pool: Any) -> None:
        try:
            self._close(pool)
        except Exception:
            log.exception("closing a pool of a removed cluster failed")

    def _spawn_closes(self, pools: List[Any]) -> None:
        async def close_all() -> None:
            for pool in pools:
                try:
                    await self._close(pool)
                except Exception:
                    log.exception("closing a pool of a removed cluster failed")

        task = asyncio.ensure_future(close_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take_all(self) -> List[Any]:
        """Empty the table (the integration closes): the pools to close."""
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
            out = []
            for slot in slots:
                slot.retired = True
                if slot.pool is not None:
                    out.append(slot.pool)
                    slot.pool = None
        return out
