"""Retry decisions (Envoy ``RetryStateImpl``): which outcomes are retriable, and the backoff.

``retry_on`` classes (Envoy router docs, "x-envoy-retry-on"; shared/docs/envoy-semantics.md §8.8):

* ``5xx``: any 5xx response, and no response at all (connect failure, reset, per-try timeout);
* ``gateway-error``: 502, 503, 504, and per-try timeouts (Envoy answers those with 504);
* ``reset``: the upstream did not answer (reset, disconnect, per-try timeout);
* ``connect-failure`` (also implied by ``5xx``), ``refused-stream`` (treated like a reset before
  any byte: retried with ``reset`` or ``5xx`` too);
* ``retriable-4xx`` (409), ``retriable-status-codes`` (the route's list);
* gRPC (``grpc-status`` of the response): ``cancelled`` (1), ``deadline-exceeded`` (4),
  ``resource-exhausted`` (8), ``internal`` (13), ``unavailable`` (14).

Backoff (``JitteredExponentialBackOffStrategy``): the n-th retry waits
``random() % ((2^n - 1) * base)`` milliseconds, capped at ``max_interval`` (default 10 x base;
base default 25 ms). The exponent stops growing once ``(2^n - 1) * base`` exceeds the cap.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from .._fast import _hooks

__all__ = ["RetryState", "classify_status", "known_retry_conditions", "retriable", "retries_ok_answer", "CONNECT_FAILURE",
           "RESET", "TIMEOUT"]

# the upstream failure kinds (TIMEOUT: a per-try timeout; Envoy: 504 upstream request timeout),
# defined with the request path, which imports nothing above it
from .._fast._consts import CONNECT_FAILURE, RESET, TIMEOUT

_GRPC_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}
# Envoy's retry conditions (RetryStateImpl::parseRetryOn / parseRetryGrpcOn)
_CONDITIONS = frozenset({"5xx", "gateway-error", "connect-failure", "envoy-ratelimited", "retriable-4xx",
                         "refused-stream", "retriable-status-codes", "retriable-headers", "reset",
                         "reset-before-request", "http3-post-connect-failure", *_GRPC_CODES})


def _split_conditions(retry_on: Any) -> set:
    """The comma-separated entries of ``retry_on`` items, whitespace trimmed (Envoy's
    ``splitToken(config, ",", false, true)``)."""
    on: set = set()
    for item in retry_on:
        on.update(x.strip() for x in item.split(",") if x.strip())
    return on


def known_retry_conditions(retry_on: Any) -> frozenset:
    """The retry conditions Envoy recognises in ``retry_on`` (unknown names are ignored)."""
    return frozenset(_split_conditions(retry_on) & _CONDITIONS)


def classify_status(status: Optional[int]) -> str:
    """``"2xx"``... the class an HTTP status counts in (Envoy's upstream_rq_<class> stats)."""
    if status is None:
        return "none"
    return f"{status // 100}xx"


class _Compiled:
    """A RetryPolicy's parsed form, computed once per policy object."""

    __slots__ = ("on", "grpc_codes", "status_codes", "max_retries", "base_ms", "max_ms", "retries_ok")

    def __init__(self, policy: Any) -> None:
        on = _split_conditions(policy.retry_on)
        self.on = frozenset(on)
        self.grpc_codes = frozenset(code for name, code in _GRPC_CODES.items() if name in on)
        self.status_codes = frozenset(policy.retriable_status_codes) if "retriable-status-codes" in on else frozenset()
        self.max_retries = policy.num_retries
        self.base_ms = max(1, int(round(policy.base_interval * 1000)))
        self.max_ms = max(self.base_ms, int(round((policy.max_interval or policy.base_interval * 10) * 1000)))
        #: whether a gRPC OK answer (HTTP 200, grpc-status 0) is retried: only if
        #: ``retriable_status_codes`` names 200
        self.retries_ok = _retriable(self.on, self.grpc_codes, self.status_codes, 200, 0, None)

    def retriable(self, status: Optional[int], grpc_status: Optional[int], error: Optional[str]) -> bool:
        return _retriable(self.on, self.grpc_codes, self.status_codes, status, grpc_status, error)


def _retriable(on: frozenset, grpc_codes: frozenset, status_codes: frozenset, status: Optional[int],
               grpc_status: Optional[int], error: Optional[str]) -> bool:
    if not on:
        return False
    if error is not None:
        if error == CONNECT_FAILURE:
            return bool(on & {"5xx", "gateway-error", "connect-failure", "reset"})
        if error == TIMEOUT:
            return bool(on & {"5xx", "gateway-error", "reset"})
        return bool(on & {"5xx", "reset", "refused-stream"})
    if grpc_status is not None and grpc_status in grpc_codes:
        return True
    if status is None:
        return False
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    return status in status_codes


def retriable(policy: Any, status: Optional[int], grpc_status: Optional[int], error: Optional[str]) -> bool:
    """Whether ``policy`` (a RetryPolicy, or ``None``: no retries) retries this outcome, without
    making a request's retry state."""
    return policy is not None and _compiled(policy).retriable(status, grpc_status, error)


def retries_ok_answer(policy: Any) -> bool:
    """Whether ``policy`` (``None``: no retries) retries a gRPC OK answer; decided once per policy."""
    return policy is not None and _compiled(policy).retries_ok


def _compiled(policy: Any) -> "_Compiled":
    """The compiled form of a RetryPolicy, kept on the policy itself (a policy made elsewhere,
    without that slot, is compiled each time)."""
    c = getattr(policy, "compiled", None)
    if c is None:
        c = _Compiled(policy)
        try:
            policy.compiled = c
        except AttributeError:
            pass
    return c


class RetryState:
    """The retry state of one request under a route's ``RetryPolicy`` (``None``: no retries)."""

    __slots__ = ("policy", "on", "grpc_codes", "status_codes", "max_retries", "retries", "_rng", "_base_ms",
                 "_max_ms", "_exp")

    def __init__(self, policy: Any, rng: Optional[random.Random] = None) -> None:
        self.policy = policy
        self.retries = 0
        self._rng = rng or random.Random()
        self._exp = 1
        if policy is None:
            self.on = frozenset()
            self.grpc_codes = frozenset()
            self.status_codes = frozenset()
            self.max_retries = 0
            self._base_ms = 25
            self._max_ms = 250
            return
        c = _compiled(policy)
        self.on, self.grpc_codes, self.status_codes = c.on, c.grpc_codes, c.status_codes
        self.max_retries, self._base_ms, self._max_ms = c.max_retries, c.base_ms, c.max_ms

    def retriable(self, status: Optional[int] = None, grpc_status: Optional[int] = None,
                  error: Optional[str] = None) -> bool:
        """Whether this outcome may be retried under the policy (the retry budget aside)."""
        return _retriable(self.on, self.grpc_codes, self.status_codes, status, grpc_status, error)

    def can_retry(self) -> bool:
        return self.retries < self.max_retries

    def next_backoff(self) -> float:
        """Seconds to wait before the next retry (counts the retry)."""
        self.retries += 1
        window = ((1 << self._exp) - 1) * self._base_ms
        if window <= self._max_ms:
            self._exp += 1
        return min(self._rng.randrange(window), self._max_ms) / 1000.0

    @property
    def previous_hosts(self) -> bool:
        """Whether retries avoid hosts already tried (Envoy's previous_hosts predicate)."""
        return self.policy is not None and any("previous_hosts" in p for p in self.policy.retry_host_predicates)

    @property
    def host_selection_attempts(self) -> int:
        return 1 if self.policy is None else max(1, self.policy.host_selection_retry_max_attempts)


# the request path (meshcore._fast.call_*) makes a call's RetryState; it imports nothing above it
_hooks.register(RetryState=RetryState)
