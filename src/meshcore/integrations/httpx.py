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
attempt goes to the picked ``ip:port`` with the logical ``Host`` header, the ``sni_hostname``
extension set to the logical host (TLS SNI and certificate verification use the service name), and
the client's ``timeout`` extension capped by the attempt's timeout. Attempts of a cluster share one
inner transport (``HTTPTransport`` of the same library, or ``inner_factory``), so connection limits
and keep-alive are per cluster. When the inner transport is the library's own (or a subclass that
keeps its ``handle_request``), an attempt is handed straight to its connection pool (httpcore /
httpcore2) as the pool's request for ``ip:port``, the way the transport itself would send it: no
second client-level request (no second URL parse), the router headers dropped and ``Host`` set in
the one pass that builds the header list, httpcore errors mapped by the library's own mapping;
other inner transports get an ``httpx.Request`` for ``ip:port``; the default inner transports of one
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

import functools
import importlib
import logging
import operator
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, NotReady, Unavailable
from ..lifecycle import run as _run, run_async as _run_async
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ..resilience.router_headers import ROUTER_HEADERS
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
_TIMEOUT_SET = frozenset(_TIMEOUT_KEYS)
_status_code = operator.attrgetter("status_code")
# header names (lower-cased bytes) not copied to an attempt: the router's, and Host (set anew)
_DROP = frozenset([n.encode("ascii") for n in ROUTER_HEADERS] + [b"host"])
_SCHEMES = {"http": b"http", "https": b"https"}
_CACHE_MAX = 4096
_HEADERS_MAX = 256  # header lists kept (each a few hundred bytes)
_SECRET = frozenset([b"authorization", b"proxy-authorization", b"cookie"])
_new = object.__new__


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


def _probe_headers(cls: Any) -> bool:
    """Whether ``cls`` (the library's ``Headers``) made from byte pairs is exactly its ``_list``
    of ``(name, lower-cased name, value)`` and ``_encoding`` None: then a response's headers
    (httpcore's, byte pairs by construction) are made without the per-item type dispatch."""
    try:
        h = cls([(b"X-A", b"b"), (b"c", b"D")])
        _new(cls)  # (instantiable without its constructor)
        return vars(h) == {"_list": [(b"X-A", b"x-a", b"b"), (b"c", b"c", b"D")], "_encoding": None}
    except Exception:  # noqa: BLE001  (another shape: the library's constructor is used)
        return False


def _probe_core(core: ModuleType) -> bool:
    """Whether httpcore's ``URL(scheme=, host=, port=, target=)`` and ``Request`` given bytes
    (method, URL parts, header pairs), a stream object and an extensions dict only store them:
    then an attempt's request is made by setting those attributes (the arguments are bytes
    already; its constructor would check and copy them again)."""
    try:
        stream, ext, headers = object(), {}, [(b"a", b"b")]
        url = core.URL(scheme=b"http", host=b"h", port=1, target=b"/t")
        req = core.Request(b"GET", url, headers=headers, content=stream, extensions=ext)
        return (vars(url) == {"scheme": b"http", "host": b"h", "port": 1, "target": b"/t"}
                and set(vars(req)) == {"method", "url", "headers", "stream", "extensions"}
                and req.method == b"GET" and req.url is url and req.headers == headers
                and req.stream is stream and req.extensions is ext)
    except Exception:  # noqa: BLE001
        return False


_CORE_BARE: Dict[str, bool] = {}
_METHODS = {m: m.encode("ascii") for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class _Lib:
    """What the transports use of one client library (httpx or httpx2), resolved once."""

    __slots__ = ("mod", "name", "classify", "Response", "ByteStream", "map_exc", "handle", "ahandle", "Headers",
                 "bare_headers")

    def __init__(self, mod: ModuleType) -> None:
        self.mod = mod
        self.name = mod.__name__
        self.classify = functools.partial(_classify, mod)
        self.Response = mod.Response
        self.ByteStream = mod.ByteStream
        self.Headers = getattr(mod, "Headers", None)
        self.bare_headers = _probe_headers(self.Headers)
        default = sys.modules.get(f"{self.name}._transports.default")
        self.map_exc = getattr(default, "map_httpcore_exceptions", None)
        # the library transports' own handle_request: a subclass keeping it sends like them
        self.handle = getattr(getattr(mod, "HTTPTransport", None), "handle_request", None)
        self.ahandle = getattr(getattr(mod, "AsyncHTTPTransport", None), "handle_async_request", None)


class _Inner:
    """A cluster's inner transport and, when it sends like the library's own, its connection pool
    and that pool's ``Request``/``URL`` classes (``pool`` None: attempts go through ``transport``)."""

    __slots__ = ("transport", "pool", "Request", "URL", "map_exc", "bare")

    def __init__(self, transport: Any, lib: _Lib, sync: bool) -> None:
        self.transport = transport
        self.pool = self.Request = self.URL = self.map_exc = None
        self.bare = False
        handle = lib.handle if sync else lib.ahandle
        method = "handle_request" if sync else "handle_async_request"
        pool = getattr(transport, "_pool", None)
        if (handle is not None and lib.map_exc is not None and pool is not None
                and getattr(type(transport), method, None) is handle and hasattr(pool, method)):
            core = sys.modules.get(type(pool).__module__.partition(".")[0])
            if core is not None and hasattr(core, "Request") and hasattr(core, "URL"):
                self.pool, self.Request, self.URL, self.map_exc = pool, core.Request, core.URL, lib.map_exc
                bare = _CORE_BARE.get(core.__name__)
                if bare is None:
                    bare = _CORE_BARE[core.__name__] = _probe_core(core)
                self.bare = bare


class _Answer(NamedTuple):
    """An attempt's response, read (the path through an inner transport of another kind). A plain
    record on purpose: ``Call.run`` closes the responses it retries (and may still return one
    when a retry cannot be made), so the httpx ``Response`` is built once, from the final answer."""

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
        self._libs: Dict[Any, _Lib] = {}  # request type -> its library
        self._fixed_lib = _Lib(self._module) if self._module is not None else None
        self._origins: Dict[str, Tuple[bytes, int]] = {}  # endpoint key -> (host, port) for the pool
        self._ascii: Dict[str, Tuple[bytes, bytes]] = {}  # authority -> its Host header pair
        self._urls: Dict[Any, Tuple[str, bytes, str, Optional[str]]] = {}  # see _url_parts
        self._headers: Dict[Tuple[Any, ...], List[Tuple[str, str]]] = {}  # see _mesh_headers
        close = self._close_inner_sync if self._sync else self._close_inner_async
        self._pools = _ClusterPools(mesh, self._new_inner, close, is_async=not self._sync)

    @property
    def _inner(self) -> Dict[Tuple[str, str, Optional[str]], Any]:
        """``(library, cluster, sni) -> inner transport`` of the clusters in use."""
        return {k: v.transport for k, v in self._pools.pools().items()}

    @staticmethod
    def _close_inner_sync(inner: _Inner) -> None:
        inner.transport.close()

    @staticmethod
    async def _close_inner_async(inner: _Inner) -> None:
        await inner.transport.aclose()

    def _new_inner(self, key: Tuple[str, str, Optional[str]]) -> _Inner:
        name, cluster, _ = key
        mod = sys.modules[name]
        if self._factory is not None:
            transport = self._factory(cluster)
        else:
            kwargs = dict(self._transport_kwargs)
            kwargs["verify"] = self._ssl_context(mod)
            kwargs.pop("cert", None)  # in the shared context
            cls = mod.HTTPTransport if self._sync else mod.AsyncHTTPTransport
            transport = cls(http2=self._http2, **kwargs)
        return _Inner(transport, self._lib_named(name), self._sync)

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

    def _lib(self, request: Any) -> _Lib:
        if self._fixed_lib is not None:
            return self._fixed_lib
        lib = self._libs.get(type(request))
        if lib is None:
            lib = self._libs[type(request)] = _Lib(sys.modules[type(request).__module__.partition(".")[0]])
        return lib

    def _lib_named(self, name: str) -> _Lib:
        if self._fixed_lib is not None and self._fixed_lib.name == name:
            return self._fixed_lib
        for lib in list(self._libs.values()):
            if lib.name == name:
                return lib
        return _Lib(sys.modules[name])

    def _mod(self, request: Any) -> ModuleType:
        return self._lib(request).mod

    def _slot_for(self, mod: ModuleType, cluster: str, sni: Optional[str]) -> Any:
        """The cluster's inner transport (``slot.pool``), counted in flight until released."""
        return self._pools.acquire((mod.__name__, cluster, sni), cluster)

    @staticmethod
    def _logical_url(request: Any) -> str:
        url = request.url
        return f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"

    def _mesh_headers(self, request: Any) -> Tuple[Any, Optional[Tuple[Tuple[bytes, bytes], ...]]]:
        """``(routing view, upstream pairs)`` of the request's headers. The routing view: the
        ``(name, value)`` string pairs (lower-cased names) the mesh routes by; the upstream pairs:
        the ``(name, value)`` byte pairs an attempt sends after its ``Host`` (router headers and
        Host dropped), or None (made per attempt). Both are kept per header list, as a client
        sends the same headers again and again (not for lists carrying credentials, which are
        decoded for their request only). The routing view is a list, not a tuple: the route
        table walks lists of str pairs in C (a tuple costs ~0.7 us more); the mesh only reads it."""
        headers = request.headers
        try:
            key = tuple(headers._list)
        except AttributeError:
            return headers.multi_items(), None
        both = self._headers.get(key)
        if both is None:
            try:
                pairs = [(k.decode(), v.decode()) for _, k, v in key]
            except UnicodeDecodeError:
                return headers.multi_items(), None
            both = (pairs, tuple([(k, v) for k, lk, v in key if lk not in _DROP]))
            if any(k in _SECRET for _, k, _ in key):
                return both  # credentials are not kept beyond their request
            if len(self._headers) >= _HEADERS_MAX:
                self._headers.clear()
            self._headers[key] = both
        return both

    def _url_parts(self, url: Any) -> Tuple[str, bytes, str, Optional[str]]:
        """``(logical URL, raw path, path, SNI host or None)`` of a request URL, kept per parsed
        URL (httpx's own parse result, a tuple of strings) for the URLs a client repeats."""
        ref = getattr(url, "_uri_reference", None)
        parts = self._urls.get(ref) if ref is not None else None
        if parts is None:
            raw_path = url.raw_path
            path = raw_path.decode("ascii")
            scheme = url.scheme
            parts = (f"{scheme}://{url.netloc.decode('ascii')}{path}", raw_path, path,
                     url.raw_host.decode("ascii") if scheme == "https" else None)
            if ref is not None:
                if len(self._urls) >= _CACHE_MAX:
                    self._urls.clear()
                self._urls[ref] = parts
        return parts

    def _host(self, authority: str) -> Tuple[bytes, bytes]:
        """The ``Host`` header pair of ``authority``."""
        b = self._ascii.get(authority)
        if b is None:
            if len(self._ascii) >= _CACHE_MAX:
                self._ascii.clear()
            b = self._ascii[authority] = (b"Host", authority.encode("ascii"))
        return b

    def _origin(self, endpoint: Any) -> Tuple[bytes, int]:
        o = self._origins.get(endpoint.key)
        if o is None:
            if len(self._origins) >= _CACHE_MAX:
                self._origins.clear()
            o = self._origins[endpoint.key] = (endpoint.address.encode("ascii"), int(endpoint.port))
        return o

    def _core_request(self, inner: _Inner, request: Any, attempt: Any, scheme: bytes, target: bytes,
                      path: str, sni: Optional[str], upstream: Optional[Tuple[Tuple[bytes, bytes], ...]]) -> Any:
        """The pool's request for one attempt: ``ip:port`` of the picked endpoint, the logical Host
        (router headers dropped), the timeouts capped by the attempt's, SNI the logical host.
        ``upstream``: the header pairs after Host (see ``_mesh_headers``; None: made here)."""
        endpoint = attempt.endpoint
        host, port = self._origins.get(endpoint.key) or self._origin(endpoint)
        authority = attempt.authority
        headers: List[Tuple[bytes, bytes]] = [self._ascii.get(authority) or self._host(authority)]
        if upstream is not None:
            headers += upstream  # a list of its own: the pool's request may be changed by it
        else:
            try:
                lst = request.headers._list
            except AttributeError:
                lst = [(k, k.lower(), v) for k, v in request.headers.raw]
            headers += [(k, v) for k, lk, v in lst if lk not in _DROP]
        extensions = request.extensions
        cap = attempt.timeout
        if cap is not None or sni is not None:
            extensions = dict(extensions)
            if cap is not None:
                if cap < 0.001:
                    cap = 0.001  # spent (the deadline passed in a back-off): sockets reject <= 0
                timeout = extensions.get("timeout")
                if type(timeout) is dict and len(timeout) == 4 and timeout.keys() >= _TIMEOUT_SET:
                    c, r, w, p = timeout["connect"], timeout["read"], timeout["write"], timeout["pool"]
                    timeout = {"connect": cap if c is None or c > cap else c,  # (httpx's order)
                               "read": cap if r is None or r > cap else r,
                               "write": cap if w is None or w > cap else w,
                               "pool": cap if p is None or p > cap else p}
                else:
                    timeout = dict(timeout or {})
                    for k in _TIMEOUT_KEYS:
                        timeout[k] = _min_timeout(timeout.get(k), cap)
                extensions["timeout"] = timeout
            if sni is not None:
                extensions["sni_hostname"] = sni
        if attempt.path is not path:  # the route rewrote the path
            target = attempt.path.encode("ascii")
        if inner.bare:
            method = _METHODS.get(request.method)
            if method is not None and "target" not in extensions:
                # what the constructors store, made without their checks (see _probe_core)
                u = _new(inner.URL)
                u.scheme, u.host, u.port, u.target = scheme, host, port, target
                req = _new(inner.Request)
                req.method, req.url, req.headers, req.stream, req.extensions = (
                    method, u, headers, request.stream, extensions)
                return req
        return inner.Request(request.method, inner.URL(scheme=scheme, host=host, port=port, target=target),
                             headers=headers, content=request.stream, extensions=extensions)

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

    @staticmethod
    def _call_info(response: Any, call: Any, last: Any) -> Any:
        """``response.extensions["meshcore"]`` (``last``: the final attempt; the call's list of
        attempts is made only for a retried request)."""
        if last is None or last.number > 1:
            response.extensions["meshcore"] = _info(call)
        else:
            response.extensions["meshcore"] = {"cluster": call.cluster, "endpoint": last.endpoint.key,
                                               "route": call.route.route_name, "attempts": 1}
        return response


def _final_response(lib: _Lib, request: Any, resp: Any, raw: bytes) -> Any:
    """The client's response from the pool's (read) response: one ``Response``, an unread,
    replayable stream of the raw body; the pool's network stream is not handed out."""
    ext = resp.extensions
    ext.pop("network_stream", None)
    headers = resp.headers
    if lib.bare_headers:  # byte pairs (httpcore's): the library's Headers as it would make them
        h = _new(lib.Headers)
        h._list = [(k, k.lower(), v) for k, v in headers]
        h._encoding = None
        headers = h
    return lib.Response(resp.status, headers=headers, stream=lib.ByteStream(raw), request=request,
                        extensions=ext)


class MeshTransport(_MeshTransportBase):
    """An httpx/httpx2 ``BaseTransport`` routing through the mesh (see the module docstring)."""

    def handle_request(self, request: Any) -> Any:
        lib = self._lib(request)
        url = request.url
        logical, raw_path, path, sni = self._url_parts(url)
        headers, upstream = self._mesh_headers(request)
        try:
            try:
                call = self._mesh.request(logical, request.method, headers)
            except NotReady:
                call = _route(self._mesh, logical, request.method, headers, self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(lib.mod, request, e) from e
        if call.cluster is None:
            local = _local_reply(call)
            if local is not None:
                return self._reply(lib.mod, request, local, call)
        if call.retry_policy is not None and not hasattr(request, "_content") and _retries_possible(call):
            request.read()  # a retry sends the body again (unless read already, as without a body)
        scheme = url.scheme
        slot = self._pools.acquire((lib.name, call.cluster, sni), call.cluster)
        inner = slot.pool
        last: Any = None  # the last attempt sent straight to the pool
        if inner.pool is not None:
            pool = inner.pool
            make = self._core_request
            scheme_b = _SCHEMES.get(scheme) or url.raw_scheme
            call_path = call.path

            def send(attempt: Any) -> Any:
                req = make(inner, request, attempt, scheme_b, raw_path, call_path, sni, upstream)
                try:
                    resp = pool.handle_request(req)
                    stream = resp.stream
                    try:
                        raw = b"".join(stream)
                    finally:  # resp.close() without its sync/async type test (an ABC check)
                        close = getattr(stream, "close", None)
                        if close is not None:
                            close()
                except Exception as exc:
                    with inner.map_exc():  # the library's own httpcore -> httpx mapping
                        raise exc
                nonlocal last
                last = attempt
                return _final_response(lib, request, resp, raw)
        else:
            transport = inner.transport
            mod = lib.mod

            def send(attempt: Any) -> Any:
                response = transport.handle_request(self._attempt_request(mod, request, attempt,
                                                                          url.raw_host.decode("ascii")))
                try:
                    raw = b"".join(response.iter_raw())
                finally:
                    response.close()
                return _Answer.of(response, raw)

        try:
            answer = _run(call, send, _status_code, None, lib.classify)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(lib.mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(lib.mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            self._pools.release(slot)
        if type(answer) is _Answer:
            return self._finish(lib.mod, answer, request, call)
        return self._call_info(answer, call, last)

    def close(self) -> None:
        for t in self._pools.take_all():
            t.transport.close()

    def __enter__(self) -> "MeshTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncMeshTransport(_MeshTransportBase):
    """An httpx/httpx2 ``AsyncBaseTransport`` routing through the mesh (see the module docstring)."""

    _sync = False

    async def handle_async_request(self, request: Any) -> Any:
        lib = self._lib(request)
        url = request.url
        logical, raw_path, path, sni = self._url_parts(url)
        headers, upstream = self._mesh_headers(request)
        try:
            try:
                call = self._mesh.request(logical, request.method, headers)
            except NotReady:
                call = await _aroute(self._mesh, logical, request.method, headers, self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(lib.mod, request, e) from e
        if call.cluster is None:
            local = _local_reply(call)
            if local is not None:
                return self._reply(lib.mod, request, local, call)
        if call.retry_policy is not None and not hasattr(request, "_content") and _retries_possible(call):
            await request.aread()  # (a coroutine only when there is something to read)
        scheme = url.scheme
        slot = self._pools.acquire((lib.name, call.cluster, sni), call.cluster)
        inner = slot.pool
        last: Any = None  # the last attempt sent straight to the pool
        if inner.pool is not None:
            pool = inner.pool
            make = self._core_request
            scheme_b = _SCHEMES.get(scheme) or url.raw_scheme
            call_path = call.path

            async def send(attempt: Any) -> Any:
                req = make(inner, request, attempt, scheme_b, raw_path, call_path, sni, upstream)
                try:
                    resp = await pool.handle_async_request(req)
                    stream = resp.stream
                    chunks: List[bytes] = []
                    try:
                        async for chunk in stream:  # (a comprehension would be one more coroutine)
                            chunks.append(chunk)
                        raw = b"".join(chunks)
                    finally:  # resp.aclose() without its sync/async type test (an ABC check)
                        aclose = getattr(stream, "aclose", None)
                        if aclose is not None:
                            await aclose()
                except Exception as exc:
                    with inner.map_exc():  # the library's own httpcore -> httpx mapping
                        raise exc
                nonlocal last
                last = attempt
                return _final_response(lib, request, resp, raw)
        else:
            transport = inner.transport
            mod = lib.mod

            async def send(attempt: Any) -> Any:
                response = await transport.handle_async_request(
                    self._attempt_request(mod, request, attempt, url.raw_host.decode("ascii")))
                try:
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()
                return _Answer.of(response, raw)

        try:
            answer = await _run_async(call, send, _status_code, None, lib.classify)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(lib.mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(lib.mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            closing = self._pools.release(slot)  # (arelease without its coroutine)
            if closing is not None:
                await self._close_inner_async(closing)
        if type(answer) is _Answer:
            return self._finish(lib.mod, answer, request, call)
        return self._call_info(answer, call, last)

    async def aclose(self) -> None:
        for t in self._pools.take_all():
            await t.transport.aclose()

    async def __aenter__(self) -> "AsyncMeshTransport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
