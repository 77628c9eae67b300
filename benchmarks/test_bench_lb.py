"""Pick, pick+release, update and memory of the load balancers (c vs py, one run).

A pick is timed in batches of BATCH calls made from a Python loop, so the figure is the
per-call cost a caller pays (call overhead included); ns_per_pick is in extra_info.
Run: pytest benchmarks --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import tracemalloc

import pytest

from conftest import endpoints

BATCH = 1000
SIZES = [10, 1000, 100_000]
if os.environ.get("MESHCORE_BENCH_QUICK"):
    SIZES = [10, 1000]


def _pick_batch(pick, hashes):
    if hashes is None:
        for _ in range(BATCH):
            pick()
    else:
        for h in hashes:
            pick(hash=h)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "ROUND_ROBIN_WEIGHTED", "LEAST_REQUEST", "LEAST_REQUEST_WEIGHTED", "RANDOM",
                                    "RING_HASH", "MAGLEV"])
def test_pick(benchmark, LB, policy, n):
    weighted = policy.endswith("_WEIGHTED")
    name = policy.replace("_WEIGHTED", "")
    lb = LB(endpoints(n, weighted), policy=name, seed=1)
    hashes = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(BATCH)] if name in ("RING_HASH", "MAGLEV") else None
    benchmark.group = f"pick {policy} n={n}"
    benchmark.extra_info["per"] = BATCH
    benchmark.pedantic(_pick_batch, args=(lb.pick, hashes), rounds=30 if n < 100_000 else 10,
                       iterations=1, warmup_rounds=1)


PR_SIZES = [100, 10_000, 100_000]
if os.environ.get("MESHCORE_BENCH_QUICK"):
    PR_SIZES = [100, 10_000]


@pytest.mark.parametrize("n", PR_SIZES)
@pytest.mark.parametrize("policy", ["LEAST_REQUEST", "LEAST_REQUEST_WEIGHTED", "RANDOM", "ROUND_ROBIN",
                                    "RING_HASH", "MAGLEV"])
def test_pick_release(benchmark, LB, policy, n):
    """pick then release, the request path's pair: per pair, Python call overhead included.

    Hashes (ring hash, Maglev) are distinct, so every pick lands on a random host: at 100k
    endpoints nearly every pick then touches an Endpoint object not in cache."""
    weighted = policy.endswith("_WEIGHTED")
    name = policy.replace("_WEIGHTED", "")
    lb = LB(endpoints(n, weighted), policy=name, seed=1)
    pick, release = lb.pick, lb.release
    # A fresh slice of hashes per round: repeating hashes would keep their hosts cached.
    pool = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(40 * BATCH)]
    rounds = iter(range(0, len(pool), BATCH))

    def run():
        for _ in range(BATCH):
            release(pick())

    def run_hashed():
        start = next(rounds)
        for h in pool[start:start + BATCH]:
            release(pick(h))

    benchmark.group = f"pick+release {policy} n={n}"
    benchmark.extra_info["per"] = BATCH
    benchmark.pedantic(run_hashed if name in ("RING_HASH", "MAGLEV") else run, rounds=30, iterations=1,
                       warmup_rounds=2)


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "MAGLEV"])
def test_update_10k(benchmark, LB, policy):
    eps = endpoints(10_000)
    lb = LB(eps, policy=policy, seed=1)
    benchmark.group = f"update 10k {policy}"
    benchmark.pedantic(lb.update, args=(eps,), rounds=10, iterations=1, warmup_rounds=1)


def test_memory_per_endpoint_100k(benchmark, LB):
    """Bytes per endpoint of a 100k-endpoint LoadBalancer, Endpoint objects included."""
    n = 100_000 if not os.environ.get("MESHCORE_BENCH_QUICK") else 10_000
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    eps = endpoints(n)
    lb = LB(eps, policy="ROUND_ROBIN", seed=1)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per = used / n
    benchmark.group = "memory"
    benchmark.extra_info["bytes_per_endpoint"] = round(per, 1)
    print(f"\n{LB.__module__}: {per:.1f} bytes per endpoint")
    assert lb.pick() is not None
    if LB.__module__.endswith("_c"):
        assert per <= 400
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.c_extension
def test_ring_hash_floor_100k(benchmark):
    """What a ring-hash pick+release at 100,000 endpoints cannot go below on this machine.

    The hash comes from the caller, so nothing can be fetched before the pick starts, and two
    reads depend on each other: the ring's bucket (it names the host) and then the host's
    Endpoint object (the pick takes a reference to it; its slot and the release's by_ptr entry
    load alongside). Neither fits in cache at 100k: floor = a pick+release whose data is all
    cached (100 endpoints: the Python call overhead) + one random memory access over that much
    memory on huge pages (the bucket: pick-path arrays are on huge pages) + one on small pages
    (the Endpoint: Python objects are), each measured by a pointer chase
    (``lb_c._memory_latency_ns``). The benchmark times the real pick+release (fresh hashes every
    round); extra_info holds the floor and its parts."""
    import statistics
    import time

    from meshcore._fast import lb_c

    n = 100_000 if not os.environ.get("MESHCORE_BENCH_QUICK") else 20_000
    tracemalloc.start()
    eps = endpoints(n)
    endpoint_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    lb = lb_c.LoadBalancer(eps, policy="RING_HASH", seed=1)
    ring = lb.hash_table_stats()[0]["size"]
    buckets = 2
    while buckets < (2 * ring if ring >= 32768 else ring) and buckets < 1 << 21:
        buckets *= 2
    by_ptr = 2
    while by_ptr < 2 * n:
        by_ptr *= 2
    pick_bytes = 32 * buckets + 16 * ring + 16 * n + 4 * by_ptr  # buckets, ring, slots, by_ptr
    total = pick_bytes + endpoint_bytes

    cached = lb_c.LoadBalancer(endpoints(100), policy="RING_HASH", seed=1)
    pool = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(60 * BATCH)]

    def per_pair(balancer, hashes):
        pick, release = balancer.pick, balancer.release
        t0 = time.thread_time_ns()
        for h in hashes:
            release(pick(h))
        return (time.thread_time_ns() - t0) / len(hashes)

    overhead, latency, latency_small, big = [], [], [], []
    for r in range(5):  # interleaved: the machine is shared
        latency.append(lb_c._memory_latency_ns(total, 300_000, hot=True, seed=r + 1))
        latency_small.append(lb_c._memory_latency_ns(total, 300_000, hot=False, seed=r + 1))
        per_pair(cached, pool[:BATCH])  # warm the interpreter again after the chase's sweep
        overhead.append(per_pair(cached, pool[:BATCH]))
        big.append(per_pair(lb, pool[(2 * r + 1) * BATCH:(2 * r + 2) * BATCH]))
    in_cache = lb_c._memory_latency_ns(32 * 1024, 300_000)
    overhead_ns, latency_ns, small_ns, big_ns = (statistics.median(v) for v in (overhead, latency, latency_small, big))
    floor_ns = overhead_ns + latency_ns + small_ns
    info = {
        "endpoints": n, "ring_entries": ring, "pick_path_MiB": round(pick_bytes / 2**20, 1),
        "endpoint_objects_MiB": round(endpoint_bytes / 2**20, 1),
        "random_access_ns": round(latency_ns, 1), "random_access_small_pages_ns": round(small_ns, 1),
        "l1_access_ns": round(in_cache, 1),
        "cached_pick_release_ns": round(overhead_ns, 1), "floor_ns": round(floor_ns, 1),
        "pick_release_after_sweep_ns": round(big_ns, 1),
    }
    benchmark.extra_info.update(info)
    print(f"\nring hash pick+release at {n} (right after a chase swept the caches): {big_ns:.0f} ns; floor {floor_ns:.0f} ns = cached "
          f"{overhead_ns:.0f} + random access over {total / 2**20:.1f} MiB on huge pages {latency_ns:.0f} "
          f"+ on small pages {small_ns:.0f}")
    # The chase measures memory, not a cache: a random access over the pick path's memory is
    # far slower than one within 32 KiB.
    assert latency_ns > 5 * in_cache, info
    assert big_ns > overhead_ns, info

    rounds = iter(range(12, 60))

    def run_hashed():
        start = next(rounds) * BATCH
        for h in pool[start:start + BATCH]:
            lb.release(lb.pick(h))

    benchmark.group = f"pick+release RING_HASH n={n} (with its floor)"
    benchmark.extra_info["per"] = BATCH
    benchmark.pedantic(run_hashed, rounds=30, iterations=1, warmup_rounds=2)
