"""An aiohttp session wrapper that routes every request through the mesh.

aiohttp has no per-request hook that can re-target a request (its resolver runs per connection
and ``ClientRequest.url`` is fixed), so the wrapper routes first and then calls the session with
the picked endpoint's URL::

    from meshcore.integrations.aiohttp import MeshSession

    async with MeshSession(mesh, hosts=["*.svc.cluster.local"]) as http:
        async with http.get("http://reviews.default.svc.cluster.local:9080/reviews/1") as resp:
            data = await resp.json()

Per request: ``Mesh.request`` routes it (query ``params`` and the session's default headers
included), ``Call.run_async`` applies the route's policies, and each attempt is
``session.request(method, "http://ip:port/path", headers={"Host": <authority>}, server_hostname=
<logical host>)`` (``server_hostname`` only for ``https``: SNI and certificate verification use the
service name, and it is part of aiohttp's connection key). The body is read within the attempt,
so the returned ``aiohttp.ClientResponse`` has its status and body; its ``url`` is the endpoint's
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

Failures after the last attempt carry the mesh's context (``exc.meshcore``: target, cluster,
attempts, last endpoint, route; also a PEP 678 note). Connections live in the session's connector
(aiohttp keys them by endpoint and closes idle ones after its keep-alive timeout); when a cluster
leaves the mesh's configuration, the idle connections to its endpoints that no live cluster has
are closed as soon as the cluster's requests in flight finished (never one in use).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json as _json
import logging
from typing import Any, Awaitable, Callable, Generator, Iterable, List, Optional, Union

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, Unavailable
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
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
)

__all__ = ["LocalResponse", "MeshSession"]

log = logging.getLogger(__name__)

_REDIRECTS = (301, 302, 303, 307, 308)
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())


def _classify(exc: BaseException) -> Optional[str]:
    """aiohttp exception -> Envoy failure kind (TLS handshake failures are connect failures)."""
    if isinstance(exc, aiohttp.ClientConnectorError) or (_CONNECT_TIMEOUT and isinstance(exc, _CONNECT_TIMEOUT)):
        return CONNECT_FAILURE
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return TIMEOUT
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return RESET
    return default_classify(exc)


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
    """``await ms.get(...)`` or ``async with ms.get(...) as resp`` (released on exit)."""

    def __init__(self, coro: Awaitable[Response]) -> None:
        self._coro = coro
        self._resp: Optional[Response] = None

    def __await__(self) -> Generator[Any, None, Response]:
        return self._coro.__await__()

    async def __aenter__(self) -> Response:
        self._resp = await self._coro
        return self._resp

    async def __aexit__(self, *exc: Any) -> None:
        if self._resp is not None:
            self._resp.release()


class MeshSession:
    """Routes each request through the mesh, then sends it with an ``aiohttp.ClientSession``."""

    def __init__(self, mesh: Any, session: Optional[aiohttp.ClientSession] = None, *,
                 hosts: Optional[Iterable[str]] = None, ready_timeout: float = 10.0) -> None:
        """``session``: the session to send with (default: one made on first use and closed with
        this wrapper). ``hosts``: fnmatch patterns of the hosts to route (default: all). The first
        request to a target waits up to ``ready_timeout`` seconds for its configuration."""
        self._mesh = mesh
        self._session = session
        self._owned = session is None
        self._hosts = tuple(hosts) if hosts is not None else None
        self._ready_timeout = ready_timeout
        # per cluster: the (host, port) endpoints its attempts used (the "pool" closed when it leaves)
        self._pools = _ClusterPools(mesh, lambda cluster: set(), self._close_endpoints, is_async=True)

    async def _close_endpoints(self, used: Any) -> None:
        """Close the idle connections to the endpoints in ``used`` that no live cluster has."""
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
            if (host, port) not in used or f"{host}:{port}" in live:
                continue
            for proto, _ in conns.pop(key, ()):
                proto.close()
            log.debug("closed the idle connections to %s:%s (its cluster left)", host, port)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The underlying session (created on first use when none was given)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def request(self, method: str, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        """Like ``ClientSession.request`` (awaitable, or an async context manager)."""
        return _RequestContext(self._request(method, url, **kwargs))

    def get(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("GET", url, **kwargs)

    def head(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("HEAD", url, allow_redirects=kwargs.pop("allow_redirects", False), **kwargs)

    def options(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("OPTIONS", url, **kwargs)

    def post(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("POST", url, **kwargs)

    def put(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: Union[str, URL], **kwargs: Any) -> _RequestContext:
        return self.request("DELETE", url, **kwargs)

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
        if url.scheme not in ("http", "https"):
            return False
        return self._hosts is None or any(fnmatch.fnmatch(url.host or "", p) for p in self._hosts)

    async def _request(self, method: str, url: Union[str, URL], *, params: Any = None, headers: Any = None,
                       allow_redirects: bool = True, max_redirects: int = 10, **kwargs: Any) -> Response:
        method = method.upper()
        url = URL(url)
        if params:
            extend = getattr(url, "extend_query", None)  # yarl >= 1.9
            url = extend(params) if extend else url.with_query([*url.query.items(),
                                                                 *URL("/").with_query(params).query.items()])
        check = kwargs.pop("raise_for_status", None)
        if check is None:
            check = getattr(self.session, "_raise_for_status", False)
        history: List[Response] = []
        while True:
            # a 5xx must reach the retry policy: raise_for_status applies to the final answer only
            resp = await self._once(method, url, headers, {**kwargs, "raise_for_status": False})
            location = resp.headers.get("Location")
            if not allow_redirects or resp.status not in _REDIRECTS or not location:
                if check is True:
                    resp.raise_for_status()
                elif callable(check):
                    await check(resp)
                return resp
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

    async def _once(self, method: str, url: URL, headers: Any, kwargs: Any) -> Response:
        session = self.session
        if not self._routed(url):
            return await session.request(method, url, headers=headers, allow_redirects=False, **kwargs)
        own = CIMultiDict(headers or {})
        merged = CIMultiDict(session.headers)
        for name in set(own.keys()):
            merged.popall(name, None)
        merged.extend(own)
        timeout = kwargs.get("timeout")
        total = getattr(timeout if isinstance(timeout, aiohttp.ClientTimeout) else session.timeout, "total", None)
        try:  # the session's total timeout bounds the whole request, retries included
            call = await _aroute(self._mesh, str(url), method, list(merged.items()), self._ready_timeout, total)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(e) from e
        local = _local_reply(call)
        if local is not None:
            return LocalResponse(method, url, local, _info(call))
        extra = dict(kwargs)
        if url.scheme == "https":
            extra.setdefault("server_hostname", url.raw_host)
        slot = self._pools.acquire(call.cluster, call.cluster)
        used = slot.pool
        jar_cookies = [(k, m.value) for k, m in session.cookie_jar.filter_cookies(url).items()]
        if jar_cookies:
            user = extra.pop("cookies", None)
            extra["cookies"] = jar_cookies + list((user.items() if hasattr(user, "items") else user) or ())

        async def send(attempt: Any) -> aiohttp.ClientResponse:
            h = _drop_router_headers(own.copy())
            h["Host"] = attempt.authority
            if used is not None:
                host, _, port = attempt.address.rpartition(":")
                used.add((host.strip("[]"), int(port)))
            resp = await session.request(method, URL(attempt.url, encoded=True), headers=h,
                                         allow_redirects=False, **extra)
            try:
                await resp.read()
            except BaseException:
                resp.close()
                raise
            return resp

        try:
            resp = await call.run_async(send, classify=_classify)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return LocalResponse(method, url, _fault_reply(e), _info(call))
        except aiohttp.ClientError as e:
            # the last attempt's own failure (ServerTimeoutError is an asyncio.TimeoutError too)
            _add_context(e, call)
            raise
        except (MeshError, asyncio.TimeoutError) as e:
            raise _add_context(self._mesh_error(e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            await self._pools.arelease(slot)
        if resp.cookies:
            session.cookie_jar.update_cookies(resp.cookies, url)
        resp.meshcore = _info(call)  # type: ignore[attr-defined]
        return resp

    @staticmethod
    def _mesh_error(exc: BaseException) -> BaseException:
        if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)):
            return aiohttp.ServerTimeoutError(str(exc) or "attempt timed out")
        if isinstance(exc, NoRoute):
            return aiohttp.ClientError(str(exc))
        return aiohttp.ClientConnectionError(str(exc))
