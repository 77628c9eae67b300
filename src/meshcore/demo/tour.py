"""``meshcore demo --tour``: the balancers and route tables on their own, no network.

Shares of every policy over a small two-zone cluster with priorities, locality weights and
failover, consistent hashing under a host removal, Envoy's route decisions for a few requests,
and the cost of a pick on this machine. Everything is computed in process (no servers).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import List

from .. import IMPLEMENTATION, Endpoint, HealthStatus, LoadBalancer, Locality, RouteTable, __version__, xxh64

__all__ = ["tour"]


def _cluster() -> List[Endpoint]:
    """A small cluster: two zones in P0 (one host degraded, one down), a failover P1."""
    east, west, dr = Locality("us", "east"), Locality("us", "west"), Locality("eu", "dr")
    return [
        Endpoint("10.0.1.1", 8080, weight=3, locality=east, locality_weight=70),
        Endpoint("10.0.1.2", 8080, weight=1, locality=east, locality_weight=70),
        Endpoint("10.0.2.1", 8080, weight=1, locality=west, locality_weight=30),
        Endpoint("10.0.2.2", 8080, weight=1, locality=west, locality_weight=30, health=HealthStatus.DEGRADED),
        Endpoint("10.0.2.3", 8080, weight=1, locality=west, locality_weight=30, health=HealthStatus.UNHEALTHY),
        Endpoint("10.9.0.1", 8080, priority=1, locality=dr, locality_weight=1),
    ]


def _share_table(lb: LoadBalancer, picks: int, hashed: bool = False) -> str:
    counts: Counter = Counter()
    for i in range(picks):
        ep = lb.pick(hash=xxh64(f"user-{i}") if hashed else None)
        counts[ep.key if ep else "(none)"] += 1
        if ep is not None:
            lb.release(ep)
    width = max(len(k) for k in counts)
    rows = [f"    {k:<{width}}  {v / picks:7.2%}  {'#' * round(40 * v / picks)}" for k, v in sorted(counts.items())]
    return "\n".join(rows)


_ROUTES = {
    "name": "demo",
    "virtual_hosts": [
        {"name": "reviews", "domains": ["reviews", "reviews:9080", "reviews.default.svc.cluster.local"],
         "routes": [
             {"name": "canary", "match": {"prefix": "/", "headers": [{"name": "x-canary", "exact_match": "1"}]},
              "route": {"cluster": "reviews-v3"}},
             {"name": "health", "match": {"path": "/healthz"}, "direct_response": {"status": 200}},
             {"name": "legacy", "match": {"path_separated_prefix": "/v1"},
              "redirect": {"prefix_rewrite": "/v2", "response_code": "PERMANENT_REDIRECT"}},
             {"name": "split", "match": {"prefix": "/"},
              "route": {"weighted_clusters": {"clusters": [{"name": "reviews-v1", "weight": 90},
                                                           {"name": "reviews-v2", "weight": 10}]},
                        "timeout": "2s", "retry_policy": {"retry_on": "5xx", "num_retries": 2},
                        "hash_policy": [{"header": {"header_name": "x-user"}}]}},
         ]},
        {"name": "catch-all", "domains": ["*"], "routes": [
            {"name": "passthrough", "match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster"}}]},
    ],
}


def _routing_demo(picks: int) -> None:
    rt = RouteTable.from_xds(_ROUTES)
    print("Route matching (Envoy's decisions, in process):")
    for authority, path, headers in [
        ("reviews:9080", "/reviews/1", [("x-canary", "1")]),
        ("reviews:9080", "/healthz", None),
        ("reviews", "/v1/books?id=7", None),
        ("reviews.default.svc.cluster.local", "/reviews/2", [("x-user", "alice")]),
        ("example.org", "/", None),
    ]:
        m = rt.match(authority, path, headers)
        assert m is not None
        outcome = (m.cluster if m.cluster is not None else
                   f"direct {m.direct_response[0]}" if m.direct_response else
                   f"redirect {m.redirect_code} {m.redirect}")
        hdrs = f" {dict(headers)}" if headers else ""
        print(f"  {authority}{path}{hdrs}\n      -> vhost {m.virtual_host}, route {m.route_name}: {outcome}"
              + (f", hash {m.hash:#x}" if m.hash is not None else ""))
    split: Counter = Counter()
    for i in range(picks):
        split[rt.match("reviews", "/reviews/3", random_value=i * 2654435761).cluster] += 1
    print("  weighted split 90/10 over", picks, "requests:",
          ", ".join(f"{k} {v / picks:.1%}" for k, v in sorted(split.items())))
    n = 100000
    t0 = time.perf_counter()
    for _ in range(n):
        rt.match("reviews:9080", "/healthz")
    print(f"  match cost: {(time.perf_counter() - t0) / n * 1e9:.0f} ns per request\n")


def tour(picks: int = 20000) -> int:
    """Print the tour (balancer shares, failover, consistent hashing, route decisions, speed)."""
    print(f"meshcore {__version__} balancer tour — compiled core: {IMPLEMENTATION}\n")
    _routing_demo(picks)
    eps = _cluster()
    for policy in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"):
        lb = LoadBalancer(eps, policy=policy, seed=7)
        healthy, degraded = lb.priority_loads
        print(f"{policy}: priority loads healthy={healthy} degraded={degraded} panic={lb.panic}")
        print(_share_table(lb, picks, hashed=policy in ("RING_HASH", "MAGLEV")))
    lb = LoadBalancer(eps, policy="ROUND_ROBIN", seed=7, locality_weighted=True)
    print("ROUND_ROBIN with locality weights 70/30 (west availability scaled by 1.4 x 1/3):")
    print(_share_table(lb, picks))
    print("\nFailover: east goes down -> P0 health drops, traffic spills to P1 (Envoy's 1.4 factor):")
    down = [e.replace(health=HealthStatus.UNHEALTHY) if e.locality.zone == "east" else e for e in eps]
    lb.update(down)
    print(f"  loads healthy={lb.priority_loads[0]} degraded={lb.priority_loads[1]} panic={lb.panic}")
    print(_share_table(lb, picks))
    print("\nConsistent hashing: one host removed from 50, keys that move (ideal 1/50 = 2%):")
    fifty = [Endpoint(f"10.1.0.{i}", 80) for i in range(1, 51)]
    keys = [xxh64(f"session-{i}") for i in range(20000)]
    for policy in ("RING_HASH", "MAGLEV"):
        h = LoadBalancer(fifty, policy=policy, seed=1)
        before = [h.pick(hash=k).key for k in keys]
        h.update(fifty[:20] + fifty[21:])
        moved = sum(a != h.pick(hash=k).key for a, k in zip(before, keys))
        print(f"  {policy:<10} {moved / len(keys):6.2%} of keys moved")
    print("\nSpeed (this machine, compiled core if available):")
    big = [Endpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8080) for i in range(1000)]
    for policy in ("ROUND_ROBIN", "LEAST_REQUEST", "MAGLEV"):
        lb = LoadBalancer(big, policy=policy, seed=1)
        pick = lb.pick
        n = 200000
        t0 = time.perf_counter()
        for _ in range(n):
            pick()
        dt = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        lb.update(big)
        up = time.perf_counter() - t0
        print(f"  {policy:<14} pick over 1,000 endpoints: {dt * 1e9:6.0f} ns   update(1,000): {up * 1e3:5.2f} ms")
    return 0
