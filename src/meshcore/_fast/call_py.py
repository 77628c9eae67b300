"""The request path, pure-Python twin: route a request, admit and pick each attempt, record
its outcome. ``call_c.pyx`` is the compiled twin; the behaviour is identical.

Three types:

* :class:`ClusterCounters`: one per cluster, shared by every request of the process. The
  circuit breakers (``circuit_breakers.thresholds``, priority DEFAULT; Envoy semantics) and
  the hot stats counters, updated in one step per attempt start and one per attempt end.

  - ``max_requests``: attempts (retries included) in flight.
  - ``max_pending_requests``: meshcore sends each attempt at once (the HTTP client's pool
    queues), so, as for an Envoy HTTP/1.1 pool where a connection carries one request,
    attempts beyond ``max_connections`` count as pending.
  - ``max_retries``: retries in flight; with a ``retry_budget`` instead the limit is
    ``max(budget_percent / 100 * in-flight attempts, min_retry_concurrency)`` (Envoy's
    ``RetryBudgetImpl::max``, source/common/upstream/resource_manager_impl.h, budget without
    ``budget_interval``).
  - An attempt beyond ``max_requests`` or ``max_connections + max_pending_requests`` overflows
    (``upstream_rq_pending_overflow``, Envoy's stat for both); a retry beyond the retry limit
    is not made (``upstream_rq_retry_overflow``).

* :class:`Call`: one routed request (``Mesh.request``); its attempts pick an endpoint, pass
  the breakers, and give the endpoint back when finished.
* :class:`Attempt`: one try; ``finish`` (or leaving its ``with`` block) releases the
  endpoint's in-flight count and feeds stats and outlier detection.

The compiled twin relies on the GIL for atomicity; this twin takes the counters' lock.
"""

from __future__ import annotations

import bisect
import operator
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import _hooks
from .._route_model import RetryPolicy
from .._url import URL_CACHE, parse_url
from ..errors import CircuitBreakerOpen, FaultAbort, MeshError, NoRoute, Unavailable, UpstreamTimeout
from ._consts import ACTIVE as _TELEMETRY, BUCKETS_MS, CONNECT_FAILURE, COUNTER_NAMES, RESET, TIMEOUT
from ._outcome import _scan_request, _scan_response, default_classify as _default_classify
from ._outcome import default_status_of as _default_status_of
from .exchange_py import PEER_HEADER, PEER_HEADER_ID, strip_peer_pairs

__all__ = ["Attempt", "Call", "ClusterCounters", "MeshCore", "BUCKETS_MS", "COUNTER_NAMES", "GRPC_TO_HTTP",
           "ADMITTED", "OVER_REQUESTS", "OVER_RETRIES", "IstioObserver", "IstioSeries",
           "note_response", "strip_peer_pairs", "PEER_HEADER", "PEER_HEADER_ID"]

# admit() results
ADMITTED, OVER_REQUESTS, OVER_RETRIES = 0, 1, 2

# Envoy's Grpc::Utility::grpcToHttpStatus (source/common/grpc/status.cc): what outlier
# detection sees for a gRPC status.
GRPC_TO_HTTP: Dict[int, int] = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
                                11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}

_ERROR_COUNTER = {CONNECT_FAILURE: 4, TIMEOUT: 5, RESET: 6}  # index in COUNTER_NAMES; others: rx_reset

# -- what the layers above plug in (``_hooks``: the router loop of meshcore.lifecycle, retry state,
# fault decisions, router headers, refusal telemetry, the aggregate balancer type). Module globals,
# read per request as when they were imported; placeholders that raise until registered.
_GLOBAL_OF = {
    "run": "_run", "run_async": "_run_async", "run_reported": "_run_reported",
    "run_async_reported": "_run_async_reported", "report_single": "_report_single",
    "begin_single": "_begin_single", "fault_filter_for": "_fault_filter_for", "fault_decision": "_fault_decision",
    "fault_step": "_fault_step", "final_answer": "_final_answer", "NO_FAULT": "NO_FAULT",
    "FaultDecision": "FaultDecision", "RetryState": "RetryState", "router_headers_of": "router_headers_of",
    "is_internal_request": "is_internal_request", "apply_router_headers": "apply_router_headers",
    "report_refusal": "report_refusal", "AggregateBalancer": "AggregateBalancer",
}
_UNSET = _hooks.placeholders()
_run: Any = _UNSET["run"]
_run_async: Any = _UNSET["run_async"]
_run_reported: Any = _UNSET["run_reported"]
_run_async_reported: Any = _UNSET["run_async_reported"]
_report_single: Any = _UNSET["report_single"]
_begin_single: Any = _UNSET["begin_single"]
_fault_filter_for: Any = _UNSET["fault_filter_for"]
_fault_decision: Any = _UNSET["fault_decision"]
_fault_step: Any = _UNSET["fault_step"]
_final_answer: Any = _UNSET["final_answer"]
NO_FAULT: Any = _UNSET["NO_FAULT"]
FaultDecision: Any = _UNSET["FaultDecision"]
RetryState: Any = _UNSET["RetryState"]
router_headers_of: Any = _UNSET["router_headers_of"]
is_internal_request: Any = _UNSET["is_internal_request"]
apply_router_headers: Any = _UNSET["apply_router_headers"]
report_refusal: Any = _UNSET["report_refusal"]
AggregateBalancer: Any = _UNSET["AggregateBalancer"]
del _UNSET


def _install(entries: Dict[str, Any]) -> None:
    """Store entries registered in ``_hooks`` in this module's globals (off the request path)."""
    g = globals()
    for name, value in entries.items():
        g[_GLOBAL_OF[name]] = value


def _installed() -> Dict[str, Any]:
    """The entries as this twin holds them now (for tests)."""
    g = globals()
    return {name: g[var] for name, var in _GLOBAL_OF.items()}


_hooks.subscribe(_install)


class ClusterCounters:
    """Circuit-breaker state and hot stats of one cluster (see the module docstring)."""

    __slots__ = ("active_requests", "active_retries", "max_connections", "max_pending_requests", "max_requests",
                 "max_retries", "budget_percent", "min_retry_concurrency", "_counters", "_statuses", "_buckets",
                 "_time_sum", "_time_count", "_lock")

    def __init__(self) -> None:
        self.active_requests = 0
        self.active_retries = 0
        self.max_connections = self.max_pending_requests = self.max_requests = 1024
        self.max_retries = 3
        self.budget_percent = -1.0  # < 0: no retry budget
        self.min_retry_concurrency = 3
        self._counters = [0] * len(COUNTER_NAMES)
        self._statuses: Dict[Any, int] = {}
        self._buckets = [0] * (len(BUCKETS_MS) + 1)  # the last one: above every bound
        self._time_sum = 0.0
        self._time_count = 0
        self._lock = threading.Lock()

    def set_thresholds(self, max_connections: int, max_pending_requests: int, max_requests: int, max_retries: int,
                       retry_budget: Optional[Tuple[float, int]] = None) -> None:
        """The cluster's ``circuit_breakers`` (priority DEFAULT); ``retry_budget``:
        ``(budget_percent, min_retry_concurrency)`` or ``None``."""
        for name, v in (("max_connections", max_connections), ("max_pending_requests", max_pending_requests),
                        ("max_requests", max_requests), ("max_retries", max_retries)):
            if not 0 <= v < 1 << 62:
                raise ValueError(f"{name} out of range: {v!r}")
        with self._lock:
            self.max_connections, self.max_pending_requests = int(max_connections), int(max_pending_requests)
            self.max_requests, self.max_retries = int(max_requests), int(max_retries)
            if retry_budget is None:
                self.budget_percent, self.min_retry_concurrency = -1.0, 3
            else:
                self.budget_percent = float(retry_budget[0])
                self.min_retry_concurrency = int(retry_budget[1])

    @property
    def pending(self) -> int:
        """Attempts counted as pending (beyond ``max_connections``)."""
        return max(0, self.active_requests - self.max_connections)

    def retry_limit(self) -> int:
        """Retries allowed in flight now (``max_retries``, or the retry budget's limit)."""
        if self.budget_percent < 0:
            return self.max_retries
        return max(int(self.budget_percent / 100.0 * self.active_requests), self.min_retry_concurrency)

    # -- the request path -------------------------------------------------------------------------

    def admit(self, retry: bool) -> int:
        """Pass the breakers and count the attempt: ``ADMITTED``, ``OVER_REQUESTS`` or ``OVER_RETRIES``."""
        with self._lock:
            c = self._counters
            if retry and self.active_retries >= self.retry_limit():
                c[2] += 1
                return OVER_RETRIES
            # Envoy's HTTP/1.1 pool: max_requests bounds the requests ON connections (at most
            # max_connections); beyond them a request waits as pending (max_pending_requests)
            if self.max_requests < self.max_connections:
                limit = self.max_requests
            else:
                limit = self.max_connections + self.max_pending_requests
            if self.active_requests >= limit:
                c[3] += 1
                return OVER_REQUESTS
            self.active_requests += 1
            c[0] += 1
            if retry:
                self.active_retries += 1
                c[1] += 1
            return ADMITTED

    def abandon(self, retry: bool) -> None:
        """An admitted attempt that found no endpoint: its slot back, its counts undone."""
        with self._lock:
            self.active_requests -= 1
            self._counters[0] -= 1
            if retry:
                self.active_retries -= 1
                self._counters[1] -= 1

    def complete(self, retry: bool, status: Optional[int], error: Optional[str], elapsed_ms: float) -> None:
        """An admitted attempt ended: its slot back; its status (or error) and time counted."""
        with self._lock:
            self.active_requests -= 1
            if retry:
                self.active_retries -= 1
            if error is not None:
                self._counters[_ERROR_COUNTER.get(error, 6)] += 1
                self._counters[7] += 1
            else:
                key = int(status) if isinstance(status, int) else 0  # None (or not a status): 0
                self._statuses[key] = self._statuses.get(key, 0) + 1
            self._buckets[bisect.bisect_left(BUCKETS_MS, elapsed_ms)] += 1
            self._time_sum += elapsed_ms
            self._time_count += 1

    # -- readers ----------------------------------------------------------------------------------

    def counter_values(self) -> List[int]:
        """The counters, in :data:`COUNTER_NAMES` order."""
        with self._lock:
            return list(self._counters)

    def statuses(self) -> Dict[Any, int]:
        """Completed attempts by HTTP status (0: finished without a status)."""
        with self._lock:
            return dict(self._statuses)

    def histogram(self) -> Tuple[List[int], float, int]:
        """Attempt times: (bucket counts over :data:`BUCKETS_MS` plus one above, sum ms, count)."""
        with self._lock:
            return list(self._buckets), self._time_sum, self._time_count


class Attempt:
    """One try of a call: the endpoint, where to send, and how long it may take."""

    __slots__ = ("number", "endpoint", "timeout", "status", "grpc_status", "error", "authority", "path", "scheme",
                 "method", "headers", "cluster", "telemetry", "_lb", "_counters", "_outlier", "_retry", "_started",
                 "_finished", "_policy")

    number: int
    endpoint: Any
    timeout: Optional[float]
    status: Optional[int]
    grpc_status: Optional[int]
    error: Optional[str]
    authority: str
    path: str
    scheme: str
    method: str
    headers: Any
    cluster: Optional[str]
    #: what the integration that sent the attempt tells telemetry (None, or a dict: "peer_metadata"
    #: (the response's raw x-envoy-peer-metadata), "request_bytes", "response_bytes",
    #: "request_messages", "response_messages"; see meshcore.telemetry.outcome)
    telemetry: Optional[Dict[str, Any]]

    @property
    def address(self) -> str:
        """``ip:port`` (``[v6]:port``) to connect to."""
        return self.endpoint.key

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.endpoint.key}{self.path}"

    def finish(self, status: Optional[int] = None, grpc_status: Optional[int] = None,
               error: Optional[str] = None) -> None:
        """Record the outcome (once): releases the endpoint, feeds stats and outlier detection."""
        if self._finished:
            return
        self._finished = True
        self.status, self.grpc_status, self.error = status, grpc_status, error
        self._lb.release(self.endpoint)
        self._counters.complete(self._retry, status, error, (time.monotonic() - self._started) * 1000.0)
        outlier = self._outlier
        if outlier is not None:
            if error is not None:
                outlier.record(self.endpoint.key, None, True)
            else:
                if grpc_status:  # Envoy feeds outlier detection grpcToHttpStatus(grpc-status)
                    status = GRPC_TO_HTTP.get(grpc_status, 500)
                outlier.record(self.endpoint.key, status)

    def finish_final(self, status: Optional[int], grpc_status: Optional[int] = None) -> bool:
        """``finish(status, grpc_status)`` for an answer (no upstream error), then whether it ends
        the request at once: the first attempt's answer that the call's retry policy does not
        retry (a later attempt's outcome is left to the retry decision: ``False``)."""
        self.finish(status, grpc_status)
        return self.number == 1 and _final_answer(self._policy, status, grpc_status)

    # the single-attempt form: ``with mesh.request(...) as attempt``
    def __enter__(self) -> "Attempt":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None and self.status is None:
            self.finish(error=_default_classify(exc) or RESET)
        else:
            self.finish(self.status, self.grpc_status)

    def __repr__(self) -> str:
        return f"Attempt({self.cluster!r} #{self.number} {self.endpoint.key} status={self.status})"


class Call:
    """One request routed by the mesh (made by ``Mesh.request``; see ``meshcore.call``)."""

    __slots__ = ("mesh", "target", "authority", "scheme", "path", "method", "headers", "route", "cluster",
                 "retry_policy", "started", "deadline", "attempts", "fault_decision", "_lb", "_aggregate", "_state",
                 "_counters", "_outlier", "_child_outliers", "_fault_spec", "_faults", "_fault_active", "_rng",
                 "_limit", "_retry", "_single")

    mesh: Any
    target: str
    authority: str
    scheme: str
    path: str
    method: str
    headers: Any
    route: Any
    cluster: Optional[str]
    #: the route's retry policy, as the request's x-envoy-* router headers change it (None: none)
    retry_policy: Any
    started: float
    #: monotonic time by which the whole request must end: the route timeout, or the caller's
    #: own ``timeout`` if shorter (None: no limit); it starts after a fault delay
    deadline: Optional[float]
    attempts: List[Attempt]
    #: the fault filter's decision, once it delayed or aborted the request (None before)
    fault_decision: Optional[FaultDecision]

    @property
    def retry(self) -> RetryState:
        """The request's retry state under the route's policy (made on first use)."""
        if self._retry is None:
            self._retry = RetryState(self.retry_policy, self._rng)
        return self._retry

    def _count(self, name: str) -> None:
        """Count a rare per-cluster event (timeouts, successful retries) in the cluster's stats."""
        self._state.stats.inc(name)

    # -- steps ------------------------------------------------------------------------------------

    def fault(self) -> FaultDecision:
        """The fault filter's decision for this request (no fault filter: no fault). A fault
        counted against ``max_active_faults`` stays active until :meth:`_after_fault`."""
        if self._fault_spec is None:
            return NO_FAULT
        d, counted = _fault_decision(self._fault_spec, self.headers, self._rng, self.cluster, self._faults)
        if counted:
            self._fault_active = True
        return d

    def _release_fault(self) -> None:
        """The fault's delay elapsed or its abort answered: it no longer counts as active."""
        if self._fault_active:
            self._fault_active = False
            self._faults.finish()

    def _after_fault(self, d: FaultDecision) -> None:
        """After the fault filter's delay (slept by the caller): the route timeout starts when
        the router does, i.e. now; an abort answers the request without an upstream."""
        self.fault_decision = d
        self._release_fault()
        if d.delay and self._limit:
            self.deadline = time.monotonic() + self._limit
        if d.abort_http_status is not None or d.abort_grpc_status is not None:
            raise FaultAbort(d.abort_http_status, d.abort_grpc_status)

    def _remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _try_timeout(self, now: float) -> Optional[float]:
        policy = self.retry_policy
        per_try = policy.per_try_timeout if policy is not None else None
        if self.deadline is None:
            return per_try
        remaining = self.deadline - now
        if per_try and per_try < remaining:
            return per_try
        return remaining

    def first_attempt(self) -> Optional[Attempt]:
        """``start_attempt()`` when no fault filter applies to the request; ``None`` when one
        does (the router then runs the fault step first, and ``start_attempt``)."""
        if self._fault_spec is not None:
            return None
        return self.start_attempt()

    def start_attempt(self) -> Optional[Attempt]:
        """Pick an endpoint and pass the circuit breakers; ``None`` when a retry may not be made
        (retry overflow). Raises ``Unavailable`` / ``CircuitBreakerOpen`` for the first attempt."""
        if self._counters is None:
            raise MeshError(f"route {self.route.route_name!r} answers directly; there is no upstream")
        retry = bool(self.attempts)
        if retry and self.deadline is not None and time.monotonic() >= self.deadline:
            self._count("upstream_rq_timeout")
            raise UpstreamTimeout(f"{self.target}{self.path}: request timeout elapsed before attempt "
                                  f"{len(self.attempts) + 1}")
        counters = self._counters
        over = counters.admit(retry)
        if over:
            if over == OVER_RETRIES:
                return None
            raise CircuitBreakerOpen(f"{self.target}{self.path}: cluster {self.cluster!r} circuit breaker open "
                                     f"(max_requests/pending reached)")
        try:
            endpoint, lb = self._pick(retry)
        except BaseException:
            counters.abandon(retry)
            raise
        a = Attempt.__new__(Attempt)
        a.number = len(self.attempts) + 1
        a.endpoint = endpoint
        a.status = a.grpc_status = a.error = None
        route = self.route
        #: the Host / :authority to send: the route's host rewrite, else the logical authority
        a.authority = route.host_rewrite or self.authority
        #: the upstream path (after the route's prefix/regex rewrite), query included
        a.path = route.path_rewrite or self.path
        a.scheme = self.scheme
        a.method = self.method
        a.headers = self.headers  # the request's headers as given to ``Mesh.request``
        a.cluster = self.cluster
        a.telemetry = None
        a._lb = lb
        a._counters = counters
        if self._child_outliers is None:
            a._outlier = self._outlier
        else:  # an aggregate cluster: the host's own (child) cluster detects outliers (Envoy)
            a._outlier = self._child_outliers.get(id(lb))
        a._retry = retry
        a._policy = self.retry_policy
        a._finished = False
        now = time.monotonic()
        a._started = now
        a.timeout = self._try_timeout(now)  # seconds this try may take; None: unbounded
        self.attempts.append(a)
        return a

    def _choose(self, hash: Optional[int]) -> Tuple[Any, Any]:
        if self._aggregate:
            return self._lb.choose(hash)
        return self._lb.pick(hash), self._lb

    def _pick(self, retry: bool) -> Tuple[Any, Any]:
        if self._outlier is not None:
            self._outlier.tick()
        if self._child_outliers is not None:
            for detector in self._child_outliers.values():
                if detector is not None:
                    detector.tick()
        if not retry:
            ep, lb = self._choose(self.route.hash)
            if ep is not None:
                return ep, lb
            raise self.mesh._no_upstream(self.target, self.path, self.cluster)
        # a retry avoids the hosts already tried, re-picking up to host_selection_retry_max_attempts
        avoid = {a.endpoint.key for a in self.attempts}
        chosen: Optional[Tuple[Any, Any]] = None
        for _ in range(self.retry.host_selection_attempts + 1):
            ep, lb = self._choose(None)
            if ep is None:
                break
            if ep.key not in avoid:
                if chosen is not None:
                    chosen[1].release(chosen[0])
                return ep, lb
            if chosen is None:
                chosen = (ep, lb)
            else:
                lb.release(ep)
        if chosen is not None:
            return chosen  # every re-pick hit a tried host: Envoy then keeps the last pick
        raise self.mesh._no_upstream(self.target, self.path, self.cluster)

    # -- the single-attempt form ------------------------------------------------------------------

    def __enter__(self) -> Attempt:
        if _TELEMETRY[0]:
            return self._enter_reported()
        if self._fault_spec is not None:
            _fault_step(self)
        attempt = self.start_attempt()
        assert attempt is not None
        self._single = attempt
        return attempt

    def _enter_reported(self) -> Attempt:
        try:
            if self._fault_spec is not None:
                _fault_step(self)
            attempt = self.start_attempt()
        except BaseException as e:
            _report_single(self, e)
            raise
        assert attempt is not None
        self._single = attempt
        _begin_single(self, attempt)  # (tracing: the span starts with the attempt, which carries its headers)
        return attempt

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._single is not None:
            self._single.__exit__(exc_type, exc, tb)
            if _TELEMETRY[0]:
                _report_single(self, exc)

    # -- the full lifecycle (meshcore.lifecycle) --------------------------------------------------

    def run(self, send: Any, *, status_of: Any = _default_status_of, grpc_status_of: Any = None,
            classify: Any = _default_classify) -> Any:
        """Send with Envoy's router behaviour (fault, retries, breakers, timeouts): ``send(attempt)``
        per attempt; the last outcome is returned (or raised). See ``meshcore.call``."""
        if _TELEMETRY[0]:
            return _run_reported(self, send, status_of, grpc_status_of, classify)
        return _run(self, send, status_of, grpc_status_of, classify)

    def run_async(self, send: Any, *, status_of: Any = _default_status_of, grpc_status_of: Any = None,
                  classify: Any = _default_classify) -> Any:
        """:meth:`run` for coroutines: ``await call.run_async(send)`` (``await send(attempt)``)."""
        if _TELEMETRY[0]:
            return _run_async_reported(self, send, status_of, grpc_status_of, classify)
        return _run_async(self, send, status_of, grpc_status_of, classify)

    def __repr__(self) -> str:
        return f"Call({self.target}{self.path} route={self.route.route_name!r} cluster={self.cluster!r})"


class _TargetEntry:
    """What ``request`` reads of one published TargetConfig, resolved once per configuration."""

    __slots__ = ("cfg", "route_table", "clusters", "has_faults", "faults", "resolved")

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.route_table = cfg.route_table
        self.clusters = cfg.clusters
        self.has_faults = bool(cfg.fault_filters)
        #: id(route spec) -> (fault config or None, its filter's ActiveFaults)
        self.faults: Dict[int, Tuple[Any, Any]] = {}
        self.resolved: Dict[str, _ClusterEntry] = {}


class _ClusterEntry:
    """A cluster of that configuration: its runtime, balancer and request state."""

    __slots__ = ("rt", "lb", "aggregate", "state", "counters", "outlier", "child_outliers", "child_states")

    def __init__(self, rt: Any, state: Any) -> None:
        self.rt = rt
        self.lb = rt.lb
        self.aggregate = type(self.lb) is AggregateBalancer
        self.state = state
        self.counters = state.counters
        self.outlier = state.outlier
        #: aggregate: id(child balancer) -> child detector; None: no child has one
        self.child_outliers: Optional[Dict[int, Any]] = None
        #: aggregate: (child runtime, child state) of the children with a detector
        self.child_states: List[Tuple[Any, Any]] = []


class MeshCore:
    """The request path of ``meshcore.Mesh`` (its base class): ``request`` and the state it reads.

    Per target it keeps what it resolved from the published configuration (route table,
    clusters, their balancers and request state), checked by identity against the published
    ``TargetConfig`` on every request: a new configuration is resolved again on its first
    request. An EDS update changes no configuration (the balancer is updated in place); the
    outlier detector then learns the new host list on the next request.
    """

    _publisher: Any
    _states: Dict[str, Any]
    _rng: Any
    _targets: Dict[str, _TargetEntry]

    def __new__(cls, *args: Any, **kwargs: Any) -> "MeshCore":
        self = super().__new__(cls)
        self._targets = {}
        return self

    def _entry(self, target: str, cfg: Any) -> _TargetEntry:
        if cfg is None or cfg.error is not None:
            cfg = self._config_for(target, cfg)  # type: ignore[attr-defined]  # raises if unusable
        entry = _TargetEntry(cfg)
        if len(self._targets) >= 4096:
            self._targets.clear()
        self._targets[target] = entry
        return entry

    def _resolve(self, entry: _TargetEntry, cluster: str, m: Any, target: str, path: str) -> _ClusterEntry:
        rt = entry.clusters.get(cluster)
        if rt is None or rt.lb is None:
            raise self._no_cluster(target, path, m, rt)  # type: ignore[attr-defined]
        ce = _ClusterEntry(rt, self._cluster_state(rt))  # type: ignore[attr-defined]
        if ce.aggregate:
            self._resolve_children(ce, rt)
        entry.resolved[cluster] = ce
        return ce

    def _route_fault(self, entry: _TargetEntry, route: Any) -> Tuple[Any, Any]:
        """(fault config, its filter's ActiveFaults) for a route of this configuration, or
        (None, None): decided once per route (the configuration, and so the route, are fixed)."""
        key = id(route)  # the route specs live as long as entry.cfg, which the entry holds
        found = entry.faults.get(key)
        if found is None:
            name, spec = _fault_filter_for(entry.cfg, route)
            if spec is not None and not (spec.delay_per_million or spec.abort_per_million):
                spec = None  # a filter that can inject nothing (Istio's empty one): no fault step
            found = (spec, self._fault_counter(entry.cfg, name)) if spec is not None else (None, None)  # type: ignore[attr-defined]
            entry.faults[key] = found
        return found

    def _resolve_children(self, ce: _ClusterEntry, rt: Any) -> None:
        """An aggregate cluster's children: their request state, for outlier detection."""
        detectors: Dict[int, Any] = {}
        for child in rt.children:
            if child.lb is None:
                continue
            child_state = self._cluster_state(child)  # type: ignore[attr-defined]
            detectors[id(child.lb)] = child_state.outlier
            if child_state.outlier is not None:
                ce.child_states.append((child, child_state))
        ce.child_outliers = detectors if ce.child_states else None

    def request(self, url: str, method: str = "GET", headers: Any = None, *, target: Optional[str] = None,
                source_ip: Optional[str] = None, timeout: Optional[float] = None) -> Call:
        """Route one request (``http(s)://host[:port]/path?query``) and return its :class:`Call`:
        ``call.run(send)`` for retries, timeouts, breakers and faults, or ``with call as attempt``
        for a single attempt you send yourself. ``target`` overrides the ``host:port`` derived
        from the URL (default ports 80/443); ``timeout`` (seconds) caps the request below the
        route timeout (a caller's deadline)."""
        return self._route(url, method, headers, target, source_ip, timeout, None, False,  # type: ignore[return-value]
                           False)

    def _request_first(self, url: str, method: str, headers: Any, target: Optional[str], timeout: Optional[float],
                       expected: Any, plain: bool = False) -> Optional[Tuple[Any, ...]]:
        """(The integrations' short paths.) ``request(url, method, headers, target=target,
        timeout=timeout)`` if ``target``'s published configuration is ``expected`` (the one the
        caller's own state was made for), else None (nothing routed, nothing counted; also for
        ``expected`` None: a target with nothing published is not a short path's); then the
        call's first attempt, as ``(call, first, refused, key, endpoint, route, started,
        timeout)``: ``first`` the attempt started (``call.first_attempt()``) and the last five
        what its caller reads next (its endpoint's key, its endpoint, ``call.route``,
        ``call.started``, ``first.timeout``); or ``first`` None and the last five None: a fault
        filter applies (its step first; ``refused`` None) or ``refused`` is the MeshError
        ``first_attempt()`` raised (no healthy upstream, circuit breaker open), returned for the
        caller to report with its call. Routing refusals raise as ``request`` raises them.
        ``plain``: the caller knows that ``headers`` change nothing in routing under ``expected``
        (no header matcher of its routes reads them and no router header is among them): routed
        without reading them, kept on the call (its telemetry reads them)."""
        call = self._route(url, method, headers, target, None, timeout, expected, True, bool(plain))
        if call is None:
            return None
        if call._fault_spec is not None:
            return call, None, None, None, None, None, None, None
        try:
            first = call.start_attempt()
        except MeshError as e:
            return call, None, e, None, None, None, None, None
        if first is None:  # (a first attempt is never over the retry budget: kept as start_attempt says)
            return call, None, None, None, None, None, None, None
        endpoint = first.endpoint
        return call, first, None, endpoint.key, endpoint, call.route, call.started, first.timeout

    def _route(self, url: str, method: str, headers: Any, target: Optional[str], source_ip: Optional[str],
               timeout: Optional[float], expected: Any, check: bool, plain: bool) -> Optional[Call]:
        """``request``; with ``check``, None unless the target's published configuration is
        ``expected``; ``plain``: routed as without ``headers`` (``_request_first``)."""
        parsed = URL_CACHE.get(url)
        if parsed is None:
            parsed = parse_url(url)
        scheme, netloc, path, default_target = parsed
        if target is None:
            target = default_target
        cfg = self._publisher.published.get(target)
        if check and (cfg is not expected or expected is None):  # (nothing published: nothing expected)
            return None
        entry = self._targets.get(target)
        if entry is None or entry.cfg is not cfg:
            entry = self._entry(target, cfg)
        # virtual hosts see the Host header the request carries (the URL's authority as written)
        routing = None if plain else headers
        m = entry.route_table.match(netloc, path, routing, method, scheme, None, source_ip)
        if m is None:
            e = NoRoute(target, path)
            if _TELEMETRY[0]:
                report_refusal(self, target, netloc, method, path, headers, e, scheme=scheme)
            raise e
        call = Call.__new__(Call)
        cluster = m.cluster
        if cluster is not None:
            ce = entry.resolved.get(cluster)
            if ce is None:
                try:
                    ce = self._resolve(entry, cluster, m, target, path)
                except Unavailable as e:
                    if _TELEMETRY[0]:
                        report_refusal(self, target, netloc, method, path, headers, e, cluster, m.route_name,
                                        route=m, scheme=scheme)
                    raise
            elif ce.outlier is not None and ce.state.synced is not ce.rt.eds_spec:
                self._cluster_state(ce.rt)  # type: ignore[attr-defined]  # an EDS update: new host list
            if ce.child_outliers is not None:
                for child, child_state in ce.child_states:
                    if child_state.synced is not child.eds_spec:
                        self._cluster_state(child)  # type: ignore[attr-defined]
            call._child_outliers = ce.child_outliers
            call._lb = ce.lb
            call._aggregate = ce.aggregate
            call._state = ce.state
            call._counters = ce.counters
            call._outlier = ce.outlier
        else:  # a direct response or redirect: nothing to send upstream
            call._lb = call._state = call._counters = call._outlier = call._child_outliers = None
            call._aggregate = False
        call._fault_spec = call._faults = call.fault_decision = None
        call._fault_active = False
        if entry.has_faults:
            call._fault_spec, call._faults = self._route_fault(entry, m.route)
        call.mesh = self
        call.target = target
        call.authority = netloc
        call.scheme = scheme
        call.path = path
        call.method = method
        call.headers = headers
        call.route = m
        call.cluster = cluster
        call._rng = self._rng
        call._retry = None
        call._single = None
        call.attempts = []
        policy = m.retry_policy
        limit = m.timeout
        if routing:
            found = router_headers_of(routing)
            if found is not None and is_internal_request(entry.cfg.listener, routing, source_ip):
                policy, limit = apply_router_headers(policy, limit, found)
        call.retry_policy = policy
        started = call.started = time.monotonic()
        if timeout and (not limit or timeout < limit):
            limit = timeout
        call._limit = limit or None
        call.deadline = started + limit if limit else None
        return call


# -- Istio's standard metrics: the counters and the usual request counted without a record --------


def _double(value: Any) -> float:
    """``value`` as a C double parameter takes it (``PyFloat_AsDouble``: a number, not a string)."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(value)


def _long_long(value: Any) -> int:
    """``value`` as a C long long parameter takes it (an integer in 64 bits; a float truncated,
    NaN a ValueError and infinity an OverflowError, as ``int()``)."""
    n = int(value) if isinstance(value, float) else operator.index(value)
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("Python int too large to convert to C long long")
    return n


class IstioSeries:
    """The values of one Istio label tuple (``meshcore.telemetry.istio_metrics``): the request
    counter, three histograms over ``bounds`` (duration ms, request and response bytes; the last
    count is above every bound) and, for gRPC, the message counters. This twin takes a lock."""

    __slots__ = ("labels", "grpc", "_bounds", "_requests", "_counts", "_sums", "_messages", "_lock")

    labels: Tuple[str, ...]
    grpc: bool

    def __init__(self, labels: Tuple[str, ...], bounds: Any, grpc: bool) -> None:
        self.labels = tuple(labels)
        self.grpc = bool(grpc)
        self._bounds = tuple(float(b) for b in bounds)
        n = len(self._bounds) + 1
        self._requests = 0
        self._counts = ([0] * n, [0] * n, [0] * n)
        self._sums = [0.0, 0.0, 0.0]
        self._messages = [0, 0]
        self._lock = threading.Lock()

    def add(self, duration_ms: float, request_bytes: float, response_bytes: float, request_messages: int = 0,
            response_messages: int = 0) -> None:
        """Count one request (bytes 0: the first bucket, as Istio's histogram of 0). The arguments
        are converted as the compiled twin's C ``double``/``long long`` parameters are (the same
        TypeError/OverflowError for the same input)."""
        duration_ms, request_bytes, response_bytes = _double(duration_ms), _double(request_bytes), _double(
            response_bytes)
        request_messages, response_messages = _long_long(request_messages), _long_long(response_messages)
        b = self._bounds
        di = bisect.bisect_left(b, duration_ms)
        qi = bisect.bisect_left(b, request_bytes) if request_bytes else 0
        si = bisect.bisect_left(b, response_bytes) if response_bytes else 0
        d, q, s = self._counts
        sums = self._sums
        with self._lock:
            self._requests += 1
            d[di] += 1
            q[qi] += 1
            s[si] += 1
            sums[0] += duration_ms
            sums[1] += request_bytes
            sums[2] += response_bytes
            if self.grpc:
                self._messages[0] += request_messages
                self._messages[1] += response_messages

    def values(self) -> Tuple[Any, ...]:
        """``(requests, duration counts, duration sum, request-bytes counts, sum, response-bytes
        counts, sum, request messages, response messages)``, read at once (lists are copies)."""
        with self._lock:
            d, q, s = self._counts
            return (self._requests, list(d), self._sums[0], list(q), self._sums[1], list(s), self._sums[2],
                    self._messages[0], self._messages[1])


def _probe_slot(obj: Any) -> Any:
    """(Tests.) ``obj.value`` (the compiled twin reads it as its request path reads slots)."""
    return obj.value


def request_facts(headers: Any) -> Tuple[Any, bool]:
    """``(content-length or 0, whether the content-type is gRPC's)`` of a request's headers, as
    the Istio observer reads them."""
    length, _, grpc = _scan_request(headers)
    return length, bool(grpc)


def note_response(attempt: Any, response: Any, nbytes: Any, strip: bool) -> None:
    """What an integration tells telemetry of an attempt's answer: ``attempt.telemetry`` (see
    ``RequestRecord``) with the body size ``nbytes``; with ``strip`` (Istio's metadata exchange on)
    the peer's x-envoy-peer-metadata(-id) pairs leave ``response.headers`` (a list of pairs, see
    :func:`strip_peer_pairs`) and the metadata value is told."""
    peer = None
    if strip:
        headers = response.headers
        kept, peer = strip_peer_pairs(headers)
        if kept is not headers:
            response.headers = kept
    attempt.telemetry = {"peer_metadata": peer, "request_bytes": None, "response_bytes": nbytes}


def _facts(peer: Any, messages: int) -> Dict[str, Any]:
    """An attempt's telemetry facts as the record path reads them (:meth:`IstioObserver.answered`)."""
    return {"peer_metadata": peer, "request_messages": messages, "response_messages": messages}


class IstioObserver:
    """The Istio sink's fast path, while it is its mesh's only sink: ``observer(call, result)``
    counts a call that returned the usual answer (HTTP, or gRPC with grpc-status 0 or none; no
    fault, no error, no retry flag) in the series its key (route, cluster, endpoint, authority,
    status, raw peer metadata, grpc-status, gRPC or not) was last
    found in, with no record built: ``True``. ``False``: not the usual answer (the caller builds
    the record). A key not known yet (or once ``until``, monotonic, has passed) goes to
    ``miss(call, result, key)``, which counts it through a record and remembers its series in
    ``keys``. ``peers``: the metadata exchange is on (read the response's peer header)."""

    __slots__ = ("keys", "peers", "until", "miss")

    def __init__(self, miss: Any) -> None:
        self.keys: Dict[Any, IstioSeries] = {}
        self.peers = False
        self.until = 0.0
        self.miss = miss

    def clear(self) -> None:
        """Forget every key: labels are computed again from the next call."""
        self.keys.clear()

    def __call__(self, call: Any, result: Any) -> bool:
        return self.observe(call, result)

    def observe(self, call: Any, result: Any) -> bool:
        """``observer(call, result)``: counted (True) or not the usual answer (False)."""
        attempts = call.attempts
        if not attempts or call.fault_decision is not None:
            return False
        a = attempts[-1]
        status = a.status
        grpc_status = a.grpc_status  # (an OK gRPC answer, grpc-status 0, is a usual answer too)
        # (the compiled twin's rules exactly: any int status -- PyLong_Check -- and, under a
        # RetryPolicy, one in 0..408 that its retriable_status_codes do not name)
        if a.error is not None or not isinstance(status, int) or (
                grpc_status is not None and (type(grpc_status) is not int or grpc_status != 0)):
            return False
        req_bytes: Any = None
        req_messages = resp_messages = 0
        info = a.telemetry
        if info is not None:
            if type(info) is not dict:
                return False
            peer = info.get("peer_metadata")
            req_bytes = info.get("request_bytes")
            resp_bytes = info.get("response_bytes") or 0
            for name in ("request_messages", "response_messages"):
                messages = info.get(name, 0)
                if messages is not None and messages != 0:
                    if type(messages) is not int or messages != 1:
                        return False  # (a stream's counts: the record path)
                    if name == "request_messages":
                        req_messages = 1
                    else:
                        resp_messages = 1
        else:
            resp_bytes, peer = _scan_response(result, self.peers)
        return self._count(call, a, status, grpc_status, result, peer, req_bytes, resp_bytes, req_messages,
                           resp_messages, False)

    def answered(self, call: "Call", attempt: Attempt, status: Any, grpc_status: Any, result: Any, peer: Any,
                 messages: int) -> int:
        """A first attempt's answer, for an integration's own router path: ``attempt.finish_final
        (status, grpc_status)``, and the call counted if that ends it, with the attempt's facts
        given here (``peer``: the peer's raw metadata; ``messages``: request and response
        messages, 1 for a unary gRPC call (whose request headers are then taken to be gRPC's, with
        no content-length: not scanned), 0 for HTTP) instead of in ``attempt.telemetry``. 0: not
        final (the retry decision is the caller's); 1: final and counted; 2: final, not counted
        (the caller reports it through the record, ``report(..., observed=True)``); 3: as 2, the
        observer raised. Whenever the call is not counted here (0, 2, 3, and a key not known
        yet, counted through the record), the facts are on ``attempt.telemetry``, as the record
        path reads them."""
        if not isinstance(call, Call) or not isinstance(attempt, Attempt):  # (as the compiled twin's typed arguments)
            raise TypeError("answered() takes the mesh's Call and Attempt")
        messages = _long_long(messages)
        final = attempt.finish_final(status, grpc_status)
        if final and attempt._policy is call.retry_policy and call.attempts == [attempt] \
                and call.fault_decision is None and attempt.error is None and isinstance(status, int) and (
                    grpc_status is None or (type(grpc_status) is int and grpc_status == 0)) and (
                    messages == 0 or messages == 1):
            try:
                if self._count(call, attempt, status, grpc_status, result, peer, None, 0, messages, messages, True):
                    return 1
            except Exception:  # noqa: BLE001  (telemetry never fails a request: the record path, with the facts)
                if attempt.telemetry is None:
                    attempt.telemetry = _facts(peer, messages)
                return 3
        if attempt.telemetry is None:
            attempt.telemetry = _facts(peer, messages)
        return 2 if final else 0

    def _count(self, call: Any, a: Any, status: Any, grpc_status: Any, result: Any, peer: Any, req_bytes: Any,
               resp_bytes: Any, req_messages: int, resp_messages: int, facts: bool) -> bool:
        """:meth:`observe` once the attempt's facts are known (``facts``: given by :meth:`answered`,
        not on the attempt yet: put there before a miss, which reads them as the record does)."""
        grpc = False
        if facts and req_messages:  # a gRPC call's facts (answered): its headers are gRPC's, no content-length
            grpc = True
        else:
            headers = call.headers
            if headers:
                length, _, grpc = _scan_request(headers)
                if req_bytes is None:
                    req_bytes = length
        policy = call.retry_policy  # (after the scans, as the compiled twin: the same errors raised)
        if policy is not None:
            if type(policy) is not RetryPolicy:
                return False
            compiled = policy.compiled
            if compiled is None or not 0 <= status < 409 or status in compiled.status_codes:
                return False
        key = (call.route.route_name, call.cluster, a.endpoint.key, call.authority, status, peer or None, grpc_status,
               bool(grpc))
        started = call.started
        series = self.keys.get(key)
        if series is None or started > self.until:
            if facts:
                a.telemetry = _facts(peer, req_messages)
            self.miss(call, result, key)
            return True
        series.add((time.monotonic() - started) * 1000.0, req_bytes or 0, resp_bytes, req_messages, resp_messages)
        return True

