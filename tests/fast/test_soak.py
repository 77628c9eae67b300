"""Soak: long random operation scripts run on both twins in lockstep.

Marked ``soak``. The default (and CI) run is short; set MESHCORE_SOAK_EXAMPLES=2000 (scripts)
for a long run. Checks, at every step: the twins agree exactly; a pick is always a current,
routable endpoint; in-flight counts equal outstanding picks of the hosts still present.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

from meshcore import Endpoint, HealthStatus, Locality

SCRIPTS = int(os.environ.get("MESHCORE_SOAK_EXAMPLES", "12"))
POLICIES = ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]


def random_endpoints(rnd: random.Random) -> list[Endpoint]:
    n = rnd.choice([0, 1, 2, 5, 20, 80])
    out = []
    for _ in range(n):
        i = rnd.randrange(120)
        out.append(Endpoint(
            f"10.0.{i // 100}.{i % 100}", 80, weight=rnd.choice([1, 1, 1, 2, 5, 100]),
            health=rnd.choice([HealthStatus.HEALTHY] * 4 + list(HealthStatus)),
            priority=rnd.choice([0, 0, 0, 1, 2]), locality=Locality("r", rnd.choice("ab")),
            locality_weight=rnd.choice([None, 1, 3])))
    return out


@pytest.mark.soak
@pytest.mark.c_extension
@pytest.mark.parametrize("script", range(SCRIPTS))
def test_soak_lockstep(script):
    from meshcore._fast import lb_c, lb_py

    rnd = random.Random(script)
    policy = POLICIES[script % len(POLICIES)]
    opts = {"locality_weighted": rnd.random() < 0.4}
    eps = random_endpoints(rnd)
    seed = rnd.getrandbits(64)
    a = lb_c.LoadBalancer(eps, policy, seed=seed, **opts)
    b = lb_py.LoadBalancer(eps, policy, seed=seed, **opts)
    outstanding: Counter = Counter()
    for step in range(1500):
        op = rnd.random()
        if op < 0.02:
            eps = random_endpoints(rnd)
            a.update(eps)
            b.update(eps)
            current = {e.key for e in a.endpoints}
            outstanding = Counter({k: v for k, v in outstanding.items() if k in current})
        elif op < 0.03 and a.endpoints:
            victim = rnd.choice(a.endpoints)
            flag = rnd.random() < 0.7
            a.set_ejected(victim, flag)
            b.set_ejected(victim, flag)
        elif op < 0.45 and outstanding:
            key = rnd.choice(sorted(outstanding))
            ep = next(e for e in a.endpoints if e.key == key)
            a.release(ep)
            b.release(ep)
            outstanding[key] -= 1
            if not outstanding[key]:
                del outstanding[key]
        else:
            h = rnd.getrandbits(64) if rnd.random() < 0.7 else None
            x, y = a.pick(hash=h), b.pick(hash=h)
            assert (x and x.key) == (y and y.key), (script, step)
            if x is not None:
                assert x.key in {e.key for e in a.endpoints}
                outstanding[x.key] += 1
        if step % 100 == 0:
            for e in a.endpoints:
                assert a.active_requests(e) == b.active_requests(e) == outstanding.get(e.key, 0)
            assert a.priority_loads == b.priority_loads
            assert sum(a.priority_loads[0]) + sum(a.priority_loads[1]) == 100
