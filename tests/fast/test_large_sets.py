"""Large endpoint sets (issue 12): the compiled twin's compact host slots, identity release,
consecutive-host sources, ring bucket index and look-ahead prefetching change no pick.

The sets are above lb_c._lookahead_min_hosts (8192), so the look-ahead runs."""

from __future__ import annotations

import random

import pytest

from meshcore import Endpoint, HealthStatus, Locality
from meshcore._fast import lb_py

N = 20_000


def _endpoints(n: int, *, weighted: bool = False, unhealthy_every: int = 0, priorities: int = 1,
               zones: int = 0, offset: int = 0) -> list:
    out = []
    for i in range(offset, offset + n):
        health = HealthStatus.UNHEALTHY if unhealthy_every and i % unhealthy_every == 3 else HealthStatus.HEALTHY
        out.append(Endpoint(
            f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8000 + i % 5,
            weight=(1 + i % 4) if weighted else 1, health=health, priority=i % priorities,
            locality=Locality("r", f"z{i % zones}") if zones else None,
            locality_weight=(1 + i % zones) if zones else None,
        ))
    return out


CASES = [
    ("RANDOM", {}, {}),
    ("RANDOM", {"unhealthy_every": 7}, {}),
    ("RANDOM", {"priorities": 2, "unhealthy_every": 2}, {}),
    ("LEAST_REQUEST", {}, {}),
    ("LEAST_REQUEST", {"unhealthy_every": 5}, {"choice_count": 3}),
    ("LEAST_REQUEST", {}, {"choice_count": 6}),
    ("LEAST_REQUEST", {"weighted": True}, {}),
    ("LEAST_REQUEST", {"weighted": True}, {"active_request_bias": 0.0}),
    ("LEAST_REQUEST", {"zones": 3, "unhealthy_every": 4}, {"locality_weighted": True}),
    ("ROUND_ROBIN", {}, {}),
    ("ROUND_ROBIN", {"unhealthy_every": 3}, {}),
    ("ROUND_ROBIN", {"weighted": True}, {}),
    ("RING_HASH", {"unhealthy_every": 9}, {}),
    ("MAGLEV", {}, {}),
]


@pytest.mark.c_extension
@pytest.mark.parametrize("policy,shape,options", CASES)
def test_same_seed_same_picks_large(policy, shape, options):
    from meshcore._fast import lb_c

    eps = _endpoints(N, **shape)
    a = lb_c.LoadBalancer(eps, policy, seed=7, **options)
    b = lb_py.LoadBalancer(eps, policy, seed=7, **options)
    script = random.Random(3)
    held_a: list = []
    held_b: list = []
    for step in range(3000):
        if step == 1500:  # half the hosts survive, half are new objects for old keys
            second = eps[: N // 2] + _endpoints(N // 2, **shape, offset=N // 4)
            a.update(second)
            b.update(second)
        if step == 2200:
            a.set_ejected(a.endpoints[5])
            b.set_ejected(b.endpoints[5])
        h = script.getrandbits(64) if policy in ("RING_HASH", "MAGLEV") else None
        x, y = a.pick(hash=h), b.pick(hash=h)
        assert (x and x.key) == (y and y.key), f"step {step}"
        if x is not None:
            held_a.append(x)
            held_b.append(y)
        while held_a and script.random() < 0.55:
            k = script.randrange(len(held_a))
            a.release(held_a.pop(k))
            b.release(held_b.pop(k))
    for ep in a.endpoints:
        assert a.active_requests(ep) == b.active_requests(ep)


def test_release_by_equal_object_and_across_updates(LB):
    eps = _endpoints(N)
    lb = LB(eps, policy="LEAST_REQUEST", seed=1)
    picked = [lb.pick() for _ in range(50)]
    twin = Endpoint(picked[0].address, picked[0].port)  # equal key, another object
    assert twin is not picked[0]
    before = lb.active_requests(picked[0])
    assert lb.active_requests(twin) == before >= 1
    lb.release(twin)
    assert lb.active_requests(picked[0]) == before - 1
    lb.release(Endpoint("192.0.2.1", 1))  # unknown: ignored
    with pytest.raises(TypeError):
        lb.release(picked[0].key)
    # New objects for the same keys: counts carry over; releasing the old objects still counts.
    fresh = [Endpoint(e.address, e.port) for e in eps]
    lb.update(fresh)
    total = sum(lb.active_requests(e) for e in fresh)
    assert total == 49
    for e in picked[1:]:
        lb.release(e)
    assert sum(lb.active_requests(e) for e in fresh) == 0
    lb.release(picked[1])  # never below zero
    assert lb.active_requests(picked[1]) == 0


@pytest.mark.c_extension
@pytest.mark.parametrize("n,min_ring", [(1, 1), (3, 1), (300, 1024), (N, 1024), (5000, 70000)])
def test_ring_lookup_at_and_around_every_point(n, min_ring):
    from meshcore._fast import lb_c

    eps = _endpoints(n)
    a = lb_c.LoadBalancer(eps, "RING_HASH", seed=1, minimum_ring_size=min_ring)
    b = lb_py.LoadBalancer(eps, "RING_HASH", seed=1, minimum_ring_size=min_ring)
    points = b._table.ring_hashes[0]
    probes = {0, 1, 2**63, 2**64 - 1, 2**64 - 2}
    for x in points[:: max(1, len(points) // 4000)] + points[-3:]:
        probes.update(((x - 1) % 2**64, x, (x + 1) % 2**64))
    for shift in (40, 46, 50, 56):  # bucket boundaries for the bucket counts in use
        probes.update((k << shift) % 2**64 for k in range(0, 1 << (64 - shift), max(1, (1 << (64 - shift)) // 256)))
    for h in sorted(probes):
        x, y = a.pick(hash=h), b.pick(hash=h)
        assert x.key == y.key, h
        a.release(x)
        b.release(y)


@pytest.mark.c_extension
def test_random_look_ahead_across_shrinking_and_growing_updates():
    """The random look-ahead remembers hosts predicted on one table: after an update to a
    smaller (or larger) set, picks go on exactly as the pure twin's, and counts stay in step."""
    from meshcore._fast import lb_c

    sets = [_endpoints(N), _endpoints(9000, offset=3), _endpoints(3 * N // 2, offset=1), _endpoints(100)]
    a = lb_c.LoadBalancer(sets[0], "RANDOM", seed=11)
    b = lb_py.LoadBalancer(sets[0], "RANDOM", seed=11)
    for eps in sets[1:] + sets[:1]:
        for _ in range(257):  # not a multiple of the remembered predictions
            x, y = a.pick(), b.pick()
            assert x.key == y.key
            a.release(x)
            b.release(y)
        held = [(a.pick(), b.pick()) for _ in range(5)]  # in flight across the update
        assert [x.key for x, _ in held] == [y.key for _, y in held]
        a.update(eps)
        b.update(eps)
        for x, y in held:
            a.release(x)
            b.release(y)
    assert all(a.active_requests(ep) == 0 for ep in a.endpoints)
