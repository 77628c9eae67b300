"""How the request path reads an attempt's outcome: the default ``status_of`` / ``classify`` of
``call.run(send)`` (``meshcore.lifecycle`` and ``meshcore.call`` re-export them) and the scans of
a request's headers and a response for the telemetry (``meshcore.telemetry.outcome`` re-exports
them). Defined in ``_fast`` so that the request path imports nothing from the layers above it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Optional, Tuple

from ..errors import UpstreamError
from ._consts import CONNECT_FAILURE, RESET, TIMEOUT

__all__ = ["default_classify", "default_status_of"]


def default_classify(exc: BaseException) -> Optional[str]:
    """The upstream failure kind of an exception ``send`` raised (``None``: not an upstream failure)."""
    if isinstance(exc, UpstreamError):
        return exc.kind
    if isinstance(exc, ConnectionRefusedError):
        return CONNECT_FAILURE
    if isinstance(exc, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return TIMEOUT
    if isinstance(exc, (ConnectionError, EOFError)):
        return RESET
    return None


def default_status_of(result: Any) -> Optional[int]:
    status = getattr(result, "status_code", None)
    if status is None:
        status = getattr(result, "status", None)
    return status if isinstance(status, int) else None


#: a content-length at or above this counts 0 bytes (the compiled twin's double holds it exactly below)
_MAX_LENGTH = 1 << 53


def _length(value: Any) -> int:
    """A content-length header's value as a byte count: 0 for a negative or absurdly large one
    (ValueError/TypeError for one that is not a number, as ``int``)."""
    n = int(value)
    return n if 0 <= n < _MAX_LENGTH else 0


def _text(value: Any) -> str:
    """A header name or value as str (bytes-like: latin-1); TypeError for anything else (an int
    is not taken for a size, as ``bytes(n)`` would)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    raise TypeError(f"a header name or value must be str or bytes, not {type(value).__name__}")


def _is_grpc(content_type: str) -> bool:
    """Envoy's ``Grpc::Common::isGrpcRequestHeaders`` test of a content-type."""
    ct = content_type.lower()
    return ct == "application/grpc" or ct.startswith("application/grpc+") or ct.startswith("application/grpc;")


def _scan_request(headers: Any) -> Tuple[int, Optional[str], bool]:
    """``(content-length or 0, x-request-id, gRPC content-type)`` of the request's headers (a
    mapping or pairs, str or bytes)."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    length, rid, grpc = 0, None, False
    try:
        for k, v in pairs:
            n = len(k)
            if n == 14 or n == 12:
                lk = k.lower() if isinstance(k, str) else _text(k).lower()
                if lk == "content-length":
                    try:
                        length = _length(v)
                    except (TypeError, ValueError, OverflowError):
                        pass
                elif lk == "x-request-id":
                    rid = _text(v)
                elif lk == "content-type":
                    grpc = _is_grpc(_text(v))
    except (TypeError, ValueError, OverflowError):
        pass
    return length, rid, grpc


def _scan_response(result: Any, peers: bool = True) -> Tuple[int, Optional[str]]:
    """``(body length, x-envoy-peer-metadata if ``peers``)`` of a response ``send`` returned: the
    body when it was read (``_content`` bytes: requests, httpx), else its Content-Length."""
    d = getattr(result, "__dict__", None)
    if d is not None:  # plain dict reads: no AttributeError raised and caught per miss
        body = d.get("_content")
        headers = d.get("headers")
        if headers is None:
            headers = d.get("_headers")  # httpx.Response
    else:
        body = getattr(result, "_content", None)
        headers = getattr(result, "headers", None)
    length = len(body) if isinstance(body, (bytes, bytearray)) else 0
    peer = None
    if headers is not None and (peers or not length):
        get = getattr(headers, "get", None)
        if get is not None:
            try:
                if not length:
                    cl = get("content-length")
                    if cl is not None:
                        length = _length(cl)
                if peers:
                    peer = get("x-envoy-peer-metadata")
            except (TypeError, ValueError, OverflowError):
                pass
    if isinstance(peer, bytes):
        peer = peer.decode("latin-1")
    return length, peer
