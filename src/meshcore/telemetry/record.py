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
import threading
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["RequestRecord", "Sink", "Telemetry", "NO_FLAGS"]

log = logging.getLogger(__name__)

#: Envoy's ``%RESPONSE_FLAGS%`` when no flag is set
NO_FLAGS = "-"


class RequestRecord:
    """One finished request (see the module docstring). Plain attributes, filled once.

    ``response_code`` is 0 when there was no response (Envoy/Istio); ``response_flags`` are
    Envoy's short flags, comma-joined in Envoy's order (``"-"``: none); ``duration_ms`` runs from
    the call's start (before a fault delay) to its end; ``request_bytes``/``response_bytes`` are
    what meshcore knows of the bodies (0 when unknown); ``peer_metadata`` is the decoded
    ``x-envoy-peer-metadata`` of the response (a sidecar'd server), ``None`` when absent.
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
        #: the peer-metadata exchange (x-envoy-peer-metadata) the integrations apply, or None
        self.exchange: Any = None
        self.istio_metrics: Any = None

    def add_sink(self, sink: Sink) -> Sink:
        """Register ``sink(record)``; returns it (usable as a decorator). Adding it twice is a no-op."""
        if not callable(sink):
            raise TypeError(f"a sink must be callable, not {type(sink).__name__}")
        with self._lock:
            if sink not in self.sinks:
                self.sinks = self.sinks + (sink,)
        return sink

    def remove_sink(self, sink: Sink) -> None:
        """Unregister ``sink`` (absent: no-op)."""
        with self._lock:
            self.sinks = tuple(s for s in self.sinks if s is not sink and s != sink)
            self._failed.pop(id(sink), None)

    def emit(self, record: RequestRecord) -> None:
        """Hand ``record`` to every sink; a sink's exception is logged (once per sink) and swallowed."""
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001  (a sink never fails the request)
                key = id(sink)
                if key not in self._failed:
                    self._failed[key] = None
                    log.exception("telemetry sink %r failed (logged once; later failures are silent)", sink)

    def __repr__(self) -> str:
        return f"Telemetry(sinks={len(self.sinks)})"
