"""httpx / httpx2 (sync and async) through meshcore to an app behind a real Envoy configured as an
Istio STRICT sidecar inbound (``sidecar`` fixture: RBAC allows only the ``client`` SPIFFE ID).

The mesh is ``Mesh.from_file`` with clusters in the Istio-sidecar shape (``httpx_mesh``:
``transport_socket_matches`` with SDS ``default``/``ROOTCA``) and the workload certificates of one
of the ``pki`` identities. The app keeps ``http://`` URLs; meshcore's transport applies mTLS
underneath. Nothing here mocks TLS.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from typing import Any, Dict, List

import pytest

import meshcore
from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport
from meshcore.tls import FileCertificateSource, TlsHandshakeError

from .httpx_mesh import (SIDECAR_SNI, TARGET, assignment, fingerprint, plain_cluster, resources,
                         route, tls_cluster, xfcc_hash)
from .pki import spiffe_id, write_istio_dir, write_key_only
from .sidecar import HTTP_CHAIN

pytestmark = pytest.mark.envoy

CLIENT_ID = spiffe_id("client")
SIDECAR_ID = spiffe_id("sidecar")
URL = f"http://{TARGET}"
AUTO_SNI = "echo-0.echo.default.svc.cluster.local"
MOUNT = "all://*.svc.cluster.local"


KINDS = [("httpx", False), ("httpx", True), ("httpx2", False), ("httpx2", True)]
KIND_IDS = ["httpx-sync", "httpx-async", "httpx2-sync", "httpx2-async"]


def _lib(name: str) -> Any:
    return importlib.import_module(name)  # the test extras install httpx, httpx2 and h2


class Driver:
    """One client of a kind (library, sync/async) with a mounted mesh transport; ``get(path)``
    returns the response or raises. An async client keeps its own event loop (its connections
    live on it)."""

    def __init__(self, lib_name: str, is_async: bool, mesh: Any, **transport_kw: Any) -> None:
        self.lib = _lib(lib_name)
        self.is_async = is_async
        if is_async:
            self.loop = asyncio.new_event_loop()
            self.transport: Any = AsyncMeshTransport(mesh, **transport_kw)
            self.client = self.lib.AsyncClient(mounts={MOUNT: self.transport})
        else:
            self.transport = MeshTransport(mesh, **transport_kw)
            self.client = self.lib.Client(mounts={MOUNT: self.transport})

    def get(self, path: str = "/", url: str = URL) -> Any:
        if self.is_async:
            return self.loop.run_until_complete(self.client.get(url + path))
        return self.client.get(url + path)

    def error(self, path: str = "/", url: str = URL) -> BaseException:
        with pytest.raises(Exception) as info:
            self.get(path, url)
        return info.value

    def close(self) -> None:
        if self.is_async:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()
        else:
            self.client.close()


@pytest.fixture
def drivers():
    made: List[Driver] = []

    def make(lib_name: str, is_async: bool, mesh: Any, **kw: Any) -> Driver:
        d = Driver(lib_name, is_async, mesh, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="module")
def mesh_resources(sidecar):
    """Clusters: ``echo`` (mTLS to the sidecar, expects its SPIFFE ID), ``plain`` (no TLS, the app
    directly), ``unlabelled`` (the auto-mTLS cluster shape, an endpoint without ``tlsMode``:
    raw_buffer), ``wrongsan`` (expects the ``server`` ID), ``tls12`` (TLS 1.2 at most),
    ``retry`` (first endpoint: the plaintext app labelled for mTLS, so TLS to it fails; then the
    sidecar), ``autosni`` (``auto_host_sni``: the endpoint's hostname as SNI), routed by path prefix."""
    app, sc = sidecar.app.port, sidecar.port
    clusters = [tls_cluster("echo", [SIDECAR_ID]), plain_cluster("plain"), tls_cluster("unlabelled", [SIDECAR_ID]),
                tls_cluster("wrongsan", [spiffe_id("server")]), tls_cluster("tls12", [SIDECAR_ID], max_version="TLSv1_2"),
                tls_cluster("retry", [SIDECAR_ID]), tls_cluster("autosni", [SIDECAR_ID], auto_host_sni=True),
                {"name": "agg", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED",  # aggregate over echo
                 "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
                     "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                     "clusters": ["echo"]}}}]
    endpoints = [assignment("echo", [(sc, True)]), assignment("plain", [(app, False)]),
                 assignment("unlabelled", [(app, False)]), assignment("wrongsan", [(sc, True)]),
                 assignment("tls12", [(sc, True)]), assignment("retry", [(app, True), (sc, True)]),
                 assignment("autosni", [(sc, True)], hostname=AUTO_SNI)]
    routes = [route("/plain", "plain"), route("/unlabelled", "unlabelled"), route("/wrongsan", "wrongsan"),
              route("/tls12", "tls12"), route("/autosni", "autosni"), route("/agg", "agg"),
              route("/retry", "retry", retry_policy={"retry_on": "connect-failure", "num_retries": 2}),
              route("/", "echo")]
    return resources(clusters, endpoints, routes)


@pytest.fixture(scope="module")
def mesh_factory(mesh_resources, pki, tmp_path_factory):
    """``make(certificates) -> Mesh`` over :func:`mesh_resources` (``certificates``: a pki
    identity name, a directory or a FileCertificateSource); one per identity name, module-wide."""
    d = tmp_path_factory.mktemp("httpx-mtls")
    path = d / "mesh.json"
    path.write_text(json.dumps(mesh_resources))
    meshes: Dict[Any, meshcore.Mesh] = {}
    extra: List[meshcore.Mesh] = []

    def make(certificates: Any) -> meshcore.Mesh:
        if isinstance(certificates, str) and certificates in pki.IDENTITIES:
            if certificates in meshes:
                return meshes[certificates]
            certs: Any = pki.paths(certificates).dir
        else:
            certs = certificates
        mesh = meshcore.Mesh.from_file(path, watch=False, seed=1, certificates=certs).start()
        mesh.wait_ready(TARGET, timeout=5)
        if isinstance(certificates, str) and certificates in pki.IDENTITIES:
            meshes[certificates] = mesh
        else:
            extra.append(mesh)
        return mesh

    yield make
    for m in list(meshes.values()) + extra:
        m.close()


def stat(mesh: Any, cluster: str, name: str) -> int:
    return int(mesh.stats().get(cluster, {}).get(name, 0))


def tls_error(exc: BaseException, lib: Any, cluster: str, port: int, *fragments: str) -> TlsHandshakeError:
    """``exc`` is the library's ConnectError over a TlsHandshakeError naming the cluster, the
    endpoint and the reason (``fragments``)."""
    assert isinstance(exc, lib.ConnectError), repr(exc)
    cause = exc.__cause__
    assert isinstance(cause, TlsHandshakeError), repr(cause)
    assert cause.kind == "connect-failure"
    msg = str(exc)
    assert f"cluster {cluster}" in msg and f"127.0.0.1:{port}" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert getattr(exc, "meshcore", {}).get("cluster") == cluster
    return cause


# -- it works ----------------------------------------------------------------------------------------


H2_PARAMS = [False, True]  # HTTP/2 needs h2 (in the test extras)


@pytest.mark.parametrize("http2", H2_PARAMS, ids=["h1", "h2"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_reaches_the_app_through_the_sidecar_http_chain(kind, http2, sidecar, mesh_factory, drivers):
    mesh = mesh_factory("client")
    d = drivers(*kind, mesh, http2=http2)
    before = stat(mesh, "echo", "ssl.handshake")
    seen = len(sidecar.app.requests)
    r1 = d.get("/hello")
    r2 = d.get("/again")
    for r in (r1, r2):
        assert r.status_code == 200, r.text
        assert r.headers["x-inbound-chain"] == HTTP_CHAIN  # Istio ALPN offered: HTTP filter chain, RBAC ran
        body = r.json()
        assert f"URI={CLIENT_ID}" in body["xfcc"]  # the app sees this workload's SPIFFE ID
        assert body["host"] == TARGET
        assert r.extensions["meshcore"]["cluster"] == "echo"
        assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")  # from the negotiated ALPN
    assert [q["path"] for q in sidecar.app.requests[seen:]] == ["/hello", "/again"]
    assert stat(mesh, "echo", "ssl.handshake") == before + 1  # the second request reused the connection
    log = sidecar.access_log_lines()
    assert f"{HTTP_CHAIN} 200 {CLIENT_ID} {SIDECAR_SNI}" in log  # SNI from the cluster


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_plaintext_clusters_through_the_same_client(kind, sidecar, mesh_factory, drivers):
    d = drivers(*kind, mesh_factory("client"))
    tls = d.get("/")
    plain = d.get("/plain")  # a cluster without TLS: the app directly, plaintext
    unlabelled = d.get("/unlabelled")  # auto-mTLS cluster, endpoint without tlsMode: raw_buffer
    assert tls.status_code == plain.status_code == unlabelled.status_code == 200
    assert tls.headers["x-inbound-chain"] == HTTP_CHAIN and tls.json()["xfcc"]
    for r in (plain, unlabelled):
        assert "x-inbound-chain" not in r.headers and r.json()["xfcc"] is None
    assert set(k[1] for k in d.transport._inner) == {"echo", "plain", "unlabelled"}


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_aggregate_cluster_uses_its_childs_tls_socket(kind, sidecar, mesh_factory, drivers):
    # the aggregate has no transport socket of its own: the child holding the endpoint decides
    mesh = mesh_factory("client")
    r = drivers(*kind, mesh).get("/agg")
    assert r.status_code == 200 and r.headers["x-inbound-chain"] == HTTP_CHAIN and r.json()["xfcc"]
    ep = mesh.pick(TARGET, "/agg").endpoint
    assert mesh.upstream_tls("agg", ep) is mesh.upstream_tls("echo", ep) is not None


@pytest.mark.parametrize("kind", KINDS[:2], ids=KIND_IDS[:2])
def test_auto_host_sni_sends_the_endpoint_hostname(kind, sidecar, mesh_factory, drivers):
    d = drivers(*kind, mesh_factory("client"))
    before = len(sidecar.access_log_lines())
    assert d.get("/autosni").status_code == 200
    # Envoy logs the request when its stream completes, which may come a moment after the response
    lines = sidecar.access_log_lines(min_lines=before + 1)
    assert f"{HTTP_CHAIN} 200 {CLIENT_ID} {AUTO_SNI}" in lines[before:]


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_san_mismatch_is_a_connect_error_before_any_byte(kind, sidecar, mesh_factory, drivers):
    mesh = mesh_factory("client")
    d = drivers(*kind, mesh)
    seen = len(sidecar.app.requests)
    fails = stat(mesh, "wrongsan", "ssl.fail_verify_san")
    exc = d.error("/wrongsan")
    tls_error(exc, d.lib, "wrongsan", sidecar.port, spiffe_id("server"), SIDECAR_ID, "match none of the expected")
    assert stat(mesh, "wrongsan", "ssl.fail_verify_san") == fails + 1
    assert stat(mesh, "wrongsan", "upstream_cx_connect_fail") >= 1  # classified as a connect failure
    assert len(sidecar.app.requests) == seen


@pytest.mark.parametrize("http2", H2_PARAMS, ids=["h1", "h2"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_foreign_ca_tls13_refusal_after_the_handshake_is_a_connect_error(kind, http2, sidecar, mesh_factory,
                                                                         drivers):
    """TLS 1.3: the sidecar refuses the evil-root client certificate after the client's handshake
    finished; the first read/write of the new connection fails: a connect failure."""
    mesh = mesh_factory("evil_client")
    d = drivers(*kind, mesh, http2=http2)
    seen = len(sidecar.app.requests)
    before = stat(mesh, "echo", "upstream_cx_connect_fail")
    exc = d.error("/")
    tls_error(exc, d.lib, "echo", sidecar.port, "right after the TLS handshake")
    assert stat(mesh, "echo", "upstream_cx_connect_fail") == before + 1
    assert len(sidecar.app.requests) == seen


@pytest.mark.parametrize("kind", KINDS[:2], ids=KIND_IDS[:2])
def test_foreign_ca_tls12_refusal_in_the_handshake(kind, sidecar, mesh_factory, drivers):
    mesh = mesh_factory("evil_client")
    d = drivers(*kind, mesh)
    before = stat(mesh, "tls12", "ssl.connection_error")
    exc = d.error("/tls12")
    tls_error(exc, d.lib, "tls12", sidecar.port, "TLS handshake failed", "UNKNOWN_CA")
    assert stat(mesh, "tls12", "ssl.connection_error") == before + 1


@pytest.mark.parametrize("kind", KINDS[:2], ids=KIND_IDS[:2])
def test_identity_the_rbac_does_not_allow_gets_403(kind, sidecar, mesh_factory, drivers):
    d = drivers(*kind, mesh_factory("other_sa"))
    r = d.get("/")
    assert r.status_code == 403 and "RBAC: access denied" in r.text
    assert r.headers["x-inbound-chain"] == HTTP_CHAIN


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_retry_on_connect_failure_retries_a_tls_failure_on_another_endpoint(kind, sidecar, mesh_factory, drivers):
    mesh = mesh_factory("client")
    d = drivers(*kind, mesh)
    fails = stat(mesh, "retry", "upstream_cx_connect_fail")
    errors = stat(mesh, "retry", "ssl.connection_error")
    for _ in range(2):  # round robin over (bad, good): one of the two requests starts on the bad one
        r = d.get("/retry")
        assert r.status_code == 200 and r.headers["x-inbound-chain"] == HTTP_CHAIN
    assert stat(mesh, "retry", "upstream_cx_connect_fail") > fails
    assert stat(mesh, "retry", "ssl.connection_error") > errors


def test_missing_certificates_never_plaintext(sidecar, mesh_factory, drivers, tmp_path):
    empty = tmp_path / "no-certs"
    empty.mkdir()
    mesh = mesh_factory(str(empty))
    d = drivers("httpx", False, mesh)
    seen = len(sidecar.app.requests)
    exc = d.error("/")
    assert isinstance(exc, d.lib.ConnectError) and isinstance(exc.__cause__, TlsHandshakeError)
    assert "not available" in str(exc) and "cluster echo" in str(exc)
    assert d.get("/plain").status_code == 200  # plaintext clusters are not affected
    assert len(sidecar.app.requests) == seen + 1


@pytest.mark.parametrize("kind", KINDS[:2], ids=KIND_IDS[:2])
def test_inner_factory_or_https_url_refused_for_tls_clusters(kind, sidecar, mesh_factory, drivers):
    mesh = mesh_factory("client")
    lib_name, is_async = kind
    lib = _lib(lib_name)
    factory = (lambda cluster: lib.AsyncHTTPTransport()) if is_async else (lambda cluster: lib.HTTPTransport())
    d = drivers(lib_name, is_async, mesh, inner_factory=factory)
    seen = len(sidecar.app.requests)
    exc = d.error("/")
    assert isinstance(exc, lib.UnsupportedProtocol), repr(exc)
    assert "cluster echo requires mesh TLS" in str(exc) and "inner_factory" in str(exc)
    assert d.get("/plain").status_code == 200  # the factory's transports still serve plaintext clusters
    d2 = drivers(lib_name, is_async, mesh)
    exc = d2.error("/", url=f"https://{TARGET}")
    assert isinstance(exc, lib.UnsupportedProtocol) and "use an http:// URL" in str(exc)
    assert len(sidecar.app.requests) == seen + 1


# -- rotation ----------------------------------------------------------------------------------------


def test_rotation_under_load_loses_nothing_and_new_connections_use_the_new_certificate(
        sidecar, pki, mesh_factory, drivers, tmp_path):
    """Two threads send back to back on fresh connections (no keep-alive: a handshake per request)
    while the workload certificate is rotated the way Istio's agent writes it (key, then chain,
    then roots, each atomically; the key alone first: a transient mismatched pair); a client with
    a kept-alive connection made before the rotation keeps using it."""
    httpx = _lib("httpx")
    certs = tmp_path / "certs"
    write_istio_dir(certs, pki.client)
    source = FileCertificateSource.from_directory(str(certs), refresh_interval=0.05)
    mesh = mesh_factory(source)
    old, new = fingerprint(pki.client), fingerprint(new_leaf := pki.root.issue(CLIENT_ID))

    kept = drivers("httpx", False, mesh)
    assert xfcc_hash(kept.get("/").json()["xfcc"]) == old

    stop = threading.Event()
    results: List[Any] = []
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(mounts={MOUNT: MeshTransport(mesh, limits=httpx.Limits(max_keepalive_connections=0))}) as c:
            while not stop.is_set():
                try:
                    r = c.get(URL + "/load")
                    item: Any = (r.status_code, xfcc_hash(r.json()["xfcc"]))
                except Exception as e:  # noqa: BLE001  (recorded: the test fails on any)
                    item = e
                with lock:
                    results.append(item)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        write_key_only(certs, new_leaf)  # new key + old chain on disk: the old pair stays in use
        time.sleep(0.3)
        write_istio_dir(certs, new_leaf)  # key (unchanged now), chain, roots (unchanged)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with lock:
                if sum(1 for x in results[-10:] if isinstance(x, tuple) and x[1] == new) >= 10:
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    errors = [x for x in results if not isinstance(x, tuple)]
    assert not errors, errors[:3]
    assert all(status == 200 for status, _ in results)
    hashes = [h for _, h in results]
    assert hashes[0] == old and hashes[-1] == new, (hashes[:3], hashes[-3:])
    assert set(hashes) == {old, new}
    assert len(results) > 20
    assert xfcc_hash(kept.get("/").json()["xfcc"]) == old  # its connection was made before the rotation
