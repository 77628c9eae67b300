"""``Mesh``: the façade a service uses. xDS (or a file) in, one routing decision per request out.

::

    mesh = meshcore.Mesh()                  # bootstrap from GRPC_XDS_BOOTSTRAP(_CONFIG)
    mesh.start()
    mesh.wait_ready("reviews.default.svc.cluster.local:9080", timeout=10)
    p = mesh.pick("reviews.default.svc.cluster.local:9080", "/api/x", method="GET")
    ...  # send the request to p.endpoint.address:p.endpoint.port
    p.done()

``pick`` reads the published configuration (one dict lookup: a complete, consistent
snapshot), matches the route (compiled route table), then picks an endpoint from the chosen
cluster's balancer. The returned :class:`Pick` holds the balancer it came from, so ``done``
releases the in-flight count there even if the configuration has changed since.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

from ._model import Endpoint
from ._routing import RouteMatch
from ._url import parse_url, split_url
from .call import core as call_core
from .cluster_state import ClusterState
from .errors import MeshClosed, NoRoute, NotReady, Unavailable
from .resilience.fault import ActiveFaults
from .stats import StatsRegistry, prometheus_collector
from .telemetry.record import Telemetry
from .xds.snapshot import AggregateBalancer, TargetConfig
from ._fast import _hooks
from .resilience import router_headers as _router_headers  # noqa: F401  (registers with the request path)

# Every module the request path calls into (it imports nothing above it) is imported above and has
# registered its entries with meshcore._fast._hooks: check it before a Mesh can be built.
_hooks.require("meshcore.mesh")

if TYPE_CHECKING:
    from .inbound import InboundListener
    from .tcp import TcpPick
    from .tls import UpstreamTls, WorkloadIdentity
    import grpc  # imported where a CSDS server is made (the xDS client imports it for its stream)

__all__ = ["Mesh", "Pick", "parse_url", "split_url"]

log = logging.getLogger(__name__)

BootstrapArg = Union[None, str, "os.PathLike[str]", Mapping[str, Any]]


class Pick:
    """One routing decision: where to send a request, and how (timeout, retries).

    ``endpoint`` is ``None`` for direct responses and redirects (``route`` says which).
    Call :meth:`done` once the request finished (also a context manager); calling it again is
    harmless.
    """

    __slots__ = ("target", "cluster", "endpoint", "route_name", "timeout", "retry_policy", "route", "_lb")

    def __init__(self, target: str, route: RouteMatch, cluster: Optional[str], endpoint: Optional[Endpoint],
                 lb: Any) -> None:
        self.target = target
        self.route = route
        self.cluster = cluster
        self.endpoint = endpoint
        self.route_name = route.route_name
        self.timeout = route.timeout
        self.retry_policy = route.retry_policy
        self._lb = lb

    def done(self) -> None:
        lb = self._lb
        if lb is not None:
            self._lb = None
            lb.release(self.endpoint)

    def __enter__(self) -> "Pick":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done()

    def __repr__(self) -> str:
        return (f"Pick({self.target!r} route={self.route_name!r} cluster={self.cluster!r} "
                f"endpoint={self.endpoint.key if self.endpoint is not None else None})")


class MeshBase:
    """Everything of :class:`Mesh` but the request path: lifecycle, targets, ``pick``, stats,
    introspection. ``Mesh`` combines it with ``MeshCore`` (``request``), compiled or pure."""

    def __init__(self, bootstrap: BootstrapArg = None, *, delta: Optional[bool] = None,
                 resource_timeout: float = 15.0, seed: Optional[int] = None, backoff: Any = None,
                 ready_timeout: float = 10.0, certificates: Any = None, xds_shape: Optional[str] = None) -> None:
        """``certificates``: this workload's certificates for mesh TLS (a directory in Istio's
        layout, ``cert-chain.pem``/``key.pem``/``root-cert.pem``, or a
        :class:`~meshcore.tls.FileCertificateSource`); see :mod:`meshcore.tls.manager` for where
        they come from when it is not given.

        ``xds_shape``: ``"grpc"`` (gRPC's proxyless shape: a listener per target) or ``"envoy"``
        (what a control plane writes for an Envoy sidecar: wildcard LDS/CDS, outbound listeners per
        port; see :mod:`meshcore.xds.envoy_shape`); default ``$MESHCORE_XDS_SHAPE``, else ``"grpc"``."""
        from .xds.bootstrap import Bootstrap, target_authority
        from .xds.client import XdsClient
        from .xds.envoy_shape import _decoders, resolve_shape
        from .xds.model import CLUSTER, LISTENER
        from .xds.publisher import ConfigPublisher

        self.xds_shape = resolve_shape(xds_shape)
        self.bootstrap = bootstrap if isinstance(bootstrap, Bootstrap) else Bootstrap.load(bootstrap)
        shape_kw: Dict[str, Any] = {}
        if self.xds_shape == "envoy":
            self.bootstrap = _envoy_bootstrap(self.bootstrap)
            shape_kw = {"wildcard_types": (LISTENER, CLUSTER), "decoders": _decoders()}
        for name, authority in self.bootstrap.authorities.items():
            if authority.xds_servers and tuple(authority.xds_servers) != tuple(self.bootstrap.xds_servers):
                log.warning("authority %r names its own xDS servers; meshcore uses one ADS stream to the "
                            "top-level servers for every resource", name)
        self._source: Any = XdsClient(self.bootstrap, self._on_update, delta=delta,
                                      resource_timeout=resource_timeout, backoff=backoff, **shape_kw)
        namespace, domain = _node_namespace(self.bootstrap.node)
        self._publisher = ConfigPublisher(self._source, self.bootstrap.listener_name, seed, target_authority,
                                          shape=self.xds_shape, namespace=namespace, domain=domain)
        self._init_data_plane(seed, ready_timeout, certificates)

    def _init_data_plane(self, seed: Optional[int], ready_timeout: float, certificates: Any = None) -> None:
        #: how long the first ``pick``/``request`` of a target waits for its configuration
        #: (on a thread that may block; an event loop's thread gets :class:`NotReady` at once)
        self.ready_timeout = float(ready_timeout)
        self._unready: Dict[str, None] = {}  # targets whose first wait ran out: later uses fail fast
        self._started = False
        self._closed = False
        self._csds_server: Optional["grpc.Server"] = None
        self._states: Dict[str, ClusterState] = {}
        self._states_lock = threading.Lock()
        #: clusters that left the configuration whose state waits for their requests in flight
        self._retiring: Set[str] = set()
        #: integrations told when clusters leave (``_clusters_removed(names)``); weak: a dropped
        #: transport is not kept alive by the mesh
        self._cluster_listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._active_faults: Dict[Tuple[str, str], ActiveFaults] = {}  # (listener, fault filter) -> gauge
        self.stats_registry = StatsRegistry()
        #: the sinks of every finished request's record (``meshcore.telemetry``; none by default)
        self.telemetry = Telemetry(self)
        self._rng = random.Random(seed)
        from .tls.manager import TlsManager

        providers = self.bootstrap.certificate_providers if self.bootstrap is not None else None
        #: certificate sources and each cluster socket's TLS (``upstream_tls``)
        self.tls = TlsManager(providers, certificates, self._tls_recorder)
        self._publisher.on_clusters_removed = self._clusters_removed

    @classmethod
    def from_file(cls, path: Union[str, "os.PathLike[str]"], *, watch: bool = True, poll_interval: float = 1.0,
                  seed: Optional[int] = None, ready_timeout: float = 10.0, certificates: Any = None,
                  xds_shape: Optional[str] = None, namespace: str = "default") -> "Mesh":
        """A mesh fed by a resource file (no control plane); the file is re-read when it changes.
        gRPC shape: targets name Listener resources directly. Envoy shape (``xds_shape="envoy"``,
        a sidecar's resources, e.g. from a config dump): targets are ``host:port`` resolved through
        the outbound listeners, short host names expanding in ``namespace``."""
        from .xds.envoy_shape import _decoders, resolve_shape
        from .xds.file_source import FileSource
        from .xds.publisher import ConfigPublisher

        self = cls.__new__(cls)
        self.bootstrap = None
        self.xds_shape = resolve_shape(xds_shape)
        envoy = self.xds_shape == "envoy"
        self._source = FileSource(os.fspath(path), None, watch=watch, poll_interval=poll_interval,
                                  decoders=_decoders() if envoy else None)
        self._source._on_update = self._on_update
        self._publisher = ConfigPublisher(self._source, lambda target: target, seed, shape=self.xds_shape,
                                          namespace=namespace)
        self._init_data_plane(seed, ready_timeout, certificates)
        return self

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "Mesh":
        if self._closed:
            raise MeshClosed("mesh is closed: start() after close() (make a new Mesh)")
        if not self._started:
            self._started = True
            self._source.start()
            self.tls.start()  # an SDS certificate stream starts fetching now, not at the first connection
        return self

    def close(self) -> None:
        """Stop the subscription and route nothing more: ``pick``, ``request`` and every
        integration raise :class:`MeshClosed` from now on. Calling it again is harmless."""
        self._closed = True
        if self._csds_server is not None:
            self._csds_server.stop(0)
            self._csds_server = None
        self._source.close()
        self._publisher.close()  # publishes nothing: the next pick/request finds no configuration
        self.tls.close()
        self.telemetry.close()  # its sinks get nothing more (what they recorded stays readable)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_update(self, changed: Any) -> None:
        self._publisher.on_update(changed)

    @property
    def node_id(self) -> str:
        return self._source.node.id

    # -- targets -----------------------------------------------------------------------------------

    def watch(self, target: str) -> None:
        """Start fetching the configuration of ``target`` (``pick`` and ``wait_ready`` do this too)."""
        self._publisher.add_target(target)

    def wait_ready(self, target: str, timeout: Optional[float] = None) -> None:
        """Block until ``target`` can be picked from; raise :class:`Unavailable` (or
        :class:`MeshClosed`) after ``timeout`` seconds (default: the mesh's ``ready_timeout``)."""
        if self._closed:
            raise MeshClosed(f"{target}: mesh is closed")
        self.start()
        self._publisher.add_target(target)
        cfg = self._publisher.wait_for(target, self.ready_timeout if timeout is None else timeout)
        if cfg is None:
            self._mark_unready(target)
        if cfg is None or cfg.error is not None:
            raise self._unusable(target, cfg)
        self._unready.pop(target, None)

    def _mark_unready(self, target: str) -> None:
        """A wait for ``target`` ran out: ``pick``/``request`` fail at once until it arrives."""
        if len(self._unready) >= 4096:
            self._unready.clear()
        self._unready[target] = None

    def _config_for(self, target: str, cfg: Optional[TargetConfig]) -> TargetConfig:
        """The slow path of ``pick``/``request`` when ``target`` has no usable published
        configuration (``cfg``): the first use subscribes to it and, where this thread may
        block, waits up to ``ready_timeout`` for it (a file source has it at once). A target
        whose wait ran out before, or whose configuration failed, fails fast."""
        if self._closed:
            raise MeshClosed(f"{target}: mesh is closed")
        if cfg is None:
            if not self._started:
                self.start()
            self._publisher.add_target(target)  # a file source publishes it during this call
            cfg = self._publisher.published.get(target)
            if cfg is None and target not in self._unready:
                if self.ready_timeout <= 0 or _on_event_loop():
                    raise NotReady(target, self._why(target, None) + (
                        "; not waited for on an event loop thread: use an async integration or "
                        "`await asyncio.to_thread(mesh.wait_ready, target)`" if self.ready_timeout > 0 else ""))
                cfg = self._publisher.wait_for(target, self.ready_timeout)
                if self._closed:
                    raise MeshClosed(f"{target}: mesh is closed")
                if cfg is None:
                    self._mark_unready(target)
                    raise Unavailable(f"{self._why(target, None)}; waited {self.ready_timeout:g} s "
                                      f"(later requests fail at once until it arrives)")
        if cfg is None or cfg.error is not None:
            raise self._unusable(target, cfg)
        self._unready.pop(target, None)
        return cfg

    def _no_config(self, target: str, cfg: Optional[TargetConfig]) -> Unavailable:
        """The error for a target without a usable configuration."""
        return self._unusable(target, cfg)

    def _unusable(self, target: str, cfg: Optional[TargetConfig]) -> Unavailable:
        """Why ``target`` cannot be routed: its configuration's error, or what it waits for; a
        target whose listener does not exist also lists the nearest known targets."""
        message = self._why(target, cfg)
        if cfg is not None and cfg.listener is None:
            near = self.nearest_targets(target)
            if near:
                message += "; nearest known targets: " + ", ".join(near)
        return Unavailable(message)

    def _no_upstream(self, target: str, path: str, cluster: Optional[str]) -> Unavailable:
        """The error for a cluster with no endpoint to pick; says why when the cluster's
        endpoints were rejected or do not exist (the balancer is then kept, empty)."""
        message = f"{target}{path}: no healthy upstream in cluster {cluster!r}"
        cfg = self._publisher.published.get(target)
        rt = cfg.clusters.get(cluster) if cfg is not None and cluster is not None else None
        if rt is not None and rt.error:
            message += f" ({rt.error})"
        return Unavailable(message)

    def problems(self) -> Dict[str, List[str]]:
        """Per target asked for, why it (or a cluster it routes to) is unusable: a rejected or
        missing listener, route configuration, cluster or assignment, or what a pending
        configuration still waits for. Targets without a problem are left out."""
        return self._publisher.problems()

    def nearest_targets(self, target: str, n: int = 3) -> List[str]:
        """Known targets (listener names the source has) that look most like ``target``."""
        import difflib

        from .xds.model import LISTENER

        known: Dict[str, None] = {}
        for entry in self._source.entries():
            if entry.type_url == LISTENER and entry.has_value:
                known[self._target_of_listener(entry.name)] = None
        known.pop(target, None)
        return difflib.get_close_matches(target, list(known), n=n, cutoff=0.5)

    def _target_of_listener(self, name: str) -> str:
        """The target a listener resource name stands for (templates: ``xdstp://.../<target>``)."""
        return name.rsplit("/", 1)[-1] if "/" in name else name

    def _no_cluster(self, target: str, path: str, m: RouteMatch, rt: Any) -> Unavailable:
        """The error for a route whose cluster is missing (``rt`` None) or unusable (no balancer)."""
        if rt is None:
            return Unavailable(f"{target}{path}: cluster {m.cluster!r} not found "
                               f"(route {m.route_name!r} -> {m.cluster_not_found_response_code})")
        return Unavailable(f"{target}{path}: {rt.error} (xDS node {self.node_id!r})")

    def _why(self, target: str, cfg: Optional[TargetConfig]) -> str:
        if cfg is not None and cfg.error:
            reason = cfg.error
        else:
            missing = self._publisher.missing.get(target) or ["the listener"]
            reason = "waiting for " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        ambient = getattr(self._source, "ambient_error", None)
        if ambient:
            reason += f"; {ambient}"
        if repr(self.node_id) in reason:  # the source's own error already names the node
            return f"{target}: {reason}"
        return f"{target}: {reason} (xDS node {self.node_id!r})"

    # -- TLS ----------------------------------------------------------------------------------------

    def _tls_recorder(self, cluster: str) -> Any:
        stats = self.stats_registry.cluster(cluster)
        return stats.inc

    def identity(self) -> Optional["WorkloadIdentity"]:
        """This workload's certificate as mesh TLS presents it (SPIFFE ID, expiry, root count,
        any problem), or ``None`` when it has no certificates."""
        return self.tls.identity()

    def upstream_tls(self, cluster: str, endpoint: Any) -> Optional["UpstreamTls"]:
        """The TLS a new connection to ``endpoint`` of ``cluster`` must use (``None``: plaintext).

        Raises :class:`~meshcore.tls.TlsHandshakeError` (a connect failure) when the cluster
        needs TLS and its certificates cannot be had: never plaintext instead."""
        st = self._states.get(cluster)
        if st is not None:
            spec = st.spec
            if spec is None:
                return None
            if spec.kind == "AGGREGATE":
                return self._aggregate_child_tls(st, cluster, endpoint)
            if spec.tls is None and not spec.transport_socket_matches:
                return None
            # per endpoint, valid while the cluster spec and the endpoint object stay the same
            hit = st.tls_sockets.get(endpoint.key)
            if hit is not None and hit[0] is spec and hit[1] is endpoint:
                return hit[2]  # type: ignore[no-any-return]
            up = self.tls.for_endpoint(cluster, spec, endpoint)
            if len(st.tls_sockets) >= 4096:
                st.tls_sockets.clear()
            st.tls_sockets[endpoint.key] = (spec, endpoint, up)
            return up
        rt = self._publisher._runtimes.get(cluster)
        spec = rt.spec if rt is not None else None
        if spec is not None and spec.kind == "AGGREGATE":
            child = self._child_holding(rt, endpoint)
            if child is None:
                return self._unheld_endpoint(cluster, rt, endpoint)
            return self.upstream_tls(child.name, endpoint)
        if spec is None or (spec.tls is None and not spec.transport_socket_matches):
            return None
        return self.tls.for_endpoint(cluster, spec, endpoint)

    def _aggregate_child_tls(self, st: Any, cluster: str, endpoint: Any) -> Optional["UpstreamTls"]:
        """An aggregate cluster has no transport socket of its own: the endpoint's connection
        uses the socket of the child cluster that holds it (Envoy: the child's host)."""
        rt = self._publisher._runtimes.get(cluster)
        hit = st.tls_sockets.get(endpoint.key)
        if hit is not None and hit[0] is rt and hit[1] is endpoint:  # a new child spec: a new runtime
            return hit[2]  # type: ignore[no-any-return]
        child = self._child_holding(rt, endpoint) if rt is not None else None
        if child is None:
            return self._unheld_endpoint(cluster, rt, endpoint)
        if child.spec is None:
            return None
        cspec = child.spec
        up = None
        if cspec.tls is not None or cspec.transport_socket_matches:
            up = self.tls.for_endpoint(child.name, cspec, endpoint)
        if len(st.tls_sockets) >= 4096:
            st.tls_sockets.clear()
        st.tls_sockets[endpoint.key] = (rt, endpoint, up)
        return up

    def _unheld_endpoint(self, cluster: str, rt: Any, endpoint: Any) -> None:
        """An endpoint of an aggregate cluster that none of its children holds any more (it left
        between the pick and the connection): plaintext only when no child could ask for TLS,
        else a connect failure (its socket is unknown: never plaintext instead)."""
        children = rt.children if rt is not None else None
        if children is not None and all(
                c.spec is None or (c.spec.tls is None and not c.spec.transport_socket_matches) for c in children):
            return None
        from .tls import TlsHandshakeError

        self._tls_recorder(cluster)("ssl.connection_error")
        raise TlsHandshakeError(cluster, endpoint.key, "the endpoint is in none of the aggregate cluster's child "
                                "clusters any more (it left the configuration), so its transport socket is unknown")

    @staticmethod
    def _child_holding(rt: Any, endpoint: Any) -> Any:
        for child in rt.children:
            lb = child.lb
            if lb is not None and any(ep is endpoint or ep.key == endpoint.key for ep in lb.endpoints):
                return child
        return None

    # -- TCP services (Envoy shape) -----------------------------------------------------------------

    def tcp_endpoint(self, target: str) -> "TcpPick":
        """The endpoint (and TLS) a connection to the TCP service ``host:port`` uses: the cluster of
        the sidecar's ``tcp_proxy`` for that destination (Envoy shape), balanced by its policy.
        Call ``done()`` on the result when the connection ends. Raises ``Unavailable``."""
        from .tcp import TcpPick, no_tcp_service

        cfg = self._publisher.published.get(target)
        if cfg is None or cfg.tcp_cluster is None:
            try:
                cfg = self._config_for(target, cfg)
            except Unavailable:
                cfg = self._publisher.published.get(target)
                if cfg is None or cfg.tcp_cluster is None:
                    raise
        if cfg.tcp_cluster is None:
            raise no_tcp_service(target, "its destination is served by HTTP routes (use pick/request)")
        cname = cfg.tcp_cluster
        tcp = getattr(cfg.resolution, "tcp", None)
        weighted = tcp.weighted_clusters if tcp is not None else ()
        total = sum(w for _, w in weighted) if len(weighted) > 1 else 0
        if total > 0:  # Envoy's tcp_proxy: a cluster per connection, by weight (PGV: each >= 1)
            value = self._rng.randrange(total)
            for cname, w in weighted:
                if value < w:
                    break
                value -= w
        rt = cfg.clusters.get(cname)
        if rt is None or rt.lb is None:
            raise Unavailable(f"{target}: cluster {cname!r}: {rt.error if rt is not None else 'not available'}")
        lb = rt.lb
        if type(lb) is AggregateBalancer:
            ep, lb = lb.choose(None)
        else:
            ep = lb.pick(None)
        if ep is None:
            raise self._no_upstream(target, "", cname)
        st = self._cluster_state(rt)
        try:
            tls = self.upstream_tls(cname, ep)
        except BaseException:
            lb.release(ep)
            raise
        spec = rt.spec
        return TcpPick(target, cname, ep, lb, tls, st, spec.connect_timeout if spec is not None else 5.0)

    def tcp_connect(self, target: str, timeout: Optional[float] = None) -> Tuple[Any, "TcpPick"]:
        """Connect to the TCP service ``host:port`` through the mesh: ``(socket, pick)``; call
        ``pick.done()`` when the socket is closed. TLS (mTLS in a STRICT mesh) when the cluster's
        socket says so. A failed connection is counted and raised (``UpstreamError``)."""
        pick = self.tcp_endpoint(target)
        try:
            return pick.connect(timeout), pick
        except BaseException:
            pick.done()
            raise

    # -- the server side (gRFC A36) ----------------------------------------------------------------

    def serve(self, port: int, *, address: str = "0.0.0.0") -> "InboundListener":
        """The server listener of ``address:port`` from xDS: its filter chains (TLS, RBAC, routes)
        and serving state; see :mod:`meshcore.inbound`. Starts the mesh; never waits."""
        from .inbound import serve

        return serve(self, port, address=address)

    # -- the hot path ------------------------------------------------------------------------------

    def pick(self, target: str, path: str = "/", method: str = "GET", headers: Any = None, *,
             scheme: str = "http", source_ip: Optional[str] = None) -> Pick:
        """Route and balance one request to ``target``.

        ``target`` is ``host:port`` (Istio's listener naming) or an ``xds:`` URI; the listener
        name comes from the bootstrap's templates and virtual hosts are matched against the
        target's authority. ``headers`` is a mapping or a list of pairs (names are
        case-insensitive).
        """
        cfg = self._publisher.published.get(target)
        if cfg is None or cfg.error is not None:
            cfg = self._config_for(target, cfg)  # the first use (raises if unusable)
        m = cfg.route_table.match(cfg.authority, path, headers, method, scheme, None, source_ip)  # type: ignore[union-attr]
        if m is None:
            raise NoRoute(target, path)
        cname = m.cluster
        if cname is None:  # direct response or redirect
            return Pick(target, m, None, None, None)
        rt = cfg.clusters.get(cname)
        if rt is None or rt.lb is None:
            raise self._no_cluster(target, path, m, rt)
        lb = rt.lb
        if type(lb) is AggregateBalancer:
            ep, lb = lb.choose(m.hash)
        else:
            ep = lb.pick(m.hash)
        if ep is None:
            raise self._no_upstream(target, path, cname)
        return Pick(target, m, cname, ep, lb)

    # -- the request lifecycle -----------------------------------------------------------------------

    def _cluster_state(self, rt: Any) -> "ClusterState":
        st = self._states.get(rt.name)
        if st is None:
            with self._states_lock:  # one state per name: a second one would take over its stats
                st = self._states.get(rt.name)
                if st is None:
                    st = self._states[rt.name] = ClusterState(self, rt.name)
                    if rt.name not in self._publisher._runtimes:
                        # resolved from a configuration that was replaced meanwhile: the removal
                        # was announced before this state existed, so retire it now
                        self._retiring.add(rt.name)
        if st.spec is not rt.spec:
            st.configure(rt.spec)
        if st.outlier is not None and st.synced is not rt.eds_spec:
            st.sync_hosts(rt)
        return st

    def _clusters_removed(self, names: Iterable[str]) -> None:
        """The publisher's hook (called under its lock): ``names`` left every configuration.

        Their request state and stats go once their requests in flight finished (the counts
        then move to the registry's bounded removed-clusters summary, see
        :meth:`StatsRegistry.retire`); a name that comes back before keeps its state. The
        integrations registered in ``_cluster_listeners`` are told too (they close the
        cluster's connection pools once idle)."""
        names = set(names)
        with self._states_lock:
            self._retiring.update(n for n in names if n in self._states)
        self._reap()
        self.tls.forget(names)  # their sockets' contexts (connections already made keep theirs)
        for listener in list(self._cluster_listeners):
            try:
                listener._clusters_removed(names)
            except Exception:  # an integration's bug must not break configuration updates
                log.exception("cluster removal hook of %r failed", listener)

    def _reap(self) -> None:
        """Drop the state of retiring clusters that have no request in flight any more, and the
        ``active_faults`` gauges of listeners no longer published (when idle)."""
        live = self._publisher._runtimes
        with self._states_lock:
            for name in list(self._retiring):
                st = self._states.get(name)
                if name in live or st is None:
                    self._retiring.discard(name)
                    continue
                if st.busy():
                    continue  # its calls still count into it: retire it on a later pass
                self._retiring.discard(name)
                del self._states[name]
                self.stats_registry.retire(name, st.stats)
                st.close()
            if self._active_faults:
                listeners = {cfg.listener.name if cfg.listener is not None else cfg.target
                             for cfg in self._publisher.published.values()}
                for key, counter in list(self._active_faults.items()):
                    if key[0] not in listeners and not counter.active:
                        del self._active_faults[key]

    def _is_live_cluster(self, name: str) -> bool:
        """Whether a cluster of that name is in (or about to be in) a published configuration."""
        return name in self._publisher._runtimes

    def _fault_counter(self, cfg: TargetConfig, filter_name: str) -> ActiveFaults:
        """The ``active_faults`` gauge of a listener's fault filter (``max_active_faults``)."""
        key = (cfg.listener.name if cfg.listener is not None else cfg.target, filter_name)
        counter = self._active_faults.get(key)
        if counter is None:
            counter = self._active_faults.setdefault(key, ActiveFaults())
        return counter

    def fault_stats(self) -> Dict[str, Dict[str, int]]:
        """Per listener fault filter (``"<listener>/<filter name>"``): Envoy's ``active_faults``
        gauge and ``faults_overflow`` counter (``max_active_faults``)."""
        return {f"{listener}/{name}": {"active_faults": c.active, "faults_overflow": c.overflow}
                for (listener, name), c in sorted(self._active_faults.items())}

    def _balancers(self, cluster: str) -> List[Any]:
        """Every distinct balancer of ``cluster``: published configurations' and the newest one."""
        found: Dict[int, Any] = {}
        runtimes = [cfg.clusters.get(cluster) for cfg in self._publisher.published.values()]
        runtimes.append(self._publisher._runtimes.get(cluster))
        for rt in runtimes:
            lb = getattr(rt, "lb", None)
            if lb is not None:
                found[id(lb)] = lb
        return list(found.values())

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per-cluster counters, gauges and the request-time histogram (Envoy's stat names) of
        the clusters in use; a removed cluster's go once its requests finished (their sums:
        ``stats_registry.removed()``)."""
        if self._retiring:
            self._reap()
        return self.stats_registry.snapshot()

    def prometheus_collector(self) -> Any:
        """A ``prometheus_client`` collector of :meth:`stats` (``meshcore_cluster_*`` metrics), and of
        Istio's standard metrics once ``telemetry.enable_istio_metrics()`` was called."""
        return prometheus_collector(self.stats_registry, self.tls.sources, self.telemetry)

    # -- introspection -----------------------------------------------------------------------------

    def config(self, target: str) -> Optional[TargetConfig]:
        """The configuration currently published for ``target`` (``None``: not yet)."""
        return self._publisher.published.get(target)

    def _client_configs(self, include_resources: bool = True) -> List[Any]:
        from .xds.csds import client_config  # CSDS protos: loaded on first use

        static = self.bootstrap is None
        return [client_config(self._source.entries(), self._source.node, "", static, include_resources)]

    def config_dump(self, include_resources: bool = True) -> Dict[str, Any]:
        """The client's resources, shaped like CSDS's ``ClientConfig`` (proto3 JSON, snake_case):
        per resource its name, version, status (ACKED/NACKED/REQUESTED/DOES_NOT_EXIST), last
        update, the resource as received and the last error."""
        from .xds.csds import config_dump

        return config_dump(self._client_configs(include_resources)[0])

    def serve_csds(self, address: str = "127.0.0.1:0") -> int:
        """Serve the ClientStatusDiscoveryService (``grpcdebug <addr> xds status``); returns the port."""
        from concurrent import futures

        if self._csds_server is None:
            import grpc

            from .xds.csds import add_csds_servicer

            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            add_csds_servicer(server, self._client_configs)
            port = server.add_insecure_port(address)
            server.start()
            self._csds_server = server
            self._csds_port = port
        return self._csds_port


def _envoy_bootstrap(bootstrap: Any) -> Any:
    """The bootstrap with the node an Envoy sidecar presents (istiod then picks its sidecar
    generator). A node id that is not Istio's sidecar form and no pod environment to build one
    (a non-Istio control plane): the bootstrap's node is kept, minus ``GENERATOR``."""
    import dataclasses

    from .xds.bootstrap import BootstrapError

    try:
        return bootstrap.for_shape("envoy")
    except BootstrapError as e:
        if not bootstrap.node.id:
            raise
        log.info("Envoy shape: keeping the bootstrap's node as it is (%s)", e)
        node = type(bootstrap.node)()
        node.CopyFrom(bootstrap.node)
        if "GENERATOR" in node.metadata.fields:
            del node.metadata.fields["GENERATOR"]
        return dataclasses.replace(bootstrap, node=node)


def _node_namespace(node: Any) -> Tuple[str, str]:
    """The client's namespace and DNS domain (for short host names), from Istio's node."""
    ns = ""
    field = node.metadata.fields.get("NAMESPACE") if node.HasField("metadata") else None
    if field is not None and field.string_value:
        ns = field.string_value
    parts = node.id.split("~")
    if not ns and len(parts) == 4 and "." in parts[2]:
        ns = parts[2].rsplit(".", 1)[1]
    domain = "cluster.local"
    if len(parts) == 4 and ".svc." in parts[3]:
        domain = parts[3].split(".svc.", 1)[1] or domain
    return ns, domain


def _on_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (it must not block on a first wait)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Mesh(MeshBase, call_core.MeshCore):
    """A proxyless mesh member: an xDS subscription (or a resource file), ``pick`` and
    ``request`` (the request lifecycle: see ``meshcore.call``)."""

    _core = call_core  # the request-path twin whose ClusterCounters the clusters' state uses
