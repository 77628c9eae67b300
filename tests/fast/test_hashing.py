"""Ring hash and Maglev: table construction vectors, lookups, remapping, XXH64."""

from __future__ import annotations

import os

import pytest
import xxhash

from meshcore import ConfigError, Endpoint, HealthStatus


def eps(n, weights=None):
    return [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 8080, weight=(weights[i] if weights else 1))
            for i in range(n)]


def test_xxh64_matches_reference(lbmod):
    # Independent oracle: the xxhash package (the reference C implementation).
    for n in list(range(0, 70)) + [100, 1000]:
        data = os.urandom(n)
        for seed in (0, 1, 2**63 + 12345):
            assert lbmod.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)
    assert lbmod.xxh64("10.0.0.1:80_0") == xxhash.xxh64_intdigest(b"10.0.0.1:80_0")


def test_ring_sizes_match_envoy(LB):
    # ring_hash_lb.cc: 3 equal hosts, min ring 1024 -> scale = ceil(1024/3)*3 = 1026,
    # 342 entries each; weights 1:2 -> 342 and 684 (envoy-semantics.md §4.2).
    lb = LB(eps(3), policy="RING_HASH", seed=1)
    assert lb.hash_table_stats() == [{"size": 1026, "min_entries_per_host": 342,
                                      "max_entries_per_host": 342, "hosts": 3}]
    lb = LB(eps(2, [1, 2]), policy="RING_HASH", seed=1)
    st = lb.hash_table_stats()[0]
    assert (st["min_entries_per_host"], st["max_entries_per_host"]) == (342, 684)
    lb = LB(eps(4), policy="RING_HASH", seed=1, minimum_ring_size=10, maximum_ring_size=12)
    assert lb.hash_table_stats()[0]["size"] == 12  # scale capped at the maximum


def test_maglev_weights_match_envoy_docs(LB):
    # Envoy docs (maglev): weights 1:2 give 21846 and 43691 of the 65537 entries.
    lb = LB(eps(2, [1, 2]), policy="MAGLEV", seed=1)
    st = lb.hash_table_stats()[0]
    assert (st["size"], st["min_entries_per_host"], st["max_entries_per_host"]) == (65537, 21846, 43691)


def test_ring_lookup_is_lower_bound_with_wrap(LB, lbmod):
    hosts = eps(5)
    lb = LB(hosts, policy="RING_HASH", seed=1, minimum_ring_size=5, maximum_ring_size=5)
    ring = sorted((xxhash.xxh64_intdigest(f"{h.key}_0".encode()), h.key) for h in hosts)
    for h, key in ring:
        assert lb.pick(hash=h).key == key  # exact hit
        assert lb.pick(hash=h - 1).key == key  # just below -> this entry
    assert lb.pick(hash=ring[-1][0] + 1).key == ring[0][1]  # past the end wraps to entry 0
    assert lb.pick(hash=0).key == ring[0][1]


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_consistency_and_minimal_remapping(LB, policy):
    n = 50
    hosts = eps(n)
    lb = LB(hosts, policy=policy, seed=1)
    keys = [xxhash.xxh64_intdigest(f"user-{i}".encode()) for i in range(20000)]
    before = [lb.pick(hash=k).key for k in keys]
    assert before == [lb.pick(hash=k).key for k in keys]  # sticky
    removed = hosts[17]
    lb.update([h for h in hosts if h is not removed])
    after = [lb.pick(hash=k).key for k in keys]
    moved = sum(1 for a, b in zip(before, after) if a != b)
    owned = sum(1 for a in before if a == removed.key)
    # Every key of the removed host moves; others mostly stay: ~1/N overall. Maglev moves
    # up to about twice the optimum (Envoy docs), ring hash close to it.
    assert all(b != removed.key for b in after)
    assert owned <= moved <= owned + (len(keys) // n) * (1.5 if policy == "MAGLEV" else 0.2)


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_hash_tables_exclude_degraded_and_unhealthy(LB, policy):
    hosts = [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80, health=HealthStatus.DEGRADED),
             Endpoint("10.0.0.3", 80, health=HealthStatus.UNHEALTHY), Endpoint("10.0.0.4", 80),
             Endpoint("10.0.0.5", 80)]
    lb = LB(hosts, policy=policy, seed=1)
    seen = {lb.pick(hash=xxhash.xxh64_intdigest(str(i).encode())).address for i in range(3000)}
    assert seen == {"10.0.0.1", "10.0.0.4", "10.0.0.5"}


def test_hash_key_metadata_and_hostname(LB):
    a = Endpoint("10.0.0.1", 80, hash_key="alpha", hostname="a.example")
    b = Endpoint("10.0.0.2", 80, hostname="b.example")
    lb = LB([a, b], policy="RING_HASH", seed=1, minimum_ring_size=2, maximum_ring_size=2)
    h_alpha = xxhash.xxh64_intdigest(b"alpha_0")
    assert lb.pick(hash=h_alpha).address == "10.0.0.1"
    lb = LB([a, b], policy="RING_HASH", seed=1, minimum_ring_size=2, maximum_ring_size=2,
            use_hostname_for_hashing=True)
    assert lb.pick(hash=xxhash.xxh64_intdigest(b"b.example_0")).address == "10.0.0.2"


def test_no_hash_means_random(LB):
    lb = LB(eps(4), policy="MAGLEV", seed=1)
    assert len({lb.pick().key for _ in range(400)}) == 4


def test_invalid_hash_options(LB):
    with pytest.raises(ConfigError, match="table_size"):
        LB(eps(2), policy="MAGLEV", table_size=65536)
    with pytest.raises(ConfigError, match="minimum_ring_size"):
        LB(eps(2), policy="RING_HASH", minimum_ring_size=100, maximum_ring_size=10)
    with pytest.raises(ConfigError, match="4294967295"):
        LB([Endpoint("10.0.0.1", 80, weight=2**32 - 1), Endpoint("10.0.0.2", 80, weight=2)],
           policy="RING_HASH")
    with pytest.raises(ConfigError, match="policy"):
        LB(eps(2), policy="CLUSTER_PROVIDED")
    with pytest.raises(ConfigError, match="choice_count"):
        LB(eps(2), policy="LEAST_REQUEST", choice_count=1)
