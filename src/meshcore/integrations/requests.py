"""A ``requests`` transport adapter that routes every request through the mesh.

Mount it on a service (or on everything under a scheme)::

    import requests
    from meshcore.integrations.requests import MeshAdapter

    session = requests.Session()
    session.mount("http://reviews.default.svc.cluster.local:9080", MeshAdapter(mesh))
    session.get("http://reviews.default.svc.cluster.local:9080/reviews/1")

Per request: ``Mesh.request`` routes it, ``Call.run`` applies the route's policies, and each
attempt is sent by ``HTTPAdapter.send`` to the picked ``ip:port`` with the logical ``Host``
header; for ``https`` the urllib3 pool gets ``server_hostname`` and ``assert_hostname`` = the
logical host (SNI and certificate verification use the service name; pools are keyed by it too).
The body is read within the attempt, and the response's ``url``/``request``/``cookies`` are those
of the original request; ``response.meshcore`` says ``{"cluster", "endpoint", "route", "attempts"}``.
Each cluster's attempts use their own urllib3 ``PoolManager`` (``pool_connections`` endpoint pools
of ``pool_maxsize`` connections, as ``HTTPAdapter`` sizes its own); when the cluster leaves the
mesh's configuration that manager is cleared (its connections closed) once the cluster's requests
in flight finished. Proxies from ``proxies``/the environment still go through the adapter's
proxy managers.

Direct-response and redirect routes and fault-filter aborts are answered without an upstream.
Failures raise requests' exceptions: an upstream failure after the last attempt as
``HTTPAdapter`` raised it, with the mesh's context attached (``exc.meshcore``: target, cluster,
attempts, last endpoint, route; also a PEP 678 note); a route timeout as ``requests.exceptions.Timeout``; no healthy endpoint
or an open circuit breaker as ``ConnectionError``; no matching route as ``RequestException`` --
the meshcore error is ``__cause__``. TLS needs requests >= 2.32.2
(``build_connection_pool_key_attributes``). Keep the adapter's own ``max_retries`` at 0: the
route's retry policy does the retrying.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Optional, Tuple, Union
from urllib.parse import urlsplit

from requests import exceptions as rexc
from requests.adapters import HTTPAdapter, select_proxy
from requests.cookies import RequestsCookieJar, extract_cookies_to_jar
from urllib3 import PoolManager
from urllib3 import exceptions as u3exc
from urllib3.response import HTTPResponse
from urllib3.util import Timeout as Urllib3Timeout

from ..call import FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute, Unavailable
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
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
        return (_min_timeout(timeout[0], cap), _min_timeout(timeout[1], cap))
    return _min_timeout(timeout, cap)


class MeshAdapter(HTTPAdapter):
    """A ``requests`` ``HTTPAdapter`` sending through the mesh (see the module docstring)."""

    def __init__(self, mesh: Any, *, ready_timeout: float = 10.0, **pool_kwargs: Any) -> None:
        """``pool_kwargs`` go to ``HTTPAdapter`` (``pool_connections``, ``pool_maxsize``, ...);
        the first request to a target waits up to ``ready_timeout`` s for its configuration."""
        self._mesh = mesh
        self._ready_timeout = ready_timeout
        super().__init__(**pool_kwargs)
        self._pools = _ClusterPools(mesh, self._new_pool_manager, lambda pm: pm.clear())

    def _new_pool_manager(self, cluster: str) -> PoolManager:
        return PoolManager(num_pools=self._pool_connections, maxsize=self._pool_maxsize, block=self._pool_block)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        """An attempt's connection pool: from its cluster's pool manager (unless proxied)."""
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

    def send(self, request: Any, stream: bool = False, timeout: TimeoutArg = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> Any:
        try:
            call = _route(self._mesh, request.url, request.method or "GET", request.headers.items(),
                          self._ready_timeout)
        except (Unavailable, NoRoute) as e:
            raise self._mesh_error(request, e) from e
        local = _local_reply(call)
        if local is not None:
            return self._reply(request, local, call)
        sni = urlsplit(request.url).hostname or ""
        base_send = super().send
        slot = self._pools.acquire(call.cluster, call.cluster)

        def send(attempt: Any) -> Any:
            prepared = request.copy()
            prepared.url = attempt.url
            _drop_router_headers(prepared.headers)
            prepared.headers["Host"] = attempt.authority
            prepared._meshcore_sni = sni
            prepared._meshcore_pools = slot.pool
            response = base_send(prepared, stream=stream, timeout=_cap_timeout(timeout, attempt.timeout),
                                 verify=verify, cert=cert, proxies=proxies)
            try:
                _ = response.content  # read within the attempt (status and body known)
            except BaseException:
                response.close()
                raise
            return response

        try:
            response = call.run(send, classify=_classify)
        except FaultAbort as e:
            log.debug("fault abort for %s: %s", call, e)
            return self._reply(request, _fault_reply(e), call)
        except (MeshError, TimeoutError) as e:
            raise _add_context(self._mesh_error(request, e), call) from e
        except Exception as e:
            _add_context(e, call)
            raise
        finally:
            self._pools.release(slot)  # the body was read within the attempt: the connection is back
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
