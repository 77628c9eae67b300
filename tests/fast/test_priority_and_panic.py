"""Priority loads, degraded spill, panic and total panic: Envoy's own vectors.

Expected numbers come from Envoy's sources and docs, as digested in
shared/docs/envoy-semantics.md section 6 (load_balancer_impl.cc: recalculatePerPriorityState,
distributeLoad, recalculatePerPriorityPanic, recalculateLoadInTotalPanic) and the
"priority levels" architecture doc (overprovisioning factor 1.4).
"""

from __future__ import annotations

from collections import Counter

import pytest

from meshcore import Endpoint, HealthStatus

H, U, D, X = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.DEGRADED, HealthStatus.DRAINING


def hosts(spec: list[list[HealthStatus]]) -> list[Endpoint]:
    """spec[p] = health of each host in priority p."""
    out = []
    for p, statuses in enumerate(spec):
        for i, st in enumerate(statuses):
            out.append(Endpoint(f"10.{p}.0.{i + 1}", 80, health=st, priority=p))
    return out


@pytest.mark.parametrize(
    "spec, healthy, degraded",
    [
        # P0 5/10 healthy (health 70), P1 10/10 -> 70/30 (docs: priority levels example).
        ([[H] * 5 + [U] * 5, [H] * 10], [70, 30], [0, 0]),
        # All healthy in P0: everything to P0.
        ([[H] * 4, [H] * 4], [100, 0], [0, 0]),
        # 80% healthy -> 112 capped at 100.
        ([[H] * 8 + [U] * 2, [H] * 2], [100, 0], [0, 0]),
        # 70% healthy -> 98 (integer math), 2% spills to P1.
        ([[H] * 7 + [U] * 3, [H] * 10], [98, 2], [0, 0]),
        # health 10/20/10 with degraded 20/10/0: 16/28/14 healthy, 28/14/0 degraded, the 2%
        # rounding leftover goes to the first healthy priority (load_balancer_impl.cc comment).
        # (Panic disabled: with it, every priority here would be in panic.)
        (
            [[H] * 1 + [D] * 2 + [U] * 11, [H] * 2 + [D] * 1 + [U] * 11, [H] * 1 + [U] * 13],
            [16, 28, 14],
            [28, 14, 0],
        ),
        # P0 0/4 healthy + 2/4 degraded, P1 4/4 healthy: degraded P0 never used.
        ([[D, D, U, U], [H] * 4], [0, 100], [0, 0]),
        # DRAINING hosts are excluded from the denominator: 2 healthy of 2 counted.
        ([[H, H, X, X], [H] * 4], [100, 0], [0, 0]),
    ],
)
def test_priority_loads(LB, spec, healthy, degraded):
    lb = LB(hosts(spec), seed=1, healthy_panic_threshold=0 if len(spec) == 3 else 50)
    assert lb.priority_loads == (healthy, degraded)


def test_health_vectors_integer_math(LB):
    # 1 of 3 healthy -> 140*1//3 = 46; with P1 healthy: 46/54.
    lb = LB(hosts([[H, U, U], [H, H]]), seed=1)
    assert lb.priority_loads[0] == [46, 54]
    # 5 of 7 healthy -> 100.
    lb = LB(hosts([[H] * 5 + [U] * 2, [H]]), seed=1)
    assert lb.priority_loads[0] == [100, 0]


def test_overprovisioning_factor(LB):
    # OPF 100: 5/10 healthy -> 50/50.
    lb = LB(hosts([[H] * 5 + [U] * 5, [H] * 10]), seed=1, overprovisioning_factor=100)
    assert lb.priority_loads[0] == [50, 50]


def test_partial_panic_uses_all_hosts_of_that_priority(LB):
    # P0 3/10 healthy (42), P1 2/10 (28): NTA 70 -> 60/40; both below 50% -> both in panic,
    # so total panic: loads by host counts, 50/50, and all hosts (unhealthy too) are used.
    lb = LB(hosts([[H] * 3 + [U] * 7, [H] * 2 + [U] * 8]), seed=7)
    assert lb.panic == [True, True]
    assert lb.priority_loads == ([50, 50], [0, 0])
    picked = Counter(lb.pick().address for _ in range(4000))
    assert len(picked) == 20  # every host, healthy or not


def test_one_priority_in_panic(LB):
    # P0 1/10 healthy (14), P1 10/10 (100): NTA 100 -> no panic at all (key rule).
    lb = LB(hosts([[H] + [U] * 9, [H] * 10]), seed=3)
    assert lb.panic == [False, False]
    assert lb.priority_loads[0] == [14, 86]
    # Only P0 with 1/10 healthy: NTA 14 < 100 and 10% < 50% -> panic, route to all 10 hosts.
    lb = LB(hosts([[H] + [U] * 9]), seed=3)
    assert lb.panic == [True]
    assert len({lb.pick().address for _ in range(2000)}) == 10


def test_total_panic_counts_excluded_hosts(LB):
    # P0: 1 draining + 2 unhealthy (3 hosts), P1: 1 unhealthy -> loads 75/25 by raw counts.
    lb = LB(hosts([[X, U, U], [U]]), seed=5)
    assert lb.panic == [True, True]
    assert lb.priority_loads == ([75, 25], [0, 0])
    # In panic, excluded (draining) hosts are routable too.
    assert "10.0.0.1" in {lb.pick().address for _ in range(2000)}


def test_panic_threshold_zero_disables_panic(LB):
    lb = LB(hosts([[H] + [U] * 9]), seed=3, healthy_panic_threshold=0)
    assert lb.panic == [False]
    assert {lb.pick().address for _ in range(500)} == {"10.0.0.1"}
    # Nothing available and panic disabled: no host at all.
    lb = LB(hosts([[U, U]]), seed=3, healthy_panic_threshold=0)
    assert lb.priority_loads == ([100], [0])
    assert lb.pick() is None


def test_degraded_used_when_healthy_runs_out(LB):
    # P0: 1 healthy, 4 degraded, 5 unhealthy: health 14, degraded 56 -> NTA 70,
    # healthy load 20, degraded 80 (scaled by 100/70).
    lb = LB(hosts([[H] + [D] * 4 + [U] * 5]), seed=11)
    assert lb.priority_loads == ([20], [80])
    c = Counter(lb.pick().address for _ in range(20000))
    assert c["10.0.0.1"] / 20000 == pytest.approx(0.20, abs=0.015)
    assert all(k in {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"} for k in c)


def test_empty_and_gaps(LB):
    assert LB([], seed=1).pick() is None
    # A priority gap is an empty host set (Envoy creates it); traffic spills past it.
    lb = LB([Endpoint("10.0.0.1", 80, priority=2)], seed=1)
    assert lb.priority_loads == ([0, 0, 100], [0, 0, 0])
    assert lb.pick().address == "10.0.0.1"


def test_weighted_priority_health(LB):
    # weighted_priority_health: P0 healthy weight 1 of total 4 -> 140*1//4 = 35.
    eps = [Endpoint("10.0.0.1", 80, weight=1), Endpoint("10.0.0.2", 80, weight=3, health=U),
           Endpoint("10.0.1.1", 80, priority=1)]
    assert LB(eps, seed=1, weighted_priority_health=True).priority_loads[0] == [35, 65]
    assert LB(eps, seed=1).priority_loads[0] == [70, 30]
