"""WSGI server middleware: the mesh's inbound policy (gRFC A36 listener, A41/Envoy RBAC) and the
caller's verified identity for any WSGI app (Flask, Django, plain WSGI)::

    from meshcore.integrations.wsgi import MeshWsgiMiddleware
    from meshcore.tls.server import ServerTls, make_wsgi_server

    listener = mesh.serve(8443)
    app.wsgi_app = MeshWsgiMiddleware(app.wsgi_app, mesh, listener=listener)       # Flask
    application = MeshWsgiMiddleware(get_wsgi_application(), mesh, listener=8443)  # Django
    make_wsgi_server(app, ServerTls(mesh.tls.workload_source()), port=8443).serve_forever()

    # gunicorn: gunicorn_settings(tls) in the config file; the identity comes from gunicorn.socket

    # inside the app
    environ["meshcore.principal"]   # "spiffe://cluster.local/ns/default/sa/client", None for plaintext
    environ["meshcore.peer"]        # meshcore.PeerCertificate or None
    environ["meshcore.policy"]      # the RBAC policy that allowed the request, or None
    environ["meshcore.chain"]       # the filter chain's name (None without xDS)

The same decisions as :mod:`meshcore.integrations.asgi` (read its docstring: refusals 403
``RBAC: access denied`` / 503 / 404, per request policy; WSGI forbids hop-by-hop headers, so a
503 carries no ``Connection: close`` here), with the connection read from the WSGI environ:

* TLS only when the server says so itself -- ``environ["meshcore.tls"]``
  (:func:`~meshcore.tls.server.make_wsgi_server`) or gunicorn's TLS socket in
  ``environ["gunicorn.socket"]`` -- never from ``wsgi.url_scheme`` (gunicorn sets it from
  ``X-Forwarded-Proto`` for trusted proxies); the client certificate via
  :func:`~meshcore.tls.server.peer_from_wsgi_environ`; the SNI from the TLS extension or socket.
* ``REMOTE_ADDR`` / ``REMOTE_PORT`` as the source; the destination from gunicorn's socket
  (``getsockname()``), else ``SERVER_NAME`` when it is an IP literal (wsgiref puts a host name
  there: then ``destination_ip`` is unknown and no ``destination_ip`` rule matches) and
  ``SERVER_PORT``.
* The path: ``RAW_URI`` (gunicorn) or ``REQUEST_URI`` (uWSGI, mod_wsgi) as received, else
  ``SCRIPT_NAME + PATH_INFO`` re-quoted plus ``QUERY_STRING`` (WSGI servers decode the path:
  ``%2F`` and ``/`` then look the same, and RBAC sees the decoded form). The headers from the
  ``HTTP_*`` keys (``_`` read as ``-``), ``CONTENT_TYPE``, ``CONTENT_LENGTH``.

A normalized path (Envoy shape's ``normalize_path``) replaces ``PATH_INFO`` (and ``RAW_URI`` /
``REQUEST_URI``) for the app. Stats and telemetry as the ASGI middleware's; a response's status
is counted when the app calls ``start_response`` (or when its iterable is closed, for apps that
call it late).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import quote, unquote

from ..tls.server import peer_from_wsgi_environ
from ._inbound import (
    ALLOWED, GatedMiddleware, Verdict, answer_exchange, destination_sinks, emit, ip_or_none, now, request_facts,
)

__all__ = ["MeshWsgiMiddleware"]

log = logging.getLogger(__name__)

_REASONS = {403: "403 Forbidden", 404: "404 Not Found", 503: "503 Service Unavailable"}
_ALPN = {("HTTP/1.1", True): ("istio-http/1.1", "istio", "http/1.1"),
         ("HTTP/1.0", True): ("istio-http/1.0", "istio", "http/1.0"),
         ("HTTP/2", True): ("istio-h2", "istio", "h2"), ("HTTP/2.0", True): ("istio-h2", "istio", "h2"),
         ("HTTP/1.1", False): ("http/1.1",), ("HTTP/1.0", False): ("http/1.0",),
         ("HTTP/2", False): ("h2c",), ("HTTP/2.0", False): ("h2c",)}
_SPECIAL = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}
_names: Dict[str, str] = {}
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def _header_name(key: str) -> str:
    name = _names.get(key)
    if name is None:
        name = key[5:].lower().replace("_", "-")
        if len(_names) < 4096:
            _names[key] = name
    return name


def _headers(environ: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    out: List[Tuple[str, str]] = []
    authority = None
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = _header_name(key)
            if name == "host":
                authority = value
            out.append((name, value))
        elif key in _SPECIAL and value:
            out.append((_SPECIAL[key], value))
    return out, authority


def _path(environ: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """The request target as received (with the query), and the environ key it came from."""
    for key in ("RAW_URI", "REQUEST_URI"):
        raw = environ.get(key)
        if raw:
            if raw[0] == "/":
                return raw, key
            # absolute-form (``GET http://host/p``: gunicorn keeps it in RAW_URI while PATH_INFO
            # is /p): Envoy's HTTP/1 codec routes and authorizes the URL's path, so must RBAC
            _, sep, rest = raw.partition("://")
            if sep:
                cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
                tail = rest[cut:]
                return ("/" + tail if not tail.startswith("/") else tail), key
            break  # anything else: not a target RBAC can read; use PATH_INFO
    p = quote((environ.get("SCRIPT_NAME") or "") + (environ.get("PATH_INFO") or "/"), safe=_PATH_SAFE,
              encoding="latin-1")
    qs = environ.get("QUERY_STRING")
    return (p + "?" + qs if qs else p), None


def _tls(environ: Dict[str, Any]) -> Tuple[bool, Any, Optional[str], Optional[Tuple[str, int]]]:
    """(TLS, peer, SNI, the local address) of the request's connection, as the server reports it."""
    sock = environ.get("gunicorn.socket")
    local = None
    if sock is not None:
        try:
            name = sock.getsockname()
            local = (name[0], name[1]) if isinstance(name, tuple) else None
        except OSError:
            pass
    info = environ.get("meshcore.tls")
    if info is not None:
        return True, peer_from_wsgi_environ(environ), info.get("meshcore.server_name"), local
    if isinstance(sock, ssl.SSLSocket):
        return True, peer_from_wsgi_environ(environ), getattr(sock, "_mesh_server_name", None), local
    return False, None, None, local


_EXCHANGE_NAMES = frozenset(["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"])


class MeshWsgiMiddleware(GatedMiddleware):
    """WSGI middleware applying the mesh's inbound policy (see the module docstring); arguments
    as :class:`~meshcore.integrations.asgi.MeshAsgiMiddleware`'s."""

    _kind = "a WSGI"

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        tls, peer, sni, local = _tls(environ)
        headers, authority = _headers(environ)
        path, path_key = _path(environ)
        method = environ.get("REQUEST_METHOD") or "GET"
        protocol = environ.get("SERVER_PROTOCOL") or "HTTP/1.1"
        try:
            sport = int(environ.get("REMOTE_PORT") or 0)
        except ValueError:
            sport = 0
        if local is not None:
            dst_ip, dport = ip_or_none(local[0]), local[1]
        else:
            dst_ip = ip_or_none(environ.get("SERVER_NAME"))
            try:
                dport = int(environ.get("SERVER_PORT") or 0) or None
            except ValueError:
                dport = None
        sinks = destination_sinks(self.mesh) if self.mesh is not None else ()
        start = now() if sinks else 0.0
        verdict = self.gate.check(ip_or_none(environ.get("REMOTE_ADDR")), sport, dst_ip, dport, tls, peer, sni,
                                  _ALPN.get((protocol, tls)) or _ALPN[("HTTP/1.1", tls)], method, path, headers,
                                  authority)
        http2 = protocol.startswith("HTTP/2")
        if verdict.outcome is not ALLOWED:
            status, body = verdict.status, verdict.body
            if verdict.prefix is not None:
                self.gate.stats.response(verdict.prefix, status, http2)
            if sinks:
                request_id, peer, _ = request_facts(headers)
                emit(sinks, verdict, method, path, authority, _protocol(headers), status, start, 0, len(body),
                     request_id=request_id, peer_metadata=peer)
            reply = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            start_response(_REASONS.get(status, f"{status} Refused"), reply)
            return [body]
        environ["meshcore.principal"] = verdict.principal
        environ["meshcore.peer"] = verdict.peer
        environ["meshcore.policy"] = verdict.policy
        environ["meshcore.chain"] = verdict.chain_name
        if verdict.path is not path:
            _set_path(environ, verdict.path, path_key)
        names = verdict.prefix
        if names is None and not sinks:
            return self.app(environ, start_response)
        return self._counted(environ, start_response, verdict, names, http2, sinks, method, path, authority, headers,
                             start)

    def _counted(self, environ: Dict[str, Any], start_response: Callable[..., Any], verdict: Verdict, names: Any,
                 http2: bool, sinks: Tuple[Any, ...], method: str, path: str, authority: Optional[str],
                 headers: List[Tuple[str, str]], start: float) -> Iterable[bytes]:
        state = [0]
        stats = self.gate.stats
        request_id, peer, asked = request_facts(headers) if sinks else (None, None, False)
        exchange = answer_exchange(self.mesh, asked)
        if asked:  # Istio's exchange pair is the sidecars' business: the app does not see it
            environ.pop("HTTP_X_ENVOY_PEER_METADATA", None)
            environ.pop("HTTP_X_ENVOY_PEER_METADATA_ID", None)

        def counting_start_response(status: str, response_headers: Any, exc_info: Any = None) -> Any:
            try:
                state[0] = int(status[:3])
            except ValueError:
                state[0] = 0
            if exchange is not None:  # this workload's pair for the caller's sidecar
                response_headers = [(k, v) for k, v in response_headers if k.lower() not in _EXCHANGE_NAMES]
                response_headers += list(exchange.headers)
            return start_response(status, response_headers, exc_info) if exc_info is not None \
                else start_response(status, response_headers)

        try:
            result = self.app(environ, counting_start_response)
        except BaseException:
            if names is not None:
                stats.response(names, 500, http2)
            raise
        if not sinks:
            if state[0]:
                stats.response(names, state[0], http2)
                return result
            return _Closing(result, lambda sent: stats.response(names, state[0], http2))

        def done(sent: int) -> None:
            if names is not None:
                stats.response(names, state[0], http2)
            try:
                received = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                received = 0
            emit(sinks, verdict, method, path, authority, _protocol(headers), state[0], start, received, sent,
                 request_id=request_id, peer_metadata=peer)

        return _Closing(result, done, count=True)

    def __repr__(self) -> str:
        src = (f"listener={self.gate.listener!r}" if self.gate.listener is not None
               else f"rbac={self.gate.rbac!r}")
        return f"MeshWsgiMiddleware({self.app!r}, {src})"


class _Closing:
    """A WSGI response iterable calling ``done(bytes sent)`` once, when the server closes it."""

    def __init__(self, result: Iterable[bytes], done: Callable[[int], None], count: bool = False) -> None:
        self._result = result
        self._done: Optional[Callable[[int], None]] = done
        self._count = count
        self._sent = 0

    def __iter__(self) -> Iterator[bytes]:
        if not self._count:
            yield from self._result
            return
        for chunk in self._result:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done(self._sent)


def _protocol(headers: List[Tuple[str, str]]) -> str:
    for k, v in headers:
        if k == "content-type":
            return "grpc" if v.startswith("application/grpc") else "http"
    return "http"


def _set_path(environ: Dict[str, Any], path: str, key: Optional[str]) -> None:
    cut = path.find("?")
    p = path if cut < 0 else path[:cut]
    script = environ.get("SCRIPT_NAME") or ""
    decoded = unquote(p, encoding="latin-1")
    environ["PATH_INFO"] = decoded[len(script):] if script and decoded.startswith(script) else decoded
    for k in ("RAW_URI", "REQUEST_URI"):
        if k in environ:
            environ[k] = path
