"""The request lifecycle: one routed request, its attempts, and what they feed back.

``Mesh.request(url, method, headers)`` routes the request once (virtual host, route, cluster;
Envoy picks the weighted cluster once per request) and returns a :class:`Call`. Two ways to use it:

* ``call.run(send)`` / ``await call.run_async(send)``: the whole Envoy router behaviour. Fault
  injection first, then attempts: each picks an endpoint (a retry avoids hosts already tried
  where it can), passes the cluster's circuit breakers, and calls ``send(attempt)``; the outcome
  (an HTTP status, a gRPC status, or an upstream error) is recorded in the cluster's stats and
  outlier detector and decides, under the route's retry policy, whether to retry after a
  jittered backoff, within the route timeout. The last outcome is returned (or raised).
* ``with mesh.request(...) as attempt:`` one attempt under your control: send to
  ``attempt.url`` with ``attempt.authority`` as Host, set ``attempt.status`` (or let an exception
  leave the block); completion, status and latency are fed back on exit.

``send`` signals upstream failures by raising :class:`UpstreamError` (``kind``: connect-failure,
reset, timeout) or the builtin ``ConnectionRefusedError`` / ``TimeoutError`` /
``ConnectionError``; ``classify`` can map a client library's exceptions. Anything else propagates
unchanged (the attempt is released and counted as a reset).

``Call`` and ``Attempt`` come from the request path in ``meshcore._fast`` (compiled, or its
pure-Python twin under ``MESHCORE_NO_EXTENSIONS=1``); the loop around them is
``meshcore.lifecycle``.
"""

from __future__ import annotations

from types import ModuleType

from ._fast import IMPLEMENTATION
from .errors import CircuitBreakerOpen, FaultAbort, UpstreamError, UpstreamTimeout
from .lifecycle import default_classify, default_status_of, header_pairs

core: ModuleType
if IMPLEMENTATION == "c":
    from ._fast import call_c as core
else:
    from ._fast import call_py as core

Call = core.Call
Attempt = core.Attempt

__all__ = ["Call", "Attempt", "UpstreamError", "CircuitBreakerOpen", "FaultAbort", "UpstreamTimeout",
           "default_classify", "default_status_of", "header_pairs"]
