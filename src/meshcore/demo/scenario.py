"""The demo's five scenarios, each run against a started :class:`DemoEnvironment`.

Every scenario sends real HTTP requests through ``mesh.request(url).run(send)``, prints its part
of the report and returns a JSON-able dict whose ``checks`` map (name -> bool) says whether
the mesh behaved as Envoy would:

1. :func:`canary_split` -- weighted clusters 90/10, observed per instance;
2. :func:`header_routing` -- ``x-canary: 1`` goes to v2 only;
3. :func:`least_request` -- a slow instance under round robin vs least request (P2C);
4. :func:`outlier_ejection` -- an instance starts answering 500 and is ejected;
5. :func:`live_push` -- EDS and route changes pushed under load, zero failed requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import resources
from .environment import SLOW_DELAY, DemoEnvironment, Outcome
from .report import Reporter

__all__ = ["SCENARIOS", "canary_split", "header_routing", "least_request", "outlier_ejection", "live_push"]

log = logging.getLogger(__name__)

REVIEWS = "http://reviews:9080/reviews/1"
RATINGS = "http://ratings:9080/ratings/1"
DETAILS = "http://details:9080/details/1"

Result = Dict[str, Any]


def _instances(outcomes: Sequence[Outcome], order: Sequence[str] = ()) -> Dict[str, int]:
    counts = Counter(o.instance for o in outcomes if o.ok)
    ordered = {name: counts.pop(name, 0) for name in order}
    ordered.update(sorted(counts.items()))
    return ordered


def _failures(outcomes: Sequence[Outcome]) -> List[str]:
    return [o.error or f"HTTP {o.status}" for o in outcomes if not o.ok]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _finish(r: Reporter, result: Result) -> Result:
    result["ok"] = all(result["checks"].values())
    return result


# -- 1. weighted canary split ------------------------------------------------------------------------


def canary_split(env: DemoEnvironment, r: Reporter, requests: int = 1000, tolerance: float = 0.04) -> Result:
    weights = resources.CANARY_WEIGHTS
    r.heading(1, "Weighted canary split",
              "route 'split' of reviews: " + " / ".join(f"{c} {w}" for c, w in weights.items())
              + " (weighted_clusters, picked per request)")
    p = r.progress(f"GET {REVIEWS} x {requests}", requests)
    outcomes = env.burst(REVIEWS, requests, on_progress=p.update)
    p.done()
    counts = _instances(outcomes, [u.name for u in env.upstreams.of("reviews")])
    notes = {u.name: u.version for u in env.upstreams.of("reviews")}
    r.shares(counts, notes, total=requests)
    v2 = sum(n for name, n in counts.items() if notes.get(name) == "v2")
    share = v2 / requests
    expected = weights["reviews-v2"] / sum(weights.values())
    failures = _failures(outcomes)
    checks = {
        "canary_share_within_tolerance": r.check(abs(share - expected) <= tolerance,
                                                 f"canary (v2) share {share:.1%}, configured {expected:.0%} "
                                                 f"(tolerance {tolerance:.0%})"),
        "no_failures": r.check(not failures, f"failed requests: {len(failures)}"),
    }
    return _finish(r, {"requests": requests, "counts": counts, "canary_share": share, "configured_share": expected,
                       "tolerance": tolerance, "failures": len(failures), "checks": checks})


# -- 2. header-based routing -----------------------------------------------------------------------------


def header_routing(env: DemoEnvironment, r: Reporter, requests: int = 200) -> Result:
    r.heading(2, "Header-based routing", "route 'canary-header': x-canary: 1 -> reviews-v2 (first match wins)")
    p = r.progress(f"GET {REVIEWS} -H 'x-canary: 1' x {requests}", requests)
    outcomes = env.burst(REVIEWS, requests, headers={"x-canary": "1"}, on_progress=p.update)
    p.done()
    counts = _instances(outcomes, [u.name for u in env.upstreams.of("reviews")])
    notes = {u.name: u.version for u in env.upstreams.of("reviews")}
    r.shares(counts, notes, total=requests)
    routes = dict(Counter(o.route for o in outcomes))
    v2 = sum(n for name, n in counts.items() if notes.get(name) == "v2")
    failures = _failures(outcomes)
    checks = {
        "all_to_v2": r.check(v2 == requests, f"{v2}/{requests} answered by v2, routes taken: {routes}"),
        "no_failures": r.check(not failures, f"failed requests: {len(failures)}"),
    }
    return _finish(r, {"requests": requests, "counts": counts, "routes": routes, "v2": v2,
                       "failures": len(failures), "checks": checks})


# -- 3. least request vs a slow instance ------------------------------------------------------------------


def least_request(env: DemoEnvironment, r: Reporter, requests: int = 400, rr_requests: int = 160,
                  workers: int = 8) -> Result:
    slow = env.upstreams["ratings-slow"].name
    n = len(env.upstreams.of("ratings"))
    r.heading(3, "Least request steers around a slow instance",
              f"ratings: {n} instances, {slow} answers in {SLOW_DELAY * 1000:.0f} ms; "
              f"{workers} concurrent clients")
    order = [u.name for u in env.upstreams.of("ratings")]
    runs: Dict[str, Dict[str, Any]] = {}
    for label, count, headers in (("ROUND_ROBIN (cluster ratings-rr)", rr_requests, {"x-lb": "round-robin"}),
                                  ("LEAST_REQUEST (cluster ratings, P2C)", requests, None)):
        r.line(r.paint(label, "bold"))
        p = r.progress(f"GET {RATINGS} x {count}", count)
        outcomes = env.burst(RATINGS, count, headers=headers, workers=workers, on_progress=p.update)
        seconds = p.done()
        counts = _instances(outcomes, order)
        r.shares(counts, {slow: "slow"}, total=count)
        lat = [o.seconds * 1000 for o in outcomes]
        p50, p99 = _percentile(lat, 0.5), _percentile(lat, 0.99)
        r.line(f"  latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; {count / seconds:.0f} requests/s")
        runs["least_request" if headers is None else "round_robin"] = {
            "requests": count, "counts": counts, "slow_share": counts.get(slow, 0) / count,
            "p50_ms": p50, "p99_ms": p99, "failures": len(_failures(outcomes))}
    lr, rr = runs["least_request"], runs["round_robin"]
    checks = {
        "slow_share_small": r.check(lr["slow_share"] <= 0.15 and lr["slow_share"] < rr["slow_share"] / 2,
                                    f"slow instance share: least request {lr['slow_share']:.1%} "
                                    f"vs round robin {rr['slow_share']:.1%} (an even share: {1 / n:.0%})"),
        "no_failures": r.check(lr["failures"] + rr["failures"] == 0,
                               f"failed requests: {lr['failures'] + rr['failures']}"),
    }
    return _finish(r, {"slow_instance": slow, "slow_delay_ms": SLOW_DELAY * 1000, "workers": workers,
                       "least_request": lr, "round_robin": rr, "slow_share": lr["slow_share"], "checks": checks})


# -- 4. outlier detection ---------------------------------------------------------------------------------


def outlier_ejection(env: DemoEnvironment, r: Reporter, warmup: int = 30, requests: int = 150,
                     recovery_timeout: float = 8.0) -> Result:
    assert env.mesh is not None
    od = resources.OUTLIER
    r.heading(4, "Outlier detection ejects a failing instance",
              f"details: consecutive_5xx {od['consecutive_5xx']}, interval {od['interval']:g} s, "
              f"base_ejection_time {od['base_ejection_time']:g} s; the route retries 5xx twice")
    order = [u.name for u in env.upstreams.of("details")]
    p = r.progress(f"GET {DETAILS} x {warmup} (all healthy)", warmup)
    before = env.burst(DETAILS, warmup, on_progress=p.update)
    p.done()
    r.shares(_instances(before, order), total=warmup)
    bad = env.upstreams["details-c"]
    stats = env.mesh.stats_registry.cluster("details")

    def ejected() -> bool:
        return bool(stats.get("outlier_detection.ejections_active"))

    bad.failing = True
    r.line(r.paint(f"{bad.name} ({bad.key}) now answers 500 to everything", "yellow"))
    failing: List[Outcome] = []
    to_bad_before = to_bad_after = 0
    ejected_at: Optional[int] = None
    ejected_since = 0.0
    # Stop well within the ejection time, so that every request below sees the host ejected.
    window = od["base_ejection_time"] / 2
    p = r.progress(f"GET {DETAILS} x {requests}", requests)
    for i in range(requests):
        was_ejected = ejected_at is not None
        o = env.request(DETAILS)
        failing.append(o)
        hits = sum(1 for key in o.attempts if key == bad.key)
        if was_ejected:
            to_bad_after += hits
        else:
            to_bad_before += hits
            if ejected():
                ejected_at = i + 1
                ejected_since = time.monotonic()
        p.update(i + 1)
        if ejected_at is not None and time.monotonic() - ejected_since > window:
            break
    p.done()
    attempts = Counter(key for o in failing for key in o.attempts)
    attempt_counts = {name: attempts.get(env.upstreams[name].key, 0) for name in order}
    r.line(f"attempts per instance over {len(failing)} requests (a retried request counts twice):")
    r.shares(attempt_counts, {bad.name: "failing"})
    snap = env.mesh.stats().get("details", {})
    r.stats("details", snap, ["upstream_rq_total", "upstream_rq_500", "upstream_rq_retry",
                              "upstream_rq_retry_success", "outlier_detection.ejections_enforced_total",
                              "outlier_detection.ejections_active"])
    enforced = int(snap.get("outlier_detection.ejections_enforced_total", 0))
    active = int(snap.get("outlier_detection.ejections_active", 0))
    failures = _failures(failing)
    # Recovery: the instance is fixed; after the ejection time it gets traffic again.
    bad.failing = False
    r.line(r.paint(f"{bad.name} is fixed; waiting for the ejection to end", "yellow"))
    p = r.progress(f"GET {DETAILS} every 20 ms until {bad.name} answers")
    back_after: Optional[float] = None
    recovery: List[Outcome] = []
    deadline = time.monotonic() + recovery_timeout
    while ejected_at is not None and time.monotonic() < deadline:
        o = env.request(DETAILS)
        recovery.append(o)
        p.update(len(recovery))
        if o.instance == bad.name:
            back_after = time.monotonic() - ejected_since
            break
        time.sleep(0.02)
    p.done("-> never" if back_after is None else f"-> it did, {back_after:.2f} s after its ejection")
    failures += _failures(recovery)
    where = f"after request {ejected_at}" if ejected_at else "never"
    checks = {
        "ejected": r.check(enforced >= 1 and ejected_at is not None,
                           f"{bad.name} ejected {where} ({to_bad_before} attempts reached it first); "
                           f"ejections_enforced_total = {enforced}"),
        "traffic_moved_away": r.check(ejected_at is not None and to_bad_after == 0,
                                      f"attempts to {bad.name} while ejected: {to_bad_after}"),
        "no_client_failures": r.check(not failures,
                                      f"requests that failed for the application: {len(failures)} "
                                      f"(retries answered the 500s elsewhere)"),
        "returned_after_ejection": r.check(back_after is not None,
                                           f"{bad.name} back in rotation "
                                           + (f"{back_after:.2f} s after its ejection" if back_after is not None
                                              else "never")
                                           + f" (base_ejection_time {od['base_ejection_time']:g} s, "
                                             f"checked every interval of {od['interval']:g} s)"),
    }
    return _finish(r, {"failing_instance": bad.name, "ejected_after_request": ejected_at,
                       "requests_while_failing": len(failing),
                       "attempts_to_failing_before_ejection": to_bad_before,
                       "attempts_to_failing_after_ejection": to_bad_after, "attempts": attempt_counts,
                       "ejections_enforced_total": enforced, "ejections_active": active,
                       "upstream_rq_500": int(snap.get("upstream_rq_500", 0)),
                       "upstream_rq_retry": int(snap.get("upstream_rq_retry", 0)),
                       "returned_after_seconds": back_after, "failures": len(failures), "checks": checks})


# -- 5. live configuration push ----------------------------------------------------------------------------


class _Load:
    """Background clients sending to ``url`` until stopped; each outcome is stamped with the
    phase current when the request started."""

    def __init__(self, env: DemoEnvironment, url: str, workers: int) -> None:
        self.env = env
        self.url = url
        self.phase = 0
        self.records: List[Tuple[int, Outcome]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"demo-load-{i}", daemon=True)
                         for i in range(workers)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            o = self.env.request(self.url)
            with self._lock:
                self.records.append((phase, o))

    def count(self) -> int:
        return len(self.records)

    def __enter__(self) -> "_Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _split(env: DemoEnvironment) -> Dict[str, int]:
    """The weighted clusters of the published 'split' route of reviews."""
    assert env.mesh is not None
    cfg = env.mesh.config("reviews:9080")
    if cfg is None or cfg.route_table is None:
        return {}
    for vh in cfg.route_table.spec.virtual_hosts:
        if vh.name == "reviews":
            for route in vh.routes:
                if route.name == "split":
                    return {w.name: w.weight for w in route.weighted}
    return {}


def _endpoint_keys(env: DemoEnvironment, cluster: str) -> set:
    assert env.mesh is not None
    cfg = env.mesh.config("reviews:9080")
    rt = cfg.clusters.get(cluster) if cfg is not None else None
    if rt is None or rt.lb is None:
        return set()
    return {ep.key for ep in rt.lb.endpoints}


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> Optional[float]:
    """Seconds until ``predicate()`` held (polled every millisecond), None on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.001)
    return time.monotonic() - start


def live_push(env: DemoEnvironment, r: Reporter, workers: int = 4, dwell: float = 0.6) -> Result:
    assert env.mesh is not None and env.plane is not None
    plane = env.plane
    ups = env.upstreams
    r.heading(5, "Live configuration pushes under load",
              f"{workers} clients keep sending to reviews while the control plane pushes EDS and route changes")
    v1a, v1b = ups["reviews-v1-a"], ups["reviews-v1-b"]
    v1c = ups.add("reviews", "v1", "reviews-v1-c")
    v3 = ups.add("reviews", "v3", "reviews-v3-a")
    v2 = ups.of("reviews", "v2")
    steps: List[Tuple[str, Any, Callable[[], bool]]] = [
        ("EDS scale-out: reviews-v1 += reviews-v1-c",
         [resources.assignment_for("reviews-v1", [v1a, v1b, v1c])],
         lambda: v1c.key in _endpoint_keys(env, "reviews-v1")),
        ("EDS scale-in: reviews-v1 -= reviews-v1-a (its in-flight requests finish)",
         [resources.assignment_for("reviews-v1", [v1b, v1c])],
         lambda: v1a.key not in _endpoint_keys(env, "reviews-v1")),
        ("new cluster reviews-v3 + its endpoints + route split v2 50 / v3 50, in one update",
         [resources.reviews_cluster("reviews-v3"), resources.assignment_for("reviews-v3", [v3]),
          resources.route_configuration({"reviews-v2": 50, "reviews-v3": 50})],
         lambda: _split(env) == {"reviews-v2": 50, "reviews-v3": 50}),
    ]
    pushes: List[Dict[str, Any]] = []
    p = r.progress(f"GET {REVIEWS} in a loop from {workers} threads:")
    with _Load(env, REVIEWS, workers) as load:
        _dwell(load, dwell, p)
        for i, (label, upserts, applied) in enumerate(steps, start=1):
            version = plane.update(upserts)
            seconds = _wait(applied)
            load.phase = i
            pushes.append({"step": label, "version": version,
                           "applied_ms": None if seconds is None else round(seconds * 1000, 2)})
            _dwell(load, dwell, p)
    p.done(f"{load.count()} requests")
    for i, push in enumerate(pushes, start=1):
        took = "NOT APPLIED" if push["applied_ms"] is None else f"applied in {push['applied_ms']:.1f} ms"
        r.line(f"push {i} (control plane version {push['version']}): {push['step']}; {took}")
    records = load.records
    phases: Dict[int, Dict[str, int]] = {}
    for phase, o in records:
        if o.ok:
            bucket = phases.setdefault(phase, {})
            bucket[o.instance] = bucket.get(o.instance, 0) + 1
    order = [u.name for u in sorted(ups.of("reviews"), key=lambda u: (u.version, u.name))]
    for phase in sorted(phases):
        counts = {k: phases[phase].get(k, 0) for k in order if phases[phase].get(k)}
        total = sum(counts.values())
        r.line(("before any push" if phase == 0 else f"after push {phase}") + f": {total} requests")
        r.shares(counts, total=total)
    failures = [o for _, o in records if not o.ok]
    errors = dict(Counter((o.error.split(":", 1)[0] if o.error else f"HTTP {o.status}") for o in failures))
    last = len(steps)
    final = phases.get(last, {})
    v1_after = sum(n for k, n in final.items() if k.startswith("reviews-v1"))
    a_after = sum(phases.get(ph, {}).get(v1a.name, 0) for ph in range(2, last + 1))
    checks = {
        "all_pushes_applied": r.check(all(x["applied_ms"] is not None for x in pushes),
                                      "every push applied: " + ", ".join(
                                          f"{x['applied_ms']} ms" for x in pushes)),
        "zero_failures": r.check(not failures and len(records) > 0,
                                 f"failed requests during the pushes: {len(failures)} of {len(records)}"
                                 + (f" {errors}" if errors else "")),
        "scale_out_used": r.check(phases.get(1, {}).get(v1c.name, 0) > 0,
                                  f"{v1c.name} got traffic after push 1: {phases.get(1, {}).get(v1c.name, 0)}"),
        "removed_endpoint_unused": r.check(a_after == 0, f"{v1a.name} after its removal: {a_after} requests"),
        "final_split_applied": r.check(v1_after == 0 and final.get(v3.name, 0) > 0 and sum(final.values()) > 0,
                                       f"after push {last}: v1 {v1_after}, v2 "
                                       f"{sum(final.get(u.name, 0) for u in v2)}, v3 {final.get(v3.name, 0)}"),
    }
    return _finish(r, {"requests": len(records), "failures": len(failures), "errors": errors, "pushes": pushes,
                       "phases": {str(k): v for k, v in sorted(phases.items())}, "checks": checks})


def _dwell(load: _Load, seconds: float, p: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        p.update(load.count())
        time.sleep(0.02)


SCENARIOS: Mapping[str, Callable[[DemoEnvironment, Reporter], Result]] = {
    "canary_split": canary_split,
    "header_routing": header_routing,
    "least_request": least_request,
    "outlier_ejection": outlier_ejection,
    "live_push": live_push,
}
