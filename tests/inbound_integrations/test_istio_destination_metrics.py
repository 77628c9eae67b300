"""Istio's standard metrics on the server side (``reporter="destination"``), as a server sidecar's
``istio.stats`` reports them: real servers on loopback (uvicorn + MeshAsgiMiddleware with mTLS and
plaintext on one port, the stdlib WSGI server + MeshWsgiMiddleware, grpcio + MeshServerInterceptor)
and real clients sending the caller's Istio peer metadata (the headers meshcore's own metadata
exchange sends: ``peer_metadata.local_exchange``), with and without a client certificate."""

from __future__ import annotations

import json
import ssl
import threading
from typing import Any, Dict, Iterator, List

import grpc
import httpx
import pytest

import meshcore
from meshcore.integrations.asgi import MeshAsgiMiddleware
from meshcore.integrations.grpc_server import MeshServerInterceptor
from meshcore.integrations.wsgi import MeshWsgiMiddleware
from meshcore.telemetry.istio_metrics import LABELS
from meshcore.telemetry.peer_metadata import local_exchange
from meshcore.tls import FileCertificateSource, ServerTls
from meshcore.tls.server import make_wsgi_server
from tls.pki import NAMESPACE, Pki, spiffe_id

from .servers import LOOPBACK, SERVICE, bound_socket, run_grpc, run_uvicorn
from .test_integrations_local import allow, engine

ALLOW_ALL = allow([{"any": True}])

SERVER_NODE = {"WORKLOAD_NAME": "reviews-v1", "NAMESPACE": "shop", "CLUSTER_ID": "Kubernetes",
               "LABELS": {"app": "reviews", "version": "v1", "service.istio.io/canonical-name": "reviews",
                          "service.istio.io/canonical-revision": "v1"}}
CLIENT_NODE = {"WORKLOAD_NAME": "productpage-v1", "NAMESPACE": NAMESPACE, "CLUSTER_ID": "Kubernetes",
               "LABELS": {"app": "productpage", "version": "v2", "service.istio.io/canonical-name": "productpage",
                          "service.istio.io/canonical-revision": "v2"}}
HOST = "reviews.shop.svc.cluster.local:9080"


@pytest.fixture
def server_mesh(tmp_path: Any) -> Iterator[meshcore.Mesh]:
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"listeners": [], "routes": [], "clusters": [], "endpoints": []}))
    m = meshcore.Mesh.from_file(str(path), watch=False)
    sink = m.telemetry.enable_istio_metrics(node_metadata=SERVER_NODE)
    m.sink = sink  # type: ignore[attr-defined]
    yield m
    m.close()


def _exchange_headers() -> Dict[str, str]:
    return dict(local_exchange(None, CLIENT_NODE).headers)


def _series(sink: Any) -> List[Dict[str, Any]]:
    return [dict(s["labels"], requests=s["requests"], request_bytes=s["request_bytes"]["sum"],
                 response_bytes=s["response_bytes"]["sum"]) for s in sink.snapshot()]


def _client_ctx(pki: Pki, name: str = "client") -> ssl.SSLContext:
    p = pki.paths(name)
    ctx = ssl.create_default_context(cafile=p.roots)
    ctx.check_hostname = False  # the server's certificate names its SPIFFE ID only
    ctx.load_cert_chain(p.chain, p.key)
    return ctx


def _check_source(s: Dict[str, Any]) -> None:
    assert (s["source_workload"], s["source_workload_namespace"], s["source_app"], s["source_version"],
            s["source_canonical_service"], s["source_canonical_revision"], s["source_cluster"]) == (
        "productpage-v1", NAMESPACE, "productpage", "v2", "productpage", "v2", "Kubernetes")


def _check_destination(s: Dict[str, Any]) -> None:
    assert (s["reporter"], s["destination_workload"], s["destination_workload_namespace"], s["destination_app"],
            s["destination_version"], s["destination_canonical_service"], s["destination_canonical_revision"],
            s["destination_cluster"]) == ("destination", "reviews-v1", "shop", "reviews", "v1", "reviews", "v1",
                                          "Kubernetes")
    assert (s["destination_service"], s["destination_service_name"], s["destination_service_namespace"]) == (
        "reviews.shop.svc.cluster.local", "reviews", "shop")


async def asgi_headers(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the request's header names (JSON), with its own x-envoy-peer-metadata (replaced)."""
    while (await receive()).get("more_body"):
        pass
    body = json.dumps(sorted(k.decode() for k, _ in scope["headers"])).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-envoy-peer-metadata", b"app's own")]})
    await send({"type": "http.response.body", "body": body})


def _answered_peer(resp: Any) -> Any:
    from meshcore.telemetry.peer_metadata import decode

    values = resp.headers.get_list("x-envoy-peer-metadata")
    assert len(values) <= 1
    return decode(values[0])["WORKLOAD_NAME"] if values else None


def test_asgi_uvicorn_mtls_and_plaintext(server_mesh: Any, pki: Pki) -> None:
    p = pki.paths("server")
    tls = ServerTls(FileCertificateSource(p.chain, p.key, p.roots), require_client_certificate=False)
    app = MeshAsgiMiddleware(asgi_headers, rbac=engine(ALLOW_ALL), mesh=server_mesh)
    with run_uvicorn(bound_socket(), app, tls, permissive=True) as port:
        headers = dict(_exchange_headers(), host=HOST)
        with httpx.Client(verify=_client_ctx(pki)) as c:
            for _ in range(2):
                r = c.post(f"https://{LOOPBACK}:{port}/reviews/1", headers=headers, content=b"12345")
                assert r.status_code == 200
                # the app never sees the exchange pair; the caller gets this workload's (a server sidecar's answer)
                assert not [h for h in r.json() if h.startswith("x-envoy-peer")]
                assert _answered_peer(r) == "reviews-v1"
        with httpx.Client() as c:
            assert c.get(f"http://{LOOPBACK}:{port}/reviews/2", headers=headers).status_code == 200
            anon = c.get(f"http://{LOOPBACK}:{port}/anon", headers={"host": HOST})
            assert anon.status_code == 200 and anon.headers["x-envoy-peer-metadata"] == "app's own"  # not asked
    series = {(s["connection_security_policy"], s["source_workload"]): s for s in _series(server_mesh.sink)}
    assert set(series) == {("mutual_tls", "productpage-v1"), ("none", "productpage-v1"), ("none", "unknown")}
    mtls = series[("mutual_tls", "productpage-v1")]
    _check_source(mtls)
    _check_destination(mtls)
    assert mtls["source_principal"] == spiffe_id("client") and mtls["requests"] == 2
    assert mtls["request_bytes"] == 10 and mtls["response_bytes"] > 0
    assert (mtls["request_protocol"], mtls["response_code"], mtls["response_flags"], mtls["grpc_response_status"]) \
        == ("http", "200", "-", "")
    plain = series[("none", "productpage-v1")]
    _check_source(plain)
    _check_destination(plain)
    assert plain["source_principal"] == "unknown" and plain["destination_principal"] == "unknown"
    anon = series[("none", "unknown")]
    assert anon["source_workload_namespace"] == "unknown" and anon["source_canonical_revision"] == "latest"
    _check_destination(anon)
    assert list(server_mesh.sink.snapshot()[0]["labels"]) == list(LABELS)


def test_wsgi_plaintext(server_mesh: Any, pki: Pki) -> None:
    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        assert "HTTP_X_ENVOY_PEER_METADATA" not in environ and "HTTP_X_ENVOY_PEER_METADATA_ID" not in environ
        start_response("201 Created", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    p = pki.paths("server")
    tls = ServerTls(FileCertificateSource(p.chain, p.key, p.roots), require_client_certificate=False)
    mw = MeshWsgiMiddleware(app, rbac=engine(ALLOW_ALL), mesh=server_mesh)
    server = make_wsgi_server(mw, tls, LOOPBACK, 0, permissive=True, handshake_timeout=5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with httpx.Client() as c:
            r = c.get(f"http://{LOOPBACK}:{port}/w", headers=dict(_exchange_headers(), host=HOST))
            assert r.status_code == 201 and _answered_peer(r) == "reviews-v1"
        with httpx.Client(verify=_client_ctx(pki, "other_sa")) as c:
            r = c.get(f"https://{LOOPBACK}:{port}/w", headers={"host": HOST})
            assert r.status_code == 201 and _answered_peer(r) is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    series = {s["connection_security_policy"]: s for s in _series(server_mesh.sink)}
    plain = series["none"]
    _check_source(plain)
    _check_destination(plain)
    assert plain["response_code"] == "201" and plain["response_bytes"] == 2
    mtls = series["mutual_tls"]  # no peer metadata: the namespace from the certificate's SPIFFE ID
    other = pki.other_sa.spiffe_id
    assert mtls["source_principal"] == other and mtls["source_workload"] == "unknown"
    assert mtls["source_workload_namespace"] == other.split("/ns/")[1].split("/")[0]


def test_grpc_server_mtls(server_mesh: Any, pki: Pki) -> None:
    """grpcio's core parses ``x-envoy-peer-metadata`` itself (its CSM metadata exchange) and never
    shows it to interceptors: a gRPC server's ``source_*`` come from the client certificate only
    (principal, and the namespace of its SPIFFE ID), the rest ``unknown``, as a sidecar reports a
    caller that sent no metadata."""
    paths = pki.paths("server_with_dns")  # grpcio clients verify a DNS SAN (test-only certificate)
    tls = ServerTls(FileCertificateSource(paths.chain, paths.key, paths.roots))
    c = pki.paths("client")
    creds = grpc.ssl_channel_credentials(open(c.roots, "rb").read(), open(c.key, "rb").read(),
                                         open(c.chain, "rb").read())
    make = lambda port: MeshServerInterceptor(rbac=engine(ALLOW_ALL), mesh=server_mesh)  # noqa: E731
    with run_grpc(make, tls.grpc_server_credentials()) as (port, _):
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            for _ in range(3):
                assert ch.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5,
                                                          metadata=list(_exchange_headers().items()))
    (ok,) = _series(server_mesh.sink)
    assert ok["grpc_response_status"] == "0"
    assert ok["requests"] == 3
    assert (ok["source_principal"], ok["source_workload_namespace"], ok["source_workload"]) == (
        spiffe_id("client"), NAMESPACE, "unknown")
    assert (ok["request_protocol"], ok["response_code"], ok["connection_security_policy"]) == (
        "grpc", "200", "mutual_tls")
    assert ok["destination_workload"] == "reviews-v1" and ok["destination_app"] == "reviews"
