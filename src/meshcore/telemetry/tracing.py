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
integration: httpx, requests, aiohttp, gRPC) gets what Envoy 1.40's OpenTelemetry tracer makes for
an outbound sidecar (checked span for span against a real Envoy: tests/telemetry/test_tracing_envoy.py):

* **one CLIENT span per request**, the Envoy egress span, child of the current OpenTelemetry
  context, or of the request's own ``traceparent`` when the application put one there (Envoy
  extracts the incoming context), else (B3 on) of its B3 headers (Envoy's Zipkin tracer);
  sampled by the application's sampler (the SDK default, ``ParentBased(ALWAYS_ON)``, follows
  the parent's sampled flag and decides roots). Its name is Envoy's: the route's
  ``decorator.operation`` (Istio sets ``<host>:<port>/*``), else ``egress <authority>``.
* Envoy's tags: ``component=proxy``, ``http.method``, ``http.url``, ``http.status_code`` (a
  string: the code the application got, Envoy's local replies included: 404 NR, 503 UH/UO/URX,
  504 UT), ``response_flags``, ``upstream_cluster`` and ``upstream_cluster.name`` (none for NR),
  ``guid:x-request-id``, ``node_id`` (the bootstrap node), ``error=true`` (a 5xx, or a gRPC
  status other than OK), ``grpc.status_code``, ``grpc.path``/``grpc.authority``/``grpc.content_type``
  (gRPC), ``retry.count``; and OpenTelemetry's stable HTTP
  client attributes: ``http.request.method``, ``url.full``, ``server.address`` (the logical
  host, as the ``Host`` header), ``server.port``, ``network.peer.address``/``network.peer.port``
  (the endpoint of the last attempt), ``http.response.status_code`` (an upstream answer),
  ``error.type``, ``http.request.resend_count``. Status ERROR as Envoy's tracer sets it: a code
  from 400 on a CLIENT span (from 500 on a SERVER span), or no answer.
* **retries**: by default one span per request; every attempt carries the request span's context
  (Envoy as Istio configures it: no ``spawn_upstream_span``), and meshcore adds a span event
  ``upstream_attempt`` per attempt that was retried. With ``configure(attempt_spans=True)``:
  Envoy's ``spawn_upstream_span`` shape: the request span is SERVER (as Envoy's downstream span
  then is) and each attempt gets a child CLIENT span ``router <cluster> egress`` with
  ``upstream_address``, ``retry.count`` (from the second attempt), ``http.status_code`` (``0``
  without an answer), ``error=true``, ``canceled=true`` (retried or timed out), whose context the
  attempt carries. (One difference: an attempt that timed out is ERROR here; Envoy tags it
  ``error=true`` and leaves its status unset.)
* **propagation** into each attempt's upstream request, replacing the application's headers of
  those names (:data:`TRACE_HEADERS`): W3C ``traceparent``/``tracestate`` and, unless
  ``configure(b3=False)``, B3 multi-header (``x-b3-traceid``, ``x-b3-spanid``,
  ``x-b3-parentspanid``, ``x-b3-sampled``); Envoy's OpenTelemetry tracer sends W3C only (and an
  empty ``tracestate`` when there is none; meshcore none), so with ``b3=False`` the application's
  own B3 headers pass unchanged, as through Envoy. ``x-request-id``: the application's, else a new
  UUID4, with Envoy's trace mark in its 15th character (``9`` sampled, ``4`` not; Envoy's
  ``UUIDRequestIDExtension``: only a 36-character id is marked), which a server's sidecar reads as
  the trace decision. ``x-envoy-decorator-operation``: the route decorator's operation unless
  ``propagate: false`` (else the application's own passes). ``x-request-id`` and
  ``x-envoy-decorator-operation`` come with tracing (Envoy's ``generate_request_id`` is on by
  default; here a mesh without tracing sends exactly the application's headers).
* the forms without a router loop: the single-attempt form (``with mesh.request(...) as
  attempt``) gets its span from ``lifecycle.report_single`` (begun with the attempt when
  ``lifecycle.begin_single`` was called, so the attempt carries its headers; else made when the
  block ends, from the call's start); a request ``Mesh.request`` refuses (no route, no cluster)
  from :func:`trace_refusal`; anything else that drives attempts itself (a gRPC stream) uses
  :func:`begin` and :class:`Trace` (``attempt(a)`` before each attempt, ``end(result, exc)``).

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

from .record import active_add

__all__ = ["TRACER", "configure", "disable", "refresh", "watch", "headers_of", "begin", "Trace",
           "begin_single", "end_single", "trace_refusal", "ENV_TRACING", "RECHECK_S", "TRACE_HEADERS"]

log = logging.getLogger(__name__)

#: ``[tracer or None]``: the OpenTelemetry tracer requests are traced with (None: off)
TRACER: List[Any] = [None]
#: set to 0/false to never trace
ENV_TRACING = "MESHCORE_TRACING"
#: seconds between two checks of the application's tracer provider
RECHECK_S = 5.0
#: the headers an attempt's :func:`headers_of` sets while tracing is on: an application's own of
#: these names are replaced by them (its x-request-id comes back with Envoy's trace mark, its
#: x-envoy-decorator-operation and, with ``b3=False``, its B3 headers unchanged)
TRACE_HEADERS = frozenset(["traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                           "x-b3-sampled", "x-b3-flags", "b3", "x-request-id", "x-envoy-decorator-operation"])

_lock = threading.Lock()
#: explicit configuration: {"provider": TracerProvider or None, "attempt_spans": bool, "disabled": bool}
_CONFIG: Dict[str, Any] = {"provider": None, "attempt_spans": False, "disabled": False, "b3": True}
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
        if tracer is None and _SINGLE:  # off: the single-form spans still open are dropped, not ended
            for trace in list(_SINGLE.values()):
                _PENDING.pop(trace.call, None)
                for a in trace.call.attempts:
                    _PENDING.pop(a, None)
            _SINGLE.clear()
        if (tracer is not None) != _counted[0]:
            _counted[0] = tracer is not None
            active_add(1 if tracer is not None else -1)
        return tracer


def configure(tracer_provider: Any = None, *, attempt_spans: Optional[bool] = None,
              b3: Optional[bool] = None) -> Any:
    """Trace with ``tracer_provider`` (None: the application's global one, when configured);
    ``attempt_spans``: a child span per attempt (Envoy's ``spawn_upstream_span``); ``b3``: send
    B3 multi-header besides W3C trace context (default on; Envoy's OpenTelemetry tracer sends
    W3C only, its Zipkin tracer B3). Returns the tracer in use (None: off)."""
    _CONFIG["provider"] = tracer_provider
    _CONFIG["disabled"] = False
    if attempt_spans is not None:
        _CONFIG["attempt_spans"] = bool(attempt_spans)
    if b3 is not None:
        _CONFIG["b3"] = bool(b3)
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
    _SINGLE.clear()


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
    """The spans of one traced call (what :func:`begin` returns).

    How a caller drives it (``lifecycle.run_reported`` does this; a gRPC stream would too):
    ``trace.attempt(a)`` before each attempt ``a`` is sent (the attempt's headers are then
    :func:`headers_of` ``(a)``), and ``trace.end(result, exc)`` once, when the call ended
    (``result``: what the last attempt returned, or ``None``; ``exc``: what the call raised, or
    ``None``; the attempts' ``status`` / ``grpc_status`` / ``error`` are read from the call)."""

    __slots__ = ("tracer", "span", "name", "attempt_spans", "extra", "parent_b3", "open", "call", "b3",
                 "request_id", "start_time", "start_attrs")

    def __init__(self, tracer: Any, span: Any, name: str, attempt_spans: bool, extra: Tuple[Tuple[str, str], ...],
                 parent_b3: Optional[str], call: Any, b3: bool = True, request_id: str = "",
                 start_time: Optional[int] = None) -> None:
        self.tracer = tracer
        self.span = span
        self.name = name
        self.attempt_spans = attempt_spans
        self.extra = extra  # header pairs every attempt carries besides the trace context (x-request-id, ...)
        self.parent_b3 = parent_b3  # x-b3-parentspanid for headers carrying the request span
        self.open: Optional[Tuple[Any, Any]] = None  # (attempt, its child span) not yet ended
        self.call = call
        self.b3 = b3
        self.request_id = request_id  # the x-request-id every attempt carries
        self.start_time = start_time  # epoch ns for spans made after the fact (None: now)
        #: the request span's start attributes (attempt spans copy them)
        self.start_attrs: Optional[Dict[str, Any]] = None

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
                cluster = getattr(a, "cluster", None) or self.call.cluster or ""
                # Envoy's upstream span (spawn_upstream_span): "router <cluster> egress", CLIENT
                child = self.tracer.start_span(f"router {cluster} egress", context=ctx, kind=trace.SpanKind.CLIENT,
                                               start_time=self.start_time)
                if child.is_recording():
                    attrs = self.start_attrs
                    if attrs is None:
                        attrs = self.start_attrs = _start_attributes(self.call, self.request_id)
                    attrs = dict(attrs)
                    attrs["upstream_address"] = a.endpoint.key
                    if a.number > 1:
                        attrs["retry.count"] = str(a.number - 1)
                        attrs["http.request.resend_count"] = a.number - 1
                    _peer(attrs, a.endpoint)
                    child.set_attributes(attrs)
                parent_b3 = _hex_span(span.get_span_context().span_id)
                self.open = (a, child)
                span = child
            _PENDING[a] = _headers(span.get_span_context(), parent_b3, self.extra, self.b3)
        except Exception:  # noqa: BLE001  (tracing never fails a request)
            log.exception("tracing: could not start an attempt of %r", self.call)

    def _close_previous(self) -> None:
        """The attempt before this one ended: its child span (or, without child spans, an event)."""
        attempts = self.call.attempts
        if self.open is not None:
            a, child = self.open
            self.open = None
            _end_attempt(child, a, retried=True)
        elif not self.attempt_spans and len(attempts) > 1:
            prev = attempts[-2]
            if self.span.is_recording():
                self.span.add_event("upstream_attempt", _attempt_event(prev))

    def end(self, result: Any, exc: Optional[BaseException]) -> None:
        """The call ended: returned ``result`` or raised ``exc``."""
        call = self.call
        try:
            _PENDING.pop(call, None)
            for a in call.attempts:
                _PENDING.pop(a, None)
            if self.open is not None:
                a, child = self.open
                self.open = None
                _end_attempt(child, a)
            span = self.span
            if span.is_recording():
                _end_attributes(span, call, result, exc, self.attempt_spans)
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


def _start_attributes(call: Any, request_id: str) -> Dict[str, Any]:
    """The attributes known when a span starts: OpenTelemetry's HTTP client ones and Envoy's tags
    (``Tracing::HttpTracerUtility::setCommonTags``/``finalizeDownstreamSpan``: ``component``,
    ``http.method``, ``http.url``, ``guid:x-request-id``, ``node_id``, ``upstream_cluster``,
    ``upstream_cluster.name``)."""
    scheme = call.scheme
    authority = call.authority
    host, port = _split_authority(authority)
    if port is None:
        target_port = call.target.rpartition(":")[2]
        port = int(target_port) if target_port.isdigit() else (443 if scheme == "https" else 80)
    url = f"{scheme}://{authority}{call.path}"
    attrs: Dict[str, Any] = {
        "http.request.method": call.method, "url.full": url, "server.address": host, "server.port": port,
        "component": "proxy", "http.method": call.method, "http.url": url, "guid:x-request-id": request_id,
    }
    content_type = _content_type(call.headers)
    if content_type is not None and content_type.startswith("application/grpc"):
        # Envoy's gRPC request tags (HttpTracerUtility::addGrpcRequestTags)
        attrs["grpc.path"] = call.path
        attrs["grpc.authority"] = authority
        attrs["grpc.content_type"] = content_type
    cluster = call.cluster
    if cluster:
        attrs["upstream_cluster"] = cluster
        attrs["upstream_cluster.name"] = cluster
    node = getattr(getattr(getattr(call.mesh, "bootstrap", None), "node", None), "id", None)
    if node:
        attrs["node_id"] = node
    return attrs


def _peer(attrs: Dict[str, Any], ep: Any) -> None:
    host, port = _split_authority(ep.key)
    attrs["network.peer.address"] = host
    if port is not None:
        attrs["network.peer.port"] = port


def _end_attempt(child: Any, a: Any, retried: bool = False) -> None:
    """An attempt's child span ends as Envoy's upstream span does: ``http.status_code`` (``0``
    without an answer), ``error=true`` for a 5xx or no answer, ``canceled`` when it was retried or
    timed out; status ERROR for a 4xx/5xx (a CLIENT span) or no answer."""
    if child.is_recording():
        status = a.status
        attrs: Dict[str, Any] = {"http.status_code": str(status if status is not None else 0),
                                 "response_flags": "-"}
        error = None
        if status is not None:
            attrs["http.response.status_code"] = status
            if status >= 400:
                error = str(status)
        elif a.error is not None:
            error = a.error
        if error is not None:
            attrs["error.type"] = error
            if status is None or status >= 500:
                attrs["error"] = "true"
        if retried or (status is None and a.error == "timeout"):
            attrs["canceled"] = "true"
        child.set_attributes(attrs)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            child.set_status(Status(StatusCode.ERROR))
    child.end()


def _end_attributes(span: Any, call: Any, result: Any, exc: Optional[BaseException], server: bool = False) -> None:
    """The request span's end: Envoy's ``http.status_code`` (the code the application got,
    Envoy's local reply included), ``response_flags``, ``error=true`` (5xx, or a gRPC status
    other than OK), ``grpc.status_code``; OpenTelemetry's ``http.response.status_code`` (an
    upstream answer), ``error.type``. Status ERROR as Envoy's OpenTelemetry tracer sets it: a
    code >= 400 on a CLIENT span, >= 500 on a SERVER span (the request span is SERVER when it
    has attempt spans, as Envoy's downstream span with ``spawn_upstream_span``)."""
    from opentelemetry.trace import Status, StatusCode

    from .outcome import outcome_of

    attempts = call.attempts
    a = attempts[-1] if attempts else None
    grpc = _is_grpc(call.headers)
    code, grpc_status, flags, _details = outcome_of(call, a, exc, grpc)
    attrs: Dict[str, Any] = {"response_flags": flags}
    error: Optional[str] = None
    status = a.status if a is not None else None
    if a is not None:
        _peer(attrs, a.endpoint)
        if a.number > 1:
            attrs["http.request.resend_count"] = a.number - 1
            attrs["retry.count"] = str(a.number - 1)
        if status is None and a.error is not None:
            error = a.error
    if status is None and exc is None and result is not None:
        status = getattr(result, "status_code", None) or getattr(result, "status", None)
        if not isinstance(status, int):
            status = None
    threshold = 500 if server else 400
    if status is not None:
        attrs["http.response.status_code"] = status
        code = code or status
        if status >= threshold:
            error = str(status)
    elif code:
        attrs["envoy.response_code"] = code  # Envoy's local reply (no upstream answer)
        if code >= threshold and error is None:
            error = str(code)
    attrs["http.status_code"] = str(code)
    envoy_error = code >= 500
    grpc_error = False
    if grpc_status is not None:
        attrs["rpc.grpc.status_code"] = grpc_status
        attrs["grpc.status_code"] = str(grpc_status)  # Envoy's tag (a string)
        grpc_error = grpc_status != 0
        if grpc_error:
            envoy_error = True
            if error is None:
                error = str(grpc_status)
    if envoy_error:
        attrs["error"] = "true"
    if exc is not None and error is None:
        error = type(exc).__qualname__
    if error is not None:
        attrs["error.type"] = error
    span.set_attributes(attrs)
    if error is not None and (status is None or status >= threshold or exc is not None or grpc_error):
        span.set_status(Status(StatusCode.ERROR, str(exc) if exc is not None else None))


def _content_type(headers: Any) -> Optional[str]:
    if not headers:
        return None
    from .._routing import header_pairs

    for k, v in header_pairs(headers):
        if k.lower() == "content-type":
            return v
    return None


def _is_grpc(headers: Any) -> bool:
    content_type = _content_type(headers)
    return content_type is not None and content_type.startswith("application/grpc")


def _headers(sc: Any, parent_b3: Optional[str], extra: Tuple[Tuple[str, str], ...],
             b3: bool = True) -> Tuple[Tuple[str, str], ...]:
    trace_id = format(sc.trace_id, "032x")
    span_id = _hex_span(sc.span_id)
    sampled = bool(sc.trace_flags & 1)
    pairs: List[Tuple[str, str]] = [("traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")]
    state = sc.trace_state
    if state:
        pairs.append(("tracestate", state.to_header()))
    if b3:
        pairs.append(("x-b3-traceid", trace_id))
        pairs.append(("x-b3-spanid", span_id))
        if parent_b3 is not None:
            pairs.append(("x-b3-parentspanid", parent_b3))
        pairs.append(("x-b3-sampled", "1" if sampled else "0"))
    pairs.extend(extra)
    return tuple(pairs)


_B3_HEADERS = frozenset(["x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3"])


def _incoming(headers: Any) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[str], List[Tuple[str, str]]]:
    """``(traceparent, tracestate, x-request-id, x-envoy-decorator-operation, B3 pairs)`` of the
    application's request headers (first values; ``None``: absent)."""
    traceparent = tracestate = request_id = operation = None
    b3: List[Tuple[str, str]] = []
    if headers:
        from .._routing import header_pairs

        for k, v in header_pairs(headers):
            lk = k.lower()
            if lk == "x-request-id":
                if request_id is None and v:
                    request_id = v
            elif lk == "traceparent":
                if traceparent is None:
                    traceparent = v
            elif lk == "tracestate":
                if tracestate is None:
                    tracestate = v
            elif lk == "x-envoy-decorator-operation":
                if operation is None:
                    operation = v
            elif lk in _B3_HEADERS:
                b3.append((lk, v))
    return traceparent, tracestate, request_id, operation, b3


def _b3_context(pairs: List[Tuple[str, str]]) -> Any:
    """The OpenTelemetry context of the application's B3 headers (multi-header, or the single
    ``b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]``), or None when they name no valid
    span: what Envoy's Zipkin tracer continues (``SpanContextExtractor``)."""
    h = dict(pairs)
    trace_id, span_id, sampled = h.get("x-b3-traceid"), h.get("x-b3-spanid"), h.get("x-b3-sampled")
    if h.get("x-b3-flags") == "1":
        sampled = "1"  # debug implies sampled
    if (trace_id is None or span_id is None) and h.get("b3"):
        parts = h["b3"].split("-")
        if len(parts) >= 2:
            trace_id, span_id = parts[0], parts[1]
            sampled = parts[2] if len(parts) > 2 else None
    if trace_id is None or span_id is None or len(trace_id) not in (16, 32) or len(span_id) != 16:
        return None
    try:
        tid, sid = int(trace_id, 16), int(span_id, 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    from opentelemetry import trace

    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled in ("1", "true", "d") else trace.TraceFlags.DEFAULT)
    sc = trace.SpanContext(tid, sid, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(sc))


def _decorator(call: Any) -> Any:
    """The route's ``DecoratorSpec`` (``None``: none); ``call.route`` is the route match, whose
    ``route`` is the route spec."""
    match = call.route
    spec = getattr(match, "route", None)
    return getattr(spec, "decorator", None) if spec is not None else getattr(match, "decorator", None)


def _span_name(call: Any) -> str:
    """Envoy's span name: the route decorator's operation, else ``egress <authority>``
    (``HttpTracerUtility``/``TracerImpl::startSpan`` for an OUTBOUND listener)."""
    decorator = _decorator(call)
    if decorator is not None and getattr(decorator, "operation", None):
        return str(decorator.operation)
    return f"egress {call.authority}"


#: the character of a 36-character x-request-id where Envoy records its trace decision
#: (source/extensions/request_id/uuid/config.cc: TRACE_BYTE_POSITION 14; '9' sampled, '4' not)
_TRACE_BYTE = 14


def _marked(request_id: str, sampled: bool) -> str:
    """``request_id`` with Envoy's trace status (UUIDRequestIDExtension::setTraceReason: only a
    36-character id is changed)."""
    if len(request_id) != 36:
        return request_id
    return f"{request_id[:_TRACE_BYTE]}{'9' if sampled else '4'}{request_id[_TRACE_BYTE + 1:]}"


def begin(call: Any, start_time: Optional[int] = None) -> Optional[Trace]:
    """Start tracing ``call`` (None: tracing is off, or could not start). Never raises.
    ``start_time``: the span's start (epoch ns) when it is made after the fact."""
    tracer = TRACER[0]
    if tracer is None:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.context import get_current

        traceparent, tracestate, request_id, operation, app_b3 = _incoming(call.headers)
        ctx = None
        if traceparent is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            carrier = {"traceparent": traceparent}
            if tracestate is not None:
                carrier["tracestate"] = tracestate
            ctx = TraceContextTextMapPropagator().extract(carrier)
            if not trace.get_current_span(ctx).get_span_context().is_valid:
                ctx = None
        b3 = bool(_CONFIG["b3"])
        if ctx is None and b3 and app_b3:
            ctx = _b3_context(app_b3)  # Envoy's Zipkin tracer extracts B3 (its OpenTelemetry one W3C)
        if ctx is None:
            ctx = get_current()
        parent = trace.get_current_span(ctx).get_span_context()
        decorator = _decorator(call)
        name = _span_name(call)
        attempt_spans = bool(_CONFIG["attempt_spans"])
        kind = trace.SpanKind.SERVER if attempt_spans else trace.SpanKind.CLIENT
        span = tracer.start_span(name, context=ctx, kind=kind, start_time=start_time)
        sampled = bool(span.get_span_context().trace_flags & 1)
        if request_id is None:
            request_id = str(uuid.uuid4())
        request_id = _marked(request_id, sampled)
        extra: List[Tuple[str, str]] = [("x-request-id", request_id)]
        if decorator is not None and getattr(decorator, "propagate", True) and getattr(decorator, "operation", ""):
            extra.append(("x-envoy-decorator-operation", decorator.operation))
        elif operation is not None:  # Envoy leaves the application's own
            extra.append(("x-envoy-decorator-operation", operation))
        if not b3:
            extra.extend(app_b3)  # not ours to set: the application's go through unchanged
        attrs = None
        if span.is_recording():
            attrs = _start_attributes(call, request_id)
            span.set_attributes(attrs)
        parent_b3 = _hex_span(parent.span_id) if parent.is_valid else None
        t = Trace(tracer, span, name, attempt_spans, tuple(extra), parent_b3, call, b3, request_id, start_time)
        t.start_attrs = attrs
        _PENDING[call] = (("x-request-id", request_id),)  # (the record of a call with no attempt reads it)
        return t
    except Exception:  # noqa: BLE001
        log.exception("tracing: could not start the span of %r", call)
        return None


# -- the forms without a router loop ---------------------------------------------------------------

#: call -> its Trace, for the single-attempt form (``with mesh.request(...) as attempt``) begun
#: when its attempt started (:func:`begin_single`), until the block ends (:func:`end_single`)
_SINGLE: Dict[Any, Trace] = {}
#: at most this many single-form calls open at once (a call entered and never left is forgotten)
MAX_OPEN_SINGLE = 4096


def _epoch_ns(monotonic_start: float) -> int:
    return time.time_ns() - int((time.monotonic() - monotonic_start) * 1e9)


def begin_single(call: Any, attempt: Any) -> None:
    """The single-attempt form's attempt started: its span starts and the attempt gets its
    headers (:func:`headers_of`). Never raises."""
    if TRACER[0] is None:
        return
    try:  # (Call.__enter__ calls it with the attempt started: an exception would leak the attempt)
        trace = begin(call)
        if trace is not None:
            trace.attempt(attempt)
            if len(_SINGLE) >= MAX_OPEN_SINGLE:  # calls entered and never left: forget the oldest
                old = _SINGLE.pop(next(iter(_SINGLE), None), None)  # (another thread may end it first)
                if old is not None:
                    _PENDING.pop(old.call, None)
                    for a in old.call.attempts:
                        _PENDING.pop(a, None)
            _SINGLE[call] = trace
    except Exception:  # noqa: BLE001
        log.exception("tracing: could not begin the span of %r", call)


def end_single(call: Any, exc: Optional[BaseException]) -> None:
    """The single-attempt form ended (``exc``: what left the block, or what refused the attempt
    before it started: no healthy upstream, a circuit breaker, a fault abort). When its span was
    not begun with the attempt (:func:`begin_single`), it is made now, starting when the call
    did. Never raises."""
    trace = _SINGLE.pop(call, None) if _SINGLE else None
    if trace is None:
        if TRACER[0] is None:
            return
        trace = begin(call, start_time=_epoch_ns(call.started))
        if trace is None:
            return
        if call.attempts:
            trace.attempt(call.attempts[-1])
    trace.end(None, exc)


class _Refused:
    """What :func:`trace_refusal` knows of a request ``Mesh.request`` refused (a call's fields)."""

    __slots__ = ("mesh", "target", "authority", "scheme", "method", "path", "headers", "cluster", "route",
                 "attempts", "retry_policy", "fault_decision")

    def __init__(self, mesh: Any, target: str, authority: str, scheme: str, method: str, path: str, headers: Any,
                 cluster: Optional[str], route: Any) -> None:
        self.mesh, self.target, self.authority, self.scheme = mesh, target, authority, scheme
        self.method, self.path, self.headers, self.cluster, self.route = method, path, headers, cluster, route
        self.attempts: List[Any] = []
        self.retry_policy = None
        self.fault_decision = None


def trace_refusal(mesh: Any, target: str, authority: str, method: str, path: str, headers: Any,
                  exc: BaseException, cluster: Optional[str] = None, route_name: Optional[str] = None, *,
                  scheme: str = "http", route: Any = None) -> Optional[str]:
    """The span of a request ``Mesh.request`` refused before any call existed, as Envoy makes it:
    no route (``NR``, 404) or the route's cluster missing (``NC``, 503), without
    ``upstream_cluster`` (Envoy has no cluster to name; ``cluster`` is not a tag);
    named ``egress <authority>`` (or the decorator of ``route``, a route match, when given);
    ``http.status_code``, ``response_flags``, ``error=true`` for a 5xx, status ERROR. A gRPC
    request gets Envoy's local gRPC answer (200, ``grpc.status_code`` 12 or 14). Made only while
    tracing is on; never raises; returns the x-request-id the span names (the request's own, with
    Envoy's trace mark, or a new one) or None. (Arguments as ``telemetry.outcome.report_refusal``'s.)"""
    if TRACER[0] is None:
        return None
    try:
        from opentelemetry.trace import Status, StatusCode

        from ..errors import NoRoute
        from .outcome import http_to_grpc

        # no upstream_cluster tag: Envoy sets it from the cluster it found, and neither has one
        refused = _Refused(mesh, target, authority, scheme, method, path, headers, None, route)
        trace = begin(refused)
        if trace is None:
            return None
        _PENDING.pop(refused, None)  # (the record reads the id returned below, not this entry)
        span = trace.span
        if span.is_recording():
            if isinstance(exc, NoRoute):
                code, flags = 404, "NR"
            else:
                code, flags = 503, "NC"
            attrs: Dict[str, Any] = {"response_flags": flags, "envoy.response_code": code}
            error = code >= 500
            if _is_grpc(headers):
                grpc_status = http_to_grpc(code)
                attrs["rpc.grpc.status_code"] = grpc_status
                attrs["grpc.status_code"] = str(grpc_status)
                code, error = 200, True
                attrs["envoy.response_code"] = code
            attrs["http.status_code"] = str(code)
            if error:
                attrs["error"] = "true"
            if route_name:
                attrs["route_name"] = route_name
            # Envoy's OpenTelemetry status: ERROR from 400 on a CLIENT span, from 500 on the
            # SERVER span of spawn_upstream_span (a 404 NR is not an error there)
            if error or code >= (500 if trace.attempt_spans else 400):
                attrs["error.type"] = str(code) if code >= 400 else flags
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.set_attributes(attrs)
        span.end()
        return trace.request_id
    except Exception:  # noqa: BLE001
        log.exception("tracing: could not trace a refused request to %s", target)
        return None
