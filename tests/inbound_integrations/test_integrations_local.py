"""The server integrations without Envoy: local policy (``rbac=``), argument errors, the A36
states and route handling with listeners from the reference control plane, the Envoy shape's
chain selection and path normalization, Starlette's test client, wsgiref and grpcio (plaintext
and TLS, sync and asyncio) with real servers and clients."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple
from wsgiref.util import setup_testing_defaults

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

import meshcore
from meshcore import RbacEngine
from meshcore.controlplane import ControlPlane, istio_sidecar
from meshcore.integrations.asgi import MeshAsgiMiddleware, caller
from meshcore.integrations.grpc_server import AsyncMeshServerInterceptor, MeshServerInterceptor
from meshcore.integrations.wsgi import MeshWsgiMiddleware
from meshcore.rbac import PeerCertificate
from meshcore.tls import ServerTls
from inbound.grpcgen_inbound import hcm, inbound_listener, pack
from tls.pki import Pki, spiffe_id

from .policies import CLIENT_SA, authorization, bootstrap, listener
from .servers import SERVICE, asgi_echo, run_grpc, run_grpc_aio

CLIENT = spiffe_id("client")
OTHER = spiffe_id("other")
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def engine(*filters: Tuple[str, Dict[str, Any]]) -> RbacEngine:
    return RbacEngine.from_xds(list(filters))


def allow(principals: List[Dict[str, Any]], name: str = "allow") -> Tuple[str, Dict[str, Any]]:
    return ("envoy.filters.http.rbac", {"rules": {"action": "ALLOW", "policies": {
        name: {"permissions": [{"any": True}], "principals": principals}}}})


def deny(permissions: List[Dict[str, Any]], name: str = "deny") -> Tuple[str, Dict[str, Any]]:
    return ("envoy.filters.http.rbac.DENY", {"rules": {"action": "DENY", "policies": {
        name: {"permissions": permissions, "principals": [{"any": True}]}}}})


def header_is(name: str, value: str) -> Dict[str, Any]:
    return {"header": {"name": name, "string_match": {"exact": value}}}


CLIENT_ONLY = allow([{"authenticated": {"principal_name": {"exact": CLIENT}}}])


# -- calling an ASGI app in process -------------------------------------------------------------------


def scope(path: str = "/x", *, peer: Any = None, tls: bool = False, headers: Optional[List[Tuple[bytes, bytes]]] = None,
          kind: str = "http", client: Any = ("10.0.0.1", 40000), server: Any = ("10.0.0.9", 8080),
          version: str = "1.1", sni: Optional[str] = None) -> Dict[str, Any]:
    raw, _, qs = path.partition("?")
    s: Dict[str, Any] = {"type": kind, "http_version": version, "method": "GET", "path": raw,
                         "raw_path": raw.encode(), "query_string": qs.encode(), "scheme": "http",
                         "headers": [(b"host", b"server.default.svc.cluster.local:8080")] + (headers or []),
                         "client": client, "server": server}
    if tls or peer is not None:
        s["extensions"] = {"tls": {"meshcore.peer": peer, "meshcore.server_name": sni, "client_cert_chain": ()}}
    return s


def call(app: Any, s: Dict[str, Any]) -> Tuple[int, Dict[str, str], bytes, List[Dict[str, Any]]]:
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b""} if s["type"] == "http" else {"type": "websocket.connect"}

    async def send(m: Dict[str, Any]) -> None:
        sent.append(m)

    asyncio.run(app(s, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return 0, {}, b"", sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, sent


def test_local_policy_allows_denies_and_swaps_without_restart() -> None:
    mw = MeshAsgiMiddleware(asgi_echo, rbac=engine(deny([header_is("echo", "block")]), CLIENT_ONLY))
    status, _, body, _ = call(mw, scope(peer=PeerCertificate([CLIENT])))
    seen = json.loads(body)
    assert status == 200 and seen["principal"] == CLIENT and seen["policy"] == "allow" and seen["chain"] is None
    status, headers, body, _ = call(mw, scope(peer=PeerCertificate([CLIENT]), headers=[(b"echo", b"block")]))
    assert (status, body, headers["content-type"]) == (403, b"RBAC: access denied", "text/plain")
    assert call(mw, scope(peer=PeerCertificate([OTHER])))[0] == 403
    assert call(mw, scope())[0] == 403  # plaintext: authenticated never matches
    old = mw.rbac
    mw.rbac = engine(allow([{"authenticated": {"principal_name": {"exact": OTHER}}}]))  # the next request
    assert call(mw, scope(peer=PeerCertificate([CLIENT])))[0] == 403
    assert call(mw, scope(peer=PeerCertificate([OTHER])))[0] == 200
    stats = mw.stats.snapshot()
    # per filter, as Envoy: 1st: DENY allowed + ALLOW allowed; 2nd: DENY denied; 3rd/4th: DENY allowed, ALLOW denied;
    # then the new engine (ALLOW only): denied, allowed
    assert stats["http.inbound.rbac.allowed"] == 2 + 2 + 1 and stats["http.inbound.rbac.denied"] == 3 + 1
    assert old.stat_counters["allowed"] == 4  # the old engine's own counters are the ones reported
    assert stats["http.inbound.downstream_rq_2xx"] == 2 and stats["http.inbound.downstream_rq_4xx"] == 4
    assert stats["http.inbound.downstream_rq_http1_total"] == 6


def test_tls_without_client_certificate_is_not_plaintext() -> None:
    """``authenticated`` without a principal name matches any TLS connection (A41/Envoy), also one
    whose client sent no certificate; a plaintext one never."""
    mw = MeshAsgiMiddleware(asgi_echo, rbac=engine(allow([{"authenticated": {}}])))
    status, _, body, _ = call(mw, scope(tls=True))
    assert status == 200 and json.loads(body)["principal"] is None
    assert call(mw, scope())[0] == 403


def test_request_attributes_reach_rbac() -> None:
    """Path with the query, url_path without it, method, authority, source/destination IP and
    port, SNI; non-IP client addresses count as no IP."""
    rules = [
        {"url_path": {"path": {"exact": "/admin"}}},
        header_is(":path", "/q?secret=1"),
        {"header": {"name": ":authority", "string_match": {"prefix": "evil."}}},
        {"destination_port": 9999},
        {"requested_server_name": {"exact": "bad.sni"}},
    ]
    mw = MeshAsgiMiddleware(asgi_echo, rbac=engine(deny([{"or_rules": {"rules": rules}}]),
                                                   allow([{"direct_remote_ip": {"address_prefix": "10.0.0.0",
                                                                                "prefix_len": 8}}])))
    assert call(mw, scope("/ok?x=1"))[0] == 200
    assert call(mw, scope("/admin?x=1"))[0] == 403
    assert call(mw, scope("/q?secret=1"))[0] == 403
    assert call(mw, scope("/q?secret=2"))[0] == 200
    assert call(mw, scope(headers=[(b"host", b"evil.example")]))[0] == 200  # the first Host wins (ours)
    s = scope()
    s["headers"] = [(b"host", b"evil.example")]
    assert call(mw, s)[0] == 403
    assert call(mw, scope(server=("10.0.0.9", 9999)))[0] == 403
    assert call(mw, scope(tls=True, sni="bad.sni"))[0] == 403
    assert call(mw, scope(client=("192.168.1.1", 1)))[0] == 403  # not in 10/8
    assert call(mw, scope(client=("testclient", 50000)))[0] == 403  # not an IP: no CIDR matches
    assert call(mw, scope(client=None))[0] == 403


def test_lifespan_passes_and_websocket_refused_before_accept() -> None:
    mw = MeshAsgiMiddleware(asgi_echo, rbac=engine(CLIENT_ONLY))
    status, _, _, sent = call(mw, scope(kind="websocket"))
    assert status == 0 and sent == [{"type": "websocket.close", "code": 1008}]
    status, _, _, sent = call(mw, scope(kind="websocket", peer=PeerCertificate([CLIENT])))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == CLIENT

    events: List[str] = []

    async def app(s: Dict[str, Any], receive: Any, send: Any) -> None:
        events.append(s["type"])
        assert "meshcore" not in s

    asyncio.run(MeshAsgiMiddleware(app, rbac=engine(CLIENT_ONLY))({"type": "lifespan"}, None, None))
    assert events == ["lifespan"]


def test_arguments() -> None:
    with pytest.raises(TypeError):
        MeshAsgiMiddleware(None)
    with pytest.raises(TypeError, match="RbacEngine"):
        MeshAsgiMiddleware(asgi_echo, rbac=object())
    with pytest.raises(TypeError, match="InboundListener"):
        MeshAsgiMiddleware(asgi_echo, listener="8080")
    with pytest.raises(ValueError, match="needs the mesh"):
        MeshAsgiMiddleware(asgi_echo, listener=8080)
    with pytest.raises(ValueError, match="without the mesh's policy"):
        MeshWsgiMiddleware(lambda e, s: [], object())
    with pytest.raises(TypeError, match="stat_prefix"):
        MeshAsgiMiddleware(asgi_echo, stat_prefix="")
    mw = MeshAsgiMiddleware(asgi_echo)  # no policy at all: identity and stats only
    status, _, body, _ = call(mw, scope(peer=PeerCertificate([CLIENT])))
    assert status == 200 and json.loads(body)["principal"] == CLIENT and json.loads(body)["policy"] is None


def test_starlette_test_client() -> None:
    import starlette  # noqa: F401
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def home(request: Request) -> JSONResponse:
        m = caller(request)
        return JSONResponse({"principal": m["principal"], "policy": m["policy"], "client": request.client.host})

    app = Starlette(routes=[Route("/", home)], middleware=[
        Middleware(MeshAsgiMiddleware, rbac=engine(deny([header_is("echo", "block")]), allow([{"any": True}])))])
    with TestClient(app) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.json() == {"principal": None, "policy": "allow", "client": "testclient"}
        r = client.get("/", headers={"echo": "block"})
        assert (r.status_code, r.text) == (403, "RBAC: access denied")


# -- WSGI ---------------------------------------------------------------------------------------------


def wsgi_call(app: Any, path: str = "/x", **environ: Any) -> Tuple[str, Dict[str, str], bytes, Dict[str, Any]]:
    env: Dict[str, Any] = {"PATH_INFO": path.partition("?")[0], "QUERY_STRING": path.partition("?")[2],
                           "REMOTE_ADDR": "10.0.0.1", "REMOTE_PORT": "40000", "SERVER_NAME": "10.0.0.9",
                           "SERVER_PORT": "8080"}
    env.update(environ)
    setup_testing_defaults(env)
    got: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, dict(headers)

    result = app(env, start_response)
    body = b"".join(result)
    getattr(result, "close", lambda: None)()
    return got["status"], got["headers"], body, env


def wsgi_echo(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
    body = json.dumps({k: environ[k] for k in ("meshcore.principal", "meshcore.policy", "PATH_INFO")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def test_wsgi_local_policy() -> None:
    mw = MeshWsgiMiddleware(wsgi_echo, rbac=engine(deny([header_is("x-user", "mallory"),
                                                          {"url_path": {"path": {"prefix": "/a/b"}}}]),
                                                    allow([{"authenticated": {"principal_name": {"exact": CLIENT}}}])))
    tls = {"meshcore.tls": {"meshcore.server_name": None}, "meshcore.peer": PeerCertificate([CLIENT])}
    status, _, body, env = wsgi_call(mw, "/x?y=1", **tls)
    assert status == "200 OK" and json.loads(body)["meshcore.principal"] == CLIENT
    assert wsgi_call(mw, HTTP_X_USER="mallory", **tls)[:3:2] == ("403 Forbidden", b"RBAC: access denied")
    # "/a%2Fb" as a WSGI server decodes it into PATH_INFO: RBAC sees the decoded /a/b
    assert wsgi_call(mw, "/a/b", **tls)[0] == "403 Forbidden"
    # with the raw target (gunicorn's RAW_URI) RBAC sees what Envoy would: /a%2Fb
    assert wsgi_call(mw, "/a/b", **tls, RAW_URI="/a%2Fb")[0] == "200 OK"
    # TLS only as the server says so: url_scheme https and the peer alone are not TLS
    assert wsgi_call(mw, **{"wsgi.url_scheme": "https", "meshcore.peer": PeerCertificate([CLIENT])})[0] \
        == "403 Forbidden"
    stats = mw.stats.snapshot()
    assert stats["http.inbound.downstream_rq_2xx"] == 2 and stats["http.inbound.downstream_rq_4xx"] == 3


def test_wsgi_late_start_response_is_counted() -> None:
    def late(environ: Dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [])
        yield b"ok"

    mw = MeshWsgiMiddleware(late, rbac=engine(allow([{"any": True}])))
    assert wsgi_call(mw)[:3:2] == ("201 Created", b"ok")
    assert mw.stats["http.inbound.downstream_rq_2xx"] == 1


# -- xDS: A36 states, routes, per-route RBAC ----------------------------------------------------------


@pytest.fixture
def cp(plane: ControlPlane) -> ControlPlane:
    plane.set_resources([])
    return plane


@pytest.fixture
def mesh(cp: ControlPlane, pki: Pki) -> Iterator[meshcore.Mesh]:
    with meshcore.Mesh(bootstrap(cp.port, pki.paths("server").dir), resource_timeout=0.3) as m:
        yield m


def test_not_serving_then_serving(cp: ControlPlane, mesh: meshcore.Mesh) -> None:
    lst = mesh.serve(18080)
    mw = MeshAsgiMiddleware(asgi_echo, mesh, listener=lst)
    status, headers, body, _ = call(mw, scope(peer=PeerCertificate([spiffe_id("sidecar")])))
    assert status == 503 and headers["connection"] == "close" and b"not serving" in body
    assert call(mw, scope(version="2", peer=PeerCertificate([CLIENT])))[1].get("connection") is None  # no h2 close
    assert mw.stats["listener.0.0.0.0_18080.not_serving"] == 2
    cp.update([listener(18080, authorization(allow=[CLIENT_SA]))])
    assert lst.wait_serving(5)
    status, _, body, _ = call(mw, scope(peer=PeerCertificate([CLIENT])))
    assert status == 200 and json.loads(body)["chain"] == "inbound-mtls"
    assert call(mw, scope())[0] == 503  # plaintext on the mTLS chain
    assert call(mw, scope(tls=True))[0] == 503  # TLS without a client certificate on the mTLS chain
    assert mw.stats["listener.0.0.0.0_18080.no_filter_chain_match"] == 2


def test_routes_and_per_route_rbac(cp: ControlPlane, mesh: meshcore.Mesh) -> None:
    """A route configuration (as in the gRPC shape, inline): a request with no route is RBAC'd,
    then 404; ``RBACPerRoute`` without ``rbac`` turns the ALLOW filter off on /public; a route
    that forwards to a cluster is not served by a gRPC-shape server."""
    open_route = rc.Route(match=rc.RouteMatch(prefix="/public"))
    open_route.non_forwarding_action.SetInParent()
    open_route.typed_per_filter_config["envoy.filters.http.rbac"].Pack(rbac_pb2.RBACPerRoute())
    fwd = rc.Route(match=rc.RouteMatch(prefix="/fwd"), route=rc.RouteAction(cluster="somewhere"))
    rest = rc.Route(match=rc.RouteMatch(prefix="/"))
    rest.non_forwarding_action.SetInParent()
    config = route_pb2.RouteConfiguration(name="inbound", virtual_hosts=[
        rc.VirtualHost(name="vh", domains=["server.default.svc.cluster.local:8080"], routes=[open_route, fwd, rest])])
    lis = inbound_listener(18081, allow={"allow-client": {"permissions": [{"any": True}], "principals": [
        {"authenticated": {"principal_name": {"exact": CLIENT}}}]}})
    h = hcm(allow={"allow-client": {"permissions": [{"any": True}], "principals": [
        {"authenticated": {"principal_name": {"exact": CLIENT}}}]}}, route_config=config)
    lis.filter_chains[0].filters[0].typed_config.CopyFrom(pack(h))
    cp.update([lis])
    lst = mesh.serve(18081)
    assert lst.wait_serving(5), lst.error
    mw = MeshAsgiMiddleware(asgi_echo, mesh, listener=lst)
    other, client = PeerCertificate([OTHER]), PeerCertificate([CLIENT])
    assert call(mw, scope("/x", peer=client))[0] == 200
    assert call(mw, scope("/x", peer=other))[0] == 403
    assert call(mw, scope("/public/a", peer=other))[0] == 200  # RBAC off on this route
    assert call(mw, scope("/fwd", peer=client))[0] == 503  # not a non_forwarding route
    s = scope("/x", peer=other)
    s["headers"] = [(b"host", b"elsewhere:8080")]
    assert call(mw, s)[0] == 403  # RBAC first, as Envoy's filter runs before the router
    s = scope("/x", peer=client)
    s["headers"] = [(b"host", b"elsewhere:8080")]
    assert call(mw, s)[:3:2] == (404, b"")


def test_envoy_shape_virtual_inbound_selects_the_http_chain_and_normalizes(tmp_path: Any, pki: Pki) -> None:
    """A sidecar's virtualInbound (istiod's sidecar generator, STRICT): a TLS request selects the
    HTTP chain (as for Istio's ALPN), its trust-domain SAN matchers apply, plaintext is refused,
    and ``normalize_path`` gives the app (and RBAC) the canonical path."""
    from google.protobuf import json_format

    desc = {"services": [{"name": "server", "namespace": "default", "vip": "10.96.0.5",
                          "ports": [{"port": 80, "name": "http", "protocol": "http", "target_port": 8080}],
                          "endpoints": [{"ip": "10.0.0.9", "labels": {"app": "server"}}]}],
            "proxy": {"ip": "10.0.0.9", "labels": {"app": "server"}}, "mesh": {"mtls_mode": "STRICT"}}
    res = istio_sidecar.build(desc)
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

    for lis in res["listeners"]:  # Istio's inbound SAN check: the mesh trust domain (security.md §3.2)
        for fc in lis.filter_chains if lis.name == "virtualInbound" else ():
            if fc.transport_socket.name == "envoy.transport_sockets.tls":
                ctx = tls_pb2.DownstreamTlsContext()
                fc.transport_socket.typed_config.Unpack(ctx)
                ctx.common_tls_context.combined_validation_context.default_validation_context \
                    .match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.URI).matcher \
                    .prefix = "spiffe://cluster.local/"
                fc.transport_socket.typed_config.Pack(ctx)
    msgs = res["listeners"] + res["routes"] + res["clusters"] + res["endpoints"]
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"resources": [json_format.MessageToDict(pack(m)) for m in msgs]}))
    with meshcore.Mesh.from_file(str(path), xds_shape="envoy") as m:
        mw = MeshAsgiMiddleware(asgi_echo, m, listener=8080)
        status, _, body, _ = call(mw, scope("/a/./b/../c%2e%2e/x", peer=PeerCertificate([CLIENT])))
        seen = json.loads(body)
        assert status == 200 and seen["chain"] == "0.0.0.0_8080" and seen["path"] == "/a/c../x"
        assert call(mw, scope(peer=PeerCertificate([spiffe_id("client", td="other.domain")])))[0] == 503
        assert call(mw, scope())[0] == 503  # STRICT: no plaintext chain


# -- grpcio (real servers, real clients) ----------------------------------------------------------------


def _grpc_policy() -> RbacEngine:
    return engine(deny([{"or_rules": {"rules": [
        {"url_path": {"path": {"exact": f"/{SERVICE}/Stream"}}},
        header_is("token-bin", base64.b64encode(b"\x00\xffbad").decode().rstrip("=")),
        {"header": {"name": ":authority", "string_match": {"exact": "blocked.example"}}},
    ]}}]), allow([{"any": True}]))


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_grpc_local_policy_plaintext(aio: bool) -> None:
    cls = AsyncMeshServerInterceptor if aio else MeshServerInterceptor
    run = run_grpc_aio if aio else run_grpc
    with run(lambda p: cls(rbac=_grpc_policy(), destination=("127.0.0.1", p)), None) as (port, interceptor):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = json.loads(ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5))
            assert got["principal"] is None and got["policy"] == "allow" and got["same"]
            for call_it in (lambda: list(ch.unary_stream(f"/{SERVICE}/Stream")(b"x", timeout=5)),
                            lambda: ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5,
                                                                     metadata=[("token-bin", b"\x00\xffbad")])):
                with pytest.raises(grpc.RpcError) as e:
                    call_it()
                assert (e.value.code(), e.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")
            assert ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5, metadata=[("token-bin", b"ok")])
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "blocked.example")]) as ch:
            if aio:  # grpc.aio exposes no :authority: hosts rules cannot match there
                assert ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5)
            else:
                with pytest.raises(grpc.RpcError) as e:
                    ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stats = interceptor.stats.snapshot()
    assert stats["http.inbound.downstream_rq_2xx"] == stats["http.inbound.downstream_rq_total"] >= 5
    assert stats["http.inbound.rbac.denied"] >= 2


def test_grpc_mtls_identity_from_the_auth_context(pki: Pki) -> None:
    """grpcio's own TLS (ServerTls credentials): the interceptor reads the client certificate
    from the auth context; a direct client with the client identity is allowed, another denied."""
    from meshcore.tls import FileCertificateSource

    paths = pki.paths("server_with_dns")  # grpcio clients verify a DNS SAN (test-only certificate)
    tls = ServerTls(FileCertificateSource(paths.chain, paths.key, paths.roots))

    def creds(name: str) -> Any:
        p = pki.paths(name)
        return grpc.ssl_channel_credentials(open(p.roots, "rb").read(), open(p.key, "rb").read(),
                                            open(p.chain, "rb").read())

    make = lambda p: MeshServerInterceptor(rbac=engine(CLIENT_ONLY))  # noqa: E731
    with run_grpc(make, tls.grpc_server_credentials()) as (port, _):
        with grpc.secure_channel(f"localhost:{port}", creds("client")) as ch:
            assert json.loads(ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5))["principal"] == CLIENT
        with grpc.secure_channel(f"localhost:{port}", creds("other_sa")) as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_aio_denies_when_a_deny_rule_needs_the_authority(cp: ControlPlane, mesh: meshcore.Mesh) -> None:
    """Istio DENY ``to.operation.hosts`` from xDS: sync grpcio reads the call's authority; grpc.aio
    does not expose it, so such a chain denies there rather than let a DENY go unapplied."""
    policies = [{"name": "deny-host", "namespace": "default", "action": "DENY",
                 "rules": [{"to": [{"operation": {"hosts": ["blocked.example"]}}]}]},
                {"name": "allow-all", "namespace": "default", "action": "ALLOW", "rules": [{}]}]

    def served(cls: Any) -> Any:
        def make(port: int) -> Any:
            cp.update([listener(port, policies, mode="PERMISSIVE")])
            lst = mesh.serve(port)
            assert lst.wait_serving(5), lst.error
            return cls(lst)
        return make

    def say(port: int, authority: str) -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority)]) as ch:
            return ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5)

    with run_grpc(served(MeshServerInterceptor), None) as (sync, _), \
            run_grpc_aio(served(AsyncMeshServerInterceptor), None) as (aio, _):
        ports = {"sync": sync, "aio": aio}
        assert json.loads(say(ports["sync"], "ok.example"))["policy"] == "ns[default]-policy[allow-all]-rule[0]"
        for port, authority in ((ports["sync"], "blocked.example"), (ports["aio"], "ok.example")):
            with pytest.raises(grpc.RpcError) as e:
                say(port, authority)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
