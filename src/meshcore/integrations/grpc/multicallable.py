"""The base of the four multicallables: routing, the per-endpoint multicallable, and the
pick-once lifecycle of streaming RPCs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import grpc

from ...call import Attempt, Call, FaultAbort
from ...errors import MeshClosed, MeshError, UpstreamError
from ...resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ...telemetry.outcome import report as _report
from ...telemetry.record import ACTIVE as _TELEMETRY, exchange_of as _exchange_of
from ...telemetry.tracing import TRACE_HEADERS as _TRACE_HEADERS, TRACER as _TRACER, begin as _begin_trace
from ...telemetry.tracing import headers_of as _trace_pairs
from ._metadata import _with_exchange
from ._observed import ObservedCall, StreamReport, counted
from ._peer import peer_of as _tapped_peer
from ._types import Metadata
from .endpoints import _EndpointChannel
from .status import MeshRpcError, _failure_kind, _forward_error, _mesh_error

if TYPE_CHECKING:
    from .channel import MeshChannel


def _report_stream(call: Any, attempt: Attempt, finished: Any, kind: Optional[str], counts: Any,
                   ep: Any) -> None:
    """A streaming RPC ended: its record (the peer's x-envoy-peer-metadata: from the initial
    metadata, or as the endpoint channel's tap read it; the messages sent and received) to the
    mesh's telemetry sinks."""
    peer = None
    try:
        for k, v in finished.initial_metadata() or ():
            if k == "x-envoy-peer-metadata":
                peer = v if isinstance(v, str) else bytes(v).decode("latin-1")
                break
    except Exception:  # noqa: BLE001  (an RPC that never started has none)
        pass
    if peer is None:
        peer = _tapped_peer(ep)
    attempt.telemetry = {"peer_metadata": peer, "request_messages": counts[0], "response_messages": counts[1]}
    _report(call, finished, UpstreamError(kind) if kind is not None else None)


class _MultiCallable:
    """What the four multicallables share: routing and the per-endpoint multicallable."""

    _kind = ""

    def __init__(self, channel: "MeshChannel", method: str, serializer: Any, deserializer: Any,
                 registered: bool) -> None:
        self._channel = channel
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._registered = bool(registered)
        self._url = channel._url_prefix + method  # what the mesh routes (made once, not per RPC)
        # the grpcio multicallable of this signature, per endpoint channel, cached under one slot
        self._slot = channel._slot((self._kind, method, serializer, deserializer, self._registered))

    def _target_callable(self, ep: _EndpointChannel, attempt: Attempt) -> Any:
        path = attempt.path
        if path == self._method:
            mc = ep.callables.get(self._slot)
            if mc is not None:
                return mc
            return ep.multicallable(self._slot, self._kind, path, self._serializer, self._deserializer,
                                    self._registered)
        # a route's path rewrite: another method on the wire
        key = self._channel._slot((self._kind, path, self._serializer, self._deserializer, self._registered))
        return ep.multicallable(key, self._kind, path, self._serializer, self._deserializer, self._registered)

    def _stream(self, start: Callable[[Any, Optional[float], Metadata, Any], Any], timeout: Optional[float],
                metadata: Metadata, request: Any, request_stream: bool, response_stream: bool) -> Any:
        """Route once, pick once, start the RPC (``start(multicallable, timeout, metadata,
        request)``, ``request`` the message or, ``request_stream``, the iterator); the attempt is
        finished when the RPC terminates. With telemetry sinks, the call is reported once it
        ended and (``response_stream``) the application's reading ended, with its message counts
        and the peer's Istio metadata, which the call returned hides from the application.
        Mesh refusals come back as a failed call."""
        ch = self._channel
        call: Optional[Call] = None
        try:
            call = ch._route(self._url, metadata, timeout)
            fault = call.fault()
            try:
                if fault.delay:
                    time.sleep(fault.delay)
            finally:
                call._release_fault()  # the delay is over (or the abort answered): not active
            if fault.aborts:  # the RPC's own deadline stands (it started before the delay)
                raise FaultAbort(fault.abort_http_status, fault.abort_grpc_status)
            attempt = call.start_attempt()
        except MeshClosed:
            raise  # a programming error, not an RPC status: the mesh was closed
        except (MeshError, MeshRpcError) as exc:
            if _TELEMETRY[0] and call is not None:
                trace = _begin_trace(call) if _TRACER[0] is not None else None
                _report(call, None, exc)
                if trace is not None:  # refused before its attempt (UH, a fault abort): Envoy's span
                    trace.end(None, exc)
            return _mesh_error(exc, call)
        assert attempt is not None
        attempt_timeout = attempt.timeout
        if attempt_timeout is not None and attempt_timeout <= 0:
            attempt.finish(error=TIMEOUT)
            return MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        reporting = bool(_TELEMETRY[0])
        exchange = _exchange_of(ch.mesh) if reporting else None
        try:
            ep = ch._acquire(attempt, exchange is not None)  # (Istio's exchange: the peer's metadata read)
        except MeshRpcError as exc:  # the channel was closed
            attempt.finish(error=RESET)
            return exc
        except UpstreamError as e:  # mesh TLS needed but impossible (no certificates): not sent
            attempt.finish(error=CONNECT_FAILURE)
            return _forward_error(None, e)
        report: Optional[StreamReport] = None
        trace = None
        if reporting:
            if exchange is not None:  # Istio's metadata exchange (mesh.telemetry.enable_istio_metrics)
                metadata = _with_exchange(metadata, exchange.headers)
            trace = _begin_trace(call) if _TRACER[0] is not None else None
            if trace is not None:  # tracing: the stream's span; its attempt carries the trace headers
                trace.attempt(attempt)
                metadata = (*(m for m in (metadata or ()) if m[0].lower() not in _TRACE_HEADERS),
                            *_trace_pairs(attempt))
            ended: List[Any] = []

            def reported(counts: Any) -> None:  # the RPC and the application's reading ended
                _report_stream(call, attempt, ended[0], ended[1], counts, ep)
                if trace is not None:  # (after the record, which reads the x-request-id it sent)
                    trace.end(None, UpstreamError(ended[1]) if ended[1] is not None else None)
            report = StreamReport(2 if response_stream else 1, reported)
            if request_stream:
                request = counted(request, report.counts)
            else:
                report.counts[0] = 1
        started = time.monotonic()
        try:
            rpc = start(self._target_callable(ep, attempt), attempt_timeout, metadata, request)
        except BaseException as exc:
            ch._pool.release(ep)
            attempt.finish(error=RESET)
            if report is not None:  # never started: its record and span end here
                _report(call, None, exc)
                if trace is not None:
                    trace.end(None, exc)
            raise

        def done(finished: Any) -> None:
            code = None
            try:
                code = finished.code()
                kind = None if code is grpc.StatusCode.OK else _failure_kind(
                    finished, attempt_timeout, time.monotonic() - started)
                # (a mesh-TLS endpoint's connect failure: the reason is in the log, the
                # cluster's ssl.* stats and MeshChannel.tls_failures(); grpcio's call object
                # keeps its own details)
                if kind is not None:
                    attempt.finish(error=kind)
                else:
                    attempt.finish(200, code.value[0])
            finally:
                ch._pool.release(ep)
            if report is not None:
                ended[:] = (finished, kind)
                if not response_stream and code is grpc.StatusCode.OK:
                    report.counts[1] = 1  # the single response
                report.one_done()

        if report is None:
            rpc.add_done_callback(done)
            return rpc
        observed = ObservedCall(rpc, exchange is not None, report)
        rpc.add_done_callback(done)
        return observed
