"""redis-py on the mesh's TCP path: each new Redis connection goes where a sidecar's ``tcp_proxy`` would send it.

Use the pool (sync or asyncio) in place of redis-py's own::

    import redis
    from meshcore.integrations.redis import MeshConnectionPool

    r = redis.Redis(connection_pool=MeshConnectionPool(mesh, "cache.default:6379"))
    r.set("k", "v")

    import redis.asyncio
    from meshcore.integrations.redis import AsyncMeshConnectionPool

    r = redis.asyncio.Redis(connection_pool=AsyncMeshConnectionPool(mesh, "cache.default:6379"))

``target`` is a TCP service of the mesh, ``host:port`` as the application would dial it (short
names expand in the workload's namespace); it needs the Envoy shape (``Mesh(xds_shape="envoy")``),
where the service's outbound listener ``<vip>_<port>`` carries a ``tcp_proxy``. Other keywords
are redis-py's: the pool's (``max_connections``) and the connections' (``db``, ``password``,
``socket_timeout``, ``decode_responses``, ``retry`` ...); ``host``/``port`` come from the target
and may not be given. The connection classes are public too, for redis-py's other pools::

    redis.BlockingConnectionPool(connection_class=MeshConnection, mesh=mesh, target="cache.default:6379")

Per new connection (:meth:`Mesh.tcp_endpoint` / :class:`~meshcore.tcp.TcpPick`):

* **Balancing** per connection by the cluster's policy (Istio's default is ``LEAST_REQUEST``; a
  DestinationRule may say ``ROUND_ROBIN`` ...), ejected hosts skipped. A connection holds its pick
  for its whole life: least-request counts it in flight until the connection is disconnected
  (``disconnect()``: closed by the pool, by the client after an error, or garbage collected),
  when the pick's ``done()`` is called.
* **TLS** when the cluster's transport socket says so (mTLS with the workload certificate in a
  STRICT mesh: auto-mTLS ``transport_socket_matches`` or a DestinationRule ``ISTIO_MUTUAL``), the
  server's SANs checked before redis-py writes a byte. Leave redis-py's own ``ssl`` off: the mesh
  does the TLS, the application talks plain Redis to the connection.
* **Accounting** as Envoy's ``tcp_proxy``: ``upstream_cx_total`` per connection attempt,
  ``upstream_cx_connect_fail`` per failed one (TCP or TLS), and outlier detection fed with the
  outcome (a connect failure is a local-origin failure, which Istio's outlier detection maps to a
  5xx; a connection made is a success).
* **Connect attempts**: a failed connect is tried again on another endpoint, up to
  ``connect_attempts`` attempts in all (default 3; 1 is Envoy's ``tcp_proxy`` default, which hands
  the failure to the client). The next pick avoids the endpoints that failed in this connect (up
  to 5 re-picks, like Istio's ``previous_hosts`` retry predicate); with outlier detection the
  failed one is usually ejected already. Each attempt is bounded by the cluster's
  ``connect_timeout`` and redis-py's ``socket_connect_timeout``, whichever is smaller.
* **Errors**: when every attempt failed redis-py's ``ConnectionError`` (``TimeoutError`` if the
  last attempt timed out) is raised with the :class:`~meshcore.errors.UpstreamError` (or
  :class:`~meshcore.tls.TlsHandshakeError`) as ``__cause__``; no usable endpoint (none healthy,
  not a TCP service, no configuration in time) is a ``ConnectionError`` whose cause is the
  :class:`~meshcore.errors.Unavailable`. Both carry ``exc.meshcore`` (target, cluster, attempts,
  last endpoint) and a PEP 678 note. redis-py's own ``retry=`` retries the whole connect on top.
* **Configuration changes** (endpoints added or removed, policy changes) apply to new
  connections; an open connection stays where it is, as an Envoy ``tcp_proxy`` connection does.
  redis-py checks an idle connection before reusing it and reconnects one whose server went
  away, so a dead endpoint's idle connections move to live ones through the mesh.

The first connection to a target waits up to ``ready_timeout`` seconds for its configuration
(the asyncio variant in a worker thread; the pick itself never blocks the loop). The asyncio
variant makes the TCP connection and the TLS handshake on the event loop with the cluster's
context and then checks the peer as the blocking path does.

A connection says where it went: ``conn.mesh_pick`` (the :class:`~meshcore.tcp.TcpPick` while it
is connected, else ``None``) and ``conn.mesh_endpoint`` (``"ip:port"``). Not covered: Redis
Cluster/Sentinel clients (they discover and dial node addresses themselves) and redis-py's
maintenance notifications that move a connection to another host (turned off on these pools).

Importing :mod:`meshcore` does not import redis; this module does.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
from types import SimpleNamespace
from typing import Any, Callable, List, Optional, Set, Tuple

import redis
import redis.asyncio
import redis.asyncio.connection as _aconnection
import redis.connection as _connection
from redis import exceptions as rexc

from ..errors import MeshError, NotReady, Unavailable, UpstreamError
from . import _add_context

__all__ = ["MeshConnection", "MeshConnectionPool", "AsyncMeshConnection", "AsyncMeshConnectionPool",
           "DEFAULT_CONNECT_ATTEMPTS"]

#: connect attempts per new connection, each on another endpoint where one is left
DEFAULT_CONNECT_ATTEMPTS = 3
#: re-picks to avoid an endpoint that already failed in this connect (Istio's previous_hosts: 5)
_REPICKS = 5


def _split_target(target: str) -> Tuple[str, int]:
    host, sep, port = str(target).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target must be host:port (a TCP service of the mesh), got {target!r}")
    return host.strip("[]"), int(port)


def _connect_timeout(redis_limit: Optional[float], cluster_limit: Optional[float]) -> Optional[float]:
    limits = [float(t) for t in (redis_limit, cluster_limit) if t is not None and t > 0]
    return min(limits) if limits else None


def _fresh_pick(mesh: Any, target: str, failed: Set[str]) -> Any:
    """``mesh.tcp_endpoint(target)``, re-picked (a few times) while it names a failed endpoint."""
    pick = mesh.tcp_endpoint(target)
    for _ in range(_REPICKS):
        if pick.endpoint.key not in failed:
            break
        try:
            again = mesh.tcp_endpoint(target)
        finally:
            pick.done()
        pick = again
    return pick


def _wait_config(mesh: Any, target: str, timeout: float) -> None:
    """Wait for ``target``'s configuration. ``wait_ready`` is for routed targets: it raises for a
    TCP service too (no HTTP routes) once its configuration is there; the next pick says
    whether the target is usable."""
    try:
        mesh.wait_ready(target, timeout)
    except Unavailable:
        pass


def _is_timeout(exc: Optional[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (socket.timeout, asyncio.TimeoutError, TimeoutError)):
            return True
        if getattr(exc, "kind", None) == "timeout":
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


def _failure(target: str, attempts: int, cluster: Optional[str], endpoint: Optional[str],
             cause: BaseException) -> BaseException:
    """redis-py's exception for a connect that found no endpoint or whose attempts all failed."""
    if isinstance(cause, UpstreamError):
        kind = rexc.TimeoutError if _is_timeout(cause) else rexc.ConnectionError
        exc: BaseException = kind(f"Error connecting to {target} through the mesh: {attempts} attempt(s) failed, "
                                  f"the last to {endpoint}: {cause}")
    else:
        exc = rexc.ConnectionError(f"Error connecting to {target} through the mesh: {cause}")
    exc.__cause__ = cause
    exc.__suppress_context__ = True
    call = SimpleNamespace(target=target, cluster=cluster, route=None,
                           attempts=[SimpleNamespace(address=endpoint)] * attempts)
    return _add_context(exc, call)


class _Attempts:
    """The bookkeeping of one connect: endpoints that failed, the last failure."""

    __slots__ = ("target", "limit", "failed", "made", "cluster", "endpoint", "last")

    def __init__(self, target: str, limit: int) -> None:
        self.target = target
        self.limit = max(1, int(limit))
        self.failed: Set[str] = set()
        self.made = 0
        self.cluster: Optional[str] = None
        self.endpoint: Optional[str] = None
        self.last: Optional[BaseException] = None

    def started(self, pick: Any) -> None:
        self.made += 1
        self.cluster = pick.cluster
        self.endpoint = pick.endpoint.key

    def failed_on(self, pick: Any, exc: BaseException) -> None:
        self.failed.add(pick.endpoint.key)
        self.last = exc

    def no_endpoint(self, exc: MeshError) -> BaseException:
        """``tcp_endpoint`` refused: after failed attempts the failure says those too."""
        if self.last is not None:
            return _failure(self.target, self.made, self.cluster, self.endpoint, self.last)
        return _failure(self.target, 0, self.cluster, None, exc)

    def exhausted(self) -> BaseException:
        assert self.last is not None
        return _failure(self.target, self.made, self.cluster, self.endpoint, self.last)


def _set_socket_options(conn: Any, sock: Any) -> None:
    """What redis-py's own ``_connect`` sets: TCP_NODELAY, keep-alive (and its options)."""
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if getattr(conn, "socket_keepalive", False):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for k, v in (getattr(conn, "socket_keepalive_options", None) or {}).items():
            sock.setsockopt(socket.IPPROTO_TCP, k, v)


def _connection_kwargs(mesh: Any, target: str, connect_attempts: int, ready_timeout: float,
                       kwargs: dict, pool_class: Any) -> dict:
    for name in ("host", "port", "connection_class", "unix_socket_path", "path"):
        if name in kwargs:
            raise TypeError(f"{name}= cannot be given: the mesh target {target!r} decides where connections go")
    _split_target(target)
    kwargs = dict(kwargs, mesh=mesh, target=target, connect_attempts=connect_attempts, ready_timeout=ready_timeout)
    if "maint_notifications_config" not in kwargs and _accepts(pool_class, "maint_notifications_config"):
        # redis-py >= 6.4 may move a connection to another host on a MOVING notification; a mesh
        # connection goes where the mesh sends it
        from redis.maint_notifications import MaintNotificationsConfig

        kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return kwargs


def _accepts(cls: Any, name: str) -> bool:
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


# -- blocking redis-py -------------------------------------------------------------------------------


class MeshConnection(_connection.Connection):
    """A ``redis.connection.Connection`` whose socket is made through the mesh (see the module doc).

    Keywords: ``mesh``, ``target`` (``host:port`` of a TCP service), ``connect_attempts``
    (default :data:`DEFAULT_CONNECT_ATTEMPTS`), ``ready_timeout`` (first use: how long to wait for
    the target's configuration); the rest are redis-py's ``Connection`` keywords.
    """

    mesh_pick: Any = None

    def __init__(self, *, mesh: Any, target: str, connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                 ready_timeout: float = 10.0, **kwargs: Any) -> None:
        self.mesh_pick = None
        host, port = _split_target(target)
        super().__init__(host=host, port=port, **kwargs)
        self.mesh = mesh
        self.target = target
        self.connect_attempts = max(1, int(connect_attempts))
        self.ready_timeout = ready_timeout

    @property
    def mesh_endpoint(self) -> Optional[str]:
        pick = self.mesh_pick
        return pick.endpoint.key if pick is not None else None

    def repr_pieces(self) -> List[Tuple[str, Any]]:
        pieces = [("target", self.target), ("endpoint", self.mesh_endpoint), ("db", self.db)]
        if self.client_name:
            pieces.append(("client_name", self.client_name))
        return pieces

    def _pick(self, failed: Set[str]) -> Any:
        try:
            return _fresh_pick(self.mesh, self.target, failed)
        except NotReady:
            if self.ready_timeout <= 0:
                raise
        _wait_config(self.mesh, self.target, self.ready_timeout)
        return _fresh_pick(self.mesh, self.target, failed)

    def _connect(self) -> socket.socket:
        self._release_pick()
        tries = _Attempts(self.target, self.connect_attempts)
        while tries.made < tries.limit:
            try:
                pick = self._pick(tries.failed)
            except MeshError as e:
                raise tries.no_endpoint(e)
            tries.started(pick)
            try:
                sock = pick.connect(_connect_timeout(self.socket_connect_timeout, pick.connect_timeout))
            except UpstreamError as e:
                pick.done()
                tries.failed_on(pick, e)
                continue
            except BaseException:
                pick.done()
                raise
            try:
                _set_socket_options(self, sock)
                sock.settimeout(self.socket_timeout)
            except BaseException:
                sock.close()
                pick.done()
                raise
            self.mesh_pick = pick
            return sock
        raise tries.exhausted()

    def _release_pick(self) -> None:
        pick, self.mesh_pick = self.mesh_pick, None
        if pick is not None:
            pick.done()

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().disconnect(*args, **kwargs)
        finally:
            self._release_pick()


class MeshConnectionPool(redis.ConnectionPool):
    """``redis.ConnectionPool`` of :class:`MeshConnection` to ``target`` (a TCP service ``host:port``)."""

    def __init__(self, mesh: Any, target: str, *, connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                 ready_timeout: float = 10.0, **kwargs: Any) -> None:
        kwargs = _connection_kwargs(mesh, target, connect_attempts, ready_timeout, kwargs, redis.ConnectionPool)
        super().__init__(connection_class=MeshConnection, **kwargs)
        self.mesh = mesh
        self.target = target

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__}(target={self.target!r})>"


# -- redis.asyncio -----------------------------------------------------------------------------------


async def _open(pick: Any, limit: Optional[float]) -> Tuple[Any, Any]:
    """TCP (and the cluster's TLS) to ``pick``'s endpoint on the running loop, counted and fed to
    outlier detection as :meth:`TcpPick.connect` does. Raises :class:`UpstreamError`."""
    loop = asyncio.get_running_loop()
    ep = pick.endpoint
    state = pick._state  # the cluster's stats and outlier detector (TcpPick's own bookkeeping)
    stats, outlier = state.stats, state.outlier
    tls = pick.tls
    stats.inc("upstream_cx_total")
    started = loop.time()

    def left() -> Optional[float]:
        return None if limit is None else max(0.001, limit - (loop.time() - started))

    def failed(exc: BaseException, what: str = "") -> UpstreamError:
        pick._failed(stats, outlier)
        if isinstance(exc, UpstreamError):
            return exc
        return UpstreamError("connect-failure", f"{ep.key} (cluster {pick.cluster}): {what}{type(exc).__name__}: {exc}",
                             exc)

    try:
        infos = await loop.getaddrinfo(ep.address, ep.port, type=socket.SOCK_STREAM)
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
    except OSError as e:
        raise failed(e) from e
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, addr), left())
    except (OSError, asyncio.TimeoutError) as e:
        sock.close()
        raise failed(e) from e
    except BaseException:
        sock.close()
        raise
    reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    ctx = None
    if tls is not None:
        try:
            ctx = tls.context("tcp")
        except UpstreamError as e:
            sock.close()
            raise failed(e) from None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: protocol, sock=sock, ssl=ctx,
                                   server_hostname=(tls.server_hostname(ep) or "") if tls is not None else None),
            left())
    except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError) as e:
        sock.close()
        if tls is not None and not isinstance(e, asyncio.TimeoutError):
            raise failed(tls.handshake_error(e, ep.key)) from None
        raise failed(e, "TLS: " if tls is not None else "") from e
    except BaseException:
        sock.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    if tls is not None:
        try:
            tls.check_peer(writer.get_extra_info("ssl_object"), ep.key)
        except UpstreamError as e:
            transport.abort()
            raise failed(e) from None
    if outlier is not None:
        outlier.record(ep.key, 200)  # Envoy: LOCAL_ORIGIN_CONNECT_SUCCESS
    return reader, writer


class AsyncMeshConnection(_aconnection.Connection):
    """A ``redis.asyncio.connection.Connection`` made through the mesh (see the module doc);
    keywords as :class:`MeshConnection`."""

    mesh_pick: Any = None

    def __init__(self, *, mesh: Any, target: str, connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                 ready_timeout: float = 10.0, **kwargs: Any) -> None:
        self.mesh_pick = None
        host, port = _split_target(target)
        super().__init__(host=host, port=port, **kwargs)
        self.mesh = mesh
        self.target = target
        self.connect_attempts = max(1, int(connect_attempts))
        self.ready_timeout = ready_timeout

    mesh_endpoint = MeshConnection.mesh_endpoint
    repr_pieces = MeshConnection.repr_pieces
    _release_pick = MeshConnection._release_pick

    async def _pick(self, failed: Set[str]) -> Any:
        try:
            return _fresh_pick(self.mesh, self.target, failed)
        except NotReady:
            if self.ready_timeout <= 0:
                raise
        await asyncio.to_thread(_wait_config, self.mesh, self.target, self.ready_timeout)
        return _fresh_pick(self.mesh, self.target, failed)

    async def _connect(self) -> None:
        self._release_pick()
        tries = _Attempts(self.target, self.connect_attempts)
        while tries.made < tries.limit:
            try:
                pick = await self._pick(tries.failed)
            except MeshError as e:
                raise tries.no_endpoint(e)
            tries.started(pick)
            try:
                reader, writer = await _open(pick, _connect_timeout(self.socket_connect_timeout,
                                                                    pick.connect_timeout))
            except UpstreamError as e:
                pick.done()
                tries.failed_on(pick, e)
                continue
            except BaseException:
                pick.done()
                raise
            try:
                _set_socket_options(self, writer.get_extra_info("socket"))
            except (OSError, TypeError):
                writer.close()
                pick.done()
                raise
            self._reader, self._writer = reader, writer
            self.mesh_pick = pick
            return
        raise tries.exhausted()

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect(*args, **kwargs)
        except rexc.ConnectionError as e:
            inner = e.__cause__
            if isinstance(inner, rexc.RedisError) and getattr(inner, "meshcore", None) is not None:
                raise inner  # redis.asyncio wraps what _connect raises in another ConnectionError
            raise

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().disconnect(*args, **kwargs)
        finally:
            self._release_pick()

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            self._release_pick()

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        try:
            parent: Optional[Callable[..., None]] = getattr(super(), "__del__", None)
            if parent is not None:
                parent(*args, **kwargs)
        finally:
            try:
                self._release_pick()  # dropped without disconnect(): least-request stops counting it
            except Exception:
                pass


class AsyncMeshConnectionPool(redis.asyncio.ConnectionPool):
    """``redis.asyncio.ConnectionPool`` of :class:`AsyncMeshConnection` to ``target``."""

    def __init__(self, mesh: Any, target: str, *, connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                 ready_timeout: float = 10.0, **kwargs: Any) -> None:
        kwargs = _connection_kwargs(mesh, target, connect_attempts, ready_timeout, kwargs,
                                    redis.asyncio.ConnectionPool)
        super().__init__(connection_class=AsyncMeshConnection, **kwargs)
        self.mesh = mesh
        self.target = target

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__}(target={self.target!r})>"
