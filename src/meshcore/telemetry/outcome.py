"""The request lifecycle's telemetry hook: a finished call's outcome as a :class:`RequestRecord`.

The router loop (``meshcore.lifecycle``), the single-attempt form (``with mesh.request(...)``),
``Mesh.request``'s own refusals (no route, no cluster) and the gRPC integration's loops call
:func:`report` once per request, and only when the mesh's telemetry has a sink (``ACTIVE`` is the
cheap, process-wide first test: the number of ``Telemetry`` objects with sinks).

Response code and flags are what Envoy's router would log for the same outcome (checked against
envoyproxy/envoy source/common/router/router.cc and StreamInfoImpl):

* an answer: its status; ``URX`` when the retry policy would have retried it but the retries ran
  out (``onUpstreamHeaders``: ``NoRetryLimitExceeded``), ``UO`` when retries were left but the
  retry circuit breaker refused the retry (``NoOverflow``).
* no answer, Envoy answers locally: ``UH`` (no healthy upstream) 503, ``UO`` (circuit breaker) 503,
  ``UF`` (connect failure) 503, ``UC`` (connection reset/terminated) 503, ``UT`` (route or
  per-try timeout) 504, ``NR`` (no route) 404, ``NC`` (cluster not found) 503, ``FI`` (fault abort)
  with the abort's status. A failure after retries ran out carries ``URX`` first, then the
  failure's flag (``maybeRetryReset`` sets it before ``onUpstreamAbort`` sets the reset's; Envoy
  lists flags in the order they were set): ``URX,UF``, ``URX,UT``, ``URX,UC``.
* ``DI`` (fault delay; ``Call._after_fault`` keeps the decision as ``call.fault_decision``) comes
  first when the fault filter delayed the request (``DI,FI`` for both).
* A gRPC request answered locally gets HTTP 200 and the grpc-status Envoy's local reply maps the
  HTTP code to (``Grpc::Utility::httpToGrpcStatus``: 503/504/429/502 -> 14, 404 -> 12, ...),
  unless the integration knows the status its caller saw.
* ``response_code`` 0, no flag: no response, and none Envoy would have made (an exception of the
  caller's own that is no upstream failure); ``DC`` 0: the caller cancelled the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional, Tuple

from .._fast import _hooks
from .._fast._outcome import _MAX_LENGTH, _is_grpc, _length, _scan_request, _scan_response  # noqa: F401
from ..errors import CircuitBreakerOpen, FaultAbort, NoRoute, Unavailable, UpstreamTimeout
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT, retriable
from .peer_metadata import decode_cached
from .record import NO_FLAGS, RequestRecord
from .tracing import TRACER as _TRACER, headers_of as _trace_headers_of, trace_refusal as _trace_refusal

__all__ = ["report", "report_answer", "report_refusal", "outcome_of", "http_to_grpc", "last_attempt", "generated_request_id"]

log = logging.getLogger(__name__)

_FAILURE_FLAG = {CONNECT_FAILURE: "UF", RESET: "UC", TIMEOUT: "UT"}
_FAILURE_CODE = {CONNECT_FAILURE: 503, RESET: 503, TIMEOUT: 504}
_DETAILS = {CONNECT_FAILURE: "upstream_reset_before_response_started{remote_connection_failure}",
            RESET: "upstream_reset_before_response_started{connection_termination}",
            TIMEOUT: "upstream_per_try_timeout"}


def http_to_grpc(code: int) -> int:
    """Envoy's ``Grpc::Utility::httpToGrpcStatus`` (source/common/grpc/status.cc)."""
    if code == 400:
        return 13
    if code == 401:
        return 16
    if code == 403:
        return 7
    if code == 404:
        return 12
    if code in (429, 502, 503, 504):
        return 14
    return 2


def last_attempt(call: Any) -> Any:
    """The call's last attempt, or ``None`` when none was made."""
    attempts = call.attempts
    return attempts[-1] if attempts else None


def _retry_exhausted(call: Any, a: Any, error: Optional[str]) -> Optional[str]:
    """``URX`` when the retry policy would retry ``a``'s outcome but the retries ran out; ``UO``
    when retries were left (the retry circuit breaker refused the retry); ``None`` otherwise
    (not retriable, or the route's deadline had passed: the last outcome then stands)."""
    policy = call.retry_policy
    if policy is None:
        return None
    status, grpc_status = a.status, a.grpc_status
    if error is None and grpc_status is None and type(status) is int and status < 409:
        compiled = getattr(policy, "compiled", None)  # the usual answer: only retriable_status_codes
        if compiled is not None and status not in compiled.status_codes:
            return None
    if not retriable(policy, status, grpc_status, error):
        return None
    if not call.retry.can_retry():
        return "URX"
    deadline = call.deadline
    if deadline is not None and time.monotonic() >= deadline:
        return None
    return "UO"


def outcome_of(call: Any, a: Any, exc: Optional[BaseException],
               grpc: bool = False) -> Tuple[int, Optional[int], str, Optional[str]]:
    """``(response_code, grpc_status, response_flags, response_code_details)`` of a call whose last
    attempt is ``a`` (``None``: none was made) that returned (``exc`` None) or raised ``exc``;
    ``grpc``: a gRPC request (a local answer is HTTP 200 with a grpc-status)."""
    fault = call.fault_decision
    flags = []
    if fault is not None and fault.delay:
        flags.append("DI")
    grpc_status: Optional[int] = None
    details: Optional[str] = None
    if exc is None:
        code = a.status if a is not None and isinstance(a.status, int) else 0
        grpc_status = a.grpc_status if a is not None else None
        if a is not None and call.retry_policy is not None:
            more = _retry_exhausted(call, a, None)
            if more is not None:
                flags.append(more)
        details = "via_upstream" if code else None
    elif isinstance(exc, FaultAbort):
        flags.append("FI")
        details = "fault_filter_abort"
        if exc.http_status is not None:
            code = exc.http_status
        else:
            code = 200
        grpc_status = exc.grpc_status
    elif isinstance(exc, NoRoute):
        flags.append("NR")
        code, details = 404, "route_not_found"
    elif isinstance(exc, CircuitBreakerOpen):
        flags.append("UO")
        code, details = 503, "upstream_reset_before_response_started{overflow}"
    elif isinstance(exc, UpstreamTimeout):
        flags.append("UT")
        code, details = 504, "response_timeout"
    elif isinstance(exc, Unavailable):
        flags.append("UH")
        code, details = 503, "no_healthy_upstream"
    elif a is not None and a.error is not None and a.error in _FAILURE_FLAG and not _cancelled(exc):
        more = _retry_exhausted(call, a, a.error) if call.retry_policy is not None else None
        if more is not None:
            flags.append(more)
        flags.append(_FAILURE_FLAG[a.error])
        code, details = _FAILURE_CODE[a.error], _DETAILS[a.error]
    elif _cancelled(exc):
        flags.append("DC")
        code, details = 0, "downstream_remote_disconnect"
    else:
        code = 0
        details = f"exception:{type(exc).__name__}"
    if grpc and code and code != 200 and exc is not None:  # Envoy's local reply to a gRPC request
        grpc_status = http_to_grpc(code) if grpc_status is None else grpc_status
        code = 200
    return code, grpc_status, ",".join(flags) if flags else NO_FLAGS, details


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt))


def report(call: Any, result: Any, exc: Optional[BaseException], observed: bool = False) -> None:
    """Build the record of a finished call and hand it to the mesh's sinks (no sink: nothing);
    ``result``/``exc``: what the call returned or raised; ``observed``: the Istio sink's observer
    (``Telemetry.observe``) already declined the call (the record it is). A request whose headers
    say gRPC (``content-type: application/grpc[+...|;...]``, Envoy's ``isGrpcRequestHeaders``) is
    a gRPC request. Never raises."""
    try:
        telemetry = call.mesh.telemetry
        sinks = telemetry.sinks
        if not sinks:
            return
        if exc is None and not observed:
            observe = telemetry.observe  # the Istio sink alone: the usual answer needs no record
            if observe is not None and observe(call, result):
                return
        attempts = call.attempts
        r = _record(call, attempts[-1] if attempts else None, result, exc, telemetry.exchange is not None)
        if len(sinks) == 1:
            try:
                sinks[0](r)
            except Exception:  # noqa: BLE001  (logged once by emit's rule)
                telemetry.emit_failed(sinks[0])
        else:
            telemetry.emit(r)
    except Exception:  # noqa: BLE001  (telemetry never fails a request)
        log.exception("telemetry: could not record %r", call)


def report_answer(telemetry: Any, call: Any, result: Any) -> None:
    """:func:`report` of a call that returned ``result``, for an integration's own router path:
    the Istio sink's observer first (``telemetry.observe``: the usual answer counted, no record),
    the record otherwise; ``telemetry``: the mesh's, read when the request started (None: the
    record path decides). Never raises."""
    observe = telemetry.observe if telemetry is not None else None
    try:
        if observe is not None and observe(call, result):
            return
    except Exception:  # noqa: BLE001  (telemetry never fails a request; the record, without the observer)
        log.debug("telemetry: the Istio observer failed on %r; recorded instead", call, exc_info=True)
    report(call, result, None, observed=observe is not None)


def report_refusal(mesh: Any, target: str, authority: str, method: str, path: str, headers: Any,
                   exc: BaseException, cluster: Optional[str] = None, route_name: Optional[str] = None,
                   route: Any = None, scheme: str = "http") -> None:
    """``Mesh.request`` refused the request before any call existed: no route (``NR``, 404) or the
    route's cluster missing from the configuration (``NC``, 503; ``route``: the route match, whose
    decorator names the span)."""
    request_id = None
    if _TRACER[0] is not None:  # Envoy traces a request it refuses too (never raises)
        request_id = _trace_refusal(mesh, target, authority, method, path, headers, exc, cluster, route_name,
                                    scheme=scheme, route=route)
    try:
        telemetry = mesh.telemetry
        if not telemetry.sinks:
            return
        if isinstance(exc, NoRoute):
            code, flags, details = 404, "NR", "route_not_found"
        else:
            code, flags, details = 503, "NC", "cluster_not_found"
        r = RequestRecord.__new__(RequestRecord)
        _fill(r, target, authority, method, path, route_name, cluster, None, 0, time.time(), 0.0, headers, None,
              None)
        if request_id is not None:  # the id the refused request's span names (Envoy's mark on it)
            r.request_id = request_id
        grpc_status = None
        if r.protocol == "grpc":
            code, grpc_status = 200, http_to_grpc(code)
        r.response_code, r.grpc_status, r.response_flags, r.response_code_details = code, grpc_status, flags, details
        telemetry.emit(r)
    except Exception:  # noqa: BLE001
        log.exception("telemetry: could not record a refused request to %s", target)


_monotonic = time.monotonic
_new = RequestRecord.__new__
#: [epoch - monotonic, monotonic time to measure it again (once a second)]: start times without a
#: time.time() per request
_CLOCK = [time.time() - time.monotonic(), 0.0]


def _record(call: Any, a: Any, result: Any, exc: Optional[BaseException], peers: bool = True) -> RequestRecord:
    """The record of a call that ended: returned ``result`` or raised ``exc``; ``a``: its last
    attempt (``None``: none was made); ``peers``: look for the peer's x-envoy-peer-metadata in a
    plain result (a server answers with it when the request carried ours: the exchange is on).
    (The usual case inline: one Python call less per step.)"""
    started = call.started
    r = _new(RequestRecord)
    now = _monotonic()
    r.duration_ms = (now - started) * 1000.0
    c = _CLOCK
    if now > c[1]:
        c[0], c[1] = time.time() - now, now + 1.0
    r.start_time = started + c[0]
    r.reporter = "source"
    r.target = call.target
    r.authority = call.authority
    r.method = call.method
    r.path = call.path
    r.protocol = "http"
    r.route_name = call.route.route_name
    r.cluster = call.cluster
    r.connection_security_policy = "unknown"
    r.principal = None
    if a is None:
        r.endpoint = r.upstream_host = r.upstream_failure = None
        r.attempts = 0
        _fill_io(r, call.headers, result, None, peers)
        if _TRACER[0] is not None:  # no attempt (a fault abort, no healthy upstream): the call's id
            sent = generated_request_id(call)
            if sent is not None:
                r.request_id = sent
        r.response_code, r.grpc_status, r.response_flags, r.response_code_details = outcome_of(
            call, a, exc, r.protocol == "grpc")
        return r
    ep = a.endpoint
    r.endpoint = ep
    r.upstream_host = ep.key
    r.upstream_failure = a.error
    r.attempts = a.number
    info = a.telemetry
    if info is None and call.headers is None and result is not None:
        r.request_messages = r.response_messages = r.request_bytes = 0
        r.request_id = None
        r.response_bytes, peer = _scan_response(result, peers)
        r.peer_metadata = decode_cached(peer) if peer else None
    else:
        _fill_io(r, call.headers, result, info, peers)
    if _TRACER[0] is not None:  # the x-request-id tracing sent (made, or the request's own with its trace mark)
        sent = generated_request_id(a)
        if sent is not None:
            r.request_id = sent
    if exc is None and call.fault_decision is None:  # the usual answer: no flag unless retries ran out
        status = a.status
        if type(status) is not int:  # (an int subclass, HTTPStatus: its value, as the observer keys it)
            status = int(status) if isinstance(status, int) else 0
        policy = call.retry_policy
        more = None
        if policy is not None:
            compiled = getattr(policy, "compiled", None)
            # the usual answer (below 409, no grpc-status): only retriable_status_codes retry it
            if compiled is None or status >= 409 or a.grpc_status is not None or status in compiled.status_codes:
                more = _retry_exhausted(call, a, None)
        r.response_code = status
        r.grpc_status = a.grpc_status
        r.response_flags = NO_FLAGS if more is None else more
        r.response_code_details = "via_upstream" if status else None
        return r
    r.response_code, r.grpc_status, r.response_flags, r.response_code_details = outcome_of(
        call, a, exc, r.protocol == "grpc")
    return r


def generated_request_id(a: Any) -> Optional[str]:
    """The ``x-request-id`` tracing sent with attempt ``a`` (made when the request had none; ``a``
    may be the call: the id its span chose, for a call that made no attempt), or None. Tracing
    keeps these headers (``tracing.headers_of``) until the call's span ends, which is after the
    record is made (``lifecycle.run_reported``)."""
    for k, v in _trace_headers_of(a):
        if k == "x-request-id":
            return v
    return None


def _fill(r: RequestRecord, target: str, authority: str, method: str, path: str, route_name: Optional[str],
          cluster: Optional[str], a: Any, attempts: int, start: float, duration_ms: float, headers: Any, result: Any,
          info: Any) -> None:
    """Everything but the outcome (response code, grpc status, flags, details); ``a`` is None."""
    r.reporter = "source"
    r.target = target
    r.authority = authority
    r.method = method
    r.path = path
    r.protocol = "http"
    r.route_name = route_name
    r.cluster = cluster
    r.endpoint = r.upstream_host = r.upstream_failure = None
    r.attempts = attempts
    r.start_time = start
    r.duration_ms = duration_ms
    r.connection_security_policy = "unknown"
    r.principal = None
    _fill_io(r, headers, result, info)


def _count(value: Any) -> int:
    """A message count an integration told (``attempt.telemetry``): an int in 0..2**53-1, else 0
    (None, a negative, absurdly large or non-int count: the sinks' counters take plain ints)."""
    if type(value) is int and 0 <= value < _MAX_LENGTH:
        return value
    return int(value) if isinstance(value, int) and 0 <= value < _MAX_LENGTH else 0


def _fill_io(r: RequestRecord, headers: Any, result: Any, info: Any, peers: bool = True) -> None:
    """Bytes, messages, request ID, gRPC-ness and the peer's metadata."""
    req_bytes = resp_bytes = peer = None
    if info is not None:  # what the integration saw (it stripped the exchange headers)
        peer = info.get("peer_metadata")
        req_bytes = info.get("request_bytes")
        resp_bytes = info.get("response_bytes")
        r.request_messages = _count(info.get("request_messages", 0))
        r.response_messages = _count(info.get("response_messages", 0))
    else:
        r.request_messages = r.response_messages = 0
        if result is not None:
            resp_bytes, peer = _scan_response(result, peers)
    request_id = None
    if headers:
        length, request_id, grpc = _scan_request(headers)
        if req_bytes is None:
            req_bytes = length
        if grpc:
            r.protocol = "grpc"
    r.request_id = request_id
    r.request_bytes = req_bytes or 0
    r.response_bytes = resp_bytes or 0
    r.peer_metadata = decode_cached(peer) if peer else None


# the request path calls report_refusal (meshcore._fast imports nothing above it)
_hooks.register(report_refusal=report_refusal)
