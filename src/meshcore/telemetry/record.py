"""The per-request record and the sink hook (``mesh.telemetry``).

One :class:`RequestRecord` describes one finished downstream request: made through meshcore
(``reporter="source"``: ``call.run(send)``, ``with mesh.request(...)``, every client
integration) or served (``reporter="destination"``). The request lifecycle builds it only when
``mesh.telemetry`` has a sink, after the outcome is known (off the pick path), and passes it to
each sink in registration order. A sink's exception is logged once per sink and never reaches
the caller.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["RequestRecord", "Sink", "Telemetry", "NO_FLAGS", "ACTIVE", "ENV_ISTIO_METRICS", "exchange_of",
           "active_add"]

log = logging.getLogger(__name__)

#: ``ACTIVE``, ``[n]``: how many Telemetry objects of the process have a sink (plus one while
#: tracing is on). The request path's first test (one list read) before it looks at its own mesh's
#: sinks; defined with it (``meshcore._fast._consts``). Only :func:`active_add` changes it (under
#: one process-wide lock: meshes change it concurrently).
from .._fast._consts import ACTIVE
_ACTIVE_LOCK = threading.Lock()


def active_add(n: int) -> None:
    """``ACTIVE[0] += n`` under the process-wide lock (a read-modify-write that two meshes, or a
    mesh and tracing, may run at once). Off the request path: sinks added or removed."""
    with _ACTIVE_LOCK:
        ACTIVE[0] += n


#: Envoy's ``%RESPONSE_FLAGS%`` when no flag is set
NO_FLAGS = "-"

#: set to 1/true when a mesh is made: ``mesh.telemetry.enable_istio_metrics()`` at once
ENV_ISTIO_METRICS = "MESHCORE_ISTIO_METRICS"


class RequestRecord:
    """One finished request (see the module docstring). Plain attributes, filled once.

    ``response_code``/``response_flags``: what Envoy's router logs for the same outcome
    (``meshcore.telemetry.outcome``): the upstream's status, or the status of the local reply
    Envoy would have sent when there was no answer (503 UH/UF/UO/UC/URX, 504 UT, 404 NR, the
    abort's FI; a gRPC request: 200 and the mapped grpc-status), 0 only when Envoy would have
    answered nothing either (``DC``: the caller gave up; an exception of the caller's own).
    Flags are Envoy's short names, comma-joined in the order Envoy sets them (``URX,UF``), ``"-"``
    for none. ``duration_ms`` runs from the call's start (before a fault delay) to its end;
    ``request_bytes``/``response_bytes`` are the body sizes meshcore knows (0 when unknown);
    ``peer_metadata`` is the decoded ``x-envoy-peer-metadata`` of the response (a sidecar'd
    server; a dict with Istio's keys, shared: do not change it), ``None`` when absent.

    Integrations tell the hook what only they see through ``attempt.telemetry`` (set only while
    ``ACTIVE[0]``): a dict with ``peer_metadata`` (the raw header value they stripped),
    ``request_bytes``, ``response_bytes``, ``request_messages``, ``response_messages``.
    """

    __slots__ = ("reporter", "target", "authority", "method", "path", "protocol", "route_name", "cluster",
                 "upstream_host", "endpoint", "response_code", "grpc_status", "response_flags", "attempts",
                 "start_time", "duration_ms", "request_bytes", "response_bytes", "request_id", "peer_metadata",
                 "connection_security_policy", "principal", "request_messages", "response_messages",
                 "response_code_details", "upstream_failure")

    reporter: str
    target: str
    authority: str
    method: str
    path: str
    #: Istio's request_protocol: "http" or "grpc"
    protocol: str
    route_name: Optional[str]
    cluster: Optional[str]
    #: "ip:port" of the last attempt's endpoint
    upstream_host: Optional[str]
    #: the last attempt's Endpoint (``.metadata``: EDS filter_metadata, "istio" included)
    endpoint: Any
    response_code: int
    grpc_status: Optional[int]
    response_flags: str
    attempts: int
    #: epoch seconds
    start_time: float
    duration_ms: float
    request_bytes: int
    response_bytes: int
    request_id: Optional[str]
    peer_metadata: Optional[Dict[str, Any]]
    #: "mutual_tls" | "none" | "unknown" ("unknown" on the client side, as Istio)
    connection_security_policy: str
    #: the peer's principal (server side)
    principal: Optional[str]
    #: gRPC messages sent/received (gRPC streams; 1/1 for a unary RPC; 0 when unknown)
    request_messages: int
    response_messages: int
    #: why the request ended as it did (Envoy's %RESPONSE_CODE_DETAILS% spelling where one applies)
    response_code_details: Optional[str]
    #: the last attempt's upstream failure kind (connect-failure, reset, timeout), if any
    upstream_failure: Optional[str]

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, _DEFAULTS.get(name)))
        if fields:
            raise TypeError(f"unknown RequestRecord fields: {sorted(fields)}")

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return (f"RequestRecord({self.reporter} {self.method} {self.authority}{self.path} -> {self.cluster} "
                f"{self.upstream_host} code={self.response_code} flags={self.response_flags} "
                f"attempts={self.attempts} {self.duration_ms:.3f}ms)")


_DEFAULTS: Dict[str, Any] = {
    "reporter": "source", "target": "", "authority": "", "method": "GET", "path": "/", "protocol": "http",
    "response_code": 0, "response_flags": NO_FLAGS, "attempts": 0, "start_time": 0.0, "duration_ms": 0.0,
    "request_bytes": 0, "response_bytes": 0, "connection_security_policy": "unknown", "request_messages": 0,
    "response_messages": 0,
}

Sink = Callable[[RequestRecord], Any]


def exchange_of(mesh: Any) -> Any:
    """``mesh.telemetry.exchange`` (the metadata exchange to apply), or None (also for a mesh-like
    object without telemetry)."""
    telemetry = getattr(mesh, "telemetry", None)
    return telemetry.exchange if telemetry is not None else None


class Telemetry:
    """``mesh.telemetry``: the sinks that receive every finished request's record.

    ``sinks`` is a tuple, empty when none is registered: the request path reads it and builds no
    record at all while it is empty.
    """

    def __init__(self, mesh: Any = None) -> None:
        self._mesh = mesh
        self.sinks: Tuple[Sink, ...] = ()
        self._lock = threading.Lock()
        self._failed: Dict[int, None] = {}  # id(sink) whose exception was logged
        #: the peer-metadata exchange the integrations apply (``peer_metadata.Exchange``: the
        #: x-envoy-peer-metadata(-id) request headers to send; responses' ones are read and
        #: stripped), or None: nothing sent, nothing stripped
        self.exchange: Any = None
        #: the Istio standard metrics sink (``istio_metrics.IstioMetrics``), or None
        self.istio_metrics: Any = None
        #: while the Istio sink is the only sink: its observer (``observe(call, result)`` counts
        #: the usual answer without a record: True), else None. Kept by :meth:`_refresh`.
        self.observe: Any = None
        #: the same observer object (``IstioObserver``: its ``answered`` finishes an integration's
        #: first attempt and counts it), or None; set and cleared with :attr:`observe`
        self.observer: Any = None
        if mesh is not None:  # tracing follows the application's OpenTelemetry tracer provider
            from .tracing import watch

            watch()
        if mesh is not None and os.environ.get(ENV_ISTIO_METRICS, "").strip().lower() in ("1", "true", "yes", "on"):
            self.enable_istio_metrics()

    def enable_istio_metrics(self, *, exchange: bool = True, node_metadata: Optional[Mapping[str, Any]] = None,
                             buckets: Optional[Sequence[float]] = None) -> Any:
        """Record Istio's standard metrics (``istio_requests_total`` & co) for every request made
        through the mesh (``reporter="source"``) and every request served through the server
        integrations given this mesh (``reporter="destination"``), exposed by
        ``mesh.prometheus_collector()``; returns the
        sink (:class:`~meshcore.telemetry.istio_metrics.IstioMetrics`; calling again returns it; its
        ``exchange`` argument then turns the exchange on or off).

        ``exchange`` (default on): Istio's metadata exchange, as a client sidecar does: every
        request carries ``x-envoy-peer-metadata-id`` (the node ID) and ``x-envoy-peer-metadata``
        (this workload, from the bootstrap node's metadata), so a sidecar'd server reports the
        right ``source_*`` labels and answers with its own metadata, which gives the
        ``destination_*`` labels and is stripped from the response before the application sees
        it. ``node_metadata`` replaces the bootstrap node's metadata (a dict with Istio's keys:
        WORKLOAD_NAME, NAMESPACE, LABELS, CLUSTER_ID, ...); ``buckets``: histogram bounds
        (Envoy's defaults). Also enabled by ``MESHCORE_ISTIO_METRICS=1`` when the mesh is made."""
        from .istio_metrics import IstioMetrics
        from .peer_metadata import local_exchange

        with self._lock:
            sink = self.istio_metrics
            if sink is None:
                kw = {} if buckets is None else {"buckets": buckets}
                sink = self.istio_metrics = IstioMetrics(self._mesh, node_metadata, **kw)
            if exchange and self.exchange is None:
                node = getattr(getattr(self._mesh, "bootstrap", None), "node", None)
                self.exchange = local_exchange(node, node_metadata)
            elif not exchange:  # (called again: the exchange follows the argument)
                self.exchange = None
            self._refresh()
        self.add_sink(sink)
        return sink

    def disable_istio_metrics(self) -> None:
        """Stop recording Istio's metrics and exchanging metadata (the series recorded are dropped)."""
        with self._lock:
            sink, self.istio_metrics, self.exchange = self.istio_metrics, None, None
            self._refresh()
        if sink is not None:
            self.remove_sink(sink)

    def enable_access_log(self, format: Any = "envoy", logger: Any = None,  # noqa: A002
                          filter: Optional[Callable[[RequestRecord], Any]] = None) -> Any:  # noqa: A002
        """Log one line per finished request at INFO on ``logger`` (``meshcore.access`` unless a name
        or Logger is given): ``format`` ``"envoy"`` (Envoy's default), ``"istio"`` (a sidecar's),
        ``"json"`` (Istio's JSON), an Envoy format string or a ``json_format`` dict; ``filter(record)``
        keeps the records it is true for. Returns the sink (``remove_sink(sink)`` stops it);
        see :mod:`meshcore.telemetry.access_log`."""
        from .access_log import enable_access_log

        return enable_access_log(self, format, logger, filter)

    def add_sink(self, sink: Sink) -> Sink:
        """Register ``sink(record)``; returns it (usable as a decorator). Adding it twice is a no-op."""
        if not callable(sink):
            raise TypeError(f"a sink must be callable, not {type(sink).__name__}")
        with self._lock:
            if sink not in self.sinks:
                if not self.sinks:
                    active_add(1)
                self.sinks = self.sinks + (sink,)
                self._refresh()
        return sink

    def remove_sink(self, sink: Sink) -> None:
        """Unregister ``sink`` (absent: no-op)."""
        with self._lock:
            had = bool(self.sinks)
            self.sinks = tuple(s for s in self.sinks if s is not sink and s != sink)
            self._failed.pop(id(sink), None)
            if had and not self.sinks:
                active_add(-1)
            self._refresh()

    def close(self) -> None:
        """The mesh closed: drop every sink (the Istio metrics recorded stay readable)."""
        with self._lock:
            if self.sinks:
                active_add(-1)
            self.sinks = ()
            self.exchange = None
            self._refresh()

    def _refresh(self) -> None:
        """(Under ``_lock``.) ``observe``: the Istio sink's observer while it is the only sink."""
        sink = self.istio_metrics
        if sink is not None and self.sinks == (sink,):
            observer = sink.observer
            observer.peers = self.exchange is not None
            self.observe = observer.observe  # (the bound method: a vectorcall, no argument tuple)
            self.observer = observer
        else:
            self.observe = None
            self.observer = None

    def emit(self, record: RequestRecord) -> None:
        """Hand ``record`` to every sink; a sink's exception is logged (once per sink) and swallowed."""
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001  (a sink never fails the request)
                self.emit_failed(sink)

    def emit_failed(self, sink: Sink) -> None:
        """``sink`` raised (the exception being handled): logged the first time only."""
        key = id(sink)
        if key not in self._failed:
            self._failed[key] = None
            log.exception("telemetry sink %r failed (logged once; later failures are silent)", sink)

    def __repr__(self) -> str:
        return f"Telemetry(sinks={len(self.sinks)})"
