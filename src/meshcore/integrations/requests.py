"""A ``requests`` transport adapter that routes every request through the mesh.

Mount it on a service (or on everything under a scheme)::

    import requests
    from meshcore.integrations.requests import MeshAdapter

    session = requests.Session()
    session.mount("http://reviews.default.svc.cluster.local:9080", MeshAdapter(mesh))
    session.get("http://reviews.default.svc.cluster.local:9080/reviews/1")

Per request: ``Mesh.request`` routes it (the request's headers as a list of pairs, which the
compiled route matcher reads directly), ``Call.run`` applies the route's policies, and each
attempt goes straight to urllib3: the cluster's connection pool for the picked ``ip:port``
(``HTTPConnectionPool.urlopen``, as ``HTTPAdapter.send`` calls it) with the logical ``Host``
header; for ``https`` the pool gets ``server_hostname`` and ``assert_hostname`` = the logical host
(SNI and certificate verification use the service name; pools are keyed by it too). The
response is built by ``HTTPAdapter.build_response`` from the original request, so its
``url``/``request``/``cookies`` are the logical ones and the Session's redirect, cookie and auth
handling sees what it would see without the mesh. The body is read within the attempt;
``response.meshcore`` says ``{"cluster", "endpoint", "route", "attempts"}``.
Each cluster's attempts use their own urllib3 ``PoolManager`` (``pool_connections`` endpoint pools
of ``pool_maxsize`` connections, as ``HTTPAdapter`` sizes its own; the adapter's
``init_poolmanager`` keywords apply to them too), looked up per attempt by endpoint in a small
table in front of it; when the cluster leaves the mesh's configuration that manager is cleared
(its connections closed) once the cluster's requests in flight finished. Proxied requests
(``proxies``/the environment) still go through the adapter's proxy managers.

Direct-response and redirect routes and fault-filter aborts are answered without an upstream.
Failures raise requests' exceptions: an upstream failure after the last attempt as
``HTTPAdapter`` raised it, with the mesh's context attached (``exc.meshcore``: target, cluster,
attempts, last endpoint, route; also a PEP 678 note); a route timeout as ``requests.exceptions.Timeout``; no healthy endpoint
or an open circuit breaker as ``ConnectionError``; no matching route as ``RequestException`` --
the meshcore error is ``__cause__``. TLS needs requests >= 2.32.2
(``build_connection_pool_key_attributes``). Keep the adapter's own ``max_retries`` at 0: the
route's retry policy does the retrying.

Mesh TLS (a cluster's ``transport_socket`` / ``transport_socket_matches``, ``Mesh.upstream_tls``):
the app keeps its ``http://`` URL, as behind a sidecar, and the attempt goes to a pool of its own
(key: endpoint and :class:`~meshcore.tls.UpstreamTls`) whose connections make the TCP connection,
then the mesh's TLS handshake and peer check (``UpstreamTls.wrap_socket``: the cluster's roots,
SAN matchers, SNI, Istio's ALPN ``istio-http/1.1, istio, http/1.1``, the workload certificate of
the current generation), before urllib3 writes a byte; urllib3 and requests never see the TLS
context, so ``verify=False`` or ``cert=`` change nothing there. A refused handshake, a peer whose
SANs do not match, missing certificates, or a fresh connection closed on its first read before any
response byte (a TLS 1.3 server refusing the client certificate after the handshake) raise
``requests.exceptions.SSLError`` (a ``ConnectionError``; urllib3's ``NewConnectionError`` inside,
the :class:`~meshcore.tls.TlsHandshakeError` naming cluster, endpoint and reason as ``__cause__``),
a connect failure for ``retry_on`` and outlier detection; a handshake timeout is ``ConnectTimeout``.
An SSL error on a connection after its first response byte is a reset (``ConnectionError``).
``https://`` URLs and proxies cannot carry mesh TLS: to a TLS endpoint they are refused the same way.
"""

from __future__ import annotations

import http.client
import io
import logging
import ssl
import threading
from operator import attrgetter
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

from requests import exceptions as rexc
from requests.adapters import HTTPAdapter, select_proxy
from requests.cookies import RequestsCookieJar, extract_cookies_to_jar
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPConnectionPool, PoolManager
from urllib3 import exceptions as u3exc
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import SSL_KEYWORDS
from urllib3.response import HTTPResponse
from urllib3.util import Timeout as Urllib3Timeout

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, NotReady, Unavailable
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ..resilience.router_headers import ROUTER_HEADERS
from ..telemetry.peer_metadata import HEADER as _PEER_HEADER, HEADER_ID as _PEER_HEADER_ID
from ..telemetry.record import ACTIVE as _TELEMETRY, exchange_of as _exchange_of
from ..telemetry.tracing import TRACE_HEADERS as _TRACE_HEADERS, headers_of as _trace_headers
from ..tls.upstream import TlsHandshakeError, is_deferred_rejection
from . import (
    _add_context,
    _ClusterPools,
    _drop_router_headers,
    _fault_reply,
    _info,
    _local_reply,
    _min_timeout,
    _reason,
    _Reply,
    _route,
)

__all__ = ["MeshAdapter"]

log = logging.getLogger(__name__)

TimeoutArg = Union[None, float, Tuple[Optional[float], Optional[float]], Urllib3Timeout]

_status_of = attrgetter("status_code")  # a requests Response always has an int status here
_MEMO_MAX = 256  # bounded memo tables (timeouts, TLS names)
_PEER_NAMES = frozenset((_PEER_HEADER, _PEER_HEADER_ID))  # the metadata exchange's request headers (lowercase)


def _classify(exc: BaseException) -> Optional[str]:
    """requests exception -> Envoy failure kind (TLS handshake failures are connect failures)."""
    if isinstance(exc, (rexc.ConnectTimeout, rexc.SSLError)):
        return CONNECT_FAILURE
    if isinstance(exc, rexc.Timeout):
        return TIMEOUT
    if isinstance(exc, rexc.ConnectionError):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, u3exc.MaxRetryError):
            reason = reason.reason
        if isinstance(reason, (u3exc.NewConnectionError, u3exc.ConnectTimeoutError)):
            return CONNECT_FAILURE
        return RESET
    if isinstance(exc, rexc.ChunkedEncodingError):
        return RESET
    return default_classify(exc)


def _cap_timeout(timeout: TimeoutArg, cap: Optional[float]) -> TimeoutArg:
    """The client's timeout bounded by the attempt's (connect and read alike)."""
    if cap is None:
        return timeout
    if timeout is None:
        return (cap, cap)
    if isinstance(timeout, Urllib3Timeout):
        connect, read = timeout.connect_timeout, timeout.read_timeout
        return (_min_timeout(connect if isinstance(connect, (int, float)) else None, cap),
                _min_timeout(read if isinstance(read, (int, float)) else None, cap))
    if isinstance(timeout, tuple):
        connect, read = _connect_read(timeout)
        return (_min_timeout(connect, cap), _min_timeout(read, cap))
    return _min_timeout(timeout, cap)


def _connect_read(timeout: tuple) -> Tuple[Any, Any]:
    try:
        connect, read = timeout
    except ValueError:
        raise ValueError(f"Invalid timeout {timeout}. Pass a (connect, read) timeout tuple, "
                         f"or a single float to set both timeouts to the same value.") from None
    return connect, read


def _urllib3_timeout(timeout: TimeoutArg) -> Urllib3Timeout:
    """What ``HTTPAdapter.send`` hands urllib3 for a requests ``timeout`` argument."""
    if isinstance(timeout, tuple):
        connect, read = _connect_read(timeout)
        return Urllib3Timeout(connect=connect, read=read)
    if isinstance(timeout, Urllib3Timeout):
        return timeout
    return Urllib3Timeout(connect=timeout, read=timeout)


def _requests_error(e: BaseException, request: Any) -> BaseException:
    """The requests exception ``HTTPAdapter.send`` raises for a urllib3 failure (same mapping);
    ``e`` itself when it has none."""
    if isinstance(e, (u3exc.ProtocolError, OSError)):
        return rexc.ConnectionError(e, request=request)
    if isinstance(e, u3exc.MaxRetryError):
        reason = e.reason
        if isinstance(reason, u3exc.ConnectTimeoutError) and not isinstance(reason, u3exc.NewConnectionError):
            return rexc.ConnectTimeout(e, request=request)
        if isinstance(reason, u3exc.ResponseError):
            return rexc.RetryError(e, request=request)
        if isinstance(reason, u3exc.ProxyError):
            return rexc.ProxyError(e, request=request)
        if isinstance(reason, u3exc.SSLError):
            return rexc.SSLError(e, request=request)
        return rexc.ConnectionError(e, request=request)
    if isinstance(e, u3exc.ClosedPoolError):
        return rexc.ConnectionError(e, request=request)
    if isinstance(e, u3exc.ProxyError):
        return rexc.ProxyError(e)
    if isinstance(e, u3exc.SSLError):
        return rexc.SSLError(e, request=request)
    if isinstance(e, u3exc.ReadTimeoutError):
        return rexc.ReadTimeout(e, request=request)
    if isinstance(e, u3exc.InvalidHeader):
        return rexc.InvalidHeader(e, request=request)
    return e


# -- mesh TLS under a plaintext request ------------------------------------------------------------

_TLS_SCHEME = "meshcore+tls"  # the pool manager's name for mesh-TLS pools (never a URL scheme)


class _FirstReadFailed(Exception):
    """The first read of a fresh mesh-TLS connection failed before any response byte."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _FirstResponse(http.client.HTTPResponse):
    """The first response of a fresh mesh-TLS connection: its first read, made before the status
    line is parsed (``peek``: nothing is consumed), tells a server that closed the connection or
    sent an alert before any response byte (a TLS 1.3 server refusing the client certificate
    after the client's handshake completed) from anything later."""

    def _read_status(self) -> Any:
        try:
            first = self.fp.peek(1)
        except OSError as e:
            if is_deferred_rejection(e):
                raise _FirstReadFailed(e) from e
            raise
        if not first:
            raise _FirstReadFailed(http.client.RemoteDisconnected("Remote end closed connection without response"))
        return super()._read_status()


class _MeshTlsConnection(HTTPConnection):
    """An urllib3 ``HTTPConnection`` (plaintext HTTP/1.1 to urllib3) over the mesh's TLS:
    ``connect`` makes the TCP connection, then ``UpstreamTls.wrap_socket`` (handshake with the
    current certificates, peer check) before anything is written. Handshake and peer failures
    raise ``NewConnectionError`` (``ConnectTimeoutError`` for a handshake timeout) with the
    :class:`TlsHandshakeError` as ``__cause__``; so does the first write or read of a fresh
    connection failing before any response byte (see :class:`_FirstResponse`)."""

    def __init__(self, host: str, port: Optional[int] = None, *, mesh_tls: Any, mesh_endpoint: Any,
                 **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.mesh_tls = mesh_tls
        self.mesh_endpoint = mesh_endpoint
        self._fresh = False

    def connect(self) -> None:
        super().connect()  # TCP: NewConnectionError / ConnectTimeoutError as for any connection
        raw, tls, ep = self.sock, self.mesh_tls, self.mesh_endpoint
        try:
            self.sock = tls.wrap_socket(raw, ep.key, "http/1.1", ep=ep)
        except TlsHandshakeError as e:
            self.sock = None
            raw.close()  # (wrap_socket closed it, unless the certificates were missing)
            raise NewConnectionError(self, str(e)) from e
        except TimeoutError as e:
            self.sock = None
            raw.close()
            raise ConnectTimeoutError(self, f"TLS handshake with {ep.key} (cluster {tls.cluster}) timed out "
                                            f"(connect timeout={self.timeout})") from e
        self._fresh = True
        self.response_class = _FirstResponse

    def _refused(self, error: BaseException) -> TlsHandshakeError:
        """A fresh connection's first write/read failed before any response byte: the
        connection is closed and the connect failure (counted) returned."""
        self._fresh = False
        cause = self.mesh_tls.deferred_rejection(error, self.mesh_endpoint.key)
        self.close()
        return cause

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,  # type: ignore[override]
                **kw: Any) -> None:
        try:
            super().request(method, url, body, headers, **kw)
        except ssl.SSLError as e:  # (urllib3 itself carries on to the read after EPIPE / ECONNRESET)
            if self._fresh and is_deferred_rejection(e):
                cause = self._refused(e)
                raise NewConnectionError(self, str(cause)) from cause
            raise

    def getresponse(self) -> Any:  # type: ignore[override]
        if not self._fresh:
            return super().getresponse()
        self._fresh = False
        try:
            return super().getresponse()
        except _FirstReadFailed as e:
            cause = self._refused(e.error)
            raise NewConnectionError(self, str(cause)) from cause
        finally:
            self.response_class = http.client.HTTPResponse


class _MeshTlsPool(HTTPConnectionPool):
    """One endpoint's mesh-TLS connections (``mesh_tls``/``mesh_endpoint`` go to each connection)."""

    ConnectionCls = _MeshTlsConnection  # type: ignore[assignment]


def _tls_failure(e: BaseException, error: BaseException, request: Any) -> Tuple[BaseException, Optional[BaseException]]:
    """The requests exception for urllib3's ``e`` on a mesh-TLS pool, and its ``__cause__``:
    a refused handshake (a :class:`TlsHandshakeError` behind ``NewConnectionError``) is
    ``SSLError``; any other SSL error came after the handshake (the connection broke): a
    ``ConnectionError``, as a reset."""
    reason = e.reason if isinstance(e, u3exc.MaxRetryError) else e
    cause = getattr(reason, "__cause__", None)
    if isinstance(cause, TlsHandshakeError):
        return rexc.SSLError(e, request=request), cause
    if isinstance(error, rexc.SSLError):
        return rexc.ConnectionError(e, request=request), None
    return error, None


def _tls_refusal(tls: Any, endpoint: Any, reason: str, request: Any) -> BaseException:
    """A request that cannot carry the mesh's TLS to ``endpoint`` (https://, a proxy) as a refused connection."""
    cause = TlsHandshakeError(tls.cluster, endpoint.key, reason)
    error = rexc.SSLError(str(cause), request=request)
    error.__cause__ = cause
    return error


class _ClusterManager(PoolManager):
    """A cluster's urllib3 ``PoolManager`` with a table in front of it: attempt key (the
    endpoint; for https also the TLS name and settings; for mesh TLS the ``UpstreamTls``) -> its
    connection pool. The table is a cache: a pool the manager evicted (and so closed) is fetched
    again. Mesh-TLS pools live in the same manager (its LRU, its ``clear``) under their own scheme."""

    _TABLE_MAX = 256

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.by_attempt: Dict[Any, Any] = {}
        self.lock = threading.Lock()
        self.pool_classes_by_scheme = {**self.pool_classes_by_scheme, _TLS_SCHEME: _MeshTlsPool}

    def clear(self) -> None:
        self.by_attempt = {}
        super().clear()


def _with_trace(headers: Dict[str, str], pairs: Any) -> Dict[str, str]:
    """A copy of an attempt's headers with its trace headers (``tracing.headers_of``), which
    replace the application's own (as Envoy does)."""
    out = {k: v for k, v in headers.items() if k.lower() not in _TRACE_HEADERS}
    out.update(pairs)
    return out


def _tell_telemetry(attempt: Any, response: Any, body: Any, exchange: Any) -> None:
    """The attempt's facts for its telemetry record; with Istio's metadata exchange on, the
    peer's x-envoy-peer-metadata(-id) leave the response (as a client sidecar strips them)."""
    peer = None
    if exchange is not None:
        headers = response.headers
        peer = headers.pop(_PEER_HEADER, None)
        headers.pop(_PEER_HEADER_ID, None)
    content = response._content
    attempt.telemetry = {"peer_metadata": peer,
                         "request_bytes": len(body) if isinstance(body, (bytes, str)) else None,
                         "response_bytes": len(content) if isinstance(content, bytes) else None}


class MeshAdapter(HTTPAdapter):
    """A ``requests`` ``HTTPAdapter`` sending through the mesh (see the module docstring)."""

    def __init__(self, mesh: Any, *, ready_timeout: float = 10.0, **pool_kwargs: Any) -> None:
        """``pool_kwargs`` go to ``HTTPAdapter`` (``pool_connections``, ``pool_maxsize``, ...);
        the first request to a target waits up to ``ready_timeout`` s for its configuration."""
        self._mesh = mesh
        self._ready_timeout = ready_timeout
        super().__init__(**pool_kwargs)
        self._pools = _ClusterPools(mesh, self._new_pool_manager, lambda pm: pm.clear())
        self._timeouts: Dict[Any, Urllib3Timeout] = {}  # (timeout argument, attempt cap) -> urllib3's
        self._tls_names: Dict[str, str] = {}  # authority -> host name (SNI, certificate check)

    def _new_pool_manager(self, cluster: str) -> PoolManager:
        kw = dict(self.poolmanager.connection_pool_kw)  # init_poolmanager's extra keywords
        kw.update(num_pools=self._pool_connections, maxsize=self._pool_maxsize, block=self._pool_block)
        return _ClusterManager(**kw)

    def __setstate__(self, state: Dict[str, Any]) -> None:  # pragma: no cover - pickling adapters is rare
        super().__setstate__(state)
        self._timeouts, self._tls_names = {}, {}

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        """An attempt's connection pool (proxied requests): from its cluster's pool manager
        unless the request goes through a proxy."""
        manager = getattr(request, "_meshcore_pools", None)
        if manager is None or select_proxy(request.url, proxies):
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        return manager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)

    def close(self) -> None:
        super().close()
        for manager in self._pools.take_all():
            manager.clear()

    def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
        """Pool key of an attempt: TLS names the logical host (SNI, certificate check, pool key)."""
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        sni = getattr(request, "_meshcore_sni", None)
        if sni and host_params.get("scheme") == "https":
            pool_kwargs["server_hostname"] = sni
            if verify is not False:
                pool_kwargs["assert_hostname"] = sni
        return host_params, pool_kwargs

    # -- the request path ----------------------------------------------------------------------

    def send(self, request: Any, stream: bool = False, timeout: TimeoutArg = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> Any:
        url = request.url
        method = request.method or "GET"
        headers = request.headers
        store = headers._store if type(headers) is CaseInsensitiveDict else None
        pairs = list(store.values()) if store is not None else list(headers.items())
        try:
            try:
                call = self._mesh.request(url, method, pairs)
            except NotReady:
                call = _route(self._mesh, url, method, pairs, self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(request, e) from e
        cluster = call.cluster
        if cluster is None:  # a direct response or a redirect
            return self._reply(request, _local_reply(call), call)  # type: ignore[arg-type]
        if proxies and select_proxy(url, proxies):
            return self._send_proxied(call, request, stream, timeout, verify, cert, proxies)

        # per request, not per attempt: what urllib3 sends (it copies the headers it is given)
        if store is not None and "host" not in store and ROUTER_HEADERS.isdisjoint(store):
            send_headers = dict(pairs)
        else:
            send_headers = dict(_drop_router_headers(CaseInsensitiveDict(pairs)).items())
            send_headers.pop(next((k for k in send_headers if k.lower() == "host"), None), None)
        send_headers["Host"] = call.route.host_rewrite or call.authority  # = every attempt's authority
        exchange = _exchange_of(self._mesh) if _TELEMETRY[0] else None
        if exchange is not None:  # Istio's metadata exchange (mesh.telemetry.enable_istio_metrics):
            if store is None or not _PEER_NAMES.isdisjoint(store):  # ours replace the app's (any case),
                for k in [k for k in send_headers if k.lower() in _PEER_NAMES]:  # as Istio's filter does
                    del send_headers[k]
            send_headers.update(exchange.headers)
        body = request.body
        chunked = not (body is None or "Content-Length" in headers)
        https = call.scheme == "https"
        sni = self._tls_name(call.authority) if https else None
        route_name = call.route.route_name
        timeouts = self._timeouts
        retries = self.max_retries
        upstream_tls = self._mesh.upstream_tls
        slot = self._pools.acquire(cluster, cluster)
        manager = slot.pool

        def send(attempt: Any) -> Any:
            endpoint = attempt.endpoint
            ep_key = endpoint.key
            try:
                tls = upstream_tls(cluster, endpoint)
            except TlsHandshakeError as e:  # TLS required, no certificates: no connection at all
                raise rexc.SSLError(str(e), request=request) from e
            if tls is None:
                key = (ep_key, sni, verify, cert) if https else ep_key
                pool = manager.by_attempt.get(key)
                if pool is None or pool.pool is None:  # new, or closed by the manager's eviction
                    pool = self._pool_for(manager, key, attempt, request, https, sni, verify, cert)
            else:
                if https:
                    raise _tls_refusal(tls, endpoint, "an https:// request cannot carry the mesh's TLS "
                                       "(the mesh encrypts http:// requests itself, as a sidecar does)", request)
                key = (ep_key, tls)
                pool = manager.by_attempt.get(key)
                if pool is None or pool.pool is None:
                    pool = self._tls_pool_for(manager, key, endpoint, tls)
            cap = attempt.timeout
            try:
                resolved = timeouts[timeout, cap]
            except KeyError:
                resolved = timeouts[timeout, cap] = _urllib3_timeout(_cap_timeout(timeout, cap))
                if len(timeouts) > _MEMO_MAX:
                    timeouts.clear()
            except TypeError:  # an unhashable timeout argument (a list)
                resolved = _urllib3_timeout(_cap_timeout(timeout, cap))
            attempt_headers = send_headers
            if _TELEMETRY[0]:  # tracing (meshcore.telemetry.tracing): this attempt's headers
                traced = _trace_headers(attempt)
                if traced:
                    attempt_headers = _with_trace(send_headers, traced)
            try:
                raw = pool.urlopen(method=method, url=attempt.path, body=body, headers=attempt_headers,
                                   redirect=False, assert_same_host=False, preload_content=False,
                                   decode_content=False, retries=retries, timeout=resolved, chunked=chunked)
            except (u3exc.HTTPError, OSError) as e:
                error = _requests_error(e, request)
                if error is e:
                    raise
                if tls is not None:
                    error, cause = _tls_failure(e, error, request)
                    if cause is not None:
                        raise error from cause
                raise error  # as HTTPAdapter.send raises it (the urllib3 error as its context)
            response = self.build_response(request, raw)
            try:
                _ = response.content  # read within the attempt (status and body known)
            except rexc.SSLError as e:
                response.close()
                if tls is None:
                    raise
                raise rexc.ConnectionError(*e.args, request=request) from e  # mesh TLS broke mid-body: a reset
            except BaseException:
                response.close()
                raise
            response.meshcore = {"cluster": cluster, "endpoint": ep_key, "route": route_name,
                                 "attempts": attempt.number}
            if _TELEMETRY[0] or exchange is not None:  # strip the peer's metadata we asked for
                _tell_telemetry(attempt, response, body, exchange)
            return response

        return self._run(call, request, slot, send)

    def _run(self, call: Any, request: Any, slot: Any, send: Callable[[Any], Any]) -> Any:
        """``call.run(send)`` for both paths: a fault abort answered locally, mesh errors as
        requests' exceptions, the mesh's context on every failure; the cluster's pool slot is
        released at the end (each attempt read its body: its connection is back)."""
        try:
            return call.run(send, status_of=_status_of, classify=_classify)  # send returns a Response
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            self._pools.release(slot)

    def _tls_name(self, authority: str) -> str:
        """The host name of an authority (``host[:port]``, ``[v6]:port``): SNI and the name the
        certificate is checked against."""
        name = self._tls_names.get(authority)
        if name is None:
            name = urlsplit(f"//{authority}").hostname or ""
            if len(self._tls_names) >= _MEMO_MAX:
                self._tls_names.clear()
            self._tls_names[authority] = name
        return name

    def _pool_for(self, manager: _ClusterManager, key: Any, attempt: Any, request: Any, https: bool,
                  sni: Optional[str], verify: Any, cert: Any) -> Any:
        """The connection pool of an attempt key (first use, or after the manager evicted it):
        ``HTTPAdapter``'s pool settings for the request, the endpoint as host, and for https the
        logical host as ``server_hostname``/``assert_hostname``."""
        _, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)  # subclasses' too
        if https:
            pool_kwargs["server_hostname"] = sni
            if verify is not False:
                pool_kwargs["assert_hostname"] = sni
        host, _, port = attempt.endpoint.key.rpartition(":")
        with manager.lock:
            pool = manager.connection_from_host(host.strip("[]"), int(port), "https" if https else "http",
                                                pool_kwargs=pool_kwargs)
            if https:
                self.cert_verify(pool, request.url, verify, cert)
            table = manager.by_attempt
            if len(table) >= _ClusterManager._TABLE_MAX:
                table.clear()
            table[key] = pool
        return pool

    @staticmethod
    def _tls_pool_for(manager: _ClusterManager, key: Any, endpoint: Any, tls: Any) -> Any:
        """The mesh-TLS pool of ``(endpoint key, UpstreamTls)``: the adapter's pool settings
        without urllib3's TLS keywords (the mesh's TLS is the connection's own)."""
        host, _, port = endpoint.key.rpartition(":")
        host = host.strip("[]")
        context = {k: v for k, v in manager.connection_pool_kw.items() if k not in SSL_KEYWORDS}
        context.update(scheme=_TLS_SCHEME, host=host, port=int(port), mesh_tls=tls, mesh_endpoint=endpoint)
        with manager.lock:
            pool = manager.connection_from_pool_key((_TLS_SCHEME, host, int(port), tls), request_context=context)
            table = manager.by_attempt
            if len(table) >= _ClusterManager._TABLE_MAX:
                table.clear()
            table[key] = pool
        return pool

    def _send_proxied(self, call: Any, request: Any, stream: bool, timeout: TimeoutArg, verify: Any,
                      cert: Any, proxies: Any) -> Any:
        """A request that goes through a proxy: each attempt is a copy of the request to the
        endpoint, sent by ``HTTPAdapter.send`` through the adapter's proxy manager."""
        sni = urlsplit(request.url).hostname or ""
        base_send = super().send
        upstream_tls = self._mesh.upstream_tls
        slot = self._pools.acquire(call.cluster, call.cluster)

        def send(attempt: Any) -> Any:
            try:
                tls = upstream_tls(call.cluster, attempt.endpoint)
            except TlsHandshakeError as e:
                raise rexc.SSLError(str(e), request=request) from e
            if tls is not None:  # never in plaintext through the proxy instead
                raise _tls_refusal(tls, attempt.endpoint, "the request goes through a proxy, which cannot carry "
                                   "the mesh's TLS", request)
            prepared = request.copy()
            prepared.url = attempt.url
            _drop_router_headers(prepared.headers)
            prepared.headers["Host"] = attempt.authority
            prepared._meshcore_sni = sni
            prepared._meshcore_pools = slot.pool
            response = base_send(prepared, stream=stream, timeout=_cap_timeout(timeout, attempt.timeout),
                                 verify=verify, cert=cert, proxies=proxies)
            try:
                _ = response.content
            except BaseException:
                response.close()
                raise
            return response

        response = self._run(call, request, slot, send)  # (a local reply already has what follows)
        response.url = request.url
        response.request = request
        response.cookies = RequestsCookieJar()
        extract_cookies_to_jar(response.cookies, request, response.raw)
        response.meshcore = _info(call)
        return response

    def _reply(self, request: Any, reply: _Reply, call: Any) -> Any:
        raw = HTTPResponse(body=io.BytesIO(reply.body), headers=reply.headers + [("content-length",
                           str(len(reply.body)))], status=reply.status, reason=_reason(reply.status),
                           preload_content=False, decode_content=False)
        response = self.build_response(request, raw)
        _ = response.content
        response.meshcore = _info(call)
        return response

    @staticmethod
    def _mesh_error(request: Any, exc: BaseException) -> BaseException:
        if isinstance(exc, (UpstreamTimeout, TimeoutError)):
            return rexc.Timeout(str(exc), request=request)
        if isinstance(exc, NoRoute):
            return rexc.RequestException(str(exc), request=request)
        return rexc.ConnectionError(str(exc), request=request)
