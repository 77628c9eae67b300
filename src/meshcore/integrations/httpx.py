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

Per request: ``Mesh.request`` routes it, ``Call.run`` applies the route's policies (while tracing
is off the transport runs the usual request's router steps itself -- first attempt, its deadline,
the policy's verdict, and the record for telemetry sinks -- and lifecycle's loop only for a fault
filter or an outcome that may be retried: the same behaviour, one coroutine less), and each
attempt goes to
the picked ``ip:port`` with the logical ``Host`` header, the ``sni_hostname``
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

Mesh TLS (mTLS to Istio sidecars, ``meshcore.tls``): when ``Mesh.upstream_tls`` gives an attempt's
endpoint a TLS socket (the cluster's ``transport_socket``, or its ``transport_socket_matches`` by
the endpoint's ``tlsMode``), the attempt goes through that cluster socket's own inner transport:
the library's transport whose httpcore pool connects TCP, runs TLS with the socket's context (the
workload certificate of the moment, Istio's ALPN ``istio-http/1.1, istio, http/1.1``, or
``istio-h2, istio, h2`` with ``http2=True``, which then speaks HTTP/2 when the server picks
``h2``), SNI from the cluster, and checks the server's SAN matchers before writing a byte. The
app keeps ``http://`` URLs, as behind a sidecar. A refused handshake, a SAN mismatch, missing
certificates, or a TLS 1.3 server refusing this workload's certificate (seen as an error or EOF
on the new connection's first read) raise the library's ``ConnectError`` (message: cluster,
endpoint, reason; ``__cause__``: :class:`~meshcore.tls.TlsHandshakeError`), a connect failure
for ``retry_on`` and outlier detection; nothing is ever sent in plaintext instead. Connections
are kept alive per cluster socket. Mesh TLS cannot be added to inner transports made by
``inner_factory``, or that use ``proxy=``/``uds=``, nor under an ``https://`` URL: attempts to a
TLS endpoint then raise ``UnsupportedProtocol`` saying so (plaintext clusters are unaffected).

With Istio's metadata exchange on (``Telemetry.enable_istio_metrics``), each attempt carries this
workload's ``x-envoy-peer-metadata`` / ``-id`` once: the application's own are replaced, as the
sidecar's filter does, and the peer's leave the response.

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

import asyncio
import functools
import importlib
import inspect
import logging
import operator
import ssl
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, NamedTuple, NoReturn, Optional, Tuple, Union

from .._model import host_key
from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, NotReady, Unavailable
from ..lifecycle import run as _run, run_async as _run_async, run_async_reported as _run_async_reported
from ..lifecycle import run_after as _run_after, run_after_async as _run_after_async, run_reported as _run_reported
from ..lifecycle import deadline_begin as _deadline_begin, deadline_end as _deadline_end
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ..resilience.router_headers import ROUTER_HEADERS
from ..telemetry.peer_metadata import HEADER as _PEER_HEADER, HEADER_ID as _PEER_HEADER_ID
from ..telemetry.record import ACTIVE as _TELEMETRY
from ..telemetry.outcome import report as _report, report_answer as _report_answer
from ..telemetry.tracing import TRACE_HEADERS as _TRACE_HEADERS, TRACER as _TRACER, headers_of as _trace_headers
from ..tls.upstream import TlsHandshakeError, is_deferred_rejection
from .._fast.call_py import note_response as _py_note_response
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
_status_code = operator.attrgetter("status_code")
# header names (lower-cased bytes) not copied to an attempt: the router's, and Host (set anew)
_DROP = frozenset([n.encode("ascii") for n in ROUTER_HEADERS] + [b"host"])
_SCHEMES = {"http": b"http", "https": b"https"}
_CACHE_MAX = 4096
_HEADERS_MAX = 256  # header lists kept (each a few hundred bytes)
_SECRET = frozenset([b"authorization", b"proxy-authorization", b"cookie"])
_PEER_NAMES = frozenset([_PEER_HEADER.encode("ascii"), _PEER_HEADER_ID.encode("ascii")])  # (lower-case)
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


#: what the library's ``Response(status, headers=, stream=, request=, extensions=)`` stores, in order
_RESPONSE_FIELDS = ["status_code", "headers", "_request", "next_request", "extensions", "history", "is_closed",
                    "is_stream_consumed", "default_encoding", "stream", "_num_bytes_downloaded"]


def _probe_response(mod: ModuleType) -> bool:
    """Whether the library's ``Response`` given a ``Headers``, a stream, a request and an
    extensions dict only stores them (copies of the headers and extensions) and its defaults,
    in the order of :data:`_RESPONSE_FIELDS`, and ``ByteStream(raw)`` only stores ``raw`` as
    ``_stream``: then the transports make a response by setting those attributes (the copies and
    the per-item type dispatch of ``Headers(headers)`` are not needed for a response of their own)."""
    try:
        if vars(mod.ByteStream(b"x")) != {"_stream": b"x"}:
            return False
        _new(mod.ByteStream)
        req = mod.Request("GET", "http://h/")
        headers = mod.Headers([(b"a", b"b")])
        stream, ext = mod.ByteStream(b"x"), {"k": 1}
        r = mod.Response(200, headers=headers, stream=stream, request=req, extensions=ext)
        v = vars(r)
        bare = _new(mod.Response)
        return (list(v) == _RESPONSE_FIELDS and v["status_code"] == 200 and type(v["headers"]) is mod.Headers
                and vars(v["headers"]) == vars(headers) and v["_request"] is req and v["next_request"] is None
                and v["extensions"] == ext and v["history"] == [] and v["is_closed"] is False
                and v["is_stream_consumed"] is False and v["default_encoding"] == "utf-8" and v["stream"] is stream
                and v["_num_bytes_downloaded"] == 0 and not vars(bare))
    except Exception:  # noqa: BLE001  (another shape: the library's constructor is used)
        return False


_CORE_BARE: Dict[str, bool] = {}
_partial = functools.partial
_METHODS = {m: m.encode("ascii") for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class _Lib:
    """What the transports use of one client library (httpx or httpx2), resolved once."""

    __slots__ = ("mod", "name", "classify", "Response", "ByteStream", "map_exc", "handle", "ahandle", "Headers",
                 "bare_headers", "bare_response")

    def __init__(self, mod: ModuleType) -> None:
        self.mod = mod
        self.name = mod.__name__
        self.classify = functools.partial(_classify, mod)
        self.Response = mod.Response
        self.ByteStream = mod.ByteStream
        self.Headers = getattr(mod, "Headers", None)
        self.bare_headers = _probe_headers(self.Headers)
        self.bare_response = self.bare_headers and _probe_response(mod)
        default = sys.modules.get(f"{self.name}._transports.default")
        self.map_exc = getattr(default, "map_httpcore_exceptions", None)
        # the library transports' own handle_request: a subclass keeping it sends like them
        self.handle = getattr(getattr(mod, "HTTPTransport", None), "handle_request", None)
        self.ahandle = getattr(getattr(mod, "AsyncHTTPTransport", None), "handle_async_request", None)


# -- mesh TLS ----------------------------------------------------------------------------------------
#
# A cluster socket with TLS (``Mesh.upstream_tls`` not None for the attempt's endpoint) gets its
# own inner transport: the library's transport whose httpcore pool has a network backend that
# connects with httpcore's own backend, then runs the public ``start_tls`` with the socket's
# context (Istio ALPN; a new context per certificate generation) and checks the peer before the
# pool writes anything. The request itself stays plaintext HTTP (``http://`` URLs, as behind a
# sidecar); httpcore picks HTTP/2 from the negotiated ALPN.


def _handshake_cause(exc: BaseException) -> BaseException:
    """What made a handshake fail, under httpcore's (and anyio's) wrapping exceptions."""
    e = exc.__cause__
    first = e
    for _ in range(4):
        if e is None:
            break
        if isinstance(e, OSError):
            return e
        e = e.__cause__
    if first is not None and type(first).__name__ == "EndOfStream":  # anyio: closed mid-handshake
        return EOFError("EOF during the TLS handshake")
    return first if first is not None else exc


def _deferred_cause(exc: BaseException) -> Optional[BaseException]:
    """The exception in ``exc``'s cause chain that :func:`is_deferred_rejection` accepts."""
    e: Optional[BaseException] = exc
    for _ in range(4):
        if e is None:
            return None
        if is_deferred_rejection(e):
            return e
        e = e.__cause__
    return None


def _connect_error(core: ModuleType, err: TlsHandshakeError) -> BaseException:
    """httpcore's ``ConnectError`` for a mesh-TLS failure. The meshcore error rides along as an
    attribute too: httpcore's pool re-raises errors ``from None`` (dropping ``__cause__``)."""
    exc = core.ConnectError(str(err))
    exc._meshcore_tls = err
    return exc


def _tls_cause_first(exc: BaseException) -> None:
    """A library error over a mesh-TLS failure (httpx -> httpcore's ConnectError): the meshcore
    :class:`TlsHandshakeError` becomes its direct ``__cause__``."""
    e = exc.__cause__
    for _ in range(3):
        if e is None:
            return
        err = getattr(e, "_meshcore_tls", None)
        if err is not None:
            exc.__cause__ = err
            return
        e = e.__cause__


class _FreshTls:
    """The network stream of a new mesh-TLS connection until its first response byte.

    A TLS 1.3 server refuses a client certificate after the client's handshake finished: the
    client sees an alert, a reset or an EOF on its first read (or a broken pipe on a write).
    Such an error (one :func:`is_deferred_rejection` accepts), or an EOF, before the first
    response byte is raised as the pool's ``ConnectError`` (cause: ``tls.deferred_rejection``):
    the request never reached the application. After the first byte ``read``/``write`` are the
    stream's own (instance attributes: nothing in between on a reused connection)."""

    def __init__(self, stream: Any, tls: Any, endpoint: str, core: ModuleType) -> None:
        self._stream = stream
        self._tls = tls
        self._endpoint = endpoint
        self._core = core
        self.get_extra_info = stream.get_extra_info
        self.close = stream.close
        self.start_tls = stream.start_tls

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        try:
            data = self._stream.read(max_bytes, timeout)
        except Exception as exc:
            self._refused(exc)
            raise
        if not data:
            self._refused(_eof())
        self.read, self.write = self._stream.read, self._stream.write  # type: ignore[method-assign]
        return data  # type: ignore[no-any-return]

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        try:
            self._stream.write(buffer, timeout)
        except Exception as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: BaseException) -> None:
        cause = _deferred_cause(exc)
        if cause is not None:
            err = self._tls.deferred_rejection(cause, self._endpoint)
            raise _connect_error(self._core, err) from err


class _AsyncFreshTls(_FreshTls):
    """:class:`_FreshTls` for httpcore's async streams."""

    def __init__(self, stream: Any, tls: Any, endpoint: str, core: ModuleType) -> None:
        self._stream = stream
        self._tls = tls
        self._endpoint = endpoint
        self._core = core
        self.get_extra_info = stream.get_extra_info
        self.aclose = stream.aclose
        self.start_tls = stream.start_tls

    async def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:  # type: ignore[override]
        try:
            data = await self._stream.read(max_bytes, timeout)
        except Exception as exc:
            self._refused(exc)
            raise
        if not data:
            self._refused(_eof())
        self.read, self.write = self._stream.read, self._stream.write  # type: ignore[method-assign]
        return data  # type: ignore[no-any-return]

    async def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:  # type: ignore[override]
        try:
            await self._stream.write(buffer, timeout)
        except Exception as exc:
            self._refused(exc)
            raise


def _eof() -> BaseException:
    """An EOF before the first response byte (``ssl`` hides a TLS-level EOF as an empty read)."""
    return ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF before the first response byte of a new TLS connection")


class _TlsBackend:
    """The httpcore network backend of one cluster socket's pool: TCP by httpcore's own backend,
    then ``start_tls`` with ``tls.context(protocol)`` (the current certificates), SNI
    ``tls.server_hostname(endpoint)``, then ``tls.check_peer`` before anything is written.
    Failures are the pool's ``ConnectError`` (the library's, after its mapping) with the
    :class:`TlsHandshakeError` as cause. ``endpoints``: endpoint key -> ``Endpoint`` for
    ``auto_host_sni`` (filled per attempt), else None."""

    def __init__(self, core: ModuleType, tls: Any, protocol: str, endpoints: Optional[Dict[str, Any]]) -> None:
        self._core = core
        self._backend = self._default(core)
        self._tls = tls
        self._protocol = protocol
        self.endpoints = endpoints

    @staticmethod
    def _default(core: ModuleType) -> Any:
        return core.SyncBackend()

    def _prepare(self, host: str, port: int) -> Tuple[str, Any, Optional[str]]:
        """``(endpoint key, context, SNI)`` for a new connection (certificates missing: ConnectError)."""
        key = host_key(host, port)
        tls = self._tls
        try:
            ctx = tls.context(self._protocol)
        except TlsHandshakeError as e:
            raise _connect_error(self._core, e) from e
        eps = self.endpoints
        return key, ctx, tls.server_hostname(eps.get(key) if eps is not None else None)

    def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None, local_address: Optional[str] = None,
                    socket_options: Any = None) -> Any:
        core = self._core
        key, ctx, sni = self._prepare(host, port)
        stream = self._backend.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
        try:
            stream = stream.start_tls(ctx, server_hostname=sni, timeout=timeout)
        except core.ConnectTimeout:
            raise
        except core.ConnectError as exc:  # (start_tls closed the stream)
            err = self._tls.handshake_error(_handshake_cause(exc), key)
            raise _connect_error(core, err) from err
        try:
            self._tls.check_peer(stream.get_extra_info("ssl_object"), key)
        except TlsHandshakeError as err:
            stream.close()
            raise _connect_error(core, err) from err
        except BaseException:
            stream.close()
            raise
        return _FreshTls(stream, self._tls, key, core)

    def connect_unix_socket(self, path: str, timeout: Optional[float] = None, socket_options: Any = None) -> Any:
        raise self._core.ConnectError(f"mesh TLS (cluster {self._tls.cluster}) over a unix socket is not supported")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncTlsBackend(_TlsBackend):
    """:class:`_TlsBackend` for httpcore's async pools (over its anyio backend)."""

    @staticmethod
    def _default(core: ModuleType) -> Any:
        return core.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None,  # type: ignore[override]
                          local_address: Optional[str] = None, socket_options: Any = None) -> Any:
        core = self._core
        key, ctx, sni = self._prepare(host, port)
        stream = await self._backend.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                                 socket_options=socket_options)
        try:
            stream = await stream.start_tls(ctx, server_hostname=sni, timeout=timeout)
        except core.ConnectTimeout:
            raise
        except core.ConnectError as exc:  # (start_tls closed the stream)
            err = self._tls.handshake_error(_handshake_cause(exc), key)
            raise _connect_error(core, err) from err
        try:
            self._tls.check_peer(stream.get_extra_info("ssl_object"), key)
        except TlsHandshakeError as err:
            await stream.aclose()
            raise _connect_error(core, err) from err
        except BaseException:
            await stream.aclose()
            raise
        return _AsyncFreshTls(stream, self._tls, key, core)

    async def connect_unix_socket(self, path: str, timeout: Optional[float] = None,  # type: ignore[override]
                                  socket_options: Any = None) -> Any:
        raise self._core.ConnectError(f"mesh TLS (cluster {self._tls.cluster}) over a unix socket is not supported")

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        await self._backend.sleep(seconds)


class _Inner:
    """A cluster's inner transport and, when it sends like the library's own, its connection pool
    and that pool's ``Request``/``URL`` classes (``pool`` None: attempts go through ``transport``)."""

    __slots__ = ("transport", "pool", "Request", "URL", "map_exc", "bare", "endpoints")

    def __init__(self, transport: Any, lib: _Lib, sync: bool, endpoints: Optional[Dict[str, Any]] = None) -> None:
        self.transport = transport
        self.pool = self.Request = self.URL = self.map_exc = None
        self.bare = False
        self.endpoints = endpoints  # mesh TLS with auto_host_sni: endpoint key -> Endpoint (see _TlsBackend)
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
        #: the mesh's TLS per attempt (``upstream_tls(cluster, endpoint)``; None: a mesh without TLS)
        self._tls_of: Callable[[str, Any], Any] = getattr(mesh, "upstream_tls", None) or _no_tls
        self._tls_refusal = self._why_no_tls()
        self._ssl: Dict[str, Any] = {}  # library name -> the SSL context its inner transports share
        self._lock = threading.Lock()
        self._libs: Dict[Any, _Lib] = {}  # request type -> its library
        self._fixed_lib = _Lib(self._module) if self._module is not None else None
        self._origins: Dict[str, Tuple[bytes, int]] = {}  # endpoint key -> (host, port) for the pool
        self._ascii: Dict[str, Tuple[bytes, bytes]] = {}  # authority -> its Host header pair
        self._urls: Dict[Any, Tuple[str, bytes, bytes, Optional[str]]] = {}  # see _url_parts
        self._headers: Dict[Tuple[Any, ...], Any] = {}  # see _mesh_headers
        # (the metadata exchange, the same lists with its headers): one attribute, read and
        # replaced at once (threads share a sync transport: a list made for an older exchange
        # never lands in a newer one's table)
        self._headers_x: Tuple[Any, Dict[Tuple[Any, ...], Any]] = (None, {})
        #: the mesh's telemetry (None: a mesh-like object without), its request core's note_response
        self._telemetry: Any = getattr(mesh, "telemetry", None)
        self._note: Callable[..., None] = getattr(getattr(mesh, "_core", None), "note_response", _py_note_response)
        close = self._close_inner_sync if self._sync else self._close_inner_async
        self._pools = _ClusterPools(mesh, self._new_inner, close, is_async=not self._sync)

    @property
    def _inner(self) -> Dict[Tuple[Any, ...], Any]:
        """``(library, cluster, sni) -> inner transport`` of the clusters in use; a cluster socket
        with mesh TLS: ``(library, cluster, None, UpstreamTls)``."""
        return {k: v.transport for k, v in self._pools.pools().items()}

    def _why_no_tls(self) -> Optional[str]:
        """Why this transport cannot apply mesh TLS (None: it can): TLS clusters then refuse."""
        if self._factory is not None:
            return ("the inner transports are made by inner_factory, which meshcore cannot add mesh TLS to; "
                    "leave inner_factory out (give transport settings such as limits= to the mesh transport)")
        if self._transport_kwargs.get("proxy") is not None:
            return "the inner transports go through a proxy (proxy=), which mesh TLS does not support"
        if self._transport_kwargs.get("uds") is not None:
            return "the inner transports connect to a unix socket (uds=), which mesh TLS does not support"
        return None

    def _sender(self, *args: Any) -> Callable[[Any], Any]:
        """``send(attempt)`` for lifecycle's router and retries: ``_send`` with this request's arguments."""
        return _partial(self._send, *args)

    @staticmethod
    def _close_inner_sync(inner: _Inner) -> None:
        inner.transport.close()

    @staticmethod
    async def _close_inner_async(inner: _Inner) -> None:
        await inner.transport.aclose()

    def _new_inner(self, key: Tuple[Any, ...]) -> _Inner:
        name, cluster = key[0], key[1]
        mod = sys.modules[name]
        if len(key) > 3:
            return self._new_tls_inner(mod, key[3])
        if self._factory is not None:
            transport = self._factory(cluster)
        else:
            kwargs = dict(self._transport_kwargs)
            kwargs["verify"] = self._ssl_context(mod)
            kwargs.pop("cert", None)  # in the shared context
            cls = mod.HTTPTransport if self._sync else mod.AsyncHTTPTransport
            transport = cls(http2=self._http2, **kwargs)
        return _Inner(transport, self._lib_named(name), self._sync)

    def _new_tls_inner(self, mod: ModuleType, tls: Any) -> _Inner:
        """The inner transport of a cluster socket with mesh TLS: the library's transport (the
        settings of ``transport_kwargs``) over an httpcore pool whose network backend does the
        mesh TLS (:class:`_TlsBackend`); ALPN for HTTP/2 when the transport is ``http2``."""
        kw = self._transport_kwargs
        kwargs = dict(kw)
        kwargs["verify"] = ssl_context = self._ssl_context(mod)  # (https URLs are refused: unused)
        kwargs.pop("cert", None)
        cls = mod.HTTPTransport if self._sync else mod.AsyncHTTPTransport
        transport = cls(http2=self._http2, **kwargs)
        core = sys.modules[type(transport._pool).__module__.partition(".")[0]]
        limits = kw.get("limits") or _default_limits(cls)
        http1 = kw.get("http1", True)
        endpoints: Optional[Dict[str, Any]] = {} if tls.spec.auto_host_sni else None
        backend = (_TlsBackend if self._sync else _AsyncTlsBackend)(
            core, tls, "h2" if self._http2 else "http/1.1", endpoints)
        pool_cls = core.ConnectionPool if self._sync else core.AsyncConnectionPool
        transport._pool = pool_cls(
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            http1=http1, http2=self._http2, local_address=kw.get("local_address"), retries=kw.get("retries", 0),
            socket_options=kw.get("socket_options"), network_backend=backend)
        return _Inner(transport, self._lib_named(mod.__name__), self._sync, endpoints)

    def _tls_slot(self, key: Tuple[Any, ...], cluster: str, tls: Any, attempt: Any, mod: ModuleType,
                  request: Any) -> Any:
        """The slot of an attempt to a cluster socket with mesh TLS (or the refusal to send it)."""
        if self._tls_refusal is not None or key[2] is not None:
            why = self._tls_refusal or ("the URL is https://; mesh TLS carries plain HTTP (as a sidecar does): "
                                        "use an http:// URL")
            raise mod.UnsupportedProtocol(
                f"cluster {cluster} requires mesh TLS to {attempt.endpoint.key}, but {why}", request=request)
        slot = self._pools.acquire((key[0], cluster, None, tls), cluster)
        endpoints = slot.pool.endpoints
        if endpoints is not None:  # auto_host_sni: the backend looks the endpoint's hostname up
            if len(endpoints) >= _CACHE_MAX:
                endpoints.clear()
            ep = attempt.endpoint
            endpoints[ep.key] = ep
        return slot

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

    def _slot_for(self, mod: ModuleType, cluster: str, sni: Optional[str], tls: Any = None) -> Any:
        """The cluster's inner transport (``slot.pool``) for the cluster socket ``tls`` (None:
        plaintext), counted in flight until released."""
        key = (mod.__name__, cluster, sni)
        return self._pools.acquire(key if tls is None else key + (tls,), cluster)

    @staticmethod
    def _logical_url(request: Any) -> str:
        url = request.url
        return f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"

    def _mesh_headers(self, request: Any, exchange: Any = None
                      ) -> Tuple[Any, Optional[Tuple[Tuple[bytes, bytes], ...]], bool]:
        """``(routing view, upstream pairs, peer)`` of the request's headers. The routing view:
        the ``(name, value)`` string pairs (lower-cased names) the mesh routes by; the upstream
        pairs: the ``(name, value)`` byte pairs an attempt sends after its ``Host`` (router
        headers and Host dropped; with Istio's metadata ``exchange``, its headers in place of any
        the application sent), or None (made per attempt, the exchange added then); ``peer``:
        whether the application may have sent Istio's x-envoy-peer-metadata(-id) itself. The
        three are kept per header list (and exchange), as a client sends the same headers again
        and again (not for lists carrying credentials, which are decoded for their request
        only). The routing view is a list, not a tuple: the route table walks lists of str pairs
        in C (a tuple costs ~0.7 us more); the mesh only reads it."""
        headers = request.headers
        try:
            key = tuple(headers._list)
        except AttributeError:
            return headers.multi_items(), None, True
        if exchange is None:
            cache = self._headers
        else:
            made_for, cache = self._headers_x
            if made_for is not exchange:  # (a new exchange: the lists made for the last one are dropped)
                cache = {}
                self._headers_x = (exchange, cache)
        both = cache.get(key)
        if both is None:
            try:
                pairs = [(k.decode(), v.decode()) for _, k, v in key]
            except UnicodeDecodeError:
                return headers.multi_items(), None, True
            peer = any(lk in _PEER_NAMES for _, lk, _ in key)
            if exchange is None:
                upstream = tuple([(k, v) for k, lk, v in key if lk not in _DROP])
            else:
                upstream = tuple([(k, v) for k, lk, v in key if lk not in _DROP and lk not in _PEER_NAMES]
                                 ) + tuple(exchange.headers_bytes)
            both = (pairs, upstream, peer)
            if any(k in _SECRET for _, k, _ in key):
                return both  # credentials are not kept beyond their request
            if len(cache) >= _HEADERS_MAX:
                cache.clear()
            cache[key] = both
        return both

    def _url_parts(self, url: Any) -> Tuple[str, bytes, bytes, Optional[str]]:
        """``(logical URL, raw path, scheme as bytes, SNI host or None)`` of a request URL, kept
        per parsed URL (httpx's own parse result, a tuple of strings) for the URLs a client repeats."""
        ref = getattr(url, "_uri_reference", None)
        parts = self._urls.get(ref) if ref is not None else None
        if parts is None:
            raw_path = url.raw_path
            path = raw_path.decode("ascii")
            scheme = url.scheme
            parts = (f"{scheme}://{url.netloc.decode('ascii')}{path}", raw_path, _SCHEMES.get(scheme) or url.raw_scheme,
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
                      path: str, sni: Optional[str], upstream: Optional[Tuple[Tuple[bytes, bytes], ...]],
                      exchange: Any = None, peer: bool = False) -> Any:
        """The pool's request for one attempt: ``ip:port`` of the picked endpoint, the logical Host
        (router headers dropped), the timeouts capped by the attempt's, SNI the logical host.
        ``upstream``: the header pairs after Host (see ``_mesh_headers``: with the ``exchange``'s
        own; None: made here, Istio's metadata ``exchange`` added, replacing the application's
        when ``peer``); while tracing is on, the attempt's trace headers."""
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
            if exchange is not None:  # Istio's metadata exchange: ours replace the app's
                if peer:
                    headers = [h for h in headers if h[0].lower() not in _PEER_NAMES]
                headers.extend(exchange.headers_bytes)
        if _TRACER[0] is not None:  # tracing (meshcore.telemetry.tracing): this attempt's headers
            _add_trace_bytes(headers, _trace_headers(attempt))
        extensions = request.extensions
        cap = attempt.timeout
        if cap is not None or sni is not None:
            extensions = dict(extensions)
            if cap is not None:
                if cap < 0.001:
                    cap = 0.001  # spent (the deadline passed in a back-off): sockets reject <= 0
                timeout = extensions.get("timeout")
                if type(timeout) is dict and len(timeout) == 4 and "pool" in timeout and "connect" in timeout \
                        and "read" in timeout and "write" in timeout:
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
    def _attempt_request(mod: ModuleType, request: Any, attempt: Any, sni: str, exchange: Any = None) -> Any:
        headers = _drop_router_headers(request.headers.copy())
        headers["Host"] = attempt.authority
        if exchange is not None:  # Istio's metadata exchange (enable_istio_metrics): ours replace the app's
            for k in (_PEER_HEADER, _PEER_HEADER_ID):
                if k in headers:
                    del headers[k]
            for k, v in exchange.headers:
                headers[k] = v
        if _TRACER[0] is not None:  # tracing: this attempt's headers replace the application's
            for k, v in _trace_headers(attempt):
                headers[k] = v
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


# -- the router loop, first attempt inline ---------------------------------------------------------
#
# While tracing is off, the transports run the usual request's router steps themselves
# (``lifecycle.run``/``run_async``'s straight path: ``first_attempt``, the attempt under its
# deadline, ``finish_final``), which saves the router coroutine and its frame per request (~2-4 us
# in a client's request, most of it the async deadline and coroutine machinery). Anything else --
# a fault filter (``first_attempt`` is None), an outcome the policy may retry, an error -- is
# lifecycle's: the fault path through ``run``/``run_async`` itself, a retry through
# ``lifecycle.run_after``/``run_after_async`` (the router loop after the first outcome). With
# telemetry sinks the call is reported as ``lifecycle.run_reported`` reports it; tracing (spans
# around each attempt) takes ``run_reported`` itself.


def _tell_telemetry_headers(attempt: Any, response: Any, raw: bytes, exchange: Any) -> None:
    """The attempt's facts for its telemetry record (``note_response``'s) for a library
    ``Response`` from an inner transport."""
    peer = None
    if exchange is not None:
        headers = response.headers
        peer = headers.get(_PEER_HEADER)
        if peer is not None:
            del headers[_PEER_HEADER]
        if _PEER_HEADER_ID in headers:
            del headers[_PEER_HEADER_ID]
    attempt.telemetry = {"peer_metadata": peer, "request_bytes": None, "response_bytes": len(raw)}


def _raise_pool_error(lib: _Lib, inner: _Inner, request: Any, exc: Exception) -> NoReturn:
    """Raise what the client raises for the pool's error ``exc``: for mesh TLS (see
    ``_connect_error``) a ConnectError caused by the meshcore error, else the library's own
    httpcore -> httpx mapping."""
    err = getattr(exc, "_meshcore_tls", None)
    if err is not None:
        raise lib.mod.ConnectError(str(err), request=request) from err
    with inner.map_exc():
        raise exc


def _add_trace_bytes(headers: List[Tuple[bytes, bytes]], pairs: Any) -> None:
    """Add an attempt's trace headers (``tracing.headers_of``) to the pool request's byte pairs,
    replacing the application's own trace headers (as Envoy does)."""
    if not pairs:
        return
    if any(k.lower().decode("latin-1") in _TRACE_HEADERS for k, _ in headers):
        headers[:] = [h for h in headers if h[0].lower().decode("latin-1") not in _TRACE_HEADERS]
    headers.extend([(k.encode("ascii"), v.encode("latin-1")) for k, v in pairs])


def _no_tls(cluster: str, endpoint: Any) -> None:
    """``upstream_tls`` of a mesh object without one (a stand-in): plaintext."""
    return None


def _default_limits(cls: Any) -> Any:
    """The library transport's default ``limits`` (httpx's ``DEFAULT_LIMITS``)."""
    return inspect.signature(cls.__init__).parameters["limits"].default


def _final_response(lib: _Lib, request: Any, resp: Any, raw: bytes) -> Any:
    """The client's response from the pool's (read) response: one ``Response``, an unread,
    replayable stream of the raw body; the pool's network stream is not handed out. Where the
    library's classes have the probed shape (:func:`_probe_response`), the response is made as
    its constructor would make it, without the copies (the pool's headers and extensions are
    this response's own)."""
    ext = resp.extensions
    if "network_stream" in ext:
        del ext["network_stream"]
    if lib.bare_response:
        h = _new(lib.Headers)
        h._list = [(k, k.lower(), v) for k, v in resp.headers]
        h._encoding = None
        stream = _new(lib.ByteStream)
        stream._stream = raw
        r = _new(lib.Response)  # the attributes in the constructor's order (_RESPONSE_FIELDS)
        r.status_code = resp.status
        r.headers = h
        r._request = request
        r.next_request = None
        r.extensions = ext
        r.history = []
        r.is_closed = False
        r.is_stream_consumed = False
        r.default_encoding = "utf-8"
        r.stream = stream
        r._num_bytes_downloaded = 0
        return r
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

    def _send(self, request: Any, lib: _Lib, key: Tuple[Any, ...], cluster: str, scheme: bytes,
              target: bytes, path: str, sni: Optional[str], upstream: Any, exchange: Any, peer: bool,
              attempt: Any) -> Any:
        """One attempt of ``request`` (``lifecycle``'s ``send(attempt)``: the arguments before
        ``attempt`` are bound per request, see ``handle_request``)."""
        try:
            tls = self._tls_of(cluster, attempt.endpoint)
        except TlsHandshakeError as e:  # TLS required, certificates missing: never plaintext
            raise lib.mod.ConnectError(str(e), request=request) from e
        pools = self._pools
        slot = pools.acquire(key, cluster) if tls is None else self._tls_slot(key, cluster, tls, attempt, lib.mod,
                                                                              request)
        try:
            inner = slot.pool
            pool = inner.pool
            if pool is not None:
                req = self._core_request(inner, request, attempt, scheme, target, path, sni, upstream, exchange, peer)
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
                    _raise_pool_error(lib, inner, request, exc)
                if _TELEMETRY[0] or exchange is not None:  # strip the peer's metadata we asked for
                    self._note(attempt, resp, len(raw), exchange is not None)
                return _final_response(lib, request, resp, raw)
            mod = lib.mod
            try:
                response = inner.transport.handle_request(
                    self._attempt_request(mod, request, attempt, request.url.raw_host.decode("ascii"), exchange))
            except mod.ConnectError as exc:
                _tls_cause_first(exc)
                raise
            try:
                raw = b"".join(response.iter_raw())
            finally:
                response.close()
            if _TELEMETRY[0] or exchange is not None:  # strip the peer's metadata we asked for
                _tell_telemetry_headers(attempt, response, raw, exchange)
            return _Answer.of(response, raw)
        finally:
            pools.release(slot)


    def handle_request(self, request: Any) -> Any:
        lib = self._fixed_lib or self._lib(request)
        url = request.url
        logical, raw_path, scheme_b, sni = self._url_parts(url)
        tel = self._telemetry if _TELEMETRY[0] else None
        exchange = tel.exchange if tel is not None else None
        headers, upstream, peer = self._mesh_headers(request, exchange)
        try:
            try:
                call = self._mesh.request(logical, request.method, headers)
            except NotReady:
                call = _route(self._mesh, logical, request.method, headers, self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(lib.mod, request, e) from e
        cluster = call.cluster
        if cluster is None:
            local = _local_reply(call)
            if local is not None:
                return self._reply(lib.mod, request, local, call)
        if call.retry_policy is not None and not hasattr(request, "_content") and _retries_possible(call):
            request.read()  # a retry sends the body again (unless read already, as without a body)

        key = (lib.name, cluster, sni)
        path = call.path
        one = False  # the first attempt's answer ended the request (inline path)
        try:
            try:
                a = None if _TRACER[0] is not None else call.first_attempt()
            except BaseException as e:  # refused before its attempt (UH, UO): recorded as run_reported does
                if _TELEMETRY[0]:
                    _report(call, None, e)
                raise
            if a is None:  # tracing (spans around attempts) or a fault filter: lifecycle's router
                send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream, exchange, peer)
                answer = (_run_reported if _TELEMETRY[0] else _run)(call, send, _status_code, None, lib.classify)
            else:  # run's straight path, inline (see run_after); reported as run_reported does
                try:
                    try:
                        answer = self._send(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream,
                                            exchange, peer, a)
                    except BaseException as e:  # noqa: BLE001  (classified)
                        kind = lib.classify(e)
                        a.finish(error=kind or RESET)
                        if kind is None:
                            raise
                        send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream,
                                            exchange, peer)
                        answer = _run_after(call, a, None, e, send, _status_code, None, lib.classify)
                    else:
                        if a.finish_final(answer.status_code, None):
                            one = True
                        else:
                            send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream,
                                                exchange, peer)
                            answer = _run_after(call, a, answer, None, send, _status_code, None, lib.classify)
                except BaseException as e:  # (the record of a request that raised)
                    if _TELEMETRY[0]:
                        _report(call, None, e)
                    raise
                if _TELEMETRY[0]:  # Istio metrics and the other sinks; tracing takes lifecycle's path
                    _report_answer(tel, call, answer)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(lib.mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(lib.mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        if type(answer) is _Answer:
            return self._finish(lib.mod, answer, request, call)
        answer.extensions["meshcore"] = ({"cluster": cluster, "endpoint": a.endpoint.key,
                                          "route": call.route.route_name, "attempts": 1} if one else _info(call))
        return answer

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

    async def _send(self, request: Any, lib: _Lib, key: Tuple[Any, ...], cluster: str, scheme: bytes,
                    target: bytes, path: str, sni: Optional[str], upstream: Any, exchange: Any, peer: bool,
                    attempt: Any) -> Any:
        """One attempt of ``request`` (``lifecycle``'s ``send(attempt)``: the arguments before
        ``attempt`` are bound per request, see ``handle_async_request``)."""
        try:
            tls = self._tls_of(cluster, attempt.endpoint)
        except TlsHandshakeError as e:  # TLS required, certificates missing: never plaintext
            raise lib.mod.ConnectError(str(e), request=request) from e
        pools = self._pools
        slot = pools.acquire(key, cluster) if tls is None else self._tls_slot(key, cluster, tls, attempt, lib.mod,
                                                                              request)
        try:
            inner = slot.pool
            pool = inner.pool
            if pool is not None:
                req = self._core_request(inner, request, attempt, scheme, target, path, sni, upstream, exchange, peer)
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
                    _raise_pool_error(lib, inner, request, exc)
                if _TELEMETRY[0] or exchange is not None:  # strip the peer's metadata we asked for
                    self._note(attempt, resp, len(raw), exchange is not None)
                return _final_response(lib, request, resp, raw)
            mod = lib.mod
            try:
                response = await inner.transport.handle_async_request(
                    self._attempt_request(mod, request, attempt, request.url.raw_host.decode("ascii"), exchange))
            except mod.ConnectError as exc:
                _tls_cause_first(exc)
                raise
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            if _TELEMETRY[0] or exchange is not None:  # strip the peer's metadata we asked for
                _tell_telemetry_headers(attempt, response, raw, exchange)
            return _Answer.of(response, raw)
        finally:
            closing = pools.release(slot)  # (arelease without its coroutine)
            if closing is not None:
                await self._close_inner_async(closing)


    async def handle_async_request(self, request: Any) -> Any:
        lib = self._fixed_lib or self._lib(request)
        url = request.url
        logical, raw_path, scheme_b, sni = self._url_parts(url)
        tel = self._telemetry if _TELEMETRY[0] else None
        exchange = tel.exchange if tel is not None else None
        headers, upstream, peer = self._mesh_headers(request, exchange)
        try:
            try:
                call = self._mesh.request(logical, request.method, headers)
            except NotReady:
                call = await _aroute(self._mesh, logical, request.method, headers, self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(lib.mod, request, e) from e
        cluster = call.cluster
        if cluster is None:
            local = _local_reply(call)
            if local is not None:
                return self._reply(lib.mod, request, local, call)
        if call.retry_policy is not None and not hasattr(request, "_content") and _retries_possible(call):
            await request.aread()  # (a coroutine only when there is something to read)

        key = (lib.name, cluster, sni)
        path = call.path
        one = False  # the first attempt's answer ended the request (inline path)
        try:
            try:
                a = None if _TRACER[0] is not None else call.first_attempt()
            except BaseException as e:  # refused before its attempt (UH, UO): recorded as run_reported does
                if _TELEMETRY[0]:
                    _report(call, None, e)
                raise
            if a is None:  # tracing (spans around attempts) or a fault filter: lifecycle's router
                send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream, exchange, peer)
                answer = await (_run_async_reported if _TELEMETRY[0] else _run_async)(call, send, _status_code, None,
                                                                                        lib.classify)
            else:  # run_async's straight path, inline (see run_after_async); reported as run_reported does
                try:
                    timeout = a.timeout
                    try:
                        if timeout is not None:  # lifecycle.send_timed's steps, without its coroutine
                            dl = _deadline_begin(a, timeout)
                            try:
                                answer = await self._send(request, lib, key, cluster, scheme_b, raw_path, path, sni,
                                                          upstream, exchange, peer, a)
                            except asyncio.CancelledError as cancelled:
                                if dl.timed_out(a):
                                    raise TimeoutError(f"attempt timed out after {timeout:.3f}s") from cancelled
                                raise
                            finally:
                                _deadline_end(dl, a)
                        else:
                            answer = await self._send(request, lib, key, cluster, scheme_b, raw_path, path, sni,
                                                      upstream, exchange, peer, a)
                    except BaseException as e:  # noqa: BLE001  (classified)
                        kind = lib.classify(e)
                        a.finish(error=kind or RESET)
                        if kind is None:
                            raise
                        send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream,
                                            exchange, peer)
                        answer = await _run_after_async(call, a, None, e, send, _status_code, None, lib.classify)
                    else:
                        if a.finish_final(answer.status_code, None):
                            one = True
                        else:
                            send = self._sender(request, lib, key, cluster, scheme_b, raw_path, path, sni, upstream,
                                                exchange, peer)
                            answer = await _run_after_async(call, a, answer, None, send, _status_code, None,
                                                                   lib.classify)
                except BaseException as e:  # (the record of a request that raised)
                    if _TELEMETRY[0]:
                        _report(call, None, e)
                    raise
                if _TELEMETRY[0]:  # Istio metrics and the other sinks; tracing takes lifecycle's path
                    _report_answer(tel, call, answer)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(lib.mod, request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(lib.mod, request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        if type(answer) is _Answer:
            return self._finish(lib.mod, answer, request, call)
        answer.extensions["meshcore"] = ({"cluster": cluster, "endpoint": a.endpoint.key,
                                          "route": call.route.route_name, "attempts": 1} if one else _info(call))
        return answer

    async def aclose(self) -> None:
        for t in self._pools.take_all():
            await t.transport.aclose()

    async def __aenter__(self) -> "AsyncMeshTransport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
