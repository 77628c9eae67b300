"""Unary-unary RPCs: ``__call__``/``with_call``/``future`` under the whole router lifecycle
(:meth:`meshcore.Call.run`: retries, timeouts, circuit breakers, outlier detection).

Blocking calls (``__call__``, ``with_call``) run the router loop of ``meshcore.lifecycle.run``
inline on the caller's thread: the fault step, the first attempt sent straight to the endpoint's
grpcio multicallable (``__call__`` for ``__call__``: grpcio makes no call object), and, only
when that outcome is retriable or failed, the rest of the loop with lifecycle's own retry,
back-off and final-outcome steps. A successful first attempt allocates nothing beyond the
mesh's ``Call`` and ``Attempt``. ``future`` runs :meth:`Call.run` on the channel's pool."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import types
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import grpc

from ...call import Attempt, Call, UpstreamTimeout, default_classify
from ...errors import MeshClosed, MeshError, UpstreamError
from ...lifecycle import _fault_delay, _final, _retry_delay, run_after as _run_after
from ...resilience.fault import NO_FAULT
from ...resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT, retries_ok_answer
from ...telemetry.outcome import report as _report
from ...telemetry.record import ACTIVE as _TELEMETRY, exchange_of as _exchange_of
from ...telemetry.tracing import TRACE_HEADERS as _TRACE_HEADERS, TRACER as _TRACER, headers_of as _trace_headers
from .. import _add_context
from ._metadata import _GRPC_HEADER_DICT, PEER_HEADER as _PEER_HEADER, PEER_HEADERS as _PEER_HEADERS, \
    _headers, _strip_peer, _with_exchange
from ._types import Metadata
from ._observed import StrippedError
from . import _peer as _peer_mod
from ._peer import available as _peer_available, peer_of as _tapped_peer
from .multicallable import _MultiCallable
from .status import MeshRpcError, _cause_of, _forward_error, _mesh_error, _transport_failure

if TYPE_CHECKING:
    from .channel import MeshChannel

log = logging.getLogger(__name__)


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


def _record(a: Attempt, outcome: Optional[_Outcome], exc: Optional[BaseException]) -> None:
    """An attempt's outcome, recorded on it (stats, breakers, outlier detection) as the router
    loop does: a server's answer is HTTP 200 with its grpc-status; an exception is a transport
    failure of its kind, or (not an upstream failure, e.g. a bug) re-raised after a ``reset``."""
    if exc is not None:
        kind = _classify(exc)
        a.finish(error=kind or RESET)
        if kind is None:
            raise exc
    else:
        a.finish(200, outcome.grpc_status)  # type: ignore[union-attr]


def _client_error(exc: MeshError, call: Optional[Call], target: str) -> BaseException:
    """The grpc.RpcError a unary call raises for a mesh outcome, with the mesh's context: an
    attempt's transport failure as grpcio reported it, a route timeout (the last attempt's
    failure if it was one), else the mesh's own decision as a status."""
    if isinstance(exc, _AttemptFailed):
        return _add_context(exc.error, call)
    if isinstance(exc, UpstreamTimeout):
        cause = exc.__cause__
        return _add_context(cause.error if isinstance(cause, _AttemptFailed) else _mesh_error(exc), call)
    return _add_context(_mesh_error(exc, call), call, target)


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


def _reports(telemetry: Any) -> bool:
    """Whether RPCs of a mesh whose telemetry is ``telemetry`` are reported: it has sinks, or
    tracing is on (which reports every mesh's requests). Another mesh's sinks alone do not send
    this mesh's RPCs off the short path."""
    return telemetry is None or bool(telemetry.sinks) or _TRACER[0] is not None


def _unslotted(mc: Any) -> Any:
    """``mc``'s ``__call__`` bound to it when that is a Python function, else ``mc``: calling an
    instance of a Python class goes through its type's call slot, which packs keyword arguments
    in a dict and unpacks them again (~2,400 instructions on CPython 3.11, as much as the rest of
    the short path's Python); the bound method is called with them as they are."""
    fn = getattr(type(mc), "__call__", None)
    return types.MethodType(fn, mc) if isinstance(fn, types.FunctionType) else mc


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    _kind = "unary_unary"
    #: the last retry policy found not to retry an OK answer (most RPCs of a multicallable
    #: take the same route, so the same policy object)
    _final_ok: Any = None

    def __init__(self, channel: "MeshChannel", method: str, serializer: Any, deserializer: Any,
                 registered: bool) -> None:
        super().__init__(channel, method, serializer, deserializer, registered)
        self._final_ok = None  # (set here: every instance has the same attributes, read fast)
        #: endpoint key -> (endpoint, endpoint channel, its grpcio multicallable's ``__call__``
        #: (:func:`_unslotted`), route, the channel's ``active`` count, its ``(address,
        #: authority)``: the key of what a tapped call learned, ``_peer._LEARNED``) under the
        #: configuration ``_eps_cfg`` (replaced whole when another configuration is published)
        self._eps: Dict[str, Tuple[Any, Any, Any, Any, Any, Any]] = {}
        self._eps_cfg: Any = None

    def __call__(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        """A blocking RPC: ``lifecycle.run`` inline (``MeshChannel._route`` too), its first
        attempt straight to the endpoint's grpcio multicallable. Returns the response
        (:meth:`with_call` goes to :meth:`_blocking` at once). While a mesh has telemetry
        sinks, the RPC runs under :meth:`Call.run` instead (as ``future()`` does), which reports it;
        with Istio's metrics alone (the sink's observer, no tracing), the short path below runs
        too: the exchange's metadata sent, the peer's learned metadata told, the call observed.

        The common RPC (no metadata nor call options, a configuration that routes it
        without gRPC's own headers, no fault filter, an endpoint already used under this
        configuration) takes the short path below; anything else, :meth:`_blocking`."""
        cfg = self._eps_cfg
        if (cfg is None and not _TELEMETRY[0]) or metadata is not None or (timeout is not None and not timeout > 0) \
                or credentials is not None or wait_for_ready is not None or compression is not None:
            return self._blocking(request, timeout, metadata, credentials, wait_for_ready, compression, False)
        ch = self._channel
        tel = observer = None
        # (another mesh's sinks alone do not report this RPC: _reports, inline)
        if _TELEMETRY[0] and ((t := ch._telemetry) is None or t.sinks or _TRACER[0] is not None):
            # Istio's metrics alone: observed below; any other sink or tracing: _invoke's path
            tel = t
            observer = None if t is None else t.observer
            if observer is None or _TRACER[0] is not None:
                return self._blocking(request, timeout, None, None, None, None, False)
            if cfg is None:  # (_blocking keeps the configuration and endpoints while telemetry is off)
                cfg = self._seed()
                if cfg is None:
                    return self._blocking(request, timeout, None, None, None, None, False)
        elif cfg is None:  # unreported while another mesh has sinks, no short-path configuration yet:
            # _request_first(expected=None) would route a target not published yet (waiting the
            # mesh's ready_timeout, not the caller's deadline) without gRPC's own headers, under
            # a configuration never found to route alike without them
            return self._blocking(request, timeout, None, None, None, None, False)
        if ch._closed:
            return self._blocking(request, timeout, None, None, None, None, False)
        try:  # routed under cfg or not at all (a reported call carries gRPC's content-type: its
            # record's request_protocol), its first attempt started
            # (cfg routes alike with and without gRPC's headers, _seed / _blocking: not read to route)
            # (read, then called: an instance attribute called as ch._request_first(...) is
            # looked up as a method, which CPython 3.11 does not specialise: ~150 instructions)
            request_first = ch._request_first
            routed = request_first(self._url, "POST", None if tel is None else _GRPC_HEADER_DICT,
                                   ch._mesh_target, timeout, cfg, True)
        except MeshError as exc:
            if tel is None or isinstance(exc, MeshClosed):
                # decided again with gRPC's own headers (and reported) by _blocking
                return self._blocking(request, timeout, None, None, None, None, False)
            # routed with gRPC's own headers under a published configuration, as _invoke routes it:
            # the decision stands (request() reported its refusal: routing again reports it twice)
            err = _client_error(exc, None, ch.target)
            raise err from _cause_of(err)
        if routed is None:  # another configuration is published: decided with the headers
            if tel is not None:
                self._seed()
            return self._blocking(request, timeout, None, None, None, None, False)
        # (the call's route and start, the first attempt's endpoint and timeout: read by
        # _request_first in C, where the attributes of its objects cost a few instructions each)
        call, a, refused, key, endpoint, call_route, started, attempt_timeout = routed
        if a is None:
            return self._not_started(request, timeout, call, refused, tel)
        try:
            cached, ep, send, route, active, learned_at = self._eps[key]
        except KeyError:  # the first RPC to this endpoint under cfg
            return self._blocking_from(request, timeout, call, a, tel, cfg)
        # the attempt's path and authority are the route's rewrites or the call's own (the URL,
        # fixed): the same route object, the same wire path and authority as when cached
        if cached is not endpoint or (call_route is not route and (
                a.path != self._method or a.authority != ep.authority)):
            return self._blocking_from(request, timeout, call, a, tel, cfg)
        exchange = peer = None
        if tel is not None:
            exchange = tel.exchange
            # what a tapped call learned of the server at this address (_peer.peer_of, inline);
            # with the exchange on, a tapped call learns it now and then (_peer.needs_tap, inline)
            learned = _peer_mod._LEARNED.get(learned_at)
            if learned is not None:
                peer = learned[0]
            if exchange is not None and (learned is None or started - learned[1] > _peer_mod.RELEARN_S) \
                    and _peer_available():
                return self._reported_after(call, a, request)
        active.append(None)  # counted in, then checked (see _EndpointChannel.active)
        # (a closed pool's channels are departed; 0.0: a float compared with a float is compared
        # inline by the interpreter, with an int through float_richcompare, code nothing else runs)
        if ep.departed or (attempt_timeout is not None and not attempt_timeout > 0.0):
            ch._pool.release(ep)
            return self._blocking_from(request, timeout, call, a, tel, cfg)
        if started >= ch._next_sweep:
            ch.sweep()
        try:
            if exchange is None:
                result = send(request, attempt_timeout)  # (timeout: grpcio's second parameter)
            else:  # Istio's metadata exchange: grpcio's third parameter
                result = send(request, attempt_timeout, exchange.headers)
        except BaseException as e:  # noqa: BLE001  (an RpcError, or classified as lifecycle.run does)
            if tel is not None:
                return self._reported_failure(call, a, ep, e, started, request, exchange)
            return self._after_failure(call, a, ep, e, started, request, timeout, None, None, None, None, False)
        active.pop()  # _EndpointPool.release, inline
        if ep.departed and not active:
            ch._pool.close_departed(ep)
        if tel is not None:
            # (read again: a sink added or the Istio sink replaced during the RPC gets its record,
            # as report() reads the sinks when the call ends)
            observer = tel.observer
            if observer is not None:  # finished and counted with its facts (grpcio shows no peer metadata)
                done = observer.answered(call, a, 200, 0, result, peer, 1)
                if done == 1:
                    return result
                if done == 0:  # the route's policy retries OK answers
                    return self._reported_rest(call, a, request, _Outcome(result, None, None, 0), None)
                if done == 3:
                    log.debug("telemetry: the Istio observer failed on %r; recorded instead", call)
                _report(call, result, None, observed=True)
                return result
            # no longer the Istio sink alone: the record path, with the attempt's facts
            a.telemetry = {"peer_metadata": peer, "request_messages": 1, "response_messages": 1}
            if not a.finish_final(200, 0):  # the route's policy retries OK answers
                return self._reported_rest(call, a, request, _Outcome(result, None, None, 0), None)
            _report(call, result, None)
            return result
        # the server answered OK (HTTP 200, grpc-status 0): recorded, and final unless the route's
        # retry policy retries OK answers (a first attempt: no retry to count as a success)
        if a.finish_final(200, 0):
            return result
        return self._after_ok(call, a, call.retry_policy, result, request, None, None, None, None, False)

    def _not_started(self, request: Any, timeout: Optional[float], call: Call, refused: Any, tel: Any) -> Any:
        """The short path's call whose first attempt did not start: ``refused`` None (a fault
        filter applies: its step first) or the MeshError that refused it (UH, UO)."""
        if refused is None:
            if tel is not None:  # a fault filter applies: the reported router loop
                return self._invoke(request, timeout, None, None, None, None, None, call)[0]
            return self._blocking(request, timeout, None, None, None, None, False, call)
        if isinstance(refused, MeshClosed):
            raise refused  # a programming error, not an RPC status: the mesh was closed
        if tel is not None:  # refused before its attempt (UH, UO): reported as run_reported does
            _report(call, None, refused)
        err = _client_error(refused, call, self._channel.target)
        raise err from _cause_of(err)

    def _blocking_from(self, request: Any, timeout: Optional[float], call: Call, a: Attempt, tel: Any,
                       cfg: Any) -> Any:
        """:meth:`_blocking` of an RPC the short path routed and started (``tel``: reported, the
        endpoint's channel kept for the next RPCs, as :meth:`_blocking` keeps it)."""
        if tel is not None:
            self._learn(call, a, cfg)
            return self._reported_after(call, a, request)
        return self._blocking(request, timeout, None, None, None, None, False, call, a)

    def _seed(self) -> Any:
        """(Telemetry on: RPCs go through :meth:`_invoke`, not :meth:`_blocking`.) The configuration
        published now, kept as the short path's (its endpoints forgotten) when it routes RPCs
        alike with and without gRPC's own headers; else None."""
        ch = self._channel
        publisher = ch._publisher
        cfg = None if publisher is None else publisher.published.get(ch._mesh_target)
        if cfg is None or not ch._routes_plain(cfg):
            return None
        if cfg is not self._eps_cfg:
            self._eps = {}
            self._eps_cfg = cfg
        return cfg

    def _learn(self, call: Call, a: Attempt, cfg: Any) -> None:
        """(Telemetry on.) Keep attempt ``a``'s endpoint channel (plaintext or mesh TLS, never a
        tap) for the short path's next RPCs, as :meth:`_blocking` keeps it; ``cfg``: the
        configuration ``call`` was routed under (kept only while it is still the short path's)."""
        ch = self._channel
        if a.path != self._method or cfg is None or cfg is not self._eps_cfg or cfg is not ch._plain_cfg:
            return
        try:
            ep = ch._pool.acquire(a.endpoint.key, a.authority, ch._tls_for(a), a)
        except Exception:  # noqa: BLE001  (the attempt itself meets it, in _send)
            return
        try:
            mc = ep.callables.get(self._slot) or self._target_callable(ep, a)
            if self._eps_cfg is cfg:  # (another thread may have moved on to a newer configuration)
                self._keep(a, ep, mc, call.route)
        finally:
            ch._pool.release(ep)

    def _keep(self, a: Attempt, ep: Any, mc: Any, route: Any) -> None:
        """``_eps[endpoint key]`` for the short path (the configuration: ``_eps_cfg``)."""
        if len(self._eps) >= 4096:
            self._eps = {}
        elif len(self._eps) >= 64:  # EDS churn under one configuration: drop the departed
            # (a snapshot: other threads add entries meanwhile)
            self._eps = {k: v for k, v in list(self._eps.items()) if not v[1].departed}
        # (learned_at: where _peer keeps what a tapped call learned of this address and authority)
        self._eps[a.endpoint.key] = (a.endpoint, ep, _unslotted(mc), route, ep.active, (ep.address, ep.authority))

    def _reported_after(self, call: Call, a: Attempt, request: Any, first: Optional["_Outcome"] = None,
                        failed: Optional[BaseException] = None) -> Any:
        """A reported RPC the short path routed and started (``a``: its first attempt, not
        recorded yet): the attempt sent by :meth:`_send` (the peer tap, the exchange, the
        attempt's telemetry facts) unless it already ended (``first``: the server's answer;
        ``failed``: an exception, classified as ``lifecycle.run`` does), recorded, then
        :meth:`_reported_rest`."""
        try:
            if failed is not None:
                raise failed
            outcome = first if first is not None else self._send(a, request, None, None, None, None, None)
        except BaseException as e:  # noqa: BLE001  (classified)
            kind = _classify(e)
            a.finish(error=kind or RESET)
            if kind is None:
                _report(call, None, e)
                raise
            return self._reported_rest(call, a, request, None, e)
        if a.finish_final(200, outcome.grpc_status):
            return self._reported_rest(call, a, request, outcome, None, True)
        return self._reported_rest(call, a, request, outcome, None)

    def _reported_rest(self, call: Call, a: Attempt, request: Any, outcome: Optional["_Outcome"],
                       exc: Optional[BaseException], final: bool = False) -> Any:
        """The rest of a reported RPC's router loop after attempt ``a``'s recorded outcome
        (``outcome`` or ``exc``; ``final``: it ends the call), as ``lifecycle.run_after``; the call
        reported as ``lifecycle.run_reported`` reports it; errors as :meth:`_invoke` raises them."""
        def send(attempt: Attempt) -> _Outcome:
            return self._send(attempt, request, None, None, None, None, None)

        try:
            if not final:
                outcome = _run_after(call, a, outcome, exc, send, _status_of, _grpc_status_of, _classify)
        except BaseException as e:
            _report(call, None, e)
            if isinstance(e, MeshClosed):
                raise  # a programming error, not an RPC status: the mesh was closed
            if isinstance(e, MeshError):
                err = _client_error(e, call, self._channel.target)
                raise err from _cause_of(err)
            raise
        _report(call, outcome, None)
        if outcome.error is not None:  # type: ignore[union-attr]
            raise _add_context(outcome.error, call)  # type: ignore[union-attr]
        return outcome.response  # type: ignore[union-attr]

    def _reported_failure(self, call: Call, a: Attempt, ep: Any, e: BaseException, started: float,
                          request: Any, exchange: Any) -> Any:
        """The short path's reported first attempt raised ``e`` (see :meth:`_after_failure`);
        ``exchange``: Istio's metadata exchange it sent (its pair hidden from the caller's error,
        as :meth:`_send` hides it)."""
        try:
            if isinstance(e, grpc.RpcError):
                e = _tell_telemetry(a, e, exchange, 0, ep)  # (the attempt's facts, as _send tells them)
                outcome = self._failed(e, a.timeout, time.monotonic() - started, ep)
            else:
                outcome = e
        finally:
            self._channel._pool.release(ep)
        if isinstance(outcome, _Outcome):
            return self._reported_after(call, a, request, outcome)
        return self._reported_after(call, a, request, None, outcome)

    def _blocking(self, request: Any, timeout: Optional[float], metadata: Metadata, credentials: Any,
                  wait_for_ready: Optional[bool], compression: Any, _with_call: bool,
                  call: Optional[Call] = None, a: Optional[Attempt] = None) -> Any:
        """:meth:`__call__`, every case (``call``/``a``: the RPC's call already routed and its
        first attempt already started by the short path)."""
        if _TELEMETRY[0] and call is None and _reports(self._channel._telemetry):
            response, rpc = self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)
            return (response, rpc) if _with_call else response
        ch = self._channel
        try:
            publisher = ch._publisher
            cfg = None if publisher is None else publisher.published.get(ch._mesh_target)
            if call is None:
                if ch._closed:
                    raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
                if cfg is None:
                    ch._await_config(timeout)
                # the caller's timeout caps the route timeout (request() does it; 0 or less: expired)
                cap = timeout if timeout is not None and timeout > 0 else None
                if metadata:
                    call = ch._request(self._url, "POST", _headers(metadata), target=ch._mesh_target, timeout=cap)
                    cfg = None  # (not known to be the configuration of this call)
                elif cfg is None or not (cfg is ch._plain_cfg or ch._routes_plain(cfg)):
                    call = ch._request(self._url, "POST", _GRPC_HEADER_DICT, target=ch._mesh_target, timeout=cap)
                    cfg = None
                else:
                    # nothing in this configuration reads gRPC's own headers: route without them,
                    # and again with them unless request() used this configuration (published
                    # dicts are replaced whole, and a configuration object never comes back)
                    try:
                        call = ch._request(self._url, "POST", None, target=ch._mesh_target, timeout=cap)
                    except MeshError:
                        call = None  # under a newer configuration? decided with the headers
                    if call is None or publisher.published.get(ch._mesh_target) is not cfg:
                        call = ch._request(self._url, "POST", _GRPC_HEADER_DICT, target=ch._mesh_target,
                                           timeout=cap)
                        cfg = None
                if cap is None and timeout is not None:
                    call.deadline = call.started + timeout  # an expired deadline: DEADLINE_EXCEEDED
            elif cfg is not self._eps_cfg:
                cfg = None  # (the short path's call: routed under _eps_cfg)
            if a is None:
                fault = call.fault()  # lifecycle.fault_step, its decision made here
                if fault is not NO_FAULT:
                    _fault_delay(call, fault)
                a = call.start_attempt()  # the first attempt: a refusal raises, never None
            assert a is not None
            attempt_timeout = a.timeout
            started = call.started  # (the first attempt's start, as far as elapsed time goes)
            mc = None
            if attempt_timeout is None or attempt_timeout > 0:
                pool = ch._pool
                lock = pool._lock
                try:
                    if started >= ch._next_sweep:
                        ch.sweep()
                    key = (a.endpoint.key, a.authority, ch._tls_for(a), False)
                    lock.acquire()  # _EndpointPool.acquire's common case, inline
                    try:
                        ep = None if pool._closed else pool._channels.get(key)
                        if ep is not None:
                            ep.active.append(None)
                    finally:
                        lock.release()
                    if ep is None:
                        ep = pool.acquire(key[0], key[1], key[2], a)  # the first RPC to the endpoint (or closed)
                except UpstreamError as e:  # mesh TLS needed but impossible (no certificates): not sent
                    ep = None
                    outcome, exc = None, _AttemptFailed(CONNECT_FAILURE, _forward_error(None, e))
                except BaseException as e:  # noqa: BLE001  (the attempt ends as a reset; re-raised)
                    _record(a, None, e)
                    raise
                else:
                    if a.path == self._method:
                        mc = ep.callables.get(self._slot) or self._target_callable(ep, a)
                        if cfg is not None and publisher.published.get(ch._mesh_target) is cfg \
                                and cfg is ch._plain_cfg:
                            # request() routed under cfg, without gRPC's headers: the short path
                            # may take this endpoint's channel under it
                            if cfg is not self._eps_cfg:
                                self._eps = {}
                                self._eps_cfg = cfg
                            self._keep(a, ep, mc, call.route)
            else:
                ep = None
                outcome, exc = None, _AttemptFailed(TIMEOUT, MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                                          "Deadline Exceeded"))
            if ep is not None:
                try:
                    if mc is None:
                        mc = self._target_callable(ep, a)
                    if _with_call:
                        result = mc.with_call(request, timeout=attempt_timeout, metadata=metadata,
                                              credentials=credentials, wait_for_ready=wait_for_ready,
                                              compression=compression)
                    elif metadata is None and credentials is None and wait_for_ready is None and compression is None:
                        result = mc(request, timeout=attempt_timeout)
                    else:
                        result = mc(request, timeout=attempt_timeout, metadata=metadata, credentials=credentials,
                                    wait_for_ready=wait_for_ready, compression=compression)
                except BaseException as e:  # noqa: BLE001  (classified below, as lifecycle.run does)
                    return self._after_failure(call, a, ep, e, started, request, timeout, metadata, credentials,
                                               wait_for_ready, compression, _with_call)
                ch._pool.release(ep)
                a.finish(200, 0)  # the server answered OK: HTTP 200, grpc-status 0
                policy = call.retry_policy
                if policy is None or policy is self._final_ok:
                    return result  # final (a first attempt: no retry to count as a success)
                return self._after_ok(call, a, policy, result, request, metadata, credentials, wait_for_ready,
                                      compression, _with_call)
            if isinstance(outcome, _AttemptFailed):
                outcome, exc = None, outcome
            _record(a, outcome, exc)
            outcome = self._retry(call, a, outcome, exc, request, metadata, credentials, wait_for_ready,
                                  compression, None)
        except MeshClosed:
            raise  # a programming error, not an RPC status: the mesh was closed
        except MeshError as exc:
            err = _client_error(exc, call, ch.target)
            raise err from _cause_of(err)
        return self._result(outcome, call, _with_call)

    def _after_ok(self, call: Call, a: Attempt, policy: Any, result: Any, request: Any, metadata: Metadata,
                  credentials: Any, wait_for_ready: Optional[bool], compression: Any, _with_call: bool) -> Any:
        """The first attempt's OK answer (recorded) under a retry policy not yet known not to
        retry it: final, or the router loop goes on."""
        if not retries_ok_answer(policy):
            self._final_ok = policy  # the route's policy: the same object for its next RPCs
            return result
        outcome = _Outcome(result[0] if _with_call else result, result[1] if _with_call else None, None, 0)
        try:
            outcome = self._retry(call, a, outcome, None, request, metadata, credentials, wait_for_ready,
                                  compression, None)
        except MeshClosed:
            raise
        except MeshError as exc:
            err = _client_error(exc, call, self._channel.target)
            raise err from _cause_of(err)
        return self._result(outcome, call, _with_call)

    def _after_failure(self, call: Call, a: Attempt, ep: Any, e: BaseException, started: float, request: Any,
                       timeout: Optional[float], metadata: Metadata, credentials: Any,
                       wait_for_ready: Optional[bool], compression: Any, _with_call: bool) -> Any:
        """The first attempt raised ``e`` (grpcio's error: the server's status or a transport
        failure; anything else: classified as ``lifecycle.run`` does): recorded, then the rest of
        the router loop."""
        try:
            try:
                if isinstance(e, grpc.RpcError):
                    outcome, exc = self._failed(e, a.timeout, time.monotonic() - started, ep), None
                else:
                    outcome, exc = None, e
            finally:
                self._channel._pool.release(ep)
            if isinstance(outcome, _AttemptFailed):
                outcome, exc = None, outcome
            _record(a, outcome, exc)
            outcome = self._retry(call, a, outcome, exc, request, metadata, credentials, wait_for_ready,
                                  compression, None)
        except MeshClosed:
            raise  # a programming error, not an RPC status: the mesh was closed
        except MeshError as exc:
            err = _client_error(exc, call, self._channel.target)
            raise err from _cause_of(err)
        return self._result(outcome, call, _with_call)

    def with_call(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                  credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                  compression: Optional[grpc.Compression] = None) -> Tuple[Any, grpc.Call]:
        return self._blocking(request, timeout, metadata, credentials, wait_for_ready, compression, True)

    def future(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
               credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
               compression: Optional[grpc.Compression] = None) -> "_UnaryFuture":
        """The RPC, retries included, on the channel's thread pool (see the module doc)."""
        inv = _Invocation()
        deadline = None if timeout is None else time.monotonic() + timeout
        cf = self._channel._executor().submit(self._invoke, request, timeout, metadata, credentials,
                                              wait_for_ready, compression, inv)
        return _UnaryFuture(cf, inv, deadline)

    @staticmethod
    def _result(outcome: "_Outcome", call: Call, with_call: bool) -> Any:
        if outcome.error is not None:
            raise _add_context(outcome.error, call)
        return (outcome.response, outcome.rpc) if with_call else outcome.response

    @staticmethod
    def _failed(err: grpc.RpcError, timeout: Optional[float], elapsed: float, ep: Any = None) -> Any:
        """An attempt's grpcio error: ``_AttemptFailed`` for a transport failure (with the TLS
        forward's reason for a connect failure of a mesh-TLS endpoint ``ep``), else the
        server's answer (an ``_Outcome`` with its grpc-status)."""
        kind, client_err = _transport_failure(err, timeout, elapsed, ep)
        if kind is not None:
            return _AttemptFailed(kind, client_err)
        return _Outcome(None, err, err, err.code().value[0])

    def _retry(self, call: Call, a: Attempt, result: Any, exc: Optional[BaseException], request: Any,
               metadata: Metadata, credentials: Any, wait_for_ready: Optional[bool], compression: Any,
               inv: Optional["_Invocation"]) -> "_Outcome":
        """``lifecycle.run`` after an attempt whose outcome is recorded: retries while the policy
        says so, then the final outcome (returned, or raised)."""
        while True:
            delay = _retry_delay(call, a)
            if delay is None:
                return _final(call, a, result, exc)
            if delay:
                time.sleep(delay)
            a = call.start_attempt()
            if a is None:  # retry overflow: the last outcome stands
                return _final(call, call.attempts[-1], result, exc)
            result, exc = None, None
            try:
                result = self._send(a, request, metadata, credentials, wait_for_ready, compression, inv)
            except BaseException as e:  # noqa: BLE001  (classified by _record)
                exc = e
            _record(a, result, exc)

    def _invoke(self, request: Any, timeout: Optional[float], metadata: Metadata, credentials: Any,
                wait_for_ready: Optional[bool], compression: Any,
                inv: Optional[_Invocation] = None, call: Optional[Call] = None) -> Tuple[Any, grpc.Call]:
        """A ``future()``'s RPC under :meth:`Call.run` (on the channel's pool); ``call``: routed
        already (no attempt started)."""
        try:
            if call is None:
                call = self._channel._route(self._url, metadata, timeout)

            def send(attempt: Attempt) -> _Outcome:
                return self._send(attempt, request, metadata, credentials, wait_for_ready, compression, inv)

            outcome = call.run(send, status_of=_status_of, grpc_status_of=_grpc_status_of, classify=_classify)
        except MeshClosed:
            raise  # a programming error, not an RPC status: the mesh was closed
        except MeshError as exc:
            err = _client_error(exc, call, self._channel.target)
            raise err from _cause_of(err)
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
        reporting = bool(_TELEMETRY[0])
        exchange = _exchange_of(ch.mesh) if reporting else None
        try:
            ep = ch._acquire(attempt, exchange is not None)  # (Istio's exchange: the peer's metadata read)
        except UpstreamError as e:  # mesh TLS needed but impossible (no certificates): not sent
            raise _AttemptFailed(CONNECT_FAILURE, _forward_error(None, e)) from None
        if reporting:
            if exchange is not None:  # Istio's metadata exchange (mesh.telemetry.enable_istio_metrics)
                metadata = _with_exchange(metadata, exchange.headers)
            traced = _trace_headers(attempt)  # tracing: this attempt's headers replace the caller's
            if traced:
                metadata = (*(m for m in (metadata or ()) if m[0].lower() not in _TRACE_HEADERS), *traced)
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
            if reporting:
                rpc = _tell_telemetry(attempt, rpc, exchange, 1, ep)
            return _Outcome(response, rpc, None, 0)
        except grpc.RpcError as err:
            if reporting:
                err = _tell_telemetry(attempt, err, exchange, 0, ep)
            if inv is not None and inv.cancelled:
                return _Outcome(None, err, err, None)  # cancelled by the caller: not the upstream's fault
            kind, client_err = _transport_failure(err, timeout, time.monotonic() - started, ep)
            if kind is not None:
                raise _AttemptFailed(kind, client_err) from None
            return _Outcome(None, err, err, err.code().value[0])
        finally:
            ch._pool.release(ep)


def _peer_value(rpc: Any) -> Tuple[Optional[str], bool]:
    """``(x-envoy-peer-metadata value, whether either exchange key is there)`` of an RPC's initial
    metadata. (grpcio shows the application no x-envoy-peer-metadata: grpc-core parses it into
    its own ``XEnvoyPeerMetadata`` trait, not published to the application; the ``-id`` key
    does come through.)"""
    try:
        md = [*(rpc.initial_metadata() or ()), *(rpc.trailing_metadata() or ())]  # (trailers-only answers)
    except Exception:  # noqa: BLE001  (an RPC that never started has none)
        return None, False
    value, found = None, False
    for k, v in md:
        if k in _PEER_HEADERS:
            found = True
            if k == _PEER_HEADER:
                value = v if isinstance(v, str) else bytes(v).decode("latin-1")
    return value, found


def _tell_telemetry(attempt: Attempt, rpc: Any, exchange: Any, responses: int, ep: Any = None) -> Any:
    """The attempt's facts for its telemetry record (the peer's x-envoy-peer-metadata: from the
    response's metadata where grpcio shows it, else as the endpoint channel's tap read it; one
    request message, ``responses`` response messages); with Istio's metadata exchange on, the
    returned call (or error) hides the exchange metadata from the caller."""
    peer, found = _peer_value(rpc)
    if peer is None:
        peer = _tapped_peer(ep)
    attempt.telemetry = {"peer_metadata": peer, "request_messages": 1, "response_messages": responses}
    if exchange is not None and found:
        return StrippedError(rpc) if isinstance(rpc, grpc.RpcError) else _StrippedCall(rpc)
    return rpc


class _StrippedCall:
    """A finished ``grpc.Call`` whose initial metadata leaves out Istio's exchange pair (as a client
    sidecar strips it); everything else is the call's own."""

    def __init__(self, rpc: Any) -> None:
        self._rpc = rpc

    def initial_metadata(self) -> Any:
        return _strip_peer(self._rpc.initial_metadata())

    def trailing_metadata(self) -> Any:
        return _strip_peer(self._rpc.trailing_metadata())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)




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
