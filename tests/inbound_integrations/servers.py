"""Real servers for the server integrations' tests, each on a loopback port it reports: uvicorn
(on a socket bound first, so the port is known before the app is built), the stdlib threaded WSGI
server of ``meshcore.tls.server``, grpcio (sync) and grpc.aio, all behind a
:class:`~meshcore.tls.ServerTls`; and the apps / servicers they serve, which answer with what the
integration told them about the caller (JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grpc

from meshcore.integrations.grpc_server import caller_of, current_caller, current_principal
from meshcore.tls import ServerTls
from meshcore.tls.server import make_wsgi_server, uvicorn_config

LOOPBACK = "127.0.0.1"
SERVICE = "echo.Echo"


# -- apps -------------------------------------------------------------------------------------------


async def asgi_echo(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    """Plain ASGI: the request's ``scope["meshcore"]`` and what the server reported, as JSON."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(scope["meshcore"]["principal"])})
        await send({"type": "websocket.close"})
        return
    while (await receive()).get("more_body"):
        pass
    m = scope["meshcore"]
    tls = (scope.get("extensions") or {}).get("tls") or {}
    body = json.dumps({"principal": m["principal"], "peer": list(m["peer"].uri_sans) if m["peer"] else None,
                       "policy": m["policy"], "chain": m["chain"], "path": scope["path"],
                       "sni": tls.get("meshcore.server_name"), "http_version": scope.get("http_version"),
                       "app": "asgi"}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


try:  # module level: FastAPI resolves the (string) annotations in the module's globals
    from fastapi import FastAPI, Request
except ImportError:  # pragma: no cover - the tests needing it skip
    pass


def fastapi_echo() -> Any:
    api = FastAPI()

    @api.get("/{rest:path}")
    def whoami(request: Request, rest: str) -> Dict[str, Any]:
        m = request.scope["meshcore"]
        return {"principal": m["principal"], "policy": m["policy"], "chain": m["chain"], "path": "/" + rest,
                "app": "fastapi"}

    return api


def flask_echo() -> Any:
    from flask import Flask, jsonify, request

    app = Flask("inbound-test")

    @app.route("/", defaults={"rest": ""})
    @app.route("/<path:rest>")
    def whoami(rest: str) -> Any:
        env = request.environ
        peer = env["meshcore.peer"]
        return jsonify(principal=env["meshcore.principal"], peer=list(peer.uri_sans) if peer else None,
                       policy=env["meshcore.policy"], chain=env["meshcore.chain"], path=request.path, app="flask")

    return app


def _say(request: bytes, context: Any) -> bytes:
    c = caller_of(context)
    cur = current_caller()
    return json.dumps({"principal": current_principal(), "policy": c.policy if c else None,
                       "same": cur == c, "request": request.decode()}).encode()


def _stream(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(2):
        yield json.dumps({"i": i, "principal": current_principal()}).encode()


async def _say_aio(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(0)
    return _say(request, context)


async def _stream_aio(request: bytes, context: Any) -> Any:
    for i in range(2):
        await asyncio.sleep(0)
        yield json.dumps({"i": i, "principal": current_principal()}).encode()


def grpc_handlers(aio: bool = False) -> Any:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(_say_aio if aio else _say),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream_aio if aio else _stream),
    })


# -- servers ----------------------------------------------------------------------------------------


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_uvicorn(sock: socket.socket, app: Any, tls: ServerTls, *, permissive: bool = False) -> Iterator[int]:
    import uvicorn

    cfg = uvicorn_config(app, tls, permissive=permissive, log_level="warning", lifespan="off", ws="none",
                         proxy_headers=False, sniff_timeout=2.0)
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def run_hypercorn(sock: socket.socket, app: Any, tls: ServerTls) -> Iterator[int]:
    """hypercorn (HTTP/2 and HTTP/1.1) on its own event loop thread, on ``sock``."""
    from meshcore.tls.server import serve_hypercorn

    sock.listen(64)
    port = sock.getsockname()[1]
    fd = sock.detach()  # hypercorn owns (and closes) it
    state: Dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await serve_hypercorn(app, tls, bind=[f"fd://{fd}"], shutdown_trigger=state["stop"].wait,
                              loglevel="WARNING", graceful_timeout=1)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="hypercorn")
    thread.start()
    assert started.wait(10), "hypercorn did not start"
    try:
        yield port
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


@contextlib.contextmanager
def run_wsgi(tls: ServerTls, make_app: Callable[[int], Any]) -> Iterator[int]:
    """The stdlib threaded WSGI server; ``make_app(port)`` builds the app once the port is known."""
    server = make_wsgi_server(lambda e, s: [], tls, LOOPBACK, 0, handshake_timeout=5)
    port = server.server_address[1]
    server.set_app(make_app(port))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


#: grpcio binds with SO_REUSEPORT by default: a port another process serves would be shared, not refused
_NO_REUSEPORT = [("grpc.so_reuseport", 0)]


def _bind(server: Any, port: int, creds: Any) -> bool:
    try:
        bound = server.add_secure_port(f"{LOOPBACK}:{port}", creds) if creds is not None \
            else server.add_insecure_port(f"{LOOPBACK}:{port}")
    except RuntimeError:  # grpcio >= 1.5x: "Failed to bind"
        return False
    return bound == port


def _attempts(make: Callable[[int], Any]) -> Iterator[Tuple[int, Any]]:
    """(port, interceptor) to try: the port must be known before the interceptor (its listener is
    ``mesh.serve(port)``) and the server; another process may take a free port in between, so a
    failed bind is retried on another one (the failed attempt's listener is closed)."""
    for _ in range(5):
        port = free_port()
        interceptor = make(port)
        yield port, interceptor
        lst = getattr(interceptor, "listener", None)
        if lst is not None:
            lst.close()
    raise AssertionError("could not bind a gRPC server port in 5 attempts")


@contextlib.contextmanager
def run_grpc(make: Callable[[int], Any], creds: Any) -> Iterator[Tuple[int, Any]]:
    """A grpcio server whose interceptor is ``make(port)``; yields (port, interceptor)."""
    for port, interceptor in _attempts(make):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor],
                             options=_NO_REUSEPORT)
        server.add_generic_rpc_handlers((grpc_handlers(),))
        if _bind(server, port, creds):
            break
        server.stop(0)
    server.start()
    try:
        yield port, interceptor
    finally:
        server.stop(0).wait(5)


@contextlib.contextmanager
def run_grpc_aio(make: Callable[[int], Any], creds: Any) -> Iterator[Tuple[int, Any]]:
    """A grpc.aio server on its own event loop thread (``asyncio.run``: stopped and drained on
    exit), its interceptor ``make(port)``; yields (port, interceptor)."""
    for port, interceptor in _attempts(make):
        state: Dict[str, Any] = {}
        ready = threading.Event()

        async def main(port: int = port, interceptor: Any = interceptor, state: Dict[str, Any] = state,
                       ready: threading.Event = ready) -> None:
            server = grpc.aio.server(interceptors=[interceptor], options=_NO_REUSEPORT)
            server.add_generic_rpc_handlers((grpc_handlers(aio=True),))
            state["bound"] = _bind(server, port, creds)
            if not state["bound"]:
                ready.set()
                await server.stop(0)
                return
            await server.start()
            state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await state["stop"].wait()
            await server.stop(0)
            await server.wait_for_termination()

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="grpc-aio")
        thread.start()
        assert ready.wait(10), "grpc.aio server did not start"
        if state["bound"]:
            break
        thread.join(5)
    try:
        yield port, interceptor
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(5)


GUNICORN_CONF = """
from meshcore.tls import FileCertificateSource, ServerTls
from meshcore.tls.server import gunicorn_settings
globals().update(gunicorn_settings(ServerTls(FileCertificateSource.from_directory({dir!r}))))
bind = ["fd://{fd}"]
workers = 1
worker_class = "sync"
loglevel = "warning"
"""

GUNICORN_APP = """
import json, os
import meshcore
from meshcore.integrations.wsgi import MeshWsgiMiddleware

def echo(environ, start_response):
    peer = environ["meshcore.peer"]
    body = json.dumps({"principal": environ["meshcore.principal"], "peer": list(peer.uri_sans) if peer else None,
                       "policy": environ["meshcore.policy"], "chain": environ["meshcore.chain"],
                       "path": environ["PATH_INFO"], "raw": environ.get("RAW_URI"), "app": "gunicorn"}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

# in the worker (no preload): the mesh's xDS stream lives in the process that serves
mesh = meshcore.Mesh(json.loads(os.environ["MESHCORE_TEST_BOOTSTRAP"]))
listener = mesh.serve(int(os.environ["MESHCORE_TEST_PORT"]))
listener.wait_serving(10)
app = MeshWsgiMiddleware(echo, mesh, listener=listener)
"""


@contextlib.contextmanager
def run_gunicorn(tmp: Any, cert_dir: str, bootstrap: Dict[str, Any]) -> Iterator[int]:
    """gunicorn (sync worker) in a subprocess: ServerTls from the workload's files
    (``gunicorn_settings``), the app a MeshWsgiMiddleware over its own mesh (in the worker)."""
    import os
    import subprocess
    import sys

    import meshcore
    from envoy_process import die_with_parent, kill

    sock = bound_socket()
    sock.listen(64)
    port = sock.getsockname()[1]
    with open(os.path.join(tmp, "conf.py"), "w") as f:
        f.write(GUNICORN_CONF.format(dir=cert_dir, fd=sock.fileno()))
    with open(os.path.join(tmp, "inbound_app.py"), "w") as f:
        f.write(GUNICORN_APP)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(meshcore.__file__)),
               MESHCORE_TEST_BOOTSTRAP=json.dumps(bootstrap), MESHCORE_TEST_PORT=str(port))
    log_path = os.path.join(tmp, "gunicorn.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(die_with_parent([sys.executable, "-m", "gunicorn", "-c", "conf.py", "inbound_app:app"]),
                                cwd=tmp, env=env, pass_fds=(sock.fileno(),), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    except BaseException:
        with open(log_path, "rb") as f:
            sys.stderr.write("gunicorn output:\n" + f.read()[-4000:].decode("utf-8", "replace"))
        raise
    finally:
        kill(proc)
        sock.close()


def call_grpc(port: int, authority: str, method: str = "Say", request: bytes = b"hi",
              metadata: Optional[list] = None) -> Any:
    """One call through a plaintext channel to ``port`` (an Envoy sidecar) with ``:authority``."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}", options=[("grpc.default_authority", authority)]) as ch:
        if method == "Stream":
            return [json.loads(m) for m in ch.unary_stream(f"/{SERVICE}/Stream")(request, metadata=metadata,
                                                                                timeout=10)]
        return json.loads(ch.unary_unary(f"/{SERVICE}/{method}")(request, metadata=metadata, timeout=10))
