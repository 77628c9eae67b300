"""The request lifecycle: one routed request, its attempts, and what they feed back.

``Mesh.request(url, method, headers)`` routes the request once (virtual host, route, cluster;
Envoy picks the weighted cluster once per request) and returns a :class:`Call`. Two ways to use it:

* ``call.run(send)`` / ``await call.run_async(send)``: the whole Envoy router behaviour. Fault
  injection first, then attempts: each picks an endpoint (a retry avoids hosts already tried
  where it can), passes the cluster's circuit breakers, and calls ``send(attempt)``; the outcome
  (an HTTP status, a gRPC status, or an upstream error) is recorded in the cluster's stats and
  outlier detector and decides, under the route's retry policy, whether to retry after a
  jittered backoff, within the route timeout. The last outcome is returned (or raised).
* ``with mesh.request(...) as attempt:`` one attempt under your control: send to
  ``attempt.url`` with ``attempt.authority`` as Host, set ``attempt.status`` (or let an exception
  leave the block); completion, status and latency are fed back on exit.

``send`` signals upstream failures by raising :class:`UpstreamError` (``kind``: connect-failure,
reset, timeout) or the builtin ``ConnectionRefusedError`` / ``TimeoutError`` /
``ConnectionError``; ``classify`` can map a client library's exceptions. Anything else propagates
unchanged (the attempt is released and counted as a reset).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import weakref
from typing import Any, Awaitable, Callable, List, Optional, Tuple, TypeVar

from ._model import Endpoint
from ._routing import RouteMatch
from .errors import MeshError, Unavailable
from .resilience.fault import NO_FAULT, FaultDecision, decide_fault
from .resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT, RetryState

__all__ = ["Call", "Attempt", "UpstreamError", "CircuitBreakerOpen", "FaultAbort", "UpstreamTimeout"]

R = TypeVar("R")


class UpstreamError(MeshError):
    """The upstream did not answer: ``kind`` is ``connect-failure``, ``reset`` or ``timeout``."""

    def __init__(self, kind: str, detail: str = "", cause: Optional[BaseException] = None) -> None:
        self.kind = kind
        self.cause = cause
        super().__init__(f"upstream {kind}" + (f": {detail}" if detail else ""))


class CircuitBreakerOpen(Unavailable):
    """A cluster circuit breaker overflowed (Envoy: 503, response flag UO)."""


class FaultAbort(MeshError):
    """The fault filter aborted the request: answer ``http_status`` (or ``grpc_status``)."""

    def __init__(self, http_status: Optional[int], grpc_status: Optional[int]) -> None:
        self.http_status = http_status
        self.grpc_status = grpc_status
        super().__init__(f"fault filter abort (http {http_status}, grpc {grpc_status})")


class UpstreamTimeout(MeshError):
    """The route timeout elapsed (Envoy: 504, response flag UT)."""


def default_classify(exc: BaseException) -> Optional[str]:
    if isinstance(exc, UpstreamError):
        return exc.kind
    if isinstance(exc, ConnectionRefusedError):
        return CONNECT_FAILURE
    if isinstance(exc, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return TIMEOUT
    if isinstance(exc, (ConnectionError, EOFError)):
        return RESET
    return None


def default_status_of(result: Any) -> Optional[int]:
    status = getattr(result, "status_code", None)
    if status is None:
        status = getattr(result, "status", None)
    return status if isinstance(status, int) else None


class Attempt:
    """One try of a call: the endpoint, where to send, and how long it may take."""

    __slots__ = ("number", "endpoint", "timeout", "status", "grpc_status", "error", "authority", "path", "scheme",
                 "headers", "cluster", "_call", "_lb", "_state", "_started", "_retry", "_finished")

    def __init__(self, call: "Call", number: int, endpoint: Endpoint, lb: Any, timeout: Optional[float],
                 retry: bool, started: float) -> None:
        route = call.route
        self.number = number  # 1 for the first try
        self.endpoint = endpoint
        self.timeout = timeout  # seconds this try may take (per-try timeout or what is left), None: unbounded
        self.status: Optional[int] = None
        self.grpc_status: Optional[int] = None
        self.error: Optional[str] = None
        #: the Host / :authority to send: the route's host rewrite, else the logical authority
        self.authority: str = route.host_rewrite or call.authority
        #: the upstream path (after the route's prefix/regex rewrite), query included
        self.path: str = route.path_rewrite or call.path
        self.scheme: str = call.scheme
        self.headers = call.headers  # the request's headers as given to ``Mesh.request``
        self.cluster = call.cluster
        # A weak reference: a Call holds its attempts, and a cycle would leave every request's
        # objects to the cyclic garbage collector.
        self._call = weakref.ref(call)
        self._lb = lb
        self._state = call._state
        self._retry = retry
        self._started = started
        self._finished = False

    @property
    def call(self) -> Optional["Call"]:
        """The call this attempt belongs to (``None`` once nothing else holds the call)."""
        return self._call()

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
        self._state.complete(self)

    # the single-attempt form: ``with mesh.request(...) as attempt``
    def __enter__(self) -> "Attempt":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None and self.status is None:
            self.finish(error=default_classify(exc) or RESET)
        else:
            self.finish(self.status, self.grpc_status)

    def __repr__(self) -> str:
        return f"Attempt({self.cluster!r} #{self.number} {self.endpoint.key} status={self.status})"


class Call:
    """One request routed by the mesh; see the module docstring."""

    def __init__(self, mesh: Any, target: str, authority: str, scheme: str, path: str, method: str,
                 headers: Any, route: RouteMatch, cluster_rt: Any, fault_spec: Any, rng: random.Random,
                 timeout: Optional[float] = None) -> None:
        self.mesh = mesh
        self.target = target
        self.authority = authority
        self.scheme = scheme
        self.path = path
        self.method = method
        self.headers = headers
        self.route = route
        self.cluster: Optional[str] = route.cluster
        self._runtime = cluster_rt
        self._state = mesh._cluster_state(cluster_rt) if cluster_rt is not None else None
        self._fault_spec = fault_spec
        self._rng = rng
        self.started = time.monotonic()
        limit = route.timeout
        if timeout and (not limit or timeout < limit):
            limit = timeout
        self._limit = limit or None
        #: monotonic time by which the whole request must end: the route timeout, or the
        #: caller's own ``timeout`` if shorter (None: no limit); it starts after a fault delay
        self.deadline = self.started + self._limit if self._limit else None
        self._retry: Optional[RetryState] = None
        self.attempts: List[Attempt] = []
        self._single: Optional[Attempt] = None

    @property
    def retry(self) -> RetryState:
        """The request's retry state under the route's policy (made on first use)."""
        if self._retry is None:
            self._retry = RetryState(self.route.retry_policy, self._rng)
        return self._retry

    # -- shared steps --------------------------------------------------------------------------

    def fault(self) -> FaultDecision:
        if self._fault_spec is None:
            return NO_FAULT
        hdrs = {k.lower(): v for k, v in header_pairs(self.headers)}
        return decide_fault(self._fault_spec, hdrs, self._rng, self.cluster)

    def _after_fault(self, d: FaultDecision) -> None:
        """After the fault filter's delay (slept by the caller): the route timeout starts when
        the router does, i.e. now; an abort answers the request without an upstream."""
        if d.delay and self._limit:
            self.deadline = time.monotonic() + self._limit
        if d.aborts:
            raise FaultAbort(d.abort_http_status, d.abort_grpc_status)

    def _remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _try_timeout(self, now: float) -> Optional[float]:
        policy = self.route.retry_policy
        per_try = policy.per_try_timeout if policy is not None else None
        if self.deadline is None:
            return per_try
        remaining = self.deadline - now
        if per_try and remaining is not None:
            return min(per_try, remaining)
        return per_try or remaining

    def start_attempt(self) -> Optional[Attempt]:
        """Pick an endpoint and pass the circuit breakers; ``None`` when a retry may not be made
        (retry overflow). Raises ``Unavailable`` / ``CircuitBreakerOpen`` for the first attempt."""
        if self.route.cluster is None:
            raise MeshError(f"route {self.route.route_name!r} answers directly; there is no upstream")
        retry = bool(self.attempts)
        if retry and self.deadline is not None and time.monotonic() >= self.deadline:
            self._state.stats.inc("upstream_rq_timeout")
            raise UpstreamTimeout(f"{self.target}{self.path}: request timeout elapsed before attempt "
                                  f"{len(self.attempts) + 1}")
        st = self._state
        over = st.admit(retry)
        if over:
            if retry and over == "retries":
                return None
            raise CircuitBreakerOpen(f"{self.target}{self.path}: cluster {self.cluster!r} circuit breaker open "
                                     f"(max_{'retries' if over == 'retries' else 'requests/pending'} reached)")
        try:
            endpoint, lb = self._pick(retry)
        except BaseException:
            st.abandon(retry)
            raise
        now = time.monotonic()
        timeout = self._try_timeout(now)
        attempt = Attempt(self, len(self.attempts) + 1, endpoint, lb, timeout, retry, now)
        self.attempts.append(attempt)
        return attempt

    def _pick(self, retry: bool) -> Tuple[Endpoint, Any]:
        rt = self._runtime
        st = self._state
        if st.outlier is not None:
            st.outlier.tick()
        if not retry:
            ep, lb = self.mesh._choose(rt, self.route.hash)
            if ep is not None:
                return ep, lb
            raise Unavailable(f"{self.target}{self.path}: no healthy upstream in cluster {self.cluster!r}")
        avoid = {a.endpoint.key for a in self.attempts}
        tries = self.retry.host_selection_attempts + 1
        chosen: Optional[Tuple[Endpoint, Any]] = None
        for _ in range(tries):
            ep, lb = self.mesh._choose(rt, None)
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
        raise Unavailable(f"{self.target}{self.path}: no healthy upstream in cluster {self.cluster!r}")

    def _retry_delay(self, a: Attempt) -> Optional[float]:
        """The back-off before retrying after ``a`` (bounded by the deadline), or ``None``: done."""
        if not self._should_retry(a):
            return None
        delay = self.retry.next_backoff()
        remaining = self._remaining()
        return delay if remaining is None else min(delay, max(0.0, remaining))

    def _should_retry(self, a: Attempt) -> bool:
        if not self.retry.retriable(a.status, a.grpc_status, a.error):
            return False
        if not self.retry.can_retry():
            return False
        remaining = self._remaining()
        return remaining is None or remaining > 0

    # -- the single-attempt form -----------------------------------------------------------------

    def __enter__(self) -> Attempt:
        d = self.fault()
        if d.delay:
            time.sleep(d.delay)
        self._after_fault(d)
        attempt = self.start_attempt()
        assert attempt is not None
        self._single = attempt
        return attempt

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._single is not None:
            self._single.__exit__(exc_type, exc, tb)

    # -- the full lifecycle ------------------------------------------------------------------------

    def _outcome(self, a: Attempt, result: Any, exc: Optional[BaseException],
                 classify: Callable[[BaseException], Optional[str]], status_of: Callable[[Any], Optional[int]],
                 grpc_status_of: Optional[Callable[[Any], Optional[int]]]) -> None:
        if exc is not None:
            kind = classify(exc)
            a.finish(error=kind or RESET)
            if kind is None:
                raise exc
        else:
            a.finish(status_of(result), grpc_status_of(result) if grpc_status_of else None)

    def _final(self, a: Attempt, result: Any, exc: Optional[BaseException]) -> Any:
        stats = self._state.stats
        if len(self.attempts) > 1 and a.error is None and (a.status or 200) < 500:
            stats.inc("upstream_rq_retry_success")
        if exc is not None:
            if a.error == TIMEOUT and self.deadline is not None and time.monotonic() >= self.deadline:
                stats.inc("upstream_rq_timeout")
                raise UpstreamTimeout(f"{self.target}{self.path}: request timeout elapsed "
                                      f"(route timeout {self.route.timeout}s)") from exc
            raise exc
        return result

    def run(self, send: Callable[[Attempt], R], *, status_of: Callable[[Any], Optional[int]] = default_status_of,
            grpc_status_of: Optional[Callable[[Any], Optional[int]]] = None,
            classify: Callable[[BaseException], Optional[str]] = default_classify) -> R:
        """Send with Envoy's router behaviour (fault, retries, breakers, timeouts); see module doc."""
        d = self.fault()
        if d.delay:
            time.sleep(d.delay)
        self._after_fault(d)
        last_result: Any = None
        last_exc: Optional[BaseException] = None
        while True:
            a = self.start_attempt()
            if a is None:  # retry overflow: the last outcome stands
                return self._final(self.attempts[-1], last_result, last_exc)
            _close(last_result)  # a retry was admitted: the previous response is discarded
            result: Any = None
            exc: Optional[BaseException] = None
            try:
                result = send(a)
            except BaseException as e:  # noqa: BLE001  (classified below)
                exc = e
            self._outcome(a, result, exc, classify, status_of, grpc_status_of)
            last_result, last_exc = result, exc
            delay = self._retry_delay(a)
            if delay is None:
                return self._final(a, result, exc)
            if delay:
                time.sleep(delay)

    async def run_async(self, send: Callable[[Attempt], Awaitable[R]], *,
                        status_of: Callable[[Any], Optional[int]] = default_status_of,
                        grpc_status_of: Optional[Callable[[Any], Optional[int]]] = None,
                        classify: Callable[[BaseException], Optional[str]] = default_classify) -> R:
        """:meth:`run` for coroutines (``await send(attempt)``; sleeps with ``asyncio.sleep``)."""
        d = self.fault()
        if d.delay:
            await asyncio.sleep(d.delay)
        self._after_fault(d)
        last_result: Any = None
        last_exc: Optional[BaseException] = None
        while True:
            a = self.start_attempt()
            if a is None:  # retry overflow: the last outcome stands
                return self._final(self.attempts[-1], last_result, last_exc)
            await _aclose(last_result)
            result: Any = None
            exc: Optional[BaseException] = None
            try:
                if a.timeout is not None:
                    result = await asyncio.wait_for(send(a), a.timeout)
                else:
                    result = await send(a)
            except BaseException as e:  # noqa: BLE001
                exc = e
            self._outcome(a, result, exc, classify, status_of, grpc_status_of)
            last_result, last_exc = result, exc
            delay = self._retry_delay(a)
            if delay is None:
                return self._final(a, result, exc)
            if delay:
                await asyncio.sleep(delay)

    def __repr__(self) -> str:
        return f"Call({self.target}{self.path} route={self.route.route_name!r} cluster={self.cluster!r})"


def header_pairs(headers: Any) -> List[Tuple[str, str]]:
    """Headers given as a mapping or as ``(name, value)`` pairs, as a list of string pairs."""
    if not headers:
        return []
    if hasattr(headers, "items"):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _close(result: Any) -> None:
    """Release a response that is being retried (its connection goes back to the pool)."""
    if result is None:
        return
    close = getattr(result, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            pass


async def _aclose(result: Any) -> None:
    if result is None:
        return
    close = getattr(result, "aclose", None)
    if callable(close):
        try:
            await close()
        except Exception:
            pass
        return
    _close(result)
