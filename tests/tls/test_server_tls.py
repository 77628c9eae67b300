"""Server-side mesh TLS (``meshcore.tls.server``) with real servers and real clients: uvicorn,
hypercorn (HTTP/2), gunicorn (a subprocess), the stdlib WSGI/socketserver runner, plain asyncio and
grpcio, against Python TLS clients and a real Envoy configured as an Istio sidecar's *outbound*
(``security.md`` §6.4: ``transport_socket_matches`` on ``tlsMode: istio``, SNI
``outbound_.<port>_._.<fqdn>``, Istio ALPN, the server's SPIFFE ID checked).

What is checked: the app sees the client's SPIFFE ID; STRICT refuses a client without a
certificate, from the evil CA, expired, or from another trust domain (``trust_domains``); PERMISSIVE
serves TLS and plaintext on one port; rotation gives new connections the new server certificate and
new roots without a restart; ALPN selects only ``h2``/``http/1.1`` for Istio's offers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from cryptography import x509

import meshcore
from meshcore.tls import (CertificatesUnavailable, FileCertificateSource, PeerRejected, ServerTls,
                          peer_from_asgi_scope, peer_from_grpc_context, peer_from_wsgi_environ)
from meshcore.tls.server import (TlsServerMixin, gunicorn_settings, hypercorn_config, make_wsgi_server,
                                 serve_hypercorn, tls_extension, uvicorn_config)

from envoy_process import EnvoyProcess, die_with_parent, find_envoy, kill, socket_address

from .pki import CA, Pki, spiffe_id, write_istio_dir
from .sidecar import ALPN_H2, ALPN_HTTP11, ALPN_TCP, tls_attempt

import uvicorn
try:
    import wsproto  # noqa: F401
    HAVE_WSPROTO = True
except ImportError:  # pragma: no cover
    HAVE_WSPROTO = False
#: PERMISSIVE with asyncio peeks with a reader on a duplicated descriptor: Unix selector loops
UNIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="PERMISSIVE on asyncio needs a selector loop (Unix)")

LOOPBACK = "127.0.0.1"
TD = "cluster.local"
CLIENT_ID = spiffe_id("client")
SERVER_ID = spiffe_id("server")
SIDECAR_ID = spiffe_id("sidecar")
FQDN = "server.default.svc.cluster.local"
SNI = f"outbound_.8443_._.{FQDN}"


# -- clients ---------------------------------------------------------------------------------------


class Got:
    """One HTTP/1.1 exchange over a fresh TLS connection."""

    def __init__(self, status: int, body: bytes, alpn: Optional[str], version: Optional[str], server_der: bytes):
        self.status, self.body, self.alpn, self.version = status, body, alpn, version
        self.json: Any = json.loads(body) if body.startswith(b"{") else None
        self.server_cert = x509.load_der_x509_certificate(server_der)

    @property
    def server_serial(self) -> int:
        return self.server_cert.serial_number

    def __repr__(self) -> str:
        return f"<Got {self.status} alpn={self.alpn} {self.body[:300]!r}>"


def get(port: int, ctx: ssl.SSLContext, path: str = "/", *, sni: Optional[str] = None) -> Got:
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname=sni)
    alpn, version, der = tls.selected_alpn_protocol(), tls.version(), tls.getpeercert(binary_form=True)
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    conn.sock = tls
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Got(resp.status, resp.read(), alpn, version, der)
    finally:
        conn.close()


def alpn_of(port: int, ctx: ssl.SSLContext) -> Optional[str]:
    """The protocol the server selects (handshake only)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    with ctx.wrap_socket(raw) as tls:
        return tls.selected_alpn_protocol()


def plain_get(port: int, path: str = "/") -> Tuple[int, Any]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """The server cut the client off (handshake failure, or EOF/alert on the first read: TLS 1.3)."""
    return tls_attempt(port, ctx)[0] != "ok"


def no_cert_client(pki: Pki, **kw: Any) -> ssl.SSLContext:
    from .pki import client_context

    return client_context(None, roots=pki.root_file, **kw)


# -- apps -------------------------------------------------------------------------------------------


def describe(peer: Any, tls: Optional[Dict[str, Any]], scheme: str, **extra: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"scheme": scheme, "peer": list(peer.uri_sans) if peer is not None else None,
                           "subject": peer.subject if peer is not None else None, "tls": None}
    if tls is not None:
        out["tls"] = {"tls_version": tls["tls_version"], "cipher_suite": tls["cipher_suite"],
                      "client_cert_name": tls["client_cert_name"], "client_cert_error": tls["client_cert_error"],
                      "chain": len(tuple(tls["client_cert_chain"])), "server_cert": tls["server_cert"],
                      "sni": tls.get("meshcore.server_name"), "alpn": tls.get("meshcore.alpn")}
    out.update(extra)
    return out


async def asgi_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    tls = (scope.get("extensions") or {}).get("tls")
    info = describe(peer_from_asgi_scope(scope), tls, scope["scheme"], http_version=scope.get("http_version"))
    body = json.dumps(info).encode()
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body.decode()})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    body = json.dumps(describe(peer_from_wsgi_environ(environ), environ.get("meshcore.tls"),
                               environ["wsgi.url_scheme"])).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


# -- servers ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_uvicorn(tls: ServerTls, *, permissive: bool = False) -> Iterator[int]:
    cfg = uvicorn_config(asgi_app, tls, host=LOOPBACK, port=0, permissive=permissive, log_level="warning",
                         lifespan="off", ws="wsproto" if HAVE_WSPROTO else "none", sniff_timeout=2.0,
                         proxy_headers=False)  # Envoy on 127.0.0.1 sends x-forwarded-proto: http
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def run_hypercorn(tls: ServerTls) -> Iterator[int]:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.detach()  # hypercorn owns (and closes) it
    state: Dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        async def serve() -> None:
            state["loop"] = asyncio.get_running_loop()
            state["stop"] = asyncio.Event()
            started.set()
            await serve_hypercorn(asgi_app, tls, bind=[f"fd://{fd}"],
                                  shutdown_trigger=state["stop"].wait, loglevel="WARNING", graceful_timeout=1)
        asyncio.run(serve())

    thread = threading.Thread(target=main, daemon=True, name="hypercorn")
    thread.start()
    started.wait(10)
    try:
        yield port
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


@contextlib.contextmanager
def run_wsgi(tls: ServerTls, *, permissive: bool = False) -> Iterator[int]:
    server = make_wsgi_server(wsgi_app, tls, LOOPBACK, 0, permissive=permissive, handshake_timeout=5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def source_of(paths: Any, refresh: float = 600.0) -> FileCertificateSource:
    return FileCertificateSource(paths.chain, paths.key, paths.roots, refresh_interval=refresh)


@pytest.fixture(scope="module")
def strict_tls(pki: Pki) -> ServerTls:
    return ServerTls(source_of(pki.paths("server")), trust_domains=[TD])


@pytest.fixture(scope="module")
def uvicorn_strict(strict_tls: ServerTls) -> Iterator[int]:
    with run_uvicorn(strict_tls) as port:
        yield port


@pytest.fixture(scope="module")
def uvicorn_permissive(pki: Pki) -> Iterator[Tuple[ServerTls, int]]:
    tls = ServerTls(source_of(pki.paths("server")), trust_domains=[TD])
    with run_uvicorn(tls, permissive=True) as port:
        yield tls, port


# -- the context --------------------------------------------------------------------------------------


def test_context_is_locked_per_mode_and_refuses_istio_alpn(pki: Pki, tmp_path: Any) -> None:
    strict = ServerTls(source_of(pki.paths("server")))
    ctx = strict.context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert (ctx.minimum_version, ctx.maximum_version) == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    assert ServerTls(source_of(pki.paths("server")), require_client_certificate=False).context().verify_mode \
        == ssl.CERT_OPTIONAL
    # what servers do to contexts they are handed changes nothing
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sni_callback = None
    ctx.set_alpn_protocols(["istio-peer-exchange"])
    ctx.load_verify_locations(pki.evil_root_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.sni_callback is not None
    assert len(ctx.get_ca_certs()) == 1
    assert strict.context() is ctx  # one context per generation and ALPN list
    assert strict.context(["http/1.1"]) is not ctx
    for bad in (["istio-peer-exchange", "h2"], ["istio"], ["istio-http/1.1"], ["istio-h2"]):
        with pytest.raises(ValueError, match="may select only"):
            ServerTls(source_of(pki.paths("server")), alpn=bad)
    with pytest.raises(TypeError):
        ServerTls(None)
    with pytest.raises(TypeError):
        ServerTls(source_of(pki.paths("server")), trust_domains="cluster.local")
    roots_only = ServerTls(FileCertificateSource(ca_certificate_file=pki.root_file))
    with pytest.raises(CertificatesUnavailable, match="no certificate chain"):
        roots_only.context()
    missing = ServerTls(FileCertificateSource.from_directory(str(tmp_path / "none")))
    with pytest.raises(CertificatesUnavailable):
        missing.context()
    with pytest.raises(ValueError, match="replace the mesh's TLS"):
        uvicorn_config(asgi_app, strict, ssl_certfile=pki.paths("server").chain)
    with pytest.raises(ValueError, match="replace the mesh's TLS"):
        hypercorn_config(strict, certfile=pki.paths("server").chain)


def handshake(tls: ServerTls, client: ssl.SSLContext, *, sni: Optional[str] = None,
              alpn: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``ServerTls.accept`` on one end of a socket pair, a client on the other."""
    a, b = socket.socketpair()
    out: Dict[str, Any] = {}

    def serve() -> None:
        try:
            conn = tls.accept(a, alpn=alpn, timeout=5)
            assert conn is not None
            out["alpn"] = conn.selected_alpn_protocol()
            out["peer"] = tls.peer(conn)
            out["sni"] = tls.server_name(conn)
            out["ext"] = tls_extension(conn)
            conn.sendall(b"x")
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=sni) as c:
            out["client_alpn"] = c.selected_alpn_protocol()
            out["read"] = c.recv(1)
    except (ssl.SSLError, OSError) as e:
        out["client_error"] = e
    t.join(5)
    return out


@pytest.mark.parametrize("server_alpn, offered, selected", [
    (("h2", "http/1.1"), ALPN_HTTP11, "http/1.1"),  # an Envoy sidecar client, HTTP/1.1
    (("h2", "http/1.1"), ALPN_H2, "h2"),             # ... HTTP/2
    (("h2", "http/1.1"), ("http/1.1", "h2"), "h2"),  # the server's order decides
    (("http/1.1",), ALPN_H2, None),                  # an HTTP/1.1-only server never picks h2
    (("h2",), ALPN_H2, "h2"),                        # a gRPC server
    (("h2", "http/1.1"), ALPN_TCP, None),            # never istio-peer-exchange / istio
    (("h2", "http/1.1"), ("istio-http/1.1",), None),
    (("h2", "http/1.1"), None, None),
])
def test_alpn_selection(pki: Pki, server_alpn: Tuple[str, ...], offered: Optional[Sequence[str]],
                        selected: Optional[str]) -> None:
    tls = ServerTls(source_of(pki.paths("server")), alpn=server_alpn)
    got = handshake(tls, pki.client_context("client", alpn=list(offered) if offered else None))
    assert "error" not in got and got["read"] == b"x", got
    assert got["alpn"] == got["client_alpn"] == selected


def test_peer_sni_and_tls_extension(pki: Pki, strict_tls: ServerTls) -> None:
    got = handshake(strict_tls, pki.client_context("client_via_intermediate"), sni=SNI)
    assert got["peer"].uri_sans == (CLIENT_ID,) and got["peer"].dns_sans == () and got["peer"].subject == ""
    assert got["sni"] == SNI
    ext = got["ext"]
    assert len(ext["client_cert_chain"]) >= 2  # leaf + intermediate (+ root: OpenSSL), as the client sent them
    leaf = x509.load_pem_x509_certificate(ext["client_cert_chain"][0].encode())
    assert leaf.serial_number == pki.client_via_intermediate.cert.serial_number
    assert ext["client_cert_name"] == "" and ext["client_cert_error"] is None
    assert ext["tls_version"] == 0x0304 and ext["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    assert x509.load_pem_x509_certificate(ext["server_cert"].encode()).serial_number == pki.server.cert.serial_number
    no_sni = handshake(strict_tls, pki.client_context("client"))  # the callback runs without SNI too
    assert no_sni["sni"] is None and no_sni["peer"].uri_sans == (CLIENT_ID,)
    tls12 = handshake(strict_tls, pki.client_context("client", max_version=ssl.TLSVersion.TLSv1_2))
    assert tls12["ext"]["tls_version"] == 0x0303 and tls12["ext"]["cipher_suite"] in (0xC02B, 0xC02C, 0xCCA9)
    dns = handshake(ServerTls(source_of(pki.paths("server"))), pki.client_context("server_with_dns"))
    assert dns["peer"].dns_sans == ("localhost",)


def test_optional_client_certificate(pki: Pki) -> None:
    tls = ServerTls(source_of(pki.paths("server")), require_client_certificate=False, trust_domains=[TD])
    anon = handshake(tls, no_cert_client(pki))
    assert anon["read"] == b"x" and anon["peer"] is None and anon["ext"]["client_cert_chain"] == ()
    assert handshake(tls, pki.client_context("client"))["peer"].uri_sans == (CLIENT_ID,)
    assert isinstance(handshake(tls, pki.client_context("evil_client"))["error"], ssl.SSLError)
    assert isinstance(handshake(tls, pki.client_context("other_td_client"))["error"], PeerRejected)
    assert tls.stats() == {"ssl.no_certificate": 1, "ssl.handshake": 2, "ssl.fail_verify_error": 1,
                           "ssl.fail_verify_san": 1}


def test_sans_and_spiffe_bundle_map(pki: Pki, tmp_path: Any) -> None:
    only = ServerTls(source_of(pki.paths("server")), sans=[spiffe_id("other")])
    assert handshake(only, pki.client_context("other_sa"))["peer"].uri_sans == (spiffe_id("other"),)
    assert isinstance(handshake(only, pki.client_context("client"))["error"], PeerRejected)
    from meshcore._route_model import StringMatchSpec
    from meshcore.xds.model import SanMatcherSpec
    typed = ServerTls(source_of(pki.paths("server")), trust_domains=["spiffe://other.domain"],
                      sans=[SanMatcherSpec("URI", StringMatchSpec("suffix", "/sa/other"))])
    assert handshake(typed, pki.client_context("other_sa"))["read"] == b"x"
    assert handshake(typed, pki.client_context("other_td_client"))["read"] == b"x"  # any matcher will do
    assert isinstance(handshake(typed, pki.client_context("client"))["error"], PeerRejected)

    def b64(ca: CA) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding
        return base64.b64encode(ca.cert.public_bytes(Encoding.DER)).decode()

    # A87: other.domain's bundle is the evil root, so other.domain's client signed by the mesh root fails
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"trust_domains": {
        TD: {"keys": [{"use": "x509-svid", "x5c": [b64(pki.root)]}]},
        "other.domain": {"keys": [{"use": "x509-svid", "x5c": [b64(pki.evil_root)]}]}}}))
    p = pki.paths("server")
    tls = ServerTls(FileCertificateSource(p.chain, p.key, spiffe_trust_bundle_map_file=str(bundle)))
    assert handshake(tls, pki.client_context("client"))["peer"].uri_sans == (CLIENT_ID,)
    got = handshake(tls, pki.client_context("other_td_client"))
    assert isinstance(got["error"], PeerRejected) and "other.domain" in str(got["error"])


# -- uvicorn ------------------------------------------------------------------------------------------


def test_uvicorn_strict(pki: Pki, strict_tls: ServerTls, uvicorn_strict: int) -> None:
    port = uvicorn_strict
    r = get(port, pki.client_context("client", alpn=ALPN_HTTP11), sni=SNI)
    assert r.status == 200 and r.alpn == "http/1.1"
    assert r.server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [SERVER_ID]
    assert r.json["peer"] == [CLIENT_ID] and r.json["scheme"] == "https"
    assert r.json["tls"]["sni"] == SNI and r.json["tls"]["alpn"] == "http/1.1"
    assert r.json["tls"]["tls_version"] == 0x0304 and r.json["tls"]["client_cert_error"] is None
    assert r.json["tls"]["chain"] >= 1 and r.json["tls"]["client_cert_name"] == ""
    # uvicorn's h11 speaks HTTP/1.1 only: it must not select h2
    assert alpn_of(port, pki.client_context("client", alpn=ALPN_H2)) is None
    assert get(port, pki.client_context("client_via_intermediate")).json["tls"]["chain"] >= 2
    before = dict(strict_tls.stats())
    for name in ("evil_client", "other_td_client", "expired_client"):
        assert refused(port, pki.client_context(name)), name
    assert refused(port, no_cert_client(pki))
    with pytest.raises((ConnectionError, http.client.HTTPException)):  # plaintext: no fallback
        plain_get(port)
    after = strict_tls.stats()
    assert after["ssl.fail_verify_san"] - before.get("ssl.fail_verify_san", 0) == 1
    assert after["ssl.fail_verify_error"] - before.get("ssl.fail_verify_error", 0) == 2
    assert after["ssl.fail_verify_no_cert"] - before.get("ssl.fail_verify_no_cert", 0) == 1


def test_uvicorn_websocket_gets_the_tls_extension(pki: Pki, uvicorn_strict: int) -> None:
    import wsproto  # noqa: F401
    raw = socket.create_connection((LOOPBACK, uvicorn_strict), timeout=5)
    with pki.client_context("client").wrap_socket(raw) as tls:
        key = base64.b64encode(os.urandom(16)).decode()
        tls.sendall((f"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 6:
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
        head, frames = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")
        assert frames[0] == 0x81  # FIN + text
        n = frames[1] & 0x7F
        start = 2 if n < 126 else 4
        n = n if n < 126 else int.from_bytes(frames[2:4], "big")
        while len(frames) < start + n:
            frames += tls.recv(65536)
        msg = json.loads(frames[start:start + n])
    assert msg["scheme"] == "wss" and msg["peer"] == [CLIENT_ID] and msg["tls"]["tls_version"] == 0x0304


@UNIX_ONLY
def test_uvicorn_permissive_tls_and_plaintext_on_one_port(pki: Pki, uvicorn_permissive: Tuple[ServerTls, int]) -> None:
    tls, port = uvicorn_permissive
    r = get(port, pki.client_context("client", alpn=ALPN_HTTP11), sni=SNI)
    assert r.json["peer"] == [CLIENT_ID] and r.json["scheme"] == "https" and r.json["tls"]["sni"] == SNI
    status, body = plain_get(port, "/plain")
    assert status == 200 and body["peer"] is None and body["scheme"] == "http" and body["tls"] is None
    # TLS clients still get every check
    assert refused(port, pki.client_context("other_td_client"))
    assert refused(port, pki.client_context("evil_client"))
    assert refused(port, no_cert_client(pki))
    # a plaintext client that shuts down its write side right after the request is served too
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'"scheme": "http"' in data
    # many at once, mixed
    results: List[Any] = []

    def one(i: int) -> None:
        if i % 2:
            results.append(get(port, pki.client_context("client")).json["peer"])
        else:
            results.append(plain_get(port)[1]["peer"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(map(str, results)) == sorted(map(str, [[CLIENT_ID]] * 8 + [None] * 8))


def test_uvicorn_rotation_without_restart(pki: Pki, tmp_path: Any) -> None:
    """New server certificate and new roots reach new connections; connections already open keep
    theirs. ``load_verify_locations`` only adds roots, so dropping one needs the new context."""
    d = tmp_path / "server"
    write_istio_dir(d, pki.server)
    tls = ServerTls(FileCertificateSource.from_directory(str(d), refresh_interval=0.05), trust_domains=[TD])
    new_root = CA.new("root-2")
    new_client_dir = tmp_path / "client2"
    write_istio_dir(new_client_dir, new_root.issue(CLIENT_ID), roots=[pki.root, new_root])
    from .pki import CertPaths, client_context
    new_client = client_context(CertPaths.of(new_client_dir))
    with run_uvicorn(tls) as port:
        first = get(port, pki.client_context("client"))
        assert first.server_serial == pki.server.cert.serial_number
        assert refused(port, new_client)  # root-2 not trusted yet
        kept = pki.client_context("client").wrap_socket(socket.create_connection((LOOPBACK, port), timeout=5))
        rotated = pki.root.issue(SERVER_ID)
        write_istio_dir(d, rotated, roots=[pki.root, new_root])
        time.sleep(0.1)
        second = get(port, new_client)
        assert second.server_serial == rotated.cert.serial_number and second.json["peer"] == [CLIENT_ID]
        assert get(port, pki.client_context("client")).server_serial == rotated.cert.serial_number
        # the connection made before the rotation still has the old certificate and still works
        assert x509.load_der_x509_certificate(kept.getpeercert(True)).serial_number == pki.server.cert.serial_number
        kept.sendall(b"GET /kept HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.close()
        write_istio_dir(d, rotated, roots=[new_root])  # the old root dropped
        time.sleep(0.1)
        assert refused(port, pki.client_context("client"))
        assert get(port, new_client).json["peer"] == [CLIENT_ID]


# -- hypercorn ----------------------------------------------------------------------------------------


def test_hypercorn_http2_and_http11(pki: Pki, strict_tls: ServerTls) -> None:
    import httpx
    import hypercorn  # noqa: F401
    with run_hypercorn(strict_tls) as port:
        with httpx.Client(http2=True, verify=pki.client_context("client")) as c:
            r = c.get(f"https://{LOOPBACK}:{port}/h2")
        assert r.http_version == "HTTP/2" and r.json()["peer"] == [CLIENT_ID] and r.json()["tls"]["alpn"] == "h2"
        r11 = get(port, pki.client_context("client", alpn=ALPN_HTTP11))
        assert r11.alpn == "http/1.1" and r11.json["peer"] == [CLIENT_ID] and r11.json["http_version"] == "1.1"
        assert alpn_of(port, pki.client_context("client", alpn=ALPN_H2)) == "h2"
        assert refused(port, pki.client_context("other_td_client"))
        assert refused(port, no_cert_client(pki))


# -- gunicorn -----------------------------------------------------------------------------------------

GUNICORN_CONF = """
from meshcore.tls import FileCertificateSource, ServerTls
from meshcore.tls.server import gunicorn_settings
tls = ServerTls(FileCertificateSource.from_directory({dir!r}), trust_domains=["cluster.local"])
globals().update(gunicorn_settings(tls))
bind = ["fd://{fd}"]
workers = 1
worker_class = {worker!r}
threads = 2
loglevel = "warning"
"""

GUNICORN_APP = """
import json
from meshcore.tls import peer_from_wsgi_environ

def app(environ, start_response):
    peer = peer_from_wsgi_environ(environ)
    body = json.dumps({"peer": list(peer.uri_sans) if peer else None, "scheme": environ["wsgi.url_scheme"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn is Unix-only")
@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn(pki: Pki, tmp_path: Any, worker: str) -> None:
    import gunicorn  # noqa: F401
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    (tmp_path / "conf.py").write_text(GUNICORN_CONF.format(dir=pki.paths("server").dir, fd=listener.fileno(),
                                                            worker=worker))
    (tmp_path / "app.py").write_text(GUNICORN_APP)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(meshcore.__file__)))
    proc = subprocess.Popen(die_with_parent([sys.executable, "-m", "gunicorn", "-c", "conf.py", "app:app"]),
                            cwd=tmp_path, env=env, pass_fds=(listener.fileno(),), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = get(port, pki.client_context("client", alpn=ALPN_HTTP11))
                break
            except (OSError, http.client.HTTPException):
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stdout.read().decode() if proc.poll() is not None else "gunicorn did not answer"
                time.sleep(0.1)
        assert r.status == 200 and r.json == {"peer": [CLIENT_ID], "scheme": "https"} and r.alpn == "http/1.1"
        assert alpn_of(port, pki.client_context("client", alpn=ALPN_H2)) is None
        assert refused(port, pki.client_context("other_td_client"))
        assert refused(port, pki.client_context("evil_client"))
        assert refused(port, no_cert_client(pki))
        assert get(port, pki.client_context("client_via_intermediate")).json["peer"] == [CLIENT_ID]
    finally:
        kill(proc)
        listener.close()


# -- stdlib servers -----------------------------------------------------------------------------------


def test_wsgi_server_permissive(pki: Pki) -> None:
    tls = ServerTls(source_of(pki.paths("server")), trust_domains=[TD])
    with run_wsgi(tls, permissive=True) as port:
        r = get(port, pki.client_context("client", alpn=ALPN_H2), sni=SNI)
        assert r.alpn is None  # wsgiref speaks HTTP/1.1 only
        assert r.json["peer"] == [CLIENT_ID] and r.json["scheme"] == "https" and r.json["tls"]["sni"] == SNI
        assert plain_get(port) == (200, {"scheme": "http", "peer": None, "subject": None, "tls": None})
        assert refused(port, pki.client_context("other_td_client"))
        assert refused(port, no_cert_client(pki))
    with run_wsgi(tls) as port:  # STRICT: plaintext is cut off
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plain_get(port)
        assert get(port, pki.client_context("client")).json["peer"] == [CLIENT_ID]


def test_socketserver_mixin(pki: Pki) -> None:
    tls = ServerTls(source_of(pki.paths("server")), alpn=("http/1.1",))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            peer = tls.peer(self.request) if isinstance(self.request, ssl.SSLSocket) else None
            body = json.dumps({"peer": list(peer.uri_sans) if peer else None}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    class Server(TlsServerMixin, ThreadingHTTPServer):
        mesh_tls = tls
        mesh_permissive = True
        daemon_threads = True

    server = Server((LOOPBACK, 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        port = server.server_address[1]
        assert get(port, pki.client_context("client")).json == {"peer": [CLIENT_ID]}
        assert plain_get(port) == (200, {"peer": None})
        assert refused(port, pki.client_context("evil_client"))
    finally:
        server.shutdown()
        server.server_close()


@UNIX_ONLY
def test_asyncio_protocol_factory_permissive_h2(pki: Pki) -> None:
    """A server speaking h2 (as a gRPC server would) behind the generic asyncio factory."""
    tls = ServerTls(source_of(pki.paths("server")), alpn=("h2",))

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            obj = transport.get_extra_info("ssl_object")
            peer = tls.peer(obj) if obj is not None else None
            self.hello = json.dumps({"alpn": obj.selected_alpn_protocol() if obj else None,
                                     "peer": list(peer.uri_sans) if peer else None}).encode()

        def data_received(self, data: bytes) -> None:
            self.transport.write(self.hello + b"|" + data)
            self.transport.close()

    async def main() -> List[bytes]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(tls.asyncio_protocol_factory(Echo, permissive=True, sniff_timeout=0.2),
                                          LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]

        def clients() -> List[bytes]:
            out = []
            for ctx, wait in ((pki.client_context("client", alpn=ALPN_H2), 0.0), (None, 0.0), (None, 0.4)):
                raw = socket.create_connection((LOOPBACK, port), timeout=5)
                s = ctx.wrap_socket(raw) if ctx is not None else raw
                time.sleep(wait)  # a silent client: plaintext after sniff_timeout (Envoy's tls_inspector)
                s.sendall(b"ping")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                s.close()
                out.append(data)
            return out

        try:
            return await loop.run_in_executor(None, clients)
        finally:
            server.close()
            await server.wait_closed()

    tls_reply, plain_reply, late_reply = asyncio.run(main())
    assert json.loads(tls_reply.split(b"|")[0]) == {"alpn": "h2", "peer": [CLIENT_ID]}
    assert tls_reply.endswith(b"|ping")
    assert plain_reply == late_reply == b'{"alpn": null, "peer": null}|ping'


# -- grpcio -------------------------------------------------------------------------------------------


def test_grpc_server(pki: Pki, tmp_path: Any) -> None:
    import grpc
    from concurrent import futures

    d = tmp_path / "server"
    write_istio_dir(d, pki.server_with_dns)  # Python gRPC clients check a DNS SAN (security.md §5.5)
    tls = ServerTls(FileCertificateSource.from_directory(str(d), refresh_interval=0.05), trust_domains=[TD])

    def whoami(request: bytes, context: Any) -> bytes:
        peer = peer_from_grpc_context(context)
        return json.dumps({"peer": list(peer.uri_sans) if peer else None}).encode()

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[tls.grpc_interceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(whoami)})])
    port = server.add_secure_port(f"{LOOPBACK}:0", tls.grpc_server_credentials())
    server.start()

    def call(name: str) -> Any:
        p = pki.paths(name)
        rd = lambda f: open(f, "rb").read()  # noqa: E731
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(rd(p.roots), rd(p.key),
                                                                                   rd(p.chain))) as ch:
            return json.loads(ch.unary_unary("/test.Who/Am")(b"", timeout=5))

    def server_cert(alpn: Sequence[str]) -> Tuple[Optional[str], int]:
        raw = socket.create_connection((LOOPBACK, port), timeout=5)
        with pki.client_context("client", alpn=alpn).wrap_socket(raw, server_hostname="localhost") as s:
            return s.selected_alpn_protocol(), x509.load_der_x509_certificate(s.getpeercert(True)).serial_number

    try:
        assert call("client") == {"peer": [CLIENT_ID]}
        assert call("client_via_intermediate") == {"peer": [CLIENT_ID]}
        with pytest.raises(grpc.RpcError) as e:
            call("other_td_client")  # verified chain, foreign trust domain: the interceptor
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            call("evil_client")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server_cert(ALPN_H2) == ("h2", pki.server_with_dns.cert.serial_number)
        rotated = pki.root.issue(SERVER_ID, dns=("localhost",))
        write_istio_dir(d, rotated)
        time.sleep(0.1)
        assert server_cert(ALPN_H2)[1] == rotated.cert.serial_number  # the fetcher's new generation
        assert call("client") == {"peer": [CLIENT_ID]}
    finally:
        server.stop(0)


# -- Envoy as the sidecar client ----------------------------------------------------------------------

UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


class SidecarOutbound(EnvoyProcess):
    """Envoy as an Istio sidecar's outbound (``security.md`` §6.4): a plaintext HTTP listener
    routing ``/tls`` to a cluster with auto-mTLS ``transport_socket_matches`` (endpoint metadata
    ``tlsMode: istio``: SNI, Istio ALPN, the sidecar's certificate, the server's SPIFFE ID
    checked), ``/plain`` to the same endpoint without the metadata (raw_buffer), ``/wrong-san``
    to one expecting another identity."""

    def __init__(self, sidecar: Any, roots: str, server_port: int) -> None:
        self.sidecar, self.roots, self.server_port = sidecar, roots, server_port
        self.envoy_bin = find_envoy()
        self.log_level, self.startup_timeout, self.keep_tmp = "warning", 30.0, False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""
        self.port = 0

    def _cluster(self, name: str, san: str, tls_mode: bool) -> Dict[str, Any]:
        tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS, "sni": SNI,
            "common_tls_context": {
                "alpn_protocols": list(ALPN_HTTP11),
                "tls_certificates": [{"certificate_chain": {"filename": self.sidecar.chain},
                                      "private_key": {"filename": self.sidecar.key}}],
                "validation_context": {"trusted_ca": {"filename": self.roots},
                                       "match_typed_subject_alt_names": [
                                           {"san_type": "URI", "matcher": {"exact": san}}]}}}}
        endpoint: Dict[str, Any] = {"endpoint": {"address": socket_address(self.server_port)}}
        if tls_mode:
            endpoint["metadata"] = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
        return {"name": name, "type": "STATIC", "connect_timeout": "2s",
                "transport_socket_matches": [
                    {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
                    {"name": "tlsMode-disabled", "match": {},
                     "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                                          "typed_config": {"@type": RAW_BUFFER}}}],
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}}

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-outbound-")
        self.access_log = os.path.join(self.tmpdir, "access.log")
        routes = [{"match": {"prefix": p}, "route": {"cluster": c, "timeout": "5s"}} for p, c in (
            ("/tls", f"outbound|8443||{FQDN}"), ("/plain", f"outbound|8443|plain|{FQDN}"),
            ("/wrong-san", f"outbound|8443|wrong|{FQDN}"))]
        hcm = {"@type": HCM, "stat_prefix": "outbound", "codec_type": "HTTP1",
               "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
               "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                   "@type": FILE_LOG, "path": self.access_log, "log_format": {"text_format_source": {
                       "inline_string": "%RESPONSE_CODE% %UPSTREAM_PEER_URI_SAN% "
                                        "%UPSTREAM_TRANSPORT_FAILURE_REASON%\n"}}}}]}
        cfg = {"node": {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local", "cluster": "client"},
               "admin": {"address": socket_address(0)},
               "static_resources": {
                   "listeners": [{"name": "outbound", "address": socket_address(0), "filter_chains": [{"filters": [
                       {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
                   "clusters": [self._cluster(f"outbound|8443||{FQDN}", SERVER_ID, True),
                                self._cluster(f"outbound|8443|plain|{FQDN}", SERVER_ID, False),
                                self._cluster(f"outbound|8443|wrong|{FQDN}", spiffe_id("other"), True)]}}
        path = os.path.join(self.tmpdir, "envoy.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self._run_envoy(path)
        self.port = self._listener_ports()[0]["outbound"]

    def close(self) -> None:
        self._stop(None)

    def get(self, path: str) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": f"{FQDN}:8443"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@UNIX_ONLY
@pytest.mark.envoy
def test_envoy_sidecar_client_to_uvicorn(pki: Pki, uvicorn_permissive: Tuple[ServerTls, int]) -> None:
    _, port = uvicorn_permissive
    with SidecarOutbound(pki.paths("sidecar"), pki.root_file, port) as envoy:
        status, body = envoy.get("/tls/x")
        assert status == 200, body
        seen = json.loads(body)
        assert seen["peer"] == [SIDECAR_ID] and seen["scheme"] == "https"
        assert seen["tls"]["sni"] == SNI and seen["tls"]["alpn"] == "http/1.1"  # not istio*, not h2
        status, body = envoy.get("/plain/x")  # no tlsMode metadata: plaintext, PERMISSIVE serves it
        assert status == 200 and json.loads(body)["peer"] is None and json.loads(body)["scheme"] == "http"
        status, body = envoy.get("/wrong-san/x")  # Envoy checks the server's SPIFFE ID
        assert status == 503
        deadline = time.monotonic() + 3
        while True:
            urllib.request.urlopen(urllib.request.Request(envoy.admin_url + "/reopen_logs", data=b"",
                                                          method="POST"), timeout=2).read()
            with open(envoy.access_log) as f:
                lines = f.read().splitlines()
            if len(lines) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert lines[0].startswith(f"200 {SERVER_ID}")
        assert lines[2].startswith("503 - ") and "SAN" in lines[2]
