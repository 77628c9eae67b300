"""A real Envoy, configured as an Istio sidecar's outbound side (auto-mTLS: SNI, Istio ALPN, the
sidecar's SPIFFE certificate, the server's SPIFFE ID checked), calls meshcore servers protected by
the server integrations with their policy from xDS:

* the servers: uvicorn + a plain ASGI app (PERMISSIVE TLS: plaintext reaches the middleware too),
  uvicorn + FastAPI (Starlette), hypercorn + the plain ASGI app over HTTP/2, the stdlib threaded
  WSGI server + Flask, gunicorn (sync worker, a subprocess with its own mesh) + a plain WSGI app,
  grpcio (sync) and grpc.aio, each behind a ServerTls over the mesh's workload certificate
  (``mesh.tls.workload_source()``: the bootstrap's ``certificate_providers``);
* the policy: istiod grpcgen-shaped inbound listeners (``xds.istio.io/grpc/lds/inbound/0.0.0.0:<port>``,
  chain ``inbound-mtls``, RBAC ``envoy.filters.http.rbac.DENY`` then ``envoy.filters.http.rbac``)
  served by meshcore's reference control plane, from an Istio-style AuthorizationPolicy pair:
  ALLOW ``principals: [cluster.local/ns/default/sa/sidecar]`` and DENY ``request.headers[echo] ==
  block``.

Checked: the handshake succeeds and the app sees the sidecar's SPIFFE ID and the ALLOW policy; a
request with ``echo: block`` gets 403 ``RBAC: access denied`` (gRPC: PERMISSION_DENIED with that
message); plaintext on the mTLS chain is refused (503, never served); pushing a changed
AuthorizationPolicy applies to new requests without a restart (on Envoy's pooled upstream
connections); a deleted listener stops serving (A36: 503 / UNAVAILABLE) and serves again when it
comes back; stats (Envoy's names, Prometheus) and destination telemetry records."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List

import grpc
import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.integrations.asgi import MeshAsgiMiddleware
from meshcore.integrations.grpc_server import AsyncMeshServerInterceptor, MeshServerInterceptor
from meshcore.integrations.wsgi import MeshWsgiMiddleware
from meshcore.tls import ServerTls
from meshcore.xds.model import LISTENER
from tls.pki import Pki, spiffe_id

from .policies import ALLOW_POLICY, CLIENT_SA, DENY_POLICY, authorization, bootstrap, listener
from .servers import (
    asgi_echo, bound_socket, call_grpc, fastapi_echo, flask_echo, run_grpc, run_grpc_aio, run_gunicorn,
    run_hypercorn, run_uvicorn, run_wsgi,
)
from .sidecar_client import SidecarClient, Upstream, fqdn

import uvicorn  # noqa: E402,F401  (a test dependency: the test extras install it)
import fastapi  # noqa: E402,F401  (a test dependency: the test extras install it)
import flask  # noqa: E402,F401  (a test dependency: the test extras install it)

SIDECAR_ID = spiffe_id("sidecar")
SERVER_ID = spiffe_id("server")
HTTP_SERVERS = ("asgi", "fastapi", "hypercorn", "flask", "gunicorn")
REMOTE = ("gunicorn",)  # its listener lives in its own process: observed through its answers
GRPC_SERVERS = ("grpc", "grpc-aio")


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class World:
    """Everything the module's tests share."""

    cp: ControlPlane
    mesh: meshcore.Mesh
    envoy: SidecarClient
    ports: Dict[str, int]
    listeners: Dict[str, Any]
    integrations: Dict[str, Any]
    policies: Dict[str, Any]

    def push(self, policies: List[Dict[str, Any]]) -> None:
        """A changed AuthorizationPolicy: new listeners on the control plane; wait until every
        in-process server whose policy changed has the new snapshot (no restart of anything)."""
        changed = [n for n in self.policies if self.policies[n] != policies]
        local = [n for n in changed if n in self.listeners]
        before = {n: self.listeners[n].snapshot.version for n in local}
        self.cp.update([listener(self.ports[n], policies) for n in changed])
        for n in changed:
            self.policies[n] = policies
        wait(lambda: all(self.listeners[n].snapshot is not None and self.listeners[n].snapshot.version > before[n]
                         for n in local))

    def expect(self, server: str, status: int, path: str = "/hello", **headers: str) -> Any:
        """``get`` expecting ``status``; a server in another process gets a few seconds to see a push."""
        deadline = time.monotonic() + (10 if server in REMOTE else 0)
        while True:
            got = self.get(server, path, **headers)
            if got[0] == status or time.monotonic() > deadline:
                assert got[0] == status, (server, got)
                return got
            time.sleep(0.02)

    def get(self, host: str, path: str = "/hello", **headers: str) -> Any:
        return self.envoy.request(host, path, headers=headers)

    def rpc(self, host: str, **kw: Any) -> Any:
        return call_grpc(self.envoy.port, fqdn(host), **kw)

    def stats(self, name: str) -> Dict[str, int]:
        return self.integrations[name].stats.snapshot()


@pytest.fixture(scope="module")
def world(pki: Pki, plane: ControlPlane) -> Iterator[World]:
    w = World()
    w.cp = plane
    policies = authorization()
    socks = {"asgi": bound_socket(), "fastapi": bound_socket(), "hypercorn": bound_socket()}
    w.ports = {name: sock.getsockname()[1] for name, sock in socks.items()}
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(meshcore.Mesh(bootstrap(plane.port, pki.paths("server").dir)))
        w.mesh = mesh
        tls = ServerTls(mesh.tls.workload_source())
        w.listeners, w.integrations, w.policies = {}, {}, {}

        def serve(name: str, port: int) -> Any:
            w.ports[name] = port
            plane.update([listener(port, policies)])
            w.policies[name] = policies
            lst = w.listeners[name] = mesh.serve(port)
            assert lst.wait_serving(10), lst.error
            return lst

        asgi = w.integrations["asgi"] = MeshAsgiMiddleware(asgi_echo, mesh, listener=serve("asgi", w.ports["asgi"]))
        stack.enter_context(run_uvicorn(socks["asgi"], asgi, tls, permissive=True))
        api = fastapi_echo()
        api.add_middleware(MeshAsgiMiddleware, mesh=mesh, listener=serve("fastapi", w.ports["fastapi"]))
        stack.enter_context(run_uvicorn(socks["fastapi"], api, tls))
        h2 = w.integrations["hypercorn"] = MeshAsgiMiddleware(asgi_echo, mesh, listener=serve("hypercorn",
                                                                                                w.ports["hypercorn"]))
        stack.enter_context(run_hypercorn(socks["hypercorn"], h2, tls))

        def flask_app(port: int) -> Any:
            app = flask_echo()
            mw = w.integrations["flask"] = MeshWsgiMiddleware(app.wsgi_app, mesh, listener=serve("flask", port))
            app.wsgi_app = mw
            return app

        stack.enter_context(run_wsgi(tls, flask_app))
        for name, run, cls in (("grpc", run_grpc, MeshServerInterceptor),
                               ("grpc-aio", run_grpc_aio, AsyncMeshServerInterceptor)):
            w.ports[name], w.integrations[name] = stack.enter_context(run(
                lambda port, name=name, cls=cls: cls(serve(name, port), mesh=mesh), tls.grpc_server_credentials()))
        w.ports["gunicorn"] = stack.enter_context(run_gunicorn_for(plane, pki, w, policies))
        upstreams = [Upstream("asgi", w.ports["asgi"], SERVER_ID, plain=True),
                     Upstream("fastapi", w.ports["fastapi"], SERVER_ID),
                     Upstream("hypercorn", w.ports["hypercorn"], SERVER_ID, grpc=True),  # HTTP/2
                     Upstream("flask", w.ports["flask"], SERVER_ID),
                     Upstream("gunicorn", w.ports["gunicorn"], SERVER_ID),
                     Upstream("grpc", w.ports["grpc"], SERVER_ID, grpc=True),
                     Upstream("grpc-aio", w.ports["grpc-aio"], SERVER_ID, grpc=True)]
        w.envoy = stack.enter_context(SidecarClient(pki.paths("sidecar"), pki.root_file, upstreams))
        deadline = time.monotonic() + 30  # gunicorn's worker: its import made a mesh and waited for the listener
        while w.get("gunicorn")[0] != 200:
            assert time.monotonic() < deadline, w.get("gunicorn")
            time.sleep(0.1)
        yield w


@contextlib.contextmanager
def run_gunicorn_for(plane: ControlPlane, pki: Pki, w: World, policies: List[Dict[str, Any]]) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp, run_gunicorn(tmp, pki.paths("server").dir,
                                                            bootstrap(plane.port, pki.paths("server").dir)) as port:
        w.policies["gunicorn"] = policies
        plane.update([listener(port, policies)])
        yield port


@pytest.fixture
def fresh(world: World) -> Iterator[World]:
    """The module's world with the original policy restored after the test."""
    try:
        yield world
    finally:
        world.push(authorization())


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_http_server_sees_the_sidecar_identity_and_enforces_rbac(world: World, server: str) -> None:
    status, headers, body = world.get(server, "/hello?x=1")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["principal"] == SIDECAR_ID and seen["policy"] == ALLOW_POLICY
    assert seen["chain"] == "inbound-mtls" and seen["path"] == "/hello"
    if server == "asgi":
        assert seen["peer"] == [SIDECAR_ID] and seen["sni"] == f"outbound_.8443_._.{fqdn('asgi')}"
    if server == "hypercorn":  # Envoy speaks HTTP/2 to it (ALPN istio-h2, istio, h2 -> h2)
        assert seen["http_version"] == "2" and seen["peer"] == [SIDECAR_ID]
    if server == "gunicorn":  # the identity from gunicorn's TLS socket, the raw target from RAW_URI
        assert seen["peer"] == [SIDECAR_ID] and seen["raw"] == "/hello?x=1"
    status, headers, body = world.get(server, "/hello", echo="block")
    assert (status, body) == (403, b"RBAC: access denied")
    assert headers["content-type"].startswith("text/plain")
    assert world.get(server, "/hello", echo="allow")[0] == 200


@pytest.mark.parametrize("server", GRPC_SERVERS)
def test_grpc_server_sees_the_sidecar_identity_and_enforces_rbac(world: World, server: str) -> None:
    got = world.rpc(server)
    assert got == {"principal": SIDECAR_ID, "policy": ALLOW_POLICY, "same": True, "request": "hi"}
    assert world.rpc(server, method="Stream") == [{"i": 0, "principal": SIDECAR_ID},
                                                  {"i": 1, "principal": SIDECAR_ID}]
    with pytest.raises(grpc.RpcError) as e:
        world.rpc(server, metadata=[("echo", "block")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and e.value.details() == "RBAC: access denied"
    with pytest.raises(grpc.RpcError) as e:
        world.rpc(server, method="Stream", metadata=[("echo", "block")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_plaintext_on_the_mtls_chain_is_refused(world: World) -> None:
    """PERMISSIVE transport (the server takes plaintext) under a STRICT chain: the middleware
    refuses the request, never serves it without the client certificate."""
    status, headers, body = world.get("asgi-plain", "/hello")
    assert status == 503 and body.startswith(b"meshcore:") and headers.get("connection") != "keep-alive"
    assert world.stats("asgi")[f"listener.0.0.0.0_{world.ports['asgi']}.no_filter_chain_match"] >= 1


def test_pushed_policy_applies_to_new_requests_without_restart(fresh: World) -> None:
    w = fresh
    for server in HTTP_SERVERS:
        assert w.get(server)[0] == 200
    w.push(authorization(allow=[CLIENT_SA], deny_header="block"))  # the sidecar is no longer allowed
    for server in HTTP_SERVERS:
        assert w.expect(server, 403)[2] == b"RBAC: access denied", server
    for server in GRPC_SERVERS:
        with pytest.raises(grpc.RpcError) as e:
            w.rpc(server)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, server
    w.push(authorization(deny_header="stop"))  # the sidecar again; "block" no longer denied, "stop" is
    for server in HTTP_SERVERS:
        w.expect(server, 200, echo="block")
        w.expect(server, 403, echo="stop")
    for server in GRPC_SERVERS:
        assert w.rpc(server, metadata=[("echo", "block")])["principal"] == SIDECAR_ID
        with pytest.raises(grpc.RpcError) as e:
            w.rpc(server, metadata=[("echo", "stop")])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_deleted_listener_stops_serving_then_serves_again(fresh: World) -> None:
    w = fresh
    gone = ("flask", "grpc")
    w.cp.update(removes=[(LISTENER, w.listeners[n].resource_name) for n in gone])
    wait(lambda: not any(w.listeners[n].serving for n in gone))
    status, headers, body = w.get("flask")
    assert status == 503 and b"not serving" in body
    with pytest.raises(grpc.RpcError) as e:
        w.rpc("grpc")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert w.get("fastapi")[0] == 200  # the other servers are untouched
    w.cp.update([listener(w.ports[n], w.policies[n]) for n in gone])
    wait(lambda: all(w.listeners[n].serving for n in gone))
    assert w.get("flask")[0] == 200 and w.rpc("grpc")["principal"] == SIDECAR_ID


def test_stats_prometheus_and_destination_records(world: World) -> None:
    records: List[Any] = []
    world.mesh.telemetry.add_sink(records.append)
    try:
        assert world.get("asgi", "/r", **{"x-request-id": "req-1"})[0] == 200
        assert world.get("asgi", "/r", echo="block")[0] == 403
        assert world.get("flask", "/r")[0] == 200
        assert world.rpc("grpc")["principal"] == SIDECAR_ID
        with pytest.raises(grpc.RpcError):
            world.rpc("grpc-aio", metadata=[("echo", "block")])
    finally:
        world.mesh.telemetry.remove_sink(records.append)
    by = [(r.reporter, r.method, r.path, r.response_code, r.grpc_status, r.principal, r.connection_security_policy)
          for r in records]
    assert by == [
        ("destination", "GET", "/r", 200, None, SIDECAR_ID, "mutual_tls"),
        ("destination", "GET", "/r", 403, None, SIDECAR_ID, "mutual_tls"),
        ("destination", "GET", "/r", 200, None, SIDECAR_ID, "mutual_tls"),
        ("destination", "POST", "/echo.Echo/Say", 200, 0, SIDECAR_ID, "mutual_tls"),
        ("destination", "POST", "/echo.Echo/Say", 200, 7, SIDECAR_ID, "mutual_tls"),  # Envoy: 200 + grpc-status
    ]
    assert records[0].request_id == "req-1" and records[0].protocol == "http" and records[3].protocol == "grpc"
    assert records[1].response_code_details == f"rbac_access_denied_matched_policy[{DENY_POLICY}]"
    assert records[0].authority == fqdn("asgi") and records[0].duration_ms > 0

    prefix = f"http.inbound_0.0.0.0_{world.ports['asgi']}."
    stats = world.stats("asgi")
    # Envoy counts per RBAC filter: an allowed request passes DENY and ALLOW (2), a denied one stops at DENY
    assert stats[prefix + "rbac.allowed"] >= 2 and stats[prefix + "rbac.denied"] >= 1
    assert stats[prefix + "downstream_rq_2xx"] >= 1 and stats[prefix + "downstream_rq_4xx"] >= 1
    assert stats[prefix + "downstream_rq_total"] == stats[prefix + "downstream_rq_completed"]
    grpc_stats = world.stats("grpc")
    gprefix = f"http.inbound_0.0.0.0_{world.ports['grpc']}."
    assert grpc_stats[gprefix + "downstream_rq_http2_total"] >= 1 and grpc_stats[gprefix + "rbac.denied"] >= 1

    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(world.integrations["asgi"].stats.prometheus_collector())
    text = generate_latest(registry).decode()
    assert f'meshcore_http_rbac_denied_total{{stat_prefix="inbound_0.0.0.0_{world.ports["asgi"]}"}}' in text
