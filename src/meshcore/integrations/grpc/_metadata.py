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
