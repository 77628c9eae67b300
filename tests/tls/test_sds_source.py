"""SdsCertificateSource against a real gRPC SDS server (unix socket and loopback TCP) serving
secrets made from Istio-shaped certificates (``tests/tls/pki.py``): first set, rotation pushed by
the server (one secret at a time, as Istio's agent pushes), a half-updated pair NACKed with the
last good set kept, reconnect after a server restart, the Mesh wiring (``certificates="sds:..."``,
``$MESHCORE_CERTIFICATES``, the Istio agent socket), and close() leaving no thread behind."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from concurrent import futures
from typing import Any, Dict, List, Optional

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

import meshcore
from meshcore.tls import CertificatesUnavailable, SdsCertificateSource
from meshcore.tls import manager as tls_manager
from meshcore.tls.sds import SECRET_TYPE_URL

from .pki import CA, Leaf, spiffe_id


# -- a small SDS server ------------------------------------------------------------------------------


def identity_secret(leaf: Leaf, *, key_of: Optional[Leaf] = None, name: str = "default") -> Any:
    s = secret_pb2.Secret(name=name)
    s.tls_certificate.certificate_chain.inline_bytes = leaf.chain_pem
    s.tls_certificate.private_key.inline_bytes = (key_of or leaf).key_pem
    return s


def roots_secret(*cas: CA, name: str = "ROOTCA") -> Any:
    s = secret_pb2.Secret(name=name)
    s.validation_context.trusted_ca.inline_bytes = b"".join(ca.cert_pem for ca in cas)
    return s


class FakeSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """Serves the secrets it holds; :meth:`put` pushes only the secrets given (like Istio's agent
    pushing the one that changed). Records every request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.secrets: Dict[str, Any] = {}
        self.version = 0
        self.requests: List[Any] = []
        self.streams: List["queue.Queue[Any]"] = []
        self.stream_count = 0
        self.sent: List[str] = []  # nonces of the responses sent
        self.mark = 0  # len(sent) at the last put()

    def put(self, *secrets: Any) -> None:
        with self.lock:
            for s in secrets:
                self.secrets[s.name] = s
            self.version += 1
            self.mark = len(self.sent)
            outs = list(self.streams)
        for out in outs:
            out.put([s.name for s in secrets])

    def _response(self, names: List[str]) -> Any:
        with self.lock:
            resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE_URL, version_info=f"v{self.version}",
                                                   nonce=uuid.uuid4().hex)
            for n in names:
                if n in self.secrets:
                    resp.resources.add().Pack(self.secrets[n])
            self.sent.append(resp.nonce)
        return resp

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Any:
        out: "queue.Queue[Any]" = queue.Queue()
        with self.lock:
            self.streams.append(out)
            self.stream_count += 1

        def read() -> None:
            try:
                for req in request_iterator:
                    with self.lock:
                        self.requests.append(req)
                    if not req.response_nonce:  # the first request of the stream: send everything
                        out.put(list(req.resource_names))
            except Exception:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while context.is_active():
                try:
                    names = out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if names is None:
                    return
                yield self._response(names)
        finally:
            with self.lock:
                self.streams.remove(out)

    def reply_to_last(self, timeout: float = 5.0) -> Any:
        """The ACK/NACK of the last response sent after the last put() (waits for both)."""
        def find() -> Any:
            with self.lock:
                if len(self.sent) <= self.mark:
                    return None
                return next((r for r in self.requests if r.response_nonce == self.sent[-1]), None)
        assert wait_for(lambda: find() is not None, timeout), "no ACK/NACK of the last response"
        return find()


class Server:
    def __init__(self, address: str, sds: Optional[FakeSds] = None) -> None:
        self.sds = sds or FakeSds()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self.sds, self.server)
        port = self.server.add_insecure_port(address)
        self.target = address.replace(":0", f":{port}") if address.startswith("127.0.0.1") else address
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("root")


@pytest.fixture(scope="module")
def leaves(ca: CA) -> List[Leaf]:
    return [ca.issue(spiffe_id("client")) for _ in range(3)]


@pytest.fixture
def unix_server(tmp_path: Any, ca: CA, leaves: List[Leaf]) -> Any:
    path = tmp_path / "sds.sock"
    assert len(str(path)) < 100  # sun_path
    srv = Server(f"unix://{path}")
    srv.sds.put(identity_secret(leaves[0]), roots_secret(ca))
    yield srv
    srv.stop()


@pytest.fixture
def tcp_server(ca: CA, leaves: List[Leaf]) -> Any:
    srv = Server("127.0.0.1:0")
    srv.sds.put(identity_secret(leaves[0]), roots_secret(ca))
    yield srv
    srv.stop()


@pytest.fixture
def source_for() -> Any:
    made: List[SdsCertificateSource] = []

    def make(target: str, **kw: Any) -> SdsCertificateSource:
        src = SdsCertificateSource(target, **kw)
        made.append(src)
        return src

    yield make
    for src in made:
        src.close()


# -- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_first_set_arrives(transport: str, request: Any, source_for: Any, ca: CA, leaves: List[Leaf]) -> None:
    srv = request.getfixturevalue(f"{transport}_server")
    target = srv.target if transport == "tcp" else "unix:" + srv.target[len("unix://"):]
    src = source_for(target, name="sds-test")
    assert src.wait(5)
    ident = src.identity()
    assert ident.source == "sds-test"
    assert ident.spiffe_id == spiffe_id("client")
    assert ident.root_count == 1 and ident.generation == 1 and ident.problem is None
    assert ident.not_after == pytest.approx(leaves[0].cert.not_valid_after_utc.timestamp())
    assert 0 < ident.seconds_left <= 24 * 3600  # type: ignore[operator]
    s = src.current()
    assert (s.chain_pem, s.key_pem, s.roots_pem) == (leaves[0].chain_pem, leaves[0].key_pem, ca.cert_pem)
    assert src.peek() is s and src.reloads == 1 and src.reload_failures == 0 and src.files == []
    # one request naming both secrets with the node, then an ACK of the response
    ack = srv.sds.reply_to_last()
    first = srv.sds.requests[0]
    assert list(first.resource_names) == ["default", "ROOTCA"] and first.type_url == SECRET_TYPE_URL
    assert first.node.id == "meshcore~127.0.0.1~meshcore.default~default.svc.cluster.local"
    assert ack.version_info == "v1" and ack.response_nonce and not ack.HasField("error_detail")


def test_not_available_until_first_set(tmp_path: Any, source_for: Any, ca: CA, leaves: List[Leaf]) -> None:
    srv = Server(f"unix://{tmp_path}/s")
    try:
        src = source_for(f"unix://{tmp_path}/s")
        assert not src.wait(0.3)  # connected, nothing served yet (an empty response, ACKed)
        srv.sds.reply_to_last()
        with pytest.raises(CertificatesUnavailable, match="nothing received yet"):
            src.current()
        srv.sds.put(roots_secret(ca))  # half of what is needed: still unavailable, and says so
        assert not srv.sds.reply_to_last().HasField("error_detail")
        with pytest.raises(CertificatesUnavailable, match="waiting for SDS secret 'default'"):
            src.current()
        assert src.identity().generation == 0 and "'default'" in (src.identity().problem or "")
        srv.sds.put(identity_secret(leaves[0]))
        assert src.wait(5) and src.current().generation == 1
    finally:
        srv.stop()


def test_rotation_and_half_updated_pair(unix_server: Server, source_for: Any, ca: CA, leaves: List[Leaf]) -> None:
    sds = unix_server.sds
    src = source_for(unix_server.target)
    assert src.wait(5)
    first = src.current()
    # rotation: only `default` is pushed (ROOTCA keeps its value)
    sds.put(identity_secret(leaves[1]))
    assert wait_for(lambda: src.current().generation == 2)
    second = src.current()
    assert second.chain_pem == leaves[1].chain_pem and second.roots_pem == first.roots_pem
    assert src.identity().not_after == pytest.approx(leaves[1].cert.not_valid_after_utc.timestamp())
    # a root bundle change alone is a new generation too
    other = CA.new("other-root")
    sds.put(roots_secret(ca, other))
    assert wait_for(lambda: src.current().generation == 3)
    assert src.identity().root_count == 2
    assert not sds.reply_to_last().HasField("error_detail")
    # half-updated pair: new key, old chain -> NACK, the last good set stays
    sds.put(identity_secret(leaves[1], key_of=leaves[2]))
    nack = sds.reply_to_last()
    assert nack.HasField("error_detail") and nack.error_detail.code == 3
    assert "'default'" in nack.error_detail.message and "KEY_VALUES_MISMATCH" in nack.error_detail.message
    assert nack.version_info == "v3"  # the last accepted version
    assert src.current().generation == 3 and src.current().chain_pem == leaves[1].chain_pem
    assert src.reload_failures == 1 and "rejected" in (src.problem or "")
    assert "KEY_VALUES_MISMATCH" in (src.identity().problem or "")
    # a bad root bundle is NACKed naming ROOTCA
    bad = secret_pb2.Secret(name="ROOTCA")
    bad.validation_context.trusted_ca.inline_bytes = b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    sds.put(bad)
    assert "'ROOTCA'" in sds.reply_to_last().error_detail.message
    # the completed rotation is accepted and clears the problem
    sds.put(identity_secret(leaves[2]), roots_secret(ca))
    assert wait_for(lambda: src.current().generation == 4)
    assert src.current().chain_pem == leaves[2].chain_pem and src.identity().root_count == 1
    assert src.problem is None and src.identity().problem is None and src.reloads == 4
    assert not sds.reply_to_last().HasField("error_detail")


def test_secret_data_sources(unix_server: Server, source_for: Any, tmp_path: Any, ca: CA,
                             leaves: List[Leaf]) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaves[1].chain_pem)
    s = secret_pb2.Secret(name="default")
    s.tls_certificate.certificate_chain.filename = str(chain)
    s.tls_certificate.private_key.inline_string = leaves[1].key_pem.decode()
    unix_server.sds.put(s)
    src = source_for(unix_server.target)
    assert src.wait(5) and src.current().chain_pem == leaves[1].chain_pem
    # a secret of the wrong kind is NACKed
    wrong = secret_pb2.Secret(name="default")
    wrong.validation_context.trusted_ca.inline_bytes = ca.cert_pem
    unix_server.sds.put(wrong)
    assert "expected a tls_certificate" in unix_server.sds.reply_to_last().error_detail.message
    assert src.reload_failures == 1 and src.current().generation == 1


def test_reconnects_after_server_restart(tmp_path: Any, source_for: Any, ca: CA, leaves: List[Leaf]) -> None:
    address = f"unix://{tmp_path}/s"
    srv = Server(address)
    srv.sds.put(identity_secret(leaves[0]), roots_secret(ca))
    src = source_for(address)
    assert src.wait(5)
    srv.stop()
    assert wait_for(lambda: src.problem is not None and "SDS stream" in src.problem)
    assert src.current().generation == 1  # still usable meanwhile
    time.sleep(0.5)  # a few failed attempts (backoff 0.1, 0.2, ...)
    srv2 = Server(address)
    try:
        srv2.sds.put(identity_secret(leaves[1]), roots_secret(ca))
        assert wait_for(lambda: src.current().generation == 2)
        assert src.current().chain_pem == leaves[1].chain_pem and src.problem is None
        assert srv2.sds.stream_count == 1 and src.streams >= 2
        first = srv2.sds.requests[0]
        assert first.node.id and first.version_info == "v1"  # the last accepted version is re-sent
        # the same secrets again after another restart: ACKed, no new generation
        srv2.stop()
        srv3 = Server(address, srv2.sds)
        try:
            assert wait_for(lambda: srv2.sds.stream_count == 2 and src.problem is None)
            assert src.current().generation == 2
        finally:
            srv3.stop()
    finally:
        srv2.stop()


def test_node_from_pod_env(unix_server: Server, source_for: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("POD_NAME", "web-1")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    monkeypatch.setenv("INSTANCE_IP", "10.1.2.3")
    src = source_for(unix_server.target)
    assert src.wait(5)
    assert unix_server.sds.requests[0].node.id == "sidecar~10.1.2.3~web-1.shop~shop.svc.cluster.local"


_RESOURCES = {
    "listeners": [{"name": "a.svc:80", "api_listener": {"api_listener": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}],
    "clusters": [{"name": "c", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 9}}}}]}]}}]}


def test_mesh_certificates_sds(unix_server: Server, tmp_path: Any) -> None:
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_RESOURCES))
    path = unix_server.target[len("unix://"):]
    mesh = meshcore.Mesh.from_file(res, watch=False, certificates=f"sds:unix:{path}")
    try:
        src = mesh.tls.workload_source()
        assert isinstance(src, SdsCertificateSource) and src.name == f"sds:unix:{path}"
        assert src.wait(5)
        ident = mesh.identity()
        assert ident is not None and ident.spiffe_id == spiffe_id("client") and ident.generation == 1
        assert ident.source == f"sds:unix:{path}"
    finally:
        mesh.close()
        mesh.tls.workload_source().close()  # Mesh.close() does not close certificate sources


def test_manager_env_and_istio_socket(unix_server: Server, monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.setenv(tls_manager.ENV_CERTIFICATES, "sds:" + unix_server.target)
    src = tls_manager.TlsManager().workload_source()
    try:
        assert isinstance(src, SdsCertificateSource) and src.target == unix_server.target
        assert src.wait(5) and src.identity().spiffe_id == spiffe_id("client")
    finally:
        src.close()  # type: ignore[union-attr]
    # no explicit source, env, provider or directory: the Istio agent socket when it exists
    monkeypatch.delenv(tls_manager.ENV_CERTIFICATES)
    monkeypatch.setattr(tls_manager, "ISTIO_CERT_DIRS", (str(tmp_path / "none"),))
    monkeypatch.setattr(tls_manager, "ISTIO_SDS_SOCKETS", (str(tmp_path / "missing"),))
    assert tls_manager.TlsManager().workload_source() is None
    monkeypatch.setattr(tls_manager, "ISTIO_SDS_SOCKETS", (unix_server.target[len("unix://"):],))
    src = tls_manager.TlsManager().workload_source()
    try:
        assert isinstance(src, SdsCertificateSource) and src.wait(5)
    finally:
        src.close()  # type: ignore[union-attr]


def _sds_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("meshcore-sds"))


def _client_threads() -> List[str]:
    """Every thread but the test servers' executor workers (their pool grows as it likes)."""
    return [t.name for t in threading.enumerate() if not t.name.startswith("ThreadPoolExecutor")]


def test_close_stops_the_thread(unix_server: Server, tcp_server: Server) -> None:
    def cycle(target: str) -> None:
        src = SdsCertificateSource(target)
        assert src.wait(5)
        src.close()
        src.close()  # idempotent
        assert src.closed and src.current().generation == 1  # the last set stays readable

    for target in (unix_server.target, tcp_server.target):
        cycle(target)
    assert wait_for(lambda: _sds_threads() == 0)
    time.sleep(0.1)
    before = len(_client_threads())
    for i in range(20):
        cycle((unix_server.target, tcp_server.target)[i % 2])
    assert _sds_threads() == 0
    # the stream thread, grpc's channel and request-iterator threads, the servers' readers: all gone
    assert wait_for(lambda: len(_client_threads()) <= before, 3), _client_threads()
    assert wait_for(lambda: not unix_server.sds.streams and not tcp_server.sds.streams)
    # a source against nothing closes promptly too (mid-backoff), and raises nothing meanwhile
    src = SdsCertificateSource("127.0.0.1:1")
    assert wait_for(lambda: src.problem is not None and "UNAVAILABLE" in src.problem)
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 1 and _sds_threads() == 0


def test_dropped_source_is_closed(unix_server: Server) -> None:
    import gc

    src = SdsCertificateSource(unix_server.target)
    assert src.wait(5)
    del src
    gc.collect()
    assert wait_for(lambda: _sds_threads() == 0)


def test_arguments() -> None:
    with pytest.raises(ValueError):
        SdsCertificateSource("")
    with pytest.raises(ValueError):
        SdsCertificateSource("x:1", identity_secret=None, roots_secret=None)
    with pytest.raises(ValueError):
        SdsCertificateSource("x:1", identity_secret="a", roots_secret="a")
