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
so connection limits and keep-alive are per cluster; the default inner transports of one
``MeshTransport`` share one SSL context (made once from ``verify``/``cert``/``trust_env``; the
verification name is still the logical host of each request). When a cluster leaves the mesh's
configuration its inner transport is closed as soon as its requests in flight finished (never
under one), so a mesh whose clusters come and go keeps no pools (or fds) for departed ones. The response body is read within the attempt
(a per-try timeout covers it; a 5xx can be retried) and handed back as an unread, replayable stream;
``response.request`` is the original request and ``response.extensions["meshcore"]`` says
``{"cluster", "endpoint", "route", "attempts"}``.

Direct-response and redirect routes, and fault-filter aborts, are answered without an upstream.
Failures raise the library's exceptions: an upstream failure after the last attempt as the inner
transport raised it, with the mesh's context attached (``exc.meshcore``: target, cluster, attempts,
last endpoint, route; also a PEP 678 note); a route timeout as ``TimeoutException``; no healthy endpoint or an open circuit
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
    _add_context,
    _aroute,
    _drop_router_headers,
    _fault_reply,
    _info,
    _local_reply,
    _min_timeout,
    _ClusterPools,
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
        self._ssl: Dict[str, Any] = {}  # library name -> the SSL context its inner transports share
        self._lock = threading.Lock()
        close = self._close_inner_sync if self._sync else self._close_inner_async
        self._pools = _ClusterPools(mesh, self._new_inner, close, is_async=not self._sync)

    @property
    def _inner(self) -> Dict[Tuple[str, str, Optional[str]], Any]:
        """``(library, cluster, sni) -> inner transport`` of the clusters in use."""
        return self._pools.pools()

    @staticmethod
    def _close_inner_sync(inner: Any) -> None:
        inner.close()

    @staticmethod
    async def _close_inner_async(inner: Any) -> None:
        await inner.aclose()

    def _new_inner(self, key: Tuple[str, str, Optional[str]]) -> Any:
        name, cluster, _ = key
        if self._factory is not None:
            return self._factory(cluster)
        mod = sys.modules[name]
        kwargs = dict(self._transport_kwargs)
        kwargs["verify"] = self._ssl_context(mod)
        kwargs.pop("cert", None)  # in the shared context
        cls = mod.HTTPTransport if self._sync else mod.AsyncHTTPTransport
        return cls(http2=self._http2, **kwargs)

    def _ssl_context(self, mod: ModuleType) -> Any:
        """One SSL context per library for every inner transport (one each would cost ~0.8 MB
        per cluster); certificate checks still use each request's logical host (``sni_hostname``)."""
        ctx = self._ssl.get(mod.__name__)
        if ctx is None:
            kw = self._transport_kwargs
            ctx = mod.create_ssl_context(verify=kw.get("verify", True), cert=kw.get("cert"),
                                         trust_env=kw.get("trust_env", True))
            self._ssl[mod.__name__] = ctx
        return ctx

    # -- helpers -------------------------------------------------------------------------------

    def _mod(self, request: Any) -> ModuleType:
        if self._module is not None:
            return self._module
        return sys.modules[type(request).__module__.partition(".")[0]]

    def _slot_for(self, mod: ModuleType, cluster: str, sni: Optional[str]) -> Any:
        """The cluster's inner transport (``slot.pool``), counted in flight until released."""
        return self._pools.acquire((mod.__name__, cluster, sni), cluster)

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
        slot = self._slot_for(mod, call.cluster, sni if request.url.scheme == "https" else None)
        inner = slot.pool

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
            raise _add_context(self._mesh_error(mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            self._pools.release(slot)
        return self._finish(mod, answer, request, call)

    def close(self) -> None:
        for t in self._pools.take_all():
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
        slot = self._slot_for(mod, call.cluster, sni if request.url.scheme == "https" else None)
        inner = slot.pool

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
            raise _add_context(self._mesh_error(mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            await self._pools.arelease(slot)
        return self._finish(mod, answer, request, call)

    async def aclose(self) -> None:
        for t in self._pools.take_all():
            await t.aclose()

    async def __aenter__(self) -> "AsyncMeshTransport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
