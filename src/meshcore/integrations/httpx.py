"""httpx / httpx2 transports that route every request through the mesh.

Mount them on the mesh's domain so only mesh hosts are affected::

    import httpx  # or httpx2: the same classes work with both
    from meshcore.integrations.httpx import MeshTransport, AsyncMeshTransport

    mesh = meshcore.Mesh().start()
    client = httpx.Client(mounts={"all://*.svc.cluster.local": MeshTransport(mesh)})
    client.get("http://reviews.default.svc.cluster.local:9080/reviews/1")  # routed, balanced, retried
    client.get("https://example.org/")                                     # the default transport

    async with httpx.AsyncClient(mounts={"all://*.svc.cluster.local": AsyncMeshTransport(mesh)}) as ac:
        await ac.get("http://reviews.default.svc.cluster.local:9080/reviews/1")

Per request: ``Mesh.request`` routes it, ``Call.run`` applies the route's policies, and each
attempt goes to the picked ``ip:port`` as a new request with the logical ``Host`` header, the
``sni_hostname`` extension set to the logical host (TLS SNI and certificate verification use the
service name), and the client's ``timeout`` extension capped by the attempt's timeout. Attempts of
a cluster share one inner transport (``HTTPTransport`` of the same library, or ``inner_factory``),
so connection limits and keep-alive are per cluster. The response body is read within the attempt
(a per-try timeout covers it; a 5xx can be retried) and handed back as an unread, replayable stream;
``response.request`` is the original request and ``response.extensions["meshcore"]`` says
``{"cluster", "endpoint", "route", "attempts"}``.

Direct-response and redirect routes, and fault-filter aborts, are answered without an upstream.
Failures raise the library's exceptions: an upstream failure after the last attempt as the inner
transport raised it; a route timeout as ``TimeoutException``; no healthy endpoint or an open circuit
breaker as ``ConnectError``; no matching route as ``TransportError`` -- the meshcore error is the
exception's ``__cause__``. Note that httpx timeouts bound each network operation, so in the sync
transport a per-try timeout caps every connect/read/write rather than the attempt as a whole (the
async transport also cancels the attempt at its deadline).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, Unavailable
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from . import (
    _aroute,
    _drop_router_headers,
    _fault_reply,
    _info,
    _local_reply,
    _min_timeout,
    _Reply,
    _retries_possible,
    _route,
)

__all__ = ["AsyncMeshTransport", "MeshTransport"]

log = logging.getLogger(__name__)

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _library(module: Union[None, str, ModuleType]) -> Optional[ModuleType]:
    if module is None or isinstance(module, ModuleType):
        return module
    return importlib.import_module(module)


def _classify(mod: ModuleType, exc: BaseException) -> Optional[str]:
    """httpx exception -> Envoy failure kind (connect timeouts are connect failures, as in Envoy)."""
    if isinstance(exc, (mod.ConnectError, mod.ConnectTimeout)):
        return CONNECT_FAILURE
    if isinstance(exc, mod.TimeoutException):
        return TIMEOUT
    if isinstance(exc, (mod.RemoteProtocolError, mod.NetworkError)):
        return RESET
    return default_classify(exc)


class _Answer(NamedTuple):
    """An attempt's response, read. A plain record on purpose: ``Call.run`` closes the responses
    it retries (and may still return one when a retry cannot be made), so the httpx ``Response``
    is built once, from the final answer."""

    status_code: int
    headers: Any
    raw: bytes
    extensions: Dict[str, Any]

    @classmethod
    def of(cls, response: Any, raw: bytes) -> "_Answer":
        # the connection went back to the pool: do not hand its network stream out
        ext = {k: v for k, v in response.extensions.items() if k != "network_stream"}
        return cls(response.status_code, response.headers, raw, ext)


class _MeshTransportBase:
    """What the sync and async transports share: routing, per-cluster inner transports, rewriting."""

    _sync = True

    def __init__(self, mesh: Any, *, inner_factory: Optional[Callable[[str], Any]] = None, http2: bool = False,
                 module: Union[None, str, ModuleType] = None, ready_timeout: float = 10.0,
                 **transport_kwargs: Any) -> None:
        """``inner_factory(cluster)`` makes the transport a cluster's attempts go through (default:
        the library's ``HTTPTransport``/``AsyncHTTPTransport`` with ``http2`` and
        ``transport_kwargs``, e.g. ``verify=`` or ``limits=``). ``module`` is ``"httpx"``,
        ``"httpx2"`` or the module; ``None`` detects it from each request. The first request to
        a target waits up to ``ready_timeout`` seconds for its configuration."""
        self._mesh = mesh
        self._factory = inner_factory
        self._http2 = http2
        self._module = _library(module)
        self._ready_timeout = ready_timeout
        self._transport_kwargs = transport_kwargs
        self._inner: Dict[Tuple[str, str, Optional[str]], Any] = {}
        self._lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------------

    def _mod(self, request: Any) -> ModuleType:
        if self._module is not None:
            return self._module
        return sys.modules[type(request).__module__.partition(".")[0]]

    def _inner_for(self, mod: ModuleType, cluster: str, sni: Optional[str]) -> Any:
        key = (mod.__name__, cluster, sni)
        inner = self._inner.get(key)
        if inner is None:
            with self._lock:
                inner = self._inner.get(key)
                if inner is None:
                    if self._factory is not None:
                        inner = self._factory(cluster)
                    else:
                        cls = mod.HTTPTransport if self._sync else mod.AsyncHTTPTransport
                        inner = cls(http2=self._http2, **self._transport_kwargs)
                    self._inner[key] = inner
                    log.debug("inner transport for cluster %r (sni %r)", cluster, sni)
        return inner

    @staticmethod
    def _logical_url(request: Any) -> str:
        url = request.url
        return f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"

    @staticmethod
    def _attempt_request(mod: ModuleType, request: Any, attempt: Any, sni: str) -> Any:
        headers = _drop_router_headers(request.headers.copy())
        headers["Host"] = attempt.authority
        extensions = dict(request.extensions)
        if attempt.timeout is not None:
            timeout = dict(extensions.get("timeout") or {})
            for k in _TIMEOUT_KEYS:
                timeout[k] = _min_timeout(timeout.get(k), attempt.timeout)
            extensions["timeout"] = timeout
        extensions["sni_hostname"] = sni
        return mod.Request(request.method, attempt.url, headers=headers, stream=request.stream,
                           extensions=extensions)

    @staticmethod
    def _reply(mod: ModuleType, request: Any, reply: _Reply, call: Any) -> Any:
        return mod.Response(reply.status, headers=reply.headers, content=reply.body, request=request,
                            extensions={"meshcore": _info(call)})

    @staticmethod
    def _finish(mod: ModuleType, answer: _Answer, request: Any, call: Any) -> Any:
        """The client's response: the final answer, unread (a replayable stream of its raw body)."""
        extensions = {**answer.extensions, "meshcore": _info(call)}
        return mod.Response(answer.status_code, headers=answer.headers, stream=mod.ByteStream(answer.raw),
                            request=request, extensions=extensions)

    @staticmethod
    def _mesh_error(mod: ModuleType, request: Any, exc: BaseException) -> BaseException:
        """The library exception standing for a mesh decision without an upstream answer."""
        if isinstance(exc, (UpstreamTimeout, TimeoutError)):
            return mod.TimeoutException(str(exc) or "attempt timed out", request=request)
        if isinstance(exc, NoRoute):
            return mod.TransportError(str(exc), request=request)
        return mod.ConnectError(str(exc), request=request)


class MeshTransport(_MeshTransportBase):
    """An httpx/httpx2 ``BaseTransport`` routing through the mesh (see the module docstring)."""

    def handle_request(self, request: Any) -> Any:
        mod = self._mod(request)
        try:
            call = _route(self._mesh, self._logical_url(request), request.method,
                          request.headers.multi_items(), self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(mod, request, e) from e
        local = _local_reply(call)
        if local is not None:
            return self._reply(mod, request, local, call)
        if _retries_possible(call):
            request.read()  # a retry sends the body again
        sni = request.url.raw_host.decode("ascii")
        inner = self._inner_for(mod, call.cluster, sni if request.url.scheme == "https" else None)

        def send(attempt: Any) -> _Answer:
            response = inner.handle_request(self._attempt_request(mod, request, attempt, sni))
            try:
                raw = b"".join(response.iter_raw())
            finally:
                response.close()
            return _Answer.of(response, raw)

        try:
            answer = call.run(send, classify=lambda exc: _classify(mod, exc))
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise self._mesh_error(mod, request, e) from e
        return self._finish(mod, answer, request, call)

    def close(self) -> None:
        with self._lock:
            inner, self._inner = list(self._inner.values()), {}
        for t in inner:
            t.close()

    def __enter__(self) -> "MeshTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncMeshTransport(_MeshTransportBase):
    """An httpx/httpx2 ``AsyncBaseTransport`` routing through the mesh (see the module docstring)."""

    _sync = False

    async def handle_async_request(self, request: Any) -> Any:
        mod = self._mod(request)
        try:
            call = await _aroute(self._mesh, self._logical_url(request), request.method,
                                 request.headers.multi_items(), self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(mod, request, e) from e
        local = _local_reply(call)
        if local is not None:
            return self._reply(mod, request, local, call)
        if _retries_possible(call):
            await request.aread()
        sni = request.url.raw_host.decode("ascii")
        inner = self._inner_for(mod, call.cluster, sni if request.url.scheme == "https" else None)

        async def send(attempt: Any) -> _Answer:
            response = await inner.handle_async_request(self._attempt_request(mod, request, attempt, sni))
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            return _Answer.of(response, raw)

        try:
            answer = await call.run_async(send, classify=lambda exc: _classify(mod, exc))
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise self._mesh_error(mod, request, e) from e
        return self._finish(mod, answer, request, call)

    async def aclose(self) -> None:
        with self._lock:
            inner, self._inner = list(self._inner.values()), {}
        for t in inner:
            await t.aclose()

    async def __aenter__(self) -> "AsyncMeshTransport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
