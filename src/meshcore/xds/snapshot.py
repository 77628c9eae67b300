"""The immutable data-plane view the façade reads: per target, its listener, route table and clusters.

A :class:`TargetConfig` is built off the hot path once everything it references is known and
published by replacing one dict reference (make-before-break, gRPC A74). Clusters are
:class:`ClusterRuntime` holders shared between targets; an EDS change of a published cluster
calls ``LoadBalancer.update`` on its balancer (the balancer swaps its own table atomically and
keeps the in-flight counts of surviving endpoints), so it needs no new snapshot.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._fast import LoadBalancer, RouteTable
from .._fast import _hooks
from .._fast._plan import PriorityCounts, plan_priorities
from .._model import Endpoint, HealthStatus
from .model import ClusterSpec, EndpointsSpec, ListenerSpec

__all__ = ["ClusterRuntime", "AggregateBalancer", "TargetConfig", "lb_arguments"]


def lb_arguments(spec: ClusterSpec, eds: Optional[EndpointsSpec]) -> Tuple[Sequence[Endpoint], Dict[str, Any]]:
    """Endpoints and ``LoadBalancer`` options for a leaf cluster and its assignment."""
    options = dict(spec.lb_options)
    if eds is not None:
        options.update(eds.endpoint_options)
        return eds.endpoints, options
    options.update(spec.endpoint_options)
    return spec.endpoints or (), options


class ClusterRuntime:
    """A cluster as the data plane uses it: its spec and its balancer (or why it has none).

    ``options`` are the balancer options the balancer was built with; an EDS update with the
    same options is applied in place with ``LoadBalancer.update``.
    """

    __slots__ = ("name", "spec", "lb", "options", "eds_spec", "error", "children", "__weakref__")

    def __init__(self, name: str, spec: Optional[ClusterSpec], lb: Any = None,
                 options: Optional[Dict[str, Any]] = None, eds_spec: Optional[EndpointsSpec] = None,
                 error: Optional[str] = None, children: Tuple["ClusterRuntime", ...] = ()) -> None:
        self.name = name
        self.spec = spec
        self.lb = lb
        self.options = options or {}
        self.eds_spec = eds_spec
        self.error = error  # set when the cluster is unusable (does not exist, invalid, no data)
        self.children = children

    def __repr__(self) -> str:
        state = self.error or (self.lb.policy if self.lb is not None else "no balancer")
        return f"ClusterRuntime({self.name!r}, {state})"


_HEALTHY = frozenset({HealthStatus.HEALTHY, HealthStatus.UNKNOWN})


def _counts(lb: Any) -> List[PriorityCounts]:
    counts: List[PriorityCounts] = []
    for ep in lb.endpoints:
        while len(counts) <= ep.priority:
            counts.append(PriorityCounts())
        c = counts[ep.priority]
        c.hosts += 1
        w = ep.weight
        c.hosts_weight += w
        if ep.health == HealthStatus.DRAINING:
            c.excluded += 1
            c.excluded_weight += w
        elif lb.is_ejected(ep):
            continue
        elif ep.health in _HEALTHY:
            c.healthy += 1
            c.healthy_weight += w
        elif ep.health == HealthStatus.DEGRADED:
            c.degraded += 1
            c.degraded_weight += w
    return counts


class AggregateBalancer:
    """Envoy's aggregate cluster: the children's priority levels concatenated in order; a pick
    chooses a level by Envoy's priority load (health x overprovisioning, spill-over, panic)
    and delegates to that child's own balancer (``extensions/clusters/aggregate``)."""

    policy = "AGGREGATE"

    def __init__(self, children: Sequence[ClusterRuntime], seed: Optional[int] = None) -> None:
        self.children = tuple(c for c in children if c.lb is not None)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Recompute the level plan (after a child's endpoints changed)."""
        levels: List[Tuple[ClusterRuntime, PriorityCounts]] = []
        for child in self.children:
            for c in _counts(child.lb):
                levels.append((child, c))
        if levels:
            cfg = self.children[0].lb.config
            plan = plan_priorities([c for _, c in levels], cfg.overprovisioning_factor,
                                   cfg.healthy_panic_threshold, False)
            self._plan = (tuple(ch for ch, _ in levels), tuple(plan.healthy_load), tuple(plan.degraded_load))
        else:
            self._plan = ((), (), ())

    @property
    def endpoints(self) -> List[Endpoint]:
        return [ep for c in self.children for ep in c.lb.endpoints]

    def choose(self, hash: Optional[int] = None) -> Tuple[Optional[Endpoint], Any]:
        children, healthy, degraded = self._plan
        if not children:
            return None, None
        r = (hash if hash is not None else self._rng.getrandbits(32)) % 100
        acc = 0
        for i, load in enumerate(healthy):
            acc += load
            if r < acc:
                lb = children[i].lb
                return lb.pick(hash), lb
        for i, load in enumerate(degraded):
            acc += load
            if r < acc:
                lb = children[i].lb
                return lb.pick(hash), lb
        lb = children[0].lb
        return lb.pick(hash), lb


class TargetConfig:
    """Everything a pick for one target needs, complete and consistent (never half an update)."""

    __slots__ = ("target", "authority", "listener", "route_table", "clusters", "version", "error", "fault_filters",
                 "tcp_cluster", "resolution")

    def __init__(self, target: str, listener: Optional[ListenerSpec], route_table: Optional[RouteTable],
                 clusters: Mapping[str, ClusterRuntime], version: int, error: Optional[str] = None,
                 authority: Optional[str] = None, tcp_cluster: Optional[str] = None,
                 resolution: Any = None) -> None:
        self.target = target
        self.authority = authority or target  # what virtual hosts are matched against
        #: the listener's fault filters as (name, FaultSpec or None, disabled), in chain order
        self.fault_filters = tuple(
            (f.name, f.config, getattr(f, "disabled", False)) for f in (listener.http_filters if listener else ())
            if f.type_name.endswith("HTTPFault"))
        self.listener = listener
        self.route_table = route_table
        self.clusters = clusters
        self.version = version  # publication counter
        self.error = error  # set when the target cannot be served (listener or routes missing)
        #: Envoy shape: the ``tcp_proxy`` cluster of a TCP service (no route table then)
        self.tcp_cluster = tcp_cluster
        #: Envoy shape: how the target was resolved (``sidecar_listener.OutboundResolution``)
        self.resolution = resolution

    def __repr__(self) -> str:
        return f"TargetConfig({self.target!r}, v{self.version}, {len(self.clusters)} clusters, error={self.error!r})"


def build_balancer(spec: ClusterSpec, eds: Optional[EndpointsSpec], seed: Optional[int]) -> Tuple[Any, Dict[str, Any]]:
    endpoints, options = lb_arguments(spec, eds)
    return LoadBalancer(endpoints, policy=spec.policy, seed=seed, **options), options


# the request path (meshcore._fast.call_*) tells an aggregate cluster by this type; it imports
# nothing above it
_hooks.register(AggregateBalancer=AggregateBalancer)
