"""Outlier detection (``config.cluster.v3.OutlierDetection``), Envoy semantics, per cluster.

Per host (by ``ip:port`` key), fed with each attempt's outcome:

* **consecutive 5xx**: 5xx responses and local-origin failures (connect failure, reset, timeout:
  Envoy maps those to 503/504 unless ``split_external_local_origin_errors``) in a row; any other
  response resets the count. At ``consecutive_5xx`` the host is ejected, enforced with
  probability ``enforcing_consecutive_5xx`` %.
* **consecutive gateway failures**: 502/503/504 and local-origin failures in a row
  (``consecutive_gateway_failure``, enforced at ``enforcing_consecutive_gateway_failure`` %,
  default 0).
* **success rate** (every ``interval``): hosts with at least ``success_rate_request_volume``
  requests in the interval, if at least ``success_rate_minimum_hosts`` of them; a host below
  ``mean - stdev * success_rate_stdev_factor / 1000`` is ejected (``enforcing_success_rate`` %).
* **failure percentage** (every ``interval``): hosts with at least
  ``failure_percentage_request_volume`` requests, if at least ``failure_percentage_minimum_hosts``;
  ejected when their failure % reaches ``failure_percentage_threshold``
  (``enforcing_failure_percentage`` %, default 0).

Ejection lasts ``base_ejection_time x number of ejections`` (capped at
``max(max_ejection_time, base_ejection_time)``, plus up to ``max_ejection_time_jitter``); hosts are
returned at interval ticks, and a host not ejected during an interval has its ejection count
lowered by one. At most ``max_ejection_percent`` % of the hosts are ejected at once, but at least
one host can always be ejected (Envoy's documented rule). Interval work runs lazily, on the first
outcome or request after the interval elapsed (no timer thread). Ejections are applied with
``LoadBalancer.set_ejected`` (the host becomes unhealthy: FAILED_OUTLIER_CHECK).
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["OutlierDetector"]

_GATEWAY = (502, 503, 504)


class _Host:
    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected_until", "num_ejections", "ejected_in_interval",
                 "success", "total")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until: Optional[float] = None
        self.num_ejections = 0
        self.ejected_in_interval = False
        self.success = 0
        self.total = 0


class OutlierDetector:
    """The detector of one cluster. ``set_ejected(key, ejected)`` applies decisions to the balancer."""

    def __init__(self, spec: Any, set_ejected: Callable[[str, bool], None], rng: Optional[random.Random] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._set_ejected = set_ejected
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        self._hosts: Dict[str, _Host] = {}
        self._next_interval = clock() + spec.interval
        self.counters: Dict[str, int] = {
            "ejections_enforced_total": 0, "ejections_overflow": 0,
            "ejections_enforced_consecutive_5xx": 0, "ejections_detected_consecutive_5xx": 0,
            "ejections_enforced_consecutive_gateway_failure": 0, "ejections_detected_consecutive_gateway_failure": 0,
            "ejections_enforced_success_rate": 0, "ejections_detected_success_rate": 0,
            "ejections_enforced_failure_percentage": 0, "ejections_detected_failure_percentage": 0,
        }

    @property
    def ejections_active(self) -> int:
        return sum(1 for h in self._hosts.values() if h.ejected_until is not None)

    def is_ejected(self, key: str) -> bool:
        h = self._hosts.get(key)
        return h is not None and h.ejected_until is not None

    def sync_hosts(self, keys: Iterable[str]) -> None:
        """Forget hosts that left the cluster; start tracking new ones."""
        with self._lock:
            keep = set(keys)
            for k in [k for k in self._hosts if k not in keep]:
                del self._hosts[k]
            for k in keep:
                if k not in self._hosts:
                    self._hosts[k] = _Host()

    # -- outcomes -------------------------------------------------------------------------------

    def record(self, key: str, status: Optional[int] = None, local_failure: bool = False) -> None:
        """One attempt's outcome: an HTTP ``status`` or a local-origin failure."""
        now = self._clock()
        spec = self.spec
        with self._lock:
            if now >= self._next_interval:
                self._interval(now)
            h = self._hosts.get(key)
            if h is None:
                h = self._hosts[key] = _Host()
            if local_failure and not spec.split_external_local_origin_errors:
                status = 503
            if status is None:
                return
            h.total += 1
            failed = status >= 500
            if not failed:
                h.success += 1
                h.consecutive_5xx = 0
                h.consecutive_gateway = 0
                return
            h.consecutive_5xx += 1
            if status in _GATEWAY:
                h.consecutive_gateway += 1
            else:
                h.consecutive_gateway = 0
            if h.ejected_until is not None:
                return
            if spec.consecutive_5xx and h.consecutive_5xx >= spec.consecutive_5xx:
                h.consecutive_5xx = 0
                self._maybe_eject(key, h, now, "consecutive_5xx", spec.enforcing_consecutive_5xx)
            elif spec.consecutive_gateway_failure and h.consecutive_gateway >= spec.consecutive_gateway_failure:
                h.consecutive_gateway = 0
                self._maybe_eject(key, h, now, "consecutive_gateway_failure",
                                  spec.enforcing_consecutive_gateway_failure)

    def tick(self) -> None:
        """Run the interval work if the interval elapsed (cheap when it did not)."""
        now = self._clock()
        if now >= self._next_interval:
            with self._lock:
                if now >= self._next_interval:
                    self._interval(now)

    # -- internals --------------------------------------------------------------------------------

    def _maybe_eject(self, key: str, h: _Host, now: float, kind: str, enforcing: int) -> None:
        self.counters[f"ejections_detected_{kind}"] += 1
        if self._rng.randrange(100) >= enforcing:
            return
        total = len(self._hosts)
        active = self.ejections_active
        if active > 0 and 100.0 * (active + 1) / max(total, 1) > self.spec.max_ejection_percent:
            self.counters["ejections_overflow"] += 1
            return
        h.num_ejections += 1
        spec = self.spec
        cap = max(spec.max_ejection_time, spec.base_ejection_time)
        duration = min(spec.base_ejection_time * h.num_ejections, cap)
        if spec.max_ejection_time_jitter:
            duration += self._rng.uniform(0, spec.max_ejection_time_jitter)
        h.ejected_until = now + duration
        h.ejected_in_interval = True
        self.counters[f"ejections_enforced_{kind}"] += 1
        self.counters["ejections_enforced_total"] += 1
        self._set_ejected(key, True)

    def _interval(self, now: float) -> None:
        spec = self.spec
        self._next_interval = now + spec.interval
        self._success_rate(now)
        self._failure_percentage(now)
        for key, h in self._hosts.items():
            if h.ejected_until is not None and now >= h.ejected_until:
                h.ejected_until = None
                self._set_ejected(key, False)
            elif h.ejected_until is None and not h.ejected_in_interval and h.num_ejections > 0:
                h.num_ejections -= 1
            h.ejected_in_interval = False
            h.success = h.total = 0

    def _success_rate(self, now: float) -> None:
        spec = self.spec
        rates: List[tuple] = [(k, 100.0 * h.success / h.total) for k, h in self._hosts.items()
                              if h.total >= spec.success_rate_request_volume]
        if len(rates) < spec.success_rate_minimum_hosts or not rates:
            return
        mean = sum(r for _, r in rates) / len(rates)
        stdev = math.sqrt(sum((r - mean) ** 2 for _, r in rates) / len(rates))
        threshold = mean - stdev * (spec.success_rate_stdev_factor / 1000.0)
        for key, rate in rates:
            h = self._hosts[key]
            if rate < threshold and h.ejected_until is None:
                self._maybe_eject(key, h, now, "success_rate", spec.enforcing_success_rate)

    def _failure_percentage(self, now: float) -> None:
        spec = self.spec
        volume = [(k, h) for k, h in self._hosts.items() if h.total >= spec.failure_percentage_request_volume]
        if len(volume) < spec.failure_percentage_minimum_hosts or not volume:
            return
        for key, h in volume:
            failed = 100.0 * (h.total - h.success) / h.total
            if failed >= spec.failure_percentage_threshold and h.ejected_until is None:
                self._maybe_eject(key, h, now, "failure_percentage", spec.enforcing_failure_percentage)
