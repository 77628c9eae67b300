"""A small HTTP/JSON API to inspect and change the control plane's resources.

* ``GET /v1/resources`` -> ``{type_url: {name: version}}`` (version = the delta content hash)
* ``GET /v1/resources/<type>/<name>`` -> the resource as proto JSON (with ``@type``)
* ``PUT /v1/resources`` -> upsert (one resource with ``@type``, a list, or any resource-file shape;
  the body is JSON or YAML, told apart by content, parsed as strictly as a resource file)
* ``PUT /v1/snapshot`` -> replace everything (same body shapes)
* ``DELETE /v1/resources/<type>/<name>``
* ``GET /v1/status`` -> ``{"version", "connected_streams"}``

``<type>`` is ``LDS``/``RDS``/``CDS``/``EDS``, a message name (``envoy.config.cluster.v3.Cluster``)
or a full type URL (its ``/`` may stay unescaped). Path segments are URL-decoded, so names with
``|`` or ``/`` work when escaped. Bad input answers 400 with ``{"error": text, "resource": ...,
"field": ...}`` (the field path names the resource's index in the body and the field in it, and the
text names the resource: ``request body: field resources[0].lb_policy: Cluster 'c': unknown enum
value ...``); unknown paths and resources answer 404. Writes answer ``{"version": "<global version>"}``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple
from urllib.parse import unquote, urlsplit

from google.protobuf import json_format
from google.protobuf.message import Message

from ..errors import ConfigError
from ..xds.model import SHORT_NAMES, TYPE_URLS
from ..xds.resource_file import decode_document, parse_resources

__all__ = ["HttpApi", "resolve_type"]

logger = logging.getLogger(__name__)

_MAX_BODY = 64 << 20
_BY_SHORT = {short: url for url, short in SHORT_NAMES.items()}
_BY_MESSAGE = {url.rsplit("/", 1)[1]: url for url in TYPE_URLS}


class _Plane(Protocol):  # what the API needs from ControlPlane
    @property
    def version(self) -> str: ...

    @property
    def connected_streams(self) -> int: ...

    def set_resources(self, resources: Any) -> str: ...

    def update(self, upserts: Iterable[Any] = (), removes: Iterable[Tuple[str, str]] = ()) -> str: ...

    def resource_versions(self) -> Dict[str, Dict[str, str]]: ...

    def resources(self, type_url: str) -> Dict[str, Message]: ...


def resolve_type(text: str) -> Optional[str]:
    """``LDS``/``lds``, ``envoy.config.listener.v3.Listener`` or the full type URL -> type URL."""
    if text in TYPE_URLS:
        return text
    return _BY_SHORT.get(text.upper()) or _BY_MESSAGE.get(text)


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server_version = "meshcore-control-plane"
    plane: _Plane  # set on the subclass made by HttpApi

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # -- plumbing -----------------------------------------------------------------------------

    def _segments(self) -> List[str]:
        raw = [s for s in urlsplit(self.path).path.split("/") if s]
        segments = [unquote(s) for s in raw]
        # an unescaped full type URL spans two segments: type.googleapis.com / envoy...Listener
        if len(segments) >= 4 and segments[:2] == ["v1", "resources"] and segments[2] == "type.googleapis.com":
            segments[2:4] = [segments[2] + "/" + segments[3]]
        return segments

    def _send(self, status: int, body: Any) -> None:
        data = (json.dumps(body, indent=1, sort_keys=False) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _HttpError(400, "bad Content-Length") from None
        if length <= 0:
            raise _HttpError(400, "empty body")
        if length > _MAX_BODY:
            raise _HttpError(413, "body too large")
        raw = self.rfile.read(length)
        return decode_document(raw, "request body")

    def _dispatch(self, method: str) -> None:
        try:
            status, body = self._route(method, self._segments())
        except _HttpError as exc:
            status, body = exc.status, {"error": str(exc)}
        except ConfigError as exc:
            status, body = 400, {"error": str(exc), "resource": exc.resource, "field": exc.field}
        except Exception as exc:  # never kill the server thread
            logger.exception("HTTP API %s %s failed", method, self.path)
            status, body = 500, {"error": repr(exc)}
        self._send(status, body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- routes -------------------------------------------------------------------------------

    def _route(self, method: str, seg: List[str]) -> Tuple[int, Any]:
        plane = self.plane
        if seg == ["v1", "status"] and method == "GET":
            return 200, {"version": plane.version, "connected_streams": plane.connected_streams}
        if seg == ["v1", "resources"]:
            if method == "GET":
                return 200, plane.resource_versions()
            if method == "PUT":
                parsed = parse_resources(self._body(), "request body")
                return 200, {"version": plane.update(upserts=parsed)}
        elif seg == ["v1", "snapshot"] and method == "PUT":
            parsed = parse_resources(self._body(), "request body")
            return 200, {"version": plane.set_resources(parsed)}
        elif len(seg) == 4 and seg[:2] == ["v1", "resources"] and method in ("GET", "DELETE"):
            type_url = resolve_type(seg[2])
            if type_url is None:
                raise _HttpError(404, f"unknown resource type {seg[2]!r}")
            message = plane.resources(type_url).get(seg[3])
            if message is None:
                raise _HttpError(404, f"no {SHORT_NAMES[type_url]} resource named {seg[3]!r}")
            if method == "GET":
                return 200, {"@type": type_url, **json_format.MessageToDict(message)}
            return 200, {"version": plane.update(removes=[(type_url, seg[3])])}
        raise _HttpError(404, f"no route for {method} {urlsplit(self.path).path}")


class HttpApi:
    """The HTTP API on a daemon thread (``start`` / ``stop``)."""

    def __init__(self, plane: _Plane, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._bind = (host.strip("[]") or "127.0.0.1", int(port))
        self._plane = plane
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> Optional[int]:
        return self._server.server_address[1] if self._server is not None else None

    def start(self) -> "HttpApi":
        handler = type("Handler", (_Handler,), {"plane": self._plane})
        server_cls = ThreadingHTTPServer
        if ":" in self._bind[0]:
            server_cls = type("ThreadingHTTPServerV6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        server = server_cls(self._bind, handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="meshcore-cp-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
