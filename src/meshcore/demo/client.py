"""A tiny stdlib HTTP/1.1 client for ``Call.run(send)``: keep-alive connections per endpoint.

:class:`HttpSender` is the ``send`` callable the demo hands to :meth:`meshcore.call.Call.run`:
it sends the attempt to ``attempt.address`` (the endpoint the mesh picked) with
``attempt.authority`` as ``Host`` and ``attempt.timeout`` as the socket timeout, and turns
network failures into :class:`~meshcore.call.UpstreamError` so the mesh can retry them and feed
outlier detection. Each thread keeps one connection per endpoint (``http.client`` connections
are not thread-safe); :meth:`HttpSender.close` closes every connection of every thread.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

from ..call import Attempt, UpstreamError, header_pairs

__all__ = ["HttpSender", "Response"]

log = logging.getLogger(__name__)


@dataclass
class Response:
    """What came back: ``status`` (read by ``Call.run``), headers and body."""

    status: int
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    endpoint: str = ""

    @property
    def instance(self) -> str:
        """The ``x-instance`` header the demo upstreams set."""
        return self.headers.get("x-instance", "")


class HttpSender:
    """``send(attempt) -> Response`` over pooled keep-alive connections (one per thread and endpoint)."""

    def __init__(self, method: str = "GET", headers: Optional[Mapping[str, str]] = None,
                 connect_timeout: float = 2.0) -> None:
        self.method = method
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._all: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _pool(self) -> Dict[str, http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _connection(self, key: str) -> http.client.HTTPConnection:
        pool = self._pool()
        conn = pool.get(key)
        if conn is None:
            host, _, port = key.rpartition(":")
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.connect_timeout)
            pool[key] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, key: str) -> None:
        conn = self._pool().pop(key, None)
        if conn is not None:
            conn.close()

    def __call__(self, attempt: Attempt) -> Response:
        return self.send(attempt)

    def send(self, attempt: Attempt, headers: Optional[Mapping[str, str]] = None) -> Response:
        """Send one attempt; raise ``UpstreamError`` when the upstream does not answer."""
        if self._closed:
            raise RuntimeError("HttpSender is closed")
        key = attempt.address
        hdrs = dict(self.headers)
        if attempt.headers:
            hdrs.update(header_pairs(attempt.headers))
        if headers:
            hdrs.update(headers)
        hdrs["Host"] = attempt.authority
        method = attempt.method or self.method
        for fresh_retry in (False, True):
            conn = self._connection(key)
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.timeout = self.connect_timeout if attempt.timeout is None else min(
                        self.connect_timeout, attempt.timeout)
                    conn.connect()
                conn.sock.settimeout(attempt.timeout)
                conn.request(method, attempt.path, headers=hdrs)
                resp = conn.getresponse()
                body = resp.read()
                out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, key)
                if resp.will_close:
                    self._drop(key)
                return out
            except ConnectionRefusedError as exc:
                self._drop(key)
                raise UpstreamError("connect-failure", key, exc) from exc
            except (socket.timeout, TimeoutError) as exc:
                self._drop(key)
                raise UpstreamError("timeout", key, exc) from exc
            except (http.client.HTTPException, OSError) as exc:
                self._drop(key)
                if reused and not fresh_retry:
                    # The server closed an idle keep-alive connection: try once on a new one.
                    log.debug("stale connection to %s (%s); reconnecting", key, exc)
                    continue
                raise UpstreamError("reset", f"{key}: {exc}", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every connection (of every thread)."""
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
