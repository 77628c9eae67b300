"""ASGI server middleware: the mesh's inbound policy (gRFC A36 listener, A41/Envoy RBAC) and the
caller's verified identity for any ASGI app (plain ASGI, Starlette, FastAPI, ...)::

    from meshcore.integrations.asgi import MeshAsgiMiddleware
    from meshcore.tls.server import ServerTls, serve_uvicorn

    mesh = meshcore.Mesh()                       # GRPC_XDS_BOOTSTRAP with server_listener_resource_name_template
    listener = mesh.serve(8443)                  # the server Listener istiod sends for this port
    app = MeshAsgiMiddleware(app, mesh, listener=listener)     # or listener=8443
    serve_uvicorn(app, ServerTls(mesh.tls.workload_source()), port=8443, proxy_headers=False)

    # Starlette / FastAPI
    app.add_middleware(MeshAsgiMiddleware, mesh=mesh, listener=listener)

    # inside the app
    scope["meshcore"]["principal"]   # "spiffe://cluster.local/ns/default/sa/client", None for plaintext
    scope["meshcore"]["peer"]        # meshcore.PeerCertificate (URI/DNS SANs, subject) or None
    scope["meshcore"]["policy"]      # the RBAC policy that allowed the request, or None

Per request (``http`` and ``websocket`` scopes; ``lifespan`` and others pass through untouched),
the decision of :class:`~meshcore.integrations._inbound.InboundGate` (its module docstring has
the whole order):

* **The connection** from the scope: ``client`` / ``server`` (IP literals; anything else counts
  as not an IP connection), TLS only when the server put the ASGI TLS extension in
  ``scope["extensions"]["tls"]`` (meshcore's :func:`~meshcore.tls.server.serve_uvicorn` /
  :func:`~meshcore.tls.server.serve_hypercorn` do; the ``scheme`` is not trusted, proxies rewrite
  it), the verified client certificate from it (:func:`~meshcore.tls.server.peer_from_asgi_scope`),
  the SNI (``meshcore.server_name``). Python's ``ssl`` does not show the ALPN list the client
  *offered*, which is what Istio's sidecar-shaped chains match on, so the chain is selected as
  for an Istio client of the request's protocol (``istio-http/1.1, istio, http/1.1`` or
  ``istio-h2, istio, h2``; plaintext: the HTTP inspector's ``http/1.1`` / ``h2c``): the HTTP
  chain with its L7 policy, never the TCP chain that would skip it. uvicorn's ``proxy_headers``
  (on by default) replaces ``client`` with an ``X-Forwarded-For`` address when the peer is a
  trusted proxy: turn it off (``proxy_headers=False``) so RBAC's source IP is the real peer.
* **The request**: ``method``, the raw path (``raw_path``, else ``path`` re-quoted) with the
  query, the headers, ``:authority`` from ``Host``.
* **Refusals** (the app is not called): RBAC denied -> ``403``, ``content-type: text/plain``,
  body ``RBAC: access denied`` (Envoy's local reply); the listener not serving (A36: no server
  configuration yet, deleted, rejected) -> ``503`` with ``connection: close`` on HTTP/1.x (the
  closest an ASGI app comes to A36's closing of connections; Istio clients retry 503s by
  default); a connection the current chain refuses (plaintext or no client certificate on an
  mTLS chain, no matching chain) -> ``503`` + ``connection: close``; no route -> ``404``; a route
  the server does not serve -> ``503``. A websocket handshake is refused by closing before
  ``websocket.accept`` (the server answers HTTP 403).
* **Allowed**: the app gets a copy of the scope with ``scope["meshcore"] = {"principal",
  "peer", "policy", "chain"}`` (``chain``: the filter chain's name, None without xDS); when the
  chain normalizes paths (Envoy shape, Istio's ``normalize_path``), ``path`` / ``raw_path`` are
  the normalized path RBAC saw.

A policy pushed by the control plane (a new RBAC filter configuration in the listener) applies
to the next request, also on connections already open (per request, not per connection: see
:mod:`meshcore.integrations._inbound`). Without xDS: ``rbac=RbacEngine.from_xds(...)``, replaced
at any time with ``middleware.rbac = new_engine``.

Stats (:attr:`MeshAsgiMiddleware.stats`, an :class:`~meshcore.integrations._inbound.InboundStats`):
Envoy's names, ``http.<stat_prefix>.rbac.allowed`` / ``denied`` / ``shadow_*``,
``http.<stat_prefix>.downstream_rq_total`` / ``_2xx`` ... ; ``stats.prometheus_collector()``.
With a ``mesh`` whose ``telemetry`` has sinks, each request ends with a
:class:`~meshcore.telemetry.record.RequestRecord` (``reporter="destination"``,
``connection_security_policy`` ``mutual_tls`` / ``none``, ``principal``); Istio's standard-metrics
sink is left out (it reports the source side only).

Importing this module imports no server or framework library.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple
from urllib.parse import quote, unquote

from ..tls.server import peer_from_asgi_scope
from ._inbound import (
    ALLOWED, DENIED, GatedMiddleware, Verdict, answer_exchange, destination_sinks, emit, ip_or_none, now, request_facts,
)

__all__ = ["MeshAsgiMiddleware", "caller"]

log = logging.getLogger(__name__)

# what an Istio client of this protocol would offer (TLS) / what the HTTP inspector reports (plaintext)
_ALPN_TLS_H1 = ("istio-http/1.1", "istio", "http/1.1")
_ALPN_TLS_H10 = ("istio-http/1.0", "istio", "http/1.0")
_ALPN_TLS_H2 = ("istio-h2", "istio", "h2")
_ALPN_H1 = ("http/1.1",)
_ALPN_H10 = ("http/1.0",)
_ALPN_H2C = ("h2c",)


def _alpn(tls: bool, version: Any) -> Tuple[str, ...]:
    if version == "2" or version == "3":
        return _ALPN_TLS_H2 if tls else _ALPN_H2C
    if version == "1.0":
        return _ALPN_TLS_H10 if tls else _ALPN_H10
    return _ALPN_TLS_H1 if tls else _ALPN_H1


def caller(scope: Any) -> Optional[Dict[str, Any]]:
    """``scope["meshcore"]`` of an ASGI scope or a framework request object carrying one
    (Starlette/FastAPI ``Request``: ``request.scope``); None outside the middleware."""
    s = getattr(scope, "scope", scope)
    return s.get("meshcore") if isinstance(s, dict) else None


class MeshAsgiMiddleware(GatedMiddleware):
    """ASGI middleware applying the mesh's inbound policy (see the module docstring).

    ``app``: the ASGI app. ``mesh``: a :class:`meshcore.Mesh` (telemetry; needed for
    ``listener=<port>``). ``listener``: an :class:`~meshcore.inbound.InboundListener`
    (``mesh.serve(port)``) or a port (then ``mesh.serve(port)`` is called). ``rbac``: an
    :class:`~meshcore.rbac.RbacEngine` for use without xDS (not with ``listener``). Neither: no
    authorization, only the caller's identity and stats (a ``mesh`` without either is an error:
    it would silently serve without the mesh's policy). ``stat_prefix``: the HTTP stat prefix
    (default: the chain's HCM ``stat_prefix``, else ``inbound_<address>_<port>``); ``stats``: an
    :class:`InboundStats` to share (default: the listener's).
    """

    _kind = "an ASGI"

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        gate = self.gate
        ext = scope.get("extensions")
        tls_ext = ext.get("tls") if ext else None
        if tls_ext is not None:
            tls, peer, sni = True, peer_from_asgi_scope(scope), tls_ext.get("meshcore.server_name")
        else:
            tls, peer, sni = False, None, None
        version = scope.get("http_version")
        if gate.listener is None and gate.rbac is None and self.mesh is None:  # identity and stats only
            verdict = Verdict(ALLOWED, peer, prefix=gate.default_names, mtls=peer is not None)
            scope = dict(scope)
            scope["meshcore"] = {"principal": verdict.principal, "peer": peer, "policy": None, "chain": None}
            await self._counted(scope, receive, send, verdict.prefix, version)  # type: ignore[arg-type]
            return
        client = scope.get("client")
        server = scope.get("server")
        headers = scope["headers"]
        authority = None
        for k, v in headers:
            if k == b"host" or k == b":authority":
                authority = v.decode("latin-1")
                break
        raw = scope.get("raw_path")
        target = raw.decode("latin-1") if raw else quote(scope.get("path") or "/", safe="/:@!$&'()*+,;=-._~%")
        qs = scope.get("query_string")
        path = target + "?" + qs.decode("latin-1") if qs else target
        method = scope.get("method") or "GET"
        sinks = destination_sinks(self.mesh) if self.mesh is not None else ()
        start = now() if sinks else 0.0
        verdict = gate.check(
            ip_or_none(client[0]) if client else None, (client[1] or 0) if client else 0,
            ip_or_none(server[0]) if server else None, server[1] if server else None,
            tls, peer, sni, _alpn(tls, version), method, path, headers, authority)
        if verdict.outcome is not ALLOWED:
            status = await self._refuse(scope, send, verdict, version)
            if sinks:
                request_id, peer, _ = request_facts(headers)
                emit(sinks, verdict, method, path, authority, _protocol(headers), status, start, 0, len(verdict.body),
                     request_id=request_id, peer_metadata=peer)
            return
        scope = dict(scope)
        scope["meshcore"] = {"principal": verdict.principal, "peer": verdict.peer, "policy": verdict.policy,
                             "chain": verdict.chain_name}
        if verdict.path is not path:  # normalized by the chain: the app sees what RBAC saw
            _set_path(scope, verdict.path)
        if sinks:
            await self._call_recorded(scope, receive, send, verdict, method, path, authority, headers, sinks, start)
        elif verdict.prefix is None:
            await self.app(scope, receive, send)
        else:
            await self._counted(scope, receive, send, verdict.prefix, version)

    async def _counted(self, scope: Dict[str, Any], receive: Any, send: Any, names: Any, version: Any) -> None:
        """The app, with its response status counted under ``names``."""
        state = [0]

        async def counting_send(message: Dict[str, Any]) -> None:
            if not state[0]:
                t = message["type"]
                if t == "http.response.start":
                    state[0] = message["status"]
                elif t == "websocket.accept":
                    state[0] = 101
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.gate.stats.response(names, state[0], version == "2")

    async def _call_recorded(self, scope: Dict[str, Any], receive: Any, send: Any, verdict: Verdict, method: str,
                             path: str, authority: Optional[str], headers: Any, sinks: Tuple[Any, ...],
                             start: float) -> None:
        state = [0, 0, 0]  # status, request bytes, response bytes
        request_id, peer, asked = request_facts(headers)
        exchange = answer_exchange(self.mesh, asked)
        if asked:  # Istio's exchange pair is the sidecars' business: the app does not see it
            scope["headers"] = [(k, v) for k, v in headers if k not in _EXCHANGE_NAMES]

        async def counting_receive() -> Dict[str, Any]:
            message = await receive()
            if message.get("type") == "http.request":
                state[1] += len(message.get("body") or b"")
            return message

        async def counting_send(message: Dict[str, Any]) -> None:
            t = message["type"]
            if t == "http.response.start":
                state[0] = message["status"]
                if exchange is not None:  # this workload's pair for the caller's sidecar
                    message = dict(message)
                    message["headers"] = [(k, v) for k, v in message.get("headers") or ()
                                          if k.lower() not in _EXCHANGE_NAMES] + list(exchange.headers_bytes)
            elif t == "http.response.body":
                state[2] += len(message.get("body") or b"")
            elif t == "websocket.accept":
                state[0] = 101
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            if verdict.prefix is not None:
                self.gate.stats.response(verdict.prefix, state[0], scope.get("http_version") == "2")
            emit(sinks, verdict, method, path, authority, _protocol(headers), state[0], start, state[1], state[2],
                 request_id=request_id, peer_metadata=peer)

    async def _refuse(self, scope: Dict[str, Any], send: Any, verdict: Verdict, version: Any) -> int:
        if verdict.outcome is not DENIED:
            log.debug("inbound: %s %s refused: %s (%s)", scope.get("method"), scope.get("path"), verdict.outcome,
                      verdict.reason)
        names = verdict.prefix
        if scope["type"] == "websocket":
            # closing before accept: the server answers the handshake with HTTP 403
            await send({"type": "websocket.close", "code": 1008 if verdict.outcome is DENIED else 1013})
            if names is not None:
                self.gate.stats.response(names, 403, version == "2")
            return 403
        status, body = verdict.status, verdict.body
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode("ascii"))]
        if status == 503 and version in ("1.1", "1.0"):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if names is not None:
            self.gate.stats.response(names, status, version == "2")
        return status

    def __repr__(self) -> str:
        src = (f"listener={self.gate.listener!r}" if self.gate.listener is not None
               else f"rbac={self.gate.rbac!r}")
        return f"MeshAsgiMiddleware({self.app!r}, {src})"


_EXCHANGE_NAMES = frozenset([b"x-envoy-peer-metadata", b"x-envoy-peer-metadata-id"])


def _protocol(headers: Any) -> str:
    for k, v in headers:
        if k == b"content-type":
            return "grpc" if v.startswith(b"application/grpc") else "http"
    return "http"


def _set_path(scope: Dict[str, Any], path: str) -> None:
    cut = path.find("?")
    p = path if cut < 0 else path[:cut]
    scope["raw_path"] = p.encode("latin-1", "replace")
    scope["path"] = unquote(p)
