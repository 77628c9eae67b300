"""gRPC status codes for mesh decisions: the HTTP->gRPC mapping, :class:`MeshRpcError`, and
the transport-failure kinds (``connect-failure`` / ``reset`` / ``timeout``) of grpcio errors."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grpc

from ...call import Call, FaultAbort, UpstreamTimeout
from ...errors import NoRoute, UpstreamError
from ...resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT

_CODES: Dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_CONNECT_FAILURE_HINTS = ("failed to connect", "connection refused", "connect failed", "no route to host")
_RESET_HINTS = ("socket closed", "connection reset", "broken pipe")


def grpc_status_for_http(status: Optional[int]) -> grpc.StatusCode:
    """The gRPC status a client reports for an HTTP status (gRPC ``http-grpc-status-mapping``)."""
    if status == 400:
        return grpc.StatusCode.INTERNAL
    if status == 401:
        return grpc.StatusCode.UNAUTHENTICATED
    if status == 403:
        return grpc.StatusCode.PERMISSION_DENIED
    if status == 404:
        return grpc.StatusCode.UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.UNKNOWN


def _code(value: Optional[int]) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN) if value is not None else grpc.StatusCode.UNKNOWN


# -- errors ---------------------------------------------------------------------------------------


class MeshRpcError(grpc.RpcError, grpc.Call, grpc.Future):
    """An RPC the mesh answered itself (no route, no endpoint, fault abort, deadline).

    Like grpcio's own inactive-RPC errors it is also a terminated ``grpc.Call`` and
    ``grpc.Future``; it is returned (not raised) for streaming calls, where iterating raises it.
    ``cause`` is the meshcore exception behind it, if any.
    """

    def __init__(self, code: grpc.StatusCode, details: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self.cause = cause

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        return ()

    def trailing_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Optional[float]:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future (a failed one)
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: Optional[float] = None) -> Any:
        raise self

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self

    def traceback(self, timeout: Optional[float] = None) -> Any:
        return self.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # a failed response stream
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self

    def __str__(self) -> str:
        return f"<MeshRpcError of RPC that terminated with:\n\tstatus = {self._code}\n\tdetails = \"{self._details}\"\n>"

    __repr__ = __str__


def _mesh_error(exc: BaseException, call: Optional[Call] = None) -> MeshRpcError:
    """The gRPC failure a client sees for a mesh-side answer."""
    if isinstance(exc, MeshRpcError):
        return exc
    if isinstance(exc, FaultAbort):
        code = _code(exc.grpc_status) if exc.grpc_status is not None else grpc_status_for_http(exc.http_status)
        return MeshRpcError(code, "fault filter abort", exc)
    if isinstance(exc, NoRoute):
        return MeshRpcError(grpc.StatusCode.UNIMPLEMENTED, str(exc), exc)
    if isinstance(exc, UpstreamTimeout):
        return MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", exc)
    if call is not None and call.cluster is None:
        route = call.route
        if route.direct_response is not None:
            status, body = route.direct_response
            return MeshRpcError(grpc_status_for_http(status), body or f"direct response {status}", exc)
        if route.redirect is not None:
            return MeshRpcError(grpc.StatusCode.UNKNOWN, f"redirect to {route.redirect}", exc)
    return MeshRpcError(grpc.StatusCode.UNAVAILABLE, str(exc), exc)


def _failure_kind(err: Any, timeout: Optional[float], elapsed: float) -> Optional[str]:
    """``connect-failure`` / ``timeout`` / ``reset`` for failures that are not a server's answer.

    grpcio does not say whether the server answered; the status details it generates locally
    do (e.g. "failed to connect to all addresses ... Connection refused", "Deadline Exceeded").
    A local deadline is a ``DEADLINE_EXCEEDED`` at or after the deadline this attempt set.
    """
    code = err.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None and elapsed >= timeout:
        return TIMEOUT
    if code is grpc.StatusCode.UNAVAILABLE or code is grpc.StatusCode.UNKNOWN:
        details = (err.details() or "").lower()
        if any(h in details for h in _CONNECT_FAILURE_HINTS):
            return CONNECT_FAILURE
        if any(h in details for h in _RESET_HINTS):
            return RESET
    return None


def _forward_error(err: Optional[Any], failure: UpstreamError) -> MeshRpcError:
    """The ``UNAVAILABLE`` a client sees when the mesh could not connect to a TLS endpoint
    (:mod:`meshcore.tls.forwarder`): the meshcore error (a ``TlsHandshakeError`` names the
    cluster, the endpoint and the reason) is the details, its ``cause`` and ``__cause__``;
    grpcio's own details (``err``, about the local socket the forwarder closed) follow."""
    details = str(failure) if err is None else f"{failure} (grpcio: {err.details()})"
    out = MeshRpcError(grpc.StatusCode.UNAVAILABLE, details, failure)
    out.__cause__ = failure
    return out


def _transport_failure(err: Any, timeout: Optional[float], elapsed: float, ep: Any) -> Tuple[Optional[str], Any]:
    """``(kind, client error)`` of an attempt's grpcio error: :func:`_failure_kind`, and for an
    endpoint reached through a TLS forward whose last upstream connection failed, a connect
    failure reported with the forward's reason (:func:`_forward_error`)."""
    kind = _failure_kind(err, timeout, elapsed)
    if kind == CONNECT_FAILURE:
        fwd = ep.forward if ep is not None else None
        failure = fwd.failure if fwd is not None else None
        if failure is not None:
            return kind, _forward_error(err, failure)
    return kind, err


def _cause_of(err: BaseException) -> Optional[BaseException]:
    """The ``__cause__`` a raised client error keeps: the meshcore upstream error (a TLS
    failure's reason) behind it, else none (mesh decisions are raised ``from None``)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UpstreamError) else None
