"""LoadBalancer, pure-Python twin: the reference implementation of meshcore's LB core.

What it does per pick is what Envoy 1.40 does (see docs in ``meshcore._fast``):

* ROUND_ROBIN / LEAST_REQUEST / RANDOM: one 64-bit draw chooses the priority
  (``draw % 100 + 1`` against the healthy then degraded loads); a priority in panic uses all
  its hosts; with locality weighting an EDF over localities (effective weights) chooses the
  locality; then the host: RR index (equal weights) or host EDF (unequal weights), P2C over
  active requests (least request), or ``draw % n`` (random, the same draw).
* RING_HASH / MAGLEV: the request hash chooses the priority and the entry in that
  priority's ring or table (built over healthy hosts, or all hosts in panic).

A table is immutable once built except for the schedulers' and counters' own state; an
update builds a new table off to the side and swaps one reference under the lock.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from math import ceil
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .._model import Endpoint
from .._options import LbConfig
from . import _build, _xds_hook
from .edf_py import EdfScheduler
from .hashing_py import SplitMix64, xxh64

__all__ = ["LoadBalancer", "xxh64"]

_RR, _LR, _RANDOM, _RING, _MAGLEV = range(5)


class _Table:
    """One snapshot of the endpoint set plus its schedulers and in-flight counters.

    ``active`` is carried over from the previous table for hosts that stay (same key),
    at publish time, under the lock, so no pick or release between build and publish is
    lost.
    """

    __slots__ = (
        "layout", "index", "active", "carry", "healthy_load", "degraded_load", "panic",
        "src_hosts", "src_edf", "src_rr", "loc_healthy", "loc_degraded", "edf_weight",
        "ring_hashes", "ring_hosts", "maglev",
    )


class LoadBalancer:
    """Envoy-exact endpoint selection over one cluster's endpoints (pure-Python twin)."""

    __slots__ = (
        "_config", "_rng", "_seed", "_lock", "_table", "_ejected", "_rr", "_rr_slots", "__weakref__",
    )

    def __init__(
        self,
        endpoints: Iterable[Endpoint] = (),
        policy: str = "ROUND_ROBIN",
        seed: Optional[int] = None,
        **options: Any,
    ) -> None:
        self._config = LbConfig.from_options(policy, options)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = SplitMix64(seed)
        self._seed = self._rng.next()  # Envoy's seed_: RR start index and EDF pre-picks
        self._lock = threading.Lock()
        self._ejected: set = set()  # keys of outlier-ejected hosts (FAILED_OUTLIER_CHECK)
        self._rr: List[int] = []  # round-robin indexes, one per hosts source ever seen
        self._rr_slots: Dict[Tuple[int, int, int], int] = {}
        self._table: Optional[_Table] = None
        self._publish(self._build(list(endpoints)))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_xds(cls, cluster: Any, load_assignment: Any = None, seed: Optional[int] = None) -> "LoadBalancer":
        """Build from an xDS ``Cluster`` and ``ClusterLoadAssignment`` (messages or dicts)."""
        endpoints, policy, options = _xds_hook.decoder("load_balancer")(cluster, load_assignment)
        return cls(endpoints, policy=policy, seed=seed, **options)

    @property
    def policy(self) -> str:
        return self._config.policy

    @property
    def config(self) -> LbConfig:
        return self._config

    @property
    def endpoints(self) -> List[Endpoint]:
        """The current endpoints (after de-duplication), in the order given."""
        return list(self._table.layout.endpoints)

    def _rr_slot(self, key: Tuple[int, int, int]) -> int:
        slot = self._rr_slots.get(key)
        if slot is None:
            slot = self._rr_slots[key] = len(self._rr)
            self._rr.append(self._seed)  # rr_indexes_.insert({source, seed_}) keeps old ones
        return slot

    def _build(self, endpoints: Sequence[Endpoint]) -> _Table:
        cfg = self._config
        layout = _build.layout(endpoints, cfg)
        old = self._table
        t = _Table()
        t.layout = layout
        t.index = layout.index
        old_index = old.index if old is not None else {}
        t.carry = [old_index.get(ep.key, -1) for ep in layout.endpoints]
        old_active = old.active if old is not None else []
        # Counters as of now; refreshed from the old table again at publish.
        t.active = active = [old_active[j] if j >= 0 else 0 for j in t.carry]
        ejected = [ep.key in self._ejected for ep in layout.endpoints]
        groups = _build.partition(layout, ejected, cfg)
        t.healthy_load = groups.plan.healthy_load
        t.degraded_load = groups.plan.degraded_load
        t.panic = groups.plan.panic
        weights = layout.weights
        code = cfg.policy_code
        if code in (_RING, _MAGLEV):
            t.ring_hashes, t.ring_hosts, t.maglev = [], [], []
            for p in range(layout.priorities):
                host_weights = _build.normalized_weights(groups, layout, p, cfg)
                if code == _RING:
                    hashes, hosts = _ring(layout, host_weights, cfg)
                    t.ring_hashes.append(hashes)
                    t.ring_hosts.append(hosts)
                else:
                    t.maglev.append(_maglev(layout, host_weights, cfg))
            return t
        t.src_hosts, t.src_edf, t.src_rr = [], [], []
        t.loc_healthy, t.loc_degraded = [], []
        bias = cfg.active_request_bias

        def weight_of(i: int) -> float:
            if code != _LR or bias == 0.0:
                return float(weights[i])
            in_flight = active[i] + 1
            if bias == 1.0:
                return weights[i] / in_flight
            try:
                return weights[i] / float(in_flight) ** bias
            except OverflowError:  # C's pow gives inf (Envoy's double arithmetic): weight 0
                return 0.0

        t.edf_weight = weight_of  # hostWeight(), made once per table (reads live counters)
        for key, hosts in groups.sources:
            t.src_hosts.append(hosts)
            t.src_rr.append(self._rr_slot(key) if code == _RR else -1)
            edf = None
            if code != _RANDOM and len(hosts) > 1 and not _equal(weights, hosts):
                edf = EdfScheduler.create_with_picks(hosts, weight_of, self._seed)
            t.src_edf.append(edf)
        for p in range(layout.priorities):
            healthy = degraded = None
            if cfg.locality_weighted:
                # LocalityWrr: a fresh random seed per priority on every rebuild.
                loc_seed = self._rng.next()
                hw, dw = groups.locality_effective_weights(p, cfg)
                healthy = _locality_scheduler(hw, groups.healthy_count[p], loc_seed)
                degraded = _locality_scheduler(dw, groups.degraded_count[p], loc_seed)
            t.loc_healthy.append(healthy)
            t.loc_degraded.append(degraded)
        return t

    def _publish(self, t: _Table) -> None:
        """Carry in-flight counts of surviving hosts over and swap the table (lock held)."""
        old = self._table
        if old is not None:
            old_active = old.active
            active = t.active
            for i, j in enumerate(t.carry):
                active[i] = old_active[j] if j >= 0 else 0
        t.carry = None
        self._ejected &= t.index.keys()
        self._table = t

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoint set atomically; surviving hosts keep their state."""
        with self._lock:
            self._publish(self._build(list(endpoints)))

    # -- picking ------------------------------------------------------------------------

    def pick(self, hash: Optional[int] = None) -> Optional[Endpoint]:
        """Choose an endpoint (and count one active request on it), or ``None``."""
        with self._lock:
            t = self._table
            code = self._config.policy_code
            if code >= _RING:
                h = self._rng.next() if hash is None else hash & 0xFFFFFFFFFFFFFFFF
                p = _choose_priority(t, h)[0]
                if code == _RING:
                    hashes = t.ring_hashes[p]
                    if not hashes:
                        return None
                    i = bisect_left(hashes, h)
                    host = t.ring_hosts[p][i if i < len(hashes) else 0]
                else:
                    table = t.maglev[p]
                    if not table:
                        return None
                    host = table[h % len(table)]
                t.active[host] += 1
                return t.layout.endpoints[host]
            r = self._rng.next()
            p, degraded = _choose_priority(t, r)
            sid = self._source(t, p, degraded)
            hosts = t.src_hosts[sid]
            if code == _RANDOM:
                if not hosts:
                    return None
                host = hosts[r % len(hosts)]
            else:
                edf = t.src_edf[sid]
                if edf is not None:
                    host = edf.pick_and_add(t.edf_weight)
                elif not hosts:
                    return None
                elif code == _RR:
                    slot = t.src_rr[sid]
                    index = self._rr[slot]
                    self._rr[slot] = (index + 1) & 0xFFFFFFFFFFFFFFFF
                    host = hosts[index % len(hosts)]
                else:
                    host = self._p2c(t, hosts)
            t.active[host] += 1
            return t.layout.endpoints[host]

    def _source(self, t: _Table, p: int, degraded: bool) -> int:
        layout = t.layout
        base = layout.source_base[p]
        if t.panic[p]:
            return base  # AllHosts
        scheduler = (t.loc_degraded if degraded else t.loc_healthy)[p]
        if scheduler is not None:
            locality = scheduler[0].pick_and_add(scheduler[1])
            return base + 3 + 2 * locality + (1 if degraded else 0)
        return base + (2 if degraded else 1)

    def _p2c(self, t: _Table, hosts: List[int]) -> int:
        n = len(hosts)
        active = t.active
        candidate = hosts[self._rng.next() % n]
        for _ in range(self._config.choice_count - 1):
            sampled = hosts[self._rng.next() % n]
            if active[sampled] < active[candidate]:
                candidate = sampled
        return candidate

    def release(self, endpoint: Endpoint) -> None:
        """The request to ``endpoint`` finished (least-request accounting). An Endpoint this
        balancer does not have is ignored; anything but an Endpoint is a TypeError."""
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("release", endpoint)
        with self._lock:
            t = self._table
            i = t.index.get(endpoint.key)
            if i is not None and t.active[i] > 0:
                t.active[i] -= 1

    # -- introspection and host state ----------------------------------------------------

    def active_requests(self, endpoint: Endpoint) -> int:
        """Requests picked for ``endpoint`` and not yet released (0 if unknown)."""
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("active_requests", endpoint)
        t = self._table
        i = t.index.get(endpoint.key)
        return t.active[i] if i is not None else 0

    def set_ejected(self, endpoint: Endpoint, ejected: bool = True) -> None:
        """Mark a host outlier-ejected (unhealthy) or restore it; rebuilds the table."""
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("set_ejected", endpoint)
        with self._lock:
            key = endpoint.key
            if key not in self._table.index:
                raise KeyError(key)
            if (key in self._ejected) != bool(ejected):
                if ejected:
                    self._ejected.add(key)
                else:
                    self._ejected.discard(key)
                self._publish(self._build(self._table.layout.endpoints))

    def is_ejected(self, endpoint: Endpoint) -> bool:
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("is_ejected", endpoint)
        return endpoint.key in self._ejected

    @property
    def priority_loads(self) -> Tuple[List[int], List[int]]:
        """(healthy, degraded) per-priority loads in percent, summing to 100."""
        return list(self._table.healthy_load), list(self._table.degraded_load)

    @property
    def panic(self) -> List[bool]:
        """Per-priority panic flags."""
        return list(self._table.panic)

    def hash_table_stats(self) -> List[Dict[str, int]]:
        """Per priority, Envoy's ring_hash_lb / maglev_lb gauges: size and min/max entries
        per host (over hosts present in the table)."""
        t = self._table
        out: List[Dict[str, int]] = []
        code = self._config.policy_code
        for p in range(t.layout.priorities):
            if code == _RING:
                hosts = t.ring_hosts[p]
            elif code == _MAGLEV:
                hosts = t.maglev[p]
            else:
                return []
            counts: Dict[int, int] = {}
            for h in hosts:
                counts[h] = counts.get(h, 0) + 1
            out.append({
                "size": len(hosts),
                "min_entries_per_host": min(counts.values()) if counts else 0,
                "max_entries_per_host": max(counts.values()) if counts else 0,
                "hosts": len(counts),
            })
        return out

    def __len__(self) -> int:
        return len(self._table.layout.endpoints)

    def __repr__(self) -> str:
        return f"<LoadBalancer {self._config.policy} endpoints={len(self)} impl=py>"


def _not_endpoint(method: str, obj: object) -> None:
    raise TypeError(f"LoadBalancer.{method}() takes an Endpoint, got {type(obj).__name__}")


def _equal(weights: Sequence[int], hosts: Sequence[int]) -> bool:
    first = weights[hosts[0]]
    return all(weights[h] == first for h in hosts)


def _choose_priority(t: _Table, h: int) -> Tuple[int, bool]:
    x = h % 100 + 1
    acc = 0
    for p, load in enumerate(t.healthy_load):
        acc += load
        if x <= acc:
            return p, False
    for p, load in enumerate(t.degraded_load):
        acc += load
        if x <= acc:
            return p, True
    return 0, False


def _locality_scheduler(weights: List[float], eligible: int, seed: int):  # type: ignore[no-untyped-def]
    if eligible == 0:
        return None
    items = [i for i, w in enumerate(weights) if w > 0]
    if not items:
        return None
    weight_of = weights.__getitem__
    return (EdfScheduler.create_with_picks(items, weight_of, seed), weight_of)


def _ring(layout: "_build.Layout", host_weights: List[Tuple[int, float]], cfg: LbConfig) -> Tuple[List[int], List[int]]:
    if not host_weights:
        return [], []
    min_w = min(w for _, w in host_weights) if host_weights else 1.0
    min_w = min(1.0, min_w)
    scale = min(ceil(min_w * cfg.minimum_ring_size) / min_w, float(cfg.maximum_ring_size))
    entries: List[Tuple[int, int, int]] = []
    current = 0.0
    target = 0.0
    for host, w in host_weights:
        prefix = layout.hash_keys[host] + "_"
        target += scale * w
        i = 0
        while current < target:
            entries.append((xxh64((prefix + str(i)).encode()), len(entries), host))
            i += 1
            current += 1
    entries.sort()
    return [e[0] for e in entries], [e[2] for e in entries]


def _maglev(layout: "_build.Layout", host_weights: List[Tuple[int, float]], cfg: LbConfig) -> List[int]:
    if not host_weights:
        return []
    size = cfg.table_size
    max_w = max(0.0, max(w for _, w in host_weights))
    # (key, position, host, weight): sorted by key; equal keys keep their input order.
    entries = sorted(
        (layout.hash_keys[host], pos, host, w) for pos, (host, w) in enumerate(host_weights)
    )
    offset = []
    skip = []
    for key, _, _, _ in entries:
        raw = key.encode()
        offset.append(xxh64(raw) % size)
        skip.append(xxh64(raw, 1) % (size - 1) + 1)
    n = len(entries)
    nxt = [0] * n
    target = [0.0] * n
    table = [-1] * size
    filled = 0
    iteration = 1
    while filled < size:
        for i in range(n):
            if filled >= size:
                break
            w = entries[i][3]
            if iteration * w < target[i]:
                continue
            target[i] += max_w
            c = (offset[i] + skip[i] * nxt[i]) % size
            while table[c] != -1:
                nxt[i] += 1
                c = (offset[i] + skip[i] * nxt[i]) % size
            table[c] = entries[i][2]
            nxt[i] += 1
            filled += 1
        iteration += 1
    return table
