""":class:`MeshChannel`, the ``grpc.Channel`` look-alike, and :func:`mesh_channel`."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import grpc

from ...call import Attempt, Call
from ...errors import MeshError, UpstreamError
from ._metadata import _GRPC_HEADER_DICT, _GRPC_HEADERS, _headers, _routes_by_own_headers  # noqa: F401
from ._types import Metadata, Options
from ._peer import available as _peer_available, needs_tap as _needs_tap
from .connectivity import _Connectivity
from .endpoints import ANY_TLS, _EndpointChannel, _EndpointPool
from .status import MeshRpcError
from .streaming import _StreamStream, _StreamUnary, _UnaryStream
from .unary import _UnaryUnary

def _leaves(rt: Any) -> Iterator[Any]:
    """``rt`` and, for an aggregate cluster, its non-aggregate descendants instead."""
    children = getattr(rt, "children", ())
    if not children:
        yield rt
        return
    for child in children:
        yield from _leaves(child)


def _split_target(target: str) -> Tuple[str, str]:
    """``(authority, mesh target)``: ``xds:///name:port`` and ``xds://auth/name:port`` route for
    ``name:port``; a plain ``host:port`` is both."""
    if "://" in target:
        scheme, _, rest = target.partition("://")
        if scheme != "xds":
            raise ValueError(f"mesh_channel: unsupported target scheme {scheme!r} in {target!r} (use host:port)")
        return rest.split("/", 1)[-1], target
    return target, target


class MeshChannel(grpc.Channel):
    """A ``grpc.Channel`` whose RPCs are routed and balanced by a :class:`meshcore.Mesh`.

    See the module documentation; create it with :func:`mesh_channel`. ``sweep_interval`` is how
    often (seconds, checked when an RPC starts) channels to departed endpoints are closed;
    ``resolve_timeout`` how long an RPC without a deadline waits for the target's first
    configuration (an RPC issued while the mesh is still fetching it waits, as gRPC RPCs wait
    for name resolution; a target the mesh knows to be unusable fails at once).
    """

    def __init__(self, mesh: Any, target: str, *, credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Options = (), sweep_interval: float = 30.0, resolve_timeout: float = 20.0) -> None:
        self.mesh = mesh
        #: the mesh's telemetry (None: a mesh-like object without); the unary short path reads its observer
        self._telemetry = getattr(mesh, "telemetry", None)
        self.target = target
        self.authority, self._mesh_target = _split_target(target)
        self._scheme = "https" if credentials is not None else "http"
        self._pool = _EndpointPool(credentials, options, self._connect_timeout)
        #: the cluster sockets' TLS per (cluster, endpoint object), valid for one published
        #: configuration (``Mesh.upstream_tls``; cluster specs change only with it, endpoint
        #: objects are replaced when EDS changes them)
        self._upstream_tls = getattr(mesh, "upstream_tls", None)
        self._tls_cache: dict = {}
        self._tls_cfg: Any = None
        self._url_prefix = f"{self._scheme}://{self.authority}"
        # where published configurations are read (a dict replaced on every publish): one
        # lookup tells whether the target is resolved yet; a mesh without one is asked config()
        self._publisher = getattr(mesh, "_publisher", None)
        self._request = mesh.request
        #: ``MeshCore._request_first`` (route under an expected configuration and start the first
        #: attempt, one call), or the same steps for a mesh-like object without it
        self._request_first = getattr(mesh, "_request_first", None) or self._routed_first
        self._slots: dict = {}
        #: the last published configuration found not to route by gRPC's own headers (calls
        #: without metadata are routed without them), and the last one found to
        self._plain_cfg: Any = None
        self._headed_cfg: Any = None  # (kind, path, serializers, registered) -> its slot in each endpoint's cache
        self._sweep_interval = sweep_interval
        self._resolve_timeout = resolve_timeout
        self._last_sweep = time.monotonic()
        #: when an RPC starting sweeps next (infinity: sweep_interval None)
        self._next_sweep = float("inf") if sweep_interval is None else self._last_sweep + sweep_interval
        self._closed = False
        self._pool_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        self._connectivity = _Connectivity(self._state)
        mesh.watch(self._mesh_target)
        listeners = getattr(mesh, "_cluster_listeners", None)
        if listeners is not None:
            listeners.add(self)  # weakly: clusters leaving sweep at once (see _clusters_removed)

    def _clusters_removed(self, names: Set[str]) -> None:
        """The mesh's hook (xDS thread): clusters left, so may endpoints -- sweep now (channels
        still in use close when their last RPC finishes)."""
        if not self._closed:
            self.sweep()

    # -- routing ------------------------------------------------------------------------------------

    def _routed_first(self, url: str, method: str, headers: Any, target: str, timeout: Optional[float],
                      expected: Any, plain: bool = False) -> Any:
        """``MeshCore._request_first``'s steps for a mesh-like object without it (``plain``: a
        hint it does not need; the headers are read)."""
        publisher = self._publisher
        if publisher is None or publisher.published.get(target) is not expected:
            return None
        call = self._request(url, method, headers, target=target, timeout=timeout)
        # routed under expected only if it is still published (another may have come between the
        # check and request(); a configuration object never comes back): else nothing started
        if publisher.published.get(target) is not expected:
            return None
        try:
            first = call.first_attempt()
        except MeshError as e:
            return call, None, e, None, None, None, None, None
        if first is None:
            return call, None, None, None, None, None, None, None
        endpoint = first.endpoint
        return call, first, None, endpoint.key, endpoint, call.route, call.started, first.timeout

    def _route(self, url: str, metadata: Metadata, timeout: Optional[float]) -> Call:
        """Route one RPC (``url``: scheme, authority and method path; metadata); the call's
        deadline is the earlier of the route timeout and the caller's ``timeout``. (Blocking
        unary calls do the same inline: ``_UnaryUnary.__call__``.)"""
        if self._closed:
            raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
        publisher = self._publisher
        if publisher is None or publisher.published.get(self._mesh_target) is None:
            self._await_config(timeout)
        call = self._request(url, "POST", _headers(metadata), target=self._mesh_target)
        if timeout is not None:
            deadline = call.started + timeout
            limit = call.deadline
            if limit is None or deadline < limit:
                call.deadline = deadline
        return call

    def _await_config(self, timeout: Optional[float]) -> None:
        """Like a gRPC channel still resolving: wait for the target's configuration (not past the
        caller's deadline) if it has none yet; ``request()`` then says precisely what is missing."""
        if self.mesh.config(self._mesh_target) is None:
            try:
                self.mesh.wait_ready(self._mesh_target, self._resolve_timeout if timeout is None else timeout)
            except MeshError:
                pass

    def _routes_plain(self, cfg: Any) -> bool:
        """Whether ``cfg`` routes calls without metadata alike with and without gRPC's own
        headers (decided once per published configuration)."""
        if cfg is self._plain_cfg:
            return True
        if cfg is self._headed_cfg or cfg.error is not None:
            return False
        if _routes_by_own_headers(cfg):
            self._headed_cfg = cfg
            return False
        self._plain_cfg = cfg
        return True

    def _slot(self, key: Tuple[Any, ...]) -> object:
        """The cache slot of a multicallable signature (equal signatures share one)."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots.setdefault(key, object())
        return slot

    def _acquire(self, attempt: Attempt, tap: bool = False) -> _EndpointChannel:
        """The endpoint channel for ``attempt`` (raises ``UpstreamError``, a connect failure,
        when its cluster needs TLS that cannot be had); ``tap``: one that reads the peer's Istio
        metadata (:mod:`._peer`), when ``hpack`` is there and nothing recent was learned of the
        endpoint's server (:func:`._peer.needs_tap`: one tapped call a minute per endpoint)."""
        if time.monotonic() >= self._next_sweep:
            self.sweep()
        key = attempt.endpoint.key
        return self._pool.acquire(key, attempt.authority, self._tls_for(attempt), attempt,
                                  tap and _peer_available() and _needs_tap(key, attempt.authority))

    def _tls_for(self, attempt: Attempt) -> Any:
        """The :class:`~meshcore.tls.UpstreamTls` a new connection for ``attempt`` uses (``None``:
        plaintext); raises :class:`~meshcore.tls.TlsHandshakeError` when its certificates are
        missing (never plaintext instead)."""
        upstream_tls = self._upstream_tls
        if upstream_tls is None:
            return None
        ep = attempt.endpoint
        cache = self._tls_cache
        publisher = self._publisher
        cfg = publisher.published.get(self._mesh_target) if publisher is not None else None
        if cfg is not self._tls_cfg or cfg is None:
            cache = self._tls_cache = {}
            self._tls_cfg = cfg
        key = (attempt.cluster, id(ep))
        hit = cache.get(key)
        if hit is not None and hit[0] is ep:
            return hit[1]
        tls = upstream_tls(self._socket_cluster(cfg, attempt.cluster, ep), ep)
        if len(cache) >= 4096:  # endpoints replaced by EDS under one configuration
            cache.clear()
        cache[key] = (ep, tls)
        return tls

    @staticmethod
    def _socket_cluster(cfg: Any, cluster: Optional[str], ep: Any) -> Optional[str]:
        """The cluster whose transport socket a connection to ``ep`` uses: ``cluster``, or for
        an aggregate cluster the child holding ``ep`` (Envoy: the host's own cluster; the
        aggregate's own spec has no socket). Raises ``UpstreamError`` (connect-failure) when no
        child holds it (replaced meanwhile): never a guessed socket."""
        rt = cfg.clusters.get(cluster) if cfg is not None and cluster is not None else None
        if rt is None or not rt.children:
            return cluster
        leaves = list(_leaves(rt))
        for match in (lambda e: e is ep, lambda e: e.key == ep.key):
            for leaf in leaves:
                if leaf.lb is not None and any(match(e) for e in leaf.lb.endpoints):
                    return str(leaf.name)
        raise UpstreamError("connect-failure", f"endpoint {ep.key} is in no child cluster of aggregate {cluster!r} "
                            "any more")

    def _connect_timeout(self, cluster: Optional[str]) -> float:
        """The cluster's ``connect_timeout`` (for the TLS forwards' connect + handshake)."""
        cfg = self.mesh.config(self._mesh_target)
        rt = cfg.clusters.get(cluster) if cfg is not None and cluster is not None else None
        if rt is None and cfg is not None:  # an aggregate's child
            rt = next((leaf for top in cfg.clusters.values() for leaf in _leaves(top) if leaf.name == cluster), None)
        timeout = getattr(getattr(rt, "spec", None), "connect_timeout", None)
        return float(timeout) if timeout else 5.0

    def _live(self) -> Optional[Set[Tuple[str, Any]]]:
        """``(address, TLS)`` of every endpoint of the target's clusters now."""
        cfg = self.mesh.config(self._mesh_target)
        if cfg is None or cfg.error is not None:
            return None
        upstream_tls = self._upstream_tls
        live: Set[Tuple[str, Any]] = set()
        for top in cfg.clusters.values():
            for rt in _leaves(top):  # an aggregate's endpoints take their own cluster's socket
                if rt.lb is None:
                    continue
                for ep in rt.lb.endpoints:
                    if upstream_tls is None:
                        tls: Any = None
                    else:
                        try:
                            tls = upstream_tls(rt.name, ep)
                        except Exception:  # noqa: BLE001  (no certificates: keep what the address has)
                            tls = ANY_TLS
                    live.add((ep.key, tls))
        return live

    def sweep(self) -> None:
        """Close the channels to endpoints that are no longer in any cluster of the target, or
        whose cluster now uses another TLS socket for them (idle ones now, busy ones after
        their last RPC); also run whenever a cluster leaves the mesh."""
        self._last_sweep = time.monotonic()
        if self._sweep_interval is not None:
            self._next_sweep = self._last_sweep + self._sweep_interval
        live = self._live()
        if live is not None:
            self._pool.sweep(live)

    def endpoint_addresses(self) -> List[str]:
        """The endpoints this channel currently holds a grpcio channel to."""
        return self._pool.addresses()

    def tls_failures(self) -> Dict[str, str]:
        """``{endpoint: reason}`` for the mesh-TLS endpoints whose last connection attempt
        failed (refused, handshake or certificate check failed, timed out); an endpoint leaves
        once a connection to it works again. Unary RPCs carry the reason in their
        ``UNAVAILABLE`` details; this is where streaming RPCs' callers find it."""
        return {f.endpoint_key: str(f.failure) for f in self._pool.forwards() if f.failure is not None}

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._pool_executor is None:
                self._pool_executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="meshcore-grpc")
            return self._pool_executor

    def _state(self) -> grpc.ChannelConnectivity:
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        cfg = self.mesh.config(self._mesh_target)
        if cfg is None:
            return grpc.ChannelConnectivity.CONNECTING
        if cfg.error is not None:
            return grpc.ChannelConnectivity.TRANSIENT_FAILURE
        return grpc.ChannelConnectivity.READY

    # -- grpc.Channel --------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None],
                  try_to_connect: Optional[bool] = False) -> None:
        """Connectivity of the target as the mesh sees it: CONNECTING until its configuration is
        known, READY once it can be routed, TRANSIENT_FAILURE when it is unusable."""
        self._connectivity.subscribe(callback)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._connectivity.unsubscribe(callback)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: Optional[bool] = False) -> grpc.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: Optional[bool] = False) -> grpc.UnaryStreamMultiCallable:
        return _UnaryStream(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: Optional[bool] = False) -> grpc.StreamUnaryMultiCallable:
        return _StreamUnary(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: Optional[bool] = False) -> grpc.StreamStreamMultiCallable:
        return _StreamStream(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def close(self) -> None:
        """Close every per-endpoint channel (RPCs in flight are cancelled) and the future pool.
        The mesh itself stays open."""
        if self._closed:
            return
        self._closed = True
        self._connectivity.close()
        self._pool.close()
        with self._executor_lock:
            executor, self._pool_executor = self._pool_executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "MeshChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MeshChannel({self.target!r}, endpoints={self.endpoint_addresses()})"


def mesh_channel(mesh: Any, target: str, *, credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Options = (), sweep_interval: float = 30.0, resolve_timeout: float = 20.0) -> MeshChannel:
    """A ``grpc.Channel`` to ``target`` (``host:port`` or ``xds:///host:port``) through ``mesh``.

    ``credentials`` make the per-endpoint channels secure (``grpc.ssl_target_name_override`` is
    set to the logical host, so certificates are checked against the service name, not the pod
    address); they are the application's own TLS: a cluster with mesh TLS wraps it in its own,
    as a sidecar would (mesh TLS needs no ``credentials``: see the package documentation).
    ``options`` are passed to every per-endpoint channel (``grpc.default_authority``
    defaults to the target's ``host:port``). ``sweep_interval`` and ``resolve_timeout``: see
    :class:`MeshChannel`.
    """
    return MeshChannel(mesh, target, credentials=credentials, options=options, sweep_interval=sweep_interval,
                       resolve_timeout=resolve_timeout)
