"""What telemetry needs from a gRPC call grpcio made, and what the application must not see.

* :class:`ObservedCall` wraps a streaming RPC's call object (grpcio's rendezvous: a
  ``grpc.RpcError``, ``grpc.Call``, ``grpc.Future`` and, for response streams, an iterator): it
  counts the response messages the application receives, hides Istio's exchange pair
  (``x-envoy-peer-metadata`` and its ``-id``) from its initial and trailing metadata, and
  raises itself (so, stripped too) where grpcio raises the rendezvous.
* :class:`StrippedError` is a unary RPC's error with the same pair hidden.

Message counts (Istio's ``istio_request_messages_total`` / ``istio_response_messages_total``,
per call) go into the attempt's telemetry as ``request_messages`` / ``response_messages``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, List, Optional

import grpc

from ._metadata import _strip_peer


def counted(requests: Iterator[Any], counts: List[int]) -> Iterator[Any]:
    """``requests``, counting the messages grpcio takes from it (``counts[0]``)."""
    for message in requests:
        counts[0] += 1
        yield message


class StreamReport:
    """Reports a streaming call once both its end (grpcio's done callback) and the end of the
    application's reading (the response iterator ended, the call was cancelled or dropped) have
    happened: grpcio reports a call done while its last message is still being handed over."""

    __slots__ = ("counts", "_pending", "_lock", "_report")

    def __init__(self, pending: int, report: Callable[[List[int]], None]) -> None:
        self.counts = [0, 0]  # request messages, response messages
        self._pending = pending
        self._lock = threading.Lock()
        self._report: Optional[Callable[[List[int]], None]] = report

    def one_done(self) -> None:
        with self._lock:
            self._pending -= 1
            report = self._report if self._pending <= 0 else None
            if report is not None:
                self._report = None
        if report is not None:
            report(self.counts)


class StrippedError(grpc.RpcError, grpc.Call):
    """A unary RPC's grpcio error whose metadata leaves out Istio's exchange pair; everything
    else is the error's own."""

    def __init__(self, err: Any) -> None:
        super().__init__()
        self._err = err

    def initial_metadata(self) -> Any:
        return _strip_peer(self._err.initial_metadata())

    def trailing_metadata(self) -> Any:
        return _strip_peer(self._err.trailing_metadata())

    def code(self) -> Any:
        return self._err.code()

    def details(self) -> Any:
        return self._err.details()

    def debug_error_string(self) -> Any:
        return self._err.debug_error_string()

    def is_active(self) -> bool:
        return self._err.is_active()

    def time_remaining(self) -> Any:
        return self._err.time_remaining()

    def cancel(self) -> Any:
        return self._err.cancel()

    def add_callback(self, callback: Any) -> Any:
        return self._err.add_callback(callback)

    def __getattr__(self, name: str) -> Any:
        try:
            inner = self.__dict__["_err"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(inner, name)

    def __str__(self) -> str:
        return str(self._err)

    def __repr__(self) -> str:
        return repr(self._err)


class ObservedCall(grpc.RpcError, grpc.Call, grpc.Future):
    """A streaming RPC (see the module documentation). ``strip``: hide the exchange pair;
    ``report``: the call's :class:`StreamReport` (its response count is kept here)."""

    def __init__(self, rpc: Any, strip: bool, report: StreamReport) -> None:
        super().__init__()
        self._rpc = rpc
        self._strip = strip
        self._report = report
        self._ended = False

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._report.one_done()

    # the response stream
    def __iter__(self) -> "ObservedCall":
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._rpc)
        except StopIteration:
            self._end()
            raise
        except grpc.RpcError:
            self._end()
            raise self from None
        self._report.counts[1] += 1
        return message

    def next(self) -> Any:
        return self.__next__()

    def __del__(self) -> None:
        try:
            self._end()  # dropped before the end of the stream: what it read is what it got
        except Exception:  # noqa: BLE001  (never from a finalizer)
            pass

    # grpc.Call
    def initial_metadata(self) -> Any:
        md = self._rpc.initial_metadata()
        return _strip_peer(md) if self._strip else md

    def trailing_metadata(self) -> Any:
        md = self._rpc.trailing_metadata()
        return _strip_peer(md) if self._strip else md

    def code(self) -> Any:
        return self._rpc.code()

    def details(self) -> Any:
        return self._rpc.details()

    def debug_error_string(self) -> Any:
        return self._rpc.debug_error_string()

    def is_active(self) -> bool:
        return self._rpc.is_active()

    def time_remaining(self) -> Any:
        return self._rpc.time_remaining()

    def add_callback(self, callback: Any) -> Any:
        return self._rpc.add_callback(callback)

    # grpc.Future
    def cancel(self) -> bool:
        out = self._rpc.cancel()
        self._end()
        return out

    def cancelled(self) -> bool:
        return self._rpc.cancelled()

    def running(self) -> bool:
        return self._rpc.running()

    def done(self) -> bool:
        return self._rpc.done()

    def result(self, timeout: Optional[float] = None) -> Any:
        try:
            return self._rpc.result(timeout)
        except grpc.RpcError as err:
            if err is self._rpc:
                raise self from None
            raise

    def exception(self, timeout: Optional[float] = None) -> Any:
        err = self._rpc.exception(timeout)
        return self if err is self._rpc else err

    def traceback(self, timeout: Optional[float] = None) -> Any:
        return self._rpc.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._rpc.add_done_callback(lambda _rpc: fn(self))

    def __getattr__(self, name: str) -> Any:
        try:
            inner = self.__dict__["_rpc"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(inner, name)

    def __str__(self) -> str:
        return str(self._rpc)

    def __repr__(self) -> str:
        return repr(self._rpc)
