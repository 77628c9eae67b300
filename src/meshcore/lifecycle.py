"""The request lifecycle around the compiled request path: Envoy's router loop of fault,
attempts, outcome classification, retries with back-off, and timeouts.

The per-request hot steps (route, pick, circuit breakers, stats) are methods of ``Call`` and
``Attempt`` in ``meshcore._fast.call_c`` / ``call_py``; this module is the Python that drives
them for ``call.run(send)`` / ``call.run_async(send)`` and the helpers they share with the
client integrations.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any, Awaitable, Callable, Optional, Tuple, TypeVar

from ._fast import _hooks
from ._fast._outcome import default_classify, default_status_of
from ._route_model import RetryPolicy
from ._routing import header_pairs
from .errors import UpstreamTimeout
from .resilience.fault import NO_FAULT, ActiveFaults, FaultDecision, decide_fault, limit_faults
from .resilience.retry import RESET, TIMEOUT, retriable
from .telemetry.outcome import report as _report
from .telemetry.tracing import TRACER as _TRACER, begin as _begin_trace
from .telemetry.tracing import _SINGLE, begin_single as _begin_single_trace, end_single as _end_single_trace

__all__ = ["begin_single", "default_classify", "default_status_of", "fault_decision", "fault_filter_for",
           "fault_step", "fault_step_async", "header_pairs", "report_single", "run", "run_after", "run_async",
           "run_after_async", "run_reported", "run_async_reported", "send_timed"]

R = TypeVar("R")
Classify = Callable[[BaseException], Optional[str]]
StatusOf = Callable[[Any], Optional[int]]


def fault_filter_for(cfg: Any, route: Any) -> Tuple[Optional[str], Any]:
    """``(filter name, fault config)`` for a request: the listener's first fault filter, with the
    route's (or its virtual host's) ``typed_per_filter_config`` for that filter name replacing
    the filter's own config (Envoy's per-route filter config; how Istio applies VirtualService
    faults). ``(None, None)``: no fault filter applies."""
    filters = cfg.fault_filters
    if not filters:
        return None, None
    overrides = route.filter_overrides if route is not None else ()
    for name, config, disabled in filters:
        for oname, oconfig in overrides:
            if oname == name:
                return name, oconfig
        if config is not None and not disabled:
            return name, config
    return None, None


def fault_decision(spec: Any, headers: Any, rng: Any, cluster: Optional[str],
                   active: Optional[ActiveFaults] = None) -> Tuple[FaultDecision, bool]:
    """The fault filter's decision for one request under ``spec`` (not ``None``), limited by
    ``max_active_faults`` against the filter's ``active`` faults: ``(decision, counted)``; when
    counted, the fault stays active until its delay has elapsed or its abort answered."""
    hdrs: dict = {}
    for k, v in header_pairs(headers):
        hdrs.setdefault(k.lower(), v)  # Envoy reads the first value of a repeated header
    d = decide_fault(spec, hdrs, rng, cluster)
    if active is None or d is NO_FAULT:
        return d, False
    return limit_faults(d, spec, active)


def fault_step(call: Any) -> None:
    """The fault filter for ``call`` before its first attempt: decide, sleep the delay (the
    route timeout then starts), answer an abort (``FaultAbort``)."""
    d = call.fault()
    if d is not NO_FAULT:
        _fault_delay(call, d)


async def fault_step_async(call: Any) -> None:
    """:func:`fault_step` with ``asyncio.sleep`` (a cancelled delay ends the active fault)."""
    d = call.fault()
    if d is not NO_FAULT:
        await _fault_delay_async(call, d)


# -- the router loop ------------------------------------------------------------------------------


def _retry_delay(call: Any, a: Any) -> Optional[float]:
    """The back-off before retrying after ``a`` (bounded by the deadline), or ``None``: done."""
    if not retriable(call.retry_policy, a.status, a.grpc_status, a.error):
        return None  # decided without making the request's retry state (the common case)
    retry = call.retry
    if not retry.can_retry():
        call._count("upstream_rq_retry_limit_exceeded")  # retriable, but no retries left (Envoy)
        return None
    remaining = call._remaining()
    if remaining is not None and remaining <= 0:
        return None
    delay = retry.next_backoff()
    return delay if remaining is None else min(delay, max(0.0, remaining))


def _final(call: Any, a: Any, result: Any, exc: Optional[BaseException]) -> Any:
    # Envoy's RetryStateImpl: a request that was retried and whose last outcome the policy would
    # not retry succeeded by retrying, whatever its status; judged like the retry decision
    # (grpc-status included), so a gRPC error the policy retries is not a success
    if a.number > 1 and not retriable(call.retry_policy, a.status, a.grpc_status, a.error):
        call._count("upstream_rq_retry_success")
    if exc is not None:
        if a.error == TIMEOUT and call.deadline is not None and time.monotonic() >= call.deadline:
            call._count("upstream_rq_timeout")
            raise UpstreamTimeout(f"{call.target}{call.path}: request timeout elapsed "
                                  f"(route timeout {call.route.timeout}s)") from exc
        raise exc
    return result


def _fault_delay(call: Any, d: Any) -> None:
    """The fault filter's delay (slept) and abort for ``d``, a decision other than NO_FAULT."""
    try:
        if d.delay:
            time.sleep(d.delay)
    except BaseException:
        call._release_fault()
        raise
    call._after_fault(d)


async def _fault_delay_async(call: Any, d: Any) -> None:
    try:
        if d.delay:
            await asyncio.sleep(d.delay)
    except BaseException:
        call._release_fault()
        raise
    call._after_fault(d)


def _final_answer(policy: Any, status: Optional[int], grpc_status: Optional[int]) -> bool:
    """Whether an answer (no upstream error) is final under ``policy``: ``not retriable(...)``,
    decided without a call for the usual answer (no grpc-status or grpc-status OK, which no retry
    condition names; below 409: only ``retriable_status_codes`` can retry it)."""
    if policy is None:
        return True
    if (grpc_status is None or grpc_status == 0) and status is not None and status < 409:
        compiled = policy.compiled if type(policy) is RetryPolicy else None
        if compiled is not None:
            return status not in compiled.status_codes
    return not retriable(policy, status, grpc_status, None)


def run(call: Any, send: Callable[[Any], R], status_of: StatusOf, grpc_status_of: Optional[StatusOf],
        classify: Classify) -> R:
    """``Call.run``: fault, then attempts until one is final (see ``meshcore.call``). The usual
    request (no fault filter, a first answer the policy does not retry) takes the straight path:
    ``first_attempt`` (breakers and pick), send, ``finish_final`` (record, and the policy's
    verdict), return; anything else continues in :func:`run_after`. While a mesh has telemetry
    sinks (``telemetry.record.ACTIVE``), ``Call.run`` and the integrations' general paths call
    :func:`run_reported` instead (httpx's inline path reports the call itself unless tracing is on)."""
    a = call.first_attempt()
    if a is None:  # a fault filter applies: its step runs before the first attempt
        d = call.fault()
        if d is not NO_FAULT:
            _fault_delay(call, d)
        a = call.start_attempt()
    try:
        result = send(a)
    except BaseException as e:  # noqa: BLE001  (classified)
        kind = classify(e)
        a.finish(error=kind or RESET)
        if kind is None:
            raise
        return run_after(call, a, None, e, send, status_of, grpc_status_of, classify)
    if a.finish_final(status_of(result), grpc_status_of(result) if grpc_status_of is not None else None):
        return result
    return run_after(call, a, result, None, send, status_of, grpc_status_of, classify)


def run_after(call: Any, a: Any, result: Any, exc: Optional[BaseException], send: Callable[[Any], R],
              status_of: StatusOf, grpc_status_of: Optional[StatusOf], classify: Classify) -> R:
    """The router loop after attempt ``a``'s outcome -- ``result``, or ``exc`` (classified and
    recorded: ``a.finish(error=...)``) -- did not end the request: retry while the policy, the
    retry budget and the route's deadline allow, then the last outcome. For callers that make
    the first attempt themselves (an integration's straight path) and :func:`run`."""
    while True:
        delay = _retry_delay(call, a)
        if delay is None:
            return _final(call, a, result, exc)  # type: ignore[no-any-return]
        if delay:
            time.sleep(delay)
        a = call.start_attempt()
        if a is None:  # retry overflow: the last outcome stands
            return _final(call, call.attempts[-1], result, exc)  # type: ignore[no-any-return]
        if result is not None:
            _close(result)  # a retry was admitted: the previous response is discarded
        try:
            result = send(a)
        except BaseException as e:  # noqa: BLE001  (classified)
            kind = classify(e)
            a.finish(error=kind or RESET)
            if kind is None:
                raise
            result, exc = None, e
        else:
            exc = None
            if a.finish_final(status_of(result), grpc_status_of(result) if grpc_status_of is not None else None):
                return result


_HAS_UNCANCEL = hasattr(asyncio.Task, "uncancel")
_get_running_loop = asyncio.get_running_loop
_current_task = asyncio.current_task


class _Deadlines:
    """The attempt deadlines of one event loop, served by one timer.

    ``asyncio.wait_for`` makes a task per attempt and ``asyncio.timeout`` a timer handle per
    attempt (a heap push through ``TimerHandle.__lt__`` in Python and a cancelled handle to clean
    up: several µs each). Here an attempt registers its deadline in a dict, ``pending``: key (the
    attempt itself in the router loop) -> ``(when, task, cancelling)``, ``cancelling`` being the
    cancellation requests the task had before (3.11+: ``Task.cancelling``). The loop holds one
    timer, armed at the earliest deadline it knows of (re-armed only when an earlier one
    arrives, which equal timeouts started later never are). When it fires, the attempts whose
    deadline passed move to ``fired`` (key -> cancelling) and have their task cancelled
    (``TimeoutError`` in the attempt, as with ``asyncio.timeout``); it is re-armed at the
    earliest remaining deadline.
    """

    __slots__ = ("_loop_ref", "pending", "fired", "handle", "armed_at")

    def __init__(self, loop: Any) -> None:
        # weakly: this object is the value of a WeakKeyDictionary keyed by the loop, and a
        # value referencing its key would keep every closed loop (and its table) alive
        self._loop_ref = weakref.ref(loop)
        self.pending: dict = {}
        self.fired: dict = {}
        self.handle: Any = None
        self.armed_at = 0.0

    @property
    def loop(self) -> Any:
        return self._loop_ref()

    def add(self, timeout: float, key: Any = None) -> Any:
        """Register a deadline ``timeout`` seconds from now for the current task under ``key``
        (a new one if ``None``); returns the key (withdraw it with ``pending.pop(key, None)``)."""
        loop = self.loop
        if key is None:
            key = object()
        task = _current_task(loop)
        when = loop.time() + timeout
        self.pending[key] = (when, task, task.cancelling() if _HAS_UNCANCEL else 0)
        if self.handle is None or when < self.armed_at:
            self._arm(when)
        return key

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed_at = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        now = self.loop.time()
        earliest = None
        pending = self.pending
        for key, (when, task, cancelling) in list(pending.items()):
            if when <= now:
                del pending[key]
                self.fired[key] = cancelling
                task.cancel()
            elif earliest is None or when < earliest:
                earliest = when
        if earliest is not None:
            self.armed_at = earliest
            self.handle = self.loop.call_at(earliest, self._fire)

    def timed_out(self, key: Any) -> bool:
        """After a CancelledError in the attempt registered as ``key``: whether its deadline
        caused it (then the cancellation is taken back, as ``asyncio.timeout`` does, and the
        caller raises a TimeoutError). Forgets the key either way."""
        cancelling = self.fired.pop(key, None)
        if cancelling is None:
            return False
        if _HAS_UNCANCEL:
            return _current_task(self.loop).uncancel() <= cancelling
        return True


_BASE_TIME = asyncio.BaseEventLoop.time
#: (loop, its _Deadlines, its clock): the last loop used (the usual program has one)
_loop_deadlines: Tuple[Any, Any, Callable[[], float]] = (None, None, time.monotonic)
_deadlines_of: "weakref.WeakKeyDictionary[Any, _Deadlines]" = weakref.WeakKeyDictionary()
_deadlines_lock = threading.Lock()


def _deadlines() -> _Deadlines:
    """The running loop's :class:`_Deadlines` (made on first use), remembered with the loop's
    clock: ``time.monotonic`` itself (a C call) when ``loop.time`` is asyncio's
    ``BaseEventLoop.time``, which returns it; otherwise ``loop.time``."""
    global _loop_deadlines
    loop = asyncio.get_running_loop()
    last_loop, dl, _ = _loop_deadlines
    if last_loop is loop:
        return dl
    with _deadlines_lock:
        dl = _deadlines_of.get(loop)
        if dl is None:
            dl = _deadlines_of[loop] = _Deadlines(loop)
    clock = time.monotonic if getattr(type(loop), "time", None) is _BASE_TIME else loop.time
    _loop_deadlines = (loop, dl, clock)
    return dl


def deadline_begin(a: Any, timeout: float) -> _Deadlines:
    """Register attempt ``a``'s deadline, ``timeout`` seconds from now, in the running loop's
    :class:`_Deadlines` and return it. The caller then awaits the attempt itself (no coroutine
    of ours around it), turns a ``CancelledError`` into ``TimeoutError`` when
    ``dl.timed_out(a)``, and calls :func:`deadline_end` in its ``finally`` (see
    :func:`send_timed`, the whole pattern)."""
    loop = _get_running_loop()
    last_loop, dl, clock = _loop_deadlines
    if last_loop is not loop:
        dl = _deadlines()
        clock = _loop_deadlines[2]
    task = _current_task(loop)
    when = clock() + timeout
    dl.pending[a] = (when, task, task.cancelling() if _HAS_UNCANCEL else 0)  # type: ignore[union-attr]
    if when < dl.armed_at or dl.handle is None:
        dl._arm(when)
    return dl


def deadline_end(dl: _Deadlines, a: Any) -> None:
    """Attempt ``a`` ended: its deadline leaves ``dl`` (or, fired meanwhile, its mark does)."""
    if dl.pending.pop(a, None) is None:  # its deadline fired (and the attempt went on)
        dl.fired.pop(a, None)


async def send_timed(a: Any, send: Callable[[Any], Awaitable[R]]) -> R:
    """``await send(a)`` under the attempt's deadline (``a.timeout``; ``None``: none), registered
    in the running loop's :class:`_Deadlines` (a ``TimeoutError`` when it fires, as with
    ``asyncio.timeout``)."""
    timeout = a.timeout
    if timeout is None:
        return await send(a)
    dl = deadline_begin(a, timeout)
    try:
        return await send(a)
    except asyncio.CancelledError as cancelled:
        if dl.timed_out(a):
            raise TimeoutError(f"attempt timed out after {timeout:.3f}s") from cancelled
        raise
    finally:
        deadline_end(dl, a)


async def run_async(call: Any, send: Callable[[Any], Awaitable[R]], status_of: StatusOf,
                    grpc_status_of: Optional[StatusOf], classify: Classify) -> R:
    """``Call.run_async``: :func:`run` for coroutines (sleeps with ``asyncio.sleep``; an attempt
    with a timeout is cancelled at it: :func:`send_timed`); anything but the straight path
    continues in :func:`run_after_async`."""
    a = call.first_attempt()
    if a is None:  # a fault filter applies: its step runs before the first attempt
        d = call.fault()
        if d is not NO_FAULT:
            await _fault_delay_async(call, d)
        a = call.start_attempt()
    try:
        timeout = a.timeout
        if timeout is None:
            result = await send(a)
        else:  # send_timed inline: the usual request has a route timeout, and a coroutine less
            dl = deadline_begin(a, timeout)
            try:
                result = await send(a)
            except asyncio.CancelledError as cancelled:
                if dl.timed_out(a):
                    raise TimeoutError(f"attempt timed out after {timeout:.3f}s") from cancelled
                raise
            finally:
                deadline_end(dl, a)
    except BaseException as e:  # noqa: BLE001
        kind = classify(e)
        a.finish(error=kind or RESET)
        if kind is None:
            raise
        return await run_after_async(call, a, None, e, send, status_of, grpc_status_of, classify)
    if a.finish_final(status_of(result), grpc_status_of(result) if grpc_status_of is not None else None):
        return result
    return await run_after_async(call, a, result, None, send, status_of, grpc_status_of, classify)


async def run_after_async(call: Any, a: Any, result: Any, exc: Optional[BaseException],
                          send: Callable[[Any], Awaitable[R]], status_of: StatusOf,
                          grpc_status_of: Optional[StatusOf], classify: Classify) -> R:
    """:func:`run_after` for coroutines (each attempt under its deadline: :func:`send_timed`)."""
    while True:
        delay = _retry_delay(call, a)
        if delay is None:
            return _final(call, a, result, exc)  # type: ignore[no-any-return]
        if delay:
            await asyncio.sleep(delay)
        a = call.start_attempt()
        if a is None:  # retry overflow: the last outcome stands
            return _final(call, call.attempts[-1], result, exc)  # type: ignore[no-any-return]
        if result is not None:
            await _aclose(result)
        try:
            result = await send_timed(a, send)
        except BaseException as e:  # noqa: BLE001
            kind = classify(e)
            a.finish(error=kind or RESET)
            if kind is None:
                raise
            result, exc = None, e
        else:
            exc = None
            if a.finish_final(status_of(result), grpc_status_of(result) if grpc_status_of is not None else None):
                return result


# -- telemetry ------------------------------------------------------------------------------------


def run_reported(call: Any, send: Callable[[Any], R], status_of: StatusOf, grpc_status_of: Optional[StatusOf],
                 classify: Classify) -> R:
    """:func:`run`, then the call's record to the mesh's telemetry sinks (``meshcore.telemetry``);
    traced while tracing is on (``meshcore.telemetry.tracing``)."""
    trace = _begin_trace(call) if _TRACER[0] is not None else None
    if trace is not None:
        send = trace.wrap(send)
    try:
        result = run(call, send, status_of, grpc_status_of, classify)
    except BaseException as e:
        _report(call, None, e)
        if trace is not None:
            trace.end(None, e)
        raise
    _report(call, result, None)
    if trace is not None:
        trace.end(result, None)
    return result


async def run_async_reported(call: Any, send: Callable[[Any], Awaitable[R]], status_of: StatusOf,
                             grpc_status_of: Optional[StatusOf], classify: Classify) -> R:
    """:func:`run_async`, then the call's record to the mesh's telemetry sinks (traced while
    tracing is on)."""
    trace = _begin_trace(call) if _TRACER[0] is not None else None
    if trace is not None:
        send = trace.wrap(send)
    try:
        result = await run_async(call, send, status_of, grpc_status_of, classify)
    except BaseException as e:
        _report(call, None, e)
        if trace is not None:
            trace.end(None, e)
        raise
    _report(call, result, None)
    if trace is not None:
        trace.end(result, None)
    return result


def begin_single(call: Any, attempt: Any) -> None:
    """The single-attempt form's attempt started (``Call.__enter__`` while telemetry is on): its
    span starts now and the attempt carries its trace headers (``tracing.headers_of``)."""
    if _TRACER[0] is not None:
        _begin_single_trace(call, attempt)


def report_single(call: Any, exc: Optional[BaseException]) -> None:
    """The single-attempt form (``with mesh.request(...) as attempt``) ended (``exc``: what left
    the block, or what ``__enter__`` raised): the call's record to the telemetry sinks, and its
    span while tracing is on (made now, from the call's start, if :func:`begin_single` did not
    begin it)."""
    if _TRACER[0] is None and not _SINGLE:
        _report(call, None, exc)
        return
    if _TRACER[0] is not None and call not in _SINGLE:
        # made after the fact, before the record, which reads the x-request-id it generates
        from .telemetry.tracing import _epoch_ns

        trace = _begin_trace(call, start_time=_epoch_ns(call.started))
        if trace is not None:
            if call.attempts:
                trace.attempt(call.attempts[-1])
            _SINGLE[call] = trace
    _report(call, None, exc)
    _end_single_trace(call, exc)  # (also a span begun before tracing was turned off)


def _close(result: Any) -> None:
    """Release a response that is being retried (its connection goes back to the pool)."""
    if result is None:
        return
    close = getattr(result, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            pass


async def _aclose(result: Any) -> None:
    if result is None:
        return
    close = getattr(result, "aclose", None)
    if callable(close):
        try:
            await close()
        except Exception:
            pass
        return
    _close(result)


# The request path (meshcore._fast.call_*) calls these; it imports nothing above it, so they are
# registered with it here (default_classify / default_status_of are its own, re-exported above).
_hooks.register(run=run, run_async=run_async, run_reported=run_reported, run_async_reported=run_async_reported,
                report_single=report_single, begin_single=begin_single, fault_filter_for=fault_filter_for,
                fault_decision=fault_decision, fault_step=fault_step, final_answer=_final_answer)
