"""TCP services through the mesh: the endpoint (and TLS) a sidecar's ``tcp_proxy`` would use.

In the Envoy shape a destination whose listener chain is a ``tcp_proxy`` (databases, caches,
anything not HTTP) has no routes: a connection goes to one endpoint of the proxy's cluster,
balanced by the cluster's policy, skipping ejected hosts, with the cluster's transport socket
(mTLS in a STRICT mesh). :meth:`Mesh.tcp_endpoint` gives that choice to a client that connects
by itself; :meth:`Mesh.tcp_connect` makes the connection (TLS included) and reports its outcome
to outlier detection as Envoy's ``tcp_proxy`` does (a connect failure is a local-origin failure,
a connection made a success), counting ``upstream_cx_total`` / ``upstream_cx_connect_fail``.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

from .errors import Unavailable, UpstreamError

__all__ = ["TcpPick"]


class TcpPick:
    """One connection's endpoint choice for a TCP service. ``done()`` when the connection ends
    (least-request counts it in flight until then); a context manager."""

    __slots__ = ("target", "cluster", "endpoint", "tls", "_lb", "_state", "_done", "connect_timeout")

    def __init__(self, target: str, cluster: str, endpoint: Any, lb: Any, tls: Any, state: Any,
                 connect_timeout: float) -> None:
        self.target = target
        self.cluster = cluster
        self.endpoint = endpoint
        self.tls = tls  # meshcore.tls.UpstreamTls, or None for plaintext
        self._lb = lb
        self._state = state
        self._done = False
        self.connect_timeout = connect_timeout

    @property
    def address(self) -> Any:
        return (self.endpoint.address, self.endpoint.port)

    def connect(self, timeout: Optional[float] = None) -> socket.socket:
        """Connect to the endpoint (TLS when the cluster says so; the peer checked before it is
        returned). Raises :class:`~meshcore.errors.UpstreamError` (``connect-failure``) after
        counting it; ``timeout`` defaults to the cluster's ``connect_timeout``."""
        ep = self.endpoint
        stats = self._state.stats
        outlier = self._state.outlier
        limit = self.connect_timeout if timeout is None else timeout
        started = time.monotonic()
        stats.inc("upstream_cx_total")
        try:
            sock = socket.create_connection((ep.address, ep.port), timeout=limit)
        except OSError as e:
            self._failed(stats, outlier)
            raise UpstreamError("connect-failure", f"{ep.key} (cluster {self.cluster}): {e}", e) from e
        if self.tls is not None:
            try:
                sock.settimeout(max(0.001, limit - (time.monotonic() - started)))
                sock = self.tls.wrap_socket(sock, ep.key, "tcp", ep=ep)
            except (UpstreamError, OSError) as e:
                self._failed(stats, outlier)
                if isinstance(e, UpstreamError):
                    raise
                raise UpstreamError("connect-failure", f"{ep.key} (cluster {self.cluster}): TLS: {e}", e) from e
        sock.settimeout(None)
        if outlier is not None:
            outlier.record(ep.key, 200)  # Envoy: LOCAL_ORIGIN_CONNECT_SUCCESS
        return sock

    def _failed(self, stats: Any, outlier: Any) -> None:
        stats.inc("upstream_cx_connect_fail")
        if outlier is not None:
            outlier.record(self.endpoint.key, None, True)  # Envoy: LOCAL_ORIGIN_CONNECT_FAILED

    def done(self) -> None:
        if not self._done:
            self._done = True
            self._lb.release(self.endpoint)

    def __enter__(self) -> "TcpPick":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done()

    def __repr__(self) -> str:
        return f"TcpPick({self.target!r}, cluster={self.cluster!r}, endpoint={self.endpoint.key!r})"


def no_tcp_service(target: str, why: str) -> Unavailable:
    return Unavailable(f"{target}: not a TCP service of the mesh: {why}")
