"""Table building shared by both twins: de-duplication, priorities, localities, health.

This is Envoy's host-set partitioning (``PriorityStateManager::updateClusterPrioritySet``,
``HostSetImpl::partitionHosts`` in source/common/upstream/upstream_impl.cc) plus the
priority plan (``_plan``). It runs once per update, never per pick. The compiled twin
compiles this very file (``_build_c.pyx`` includes it), so both twins partition identically.
"""

from typing import Dict, List, Optional, Sequence, Tuple

from .._model import Endpoint, HealthStatus, Locality
from .._options import LbConfig
from ..errors import ConfigError
from ._plan import PriorityCounts, PriorityPlan, effective_locality_weight, plan_priorities

__all__ = ["Groups", "Layout", "layout", "normalized_weights", "partition"]

_UINT32_MAX = 0xFFFFFFFF
# Health classes (coarseHealth) and the excluded flag.
HEALTHY = 0
DEGRADED = 1
UNHEALTHY = 2
_CLASS_OF_STATUS = {
    HealthStatus.UNKNOWN: HEALTHY,
    HealthStatus.HEALTHY: HEALTHY,
    HealthStatus.UNHEALTHY: UNHEALTHY,
    HealthStatus.DRAINING: UNHEALTHY,  # EDS_STATUS_DRAINING: unhealthy and excluded
    HealthStatus.TIMEOUT: UNHEALTHY,
    HealthStatus.DEGRADED: DEGRADED,
}
_HASH_POLICIES = (3, 4)
_CLASS_BY_CODE = tuple(_CLASS_OF_STATUS[HealthStatus(code)] for code in range(6))


class Layout:
    """Endpoints after de-duplication with their static per-host attributes."""

    __slots__ = ("endpoints", "index", "weights", "priorities", "hash_keys", "source_base")

    def __init__(self) -> None:
        self.endpoints: List[Endpoint] = []
        self.index: Dict[str, int] = {}  # host key -> host index
        self.weights: List[int] = []
        self.priorities = 1
        self.hash_keys: List[str] = []
        self.source_base: List[int] = []


class Groups:
    """Health partitioning of a layout: host lists per priority and locality."""

    __slots__ = (
        "plan", "sources", "healthy_count", "degraded_count", "locality_weights",
        "loc_all", "loc_healthy", "loc_degraded", "loc_excluded", "all_hosts", "healthy_hosts",
    )

    def __init__(self) -> None:
        self.plan: Optional[PriorityPlan] = None
        self.sources: List[Tuple[Tuple[int, int, int], List[int]]] = []
        self.healthy_count: List[int] = []
        self.degraded_count: List[int] = []
        self.locality_weights: List[List[int]] = []
        self.loc_all: List[List[List[int]]] = []
        self.loc_healthy: List[List[List[int]]] = []
        self.loc_degraded: List[List[List[int]]] = []
        self.loc_excluded: List[List[int]] = []
        self.all_hosts: List[List[int]] = []
        self.healthy_hosts: List[List[int]] = []

    def locality_effective_weights(self, p: int, cfg: LbConfig) -> Tuple[List[float], List[float]]:
        """Effective locality weights for the healthy and degraded schedulers of ``p``."""
        opf = cfg.overprovisioning_factor
        healthy: List[float] = []
        degraded: List[float] = []
        for i, lw in enumerate(self.locality_weights[p]):
            total = len(self.loc_all[p][i])
            excluded = self.loc_excluded[p][i]
            healthy.append(effective_locality_weight(lw, len(self.loc_healthy[p][i]), total, excluded, opf))
            degraded.append(effective_locality_weight(lw, len(self.loc_degraded[p][i]), total, excluded, opf))
        return healthy, degraded


def layout(endpoints: Sequence[Endpoint], cfg: LbConfig) -> Layout:
    """De-duplicate (first wins, as Envoy's EDS does) and extract per-host attributes."""
    out = Layout()
    seen = out.index
    eps = out.endpoints
    weights = out.weights
    max_priority = 0
    for position, ep in enumerate(endpoints):
        if not isinstance(ep, Endpoint):
            raise TypeError(f"endpoints[{position}] is {type(ep).__name__}, not Endpoint")
        key = ep.key
        if key in seen:
            continue
        seen[key] = len(eps)
        eps.append(ep)
        weights.append(ep.weight)
        if ep.priority > max_priority:
            max_priority = ep.priority
    out.priorities = max_priority + 1
    if cfg.policy_code in _HASH_POLICIES:
        use_hostname = cfg.use_hostname_for_hashing
        keys = out.hash_keys
        for ep in eps:
            hk = ep.hash_key
            if not hk:
                hk = ep.hostname if use_hostname else ep.key
            keys.append(hk)
    return out


def partition(out: Layout, ejected: Sequence[bool], cfg: LbConfig) -> Groups:
    """Split hosts by priority, locality and health; compute the priority plan."""
    n_prio = out.priorities
    g = Groups()
    eps = out.endpoints
    weights = out.weights
    n = len(eps)
    all_hosts: List[List[int]] = [[] for _ in range(n_prio)]
    healthy_hosts: List[List[int]] = [[] for _ in range(n_prio)]
    degraded_hosts: List[List[int]] = [[] for _ in range(n_prio)]
    # Localities are first numbered in order of appearance (per priority), then renumbered
    # in LocalityLess order (region, zone, sub_zone); hosts keep their relative order.
    seen_loc: List[Dict[Locality, int]] = [{} for _ in range(n_prio)]
    seen_weight: List[List[int]] = [[] for _ in range(n_prio)]
    host_cls: List[int] = [0] * n
    host_loc: List[int] = [0] * n
    drained: List[bool] = [False] * n
    class_of = _CLASS_BY_CODE
    last_loc: object = None
    last_p = -1
    last_j = 0
    draining = HealthStatus.DRAINING
    for i in range(n):
        ep = eps[i]
        p = ep.priority
        cls = class_of[ep.health]
        if ejected[i]:
            cls = UNHEALTHY  # FAILED_OUTLIER_CHECK takes precedence over degraded
        host_cls[i] = cls
        all_hosts[p].append(i)
        if cls == HEALTHY:
            healthy_hosts[p].append(i)
        elif cls == DEGRADED:
            degraded_hosts[p].append(i)
        if ep.health == draining:
            drained[i] = True
        loc = ep.locality
        if loc is not last_loc or p != last_p:
            index = seen_loc[p]
            j = index.get(loc, -1)
            if j < 0:
                j = index[loc] = len(index)
                seen_weight[p].append(0)
            last_loc = loc
            last_p = p
            last_j = j
        else:
            j = last_j
        host_loc[i] = j
        lw = ep.locality_weight
        if lw is not None:
            seen_weight[p][j] = lw  # the last weight given for a locality wins, as in Envoy
    counts: List[PriorityCounts] = []
    for p in range(n_prio):
        c = PriorityCounts()
        c.hosts = len(all_hosts[p])
        c.healthy = len(healthy_hosts[p])
        c.degraded = len(degraded_hosts[p])
        for i in all_hosts[p]:
            if drained[i]:
                c.excluded += 1
                c.excluded_weight += weights[i]
        if cfg.weighted_priority_health or cfg.policy_code in _HASH_POLICIES:
            c.hosts_weight = sum([weights[i] for i in all_hosts[p]])
            c.healthy_weight = sum([weights[i] for i in healthy_hosts[p]])
            c.degraded_weight = sum([weights[i] for i in degraded_hosts[p]])
        counts.append(c)
    if cfg.policy_code in _HASH_POLICIES:
        for p in range(n_prio):
            if counts[p].hosts_weight > _UINT32_MAX:
                raise ConfigError(
                    "LoadBalancer", f"endpoints (priority {p}).weight",
                    "The sum of weights of all upstream hosts in a locality exceeds 4294967295",
                )
            if sum(seen_weight[p]) > _UINT32_MAX:
                raise ConfigError(
                    "LoadBalancer", f"endpoints (priority {p}).locality_weight",
                    "The sum of weights of all localities at the same priority exceeds 4294967295",
                )
    g.plan = plan_priorities(
        counts, cfg.overprovisioning_factor, cfg.healthy_panic_threshold, cfg.weighted_priority_health
    )
    renumber: List[List[int]] = []
    for p in range(n_prio):
        ordered = sorted(seen_loc[p].items())
        rank = [0] * len(ordered)
        for new_j, (loc, old_j) in enumerate(ordered):
            rank[old_j] = new_j
        renumber.append(rank)
        g.locality_weights.append([seen_weight[p][old_j] for _, old_j in ordered])
        n_loc = len(ordered)
        g.loc_all.append([[] for _ in range(n_loc)])
        g.loc_healthy.append([[] for _ in range(n_loc)])
        g.loc_degraded.append([[] for _ in range(n_loc)])
        g.loc_excluded.append([0] * n_loc)
    for p in range(n_prio):
        rank = renumber[p]
        loc_all = g.loc_all[p]
        loc_healthy = g.loc_healthy[p]
        loc_degraded = g.loc_degraded[p]
        loc_excluded = g.loc_excluded[p]
        for i in all_hosts[p]:
            j = rank[host_loc[i]]
            loc_all[j].append(i)
            cls = host_cls[i]
            if cls == HEALTHY:
                loc_healthy[j].append(i)
            elif cls == DEGRADED:
                loc_degraded[j].append(i)
            if drained[i]:
                loc_excluded[j] += 1
    # Hosts sources, per priority: All, Healthy, Degraded, then (LocalityHealthy i,
    # LocalityDegraded i) for each locality i.
    for p in range(n_prio):
        out.source_base.append(len(g.sources))
        g.sources.append(((p, 0, 0), all_hosts[p]))
        g.sources.append(((p, 1, 0), healthy_hosts[p]))
        g.sources.append(((p, 2, 0), degraded_hosts[p]))
        for j in range(len(g.locality_weights[p])):
            g.sources.append(((p, 3, j), g.loc_healthy[p][j]))
            g.sources.append(((p, 4, j), g.loc_degraded[p][j]))
        g.healthy_count.append(len(healthy_hosts[p]))
        g.degraded_count.append(len(degraded_hosts[p]))
    g.all_hosts = all_hosts
    g.healthy_hosts = healthy_hosts
    return g


def normalized_weights(g: Groups, out: Layout, p: int, cfg: LbConfig) -> List[Tuple[int, float]]:
    """``ThreadAwareLoadBalancerBase`` normalisation: (host, weight in [0, 1]) in host order."""
    in_panic = g.plan.panic[p]  # type: ignore[union-attr]
    weights = out.weights
    result: List[Tuple[int, float]] = []
    if not cfg.locality_weighted or not g.locality_weights[p]:
        _normalize_hosts(g.all_hosts[p] if in_panic else g.healthy_hosts[p], 1.0, weights, result)
        return result
    per_locality = g.loc_all[p] if in_panic else g.loc_healthy[p]
    locality_weights = g.locality_weights[p]
    total = 0
    for lw in locality_weights:
        total += lw
    if total == 0:
        return result
    for j, lw in enumerate(locality_weights):
        if lw != 0:
            _normalize_hosts(per_locality[j], float(lw) / total, weights, result)
    return result


def _normalize_hosts(
    hosts: Sequence[int], locality_weight: float, weights: Sequence[int], result: List[Tuple[int, float]]
) -> None:
    total = 0
    for h in hosts:
        total += weights[h]
    for h in hosts:
        result.append((h, weights[h] * locality_weight / total))
