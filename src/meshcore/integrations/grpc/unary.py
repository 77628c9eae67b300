"""Unary-unary RPCs: ``__call__``/``with_call``/``future`` under the whole router lifecycle
(:meth:`meshcore.Call.run`: retries, timeouts, circuit breakers, outlier detection)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Optional, Tuple

import grpc

from ...call import Attempt, Call, UpstreamTimeout, default_classify
from ...errors import MeshClosed, MeshError
from ...resilience.retry import TIMEOUT
from .. import _add_context
from ._types import Metadata
from .multicallable import _MultiCallable
from .status import MeshRpcError, _failure_kind, _mesh_error


class _AttemptFailed(MeshError):
    """A transport failure of one attempt (``kind``), carrying the client-visible ``error``."""

    def __init__(self, kind: str, error: grpc.RpcError) -> None:
        super().__init__(f"attempt {kind}")
        self.kind = kind
        self.error = error


class _Outcome:
    """What one unary attempt got from the server: a response or a status (``error``)."""

    __slots__ = ("response", "rpc", "error", "grpc_status")

    def __init__(self, response: Any, rpc: Any, error: Optional[grpc.RpcError], grpc_status: Optional[int]) -> None:
        self.response = response
        self.rpc = rpc
        self.error = error
        self.grpc_status = grpc_status


def _status_of(outcome: Any) -> Optional[int]:
    return 200  # the server answered: HTTP 200, the verdict is in grpc-status


def _grpc_status_of(outcome: Any) -> Optional[int]:
    return outcome.grpc_status


def _classify(exc: BaseException) -> Optional[str]:
    if isinstance(exc, _AttemptFailed):
        return exc.kind
    return default_classify(exc)


class _Invocation:
    """Cancellation state shared by a unary future and the attempts made for it."""

    __slots__ = ("cancelled", "inflight", "_lock")

    def __init__(self) -> None:
        self.cancelled = False
        self.inflight: Any = None
        self._lock = threading.Lock()

    def track(self, rpc: Any) -> None:
        with self._lock:
            self.inflight = rpc
            cancelled = self.cancelled
        if cancelled:
            rpc.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            rpc = self.inflight
        if rpc is not None:
            rpc.cancel()


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    _kind = "unary_unary"

    def __call__(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)[0]

    def with_call(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                  credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                  compression: Optional[grpc.Compression] = None) -> Tuple[Any, grpc.Call]:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)

    def future(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
               credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
               compression: Optional[grpc.Compression] = None) -> "_UnaryFuture":
        """The RPC, retries included, on the channel's thread pool (see the module doc)."""
        inv = _Invocation()
        deadline = None if timeout is None else time.monotonic() + timeout
        cf = self._channel._executor().submit(self._invoke, request, timeout, metadata, credentials,
                                              wait_for_ready, compression, inv)
        return _UnaryFuture(cf, inv, deadline)

    def _invoke(self, request: Any, timeout: Optional[float], metadata: Metadata, credentials: Any,
                wait_for_ready: Optional[bool], compression: Any,
                inv: Optional[_Invocation] = None) -> Tuple[Any, grpc.Call]:
        call: Optional[Call] = None
        try:
            call = self._channel._route(self._method, metadata, timeout)

            def send(attempt: Attempt) -> _Outcome:
                return self._send(attempt, request, metadata, credentials, wait_for_ready, compression, inv)

            outcome = call.run(send, status_of=_status_of, grpc_status_of=_grpc_status_of, classify=_classify)
        except _AttemptFailed as exc:
            raise _add_context(exc.error, call) from None
        except UpstreamTimeout as exc:
            cause = exc.__cause__
            raise _add_context(cause.error if isinstance(cause, _AttemptFailed) else _mesh_error(exc), call) from None
        except MeshClosed:
            raise  # a programming error, not an RPC status: the mesh was closed
        except MeshError as exc:
            raise _add_context(_mesh_error(exc, call), call, self._channel.target) from None
        if outcome.error is not None:
            raise _add_context(outcome.error, call)
        return outcome.response, outcome.rpc

    def _send(self, attempt: Attempt, request: Any, metadata: Metadata, credentials: Any,
              wait_for_ready: Optional[bool], compression: Any, inv: Optional[_Invocation]) -> _Outcome:
        """One RPC to ``attempt.address``: the server's answer, or ``_AttemptFailed``."""
        if inv is not None and inv.cancelled:
            return _Outcome(None, None, MeshRpcError(grpc.StatusCode.CANCELLED, "Cancelled"), None)
        timeout = attempt.timeout
        if timeout is not None and timeout <= 0:
            raise _AttemptFailed(TIMEOUT, MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        ch = self._channel
        ep = ch._acquire(attempt)
        started = time.monotonic()
        try:
            mc = self._target_callable(ep, attempt)
            if inv is None:
                response, rpc = mc.with_call(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                             wait_for_ready=wait_for_ready, compression=compression)
            else:
                rpc = mc.future(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                wait_for_ready=wait_for_ready, compression=compression)
                inv.track(rpc)
                response = rpc.result()
            return _Outcome(response, rpc, None, 0)
        except grpc.RpcError as err:
            if inv is not None and inv.cancelled:
                return _Outcome(None, err, err, None)  # cancelled by the caller: not the upstream's fault
            kind = _failure_kind(err, timeout, time.monotonic() - started)
            if kind is not None:
                raise _AttemptFailed(kind, err) from None
            return _Outcome(None, err, err, err.code().value[0])
        finally:
            ch._pool.release(ep)


class _UnaryFuture(grpc.Call, grpc.Future):
    """The ``future()`` of a unary-unary call: a ``grpc.Future`` and ``grpc.Call`` over an
    executor future whose result is ``(response, call)`` of the last attempt."""

    def __init__(self, cf: "concurrent.futures.Future[Any]", inv: _Invocation, deadline: Optional[float]) -> None:
        self._cf = cf
        self._inv = inv
        self._deadline = deadline

    # grpc.Future
    def cancel(self) -> bool:
        if self._cf.done():
            return False
        self._inv.cancel()
        self._cf.cancel()
        return True

    def cancelled(self) -> bool:
        return self._inv.cancelled or self._cf.cancelled()

    def running(self) -> bool:
        return not self._cf.done()

    def done(self) -> bool:
        return self._cf.done()

    def _outcome(self, timeout: Optional[float]) -> Tuple[Any, Any, Optional[BaseException]]:
        try:
            response, rpc = self._cf.result(timeout)
            return response, rpc, None
        except concurrent.futures.TimeoutError:
            raise grpc.FutureTimeoutError() from None
        except concurrent.futures.CancelledError:
            raise grpc.FutureCancelledError() from None
        except grpc.RpcError as err:
            if self._inv.cancelled:
                raise grpc.FutureCancelledError() from None
            return None, err, err
        except Exception as err:  # noqa: BLE001  (e.g. a serializer's error: the future's exception)
            return None, MeshRpcError(grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}", err), err

    def result(self, timeout: Optional[float] = None) -> Any:
        response, _, err = self._outcome(timeout)
        if err is not None:
            raise err
        return response

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self._outcome(timeout)[2]

    def traceback(self, timeout: Optional[float] = None) -> Any:
        err = self.exception(timeout)
        return None if err is None else err.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._cf.add_done_callback(lambda _cf: fn(self))

    # grpc.Call (of the last attempt; these block until the RPC terminated)
    def _rpc(self) -> Any:
        try:
            return self._outcome(None)[1]
        except grpc.FutureCancelledError:
            return MeshRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def code(self) -> grpc.StatusCode:
        return self._rpc().code()

    def details(self) -> str:
        return self._rpc().details()

    def initial_metadata(self) -> Any:
        return self._rpc().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._rpc().trailing_metadata()

    def is_active(self) -> bool:
        return not self._cf.done()

    def time_remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._cf.done():
            return False
        self._cf.add_done_callback(lambda _cf: callback())
        return True
