"""aiohttp ``MeshSession`` doing mesh mTLS under http:// requests to a real Envoy configured as an
Istio STRICT sidecar inbound (``tests/tls/sidecar.py``), with the cluster in the shape Istio gives
sidecars (``transport_socket_matches`` on the endpoint's ``tlsMode: istio``, SDS secrets
``default`` / ``ROOTCA``, Istio's ALPN markers) and the workload certificates from an Istio-layout
directory (``Mesh.from_file(..., certificates=...)``). No TLS is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

import meshcore
from meshcore.integrations.aiohttp import MeshConnector, MeshSession, MeshTlsError
from meshcore.tls import FileCertificateSource, TlsHandshakeError

from .pki import Pki, spiffe_id, write_istio_dir, write_key_only
from .sidecar import HTTP_CHAIN, SidecarInbound

HOST = "echo.default.svc.cluster.local"
TARGET = f"{HOST}:8080"
URL = f"http://{TARGET}"
SNI = f"outbound_.8080_._.{HOST}"
CLIENT_ID = spiffe_id("client")
SIDECAR_ID = spiffe_id("sidecar")
# aiohttp 3.10 and 3.11 resend an idempotent request once on a new connection after any
# ClientOSError from reading the answer, connector errors included (3.12+ do not, 3.9 did not)
_AIOHTTP = tuple(int(x) for x in re.findall(r"\d+", aiohttp.__version__)[:2])
REFUSALS_PER_REQUEST = 2 if (3, 10) <= _AIOHTTP < (3, 12) else 1

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
# what istiod puts in a sidecar's secret references (the mesh resolves the names, not the source)
SDS = {"api_config_source": {"api_type": "GRPC", "set_node_on_first_message_only": True,
                             "transport_api_version": "V3",
                             "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
       "initial_fetch_timeout": "0s", "resource_api_version": "V3"}


# -- resources -------------------------------------------------------------------------------------


def istio_tls(san: str = SIDECAR_ID, max_version: str = "TLSv1_3") -> Dict[str, Any]:
    """The ``tlsMode-istio`` socket of Istio's auto-mTLS (``core/cluster_tls.go``)."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS, "sni": SNI,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": max_version},
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": san}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS}}}}}


def cluster(name: str, *, tls: bool = True, san: str = SIDECAR_ID, max_version: str = "TLSv1_3") -> Dict[str, Any]:
    c: Dict[str, Any] = {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                         "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"}
    if tls:
        c["transport_socket_matches"] = [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": istio_tls(san, max_version)},
            {"name": "tlsMode-disabled", "match": {},
             "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}},
        ]
    return c


def endpoints(name: str, ports: Sequence[int], *, istio: bool = True) -> Dict[str, Any]:
    eps = []
    for port in ports:
        ep: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        if istio:
            ep["metadata"] = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
        eps.append(ep)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}


def route(prefix: str, cluster_name: str, retry: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    action: Dict[str, Any] = {"cluster": cluster_name}
    if retry:
        action["retry_policy"] = retry
    return {"match": {"prefix": prefix}, "route": action}


def resources(clusters: List[Dict[str, Any]], eps: List[Dict[str, Any]], routes: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": [HOST, TARGET], "routes": routes}]}],
        "clusters": clusters,
        "endpoints": eps,
    }


@pytest.fixture
def make_mesh(tmp_path: Any):
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


def standard(sidecar: SidecarInbound, san: str = SIDECAR_ID, max_version: str = "TLSv1_3") -> Dict[str, Any]:
    """``/`` -> ``mtls`` (the sidecar), ``/plain`` -> ``plain`` (the app behind it, plaintext),
    ``/raw`` -> ``raw-to-sidecar`` (the sidecar's port, plaintext: Envoy drops such connections)."""
    return resources(
        [cluster("mtls", san=san, max_version=max_version), cluster("plain", tls=False), cluster("raw-to-sidecar", tls=False)],
        [endpoints("mtls", [sidecar.port]), endpoints("plain", [sidecar.app_port], istio=False),
         endpoints("raw-to-sidecar", [sidecar.port], istio=False)],
        [route("/plain", "plain"), route("/raw", "raw-to-sidecar"), route("/", "mtls")])


def stat(mesh: meshcore.Mesh, cluster_name: str, name: str) -> int:
    return int(mesh.stats().get(cluster_name, {}).get(name, 0))


def xfcc_uri(body: Dict[str, Any]) -> Optional[str]:
    m = re.search(r"URI=([^;,]+)", body.get("xfcc") or "")
    return m.group(1) if m else None


def xfcc_hash(body: Dict[str, Any]) -> Optional[str]:
    m = re.search(r"Hash=([0-9a-f]+)", body.get("xfcc") or "")
    return m.group(1) if m else None


def cert_hash(leaf: Any) -> str:
    """Envoy's XFCC ``Hash``: SHA-256 of the client certificate's DER."""
    return hashlib.sha256(leaf.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the tests -------------------------------------------------------------------------------------


def test_mtls_reaches_the_app_with_the_workload_identity_and_reuses_the_connection(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any) -> None:
    mesh = make_mesh(standard(sidecar), pki.paths("client").dir)
    seen_before = len(sidecar.app.requests)

    async def main() -> List[Any]:
        async with MeshSession(mesh) as http:
            out = []
            for i in range(5):
                async with http.get(f"{URL}/items/{i}") as r:
                    out.append((r.status, r.headers.get("x-inbound-chain"), await r.json(), r.meshcore))
            r = await http.get(f"{URL}/plain/x")  # a plaintext cluster through the same client
            out.append((r.status, r.headers.get("x-inbound-chain"), await r.json(), r.meshcore))
            return out

    out = run(main())
    for i, (status, chain, body, info) in enumerate(out[:5]):
        # the HTTP filter chain (the Istio ALPN was offered), the client's SPIFFE ID in XFCC
        assert status == 200 and chain == HTTP_CHAIN, (status, chain, body)
        assert body["path"] == f"/items/{i}" and body["host"] == TARGET
        assert xfcc_uri(body) == CLIENT_ID and xfcc_hash(body) == cert_hash(pki.client)
        assert info["cluster"] == "mtls" and info["endpoint"] == f"127.0.0.1:{sidecar.port}"
    status, chain, body, info = out[5]
    assert status == 200 and chain is None and body["xfcc"] is None and info["cluster"] == "plain"
    assert len(sidecar.app.requests) == seen_before + 6
    # one handshake for five requests: the connection was reused
    assert stat(mesh, "mtls", "ssl.handshake") == 1
    assert stat(mesh, "mtls", "ssl.connection_error") == 0


def test_tls_and_plaintext_connections_to_one_address_are_pooled_apart(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any) -> None:
    """``raw-to-sidecar`` is plaintext to the sidecar's own port: it must get its own connection
    (which the STRICT sidecar drops), never the pooled mTLS one -- and vice versa."""
    mesh = make_mesh(standard(sidecar), pki.paths("client").dir)

    async def main() -> None:
        async with MeshSession(mesh) as http:
            assert (await http.get(f"{URL}/a")).status == 200
            with pytest.raises(aiohttp.ClientConnectionError) as info:
                await http.get(f"{URL}/raw")
            assert not isinstance(info.value, MeshTlsError)
            r = await http.get(f"{URL}/b")
            assert r.status == 200 and xfcc_uri(await r.json()) == CLIENT_ID

    run(main())
    assert stat(mesh, "mtls", "ssl.handshake") == 1


def test_san_mismatch_is_a_connect_error_naming_cluster_endpoint_and_sans(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any) -> None:
    mesh = make_mesh(standard(sidecar, san=spiffe_id("server")), pki.paths("client").dir)
    before = len(sidecar.app.requests)

    async def main() -> BaseException:
        async with MeshSession(mesh) as http:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.get(f"{URL}/x")
            assert (await http.get(f"{URL}/plain/x")).status == 200  # the client still works
            return info.value

    exc = run(main())
    assert isinstance(exc, MeshTlsError) and isinstance(exc, aiohttp.ClientSSLError)
    cause = exc.__cause__
    assert isinstance(cause, TlsHandshakeError) and cause.kind == "connect-failure"
    assert cause.stat == "ssl.fail_verify_san"
    msg = str(exc)
    assert "cluster mtls" in msg and f"127.0.0.1:{sidecar.port}" in msg
    assert SIDECAR_ID in msg and spiffe_id("server") in msg  # what the peer had, what was expected
    assert len(sidecar.app.requests) == before + 1  # only /plain: nothing was sent on the TLS connection
    assert stat(mesh, "mtls", "ssl.fail_verify_san") == 1 and stat(mesh, "mtls", "ssl.handshake") == 0
    assert stat(mesh, "mtls", "upstream_cx_connect_fail") == 1


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_certificate_from_a_foreign_ca_is_refused_as_a_connect_error(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any, version: str) -> None:
    """TLS 1.3: the sidecar refuses the client certificate after the client's handshake finished;
    the first read fails. That is a connect failure too (the request never reached the app), and
    aiohttp must not resend it on a new connection by itself. TLS 1.2: the handshake fails."""
    mesh = make_mesh(standard(sidecar, max_version=version), pki.paths("evil_client").dir)
    before = len(sidecar.app.requests)

    async def main() -> BaseException:
        async with MeshSession(mesh) as http:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.get(f"{URL}/x")
            return info.value

    exc = run(main())
    assert isinstance(exc, MeshTlsError), repr(exc)
    assert isinstance(exc.__cause__, TlsHandshakeError) and exc.__cause__.kind == "connect-failure"
    msg = str(exc)
    assert "cluster mtls" in msg and f"127.0.0.1:{sidecar.port}" in msg
    assert len(sidecar.app.requests) == before
    assert stat(mesh, "mtls", "upstream_cx_connect_fail") == 1
    if version == "TLSv1_3":
        # then the alert (UNKNOWN_CA) or EPIPE, by timing; one connection: aiohttp did not resend
        assert "refused this workload's certificate" in msg
        assert stat(mesh, "mtls", "ssl.handshake") == stat(mesh, "mtls", "ssl.connection_error") == REFUSALS_PER_REQUEST
    else:
        assert "TLS handshake failed" in msg and "UNKNOWN_CA" in msg
        assert stat(mesh, "mtls", "ssl.handshake") == 0 and stat(mesh, "mtls", "ssl.connection_error") == 1


def test_identity_rbac_does_not_allow_gets_403(pki: Pki, sidecar: SidecarInbound, make_mesh: Any) -> None:
    mesh = make_mesh(standard(sidecar), pki.paths("other_sa").dir)

    async def main() -> Any:
        async with MeshSession(mesh) as http:
            r = await http.get(f"{URL}/x")
            return r.status, r.headers.get("x-inbound-chain"), await r.text()

    status, chain, text = run(main())
    assert status == 403 and chain == HTTP_CHAIN and "RBAC: access denied" in text
    assert stat(mesh, "mtls", "ssl.handshake") == 1


def test_connect_failure_retry_moves_a_tls_refusal_to_another_endpoint(
        pki: Pki, sidecar: SidecarInbound, sidecar_factory: Any, make_mesh: Any) -> None:
    """One endpoint is a sidecar of another trust domain: it refuses this workload's certificate
    after the handshake (TLS 1.3). ``retry_on: connect-failure`` moves those requests to the good
    one, and outlier detection counts the refusals (connect failures) and ejects that endpoint."""
    foreign = sidecar_factory(trust_domains=("other.domain",))
    retry = {"retry_on": "connect-failure", "num_retries": 2}
    mtls = cluster("mtls")
    mtls["outlier_detection"] = {"consecutive_5xx": 2, "interval": "10s", "base_ejection_time": "30s",
                                 "max_ejection_percent": 50}
    res = resources([mtls], [endpoints("mtls", [foreign.port, sidecar.port])], [route("/", "mtls", retry)])
    mesh = make_mesh(res, pki.paths("client").dir)

    async def requests(http: MeshSession, n: int) -> List[Any]:
        out = []
        for _ in range(n):
            r = await http.get(f"{URL}/r")
            out.append((r.status, xfcc_uri(await r.json()), r.meshcore))
        return out

    async def main() -> None:
        async with MeshSession(mesh) as http:
            for status, uri, info in await requests(http, 6):
                assert status == 200 and uri == CLIENT_ID and info["endpoint"] == f"127.0.0.1:{sidecar.port}"
            refusals = stat(mesh, "mtls", "ssl.connection_error")
            assert refusals >= 2 * REFUSALS_PER_REQUEST
            assert stat(mesh, "mtls", "upstream_cx_connect_fail") * REFUSALS_PER_REQUEST == refusals
            assert stat(mesh, "mtls", "upstream_rq_retry") >= 2
            assert stat(mesh, "mtls", "outlier_detection.ejections_enforced_total") == 1
            for status, _, info in await requests(http, 4):  # the refusing endpoint is ejected
                assert status == 200 and info["attempts"] == 1
            assert stat(mesh, "mtls", "ssl.connection_error") == refusals

    run(main())


def test_rotation_under_load_loses_nothing_and_new_connections_use_the_new_certificate(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any, tmp_path: Any) -> None:
    certs = tmp_path / "certs"
    write_istio_dir(certs, pki.client)
    source = FileCertificateSource.from_directory(str(certs), refresh_interval=0.05)
    mesh = make_mesh(standard(sidecar), source)
    new = pki.root.issue(CLIENT_ID)
    old_hash, new_hash = cert_hash(pki.client), cert_hash(new)
    results: List[Any] = []

    async def main() -> None:
        done = asyncio.Event()
        # pooled connections (they keep their certificate), and a new connection per request
        pooled = MeshSession(mesh)
        fresh = MeshSession(mesh, aiohttp.ClientSession(connector=MeshConnector(force_close=True)))

        async def load(kind: str, http: MeshSession) -> None:
            while not done.is_set():
                r = await http.get(f"{URL}/{kind}")
                results.append((kind, r.status, xfcc_hash(await r.json())))

        tasks = [asyncio.ensure_future(load(*a)) for a in (("pooled", pooled), ("pooled", pooled), ("fresh", fresh))]
        await asyncio.sleep(0.3)
        write_key_only(certs, new)  # Istio's order: key, chain, roots (a mismatched pair between)
        await asyncio.sleep(0.15)
        write_istio_dir(certs, new)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if [h for kind, _, h in results[-6:] if kind == "fresh" and h == new_hash]:
                break
        await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*tasks)
        await pooled.close()
        await fresh.session.close()

    run(main())
    assert results and all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:5]
    fresh = [h for kind, _, h in results if kind == "fresh"]
    assert fresh[0] == old_hash and fresh[-1] == new_hash and set(fresh) == {old_hash, new_hash}
    first_new = fresh.index(new_hash)
    assert all(h == new_hash for h in fresh[first_new:])  # no going back after the switch
    pooled = [h for kind, _, h in results if kind == "pooled"]
    assert pooled[0] == old_hash and len(pooled) > 10
    assert pooled[-1] == old_hash  # connections already open keep their certificate (as Envoy's)
    assert source.identity().generation == 2  # the half-written pair in between was never used
    assert stat(mesh, "mtls", "ssl.connection_error") == 0


def test_missing_certificates_never_fall_back_to_plaintext(
        pki: Pki, sidecar: SidecarInbound, make_mesh: Any, tmp_path: Any) -> None:
    mesh = make_mesh(standard(sidecar), str(tmp_path / "no-certs"))
    before = len(sidecar.app.requests)

    async def main() -> BaseException:
        async with MeshSession(mesh) as http:
            with pytest.raises(MeshTlsError) as info:
                await http.get(f"{URL}/x")
            assert (await http.get(f"{URL}/plain/x")).status == 200
            return info.value

    exc = run(main())
    assert isinstance(exc.__cause__, TlsHandshakeError) and "mtls" in str(exc)
    assert len(sidecar.app.requests) == before + 1  # only /plain
    assert stat(mesh, "mtls", "upstream_cx_connect_fail") == 1


def test_sessions_given_by_the_app(pki: Pki, sidecar: SidecarInbound, make_mesh: Any) -> None:
    """A session with a plain TCPConnector gets the mesh TLS hook; one whose connector is another
    class cannot do mesh TLS and fails before sending anything (never plaintext); an https://
    URL to a mesh TLS cluster is refused (mesh TLS goes under http://)."""
    mesh = make_mesh(standard(sidecar), pki.paths("client").dir)
    before = len(sidecar.app.requests)

    class OwnConnector(aiohttp.TCPConnector):
        pass

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            r = await MeshSession(mesh, s).get(f"{URL}/given")
            assert r.status == 200 and xfcc_uri(await r.json()) == CLIENT_ID
            assert isinstance(s.connector, MeshConnector)
        async with aiohttp.ClientSession(connector=OwnConnector()) as s:
            with pytest.raises(MeshTlsError, match="cannot make mesh TLS connections"):
                await MeshSession(mesh, s).get(f"{URL}/own")
            assert (await MeshSession(mesh, s).get(f"{URL}/plain/x")).status == 200
        async with MeshSession(mesh) as http:
            with pytest.raises(aiohttp.ClientError, match="use an http:// URL"):
                await http.get(f"https://{TARGET}/tls")

    run(main())
    assert [r["path"] for r in sidecar.app.requests[before:]] == ["/given", "/plain/x"]
