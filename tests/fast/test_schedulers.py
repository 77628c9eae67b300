"""Round robin (EDF and plain), least request, random, locality weighting."""

from __future__ import annotations

from collections import Counter

import pytest

from meshcore import Endpoint, HealthStatus, Locality
from meshcore._fast.edf_py import EdfScheduler


def eps(weights, **kw):
    return [Endpoint(f"10.0.0.{i + 1}", 80, weight=w, **kw) for i, w in enumerate(weights)]


def test_edf_sequences_match_envoy_examples():
    # edf_scheduler.h semantics from an empty scheduler (picks=0): A=1, B=2 -> B A B B A B;
    # A=1, B=2, C=3 -> C B C A B C C B C C A B (shared/docs/envoy-semantics.md §1.1).
    names = "ABC"
    w = [1.0, 2.0, 3.0]
    s = EdfScheduler()
    for i in (0, 1):
        s.add(w[i], i)
    assert "".join(names[s.pick_and_add(w.__getitem__)] for _ in range(6)) == "BABBAB"
    s = EdfScheduler()
    for i in (0, 1, 2):
        s.add(w[i], i)
    # The 10th pick is C, not A: C's deadline sums to 1.9999999999999998 < 2.0 in doubles.
    assert "".join(names[s.pick_and_add(w.__getitem__)] for _ in range(12)) == "CBCABCCBCCAB"


def test_create_with_picks_equals_naive_prepicks():
    # createWithPicks(P) must behave like P picks from an empty scheduler (PR #31592),
    # here with weights that are not multiples of each other.
    w = [3.0, 7.0, 11.0, 2.0]
    for picks in (0, 1, 5, 23, 101, 1000):
        fast = EdfScheduler.create_with_picks([0, 1, 2, 3], w.__getitem__, picks)
        naive = EdfScheduler.create_with_picks([0, 1, 2, 3], w.__getitem__, 0)
        for _ in range(picks):
            naive.pick_and_add(w.__getitem__)
        a = [fast.pick_and_add(w.__getitem__) for _ in range(50)]
        b = [naive.pick_and_add(w.__getitem__) for _ in range(50)]
        assert Counter(a) == Counter(b)


@pytest.mark.parametrize("weights", [[1, 2, 3], [5, 1], [1, 1, 1, 7], [100, 1, 10, 1000]])
def test_wrr_exact_proportions_over_full_cycles(LB, weights):
    lb = LB(eps(weights), seed=42)
    cycles = 20
    total = sum(weights) * cycles
    picks = Counter(lb.pick().address for _ in range(total))
    for i, w in enumerate(weights):
        # EDF: over whole cycles every host gets its weight's share; the randomised start
        # (createWithPicks) can shift a pick at each end of the window.
        assert abs(picks[f"10.0.0.{i + 1}"] - w * cycles) <= 1


def test_plain_round_robin_cycles_in_order(LB):
    lb = LB(eps([1] * 5), seed=9)
    seq = [lb.pick().address for _ in range(15)]
    start = int(seq[0].rsplit(".", 1)[1]) - 1
    assert seq == [f"10.0.0.{(start + k) % 5 + 1}" for k in range(15)]


def test_round_robin_index_survives_updates(LB):
    # rr_indexes_ are kept per hosts source across updates (insert keeps the old index).
    lb = LB(eps([1] * 4), seed=9)
    first = [lb.pick().address for _ in range(3)]
    lb.update(eps([1] * 4))
    nxt = lb.pick().address
    start = int(first[0].rsplit(".", 1)[1]) - 1
    assert nxt == f"10.0.0.{(start + 3) % 4 + 1}"


def load(lb, target, n):
    """Leave exactly n in-flight requests on target (others are released at once)."""
    while lb.active_requests(target) < n:
        ep = lb.pick()
        if ep != target:
            lb.release(ep)


def test_least_request_p2c_favours_idle_hosts(LB):
    # Envoy's P2C vector: one busy host of 3, choice_count 2, sampling with replacement:
    # the busy host wins only when sampled twice: (1/3)^2 = 11.1%; the idle ones 44.45% each.
    hosts = eps([1, 1, 1])
    lb = LB(hosts, policy="LEAST_REQUEST", seed=3)
    busy = hosts[2]
    load(lb, busy, 10)
    lb_counts = Counter()
    n = 60000
    for _ in range(n):
        ep = lb.pick()
        lb_counts[ep.address] += 1
        if ep != busy:
            lb.release(ep)
        else:
            lb.release(ep)  # keep its load constant
    assert lb_counts["10.0.0.3"] / n == pytest.approx(1 / 9, abs=0.01)
    assert lb_counts["10.0.0.1"] / n == pytest.approx(4 / 9, abs=0.01)


def test_least_request_choice_count(LB):
    hosts = eps([1] * 4)
    lb = LB(hosts, policy="LEAST_REQUEST", seed=3, choice_count=4)
    busy = hosts[0]
    load(lb, busy, 5)
    n = 40000
    c = Counter()
    for _ in range(n):
        ep = lb.pick()
        c[ep.address] += 1
        lb.release(ep)
    # Busy host chosen only if all 4 samples are it: (1/4)^4.
    assert c["10.0.0.1"] / n == pytest.approx(1 / 256, abs=0.003)


def test_least_request_weighted_uses_active_bias(LB):
    # Unequal weights -> EDF with weight / (active + 1)^bias. With no load, shares follow
    # the weights; a loaded heavy host loses share.
    hosts = eps([1, 3])
    lb = LB(hosts, policy="LEAST_REQUEST", seed=5)
    c = Counter()
    for _ in range(8000):
        ep = lb.pick()
        c[ep.address] += 1
        lb.release(ep)
    assert c["10.0.0.2"] / 8000 == pytest.approx(0.75, abs=0.01)
    lb = LB(hosts, policy="LEAST_REQUEST", seed=5, active_request_bias=0.0)
    c = Counter(lb.pick().address for _ in range(8000))  # never released: bias 0 ignores load
    assert c["10.0.0.2"] / 8000 == pytest.approx(0.75, abs=0.01)


def test_release_accounting(LB):
    hosts = eps([1, 1])
    lb = LB(hosts, policy="LEAST_REQUEST", seed=1)
    picked = [lb.pick() for _ in range(10)]
    assert sum(lb.active_requests(h) for h in hosts) == 10
    for ep in picked:
        lb.release(ep)
    assert [lb.active_requests(h) for h in hosts] == [0, 0]
    lb.release(hosts[0])  # extra release never goes negative
    assert lb.active_requests(hosts[0]) == 0


def test_random_uniform(LB):
    lb = LB(eps([1, 5, 1, 1]), policy="RANDOM", seed=2)  # weights are ignored by RANDOM
    c = Counter(lb.pick().address for _ in range(40000))
    for v in c.values():
        assert v / 40000 == pytest.approx(0.25, abs=0.015)


def _localities(avail_x: int):
    """Docs example: locality X (weight 1) with `avail_x` of 10 hosts healthy, Y (weight 2)."""
    out = []
    for i in range(10):
        out.append(Endpoint(f"10.1.0.{i}", 80, locality=Locality("r", "x"), locality_weight=1,
                            health=HealthStatus.HEALTHY if i < avail_x else HealthStatus.UNHEALTHY))
    for i in range(10):
        out.append(Endpoint(f"10.2.0.{i}", 80, locality=Locality("r", "y"), locality_weight=2))
    return out


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
@pytest.mark.parametrize("avail_x, share", [(10, 1 / 3), (7, 1 / 3), (5, 0.7 / 2.7), (2, 0.28 / 2.28), (0, 0.0)])
def test_locality_weighted_effective_availability(LB, policy, avail_x, share):
    # Envoy docs (locality weighted LB): X's share 33% at 100% and 70% availability,
    # 26% at 50%, ~12% at 20%, 0 at 0: effective weight = w * min(1, 1.4 * healthy/total).
    lb = LB(_localities(avail_x), policy=policy, seed=4, locality_weighted=True)
    n = 27000
    c = sum(1 for _ in range(n) if lb.pick().address.startswith("10.1."))
    assert c / n == pytest.approx(share, abs=0.01)


def test_locality_weight_zero_never_picked(LB):
    hosts = [Endpoint("10.0.0.1", 80, locality=Locality("a"), locality_weight=0),
             Endpoint("10.0.0.2", 80, locality=Locality("b"), locality_weight=5)]
    lb = LB(hosts, seed=1, locality_weighted=True)
    assert {lb.pick().address for _ in range(200)} == {"10.0.0.2"}
    # Without locality weighting, localities do not matter.
    lb = LB(hosts, seed=1)
    assert {lb.pick().address for _ in range(200)} == {"10.0.0.1", "10.0.0.2"}


def test_ejection_marks_host_unhealthy_and_survives_updates(LB):
    hosts = eps([1, 1, 1])
    lb = LB(hosts, seed=1)
    lb.set_ejected(hosts[0])
    assert "10.0.0.1" not in {lb.pick().address for _ in range(60)}
    lb.update(hosts + [Endpoint("10.0.0.9", 80)])
    assert lb.is_ejected(hosts[0])
    assert "10.0.0.1" not in {lb.pick().address for _ in range(60)}
    lb.set_ejected(hosts[0], False)
    assert "10.0.0.1" in {lb.pick().address for _ in range(60)}
    lb.set_ejected(hosts[1])
    lb.update(hosts[2:])  # removed: its ejection is forgotten
    lb.update(hosts)
    assert not lb.is_ejected(hosts[1])
