"""Per-priority load, panic and locality-weight arithmetic, exactly as Envoy does it.

Shared by both twins: it runs once per table build over a handful of priorities and
localities (never per pick), so it stays in Python. Sources (Envoy 1.40):
``source/extensions/load_balancing_policies/common/load_balancer_impl.cc``
(``recalculatePerPriorityState``, ``distributeLoad``, ``recalculatePerPriorityPanic``,
``isHostSetInPanic``, ``recalculateLoadInTotalPanic``) and
``source/common/upstream/upstream_impl.cc`` (``effectiveLocalityWeight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

__all__ = ["PriorityCounts", "PriorityPlan", "effective_locality_weight", "plan_priorities"]


@dataclass
class PriorityCounts:
    """Host counts (and weight sums) of one priority level."""

    hosts: int = 0
    healthy: int = 0
    degraded: int = 0
    excluded: int = 0
    hosts_weight: int = 0
    healthy_weight: int = 0
    degraded_weight: int = 0
    excluded_weight: int = 0


@dataclass
class PriorityPlan:
    """The outcome: loads in percent (sum 100) and per-priority panic flags."""

    healthy_load: List[int]
    degraded_load: List[int]
    panic: List[bool]
    health: List[int]
    degraded_health: List[int]


def _distribute(availability: Sequence[int], total_load: int, nta: int) -> Tuple[List[int], int, int]:
    loads = [0] * len(availability)
    first = -1
    for i, avail in enumerate(availability):
        if first < 0 and avail > 0:
            first = i
        loads[i] = min(total_load, avail * 100 // nta)
        total_load -= loads[i]
    return loads, first, total_load


def plan_priorities(
    counts: Sequence[PriorityCounts],
    overprovisioning_factor: int,
    panic_threshold: float,
    weighted_priority_health: bool,
) -> PriorityPlan:
    """Compute Envoy's healthy/degraded priority loads and panic flags."""
    n = len(counts)
    health = [0] * n
    degraded = [0] * n
    for p, c in enumerate(counts):
        host_count = c.hosts - c.excluded
        if host_count > 0:
            if weighted_priority_health:
                healthy_w, degraded_w = c.healthy_weight, c.degraded_weight
                total_w = c.hosts_weight - c.excluded_weight
            else:
                healthy_w, degraded_w, total_w = c.healthy, c.degraded, host_count
            if total_w > 0:
                health[p] = min(100, overprovisioning_factor * healthy_w // total_w)
                degraded[p] = min(100, overprovisioning_factor * degraded_w // total_w)
    nta = min(100, sum(health) + sum(degraded))
    healthy_load = [0] * n
    degraded_load = [0] * n
    if nta > 0:
        healthy_load, first_healthy, rest = _distribute(health, 100, nta)
        degraded_load, first_degraded, rest = _distribute(degraded, rest, nta)
        if rest:
            if first_healthy != -1:
                healthy_load[first_healthy] += rest
            else:
                degraded_load[first_degraded] += rest
    panic = [False] * n
    threshold = min(100.0, panic_threshold)
    if threshold == 0 and nta == 0:
        # Envoy's corner case: panic disabled and nothing available. Loads must sum to 100,
        # so P0 gets everything; no host is eligible, so every pick finds nothing.
        healthy_load = [0] * n
        degraded_load = [0] * n
        healthy_load[0] = 100
        return PriorityPlan(healthy_load, degraded_load, panic, health, degraded)
    total_panic = True
    for p, c in enumerate(counts):
        if nta == 100:
            panic[p] = False
        else:
            host_count = c.hosts - c.excluded
            healthy_pct = 100.0 * c.healthy / host_count if host_count else 0.0
            degraded_pct = 100.0 * c.degraded / host_count if host_count else 0.0
            panic[p] = healthy_pct + degraded_pct < threshold
        total_panic = total_panic and panic[p]
    if total_panic:
        # recalculateLoadInTotalPanic: loads by raw host counts (excluded hosts included).
        total_hosts = sum(c.hosts for c in counts)
        healthy_load = [0] * n
        degraded_load = [0] * n
        if total_hosts == 0:
            healthy_load[0] = 100
        else:
            remaining = 100
            first_non_empty = -1
            for p, c in enumerate(counts):
                if first_non_empty == -1 and c.hosts:
                    first_non_empty = p
                healthy_load[p] = 100 * c.hosts // total_hosts
                remaining -= healthy_load[p]
            healthy_load[first_non_empty] += remaining
    return PriorityPlan(healthy_load, degraded_load, panic, health, degraded)


def effective_locality_weight(
    locality_weight: int, eligible: int, hosts: int, excluded: int, overprovisioning_factor: int
) -> float:
    """``HostSetImpl::effectiveLocalityWeight``: weight scaled by capped availability."""
    host_count = hosts - excluded
    if host_count == 0:
        return 0.0
    ratio = 1.0 * eligible / host_count
    return locality_weight * min(1.0, (overprovisioning_factor / 100.0) * ratio)
