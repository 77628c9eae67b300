"""An aiohttp session wrapper that routes every request through the mesh.

aiohttp has no per-request hook that can re-target a request (its resolver runs per connection
and ``ClientRequest.url`` is fixed), so the wrapper routes first and then calls the session with
the picked endpoint's URL::

    from meshcore.integrations.aiohttp import MeshSession

    async with MeshSession(mesh, hosts=["*.svc.cluster.local"]) as http:
        async with http.get("http://reviews.default.svc.cluster.local:9080/reviews/1") as resp:
            data = await resp.json()

Per request: ``Mesh.request`` routes it (query ``params`` and the session's default headers
included), the router applies the route's policies (``Call.run_async``'s steps: while tracing is
off and no fault filter applies, the first attempt runs inline in the request's own coroutine and
a retry continues in ``lifecycle.run_after_async``; otherwise ``lifecycle.run_async(_reported)``),
and each attempt is
``session.request(method, URL("http://ip:port/path"), headers={..., "Host": <authority>},
server_hostname=<logical host>)`` (called as the coroutine ``session._request`` unless the session's
class changes ``request``: the attempt needs no context manager; ``server_hostname`` only for ``https``: SNI and certificate
verification use the service name, and it is part of aiohttp's connection key), so the session's
connector pools the connections per endpoint. The attempt's deadline (per-try timeout, route
timeout, the caller's ``total``) is the one timer the attempt runs under: aiohttp gets the
request's ``ClientTimeout`` without its ``total`` (``connect``, ``sock_connect``, ``sock_read``
still apply). What does not change between requests is made once: the endpoint URLs, the
per-host routing decision, the timeouts and, for a request without headers, keyword arguments
or cookies of its own, what its attempts send (the headers with the logical ``Host``; with Istio's
metadata exchange on, this workload's ``x-envoy-peer-metadata``/``-id``, which replace the
application's own, any case, as Istio's filter does; a mesh without a node id -- a resource
file's -- sends no ``-id``, and then an ``-id`` among the session's default headers, which aiohttp
adds itself, still goes). The body
is read within the attempt, so the returned ``aiohttp.ClientResponse`` has its status and body; its ``url`` is the endpoint's
URL, ``resp.meshcore`` says ``{"cluster", "endpoint", "route", "attempts"}``. Cookies are stored
in and sent from the session's jar under the logical URL. Redirects are followed here (``allow_
redirects``, ``max_redirects``), each hop routed again, so they never bypass the mesh, and
``raise_for_status`` (argument or session default) applies to the final answer, after retries.
The ``total`` of the request's (or session's) ``ClientTimeout`` is the caller's deadline for the
whole request, retries included (``Mesh.request(timeout=)``), under the route timeout.

Direct-response and redirect routes and fault-filter aborts are answered without an upstream by
a small :class:`LocalResponse` (``status``, ``headers``, ``read``/``text``/``json``,
``raise_for_status``, async context manager). Failures raise aiohttp's exceptions: an upstream
failure after the last attempt as aiohttp raised it; a per-try or route timeout as
``ServerTimeoutError`` (an ``asyncio.TimeoutError``); no healthy endpoint or an open circuit
breaker as ``ClientConnectionError``; no matching route as ``ClientError`` -- the meshcore error is
``__cause__``. Hosts not matching ``hosts`` (fnmatch patterns; default: every host) go straight to
the session.

Mesh TLS (a cluster whose ``transport_socket`` or matching ``transport_socket_matches`` entry is
an ``UpstreamTlsContext``, e.g. Istio's auto-mTLS): the app keeps its ``http://`` URLs, as behind
a sidecar, and the attempt's connection is made with TLS under the plaintext request by
:class:`MeshConnector` -- the mesh's certificates, roots, ALPN (Istio's ``istio-http/1.1``, so a
sidecar serves it through its HTTP filter chain) and SNI; the peer's certificate is checked
against the cluster's SAN matchers before the request is written. These connections are pooled
apart from plaintext ones and per cluster socket; a rotation of the workload certificates
reaches new connections, pooled ones keep theirs. Every TLS failure -- handshake refused, SAN
mismatch, the server refusing this workload's certificate just after the handshake (TLS 1.3),
certificates missing -- is a :class:`MeshTlsError` (an ``aiohttp.ClientConnectorError``, so a
connect failure for ``retry_on`` and outlier detection; ``__cause__`` is the
:class:`meshcore.tls.TlsHandshakeError`); nothing is ever sent in plaintext instead. The session
:class:`MeshSession` makes has a :class:`MeshConnector`; a session given to it with a plain
``TCPConnector`` has that connector turned into one on its first mesh TLS request, and one with
another connector class cannot reach mesh TLS clusters (the request fails). ``https://`` URLs
to a mesh TLS cluster are refused (``aiohttp.ClientError``).

Failures after the last attempt carry the mesh's context (``exc.meshcore``: target, cluster,
attempts, last endpoint, route; also a PEP 678 note). Connections live in the session's connector
(aiohttp keys them by endpoint and closes idle ones after its keep-alive timeout); when a cluster
leaves the mesh's configuration, the idle connections to its endpoints that no live cluster has
are closed as soon as the cluster's requests in flight finished (never one in use).
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import json as _json
import logging
import ssl
from operator import attrgetter
from typing import Any, Awaitable, Callable, Dict, Generator, Iterable, List, Optional, Tuple, Union

import aiohttp
import attr
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, NotReady, Unavailable
from ..lifecycle import deadline_begin as _deadline_begin, deadline_end as _deadline_end
from ..lifecycle import run_after_async as _run_after_async, run_async as _run_async
from ..lifecycle import run_async_reported as _run_async_reported
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ..resilience.router_headers import ROUTER_HEADERS
from ..telemetry.peer_metadata import HEADER as _PEER_HEADER, HEADER_ID as _PEER_HEADER_ID
from ..telemetry.outcome import report as _report, report_answer as _report_answer
from ..telemetry.record import ACTIVE as _TELEMETRY
from ..telemetry.tracing import TRACE_HEADERS as _TRACE_HEADERS, TRACER as _TRACER, headers_of as _trace_headers
from ..tls import TlsHandshakeError, is_deferred_rejection
from . import (
    _add_context,
    _aroute,
    _ClusterPools,
    _drop_router_headers,
    _fault_reply,
    _info,
    _local_reply,
    _reason,
    _Reply,
    _strip_peer_pairs,
)

__all__ = ["LocalResponse", "MeshConnector", "MeshSession", "MeshTlsError"]

log = logging.getLogger(__name__)

_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())
_UNSET: Any = object()
_MEMO_MAX = 256  # bounded memo tables (URLs as given, routed hosts, timeouts)
_URLS_MAX = 1024  # endpoint URLs (scheme, endpoint, path)
_SHORTEST_ROUTER_HEADER = min(len(h) for h in ROUTER_HEADERS)
_status_of = attrgetter("status")


def _plain(headers: Any, own: Any) -> bool:
    """Whether a request's headers can be sent as a plain dict plus ``Host``: a dict (or none)
    without a ``Host`` or router header."""
    if headers is not None and type(headers) is not dict:
        return False
    for name, _ in own:
        if type(name) is not str:
            return False
        n = len(name)
        if n == 4 and name.lower() == "host" or n >= _SHORTEST_ROUTER_HEADER and name.lower() in ROUTER_HEADERS:
            return False
    return True


def _store_cookies(jar: Any, resp: Any, url: URL) -> None:
    """The answer's cookies into the jar under the logical URL (aiohttp stored them under the
    endpoint's): from the raw Set-Cookie headers where aiohttp keeps them (3.12+; no
    ``SimpleCookie`` made for an answer without cookies)."""
    raw = getattr(resp, "_raw_cookie_headers", _UNSET)
    if raw is _UNSET:
        if resp.cookies:
            jar.update_cookies(resp.cookies, url)
    elif raw:
        update = getattr(jar, "update_cookies_from_headers", None)
        if update is not None:
            update(raw, url)
        else:
            jar.update_cookies(resp.cookies, url)


def _counts_cookies(jar: Any) -> bool:
    """Whether ``jar`` is aiohttp's own ``CookieJar`` keeping its ``len()`` in ``_cookie_count``
    (3.10+): then a request reads that field instead of calling ``len(jar)`` (a Python call)."""
    return type(jar) is aiohttp.CookieJar and type(getattr(jar, "_cookie_count", None)) is int and \
        getattr(aiohttp.CookieJar.__len__, "__code__", None) is not None and \
        "_cookie_count" in aiohttp.CookieJar.__len__.__code__.co_names


def _endpoint_key(host: Any, port: Any) -> str:
    """``ip:port`` / ``[v6]:port``, as ``Endpoint.key`` spells it, of a connector key."""
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _classify(exc: BaseException) -> Optional[str]:
    """aiohttp exception -> Envoy failure kind (TLS handshake failures are connect failures)."""
    if isinstance(exc, aiohttp.ClientConnectorError) or (_CONNECT_TIMEOUT and isinstance(exc, _CONNECT_TIMEOUT)):
        return CONNECT_FAILURE
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return TIMEOUT
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return RESET
    return default_classify(exc)


# -- mesh TLS ------------------------------------------------------------------------------------
#
# aiohttp does TLS only for https URLs; mesh TLS goes under the app's http:// request instead.
# An attempt to an endpoint whose cluster socket is TLS passes ``ssl=<its _TlsMarker>`` and
# ``server_hostname=<SNI>``: both are part of aiohttp's connection key (so these connections are
# pooled apart from plaintext ones and per cluster socket), and aiohttp ignores both for an http
# URL -- except in MeshConnector's connection hook, which makes the connection with the mesh's
# context, checks the peer before anything is written and maps failures to MeshTlsError. The
# hook is private aiohttp API (``TCPConnector._wrap_create_connection``, stable 3.9-3.14): it is
# checked at import, and without it mesh TLS refuses to connect (never plaintext instead).


def _tls_hook_supported() -> bool:
    hook = getattr(aiohttp.TCPConnector, "_wrap_create_connection", None)
    if hook is None or not hasattr(ResponseHandler, "set_exception"):
        return False
    try:
        params = inspect.signature(hook).parameters
        handler = inspect.signature(ResponseHandler.__init__).parameters
    except (TypeError, ValueError):
        return False
    return "req" in params and "timeout" in params and "loop" in handler


_TLS_HOOK = _tls_hook_supported()


class MeshTlsError(aiohttp.ClientSSLError):
    """Mesh TLS to an endpoint failed: a handshake refusal, a peer whose certificate the
    cluster's SAN matchers refuse, the server refusing this workload's certificate right after
    the handshake (TLS 1.3), or certificates missing. A ``ClientConnectorError`` (a connect
    failure: ``retry_on: connect-failure`` retries it); ``__cause__`` / :attr:`tls_error` is the
    :class:`meshcore.tls.TlsHandshakeError`, whose message names the cluster, the endpoint and the reason."""

    def __init__(self, connection_key: Any, tls_error: TlsHandshakeError) -> None:
        super().__init__(connection_key, OSError(None, str(tls_error)))
        self.tls_error = tls_error
        self.args = (connection_key, tls_error)

    def __str__(self) -> str:
        return str(self.tls_error)


def _tls_error(endpoint: str, error: TlsHandshakeError) -> MeshTlsError:
    """:class:`MeshTlsError` for a failure before aiohttp had a connection key (``ip:port`` /
    ``[v6]:port``)."""
    host, _, port = endpoint.rpartition(":")
    key = ConnectionKey(host.strip("[]"), int(port) if port.isdigit() else None, False, True, None, None, None)
    exc = MeshTlsError(key, error)
    exc.__cause__ = error
    return exc


class _TlsMarker(ssl.SSLContext):
    """The ``ssl=`` of an attempt under one cluster socket's TLS (:attr:`tls`): a connection-pool
    key and the hook's cue. Never used for a handshake; if it were, it verifies against no roots
    and every handshake fails."""

    tls: Any = None

    def __new__(cls, tls: Any) -> "_TlsMarker":
        self = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        self.tls = tls
        return self

    def __init__(self, tls: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<mesh {self.tls!r}>"


class _TlsHandler(ResponseHandler):  # type: ignore[misc]
    """aiohttp's protocol for a mesh TLS connection: until its first byte arrives, the server
    closing it (EOF, an alert) is a TLS 1.3 refusal of this workload's certificate (the client's
    handshake had finished): the request fails with :class:`MeshTlsError`, a connect failure,
    not as a reset (which aiohttp would resend once on a new connection; 3.10 and 3.11 resend
    connector errors of that read too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fresh: Any) -> None:
        super().__init__(loop)
        self._mesh_fresh = fresh  # (UpstreamTls, endpoint key, connection key) until the first byte
        self._mesh_refused: Optional[MeshTlsError] = None

    def data_received(self, data: bytes) -> None:
        if self._mesh_fresh is not None and data:
            self._mesh_fresh = None
        super().data_received(data)

    def close(self) -> None:
        self._mesh_fresh = None  # closed here, not by the server
        super().close()

    def abort(self) -> None:
        self._mesh_fresh = None
        super().abort()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        fresh = self._mesh_fresh
        if fresh is not None:
            self._mesh_fresh = None
            if (exc is None or is_deferred_rejection(exc)) and self.exception() is None:
                tls, endpoint, key = fresh
                error = tls.deferred_rejection(exc or ConnectionResetError("connection closed"), endpoint)
                self._mesh_refused = MeshTlsError(key, error)
        super().connection_lost(exc)

    def set_exception(self, exc: BaseException, *cause: Any, **kw: Any) -> None:
        refused = self._mesh_refused
        if refused is not None:
            exc = refused
            cause = (refused.tls_error,) if cause or kw else ()
            kw = {}
            refused.__cause__ = refused.tls_error
        super().set_exception(exc, *cause, **kw)


class MeshConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that can make mesh TLS connections (and does everything else as
    ``TCPConnector``). :class:`MeshSession` makes its own session with one; a session given to
    it with a plain ``TCPConnector`` gets its connector turned into this class on the first mesh
    TLS request (a session with another connector class cannot reach mesh TLS clusters).

    A mesh TLS connection: TCP as aiohttp makes it, the handshake with the cluster socket's
    current context (``UpstreamTls.context("http/1.1")``: the mesh's certificates, roots and
    Istio ALPN) and SNI, then the peer check (SAN matchers) before the request is written."""

    async def _wrap_create_connection(self, *args: Any, req: Any, timeout: Any, **kwargs: Any) -> Any:
        marker = req.ssl
        if type(marker) is not _TlsMarker:
            return await super()._wrap_create_connection(*args, req=req, timeout=timeout, **kwargs)
        tls = marker.tls
        key = req.connection_key
        endpoint = _endpoint_key(req.url.raw_host, req.port)
        try:
            ctx = tls.context("http/1.1")
        except TlsHandshakeError as e:
            raise MeshTlsError(key, e) from e
        kwargs["ssl"] = ctx
        kwargs["server_hostname"] = req.server_hostname or ""  # "": no SNI (asyncio wants a value)
        fresh = (tls, endpoint, key)
        loop = self._loop
        try:
            transport, proto = await super()._wrap_create_connection(
                lambda: _TlsHandler(loop, fresh), *args[1:], req=req, timeout=timeout, **kwargs)
        except aiohttp.ClientConnectorError as e:
            cause = e.__cause__ if e.__cause__ is not None else e.os_error
            if isinstance(cause, ssl.SSLError) or \
                    isinstance(cause, (ConnectionError, EOFError)) and not isinstance(cause, ConnectionRefusedError):
                error = tls.handshake_error(cause, endpoint)
                raise MeshTlsError(key, error) from error
            raise
        try:
            tls.check_peer(transport.get_extra_info("ssl_object"), endpoint)
        except TlsHandshakeError as e:
            proto._mesh_fresh = None
            transport.abort()
            raise MeshTlsError(key, e) from e
        if transport.is_closing():  # refused already (TLS 1.3: after the client's handshake)
            refused = proto._mesh_refused
            proto._mesh_fresh = None
            transport.abort()
            if refused is None:
                refused = MeshTlsError(key, tls.deferred_rejection(ConnectionResetError("connection closed"), endpoint))
            raise refused from refused.tls_error
        return transport, proto


class LocalResponse:
    """A response made without an upstream (direct response, redirect route, fault abort)."""

    def __init__(self, method: str, url: URL, reply: _Reply, meshcore: Any) -> None:
        self.method = method
        self.url = url
        self.status = reply.status
        self.reason = _reason(reply.status)
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(reply.headers))
        self.history: tuple = ()
        self.meshcore = meshcore
        self._body = reply.body

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").split(";", 1)[0].strip()

    @property
    def request_info(self) -> aiohttp.RequestInfo:
        return aiohttp.RequestInfo(self.url, self.method, CIMultiDictProxy(CIMultiDict()), self.url)

    async def read(self) -> bytes:
        return self._body

    async def text(self, encoding: Optional[str] = None, errors: str = "strict") -> str:
        return self._body.decode(encoding or "utf-8", errors)

    async def json(self, *, loads: Callable[[str], Any] = _json.loads, **_: Any) -> Any:
        return loads(self._body.decode("utf-8"))

    def raise_for_status(self) -> None:
        if not self.ok:
            raise aiohttp.ClientResponseError(self.request_info, (), status=self.status, message=self.reason,
                                              headers=self.headers)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def __aenter__(self) -> "LocalResponse":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<LocalResponse({self.url}) [{self.status} {self.reason}]>"


Response = Union[aiohttp.ClientResponse, LocalResponse]


class _RequestContext:
    """``await ms.get(...)`` or ``async with ms.get(...) as resp`` (released on exit). The
    request's coroutine (``MeshSession._request(ctx, ...)``) is awaited as it is, no coroutine
    around it: it leaves its response in ``_resp`` for the exit."""

    __slots__ = ("_coro", "_resp")  # both set before use: made by _context() (no __init__ frame)

    _coro: Any
    _resp: Response

    def __await__(self) -> Generator[Any, None, Response]:
        return self._coro.__await__()  # type: ignore[no-any-return]

    def __aenter__(self) -> Awaitable[Response]:
        return self._coro  # type: ignore[no-any-return]

    def __aexit__(self, *exc: Any) -> "_Done":
        # no coroutine: release() is synchronous, the awaitable returned is done already (only
        # called once the request's coroutine returned, so after it set _resp)
        self._resp.release()
        return _DONE


_context = _RequestContext.__new__  # _context(_RequestContext): an empty one, no __init__ frame


class _Done:
    """An awaitable that is done (``None``) when awaited."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


_DONE = _Done()


class _Pool:
    """A cluster's "pool": the endpoints (keys) its attempts used, closed when the cluster leaves,
    and the senders of its requests without per-request arguments (made once, reused)."""

    __slots__ = ("used", "senders")

    def __init__(self) -> None:
        self.used: set = set()
        self.senders: Dict[Any, _Sender] = {}


class _Sender:
    """``send(attempt)`` of a routed request: the attempt to its endpoint with the session. One
    without per-request arguments (headers, keyword arguments, cookies) is shared by the requests
    of its cluster, route, authority, method and timeout (aiohttp copies the headers)."""

    __slots__ = ("request", "method", "headers", "timeout", "kwargs", "scheme", "cluster", "route_name", "used",
                 "urls", "targets", "route", "upstream_tls", "tls_kwargs", "exchange")

    def __init__(self, request: Any, method: str, headers: Any, timeout: Any, kwargs: Dict[str, Any], call: Any,
                 used: Any, urls: Dict[Any, URL], upstream_tls: Any, tls_kwargs: Any, exchange: Any = None) -> None:
        self.exchange = exchange  # Istio's metadata exchange (its headers are in ``headers``), or None
        self.request = request
        self.method = method
        self.headers = headers
        self.timeout = timeout
        self.kwargs = kwargs
        self.scheme = call.scheme
        self.cluster = call.cluster
        self.route = call.route  # held: shared senders are keyed by its id
        self.route_name = call.route.route_name
        self.used = used
        self.urls = urls
        self.targets: Dict[Tuple[str, str], URL] = {}  # (endpoint key, path) -> its URL: see target()
        self.upstream_tls = upstream_tls  # Mesh.upstream_tls (None: a mesh without TLS)
        self.tls_kwargs = tls_kwargs  # MeshSession._tls_kwargs

    def target(self, attempt: Any) -> URL:
        """``targets[(endpoint key, path)]`` of ``attempt``, made on first sight: the endpoint's URL
        (from the session's table, shared by its senders: one URL object per scheme, endpoint and
        path). The first sight records the endpoint as used by the sender's cluster (every attempt
        of the sender looks here first, so a hit needs no record: no set insertion per attempt)."""
        ep_key, path = attempt.endpoint.key, attempt.path
        urls = self.urls
        url = urls.get((self.scheme, ep_key, path))
        if url is None:
            url = URL(f"{self.scheme}://{ep_key}{path}", encoded=True)
            if len(urls) >= _URLS_MAX:
                urls.clear()
            urls[(self.scheme, ep_key, path)] = url
        if self.used is not None:
            self.used.add(ep_key)
        targets = self.targets
        if len(targets) >= _URLS_MAX:
            targets.clear()
        targets[(ep_key, path)] = url
        return url

    def extras(self, attempt: Any) -> Tuple[Any, Dict[str, Any]]:
        """``attempt``'s headers and keyword arguments when they are not the sender's own: with
        tracing on, a copy of the headers with the attempt's trace headers; under mesh TLS, the
        cluster socket's ``ssl`` marker and SNI among the keyword arguments."""
        kwargs = self.kwargs
        upstream_tls = self.upstream_tls
        if upstream_tls is not None:
            endpoint = attempt.endpoint
            try:
                tls = upstream_tls(self.cluster, endpoint)
            except TlsHandshakeError as e:  # TLS required, no certificates: no connection at all
                raise _tls_error(endpoint.key, e) from e
            if tls is not None:
                kwargs = self.tls_kwargs(tls, endpoint, kwargs, self.scheme)
        headers = self.headers
        if _TRACER[0] is not None:  # tracing (meshcore.telemetry.tracing): this attempt's headers
            traced = _trace_headers(attempt)
            if traced:
                headers = _with_trace(headers, traced)
        return headers, kwargs

    def finish(self, attempt: Any, resp: aiohttp.ClientResponse) -> None:
        """After ``attempt``'s answer was read: ``resp.meshcore`` and the attempt's facts for
        telemetry (with Istio's metadata exchange, the peer's metadata leave the answer)."""
        resp.meshcore = {"cluster": self.cluster, "endpoint": attempt.endpoint.key,  # type: ignore[union-attr]
                         "route": self.route_name, "attempts": attempt.number}
        if _TELEMETRY[0] or self.exchange is not None:  # strip the peer's metadata we asked for
            _tell_telemetry(attempt, resp, self.exchange)

    async def send(self, attempt: Any) -> aiohttp.ClientResponse:
        """One attempt (lifecycle's ``send(attempt)``; ``MeshSession._request`` runs the first
        attempt of the router's straight path inline, the same steps)."""
        target = self.targets.get((attempt.endpoint.key, attempt.path)) or self.target(attempt)
        if self.upstream_tls is None and _TRACER[0] is None:
            headers, kwargs = self.headers, self.kwargs
        else:
            headers, kwargs = self.extras(attempt)
        if kwargs:
            resp = await self.request(self.method, target, headers=headers, allow_redirects=False,
                                      timeout=self.timeout, **kwargs)
        else:
            resp = await self.request(self.method, target, headers=headers, allow_redirects=False,
                                      timeout=self.timeout)
        try:
            await resp.read()
        except BaseException:
            resp.close()
            raise
        self.finish(attempt, resp)
        return resp


_CLIENT_REQUEST = aiohttp.ClientSession.request
def _request_of(session: aiohttp.ClientSession) -> Any:
    """The coroutine function an attempt calls: ``session._request`` (what ``session.request``
    wraps in a context manager the attempt does not need) unless the session's class changes
    ``request``."""
    inner = getattr(session, "_request", None)
    if inner is not None and getattr(type(session), "request", None) is _CLIENT_REQUEST:
        return inner
    return session.request


def _with_trace(headers: Any, pairs: Any) -> Any:
    """A copy of a sender's headers (a dict or CIMultiDict) with an attempt's trace headers
    (``tracing.headers_of``), which replace the application's own (as Envoy does)."""
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _TRACE_HEADERS)
    out.extend(pairs)
    return out


def _tell_telemetry(attempt: Any, resp: aiohttp.ClientResponse, exchange: Any) -> None:
    """The attempt's facts for its telemetry record; with Istio's metadata exchange on, the
    peer's x-envoy-peer-metadata(-id) leave the response (as a client sidecar strips them)."""
    peer = None
    if exchange is not None:
        raw = resp._raw_headers
        kept, peer = _strip_peer_pairs(raw)
        if kept is not raw:
            headers = CIMultiDict(resp._headers)
            headers.popall("x-envoy-peer-metadata", None)
            headers.popall("x-envoy-peer-metadata-id", None)
            resp._headers = CIMultiDictProxy(headers)
            resp._raw_headers = tuple(kept)
            cache = getattr(resp, "_cache", None)  # aiohttp's reify keeps what was read before
            if isinstance(cache, dict):
                cache.pop("headers", None)
                cache.pop("raw_headers", None)
    body = getattr(resp, "_body", None)
    attempt.telemetry = {"peer_metadata": peer, "request_bytes": None,
                         "response_bytes": len(body) if isinstance(body, (bytes, bytearray)) else None}


class MeshSession:
    """Routes each request through the mesh, then sends it with an ``aiohttp.ClientSession``."""

    def __init__(self, mesh: Any, session: Optional[aiohttp.ClientSession] = None, *,
                 hosts: Optional[Iterable[str]] = None, ready_timeout: float = 10.0) -> None:
        """``session``: the session to send with (default: one made on first use and closed with
        this wrapper). ``hosts``: fnmatch patterns of the hosts to route (default: all). The first
        request to a target waits up to ``ready_timeout`` seconds for its configuration."""
        self._mesh = mesh
        #: the mesh's telemetry (None: a mesh-like object without)
        self._telemetry: Any = getattr(mesh, "telemetry", None)
        self._session = session
        self._owned = session is None
        self._hosts = tuple(hosts) if hosts is not None else None
        self._ready_timeout = ready_timeout
        # per cluster: the endpoints (keys) its attempts used (the "pool" closed when it leaves)
        self._pools = _ClusterPools(mesh, lambda cluster: _Pool(), self._close_endpoints, is_async=True)
        # made once, looked up per request (bounded): URLs as given, routed hosts, endpoint URLs,
        # the attempts' timeouts
        self._urls: Dict[str, Any] = {}  # URL as given -> (parsed, whether it is routed)
        self._routed_hosts: Dict[str, bool] = {}
        self._endpoint_urls: Dict[Any, URL] = {}  # (scheme, endpoint key, path) -> URL
        self._timeouts: Dict[int, Any] = {}  # id(request's ClientTimeout) -> (it, the attempts' one)
        # the session's fixed settings, read once: (session, default headers, timeout, cookie jar,
        # raise_for_status default, the attempts' timeout, whether the jar counts its cookies in
        # ``_cookie_count``: see _counts_cookies)
        self._bound: Any = (None, None, None, None, False, None, False)
        # mesh TLS: the cluster socket of an endpoint (None: a mesh without TLS), the ssl= marker of
        # each cluster socket (UpstreamTls -> _TlsMarker), the connector known to do mesh TLS
        self._upstream_tls = getattr(mesh, "upstream_tls", None)
        self._markers: Dict[Any, _TlsMarker] = {}
        self._tls_connector: Any = None

    async def _close_endpoints(self, pool: Any) -> None:
        """Close the idle connections to the endpoints ``pool`` used that no live cluster has."""
        used = pool.used if isinstance(pool, _Pool) else pool
        session = self._session
        connector = getattr(session, "connector", None) if session is not None else None
        conns = getattr(connector, "_conns", None)
        if not conns or not used:
            return  # nothing idle (or an aiohttp without that table: its keep-alive timeout closes them)
        live = set()
        for rt in list(self._mesh._publisher._runtimes.values()):
            lb = getattr(rt, "lb", None)
            for ep in getattr(lb, "endpoints", ()) or ():
                live.add(ep.key)
        for key in list(conns):
            host, port = getattr(key, "host", None), getattr(key, "port", None)
            ep_key = _endpoint_key(host, port)
            if ep_key not in used or ep_key in live:
                continue
            for proto, _ in conns.pop(key, ()):
                proto.close()
            log.debug("closed the idle connections to %s:%s (its cluster left)", host, port)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The underlying session (created on first use when none was given)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=MeshConnector())
        return self._session

    def request(self, method: str, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        """Like ``ClientSession.request`` (awaitable, or an async context manager)."""
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, method.upper(), url, **kwargs)
        return ctx

    def get(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "GET", url, **kwargs)
        return ctx

    def head(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("HEAD", url, allow_redirects=kwargs.pop("allow_redirects", False), **kwargs)

    def options(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "OPTIONS", url, **kwargs)
        return ctx

    def post(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "POST", url, **kwargs)
        return ctx

    def put(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "PUT", url, **kwargs)
        return ctx

    def patch(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "PATCH", url, **kwargs)
        return ctx

    def delete(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        ctx = _context(_RequestContext)
        ctx._coro = self._request(ctx, "DELETE", url, **kwargs)
        return ctx

    async def close(self) -> None:
        """Close the session if this wrapper made it."""
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "MeshSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------------

    def _routed(self, url: URL) -> bool:
        scheme = url.scheme
        if scheme != "http" and scheme != "https":
            return False
        if self._hosts is None:
            return True
        host = url.host or ""
        routed = self._routed_hosts.get(host)
        if routed is None:
            routed = any(fnmatch.fnmatch(host, p) for p in self._hosts)
            if len(self._routed_hosts) >= _MEMO_MAX:
                self._routed_hosts.clear()
            self._routed_hosts[host] = routed
        return routed

    def _parse(self, url: str) -> Any:
        parsed = URL(url)
        entry = (parsed, self._routed(parsed))
        if len(self._urls) >= _MEMO_MAX:
            self._urls.clear()
        self._urls[url] = entry
        return entry

    def _attempt_timeout(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        """The request's ``ClientTimeout`` without its ``total``: the attempt's deadline (the
        route's timeouts and the caller's total) is the router loop's timer."""
        found = attr.evolve(timeout, total=None)
        if len(self._timeouts) >= _MEMO_MAX:
            self._timeouts.clear()
        self._timeouts[id(timeout)] = (timeout, found)  # holds ``timeout``: its id is not reused
        return found

    def _bind(self, session: aiohttp.ClientSession) -> Any:
        """The session's settings that do not change (its default headers are read per request:
        that mapping may be changed in place)."""
        timeout = session.timeout
        jar = session.cookie_jar
        self._bound = (session, session.headers, timeout, jar, getattr(session, "_raise_for_status", False),
                       self._attempt_timeout(timeout), _counts_cookies(jar))
        return self._bound

    def _prepare(self, url: Union[str, URL], params: Any, headers: Any, kwargs: Dict[str, Any], defaults: Any,
                 timeout: aiohttp.ClientTimeout, attempt_timeout: Any, session_check: Any) -> Tuple[Any, ...]:
        """A request's own arguments, read once: ``(url, text, routed, check, timeout,
        attempt_timeout, own, pairs, own_kwargs)`` -- the URL (``text``: as given, or ``None``) and
        whether it is routed, the ``raise_for_status`` that applies, the request's timeout and its
        attempts' (``None``: looked up when routed), its own headers as pairs (``own``) and the
        pairs it is routed with (the session's defaults included), and whether keyword arguments
        are left for the attempts. ``kwargs`` is changed in place (what the attempts pass on)."""
        if type(url) is str:
            text: Optional[str] = url
            url, routed = self._urls.get(url) or self._parse(url)
        else:
            text, url = None, URL(url)
            routed = self._routed(url)
        if params:
            extend = getattr(url, "extend_query", None)  # yarl >= 1.9
            url = extend(params) if extend else url.with_query([*url.query.items(),
                                                                 *URL("/").with_query(params).query.items()])
            text = None
            routed = self._routed(url)
        check = session_check
        if kwargs:
            check = kwargs.pop("raise_for_status", None)
            if check is None:
                check = session_check
            given = kwargs.pop("timeout", _UNSET)
            if given is not _UNSET:
                timeout = given if isinstance(given, aiohttp.ClientTimeout) else aiohttp.ClientTimeout(total=given)
                attempt_timeout = None  # the request's own (looked up when routed)
        own_kwargs = bool(kwargs)  # any left for the attempts (then sent per request)
        if session_check:
            # a 5xx must reach the retry policy: raise_for_status applies to the final answer only
            kwargs["raise_for_status"] = False
        # the request's headers: routed as pairs (with the session's defaults), sent without the
        # router's x-envoy-* headers and with the logical Host (aiohttp adds the defaults itself)
        if headers is None:
            own: Any = None
        elif isinstance(headers, (dict, CIMultiDict, CIMultiDictProxy)):
            own = list(headers.items())
        else:
            own = list(headers.items() if hasattr(headers, "items") else headers)
        if defaults:
            merged = CIMultiDict(defaults)
            if own:
                for name in {k for k, _ in own}:
                    merged.popall(name, None)
                merged.extend(own)
            pairs: Any = list(merged.items())
        else:
            pairs = own
        return url, text, routed, check, timeout, attempt_timeout, own, pairs, own_kwargs

    async def _request(self, ctx: _RequestContext, method: str, url: Union[str, URL], *, params: Any = None,
                       headers: Any = None, allow_redirects: bool = True, max_redirects: int = 10,
                       **kwargs: Any) -> Response:
        session = self._session or self.session
        bound = self._bound
        if bound[0] is not session:
            bound = self._bind(session)
        _, defaults, timeout, jar, check, attempt_timeout, counted = bound
        if type(url) is str and not kwargs and not params and headers is None and not defaults:
            # the usual request: a URL string, no arguments of its own, no session default headers
            # (the same as _prepare's answer for it, without its frame)
            text: Optional[str] = url
            url, routed = self._urls.get(url) or self._parse(url)
            own: Any = None
            pairs: Any = None
            own_kwargs = False
            if check:  # a 5xx must reach the retry policy: raise_for_status applies to the final answer only
                kwargs["raise_for_status"] = False
        else:
            url, text, routed, check, timeout, attempt_timeout, own, pairs, own_kwargs = self._prepare(
                url, params, headers, kwargs, defaults, timeout, attempt_timeout, check)
        history: Optional[List[Response]] = None
        total = timeout.total
        mesh = self._mesh
        while True:  # one pass per hop: routing and the router loop inline (no coroutine of their own)
            resp: Response
            if not routed:
                resp = await session.request(method, url, headers=headers, allow_redirects=False,
                                             timeout=timeout, **kwargs)
            else:
                target_url = str(url) if text is None else text
                try:  # the total timeout bounds the whole request, retries included
                    try:
                        call = mesh.request(target_url, method, pairs, timeout=total) if total else \
                            mesh.request(target_url, method, pairs)
                    except NotReady:
                        call = await _aroute(mesh, target_url, method, pairs, self._ready_timeout, total)
                except (Unavailable, NoRoute) as e:
                    raise self._mesh_error(e) from e
                cluster = call.cluster
                if cluster is None:  # a direct response or a redirect
                    resp = LocalResponse(method, url, _local_reply(call), _info(call))  # type: ignore[arg-type]
                else:
                    if attempt_timeout is None:
                        memo = self._timeouts.get(id(timeout))
                        attempt_timeout = memo[1] if memo is not None else self._attempt_timeout(timeout)
                    pools = self._pools
                    slot = pools._slots.get(cluster)  # _ClusterPools.acquire's async fast path, inline
                    if slot is not None:
                        slot.inflight += 1
                    else:
                        slot = pools.acquire(cluster, cluster)
                    try:
                        pool = slot.pool
                        tel = self._telemetry if _TELEMETRY[0] else None
                        exchange = tel.exchange if tel is not None else None
                        if own is None and not own_kwargs and pool is not None and \
                                not (jar._cookie_count if counted else len(jar)) and \
                                (not defaults or call.scheme == "http"):
                            # no per-request arguments: the cluster's sender for this route, authority,
                            # method and timeout (made once)
                            key = (id(call.route), call.authority, call.scheme, method, id(attempt_timeout), exchange)
                            sender = pool.senders.get(key)
                            if sender is None:
                                sender = self._sender(session, method, headers, own, attempt_timeout, jar, url, kwargs,
                                                      call, pool, exchange)
                                if len(pool.senders) >= _MEMO_MAX:
                                    pool.senders.clear()
                                pool.senders[key] = sender
                        else:
                            sender = self._sender(session, method, headers, own, attempt_timeout, jar, url, kwargs, call,
                                                  pool, exchange)
                        # The router, first attempt inline: while tracing is off, lifecycle.run_async's
                        # straight path (first_attempt, the attempt under its deadline, finish_final) and
                        # _Sender.send's steps run here, in the request's own coroutine (no router or send
                        # coroutine per request); anything else -- a fault filter (first_attempt is None), an
                        # outcome the policy may retry, an error -- is lifecycle's: run_async itself, or
                        # run_after_async from the first outcome on. With telemetry sinks the call is
                        # reported as run_async_reported reports it. tests/integrations/test_aiohttp_router.py
                        # checks both ways do the same.
                        try:
                            a = None if _TRACER[0] is not None else call.first_attempt()
                        except BaseException as e:  # refused before its attempt (UH, UO): reported as run_reported does
                            if _TELEMETRY[0]:
                                _report(call, None, e)
                            raise
                        if a is None:  # tracing (spans around attempts) or a fault filter: lifecycle's router
                            resp = await (_run_async_reported if _TELEMETRY[0] else _run_async)(
                                call, sender.send, _status_of, None, _classify)
                        else:  # run_async's straight path and the sender's attempt, inline (see _Sender.send)
                            try:
                                try:
                                    endpoint = a.endpoint
                                    target = sender.targets.get((endpoint.key, a.path)) or sender.target(a)
                                    # sender.extras(a), inline (tracing is off: see a)
                                    attempt_headers, extra = sender.headers, sender.kwargs
                                    upstream_tls = sender.upstream_tls
                                    if upstream_tls is not None:
                                        try:
                                            tls = upstream_tls(cluster, endpoint)
                                        except TlsHandshakeError as e:  # TLS required, no certificates
                                            raise _tls_error(endpoint.key, e) from e
                                        if tls is not None:
                                            extra = sender.tls_kwargs(tls, endpoint, extra, sender.scheme)
                                    timeout_a = a.timeout
                                    if timeout_a is not None:  # lifecycle.send_timed's steps, without its coroutine
                                        dl = _deadline_begin(a, timeout_a)
                                    try:
                                        if extra:
                                            resp = await sender.request(method, target, headers=attempt_headers,
                                                                        allow_redirects=False, timeout=sender.timeout,
                                                                        **extra)
                                        else:
                                            resp = await sender.request(method, target, headers=attempt_headers,
                                                                        allow_redirects=False, timeout=sender.timeout)
                                        try:
                                            await resp.read()
                                        except BaseException:
                                            resp.close()
                                            raise
                                    except asyncio.CancelledError as cancelled:
                                        if timeout_a is not None and dl.timed_out(a):
                                            raise TimeoutError(f"attempt timed out after {timeout_a:.3f}s") from cancelled
                                        raise
                                    finally:
                                        if timeout_a is not None:
                                            _deadline_end(dl, a)
                                    # sender.finish(a, resp), inline (the first attempt; a dict literal: no
                                    # code of its own, unlike dict.copy, which a request's path runs nowhere else)
                                    resp.meshcore = {"cluster": cluster, "endpoint": endpoint.key,  # type: ignore[union-attr]
                                                     "route": sender.route_name, "attempts": 1}
                                    if _TELEMETRY[0] or sender.exchange is not None:
                                        _tell_telemetry(a, resp, sender.exchange)
                                except BaseException as e:  # noqa: BLE001  (classified)
                                    kind = _classify(e)
                                    a.finish(error=kind or RESET)
                                    if kind is None:
                                        raise
                                    resp = await _run_after_async(call, a, None, e, sender.send, _status_of, None,
                                                                  _classify)
                                else:
                                    if not a.finish_final(resp.status, None):
                                        resp = await _run_after_async(call, a, resp, None, sender.send, _status_of,
                                                                      None, _classify)
                            except BaseException as e:  # (the record of a request that raised)
                                if _TELEMETRY[0]:
                                    _report(call, None, e)
                                raise
                            if _TELEMETRY[0]:  # Istio metrics and the other sinks; tracing takes lifecycle's path
                                _report_answer(tel, call, resp)
                    except FaultAbort as e:
                        log.debug("fault abort for %s: %s", call, e)
                        resp = LocalResponse(method, url, _fault_reply(e), _info(call))
                    except aiohttp.ClientError as e:
                        # the last attempt's own failure (ServerTimeoutError is an asyncio.TimeoutError too)
                        _add_context(e, call)
                        raise
                    except (MeshError, asyncio.TimeoutError) as e:
                        raise _add_context(self._mesh_error(e), call) from e
                    except Exception as e:
                        _add_context(e, call)
                        raise
                    else:
                        if getattr(resp, "_raw_cookie_headers", True):  # aiohttp < 3.12: no such field
                            _store_cookies(jar, resp, url)
                    finally:
                        # _ClusterPools.release's async fast path, inline: another request in flight, or
                        # the slot live when last seen and no cluster left since (then nothing to close)
                        if slot.inflight > 1 or not slot.retired and slot.removals == pools._removals:
                            slot.inflight -= 1
                        else:
                            closing = pools.release(slot)
                            if closing is not None:
                                await self._close_endpoints(closing)
            if not allow_redirects or resp.status not in _REDIRECTS:
                break
            location = resp.headers.get("Location")
            if not location:
                break
            if history is None:
                history = []
            history.append(resp)
            if len(history) > max_redirects:
                resp.release()
                raise aiohttp.TooManyRedirects(resp.request_info, tuple(history))
            resp.release()
            if resp.status == 303 and method != "HEAD" or resp.status in (301, 302) and method == "POST":
                method = "GET"
                kwargs.pop("data", None)
                kwargs.pop("json", None)
            url = url.join(URL(location))
            text = None
            routed = self._routed(url)
        ctx._resp = resp  # released when the caller's ``async with`` exits
        if check is True:
            resp.raise_for_status()
        elif callable(check):
            await check(resp)
        return resp

    def _sender(self, session: aiohttp.ClientSession, method: str, headers: Any, own: Any, timeout: Any, jar: Any,
                url: URL, kwargs: Dict[str, Any], call: Any, pool: Optional[_Pool], exchange: Any = None) -> _Sender:
        """A routed request's sender: the headers its attempts send (made once: aiohttp copies
        them) with the logical Host, its keyword arguments (https: the logical SNI; the jar's
        cookies of the logical URL)."""
        send_headers: CIMultiDict[str] = CIMultiDict(own) if own else CIMultiDict()
        if own and not _plain(headers, own):
            _drop_router_headers(send_headers)
        send_headers["Host"] = call.route.host_rewrite or call.authority  # every attempt's (the app's goes)
        if exchange is not None:  # Istio's metadata exchange (mesh.telemetry.enable_istio_metrics):
            if own:  # ours replace the app's own, any case (as Istio's filter does), -id included
                send_headers.popall(_PEER_HEADER, None)
                send_headers.popall(_PEER_HEADER_ID, None)
            send_headers.extend(exchange.headers)  # (a session default of the same name: replaced by aiohttp)
        extra = kwargs
        if len(jar) or call.scheme == "https":
            extra = self._extra(jar, call.scheme, url, kwargs)
        # a read-only view: aiohttp takes it as it is (no conversion) and copies it per attempt
        return _Sender(_request_of(session), method, CIMultiDictProxy(send_headers), timeout, extra, call,
                       pool.used if pool is not None else None, self._endpoint_urls, self._upstream_tls,
                       self._tls_kwargs, exchange)

    @staticmethod
    def _extra(jar: Any, scheme: str, url: URL, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The attempts' keyword arguments for https (the logical host as ``server_hostname``) or
        with cookies in the jar (those of the logical URL: aiohttp would look under the endpoint's)."""
        extra = dict(kwargs)
        if scheme == "https":
            extra.setdefault("server_hostname", url.raw_host)
        if len(jar):
            jar_cookies = [(k, m.value) for k, m in jar.filter_cookies(url).items()]
            if jar_cookies:
                user = extra.pop("cookies", None)
                extra["cookies"] = jar_cookies + list((user.items() if hasattr(user, "items") else user) or ())
        return extra

    def _tls_kwargs(self, tls: Any, endpoint: Any, kwargs: Dict[str, Any], scheme: str) -> Dict[str, Any]:
        """An attempt's keyword arguments under mesh TLS ``tls``: its marker as ``ssl`` and its
        SNI as ``server_hostname`` (both part of aiohttp's connection key)."""
        if scheme != "http":
            raise aiohttp.ClientError(
                f"{scheme}:// request to {endpoint.key} of cluster {tls.cluster}: the cluster's connections use "
                f"mesh TLS, which goes under http:// requests (as behind a sidecar); use an http:// URL")
        marker = self._markers.get(tls)
        if marker is None:
            marker = self._tls_marker(tls, endpoint)
        extra = dict(kwargs)
        extra["ssl"] = marker
        extra["server_hostname"] = tls.server_hostname(endpoint)
        return extra

    def _tls_marker(self, tls: Any, endpoint: Any) -> _TlsMarker:
        """The ``ssl=`` marker of cluster socket ``tls``, once it is certain that the session's
        connector makes mesh TLS connections (else the marker would be ignored: plaintext)."""
        session = self._session or self.session
        connector = session.connector
        if connector is not self._tls_connector:
            problem = None
            if not _TLS_HOOK:
                problem = f"aiohttp {aiohttp.__version__} lacks the connection hook mesh TLS needs"
            elif type(connector) is aiohttp.TCPConnector:
                connector.__class__ = MeshConnector  # adds the mesh TLS hook, changes nothing else
                log.debug("the session's TCPConnector now makes mesh TLS connections too")
            elif not isinstance(connector, MeshConnector):
                problem = (f"the session's connector ({type(connector).__name__}) cannot make mesh TLS connections: "
                           f"give the session a meshcore.integrations.aiohttp.MeshConnector")
            if problem is not None:
                raise _tls_error(endpoint.key, TlsHandshakeError(tls.cluster, endpoint.key, problem))
            self._tls_connector = connector
        marker = _TlsMarker(tls)
        if len(self._markers) >= _MEMO_MAX:
            self._markers.clear()  # their connections stay pooled under the old key until idle
        self._markers[tls] = marker
        return marker

    @staticmethod
    def _mesh_error(exc: BaseException) -> BaseException:
        if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)):
            return aiohttp.ServerTimeoutError(str(exc) or "attempt timed out")
        if isinstance(exc, NoRoute):
            return aiohttp.ClientError(str(exc))
        return aiohttp.ClientConnectionError(str(exc))
