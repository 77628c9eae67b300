"""Local upstream services for the demo: small threaded HTTP/1.1 servers on loopback.

Each :class:`Upstream` answers every request with ``200`` and a JSON body naming the instance
(``{"service": "reviews", "version": "v1", "instance": "reviews-v1-a"}``, also in the
``x-instance`` header). Behaviour can be changed while it runs: ``delay`` (seconds slept before
answering, to play a slow instance) and ``failing`` (answer ``500``, to play a broken one).
Connections are kept alive (HTTP/1.1), as a real service would.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional

__all__ = ["Upstream", "UpstreamGroup"]

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection is dropped after this many seconds
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stalls
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802  (http.server's spelling)
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self._answer()

    def _answer(self) -> None:
        up = self.server.upstream
        up.count_request()
        if up.delay:
            up.sleep(up.delay)
        status = 500 if up.failing else 200
        body = json.dumps({"service": up.service, "version": up.version, "instance": up.name,
                           "path": self.path, "status": status}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-instance", up.name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (http.server's signature)
        log.debug("%s: " + format, self.server.upstream.name, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: "Upstream"


class Upstream:
    """One service instance on ``127.0.0.1:<ephemeral port>``."""

    def __init__(self, service: str, version: str, name: str, delay: float = 0.0) -> None:
        self.service = service
        self.version = version
        self.name = name
        self.delay = delay
        self.failing = False
        self.requests = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        return "127.0.0.1"

    @property
    def key(self) -> str:
        """``ip:port``, as endpoints are named by the balancers."""
        return f"127.0.0.1:{self.port}"

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server stops."""
        self._stopping.wait(seconds)

    def start(self) -> "Upstream":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"demo-upstream-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __repr__(self) -> str:
        return f"Upstream({self.name} {self.key}{' slow' if self.delay else ''}{' failing' if self.failing else ''})"


class UpstreamGroup:
    """Every upstream of the demo, by instance name; started and stopped together."""

    def __init__(self) -> None:
        self._by_name: Dict[str, Upstream] = {}

    def add(self, service: str, version: str, name: str, delay: float = 0.0) -> Upstream:
        up = Upstream(service, version, name, delay).start()
        self._by_name[name] = up
        return up

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    def of(self, service: str, version: Optional[str] = None) -> List[Upstream]:
        return [u for u in self._by_name.values()
                if u.service == service and (version is None or u.version == version)]

    def by_key(self) -> Dict[str, Upstream]:
        return {u.key: u for u in self._by_name.values()}

    def __iter__(self) -> Iterator[Upstream]:
        return iter(list(self._by_name.values()))

    def stop(self) -> None:
        for up in self._by_name.values():
            up.stop()
        self._by_name.clear()
