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
