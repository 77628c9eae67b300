"""gRPC through the mesh: a ``grpc.Channel`` look-alike that routes and balances every RPC.

grpcio has no resolver or LB-policy plugin API, so meshcore does not feed a grpcio channel;
it replaces it ("option C"). :func:`mesh_channel` returns a :class:`MeshChannel` that generated
stubs accept::

    mesh = meshcore.Mesh().start()
    channel = mesh_channel(mesh, "echo.default.svc.cluster.local:8080")
    reply = EchoStub(channel).Hello(request, timeout=2, metadata=[("x-canary", "1")])

Each RPC is routed by its method path (``/pkg.Service/Method``) and metadata, as Envoy routes
the HTTP/2 request a gRPC client sends (``content-type: application/grpc`` is added, so
``grpc: {}`` route matchers apply), then sent on a real grpcio channel to the chosen endpoint.
One channel is kept per ``(endpoint, authority)``; a channel whose endpoint left every cluster
of the target is closed by a periodic sweep once idle, and all of them by :meth:`MeshChannel.close`.

Semantics:

* **Unary-unary** calls (``__call__``, ``with_call``, ``future``) get the whole router
  behaviour of :meth:`meshcore.Call.run`: fault injection, retries (the route's ``retry_on``
  gRPC codes; ``connect-failure``/``reset``/``5xx`` for transport failures), per-try and route
  timeouts, circuit breakers, outlier detection. ``future`` runs that lifecycle on a small
  thread pool owned by the channel; cancelling it cancels the RPC in flight and stops retries.
* **Streaming** calls (unary-stream, stream-unary, stream-stream) pick once per call: fault
  injection and circuit breakers apply, but there is no retry (the request stream is consumed
  by the first attempt). The endpoint is released when the RPC terminates.
* **Deadlines**: the gRPC deadline of an attempt is ``min(caller timeout, route timeout)``, and
  the per-try timeout where the route has one (the route timeout applies to streams as well, as
  in Envoy: set it to ``0s`` for long-lived streams). An expired deadline is
  ``DEADLINE_EXCEEDED``, which is what a gRPC client sees from its own deadline.
* **Status accounting**: an RPC that got an answer from the server counts as HTTP 200 with its
  ``grpc-status`` (which is what Envoy's retry policy looks at: ``retry_on: 5xx`` does not retry
  gRPC errors, ``unavailable`` does). Failures to connect and transport resets are recognised
  from grpcio's status details and reported as ``connect-failure`` / ``reset``.
* **Mesh errors** become :class:`MeshRpcError` (a ``grpc.RpcError`` and ``grpc.Call``): no
  usable endpoint, open circuit breaker -> ``UNAVAILABLE``; no route -> ``UNIMPLEMENTED``; a
  fault abort -> its ``grpc_status`` or its HTTP status mapped to gRPC (gRPC's
  ``http-grpc-status-mapping``, also Envoy's ``httpToGrpcStatus``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import grpc

from ..call import Attempt, Call, FaultAbort, UpstreamTimeout, default_classify
from ..errors import MeshError, NoRoute
from ..resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT

__all__ = ["MeshChannel", "MeshRpcError", "mesh_channel", "grpc_status_for_http"]

log = logging.getLogger(__name__)

Metadata = Optional[Sequence[Tuple[str, Any]]]
Options = Sequence[Tuple[str, Any]]

_CODES: Dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
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


# -- per-endpoint channels ------------------------------------------------------------------------


def _host_of(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


class _EndpointChannel:
    """One grpcio channel to one endpoint under one authority, with its multicallables."""

    __slots__ = ("address", "authority", "channel", "inflight", "_callables")

    def __init__(self, address: str, authority: str, channel: grpc.Channel) -> None:
        self.address = address
        self.authority = authority
        self.channel = channel
        self.inflight = 0
        self._callables: Dict[Tuple[Any, ...], Any] = {}

    def multicallable(self, kind: str, path: str, serializer: Any, deserializer: Any, registered: bool) -> Any:
        key = (kind, path, serializer, deserializer, registered)
        mc = self._callables.get(key)
        if mc is None:
            factory = getattr(self.channel, kind)
            mc = factory(path, request_serializer=serializer, response_deserializer=deserializer,
                         _registered_method=registered)
            self._callables[key] = mc
        return mc


class _EndpointPool:
    """The per-endpoint channels of one :class:`MeshChannel` (thread-safe)."""

    def __init__(self, credentials: Optional[grpc.ChannelCredentials], options: Options) -> None:
        self._credentials = credentials
        self._options = list(options)
        self._lock = threading.Lock()
        self._channels: Dict[Tuple[str, str], _EndpointChannel] = {}
        self._closed = False

    def _open(self, address: str, authority: str) -> grpc.Channel:
        given = {name for name, _ in self._options}
        options = list(self._options)
        if "grpc.default_authority" not in given:
            options.append(("grpc.default_authority", authority))
        if self._credentials is not None:
            if "grpc.ssl_target_name_override" not in given:
                options.append(("grpc.ssl_target_name_override", _host_of(authority)))
            return grpc.secure_channel(address, self._credentials, options)
        return grpc.insecure_channel(address, options)

    def acquire(self, address: str, authority: str) -> _EndpointChannel:
        """The channel to ``address`` (created on first use), counted as in use until released."""
        with self._lock:
            if self._closed:
                raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
            ep = self._channels.get((address, authority))
            if ep is None:
                log.debug("opening a channel to %s (authority %s)", address, authority)
                ep = _EndpointChannel(address, authority, self._open(address, authority))
                self._channels[(address, authority)] = ep
            ep.inflight += 1
            return ep

    def release(self, ep: _EndpointChannel) -> None:
        with self._lock:
            ep.inflight -= 1

    def sweep(self, live: Set[str]) -> None:
        """Close the idle channels to endpoints not in ``live``."""
        with self._lock:
            gone = [key for key, ep in self._channels.items() if ep.address not in live and ep.inflight <= 0]
            closing = [self._channels.pop(key) for key in gone]
        for ep in closing:
            log.info("closing the channel to %s: no longer an endpoint of the target", ep.address)
            ep.channel.close()

    def addresses(self) -> List[str]:
        with self._lock:
            return sorted({ep.address for ep in self._channels.values()})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            closing = list(self._channels.values())
            self._channels.clear()
        for ep in closing:
            ep.channel.close()


# -- connectivity -----------------------------------------------------------------------------------


class _Connectivity:
    """``subscribe``/``unsubscribe``: the mesh's readiness for the target as channel states.

    A daemon thread (running while there are subscribers) polls the state and calls each
    callback when it changes, first with the current state.
    """

    def __init__(self, state: Callable[[], grpc.ChannelConnectivity], poll: float = 0.2) -> None:
        self._state = state
        self._poll = poll
        self._lock = threading.Lock()
        self._subscribers: Dict[Callable[[grpc.ChannelConnectivity], None], Optional[grpc.ChannelConnectivity]] = {}
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._subscribers[callback] = None
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="meshcore-grpc-connectivity", daemon=True)
                self._thread.start()
        self._wake.set()

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._poll)
            self._wake.clear()
            state = self._state()
            with self._lock:
                due = [cb for cb, seen in self._subscribers.items() if seen is not state]
                for cb in due:
                    self._subscribers[cb] = state
                stopping = self._stopping
            for cb in due:
                try:
                    cb(state)
                except Exception:  # noqa: BLE001  (a subscriber's bug must not stop the others)
                    log.exception("connectivity callback %r failed", cb)
            with self._lock:
                if stopping or not self._subscribers:
                    self._thread = None
                    return


# -- invocations ------------------------------------------------------------------------------------


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

    def _target_callable(self, ep: _EndpointChannel, attempt: Attempt) -> Any:
        return ep.multicallable(self._kind, attempt.path, self._serializer, self._deserializer, self._registered)

    def _stream(self, start: Callable[[Any, Optional[float]], Any], timeout: Optional[float],
                metadata: Metadata) -> Any:
        """Route once, pick once, start the RPC (``start(multicallable, timeout)``); the attempt
        is finished when the RPC terminates. Mesh refusals come back as a failed call."""
        ch = self._channel
        call: Optional[Call] = None
        try:
            call = ch._route(self._method, metadata, timeout)
            fault = call.fault()
            if fault.delay:
                time.sleep(fault.delay)
            if fault.aborts:
                raise FaultAbort(fault.abort_http_status, fault.abort_grpc_status)
            attempt = call.start_attempt()
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
                if kind is not None:
                    attempt.finish(error=kind)
                else:
                    attempt.finish(200, code.value[0])
            finally:
                ch._pool.release(ep)

        rpc.add_done_callback(done)
        return rpc


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
            raise exc.error from None
        except UpstreamTimeout as exc:
            cause = exc.__cause__
            raise (cause.error if isinstance(cause, _AttemptFailed) else _mesh_error(exc)) from None
        except MeshError as exc:
            raise _mesh_error(exc, call) from None
        if outcome.error is not None:
            raise outcome.error
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


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):
    _kind = "unary_stream"

    def __call__(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t: mc(request, timeout=t, metadata=metadata, credentials=credentials,
                                             wait_for_ready=wait_for_ready, compression=compression),
                            timeout, metadata)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):
    _kind = "stream_unary"

    def __call__(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression).result()

    def with_call(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                  credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                  compression: Optional[grpc.Compression] = None) -> Tuple[Any, grpc.Call]:
        fut = self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return fut.result(), fut

    def future(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
               credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
               compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t: mc.future(request_iterator, timeout=t, metadata=metadata,
                                                    credentials=credentials, wait_for_ready=wait_for_ready,
                                                    compression=compression),
                            timeout, metadata)


class _StreamStream(_MultiCallable, grpc.StreamStreamMultiCallable):
    _kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t: mc(request_iterator, timeout=t, metadata=metadata, credentials=credentials,
                                             wait_for_ready=wait_for_ready, compression=compression),
                            timeout, metadata)


# -- the channel ------------------------------------------------------------------------------------


def _split_target(target: str) -> Tuple[str, str]:
    """``(authority, mesh target)``: ``xds:///name:port`` and ``xds://auth/name:port`` route for
    ``name:port``; a plain ``host:port`` is both."""
    if "://" in target:
        scheme, _, rest = target.partition("://")
        if scheme != "xds":
            raise ValueError(f"mesh_channel: unsupported target scheme {scheme!r} in {target!r} (use host:port)")
        return rest.split("/", 1)[-1], target
    return target, target


class MeshChannel(grpc.Channel):
    """A ``grpc.Channel`` whose RPCs are routed and balanced by a :class:`meshcore.Mesh`.

    See the module documentation; create it with :func:`mesh_channel`. ``sweep_interval`` is how
    often (seconds, checked when an RPC starts) channels to departed endpoints are closed;
    ``resolve_timeout`` how long an RPC without a deadline waits for the target's first
    configuration (an RPC issued while the mesh is still fetching it waits, as gRPC RPCs wait
    for name resolution; a target the mesh knows to be unusable fails at once).
    """

    def __init__(self, mesh: Any, target: str, *, credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Options = (), sweep_interval: float = 30.0, resolve_timeout: float = 20.0) -> None:
        self.mesh = mesh
        self.target = target
        self.authority, self._mesh_target = _split_target(target)
        self._scheme = "https" if credentials is not None else "http"
        self._pool = _EndpointPool(credentials, options)
        self._sweep_interval = sweep_interval
        self._resolve_timeout = resolve_timeout
        self._last_sweep = time.monotonic()
        self._closed = False
        self._pool_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        self._connectivity = _Connectivity(self._state)
        mesh.watch(self._mesh_target)

    # -- routing ------------------------------------------------------------------------------------

    def _route(self, method: str, metadata: Metadata, timeout: Optional[float]) -> Call:
        """Route one RPC (method path + metadata); the call's deadline is the earlier of the
        route timeout and the caller's ``timeout``."""
        if self._closed:
            raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
        if self.mesh.config(self._mesh_target) is None:
            # like a gRPC channel still resolving: wait for the configuration (not past the
            # caller's deadline); request() then says precisely what is missing
            try:
                self.mesh.wait_ready(self._mesh_target, self._resolve_timeout if timeout is None else timeout)
            except MeshError:
                pass
        headers: List[Tuple[str, str]] = list(_GRPC_HEADERS)
        for key, value in metadata or ():
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode("ascii")  # -bin metadata travels base64-encoded
            headers.append((key, value))
        url = f"{self._scheme}://{self.authority}{method}"
        call = self.mesh.request(url, "POST", headers, target=self._mesh_target)
        if timeout is not None:
            deadline = time.monotonic() + timeout
            if call.deadline is None or deadline < call.deadline:
                call.deadline = deadline
        return call

    def _acquire(self, attempt: Attempt) -> _EndpointChannel:
        if self._sweep_interval is not None and time.monotonic() - self._last_sweep >= self._sweep_interval:
            self.sweep()
        return self._pool.acquire(attempt.address, attempt.authority)

    def _live_addresses(self) -> Optional[Set[str]]:
        cfg = self.mesh.config(self._mesh_target)
        if cfg is None or cfg.error is not None:
            return None
        live: Set[str] = set()
        for rt in cfg.clusters.values():
            if rt.lb is not None:
                live.update(ep.key for ep in rt.lb.endpoints)
        return live

    def sweep(self) -> None:
        """Close the idle channels to endpoints that are no longer in any cluster of the target."""
        self._last_sweep = time.monotonic()
        live = self._live_addresses()
        if live is not None:
            self._pool.sweep(live)

    def endpoint_addresses(self) -> List[str]:
        """The endpoints this channel currently holds a grpcio channel to."""
        return self._pool.addresses()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._pool_executor is None:
                self._pool_executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="meshcore-grpc")
            return self._pool_executor

    def _state(self) -> grpc.ChannelConnectivity:
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        cfg = self.mesh.config(self._mesh_target)
        if cfg is None:
            return grpc.ChannelConnectivity.CONNECTING
        if cfg.error is not None:
            return grpc.ChannelConnectivity.TRANSIENT_FAILURE
        return grpc.ChannelConnectivity.READY

    # -- grpc.Channel --------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None],
                  try_to_connect: Optional[bool] = False) -> None:
        """Connectivity of the target as the mesh sees it: CONNECTING until its configuration is
        known, READY once it can be routed, TRANSIENT_FAILURE when it is unusable."""
        self._connectivity.subscribe(callback)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._connectivity.unsubscribe(callback)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: Optional[bool] = False) -> grpc.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: Optional[bool] = False) -> grpc.UnaryStreamMultiCallable:
        return _UnaryStream(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: Optional[bool] = False) -> grpc.StreamUnaryMultiCallable:
        return _StreamUnary(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: Optional[bool] = False) -> grpc.StreamStreamMultiCallable:
        return _StreamStream(self, method, request_serializer, response_deserializer, bool(_registered_method))

    def close(self) -> None:
        """Close every per-endpoint channel (RPCs in flight are cancelled) and the future pool.
        The mesh itself stays open."""
        if self._closed:
            return
        self._closed = True
        self._connectivity.close()
        self._pool.close()
        with self._executor_lock:
            executor, self._pool_executor = self._pool_executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "MeshChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MeshChannel({self.target!r}, endpoints={self.endpoint_addresses()})"


def mesh_channel(mesh: Any, target: str, *, credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Options = (), sweep_interval: float = 30.0, resolve_timeout: float = 20.0) -> MeshChannel:
    """A ``grpc.Channel`` to ``target`` (``host:port`` or ``xds:///host:port``) through ``mesh``.

    ``credentials`` make the per-endpoint channels secure (``grpc.ssl_target_name_override`` is
    set to the logical host, so certificates are checked against the service name, not the pod
    address); ``options`` are passed to every per-endpoint channel (``grpc.default_authority``
    defaults to the target's ``host:port``). ``sweep_interval`` and ``resolve_timeout``: see
    :class:`MeshChannel`.
    """
    return MeshChannel(mesh, target, credentials=credentials, options=options, sweep_interval=sweep_interval,
                       resolve_timeout=resolve_timeout)
