"""mTLS through the requests integration (``MeshAdapter``) against a real Envoy configured as an
Istio STRICT sidecar inbound (``tests/tls/sidecar.py``), plus small stdlib TLS servers on loopback
for the failure shapes Envoy is not needed for (a peer with another SPIFFE ID, a TLS 1.3 server
refusing the client certificate after the handshake, a server that never answers the handshake,
a keep-alive connection dropped later).

The app keeps ``http://`` URLs; the cluster is Istio's sidecar shape: ``transport_socket_matches``
``tlsMode-istio`` (UpstreamTlsContext, SDS ``default`` / ``ROOTCA``, ALPN ``istio-peer-exchange,
istio``, SNI ``outbound_...``, the sidecar's SPIFFE ID as SAN) and ``tlsMode-disabled``
(raw_buffer), endpoints labelled ``tlsMode: istio``; certificates from ``Mesh(certificates=<dir>)``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from typing import Any, Dict, Iterable, List, Optional

import pytest
import requests
from cryptography.hazmat.primitives import serialization

import meshcore
from meshcore.integrations.requests import MeshAdapter, _classify
from meshcore.tls import FileCertificateSource, TlsHandshakeError

from .pki import server_context, spiffe_id, write_istio_dir
from .sidecar import HTTP_CHAIN

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

HOST = "reviews.default.svc.cluster.local"
TARGET = f"{HOST}:9080"
URL = f"http://{TARGET}"
SNI = f"outbound_.9080_._.{HOST}"
CLIENT_ID = spiffe_id("client")
SIDECAR_ID = spiffe_id("sidecar")

TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


# -- resources (Istio's sidecar shapes) -------------------------------------------------------------


def _sds(name: str) -> Dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def istio_tls(san: str = SIDECAR_ID) -> Dict[str, Any]:
    """The ``tlsMode-istio`` transport socket an Istio sidecar's outbound cluster carries."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS_TYPE, "sni": SNI,
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [_sds("default")],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": san}]},
                "validation_context_sds_secret_config": _sds("ROOTCA")}}}}


def cluster(name: str, *, tls: bool = True, san: str = SIDECAR_ID, **extra: Any) -> Dict[str, Any]:
    c: Dict[str, Any] = {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                         "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN", **extra}
    if tls:
        c["transport_socket_matches"] = [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": istio_tls(san)},
            {"name": "tlsMode-disabled", "match": {},
             "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_TYPE}}}]
    return c


def endpoints(name: str, ports: Iterable[int], *, istio: bool = True) -> Dict[str, Any]:
    md = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}} if istio else None
    eps = []
    for p in ports:
        e: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        if md:
            e["metadata"] = md
        eps.append(e)
    return {"cluster_name": name, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": eps}]}


def resources(clusters: List[Dict[str, Any]], eps: List[Dict[str, Any]],
              routes: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "reviews", "domains": [HOST, TARGET],
                                                          "routes": routes}]}],
        "clusters": clusters,
        "endpoints": eps,
    }


def route(prefix: str, cluster_name: str, **action: Any) -> Dict[str, Any]:
    return {"name": prefix, "match": {"prefix": prefix}, "route": {"cluster": cluster_name, **action}}


@pytest.fixture
def make_mesh(tmp_path):
    meshes: List[meshcore.Mesh] = []

    def make(res: Dict[str, Any], certificates: Any) -> meshcore.Mesh:
        path = tmp_path / f"mesh{len(meshes)}.json"
        path.write_text(json.dumps(res))
        mesh = meshcore.Mesh.from_file(path, watch=False, seed=1, certificates=certificates)
        meshes.append(mesh)
        mesh.start()
        mesh.wait_ready(TARGET, timeout=5)
        return mesh

    yield make
    for m in meshes:
        m.close()


def session(mesh: meshcore.Mesh) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.mount(URL, MeshAdapter(mesh))
    return s


def stat(mesh: meshcore.Mesh, cluster_name: str, name: str) -> int:
    return int(mesh.stats().get(cluster_name, {}).get(name, 0))


def xfcc_hash(xfcc: str) -> Dict[str, str]:
    """The first element of an XFCC header as a dict (By, Hash, Subject, URI)."""
    out = {}
    for part in xfcc.split(",")[0].split(";"):
        k, _, v = part.partition("=")
        out[k] = v.strip('"')
    return out


def cert_hash(leaf: Any) -> str:
    """Envoy's XFCC ``Hash``: SHA-256 of the client certificate's DER, hex."""
    return hashlib.sha256(leaf.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- small TLS servers on loopback --------------------------------------------------------------------


class TlsHttpServer:
    """HTTP/1.1 keep-alive over TLS with ``ctx`` (stdlib). Answers ``200 ok:<port>``; with
    ``drop_at=n`` the n-th request of a connection is read and the connection closed unanswered.
    ``requests`` counts the requests read, ``handshakes`` the completed server handshakes."""

    def __init__(self, ctx: ssl.SSLContext, drop_at: Optional[int] = None) -> None:
        self.ctx, self.drop_at = ctx, drop_at
        self.requests = 0
        self.handshakes = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(raw)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(5)
            tls = self.ctx.wrap_socket(raw, server_side=True)
            self.handshakes += 1
            n, buf = 0, b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = tls.recv(65536)
                    if not data:
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")
                n += 1
                self.requests += 1
                if self.drop_at is not None and n >= self.drop_at:
                    return
                body = f"ok:{self.port}".encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def tls_servers():
    made: List[Any] = []

    def make(ctx: ssl.SSLContext, **kw: Any) -> TlsHttpServer:
        s = TlsHttpServer(ctx, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- the happy path, reuse, plaintext alongside -----------------------------------------------------------


def test_mtls_through_the_sidecar_reaches_the_app_with_the_workload_identity(sidecar, pki, make_mesh):
    res = resources([cluster("reviews"), cluster("plain", tls=False)],
                    [endpoints("reviews", [sidecar.port]), endpoints("plain", [sidecar.app_port], istio=False)],
                    [route("/plain/", "plain"), route("/", "reviews")])
    mesh = make_mesh(res, pki.paths("client").dir)
    s = session(mesh)
    before = len(sidecar.app.requests)
    r = s.get(f"{URL}/reviews/1", headers={"x-test": "1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-inbound-chain"] == HTTP_CHAIN  # the Istio ALPN chose the HTTP filter chain
    seen = r.json()
    assert seen["path"] == "/reviews/1" and seen["host"] == TARGET and seen["headers"]["x-test"] == "1"
    xfcc = xfcc_hash(seen["xfcc"])
    assert xfcc["URI"] == CLIENT_ID and xfcc["By"] == SIDECAR_ID
    assert xfcc["Hash"] == cert_hash(pki.client)
    assert r.meshcore["cluster"] == "reviews" and r.meshcore["endpoint"] == f"127.0.0.1:{sidecar.port}"
    # the connection is reused: two more requests (one with a body), no new handshake
    assert s.post(f"{URL}/reviews/2", data=b"x" * 1000).status_code == 200
    assert s.get(f"{URL}/reviews/3").status_code == 200
    assert stat(mesh, "reviews", "ssl.handshake") == 1
    assert stat(mesh, "reviews", "upstream_rq_200") == 3
    # a plaintext cluster through the same client: straight to the app, no TLS, no XFCC
    r = s.get(f"{URL}/plain/x")
    assert r.status_code == 200 and r.json()["xfcc"] is None and "x-inbound-chain" not in r.headers
    assert len(sidecar.app.requests) == before + 4
    lines = sidecar.access_log_lines(min_lines=3)
    assert sum(1 for ln in lines if ln.startswith(f"{HTTP_CHAIN} 200 {CLIENT_ID}")) >= 3


def test_rbac_denies_an_identity_the_policy_does_not_allow(sidecar, pki, make_mesh):
    mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [sidecar.port])], [route("/", "reviews")]),
                     pki.paths("other_sa").dir)
    r = session(mesh).get(f"{URL}/x")
    assert r.status_code == 403 and r.text == "RBAC: access denied"
    assert r.headers["x-inbound-chain"] == HTTP_CHAIN


# -- refusals: the library's connect error, naming cluster, endpoint and reason -------------------------------


def _assert_refused(exc: BaseException, cluster_name: str, port: int, *words: str) -> TlsHandshakeError:
    assert isinstance(exc, requests.exceptions.SSLError)  # a requests ConnectionError
    assert isinstance(exc, requests.exceptions.ConnectionError)
    cause = exc.__cause__
    assert isinstance(cause, TlsHandshakeError) and cause.kind == "connect-failure"
    assert cause.cluster == cluster_name and cause.endpoint == f"127.0.0.1:{port}"
    text = str(exc)
    assert f"cluster {cluster_name}" in text and f"127.0.0.1:{port}" in text
    for w in words:
        assert w in text, (w, text)
    assert _classify(exc) == "connect-failure"
    assert exc.meshcore["cluster"] == cluster_name  # type: ignore[attr-defined]
    return cause


def test_san_mismatch_is_a_connect_error_before_any_byte(sidecar, pki, make_mesh):
    other = spiffe_id("reviews")
    mesh = make_mesh(resources([cluster("reviews", san=other)], [endpoints("reviews", [sidecar.port])],
                               [route("/", "reviews")]), pki.paths("client").dir)
    before = len(sidecar.app.requests)
    with pytest.raises(requests.exceptions.ConnectionError) as ei:
        session(mesh).get(f"{URL}/x")
    _assert_refused(ei.value, "reviews", sidecar.port, other, SIDECAR_ID, "match none of the expected")
    assert stat(mesh, "reviews", "ssl.fail_verify_san") == 1
    assert stat(mesh, "reviews", "upstream_cx_connect_fail") == 1
    assert len(sidecar.app.requests) == before


def test_workload_certificate_from_a_foreign_ca_is_refused(sidecar, pki, make_mesh):
    """TLS 1.3: the client's handshake completes, the sidecar refuses the certificate after it;
    the first read of the fresh connection fails before any response byte: a connect failure."""
    mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [sidecar.port])], [route("/", "reviews")]),
                     pki.paths("evil_client").dir)
    before = len(sidecar.app.requests)
    with pytest.raises(requests.exceptions.ConnectionError) as ei:
        session(mesh).get(f"{URL}/x")
    _assert_refused(ei.value, "reviews", sidecar.port, "refused this workload's certificate")
    assert stat(mesh, "reviews", "ssl.connection_error") == 1
    assert len(sidecar.app.requests) == before


def test_no_certificates_means_no_connection(sidecar, pki, make_mesh, monkeypatch, tmp_path):
    monkeypatch.delenv("MESHCORE_CERTIFICATES", raising=False)
    empty = tmp_path / "nocerts"
    empty.mkdir()
    mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [sidecar.port])], [route("/", "reviews")]),
                     str(empty))
    before = len(sidecar.app.requests)
    with pytest.raises(requests.exceptions.SSLError) as ei:
        session(mesh).get(f"{URL}/x")
    assert isinstance(ei.value.__cause__, TlsHandshakeError) and "cluster reviews" in str(ei.value)
    assert _classify(ei.value) == "connect-failure"
    assert len(sidecar.app.requests) == before


def test_https_urls_and_proxies_cannot_bypass_mesh_tls(sidecar, pki, make_mesh):
    mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [sidecar.port])], [route("/", "reviews")]),
                     pki.paths("client").dir)
    s = requests.Session()
    s.trust_env = False
    s.mount(f"https://{TARGET}", MeshAdapter(mesh))
    s.mount(URL, MeshAdapter(mesh))
    before = len(sidecar.app.requests)
    with pytest.raises(requests.exceptions.SSLError, match="https:// request cannot carry"):
        s.get(f"https://{TARGET}/x")
    with pytest.raises(requests.exceptions.SSLError, match="through a proxy"):
        s.get(f"{URL}/x", proxies={"http": "http://127.0.0.1:9"})
    assert len(sidecar.app.requests) == before


def test_handshake_timeout_is_a_connect_timeout(pki, make_mesh):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP (backlog), never answers TLS
    try:
        port = silent.getsockname()[1]
        mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [port])], [route("/", "reviews")]),
                         pki.paths("client").dir)
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectTimeout, match="TLS handshake with 127.0.0.1") as ei:
            session(mesh).get(f"{URL}/x", timeout=(0.3, 5))
        assert time.monotonic() - t0 < 2
        assert _classify(ei.value) == "connect-failure"
    finally:
        silent.close()


# -- retries and outlier detection --------------------------------------------------------------------------


def test_retry_on_connect_failure_moves_a_tls_failure_to_another_endpoint(sidecar, pki, make_mesh, tls_servers,
                                                                          tmp_path):
    # a peer with another SPIFFE ID (client-side SAN mismatch) and a TLS 1.3 peer refusing the
    # client certificate after the handshake (it trusts only the evil root)
    wrong_id = tls_servers(server_context(pki.paths("other_sa")))
    refusing_dir = write_istio_dir(tmp_path / "refusing", pki.sidecar, roots=[pki.evil_root])
    refusing = tls_servers(server_context(refusing_dir))
    outlier = {"consecutive_5xx": 1, "interval": "10s", "base_ejection_time": "30s", "max_ejection_percent": 100}
    res = resources([cluster("reviews", outlier_detection=outlier)],
                    [endpoints("reviews", [wrong_id.port, refusing.port, sidecar.port])],
                    [route("/", "reviews", retry_policy={"retry_on": "connect-failure", "num_retries": 3})])
    mesh = make_mesh(res, pki.paths("client").dir)
    s = session(mesh)
    before = len(sidecar.app.requests)
    results = [s.get(f"{URL}/r{i}") for i in range(4)]
    assert [r.status_code for r in results] == [200] * 4
    assert {r.meshcore["endpoint"] for r in results} == {f"127.0.0.1:{sidecar.port}"}
    assert len(sidecar.app.requests) == before + 4
    san, refused = stat(mesh, "reviews", "ssl.fail_verify_san"), stat(mesh, "reviews", "ssl.connection_error")
    assert san >= 1 and refused >= 1
    assert stat(mesh, "reviews", "upstream_cx_connect_fail") == san + refused  # both kinds: connect failures
    assert stat(mesh, "reviews", "upstream_rq_retry") == san + refused
    assert stat(mesh, "reviews", "outlier_detection.ejections_enforced_consecutive_5xx") == 2  # both bad hosts
    assert refusing.requests == 0 and wrong_id.requests == 0  # nothing reached either


def test_a_dropped_keepalive_connection_is_a_reset_not_a_connect_failure(pki, make_mesh, tls_servers, tmp_path):
    """The first-read guard is for fresh connections only: a reused connection closed after
    reading a request is a reset (not retried under ``connect-failure``)."""
    dropping = tls_servers(server_context(pki.paths("sidecar")), drop_at=2)
    res = resources([cluster("reviews")], [endpoints("reviews", [dropping.port])],
                    [route("/", "reviews", retry_policy={"retry_on": "connect-failure", "num_retries": 2})])
    mesh = make_mesh(res, pki.paths("client").dir)
    s = session(mesh)
    assert s.get(f"{URL}/1").text == f"ok:{dropping.port}"
    with pytest.raises(requests.exceptions.ConnectionError) as ei:
        s.get(f"{URL}/2")
    assert not isinstance(ei.value, requests.exceptions.SSLError)
    assert not isinstance(ei.value.__cause__, TlsHandshakeError)
    assert _classify(ei.value) == "reset"
    assert dropping.requests == 2 and dropping.handshakes == 1
    assert stat(mesh, "reviews", "upstream_rq_retry") == 0


# -- rotation under load --------------------------------------------------------------------------------------


def test_rotation_under_load_loses_nothing_and_new_connections_use_the_new_certificate(sidecar, pki, make_mesh,
                                                                                         tmp_path):
    certs = write_istio_dir(tmp_path / "client", pki.client)
    source = FileCertificateSource.from_directory(certs.dir, refresh_interval=0.05)
    mesh = make_mesh(resources([cluster("reviews")], [endpoints("reviews", [sidecar.port])], [route("/", "reviews")]),
                     source)
    s = session(mesh)
    old_hash = cert_hash(pki.client)
    assert xfcc_hash(s.get(f"{URL}/warm").json()["xfcc"])["Hash"] == old_hash

    stop = threading.Event()
    errors: List[BaseException] = []
    statuses: List[int] = []

    def load(close: bool) -> None:
        ls = session(mesh)  # one client per thread (requests sessions are not thread-safe)
        headers = {"Connection": "close"} if close else {}
        while not stop.is_set():
            try:
                statuses.append(ls.get(f"{URL}/load", headers=headers).status_code)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=load, args=(i % 2 == 0,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    new = pki.root.issue(CLIENT_ID)
    new_root = type(pki.root).new("root-2")
    time.sleep(0.2)
    # Istio's agent order: key, chain, roots (a new root appended to the bundle); each state lasts
    # several refresh intervals, so new connections meet the mismatched key/chain pair
    write_istio_dir(certs.dir, key=new.key)
    time.sleep(0.3)
    write_istio_dir(certs.dir, chain=[new.chain_pem])
    time.sleep(0.3)
    write_istio_dir(certs.dir, roots=[pki.root, new_root])
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    assert len(statuses) > 20 and set(statuses) == {200}

    new_hash = cert_hash(new)
    r = s.get(f"{URL}/after", headers={"Connection": "close"})  # the pooled old connection...
    assert xfcc_hash(r.json()["xfcc"])["Hash"] == old_hash      # ...still has the old certificate
    r = s.get(f"{URL}/after")                                    # a new connection: the new one
    assert xfcc_hash(r.json()["xfcc"])["Hash"] == new_hash
    assert xfcc_hash(r.json()["xfcc"])["URI"] == CLIENT_ID
