"""Dependency tracking and make-before-break publishing (gRPC A74, Envoy's warming).

For every target the publisher walks Listener -> RouteConfiguration -> Clusters (aggregate
clusters expanded, depth <= 16) -> ClusterLoadAssignments, subscribes to what the walk needs
and unsubscribes from what nothing needs any more. A target's new :class:`TargetConfig` is
published only when its whole chain is known; until then the previous one keeps serving.
Problems of one cluster (does not exist, rejected with no last good value) stay local to
that cluster; a missing listener or route configuration fails the target.

Publishing replaces ``published`` (a dict target -> TargetConfig) with a new dict: one
reference store, so a reader sees the old or the new configuration, never a mix.

The EDS fast path: an assignment change for clusters that are already published is applied
with ``LoadBalancer.update`` on their balancers (each swaps its own table and keeps the
in-flight counts of surviving endpoints) with no walk over the rest of the mesh.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .._fast import RouteTable
from .._route_model import RouteConfigSpec
from ..errors import ConfigError
from .cache import DOES_NOT_EXIST, NACKED
from .model import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS, ClusterSpec, EndpointsSpec
from .snapshot import AggregateBalancer, ClusterRuntime, TargetConfig, build_balancer, lb_arguments

__all__ = ["ConfigPublisher", "referenced_clusters"]

log = logging.getLogger(__name__)

_MAX_AGGREGATE_DEPTH = 16
Key = Tuple[str, str]


def referenced_clusters(spec: RouteConfigSpec) -> List[str]:
    """Cluster names a route configuration can send to (``cluster_header`` ones are dynamic)."""
    seen: Dict[str, None] = {}
    for vh in spec.virtual_hosts:
        for r in vh.routes:
            if r.action == "cluster" and r.cluster:
                seen[r.cluster] = None
            elif r.action == "weighted":
                for w in r.weighted:
                    if w.name:
                        seen[w.name] = None
    return list(seen)


class _Walk:
    """The state of one rebuild: what is wanted, the runtimes built, what is still missing."""

    def __init__(self) -> None:
        self.wanted: Dict[str, Set[str]] = {t: set() for t in TYPE_URLS}
        self.runtimes: Dict[str, Optional[ClusterRuntime]] = {}
        self.missing: List[str] = []
        self.tables: Set[str] = set()  # the route-table cache keys this walk used


class ConfigPublisher:
    """Builds and publishes :class:`TargetConfig` objects from a resource source.

    The source is an :class:`~meshcore.xds.client.XdsClient` or a file source: anything with
    ``watch``, ``unwatch`` and ``entry``. Call :meth:`on_update` with the changed keys.
    """

    def __init__(self, source: Any, listener_name: Callable[[str], str], seed: Optional[int] = None,
                 authority_of: Callable[[str], str] = lambda target: target, *, shape: str = "grpc",
                 namespace: str = "", domain: str = "cluster.local") -> None:
        """``shape`` ``"envoy"``: the source delivers every Listener and Cluster (wildcard) as a
        sidecar gets them, and targets resolve through the sidecar's outbound listeners
        (:mod:`meshcore.xds.envoy_shape`; ``namespace``/``domain`` expand short host names)."""
        self.source = source
        self.shape = shape
        self._namespace = namespace
        self._domain = domain
        self._lds_index: Any = None  # envoy shape: (listener entries signature, ListenerIndex)
        #: envoy shape: id(HcmSpec) -> (HcmSpec, ListenerSpec): one ListenerSpec per decoded HCM, so
        #: a rebuild that changes nothing republishes nothing
        self._lspecs: Dict[int, Tuple[Any, Any]] = {}
        self._wrappers: Dict[Tuple[int, bool, bool], Tuple[Any, Any]] = {}  # see _normalizing
        self._listener_name = listener_name
        self._authority_of = authority_of
        self._seed = seed
        self._cond = threading.Condition(threading.RLock())
        self._targets: Dict[str, str] = {}  # target -> listener resource name
        #: target -> the configuration picks use (replaced as a whole on every publication)
        self.published: Dict[str, TargetConfig] = {}
        self._runtimes: Dict[str, ClusterRuntime] = {}  # cluster name -> runtime in use
        self._tables: Dict[str, Tuple[RouteConfigSpec, RouteTable, List[str]]] = {}
        self._eds_users: Dict[str, List[ClusterRuntime]] = {}  # EDS name -> published leaf runtimes
        self._parents: Dict[str, List[ClusterRuntime]] = {}  # leaf name -> aggregate runtimes using it
        self._wanted: Dict[str, Set[str]] = {t: set() for t in TYPE_URLS}
        self.version = 0  # publication counter
        self.missing: Dict[str, List[str]] = {}  # target -> what its pending configuration waits for
        self.last_publish: Optional[float] = None
        self.eds_fast_updates = 0
        self.rebuilds = 0
        #: called (under the publisher's lock, after publishing) with the names of clusters that
        #: left every configuration, published or pending: the mesh drops their state and pools
        self.on_clusters_removed: Optional[Callable[[Set[str]], None]] = None
        self._closed = False

    # -- targets ---------------------------------------------------------------------------------

    def add_target(self, target: str) -> None:
        with self._cond:
            if target in self._targets or self._closed:
                return
            self._targets[target] = self._listener_name(target)
            self._rebuild()

    def close(self) -> None:
        """Publish nothing from now on (the mesh was closed): readers find no configuration."""
        with self._cond:
            self._closed = True
            self.published = {}
            self._cond.notify_all()

    def targets(self) -> Dict[str, str]:
        with self._cond:
            return dict(self._targets)

    def problems(self) -> Dict[str, List[str]]:
        """Per target, why it or a cluster it routes to is unusable: a rejected or missing
        listener / route configuration / cluster / assignment (``"Cluster 'a': rejected: field
        connect_timeout: ..."``), or what a pending configuration waits for. Targets without a
        problem are left out. (A rejected update of a resource that keeps its last good value is
        no problem here; ``config_dump`` shows it as NACKED.)"""
        with self._cond:
            out: Dict[str, List[str]] = {}
            for target in self._targets:
                reasons: List[str] = []
                cfg = self.published.get(target)
                if cfg is not None and cfg.error and cfg.tcp_cluster is None:  # a TCP service is fine
                    reasons.append(cfg.error)
                stack = list(cfg.clusters.values()) if cfg is not None else []
                while stack:
                    rt = stack.pop()
                    if rt.spec is not None and rt.spec.kind == "ORIGINAL_DST":
                        continue  # a sidecar's passthrough: expected, used by no mesh route
                    if rt.error and rt.error not in reasons:
                        reasons.append(rt.error)
                    stack.extend(rt.children)
                missing = self.missing.get(target)
                if missing:
                    reasons.append("waiting for " + ", ".join(missing))
                if reasons:
                    out[target] = reasons
            return out

    def wait_for(self, target: str, timeout: float) -> Optional[TargetConfig]:
        """Block until ``target`` has a published configuration, usable or failed (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                cfg = self.published.get(target)
                if cfg is not None:
                    return cfg
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return cfg
                self._cond.wait(remaining)

    # -- updates ---------------------------------------------------------------------------------

    def on_update(self, changed: Set[Key]) -> None:
        with self._cond:
            if self._closed:
                return
            if changed and all(t == ENDPOINT for t, _ in changed) and self._eds_fast_path(changed):
                self.eds_fast_updates += 1
                self._cond.notify_all()
                return
            self._rebuild()

    def _eds_fast_path(self, changed: Set[Key]) -> bool:
        plans: List[Tuple[ClusterRuntime, EndpointsSpec]] = []
        for _, name in changed:
            users = self._eds_users.get(name)
            if not users:
                return False  # a cluster waits for this assignment: walk
            eds = self._eds_spec(name)
            if eds is None:
                return False
            entry = self.source.entry(ENDPOINT, name)
            if not entry.has_value or any(rt.error is not None for rt in users):
                return False  # rejected, removed or recovered: walk (records or clears the reason)
            for rt in users:
                if rt.eds_spec is eds:
                    continue
                _, options = lb_arguments(rt.spec, eds)  # type: ignore[arg-type]
                if options != rt.options:
                    return False  # e.g. a new overprovisioning factor: rebuild that balancer
                plans.append((rt, eds))
        aggregates: Dict[int, AggregateBalancer] = {}
        for rt, eds in plans:
            rt.lb.update(eds.endpoints)
            rt.eds_spec = eds
            for parent in self._parents.get(rt.name, ()):
                aggregates[id(parent.lb)] = parent.lb
        for agg in aggregates.values():
            agg.refresh()
        return True

    def _eds_spec(self, name: str) -> Optional[EndpointsSpec]:
        e = self.source.entry(ENDPOINT, name)
        if e is None:
            return None
        if e.has_value:
            return e.spec
        if e.status in (DOES_NOT_EXIST, NACKED):
            return EndpointsSpec(name, ())
        return None

    # -- the walk --------------------------------------------------------------------------------

    def _need(self, walk: _Walk, type_url: str, name: str) -> Any:
        """Record that the walk needs a resource; its entry (``None`` until subscribed).
        Subscriptions are sent in one batch after the walk, one request per type."""
        walk.wanted[type_url].add(name)
        return self.source.entry(type_url, name)

    def _rebuild(self) -> None:
        if self._closed:
            return
        self.rebuilds += 1
        walk = _Walk()
        published: Dict[str, TargetConfig] = {}
        changed = False
        for target, lname in self._targets.items():
            walk.missing = []
            cfg = self._build_target(walk, target, lname)
            old = self.published.get(target)
            if cfg is None:
                self.missing[target] = walk.missing
                if old is not None:
                    published[target] = old
                    self._keep(walk, old)
                continue
            self.missing.pop(target, None)
            if old is not None and _same(old, cfg):
                published[target] = old
                continue
            self.version += 1
            cfg.version = self.version
            published[target] = cfg
            changed = True
        # Runtimes stay current (EDS updates, reuse by the next walk): everything published,
        # new or kept, and everything the walk built for configurations still pending.
        published_runtimes: Dict[str, ClusterRuntime] = {}
        for cfg in published.values():
            for rt in cfg.clusters.values():
                _collect(rt, published_runtimes)
        built = {name: rt for name, rt in walk.runtimes.items() if rt is not None}
        if self._tables.keys() - walk.tables:  # route configurations no target uses any more
            self._tables = {k: v for k, v in self._tables.items() if k in walk.tables}
        self._index(list(published_runtimes.values()) + list(built.values()))
        gone = self._runtimes.keys() - published_runtimes.keys() - built.keys()
        self._runtimes = {**published_runtimes, **built}
        if changed or published.keys() != self.published.keys():
            self.published = published
            self.last_publish = time.time()
            log.debug("published configuration %d (%d targets)", self.version, len(published))
        if gone and self.on_clusters_removed is not None:
            self.on_clusters_removed(gone)
        if self.shape == "envoy":  # LDS and CDS are wildcard subscriptions: no named watches
            walk.wanted[LISTENER] = set()
            walk.wanted[CLUSTER] = set()
        add = {t: sorted(walk.wanted[t] - self._wanted[t]) for t in TYPE_URLS}
        remove = {t: sorted(self._wanted[t] - walk.wanted[t]) for t in TYPE_URLS}
        self._wanted = walk.wanted
        if any(add.values()) or any(remove.values()):
            self.source.update_watches(add, remove)
            if any(add.values()):
                # entries now exist for the new names (the file source has them all): walk again
                self._cond.notify_all()
                return self._rebuild() if self._has_new_data(add) else None
        self._cond.notify_all()

    def _has_new_data(self, add: Dict[str, List[str]]) -> bool:
        """Whether a just-subscribed name already has data or a final state (cached, file source)."""
        for t, names in add.items():
            for n in names:
                e = self.source.entry(t, n)
                if e is not None and (e.has_value or e.status in (DOES_NOT_EXIST, NACKED)):
                    return True
        return False

    def _keep(self, walk: _Walk, cfg: TargetConfig) -> None:
        """Keep watching what a still-published configuration uses."""
        if cfg.listener is not None:
            walk.wanted[LISTENER].add(self._targets[cfg.target])
            if cfg.listener.route_config_name:
                walk.wanted[ROUTE].add(cfg.listener.route_config_name)
        stack = list(cfg.clusters.values())
        while stack:
            rt = stack.pop()
            walk.wanted[CLUSTER].add(rt.name)
            if rt.spec is not None and rt.spec.kind == "EDS":
                walk.wanted[ENDPOINT].add(rt.spec.eds_service_name)
            stack.extend(rt.children)

    def _index(self, runtimes: List[ClusterRuntime]) -> None:
        eds_users: Dict[str, List[ClusterRuntime]] = {}
        parents: Dict[str, List[ClusterRuntime]] = {}
        seen: Set[int] = set()
        for rt in runtimes:
            if id(rt) in seen:
                continue
            seen.add(id(rt))
            if rt.spec is not None and rt.spec.kind == "EDS" and rt.lb is not None:
                eds_users.setdefault(rt.spec.eds_service_name, []).append(rt)
            for child in rt.children:
                parents.setdefault(child.name, []).append(rt)
        self._eds_users = eds_users
        self._parents = parents

    def _listener_index(self) -> Optional[Any]:
        """Envoy shape: every listener delivered, indexed (``None`` until LDS answered once)."""
        from .envoy_shape import ListenerIndex

        src = self.source
        if not src.wildcard_ready(LISTENER):
            return None
        entries = [src.entry(LISTENER, n) for n in src.names(LISTENER)]
        specs = {e.name: e.spec for e in entries if e is not None and e.has_value}
        signature = tuple(id(v) for v in specs.values())
        if self._lds_index is None or self._lds_index[0] != signature:
            self._lds_index = (signature, ListenerIndex(specs))
        return self._lds_index[1]

    def _build_envoy_target(self, walk: _Walk, target: str) -> Optional[TargetConfig]:
        from .envoy_shape import check_target, listener_spec_of, unsupported_text
        from .sidecar_listener import resolve_outbound

        index = self._listener_index()
        if index is None:
            walk.missing.append("the first LDS response (wildcard)")
            return None
        try:
            host, port = check_target(target)
        except ConfigError as e:
            return TargetConfig(target, None, None, {}, 0, str(e))
        vip = index.vip_of(host, port, self._namespace, self._domain)
        res = resolve_outbound(index.listeners, host, port, vip=vip, protocol="http")
        if res.unsupported:
            log.warning("%s", unsupported_text(target, res))
            return TargetConfig(target, None, None, {}, 0, unsupported_text(target, res), resolution=res)
        if res.kind == "tcp":
            clusters: Dict[str, ClusterRuntime] = {}
            for cname in res.tcp.clusters:
                rt = self._cluster(walk, cname, 0)
                if rt is None:
                    return None
                clusters[cname] = rt
            first = res.tcp.clusters[0] if res.tcp.clusters else None
            return TargetConfig(target, None, None, clusters, 0,
                                f"{target} is a TCP service (tcp_proxy to {first}): it has no HTTP routes; connect "
                                "with Mesh.tcp_connect / Mesh.tcp_endpoint", authority=self._authority_of(target),
                                tcp_cluster=first, resolution=res)
        if res.kind != "http":
            what = {"passthrough": "the sidecar would pass it through to the original destination unchanged",
                    "blackhole": "the sidecar would drop it (outbound traffic policy REGISTRY_ONLY)"}.get(res.kind, "")
            return TargetConfig(target, None, None, {}, 0,
                                f"{target}: no mesh route: {res.reason}" + (f"; {what}" if what else ""),
                                resolution=res)
        cached = self._lspecs.get(id(res.hcm))
        if cached is None or cached[0] is not res.hcm:
            if len(self._lspecs) > 4096:
                self._lspecs.clear()
            cached = self._lspecs[id(res.hcm)] = (res.hcm, listener_spec_of(res))
        return self._http_target(walk, target, cached[1], res)

    def _build_target(self, walk: _Walk, target: str, lname: str) -> Optional[TargetConfig]:
        if self.shape == "envoy":
            return self._build_envoy_target(walk, target)
        le = self._need(walk, LISTENER, lname)
        if le is None or not le.has_value:
            why = _final_problem(le)
            if why is not None:
                return TargetConfig(target, None, None, {}, 0, f"Listener {lname!r}: {why}")
            walk.missing.append(f"Listener {lname!r}")
            return None
        return self._http_target(walk, target, le.spec)

    def _http_target(self, walk: _Walk, target: str, lspec: Any, resolution: Any = None) -> Optional[TargetConfig]:
        lname = lspec.name
        if lspec.inline_route_config is not None:
            # per route configuration object: two chains of one listener with inline routes
            # keep a table each (keyed by the name alone they rebuilt each other's every time)
            rspec = lspec.inline_route_config
            rkey = f"\0inline:{lname}:{id(rspec)}"
        else:
            rname = lspec.route_config_name or ""
            re = self._need(walk, ROUTE, rname)
            if re is None or not re.has_value:
                why = _final_problem(re)
                if why is not None:
                    return TargetConfig(target, lspec, None, {}, 0, f"RouteConfiguration {rname!r}: {why}")
                walk.missing.append(f"RouteConfiguration {rname!r}")
                return None
            rspec, rkey = re.spec, rname
        walk.tables.add(rkey)
        cached = self._tables.get(rkey)
        if cached is None or cached[0] is not rspec:
            cached = (rspec, RouteTable(rspec), referenced_clusters(rspec))
            self._tables[rkey] = cached
        _, table, names = cached
        hcm = getattr(resolution, "hcm", None)
        if hcm is not None and (hcm.normalize_path or hcm.merge_slashes):
            table = self._normalizing(table, hcm.normalize_path, hcm.merge_slashes)
        clusters: Dict[str, ClusterRuntime] = {}
        complete = True
        for cname in names:
            rt = self._cluster(walk, cname, 0)
            if rt is None:
                complete = False
            else:
                clusters[cname] = rt
        if not complete:
            return None
        return TargetConfig(target, lspec, table, clusters, 0, authority=self._authority_of(target),
                            resolution=resolution)

    def _normalizing(self, table: Any, canonical: bool, merge: bool) -> Any:
        """The route table behind the HCM's path normalization (one wrapper per table and flags,
        so an unchanged configuration is not republished)."""
        from .envoy_shape import NormalizingRouteTable

        key = (id(table), canonical, merge)
        hit = self._wrappers.get(key)
        if hit is None or hit[0] is not table:
            if len(self._wrappers) > 1024:
                self._wrappers.clear()
            hit = self._wrappers[key] = (table, NormalizingRouteTable(table, canonical, merge))
        return hit[1]

    def _cluster(self, walk: _Walk, name: str, depth: int) -> Optional[ClusterRuntime]:
        if name in walk.runtimes:
            return walk.runtimes[name]
        walk.runtimes[name] = None  # in progress (a loop reads as incomplete, then as an error)
        rt = self._make_cluster(walk, name, depth)
        walk.runtimes[name] = rt
        return rt

    def _make_cluster(self, walk: _Walk, name: str, depth: int) -> Optional[ClusterRuntime]:
        ce = self._need(walk, CLUSTER, name)
        old = self._runtimes.get(name)
        if ce is None or not ce.has_value:
            why = _final_problem(ce)
            if ce is None and self.shape == "envoy" and self.source.wildcard_ready(CLUSTER):
                why = "does not exist"  # every cluster arrived with the wildcard: absent is gone
            if why is not None:
                why = f"Cluster {name!r}: {why}"
                if old is not None and old.spec is None and old.error == why:
                    return old
                return ClusterRuntime(name, None, error=why)
            walk.missing.append(f"Cluster {name!r}")
            return None
        spec: ClusterSpec = ce.spec
        if spec.kind == "AGGREGATE":
            return self._aggregate(walk, name, spec, old, depth)
        if spec.kind == "ORIGINAL_DST":
            return ClusterRuntime(name, spec, error=f"Cluster {name!r}: an original-destination cluster (the "
                                  "sidecar forwards to the address the application dialled): meshcore routes "
                                  "only to mesh endpoints")
        eds: Optional[EndpointsSpec] = None
        if spec.kind == "EDS":
            if not spec.eds_service_name:
                return ClusterRuntime(name, spec, error=f"Cluster {name!r}: no EDS service name")
            self._need(walk, ENDPOINT, spec.eds_service_name)
            eds = self._eds_spec(spec.eds_service_name)
            if eds is None:
                walk.missing.append(f"ClusterLoadAssignment {spec.eds_service_name!r}")
                return None
        rt = self._balanced_cluster(name, spec, eds, old)
        if spec.kind == "EDS" and rt.lb is not None:
            # no hosts because the assignment was rejected (or does not exist): say so on the
            # runtime, which keeps its (empty) balancer as Envoy keeps such a cluster
            ee = self.source.entry(ENDPOINT, spec.eds_service_name)
            why = _final_problem(ee) if ee is not None and not ee.has_value else None
            rt.error = f"Cluster {name!r}: ClusterLoadAssignment {spec.eds_service_name!r}: {why}" if why else None
        return rt

    def _balanced_cluster(self, name: str, spec: ClusterSpec, eds: Optional[EndpointsSpec],
                          old: Optional[ClusterRuntime]) -> ClusterRuntime:
        if old is not None and old.spec is spec and old.lb is not None and not old.children:
            if old.eds_spec is eds:
                return old
            _, options = lb_arguments(spec, eds)
            if options == old.options and eds is not None:
                old.lb.update(eds.endpoints)  # in place: keeps in-flight counts
                old.eds_spec = eds
                return old
        try:
            lb, options = build_balancer(spec, eds, self._seed)
        except Exception as e:  # invalid option combination (cluster x assignment)
            log.warning("cluster %r: %s", name, e)
            return ClusterRuntime(name, spec, eds_spec=eds, error=f"Cluster {name!r}: {e}")
        self._carry_ejections(old, lb)
        return ClusterRuntime(name, spec, lb, options, eds)

    @staticmethod
    def _carry_ejections(old: Optional[ClusterRuntime], lb: Any) -> None:
        if old is None or old.lb is None or isinstance(old.lb, AggregateBalancer):
            return
        for ep in lb.endpoints:
            if old.lb.is_ejected(ep):
                lb.set_ejected(ep, True)

    def _aggregate(self, walk: _Walk, name: str, spec: ClusterSpec, old: Optional[ClusterRuntime],
                   depth: int) -> Optional[ClusterRuntime]:
        if depth >= _MAX_AGGREGATE_DEPTH:
            return ClusterRuntime(name, spec, error=f"Cluster {name!r}: aggregate clusters nested too deep")
        leaves: List[ClusterRuntime] = []
        complete = True
        for child in spec.aggregate_clusters:
            if walk.runtimes.get(child, 0) is None and child in walk.runtimes:
                return ClusterRuntime(name, spec, error=f"Cluster {name!r}: aggregate cluster loop via {child!r}")
            rt = self._cluster(walk, child, depth + 1)
            if rt is None:
                complete = False
                continue
            for leaf in (rt.children if rt.children else (rt,)):
                if leaf.lb is not None and all(leaf is not l for l in leaves):
                    leaves.append(leaf)
        if not complete:
            return None
        children = tuple(leaves)
        if old is not None and old.spec is spec and old.children == children and old.lb is not None:
            old.lb.refresh()
            return old
        if not children:
            return ClusterRuntime(name, spec, error=f"Cluster {name!r}: no usable child cluster", children=())
        return ClusterRuntime(name, spec, AggregateBalancer(children, self._seed), children=children)


def _final_problem(entry: Any) -> Optional[str]:
    """Why a resource without a value will not get one by waiting (``None``: keep waiting)."""
    if entry is None:
        return None
    if entry.status == NACKED:
        error = entry.error or ""
        if error.startswith(entry.name + ": "):  # ConfigError text starts with the resource name
            error = error[len(entry.name) + 2:]
        return f"rejected: {error}"
    if entry.status == DOES_NOT_EXIST:
        return "does not exist"
    return None


def _collect(rt: ClusterRuntime, out: Dict[str, ClusterRuntime]) -> None:
    out[rt.name] = rt
    for child in rt.children:
        _collect(child, out)


def _same(old: TargetConfig, new: TargetConfig) -> bool:
    if old.error != new.error or old.listener is not new.listener or old.route_table is not new.route_table:
        return False
    if old.clusters.keys() != new.clusters.keys():
        return False
    return all(old.clusters[k] is v for k, v in new.clusters.items())

