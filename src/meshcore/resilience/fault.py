"""HTTP fault injection (``envoy.filters.http.fault``), applied before a request is routed upstream.

Per request: with probability ``delay_per_million`` wait ``fixed_delay``; with probability
``abort_per_million`` answer with ``abort_http_status`` (or ``abort_grpc_status``) without
contacting the upstream. ``upstream_cluster`` restricts the fault to requests routed to that
cluster and ``headers`` to requests whose headers all match (route header-matcher semantics).

Header-controlled faults (``header_delay`` / ``header_abort``), as Envoy's
source/extensions/filters/common/fault/fault_config.cc (HeaderDelayProvider, HeaderAbortProvider,
HeaderPercentageProvider) reads them; each value is parsed like ``absl::SimpleAtoi`` into an
unsigned integer (base 10, ASCII whitespace around it and a leading ``+`` allowed, anything else,
a ``-`` sign or an overflow is invalid):

* ``x-envoy-fault-delay-request``: the delay in ms (uint64); absent, invalid or 0: no delay.
* ``x-envoy-fault-abort-request``: the HTTP status (uint64), used only in [200, 600); otherwise
  ``x-envoy-fault-abort-grpc-request`` (any uint64) is the gRPC status (Envoy answers HTTP 200 with
  it). A valid HTTP status wins over the gRPC header (fault_filter.cc ``abortStatus``); neither
  valid: no abort.
* ``x-envoy-fault-delay-request-percentage`` / ``x-envoy-fault-abort-request-percentage``: a uint32
  numerator in the configured percentage's own denominator (HUNDRED, TEN_THOUSAND or MILLION),
  capped at the configured numerator: ``min(header, configured)``. Absent or invalid (``abc``,
  ``-1``, > 2^32-1): the configured percentage. They apply only to the header-controlled fault of
  the same kind (FixedDelayProvider / FixedAbortProvider ignore them); the abort one also applies
  to the gRPC header abort (one HeaderAbortProvider serves both).

Envoy reads only the first value of a repeated ``x-envoy-fault-*`` header ("implicitly untrusted");
``headers`` here has one value per name, so the caller should keep the first.

``max_active_faults``: see :class:`ActiveFaults` and :func:`limit_faults`. Runtime overrides
(``fault.http.*`` keys, per downstream cluster) and ``response_rate_limit`` are not modelled.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from .._fast import _hooks
from .._routing import simple_atoi_unsigned

__all__ = ["NO_FAULT", "ActiveFaults", "FaultDecision", "decide_fault", "limit_faults"]


class FaultDecision(NamedTuple):
    delay: float  # seconds; 0: none
    abort_http_status: Optional[int]
    abort_grpc_status: Optional[int]

    @property
    def aborts(self) -> bool:
        return self.abort_http_status is not None or self.abort_grpc_status is not None


NO_FAULT = FaultDecision(0.0, None, None)

_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1


def _header_uint(headers: Mapping[str, str], name: str, maximum: int) -> Optional[int]:
    """``absl::SimpleAtoi`` of the header into an unsigned type of range [0, maximum]; ``None``
    when absent or invalid."""
    value = headers.get(name)
    return None if value is None else simple_atoi_unsigned(value, maximum)


def _header_per_million(headers: Mapping[str, str], name: str, per_million: int, denominator: int) -> int:
    """HeaderPercentageProvider::percentage as parts per million: the header's numerator (in the
    configured ``denominator``) capped at the configured percentage; absent/invalid: configured."""
    numerator = _header_uint(headers, name, _UINT32_MAX)
    if numerator is None:
        return per_million
    return min(numerator * (1_000_000 // denominator), per_million)


def decide_fault(spec: Any, headers: Mapping[str, str], rng: random.Random, cluster: Optional[str] = None) -> FaultDecision:
    """The fault a request gets under ``spec`` (a ``FaultSpec``); ``headers`` are lower-cased.

    Not limited by ``max_active_faults``: pass the result through :func:`limit_faults`."""
    if spec is None or (spec.upstream_cluster and spec.upstream_cluster != cluster):
        return NO_FAULT
    if spec.headers:
        from .._fast.routes_py import _header_matches

        lists = {k: [v] for k, v in headers.items()}
        if not all(_header_matches(h, lists) for h in spec.headers):
            return NO_FAULT
    delay = 0.0
    pm = spec.delay_per_million
    if pm and spec.header_delay:
        pm = _header_per_million(headers, "x-envoy-fault-delay-request-percentage", pm,
                                 spec.delay_percent_denominator)
    if pm and rng.randrange(1_000_000) < pm:
        if spec.header_delay:
            ms = _header_uint(headers, "x-envoy-fault-delay-request", _UINT64_MAX)
            delay = (ms or 0) / 1000.0
        elif spec.fixed_delay:
            delay = spec.fixed_delay
    http_status = grpc_status = None
    pm = spec.abort_per_million
    if pm and spec.header_abort:
        pm = _header_per_million(headers, "x-envoy-fault-abort-request-percentage", pm,
                                 spec.abort_percent_denominator)
    if pm and rng.randrange(1_000_000) < pm:
        if spec.header_abort:
            http_status = _header_uint(headers, "x-envoy-fault-abort-request", _UINT64_MAX)
            if http_status is not None and not 200 <= http_status < 600:
                http_status = None
            if http_status is None:
                grpc_status = _header_uint(headers, "x-envoy-fault-abort-grpc-request", _UINT64_MAX)
        else:
            http_status, grpc_status = spec.abort_http_status, spec.abort_grpc_status
    return FaultDecision(delay, http_status, grpc_status)


class ActiveFaults:
    """The ``active_faults`` gauge and ``faults_overflow`` counter of one fault filter (Envoy:
    ``http.<stat_prefix>.fault.active_faults`` / ``faults_overflow``, owned by the listener's
    FaultFilterConfig and shared by every route, including routes whose
    ``typed_per_filter_config`` overrides the filter's settings). Thread-safe.

    Envoy (source/extensions/filters/http/fault/fault_filter.cc) counts at most one active fault
    per request (``fault_active_``), and checks the limit only when a fault is about to be
    injected (``tryIncActiveFaults``), never for requests that get no fault:

    * ``try_start(limit)``, with ``limit`` the *effective* settings' ``max_active_faults`` (the
      route override's when there is one, ``None`` = unlimited): call it right before starting a
      delay (``maybeSetupDelay``: only for a delay > 0 that the percentage selected) or, when there
      is no delay, before sending an abort (``maybeDoAbort``). ``active >= limit`` is an overflow:
      ``overflow`` += 1 and the fault is not injected. An abort that follows an injected delay is
      not checked again (the request already counts as active). If the delay overflowed, the
      abort is still tried, with its own check (a second overflow is counted if it fails too).
      ``limit_faults`` does all this.
    * ``finish()``: exactly once per successful ``try_start``: when the delay elapses if no abort
      follows (``postDelayInjection`` stops counting the request then, since meshcore has no
      ``response_rate_limit``), otherwise when the request ends (``onDestroy``: after the abort's
      local reply, or when the request is cancelled during the delay).

    Envoy's limit is fuzzy (check and increment are not atomic across workers); here they are
    atomic, one of the outcomes Envoy allows.
    """

    __slots__ = ("_lock", "_active", "_overflow")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._overflow = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def overflow(self) -> int:
        return self._overflow

    def try_start(self, limit: Optional[int]) -> bool:
        """True: the fault may be injected and now counts as active; False: overflow (counted)."""
        with self._lock:
            if limit is not None and self._active >= limit:
                self._overflow += 1
                return False
            self._active += 1
            return True

    def finish(self) -> None:
        """One active fault ended (see the class docstring for when)."""
        with self._lock:
            if self._active <= 0:
                raise RuntimeError("ActiveFaults.finish() without a matching try_start()")
            self._active -= 1


def limit_faults(decision: FaultDecision, spec: Any, active: ActiveFaults) -> Tuple[FaultDecision, bool]:
    """Apply ``max_active_faults`` to ``decision`` (from :func:`decide_fault` under ``spec``, the
    effective settings) as Envoy's ``decodeHeaders`` does: ``(decision to apply, counted)``; when
    ``counted`` the caller must call ``active.finish()`` once, as :class:`ActiveFaults` describes.
    No fault: ``(decision, False)`` without touching ``active``."""
    limit = spec.max_active_faults if spec is not None else None
    if decision.delay > 0:
        if active.try_start(limit):
            return decision, True  # a following abort is not checked again
        decision = decision._replace(delay=0.0)  # the delay overflowed; the abort is tried on its own
    if decision.aborts:
        if active.try_start(limit):
            return decision, True
        return NO_FAULT, False
    return decision, False  # no fault, or only a delay that overflowed (== NO_FAULT)


# the request path (meshcore._fast.call_*) answers NO_FAULT without a fault filter; it imports
# nothing above it
_hooks.register(NO_FAULT=NO_FAULT, FaultDecision=FaultDecision)
