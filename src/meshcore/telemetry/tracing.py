"""Tracing of the requests made through meshcore, as a client sidecar (Envoy) traces them.

Nothing happens unless the application configured an OpenTelemetry tracer provider
(``opentelemetry.trace.set_tracer_provider(...)``: ``get_tracer_provider()`` is no longer the
API's default proxy / no-op one) with ``opentelemetry-api`` importable, or called
:func:`configure` with a provider. The check never imports OpenTelemetry: while
``opentelemetry.trace`` is not in ``sys.modules`` no provider can have been set. It runs when a
mesh is made and then every ``RECHECK_S`` seconds on one daemon thread (``watch``), never on the
request path; the answer is cached in ``TRACER`` (``[tracer or None]``). ``MESHCORE_TRACING=0``
turns it off whatever the provider.

When on, every request made through meshcore (``call.run``/``run_async`` and every client
integration: httpx, requests, aiohttp, gRPC) gets:

* **one CLIENT span per request**, the Envoy egress span, child of the current OpenTelemetry
  context, or of the request's own ``traceparent`` when the application put one there (Envoy
  extracts the incoming context); sampled by the application's sampler (the SDK default,
  ``ParentBased(ALWAYS_ON)``, follows the parent's sampled flag and decides roots). Its name is
  Envoy's: the route's decorator operation when the route model keeps one (``route.decorator``,
  Istio sets ``<host>:<port>/*``), else Envoy's default for an egress span, ``egress <authority>``
  (``TracerImpl::startSpan``, source/common/tracing/tracer_impl.cc).
* attributes of OpenTelemetry's stable HTTP client conventions: ``http.request.method``,
  ``url.full``, ``server.address`` (the logical host, as the ``Host`` header),
  ``server.port``, ``network.peer.address``/``network.peer.port`` (the endpoint the last attempt
  went to), ``http.response.status_code`` (when an answer came), ``error.type`` (the status code
  for a 5xx, else the upstream failure kind or the exception's class),
  ``http.request.resend_count`` (retries); and Envoy's tags: ``component=proxy``,
  ``upstream_cluster``, ``response_flags``, ``guid:x-request-id``, ``node_id`` (the bootstrap
  node), ``retry.count``. Status ERROR for a 5xx (Envoy's ``error=true``) and for a request that
  failed without an answer.
* **retries**: by default one span per request and a span event ``upstream_attempt`` per
  attempt that was retried (number, endpoint, status or failure kind), every attempt carrying
  the request span's context (Envoy as Istio configures it: no ``spawn_upstream_span``). With
  ``configure(attempt_spans=True)`` each attempt gets a child CLIENT span (Envoy's
  ``spawn_upstream_span``; named like the request span, ``retry.count`` and
  ``http.request.resend_count`` set) whose context the attempt carries.
* **propagation** into each attempt's upstream request: W3C ``traceparent``/``tracestate`` and
  B3 multi-header (``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-parentspanid``, ``x-b3-sampled``)
  from the span's context (replacing the application's own, as Envoy does), and ``x-request-id``
  (a UUID4) when the request has none (Envoy keeps an incoming one). ``x-request-id`` is made
  only while tracing is on (Envoy's ``generate_request_id`` is on by default; here it comes
  with tracing so a mesh without tracing sends exactly the application's headers).

Integrations read an attempt's headers with :func:`headers_of` (``()`` when none).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from .record import ACTIVE

__all__ = ["TRACER", "configure", "disable", "refresh", "watch", "headers_of", "begin", "Trace",
           "ENV_TRACING", "RECHECK_S", "TRACE_HEADERS"]

log = logging.getLogger(__name__)

#: ``[tracer or None]``: the OpenTelemetry tracer requests are traced with (None: off)
TRACER: List[Any] = [None]
#: set to 0/false to never trace
ENV_TRACING = "MESHCORE_TRACING"
#: seconds between two checks of the application's tracer provider
RECHECK_S = 5.0
#: the trace headers meshcore sets on an attempt (an application's own are replaced)
TRACE_HEADERS = frozenset(["traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                           "x-b3-sampled", "x-b3-flags", "b3"])

_lock = threading.Lock()
#: explicit configuration: {"provider": TracerProvider or None, "attempt_spans": bool, "disabled": bool}
_CONFIG: Dict[str, Any] = {"provider": None, "attempt_spans": False, "disabled": False}
_counted = [False]  # whether tracing adds one to telemetry's ACTIVE (the request path's first test)
_watcher: List[Optional[threading.Thread]] = [None]
#: attempt -> its header pairs (only while its request is in flight)
_PENDING: Dict[Any, Tuple[Tuple[str, str], ...]] = {}


def _env_off() -> bool:
    return os.environ.get(ENV_TRACING, "").strip().lower() in ("0", "false", "no", "off")


def _provider() -> Any:
    """The tracer provider to use, or None (the API's default proxy/no-op provider, or no API)."""
    if _CONFIG["disabled"] or _env_off():
        return None
    provider = _CONFIG["provider"]
    if provider is not None:
        return provider
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # nobody imported the API: nobody configured a provider
        return None
    try:
        provider = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
    except Exception:  # noqa: BLE001  (an API without these names)
        return None
    return provider


def refresh() -> Any:
    """Check the application's tracer provider now; returns the tracer in use (None: off)."""
    with _lock:
        provider = _provider()
        current = TRACER[0]
        if provider is None:
            tracer = None
        elif current is not None and getattr(current, "_meshcore_provider", None) is provider:
            tracer = current
        else:
            try:
                from .. import __version__ as version
            except Exception:  # noqa: BLE001
                version = None
            tracer = provider.get_tracer("meshcore", version)
            try:
                tracer._meshcore_provider = provider
            except Exception:  # noqa: BLE001  (a tracer with __slots__: compared by identity only)
                pass
            log.debug("tracing requests with %r", provider)
        TRACER[0] = tracer
        if (tracer is not None) != _counted[0]:
            _counted[0] = tracer is not None
            ACTIVE[0] += 1 if tracer is not None else -1
        return tracer


def configure(tracer_provider: Any = None, *, attempt_spans: Optional[bool] = None) -> Any:
    """Trace with ``tracer_provider`` (None: the application's global one, when configured);
    ``attempt_spans``: a child span per attempt (Envoy's ``spawn_upstream_span``). Returns the
    tracer in use (None: off)."""
    _CONFIG["provider"] = tracer_provider
    _CONFIG["disabled"] = False
    if attempt_spans is not None:
        _CONFIG["attempt_spans"] = bool(attempt_spans)
    return refresh()


def disable() -> None:
    """Stop tracing (until :func:`configure`), whatever provider the application set."""
    _CONFIG["provider"] = None
    _CONFIG["disabled"] = True
    refresh()


def _watch_loop() -> None:
    while True:
        time.sleep(RECHECK_S)
        try:
            refresh()
        except Exception:  # noqa: BLE001  (never dies)
            log.debug("tracing: provider check failed", exc_info=True)


def watch() -> None:
    """Check now, and keep checking every ``RECHECK_S`` seconds on one daemon thread (started
    once per process; made when a mesh is made)."""
    refresh()
    if _watcher[0] is None:
        with _lock:
            if _watcher[0] is None:
                t = threading.Thread(target=_watch_loop, name="meshcore-tracing-check", daemon=True)
                _watcher[0] = t
                t.start()


def _after_fork() -> None:
    _watcher[0] = None  # the child has no thread: the next mesh made starts one
    _PENDING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def headers_of(attempt: Any) -> Tuple[Tuple[str, str], ...]:
    """The trace headers (and ``x-request-id`` when made) to add to ``attempt``'s upstream
    request: ``(name, value)`` string pairs, lower-case names; ``()`` when not traced."""
    return _PENDING.get(attempt, ())


# -- a traced request ----------------------------------------------------------------------------


def _hex_span(span_id: int) -> str:
    return format(span_id, "016x")


class Trace:
    """The spans of one traced call."""

    __slots__ = ("tracer", "span", "name", "attempt_spans", "request_id", "parent_b3", "open", "call", "events")

    def __init__(self, tracer: Any, span: Any, name: str, attempt_spans: bool, request_id: Optional[str],
                 parent_b3: Optional[str], call: Any) -> None:
        self.tracer = tracer
        self.span = span
        self.name = name
        self.attempt_spans = attempt_spans
        self.request_id = request_id  # the x-request-id to add (None: the request has one)
        self.parent_b3 = parent_b3  # x-b3-parentspanid for headers carrying the request span
        self.open: Optional[Tuple[Any, Any]] = None  # (attempt, its child span) not yet ended
        self.call = call
        self.events = 0

    def wrap(self, send: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``send`` preceded by the attempt's span and headers (works for coroutine functions too:
        the coroutine ``send`` returns is returned)."""
        def traced(a: Any) -> Any:
            self.attempt(a)
            return send(a)
        return traced

    def attempt(self, a: Any) -> None:
        try:
            self._close_previous()
            span = self.span
            parent_b3 = self.parent_b3
            if self.attempt_spans:
                from opentelemetry import trace

                ctx = trace.set_span_in_context(span)
                child = self.tracer.start_span(self.name, context=ctx, kind=trace.SpanKind.CLIENT)
                if child.is_recording():
                    _start_attributes(child, self.call)
                    if a.number > 1:
                        child.set_attribute("retry.count", a.number - 1)
                        child.set_attribute("http.request.resend_count", a.number - 1)
                    ep = a.endpoint
                    _peer(child, ep)
                parent_b3 = _hex_span(span.get_span_context().span_id)
                self.open = (a, child)
                span = child
            _PENDING[a] = _headers(span.get_span_context(), parent_b3, self.request_id)
        except Exception:  # noqa: BLE001  (tracing never fails a request)
            log.exception("tracing: could not start an attempt of %r", self.call)

    def _close_previous(self) -> None:
        """The attempt before this one ended: its child span (or, without child spans, an event)."""
        attempts = self.call.attempts
        if self.open is not None:
            a, child = self.open
            self.open = None
            _end_attempt(child, a)
        elif not self.attempt_spans and len(attempts) > 1:
            prev = attempts[-2]
            if self.span.is_recording():
                self.span.add_event("upstream_attempt", _attempt_event(prev))

    def end(self, result: Any, exc: Optional[BaseException]) -> None:
        """The call ended: returned ``result`` or raised ``exc``."""
        call = self.call
        try:
            for a in call.attempts:
                _PENDING.pop(a, None)
            if self.open is not None:
                a, child = self.open
                self.open = None
                _end_attempt(child, a, exc)
            span = self.span
            if span.is_recording():
                _end_attributes(span, call, result, exc)
            span.end()
        except Exception:  # noqa: BLE001
            log.exception("tracing: could not end the span of %r", call)


def _attempt_event(a: Any) -> Dict[str, Any]:
    ev: Dict[str, Any] = {"attempt": a.number, "upstream_address": a.endpoint.key}
    if a.status is not None:
        ev["http.response.status_code"] = a.status
    if a.error is not None:
        ev["error.type"] = a.error
    return ev


def _split_authority(authority: str) -> Tuple[str, Optional[int]]:
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    try:
        return host, int(port) if port else None
    except ValueError:
        return host, None


def _start_attributes(span: Any, call: Any) -> None:
    scheme = call.scheme
    authority = call.authority
    host, port = _split_authority(authority)
    if port is None:
        target_port = call.target.rpartition(":")[2]
        port = int(target_port) if target_port.isdigit() else (443 if scheme == "https" else 80)
    span.set_attribute("http.request.method", call.method)
    span.set_attribute("url.full", f"{scheme}://{authority}{call.path}")
    span.set_attribute("server.address", host)
    span.set_attribute("server.port", port)
    span.set_attribute("component", "proxy")
    if call.cluster is not None:
        span.set_attribute("upstream_cluster", call.cluster)


def _peer(span: Any, ep: Any) -> None:
    host, port = _split_authority(ep.key)
    span.set_attribute("network.peer.address", host)
    if port is not None:
        span.set_attribute("network.peer.port", port)


def _end_attempt(child: Any, a: Any, exc: Optional[BaseException] = None) -> None:
    if child.is_recording():
        if a.status is not None:
            child.set_attribute("http.response.status_code", a.status)
        error = None
        if a.status is not None and a.status >= 500:
            error = str(a.status)
        elif a.error is not None and a.status is None:
            error = a.error
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            child.set_attribute("error.type", error)
            child.set_status(Status(StatusCode.ERROR))
    child.end()


def _end_attributes(span: Any, call: Any, result: Any, exc: Optional[BaseException]) -> None:
    from opentelemetry.trace import Status, StatusCode

    from .outcome import outcome_of

    attempts = call.attempts
    a = attempts[-1] if attempts else None
    grpc = _is_grpc(call.headers)
    code, grpc_status, flags, _details = outcome_of(call, a, exc, grpc)
    span.set_attribute("response_flags", flags)
    error: Optional[str] = None
    status = a.status if a is not None else None
    if a is not None:
        _peer(span, a.endpoint)
        if a.number > 1:
            span.set_attribute("http.request.resend_count", a.number - 1)
            span.set_attribute("retry.count", a.number - 1)
        if status is None and a.error is not None:
            error = a.error
    if status is None and exc is None and result is not None:
        status = getattr(result, "status_code", None) or getattr(result, "status", None)
        if not isinstance(status, int):
            status = None
    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            error = str(status)
    elif code:
        span.set_attribute("envoy.response_code", code)  # Envoy's local reply (no upstream answer)
        if code >= 500 and error is None:
            error = str(code)
    if grpc_status is not None:
        span.set_attribute("rpc.grpc.status_code", grpc_status)
        span.set_attribute("grpc.status_code", grpc_status)
    if exc is not None and error is None:
        error = type(exc).__qualname__
    if error is not None:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, str(exc) if exc is not None else None))


def _is_grpc(headers: Any) -> bool:
    if not headers:
        return False
    from .._routing import header_pairs

    for k, v in header_pairs(headers):
        if k.lower() == "content-type":
            return v.startswith("application/grpc")
    return False


def _headers(sc: Any, parent_b3: Optional[str], request_id: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    trace_id = format(sc.trace_id, "032x")
    span_id = _hex_span(sc.span_id)
    sampled = bool(sc.trace_flags & 1)
    pairs: List[Tuple[str, str]] = [("traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")]
    state = sc.trace_state
    if state:
        pairs.append(("tracestate", state.to_header()))
    pairs.append(("x-b3-traceid", trace_id))
    pairs.append(("x-b3-spanid", span_id))
    if parent_b3 is not None:
        pairs.append(("x-b3-parentspanid", parent_b3))
    pairs.append(("x-b3-sampled", "1" if sampled else "0"))
    if request_id is not None:
        pairs.append(("x-request-id", request_id))
    return tuple(pairs)


def _incoming(headers: Any) -> Tuple[Optional[str], Optional[str], bool]:
    """``(traceparent, tracestate, has x-request-id)`` of the application's request headers."""
    traceparent = tracestate = None
    has_id = False
    if headers:
        from .._routing import header_pairs

        for k, v in header_pairs(headers):
            lk = k.lower()
            if lk == "x-request-id":
                has_id = has_id or bool(v)
            elif lk == "traceparent" and traceparent is None:
                traceparent = v
            elif lk == "tracestate" and tracestate is None:
                tracestate = v
    return traceparent, tracestate, has_id


def _span_name(call: Any) -> str:
    route = call.route
    decorator = getattr(route, "decorator", None) or getattr(route, "decorator_operation", None)
    if decorator:
        return str(getattr(decorator, "operation", decorator))
    return f"egress {call.authority}"


def begin(call: Any) -> Optional[Trace]:
    """Start tracing ``call`` (None: tracing is off, or could not start). Never raises."""
    tracer = TRACER[0]
    if tracer is None:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.context import get_current

        traceparent, tracestate, has_id = _incoming(call.headers)
        ctx = None
        if traceparent is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            carrier = {"traceparent": traceparent}
            if tracestate is not None:
                carrier["tracestate"] = tracestate
            ctx = TraceContextTextMapPropagator().extract(carrier)
            if not trace.get_current_span(ctx).get_span_context().is_valid:
                ctx = None
        if ctx is None:
            ctx = get_current()
        parent = trace.get_current_span(ctx).get_span_context()
        name = _span_name(call)
        span = tracer.start_span(name, context=ctx, kind=trace.SpanKind.CLIENT)
        request_id = None if has_id else str(uuid.uuid4())
        if span.is_recording():
            _start_attributes(span, call)
            span.set_attribute("guid:x-request-id", request_id or _request_id(call.headers) or "")
            node = getattr(getattr(getattr(call.mesh, "bootstrap", None), "node", None), "id", None)
            if node:
                span.set_attribute("node_id", node)
        parent_b3 = _hex_span(parent.span_id) if parent.is_valid else None
        return Trace(tracer, span, name, bool(_CONFIG["attempt_spans"]), request_id, parent_b3, call)
    except Exception:  # noqa: BLE001
        log.exception("tracing: could not start the span of %r", call)
        return None


def _request_id(headers: Any) -> Optional[str]:
    from .._routing import header_pairs

    for k, v in header_pairs(headers):
        if k.lower() == "x-request-id":
            return v
    return None
