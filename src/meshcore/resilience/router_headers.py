"""The router's request headers: a request may tighten or change its own timeouts and retries.

Envoy's router honours these ``x-envoy-*`` headers only on *internal* requests; the connection
manager strips them from external ones (source/common/http/conn_manager_utility.cc
``mutateRequestHeaders``). A request is internal when, after the remote address is appended to
``x-forwarded-for`` (``use_remote_address``) or read from it (otherwise, ``xff_num_trusted_hops``
from the right), XFF holds a single address that ``internal_address_config.cidr_ranges`` lists.
Envoy 1.40 has no default internal ranges: without ``internal_address_config`` no request is
internal (checked against a real Envoy 1.40 in tests/interop/test_resilience_vs_envoy.py).
meshcore applies the same rule to the API listener's HttpConnectionManager; the in-process
caller's remote address is ``Mesh.request(source_ip=)``, else ``127.0.0.1`` (an application
talking to its sidecar over loopback). On internal requests:

* ``x-envoy-upstream-rq-timeout-ms``: the request's timeout instead of the route's (0: none);
  ``x-envoy-upstream-rq-per-try-timeout-ms``: the per-try timeout instead of the policy's
  (source/common/router/router.cc ``FilterUtility::finalTimeout``). Values that are not a plain
  unsigned integer are ignored.
* ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on``: conditions added to the route's
  ``retry_on`` (a route without a retry policy gets Envoy's default one: 1 retry, 25 ms base);
  ``x-envoy-max-retries``: the number of retries, when any retry condition is set;
  ``x-envoy-retriable-status-codes``: codes added to the route's list (they count under
  ``retriable-status-codes``) (source/common/router/retry_state_impl.cc).

They are inline headers in Envoy, whose HTTP/1 codec joins repeated values with ``,``; so are
they here. Envoy never sends them upstream (consumed on internal requests, stripped from
external ones); the client integrations (httpx, requests, aiohttp) remove them likewise. With the
plain API (``with mesh.request(...) as attempt``) the application sends its own headers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Dict, Optional, Tuple

from .._fast import _hooks
from .._route_model import RetryPolicy
from .._routing import header_pairs, simple_atoi_unsigned
from .retry import known_retry_conditions

__all__ = ["ROUTER_HEADERS", "apply_router_headers", "is_internal_request", "router_headers_of"]

# the header names and ROUTER_HEADERS are defined with the request path (it imports nothing above it)
from .._fast._consts import (MAX_RETRIES, PER_TRY_TIMEOUT_MS, RETRIABLE_STATUS_CODES, RETRY_GRPC_ON, RETRY_ON,
                             ROUTER_HEADERS, TIMEOUT_MS)
_SHORTEST = min(len(h) for h in ROUTER_HEADERS)  # 16: x-envoy-retry-on
XFF = "x-forwarded-for"
LOOPBACK = "127.0.0.1"

_UINT32_MAX = (1 << 32) - 1


def router_headers_of(headers: Any) -> Optional[Dict[str, str]]:
    """The router headers among ``headers`` (a mapping or ``(name, value)`` pairs), by lower-cased
    name, repeated values joined with ``,``; ``None`` when there are none (the common case)."""
    found: Optional[Dict[str, str]] = None
    for name, value in header_pairs(headers):
        if len(name) < _SHORTEST or name[0] not in "xX":
            continue
        key = name.lower()
        if key in ROUTER_HEADERS:
            if found is None:
                found = {}
            found[key] = f"{found[key]},{value}" if key in found else value
    return found


def is_internal_request(listener: Any, headers: Any, source_ip: Optional[str] = None) -> bool:
    """Whether Envoy's connection manager would treat this request as internal (see the module
    docstring); ``listener`` is the target's ListenerSpec."""
    cidrs = getattr(listener, "internal_cidrs", ())
    if not cidrs:
        return False
    xff_values = [v for k, v in header_pairs(headers) if k.lower() == XFF]
    if listener.use_remote_address:
        # XFF is appended to: a single address only if the request had none, and then the
        # remote address is the connection's (whatever xff_num_trusted_hops says)
        return not xff_values and _in(source_ip or LOOPBACK, cidrs)
    # getLastAddressFromXFF(headers, xff_num_trusted_hops): single only with no hops to skip and
    # no comma (repeated XFF headers are joined with one)
    if not xff_values or listener.xff_num_trusted_hops:
        return False
    xff = ",".join(xff_values)
    return "," not in xff and _in(xff.strip(" \t"), cidrs)


def _in(address: str, cidrs: Any) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in cidrs)


def apply_router_headers(policy: Optional[RetryPolicy], timeout: Optional[float],
                         found: Dict[str, str]) -> Tuple[Optional[RetryPolicy], Optional[float]]:
    """``(retry policy, route timeout in seconds)`` for a request carrying the router headers
    ``found`` (from :func:`router_headers_of`), given the route's own."""
    value = found.get(TIMEOUT_MS)
    if value is not None:
        ms = simple_atoi_unsigned(value)
        if ms is not None:
            timeout = ms / 1000.0 if ms else None
    retry_on = found.get(RETRY_ON)
    grpc_on = found.get(RETRY_GRPC_ON)
    per_try = found.get(PER_TRY_TIMEOUT_MS)
    codes = found.get(RETRIABLE_STATUS_CODES)
    if policy is None:
        if retry_on is None and grpc_on is None and per_try is None:
            return None, timeout
        policy = RetryPolicy()  # Envoy's RetryPolicyImpl defaults: no conditions, 1 retry
    changes: Dict[str, Any] = {}
    added = tuple(v for v in (retry_on, grpc_on) if v)
    if added:
        changes["retry_on"] = policy.retry_on + added
    conditions = known_retry_conditions(changes.get("retry_on", policy.retry_on))
    max_retries = found.get(MAX_RETRIES)
    if max_retries is not None and conditions:
        n = simple_atoi_unsigned(max_retries)
        if n is not None:
            changes["num_retries"] = n
    if codes is not None:
        parsed = (simple_atoi_unsigned(t, _UINT32_MAX) for t in codes.split(",") if t)
        extra = tuple(c for c in parsed if c is not None)
        if extra:
            changes["retriable_status_codes"] = policy.retriable_status_codes + extra
    if per_try is not None:
        ms = simple_atoi_unsigned(per_try)
        if ms is not None:
            changes["per_try_timeout"] = ms / 1000.0 if ms else None
    return (dataclasses.replace(policy, **changes) if changes else policy), timeout


# the request path (meshcore._fast.call_*) reads a request's router headers through these; it
# imports nothing above it
_hooks.register(router_headers_of=router_headers_of, is_internal_request=is_internal_request,
                apply_router_headers=apply_router_headers)
