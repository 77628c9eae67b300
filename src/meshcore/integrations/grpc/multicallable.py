"""The base of the four multicallables: routing, the per-endpoint multicallable, and the
pick-once lifecycle of streaming RPCs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import grpc

from ...call import Attempt, Call, FaultAbort
from ...errors import MeshClosed, MeshError, UpstreamError
from ...resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from ._types import Metadata
from .endpoints import _EndpointChannel
from .status import MeshRpcError, _failure_kind, _forward_error, _mesh_error

if TYPE_CHECKING:
    from .channel import MeshChannel


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

    def _stream(self, start: Callable[[Any, Optional[float]], Any], timeout: Optional[float],
                metadata: Metadata) -> Any:
        """Route once, pick once, start the RPC (``start(multicallable, timeout)``); the attempt
        is finished when the RPC terminates. Mesh refusals come back as a failed call."""
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
            return _mesh_error(exc, call)
        assert attempt is not None
        attempt_timeout = attempt.timeout
        if attempt_timeout is not None and attempt_timeout <= 0:
            attempt.finish(error=TIMEOUT)
            return MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        try:
            ep = ch._acquire(attempt)
        except MeshRpcError as exc:  # the channel was closed
            attempt.finish(error=RESET)
            return exc
        except UpstreamError as e:  # mesh TLS needed but impossible (no certificates): not sent
            attempt.finish(error=CONNECT_FAILURE)
            return _forward_error(None, e)
        started = time.monotonic()
        try:
            rpc = start(self._target_callable(ep, attempt), attempt_timeout)
        except BaseException:
            ch._pool.release(ep)
            attempt.finish(error=RESET)
            raise

        def done(finished: Any) -> None:
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

        rpc.add_done_callback(done)
        return rpc
