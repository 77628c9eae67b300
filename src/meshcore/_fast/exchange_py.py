"""Istio's metadata exchange headers in a response's header pairs (pure Python; the compiled twin
is in ``call_c``): which pairs they are, and the pairs without them. Imports nothing: the
telemetry layer (``peer_metadata.strip_pairs``) and the pure request core share it."""

from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["PEER_HEADER", "PEER_HEADER_ID", "strip_peer_pairs"]

#: Istio's metadata exchange headers, lower-case (``telemetry.peer_metadata.HEADER``/``HEADER_ID``)
PEER_HEADER = "x-envoy-peer-metadata"
PEER_HEADER_ID = "x-envoy-peer-metadata-id"
_PEER_NAMES = {PEER_HEADER: 1, PEER_HEADER_ID: 2}


def _peer_name(k: Any) -> int:
    """1 for x-envoy-peer-metadata, 2 for x-envoy-peer-metadata-id (str or bytes-like, any case),
    0 for any other name."""
    if len(k) not in (21, 24):
        return 0
    return _PEER_NAMES.get(k.lower() if isinstance(k, str) else bytes(k).lower().decode("latin-1"), 0)


def strip_peer_pairs(pairs: Any) -> Tuple[Any, Optional[str]]:
    """``(pairs without the exchange headers, the x-envoy-peer-metadata value or None)`` of a
    response's header pairs (str or bytes names, any case; the value as str); the same object
    when it has neither."""
    if not any(_peer_name(k) for k, _ in pairs):
        return pairs, None
    kept, value = [], None
    for k, v in pairs:
        which = _peer_name(k)
        if which == 1:
            if value is None:
                value = v if type(v) is str else _latin1(v)
        elif which == 0:
            kept.append((k, v))
    return kept, value


def _latin1(v: Any) -> str:
    """A header value that is not a str: its bytes (bytes-like only; TypeError for anything else,
    an int included, which ``bytes()`` would take as a size) as latin-1."""
    if type(v) is bytes:
        return v.decode("latin-1")
    return memoryview(v).tobytes().decode("latin-1")
