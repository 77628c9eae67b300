"""A loopback upstream for the client-semantics tests of the requests and aiohttp integrations:
it echoes every request header (as a list of pairs, repeated names kept), sets cookies and
redirects on request.

* ``/set-cookie/<name>/<value>``: answers with ``Set-Cookie: <name>=<value>; Path=/``;
* ``/redirect?to=<location>``: a 302 to ``<location>``;
* ``/fail-once/<key>``: 503 the first time ``<key>`` is seen, then 200 (retry tests);
* anything else: 200 with ``{"port", "path", "method", "headers": [[name, value], ...], "body"}``.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Set, Tuple
from urllib.parse import parse_qs, urlsplit


class EchoUpstream:
    def __init__(self) -> None:
        self.requests: List[Tuple[str, str, List[Tuple[str, str]], bytes]] = []
        self.connections = 0
        failed: Set[str] = set()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.connections += 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                pairs = [(k, v) for k, v in self.headers.items()]
                upstream.requests.append((self.command, self.path, pairs, body))
                parts = urlsplit(self.path)
                status, extra = 200, []
                if parts.path.startswith("/set-cookie/"):
                    _, _, name, value = parts.path.split("/", 3)
                    extra.append(("Set-Cookie", f"{name}={value}; Path=/"))
                elif parts.path == "/redirect":
                    status = 302
                    extra.append(("Location", parse_qs(parts.query)["to"][0]))
                elif parts.path.startswith("/fail-once/"):
                    if parts.path not in failed:
                        failed.add(parts.path)
                        status = 503
                data = json.dumps({"port": upstream.port, "path": self.path, "method": self.command,
                                   "headers": pairs, "body": body.decode("latin-1")}).encode()
                self.send_response(status)
                for k, v in extra:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def header_values(body: Any, name: str) -> List[str]:
    """The values of header ``name`` (any case) in an echoed request, in order."""
    return [v for k, v in body["headers"] if k.lower() == name.lower()]
