"""The request headers the mesh routes a gRPC call by: gRPC's own plus the call's metadata."""

from __future__ import annotations

import base64
from typing import Any, List, Tuple

from ._types import Metadata

_GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
#: the headers of an RPC without metadata, shared by all of them (a dict: the route table reads
#: it without converting it; nothing in meshcore writes to request headers)
_GRPC_HEADER_DICT = dict(_GRPC_HEADERS)


def _headers(metadata: Metadata) -> Any:
    """The request headers routing sees: gRPC's own plus the call's metadata (``-bin`` values
    base64-encoded, as they travel). No metadata: one shared dict (nothing allocated)."""
    if not metadata:
        return _GRPC_HEADER_DICT
    headers: List[Tuple[str, str]] = list(_GRPC_HEADERS)
    for key, value in metadata:
        if type(value) is not str and isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")  # -bin metadata travels base64-encoded
        headers.append((key, value))
    return headers


_OWN_HEADERS = frozenset(_GRPC_HEADER_DICT)

#: Istio's metadata exchange keys (``x-envoy-peer-metadata`` and its ``-id``)
PEER_HEADER = "x-envoy-peer-metadata"
PEER_HEADERS = frozenset({PEER_HEADER, "x-envoy-peer-metadata-id"})


def _with_exchange(metadata: Metadata, exchange_headers: Any) -> Tuple[Tuple[str, Any], ...]:
    """The call's metadata with Istio's exchange pair (this workload's) in place of any the
    application sent itself (a sidecar overwrites them too: no duplicate key on the wire)."""
    if not metadata:
        return tuple(exchange_headers)
    return (*(m for m in metadata if m[0].lower() not in PEER_HEADERS), *exchange_headers)


def _strip_peer(pairs: Any) -> Any:
    """Metadata without Istio's exchange pair (as a client sidecar strips it from responses)."""
    if not pairs:
        return pairs
    if not any(k in PEER_HEADERS for k, _ in pairs):
        return pairs
    return tuple(m for m in pairs if m[0] not in PEER_HEADERS)


def _names_own_headers(obj: Any, depth: int = 0) -> bool:
    """Whether a configuration (the models' dataclasses, containers, strings) could route by the
    headers every gRPC call carries: it names ``content-type`` or ``te`` anywhere (a header
    matcher, hash policy, ``cluster_header``, ``vhost_header``, a fault filter's matcher ...) or
    has a ``grpc`` route matcher. Conservative: any mention counts, too deep a structure too."""
    if depth > 64:
        return True
    if obj is None or isinstance(obj, (bool, int, float, bytes)):
        return False
    if isinstance(obj, str):
        return obj.lower() in _OWN_HEADERS
    depth += 1
    if isinstance(obj, dict):
        return any(_names_own_headers(k, depth) or _names_own_headers(v, depth) for k, v in obj.items())
    if isinstance(obj, (tuple, list, set, frozenset)):
        return any(_names_own_headers(v, depth) for v in obj)
    names: Any = getattr(obj, "__dataclass_fields__", None)
    if names is None:
        names = getattr(type(obj), "__slots__", None)
        if names is None:
            attrs = getattr(obj, "__dict__", None)
            names = list(attrs) if isinstance(attrs, dict) else ()
        elif isinstance(names, str):
            names = (names,)
    for name in names:
        value = getattr(obj, name, None)
        if name == "grpc" and value:
            return True  # Envoy's grpc matcher reads content-type
        if _names_own_headers(value, depth):
            return True
    return False


def _routes_by_own_headers(cfg: Any) -> bool:
    """Whether routing (and fault filtering) under a published configuration could differ with
    gRPC's own headers absent; when it cannot, calls without metadata are routed without them."""
    table = cfg.route_table
    spec = getattr(table, "spec", None)
    if table is None or spec is None:
        return True
    try:
        return _names_own_headers(spec) or _names_own_headers(cfg.fault_filters) or \
            _names_own_headers(cfg.listener)
    except Exception:  # noqa: BLE001  (a model this walk does not know: keep the headers)
        return True
