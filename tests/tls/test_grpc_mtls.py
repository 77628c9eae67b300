"""gRPC (grpcio) through meshcore's ``MeshChannel`` with mesh mTLS, to a grpcio app behind a real
Envoy configured as an Istio STRICT sidecar inbound (auto-detected port: only Istio's ALPN values
reach the HTTP filter chain; RBAC allows only the ``client`` SPIFFE ID; XFCC forwarded).

grpcio cannot verify SPIFFE-only server certificates itself, so a TLS endpoint's grpcio channel
is a plaintext one to a private unix socket of ``meshcore.tls.forwarder``, which makes the TLS
connection (``UpstreamTls``: Istio ALPN, SNI, chain + SAN check before any byte of the client's).
The mesh is ``Mesh.from_file`` with clusters in the Istio-sidecar shape (``grpc_mtls_env``) and the
certificates of one of the ``pki`` identities. Nothing here mocks TLS.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import grpc
import pytest

import meshcore
from meshcore.integrations.grpc import mesh_channel
from meshcore.tls import FileCertificateSource, TlsHandshakeError
from meshcore.tls.forwarder import forwarder_stats

from .grpc_mtls_env import (CLUSTER, COUNT, HELLO, PLAIN_TARGET, SNI, TARGET, GrpcApp, GrpcSidecar, SilentServer,
                            TlsStub, assignment, fingerprint, plain_cluster, resources, route, tls_cluster,
                            write_json, xfcc_hash, xfcc_uri)
from .pki import Pki, spiffe_id, write_istio_dir, write_key_only
from .sidecar import HTTP_CHAIN

pytestmark = pytest.mark.envoy

CLIENT_ID = spiffe_id("client")
SIDECAR_ID = spiffe_id("sidecar")
OTHER_ID = spiffe_id("other")
EXTRA_LISTENERS = 3


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def app() -> Iterator[GrpcApp]:
    a = GrpcApp()
    try:
        yield a
    finally:
        a.close()


@pytest.fixture(scope="module")
def sidecar(pki: Pki, app: GrpcApp) -> Iterator[GrpcSidecar]:
    """Envoy as an Istio STRICT inbound (auto-detected port) in front of ``app``, on
    ``1 + EXTRA_LISTENERS`` listener ports (``sidecar.ports``)."""
    sc = GrpcSidecar(pki.paths("sidecar"), app_port=app.port, extra_listeners=EXTRA_LISTENERS)
    sc.start()
    try:
        yield sc
    finally:
        sc.stop()


@pytest.fixture
def make_mesh(tmp_path: Any) -> Iterator[Callable[..., meshcore.Mesh]]:
    """``make_mesh(doc, certificates=<dir or source>, watch=False)``: a started file-fed mesh."""
    made: List[meshcore.Mesh] = []

    def make(doc: Dict[str, Any], certificates: Any, watch: bool = False) -> meshcore.Mesh:
        path = write_json(tmp_path / f"mesh-{len(made)}.json", doc)
        m = meshcore.Mesh.from_file(path, watch=watch, poll_interval=0.02, certificates=certificates)
        made.append(m)
        m.start()
        m.wait_ready(TARGET, timeout=5)
        return m

    make.tmp_path = tmp_path  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for m in made:
            m.close()


def tls_doc(ports: List[int], sans: List[str] = [SIDECAR_ID], **cluster_kw: Any) -> Dict[str, Any]:
    return resources({TARGET: [route(CLUSTER)]}, [tls_cluster(CLUSTER, sans, **cluster_kw)],
                     [assignment(CLUSTER, [(p, True) for p in ports])])


def stats(mesh: meshcore.Mesh) -> Dict[str, Any]:
    return mesh.stats().get(CLUSTER, {})


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------------------------
# Reaching the app
# --------------------------------------------------------------------------------------------


def test_calls_reach_the_app_through_the_sidecar_http_chain(sidecar, app, pki, make_mesh):
    mesh = make_mesh(tls_doc([sidecar.port]), pki.paths("client").dir)
    with mesh_channel(mesh, TARGET) as ch:
        hello = ch.unary_unary(HELLO)
        xfcc, call = hello.with_call(b"hi", timeout=5)
        # the app saw the client's SPIFFE ID: the HTTP chain (RBAC, XFCC) served it, i.e. the
        # connection offered Istio's ALPN; the sidecar's response header says which chain
        assert xfcc_uri(xfcc.decode()) == CLIENT_ID and f"By={SIDECAR_ID}" in xfcc.decode()
        assert dict(call.initial_metadata())["x-inbound-chain"] == HTTP_CHAIN
        line = sidecar.access_log_lines(1)[-1].split()  # chain, code, peer URI SAN, SNI
        assert line[0] == HTTP_CHAIN and line[2] == CLIENT_ID and line[3] == SNI
        assert [r for r in ch.unary_stream(COUNT)(b"3", timeout=5)] == [b"0", b"1", b"2"]
        assert hello.future(b"f", timeout=5).result() == xfcc
        for _ in range(5):
            assert hello(b"again", timeout=5) == xfcc
        st = stats(mesh)
        assert st["ssl.handshake"] == 1, "every call after the first reused the connection"
        assert st["upstream_rq_total"] == 8 and "upstream_cx_connect_fail" not in st
        (fwd,) = ch._pool.forwards()
        assert fwd.handshakes == 1 and fwd.failure is None and fwd.open_connections == 1
        assert stat.S_IMODE(os.stat(fwd.dir).st_mode) == 0o700, "only this user may reach the socket"
    assert not os.path.exists(fwd.dir), "closing the channel removed the socket"
    wait_until(lambda: not forwarder_stats()["running"], what="the forwarder thread to stop")


def test_plaintext_cluster_through_the_same_client(sidecar, app, pki, make_mesh):
    doc = resources({TARGET: [route(CLUSTER)], PLAIN_TARGET: [route("plain")]},
                    [tls_cluster(CLUSTER, [SIDECAR_ID]), plain_cluster("plain")],
                    [assignment(CLUSTER, [(sidecar.port, True)]), assignment("plain", [(app.port, False)])])
    mesh = make_mesh(doc, pki.paths("client").dir)
    mesh.wait_ready(PLAIN_TARGET, timeout=5)
    with mesh_channel(mesh, PLAIN_TARGET) as plain, mesh_channel(mesh, TARGET) as tls:
        assert plain.unary_unary(HELLO)(b"", timeout=5) == b"", "straight to the app: no XFCC"
        assert plain._pool.forwards() == []
        assert xfcc_uri(tls.unary_unary(HELLO)(b"", timeout=5).decode()) == CLIENT_ID
    assert "ssl.handshake" not in mesh.stats().get("plain", {})


def test_aggregate_cluster_uses_its_childs_tls_socket(sidecar, app, pki, make_mesh):
    # the aggregate's own spec has no transport socket: Envoy uses the host's cluster's, and
    # so must meshcore (plaintext to the sidecar's mTLS port would be refused anyway)
    agg = {"name": "agg", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED",
           "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
               "clusters": [CLUSTER]}}}
    doc = resources({TARGET: [route("agg")]}, [tls_cluster(CLUSTER, [SIDECAR_ID], connect_timeout="0.7s"), agg],
                    [assignment(CLUSTER, [(sidecar.port, True)])])
    mesh = make_mesh(doc, pki.paths("client").dir)
    with mesh_channel(mesh, TARGET, sweep_interval=0.0) as ch:  # the sweep must keep the channel
        hello = ch.unary_unary(HELLO)
        assert xfcc_uri(hello(b"", timeout=5).decode()) == CLIENT_ID
        assert xfcc_uri(hello(b"", timeout=5).decode()) == CLIENT_ID
        (fwd,) = ch._pool.forwards()
        assert fwd.tls.cluster == CLUSTER and fwd.connect_timeout == 0.7
    assert mesh.stats()[CLUSTER]["ssl.handshake"] == 1


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_san_mismatch_is_unavailable_naming_cluster_endpoint_and_sans(sidecar, app, pki, make_mesh):
    mesh = make_mesh(tls_doc([sidecar.port], sans=[OTHER_ID]), pki.paths("client").dir)
    seen = len(app.calls)
    with mesh_channel(mesh, TARGET) as ch:
        err = rpc_error(lambda: ch.unary_unary(HELLO)(b"", timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        details = err.details()
        assert CLUSTER in details and f"127.0.0.1:{sidecar.port}" in details
        assert OTHER_ID in details and SIDECAR_ID in details, details
        cause = err.__cause__
        assert isinstance(cause, TlsHandshakeError) and cause.stat == "ssl.fail_verify_san"
        assert cause.kind == "connect-failure"
        assert ch.tls_failures() == {f"127.0.0.1:{sidecar.port}": str(cause)}
        fut = ch.unary_unary(HELLO).future(b"", timeout=5)  # the same through the future path
        assert fut.code() is grpc.StatusCode.UNAVAILABLE and isinstance(fut.exception().__cause__, TlsHandshakeError)
        # a streaming call fails the same way (grpcio's own details; the reason is in tls_failures)
        stream = ch.unary_stream(COUNT)(b"2", timeout=5)
        assert rpc_error(lambda: list(stream)).code() is grpc.StatusCode.UNAVAILABLE
    st = stats(mesh)
    assert st["ssl.fail_verify_san"] >= 1 and "ssl.handshake" not in st
    assert st["upstream_cx_connect_fail"] == 3, "counted as connect failures (outlier detection, retries)"
    assert len(app.calls) == seen, "nothing reached the app"


@pytest.mark.parametrize("max_version", ["TLSv1_3", "TLSv1_2"])
def test_foreign_ca_client_certificate_is_refused_as_unavailable(max_version, sidecar, app, pki, make_mesh):
    # the evil client trusts the mesh root, so it accepts the sidecar: the sidecar refuses it.
    # TLS 1.3: after the client's handshake finished (on the first read); TLS 1.2: in it.
    mesh = make_mesh(tls_doc([sidecar.port], max_version=max_version), pki.paths("evil_client").dir)
    seen = len(app.calls)
    with mesh_channel(mesh, TARGET) as ch:
        err = rpc_error(lambda: ch.unary_unary(HELLO)(b"", timeout=5))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert isinstance(err.__cause__, TlsHandshakeError)
    reason = err.__cause__.reason
    if max_version == "TLSv1_3":
        # the alert, or an EOF when our first write drew a reset that discarded it
        assert "refused this workload's certificate" in reason, reason
        assert "UNKNOWN_CA" in reason.upper() or "EOF" in reason, reason
    else:
        assert "handshake failed" in reason, reason
    assert stats(mesh)["upstream_cx_connect_fail"] == 1
    assert len(app.calls) == seen


def test_identity_the_rbac_does_not_allow_gets_permission_denied(sidecar, app, pki, make_mesh):
    mesh = make_mesh(tls_doc([sidecar.port]), pki.paths("other_sa").dir)
    with mesh_channel(mesh, TARGET) as ch:
        err = rpc_error(lambda: ch.unary_unary(HELLO)(b"", timeout=5))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "RBAC" in err.details()
        assert ch.tls_failures() == {}
    st = stats(mesh)
    assert st["ssl.handshake"] == 1 and "upstream_cx_connect_fail" not in st  # an answer, not a failure


def test_missing_certificates_never_plaintext(sidecar, app, pki, make_mesh, tmp_path):
    empty = tmp_path / "no-certs"
    empty.mkdir()
    mesh = make_mesh(tls_doc([sidecar.port]), str(empty))
    seen = len(app.calls)
    with mesh_channel(mesh, TARGET) as ch:
        err = rpc_error(lambda: ch.unary_unary(HELLO)(b"", timeout=5))
        assert ch._pool.forwards() == [], "no connection of any kind was made"
    assert err.code() is grpc.StatusCode.UNAVAILABLE and str(empty) in err.details()
    assert isinstance(err.__cause__, TlsHandshakeError)
    assert stats(mesh)["upstream_cx_connect_fail"] == 1
    assert len(app.calls) == seen


def test_handshake_timeout_is_a_connect_failure(pki, make_mesh):
    silent = SilentServer()
    try:
        mesh = make_mesh(tls_doc([silent.port], connect_timeout="0.3s"), pki.paths("client").dir)
        with mesh_channel(mesh, TARGET) as ch:
            started = time.monotonic()
            err = rpc_error(lambda: ch.unary_unary(HELLO)(b"", timeout=5))
            assert time.monotonic() - started < 2
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "0.3s" in err.details() and isinstance(err.__cause__, TlsHandshakeError)
        assert stats(mesh)["upstream_cx_connect_fail"] == 1
    finally:
        silent.close()


def test_retry_on_connect_failure_moves_a_tls_failure_to_another_endpoint(sidecar, app, pki, make_mesh):
    wrong = TlsStub(pki.server_context("server", alpn=("h2",)))  # a TLS peer with another identity
    try:
        doc = resources({TARGET: [route(CLUSTER, retry_on="connect-failure", num_retries=2)]},
                        [tls_cluster(CLUSTER, [SIDECAR_ID])],
                        [assignment(CLUSTER, [(wrong.port, True), (sidecar.port, True)])])
        mesh = make_mesh(doc, pki.paths("client").dir)
        with mesh_channel(mesh, TARGET) as ch:
            hello = ch.unary_unary(HELLO)
            for _ in range(6):  # round robin: every other call starts on the wrong peer
                assert xfcc_uri(hello(b"", timeout=5).decode()) == CLIENT_ID
            assert list(ch.tls_failures()) == [f"127.0.0.1:{wrong.port}"]
        st = stats(mesh)
        assert wrong.handshakes >= 1 and st["ssl.fail_verify_san"] >= 1
        assert st["upstream_rq_retry"] >= 3 and st["upstream_cx_connect_fail"] >= 3
    finally:
        wrong.close()


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------


def test_rotation_under_load_loses_no_call_and_new_connections_use_the_new_certificate(
        sidecar, app, pki, make_mesh, tmp_path):
    certs = tmp_path / "client-certs"
    gen1, gen2 = pki.client, pki.root.issue(CLIENT_ID)
    write_istio_dir(certs, gen1)
    source = FileCertificateSource.from_directory(str(certs), refresh_interval=0.02)
    mesh = make_mesh(tls_doc([sidecar.port]), source)
    errors: List[BaseException] = []
    hashes: List[Optional[str]] = []
    done = threading.Event()
    calls = [0]

    with mesh_channel(mesh, TARGET) as steady:
        hello = steady.unary_unary(HELLO)
        assert xfcc_hash(hello(b"", timeout=5).decode()) == fingerprint(gen1)

        def load() -> None:
            while not done.is_set():
                try:
                    hello(b"", timeout=5)
                    calls[0] += 1
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        def fresh() -> None:  # a new channel, so a new connection and handshake, again and again
            while not done.is_set():
                try:
                    with mesh_channel(mesh, TARGET) as ch:
                        hashes.append(xfcc_hash(ch.unary_unary(HELLO)(b"", timeout=5).decode()))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=load) for _ in range(3)] + [threading.Thread(target=fresh)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            write_key_only(certs, gen2)  # Istio's order: key (a mismatched pair on disk) ...
            time.sleep(0.4)
            write_istio_dir(certs, gen2)  # ... then chain, then roots
            wait_until(lambda: mesh.identity().generation >= 2 and hashes and hashes[-1] == fingerprint(gen2),
                       what="a new connection with the new certificate")
            time.sleep(0.2)
        finally:
            done.set()
            for t in threads:
                t.join(10)
        assert not errors, errors[:3]
        assert calls[0] > 20
        assert set(hashes) == {fingerprint(gen1), fingerprint(gen2)}
        # the long-lived connection keeps the certificate it was made with
        assert xfcc_hash(hello(b"", timeout=5).decode()) == fingerprint(gen1)
    with mesh_channel(mesh, TARGET) as ch:
        assert xfcc_hash(ch.unary_unary(HELLO)(b"", timeout=5).decode()) == fingerprint(gen2)


# --------------------------------------------------------------------------------------------
# Lifecycle and the local socket
# --------------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_endpoint_changes_leak_no_descriptor_forward_or_thread(sidecar, app, pki, make_mesh):
    ports = sidecar.ports
    mesh = make_mesh(tls_doc(ports[:1]), pki.paths("client").dir, watch=True)
    path = os.path.join(make_mesh.tmp_path, "mesh-0.json")

    def move_to(port: int) -> None:
        write_json(path, tls_doc([port]))
        wait_until(lambda: [ep.port for ep in mesh.config(TARGET).clusters[CLUSTER].lb.endpoints] == [port],
                   what=f"the endpoint to become {port}")

    with mesh_channel(mesh, TARGET, sweep_interval=0.0) as ch:  # sweep at every call
        hello = ch.unary_unary(HELLO)

        def step(i: int) -> None:
            move_to(ports[i % len(ports)])
            assert xfcc_uri(hello(b"", timeout=5).decode()) == CLIENT_ID
            assert ch.endpoint_addresses() == [f"127.0.0.1:{ports[i % len(ports)]}"]

        for i in range(1, 5):  # every port once: grpcio's and the forwarder's one-time state made
            step(i)
        time.sleep(0.2)
        fds, threads = _fds(), threading.active_count()
        for i in range(5, 5 + 4 * len(ports)):
            step(i)
        assert forwarder_stats()["forwards"] == 1, "one forward: the current endpoint's"
        wait_until(lambda: _fds() <= fds + 2, what=f"descriptors back to {fds} (now {_fds()})")
        assert threading.active_count() == threads
    wait_until(lambda: forwarder_stats() == {"running": False, "forwards": 0, "connections": 0},
               what="the forwarder to stop")
    assert mesh.stats()[CLUSTER]["ssl.handshake"] == 4 + 4 * len(ports)


def test_only_this_process_may_use_the_forward(sidecar, app, pki, make_mesh, caplog):
    mesh = make_mesh(tls_doc([sidecar.port]), pki.paths("client").dir)
    with mesh_channel(mesh, TARGET) as ch:
        assert ch.unary_unary(HELLO)(b"", timeout=5)
        (fwd,) = ch._pool.forwards()
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "s.connect(sys.argv[1])\n"
                 "try:\n"
                 "    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
                 "    print(len(s.recv(100)))\n"
                 "except ConnectionError:\n    print(0)\n")
        out = subprocess.run([sys.executable, "-c", probe, fwd.path], capture_output=True, text=True, timeout=10)
        assert out.stdout.strip() == "0", out  # closed at once: another process gets nothing
        assert fwd.handshakes == 1, "no upstream connection was made for it"
        assert any("another process" in r.getMessage() for r in caplog.records)
