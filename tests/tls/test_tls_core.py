"""meshcore.tls without an integration: certificate sources and rotation, SAN matching, the client
contexts and peer checks against real TLS servers on loopback, socket selection per endpoint."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from meshcore._model import Endpoint
from meshcore._route_model import StringMatchSpec
from meshcore.tls import (CertificatesUnavailable, FileCertificateSource, TlsHandshakeError, TlsManager,
                          is_deferred_rejection, socket_spec_for)
from meshcore.tls.san import dns_name_match, peer_sans, sans_match
from meshcore.xds.model import (CertificateRef, ClusterSpec, SanMatcherSpec, TransportSocketMatchSpec,
                                UpstreamTlsSpec)
from meshcore.xds.route_config import compile_regex

from .pki import Pki, spiffe_id, write_istio_dir, write_key_only, write_mismatched_pair

SDS_DEFAULT = CertificateRef("sds", "default")
SDS_ROOTS = CertificateRef("sds", "ROOTCA")


def exact_uri(value: str) -> SanMatcherSpec:
    return SanMatcherSpec("URI", StringMatchSpec("exact", value))


def mtls_spec(*sans: SanMatcherSpec, **kw: Any) -> UpstreamTlsSpec:
    return UpstreamTlsSpec(identity=SDS_DEFAULT, roots=SDS_ROOTS, san_matchers=tuple(sans), **kw)


# -- a loopback TLS server ---------------------------------------------------------------------------


class TlsServer:
    """Accepts TLS connections with ``ctx``; answers each with the peer's URI SANs and the ALPN chosen."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: List[Tuple[Optional[str], Any]] = []
        self.errors: List[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                self.seen.append((tls.selected_alpn_protocol(), peer))
                data = tls.recv(100)
                if data:
                    tls.sendall(b"ok:" + data)
        except (OSError, ssl.SSLError) as e:
            self.errors.append(str(e))

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture()
def server_factory():
    servers: List[TlsServer] = []

    def make(ctx: ssl.SSLContext) -> TlsServer:
        s = TlsServer(ctx)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def connect(up: Any, port: int) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return up.wrap_socket(sock, f"127.0.0.1:{port}")


class Stats:
    def __init__(self) -> None:
        self.counts: Dict[Tuple[str, str], int] = {}

    def recorder(self, cluster: str) -> Any:
        def record(stat: str) -> None:
            self.counts[(cluster, stat)] = self.counts.get((cluster, stat), 0) + 1
        return record


def manager(pki: Pki, name: str = "client", stats: Optional[Stats] = None) -> TlsManager:
    return TlsManager(None, pki.paths(name).dir, (stats or Stats()).recorder)


# -- certificate sources -------------------------------------------------------------------------------


def test_identity_of_an_istio_directory(pki: Pki) -> None:
    src = FileCertificateSource.from_directory(pki.paths("client").dir)
    ident = src.identity()
    assert ident.spiffe_id == spiffe_id("client") == "spiffe://cluster.local/ns/default/sa/client"
    assert ident.root_count == 1 and ident.generation == 1 and ident.problem is None
    assert 23 * 3600 < ident.seconds_left <= 24 * 3600
    assert ident.as_dict()["spiffe_id"] == ident.spiffe_id


def test_two_level_chain_and_expired_leaf(pki: Pki, caplog: Any) -> None:
    assert FileCertificateSource.from_directory(pki.paths("client_via_intermediate").dir).identity().problem is None
    src = FileCertificateSource.from_directory(pki.paths("expired_client").dir)
    with caplog.at_level("WARNING", logger="meshcore.tls.certificates"):
        expired = src.identity()
        src.refresh(force=True)
    assert expired.seconds_left < 0 and "expired" in expired.problem
    warnings = [r.getMessage() for r in caplog.records if "expired" in r.getMessage()]
    assert len(warnings) == 2 and "expired_client" in warnings[0]  # once per generation


def test_missing_files_mean_no_tls_with_a_clear_error(tmp_path: Any) -> None:
    src = FileCertificateSource.from_directory(str(tmp_path))
    with pytest.raises(CertificatesUnavailable, match="cert-chain.pem"):
        src.current()
    ident = src.identity()
    assert ident.generation == 0 and "cannot read" in ident.problem and "cert-chain.pem" in ident.problem


def test_rotation_keeps_the_last_good_pair_until_both_files_changed(pki: Pki, tmp_path: Any) -> None:
    d = str(tmp_path / "certs")
    old = pki.root.issue(spiffe_id("rotating"))
    write_istio_dir(d, old, roots=[pki.root])
    src = FileCertificateSource.from_directory(d, refresh_interval=0.05)
    first = src.current()
    assert first.generation == 1 and src.identity().spiffe_id == spiffe_id("rotating")
    new = pki.root.issue(spiffe_id("rotated"))
    write_key_only(d, new)  # the agent writes key.pem first: a mismatched pair for a moment
    assert src.refresh(force=True) is False
    assert src.current() is first and "KEY_VALUES_MISMATCH" in src.problem
    assert src.reload_failures == 1
    write_istio_dir(d, new, roots=[pki.root])
    time.sleep(1.05)  # after an error the next look is one second later
    assert src.current().generation == 2
    assert src.identity().spiffe_id == spiffe_id("rotated") and src.problem is None


def test_unchanged_files_are_not_read_again(pki: Pki) -> None:
    src = FileCertificateSource.from_directory(pki.paths("client").dir, refresh_interval=0.01)
    first = src.current()
    time.sleep(0.02)
    assert src.current() is first and src.reloads == 1


def test_roots_only_and_bad_arguments(pki: Pki, tmp_path: Any) -> None:
    src = FileCertificateSource(ca_certificate_file=pki.root_file)
    s = src.current()
    assert s.chain_pem is None and s.root_count == 1 and src.identity().spiffe_id is None
    with pytest.raises(ValueError, match="go together"):
        FileCertificateSource(certificate_file=pki.paths("client").chain)
    with pytest.raises(ValueError, match="refresh_interval"):
        FileCertificateSource(ca_certificate_file=pki.root_file, refresh_interval=0)
    garbage = tmp_path / "roots.pem"
    garbage.write_text("not a certificate")
    bad = FileCertificateSource(ca_certificate_file=str(garbage))
    with pytest.raises(CertificatesUnavailable, match="PEM"):
        bad.current()


# -- SAN matching (Envoy semantics) --------------------------------------------------------------------


@pytest.mark.parametrize("expected,san,ok", [
    ("api.example.com", "api.example.com", True),
    ("API.example.com", "api.EXAMPLE.com", True),
    ("api.example.com", "*.example.com", True),
    ("a.b.example.com", "*.example.com", False),  # one label only
    ("example.com", "*.example.com", False),
    ("api.example.com", "*.other.com", False),
    ("*.example.com", "*.example.com", True),
])
def test_dns_name_match(expected: str, san: str, ok: bool) -> None:
    assert dns_name_match(expected, san) is ok


def _cert(*sans: Tuple[str, str]) -> Dict[str, Any]:
    return {"subject": (), "subjectAltName": sans}


def test_untyped_matchers_try_dns_uri_email_and_ip() -> None:
    m = [SanMatcherSpec("", StringMatchSpec("exact", "127.0.0.1"))]
    assert sans_match(m, peer_sans(_cert(("IP Address", "127.0.0.1"))))
    m6 = [SanMatcherSpec("", StringMatchSpec("exact", "2001:db8::1"))]
    assert sans_match(m6, peer_sans(_cert(("IP Address", "2001:DB8:0:0:0:0:0:1\n"))))
    mail = [SanMatcherSpec("", StringMatchSpec("exact", "a@b.c"))]
    assert sans_match(mail, peer_sans(_cert(("email", "a@b.c"))))
    assert sans_match(mail, peer_sans(_cert(("DNS", "a@b.c"))))  # untyped: any type
    assert not sans_match([SanMatcherSpec("EMAIL", StringMatchSpec("exact", "a@b.c"))],
                          peer_sans(_cert(("DNS", "a@b.c"), ("othername", "<unsupported>"))))


def test_typed_matchers_only_look_at_their_type() -> None:
    sid = spiffe_id("server")
    cert = peer_sans(_cert(("URI", sid)))
    assert sans_match([exact_uri(sid)], cert)
    assert not sans_match([SanMatcherSpec("DNS", StringMatchSpec("exact", sid))], cert)
    assert sans_match([SanMatcherSpec("URI", StringMatchSpec("prefix", "spiffe://cluster.local/"))], cert)
    assert not sans_match([SanMatcherSpec("URI", StringMatchSpec("prefix", "spiffe://other/"))], cert)
    rx = compile_regex(r"spiffe://.+/ns/default/sa/.*", "c", "f")
    assert sans_match([SanMatcherSpec("URI", StringMatchSpec("regex", rx.pattern, False, rx))], cert)
    assert sans_match([SanMatcherSpec("URI", StringMatchSpec("exact", sid.upper(), True))], cert)
    assert not sans_match([exact_uri(sid.upper())], cert)
    assert sans_match([], cert)  # no matchers: no check
    assert not sans_match([exact_uri(sid)], peer_sans(_cert()))


# -- client contexts and peer checks against real servers ----------------------------------------------


def test_mtls_to_a_server_that_requires_a_client_certificate(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("server", alpn=["istio-http/1.1", "http/1.1"], require_client_cert=True))
    stats = Stats()
    up = manager(pki, stats=stats).upstream("c1", mtls_spec(exact_uri(spiffe_id("server"))))
    with connect(up, srv.port) as tls:
        tls.sendall(b"hi")
        assert tls.recv(10) == b"ok:hi"
    alpn, peer = srv.seen[-1]
    assert alpn == "istio-http/1.1"  # Istio's ALPN was offered (the server picked its first)
    assert peer["subjectAltName"] == (("URI", spiffe_id("client")),)
    assert stats.counts == {("c1", "ssl.handshake"): 1}


def test_h2_offers_istio_h2(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("server", alpn=["h2"], require_client_cert=True))
    up = manager(pki).upstream("c1", mtls_spec())
    assert up.alpn("h2") == ("istio-h2", "istio", "h2")
    with up.wrap_socket(socket.create_connection(("127.0.0.1", srv.port)), "ep", "h2") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(b"x")
        assert tls.recv(10) == b"ok:x"


def test_configured_alpn_is_offered_as_it_is_unless_istio(pki: Pki) -> None:
    m = manager(pki)
    assert m.upstream("c", mtls_spec(alpn_protocols=("h2", "http/1.1"))).alpn() == ("h2", "http/1.1")
    istio = m.upstream("c", mtls_spec(alpn_protocols=("istio-peer-exchange", "istio")))
    assert istio.alpn() == ("istio-http/1.1", "istio", "http/1.1")
    # raw TCP: never istio-peer-exchange (the server's sidecar would expect Istio's in-band exchange)
    assert istio.alpn("tcp") == ("istio",)


def test_san_mismatch_is_a_connect_failure_naming_both_sides(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("other_sa", require_client_cert=True))
    stats = Stats()
    up = manager(pki, stats=stats).upstream("reviews", mtls_spec(exact_uri(spiffe_id("server"))))
    with pytest.raises(TlsHandshakeError) as ei:
        connect(up, srv.port)
    e = ei.value
    assert e.kind == "connect-failure" and e.stat == "ssl.fail_verify_san"
    text = str(e)
    assert "reviews" in text and f"127.0.0.1:{srv.port}" in text
    assert spiffe_id("other") in text and spiffe_id("server") in text
    assert stats.counts == {("reviews", "ssl.fail_verify_san"): 1}


def test_server_from_a_foreign_ca_fails_verification(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("evil_client"))
    stats = Stats()
    up = manager(pki, stats=stats).upstream("c", mtls_spec())
    with pytest.raises(TlsHandshakeError, match="failed verification") as ei:
        connect(up, srv.port)
    assert ei.value.stat == "ssl.fail_verify_error"


def test_expired_server_certificate_fails_verification(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("expired_client"))
    up = manager(pki).upstream("c", mtls_spec())
    with pytest.raises(TlsHandshakeError, match="expired"):
        connect(up, srv.port)


def test_rejected_client_certificate_under_tls13_is_seen_on_the_first_read(pki: Pki, server_factory: Any) -> None:
    # the server trusts only the evil root: it refuses our (mesh) client certificate after the handshake
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.paths("server").chain, pki.paths("server").key)
    ctx.load_verify_locations(pki.evil_root_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = server_factory(ctx)
    up = manager(pki).upstream("c", mtls_spec())
    try:
        tls = connect(up, srv.port)  # TLS 1.3: the client's handshake completes
    except TlsHandshakeError:
        pytest.fail("the rejection should come after the handshake under TLS 1.3")
    with pytest.raises(Exception) as ei:
        tls.sendall(b"x")
        tls.recv(10)
    assert is_deferred_rejection(ei.value)
    err = up.deferred_rejection(ei.value, "ep")
    assert err.kind == "connect-failure" and "refused this workload's certificate" in str(err)
    tls.close()


def test_tls12_rejection_fails_in_the_handshake(pki: Pki, server_factory: Any) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.paths("server").chain, pki.paths("server").key)
    ctx.load_verify_locations(pki.evil_root_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = server_factory(ctx)
    up = manager(pki).upstream("c", mtls_spec(max_version="TLSv1_2"))
    with pytest.raises(TlsHandshakeError, match="handshake failed") as ei:
        connect(up, srv.port)
    assert ei.value.stat == "ssl.connection_error"


def test_libraries_cannot_weaken_the_context(pki: Pki, server_factory: Any) -> None:
    up = manager(pki).upstream("c", mtls_spec(exact_uri(spiffe_id("server"))))
    ctx = up.context()
    # what urllib3 / httpcore / requests do to a context they are given
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = True
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_verify_locations(cafile=pki.evil_root_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is False
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1
    evil = server_factory(pki.server_context("evil_client"))
    with pytest.raises(TlsHandshakeError):
        connect(up, evil.port)
    good = server_factory(pki.server_context("server", alpn=["istio-http/1.1", "http/1.1"]))
    with connect(up, good.port) as tls:
        tls.sendall(b"x")
        assert tls.recv(10) == b"ok:x"
    assert good.seen[-1][0] == "istio-http/1.1"


def test_rotation_gives_new_connections_the_new_certificate(pki: Pki, tmp_path: Any, server_factory: Any) -> None:
    d = str(tmp_path / "me")
    write_istio_dir(d, pki.root.issue(spiffe_id("gen1")), roots=[pki.root])
    src = FileCertificateSource.from_directory(d, refresh_interval=0.05)
    m = TlsManager(None, src)
    up = m.upstream("c", mtls_spec())
    srv = server_factory(pki.server_context("server", require_client_cert=True))
    held = connect(up, srv.port)
    write_istio_dir(d, pki.root.issue(spiffe_id("gen2")), roots=[pki.root])
    time.sleep(0.1)
    with connect(up, srv.port) as tls:
        tls.sendall(b"x")
        tls.recv(10)
    assert srv.seen[-1][1]["subjectAltName"] == (("URI", spiffe_id("gen2")),)
    held.sendall(b"y")  # the connection made before keeps working
    assert held.recv(10) == b"ok:y"
    held.close()
    assert src.identity().spiffe_id == spiffe_id("gen2")


def test_one_way_tls_without_an_identity(pki: Pki, server_factory: Any) -> None:
    srv = server_factory(pki.server_context("server", require_client_cert=False))
    up = manager(pki).upstream("c", UpstreamTlsSpec(roots=SDS_ROOTS, sni="server.example"))
    assert up.mutual is False and up.server_hostname() == "server.example"
    with connect(up, srv.port) as tls:
        assert tls.getpeercert()["subjectAltName"] == (("URI", spiffe_id("server")),)
        tls.sendall(b"x")
        assert tls.recv(10) == b"ok:x"
    assert not srv.seen[-1][1]  # no client certificate sent


# -- where certificates come from ------------------------------------------------------------------------


def test_no_certificates_is_a_clear_connect_failure(monkeypatch: Any) -> None:
    monkeypatch.delenv("MESHCORE_CERTIFICATES", raising=False)
    m = TlsManager(None, None)
    if m.workload_source() is not None:  # this machine has Istio's directories
        pytest.fail("unexpected workload certificates on the test machine")
    with pytest.raises(TlsHandshakeError, match="no certificates"):
        m.upstream("c", mtls_spec())


def test_environment_variable_and_provider_names(pki: Pki, monkeypatch: Any) -> None:
    monkeypatch.setenv("MESHCORE_CERTIFICATES", pki.paths("client").dir)
    assert TlsManager(None, None).identity().spiffe_id == spiffe_id("client")

    class Provider:
        plugin_name = "file_watcher"
        certificate_file = pki.paths("server").chain
        private_key_file = pki.paths("server").key
        ca_certificate_file = pki.root_file
        refresh_interval = 600.0

    m = TlsManager({"mine": Provider()}, None)
    up = m.upstream("c", UpstreamTlsSpec(identity=CertificateRef("provider", "mine", "default"),
                                         roots=CertificateRef("provider", "mine", "ROOTCA")))
    assert up.context() is up.context()
    with pytest.raises(TlsHandshakeError, match="unrecognized certificate provider instance name: 'nope'"):
        m.upstream("c", UpstreamTlsSpec(roots=CertificateRef("provider", "nope")))


def test_istio_file_secrets(pki: Pki) -> None:
    p = pki.paths("server")
    m = TlsManager(None, None)
    spec = UpstreamTlsSpec(identity=CertificateRef("sds", f"file-cert:{p.chain}~{p.key}"),
                           roots=CertificateRef("sds", f"file-root:{pki.root_file}"))
    up = m.upstream("c", spec)
    assert up.mutual and up.context().verify_mode == ssl.CERT_REQUIRED


# -- which socket an endpoint gets ------------------------------------------------------------------------


def _ep(port: int, md: Optional[Dict[str, Any]] = None) -> Endpoint:
    return Endpoint("10.0.0.1", port, metadata=md)


def test_transport_socket_matches_pick_per_endpoint() -> None:
    mtls = mtls_spec(exact_uri("spiffe://x"))
    spec = ClusterSpec("c", "EDS", transport_socket_matches=(
        TransportSocketMatchSpec("tlsMode-istio", (("tlsMode", "istio"),), mtls),
        TransportSocketMatchSpec("tlsMode-disabled", (), None),
    ))
    istio = _ep(1, {"envoy.transport_socket_match": {"tlsMode": "istio"}})
    plain = _ep(2, {"envoy.transport_socket_match": {"tlsMode": "disabled"}})
    assert socket_spec_for(spec, istio) is mtls
    assert socket_spec_for(spec, plain) is None
    assert socket_spec_for(spec, _ep(3)) is None
    # no catch-all: the cluster's own transport_socket is the default
    other = mtls_spec()
    spec2 = ClusterSpec("c", "EDS", tls=other, transport_socket_matches=(
        TransportSocketMatchSpec("istio", (("tlsMode", "istio"),), mtls),))
    assert socket_spec_for(spec2, istio) is mtls
    assert socket_spec_for(spec2, _ep(3)) is other
    multi = ClusterSpec("c", "EDS", transport_socket_matches=(
        TransportSocketMatchSpec("both", (("a", "1"), ("b", ("x", "y"))), mtls),))
    assert socket_spec_for(multi, _ep(4, {"envoy.transport_socket_match": {"a": "1", "b": ["x", "y"]}})) is mtls
    assert socket_spec_for(multi, _ep(4, {"envoy.transport_socket_match": {"a": "1"}})) is None


# -- A87: SPIFFE trust bundle maps ------------------------------------------------------------------------


def _bundle_map(path: Any, domains: Dict[str, List[Any]]) -> str:
    import base64
    import json

    from cryptography.hazmat.primitives.serialization import Encoding

    doc = {"trust_domains": {td: {"keys": [{"use": "x509-svid", "kty": "EC",
                                            "x5c": [base64.b64encode(ca.cert.public_bytes(Encoding.DER)).decode()]}
                                           for ca in cas] + [{"use": "jwt-svid", "kid": "ignored"}]}
                             for td, cas in domains.items()}}
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def test_spiffe_bundle_map_checks_each_peer_against_its_own_trust_domain(pki: Pki, tmp_path: Any,
                                                                          server_factory: Any) -> None:
    bundle = _bundle_map(tmp_path / "bundles.json", {"cluster.local": [pki.root], "other.domain": [pki.evil_root]})
    me = pki.paths("client")
    src = FileCertificateSource(me.chain, me.key, ca_certificate_file="/nonexistent/ignored.pem",
                                spiffe_trust_bundle_map_file=bundle)
    assert src.identity().root_count == 2
    up = TlsManager(None, src).upstream("c", mtls_spec())
    for good in ("server", "client_via_intermediate"):
        srv = server_factory(pki.server_context(good))
        connect(up, srv.port).close()
    # a cluster.local identity issued by the other domain's root: OpenSSL accepts (the union), A87 does not
    evil = server_factory(pki.server_context("evil_client"))
    with pytest.raises(TlsHandshakeError, match="not in trust domain 'cluster.local'"):
        connect(up, evil.port)
    # an other.domain identity issued by the cluster.local root
    other = server_factory(pki.server_context("other_td_client"))
    with pytest.raises(TlsHandshakeError, match="not in trust domain 'other.domain'"):
        connect(up, other.port)


def test_spiffe_bundle_map_unknown_domain_and_bad_files(pki: Pki, tmp_path: Any, server_factory: Any) -> None:
    bundle = _bundle_map(tmp_path / "b.json", {"spiffe://other.domain": [pki.root]})
    me = pki.paths("client")
    up = TlsManager(None, FileCertificateSource(me.chain, me.key, spiffe_trust_bundle_map_file=bundle)).upstream(
        "c", mtls_spec())
    srv = server_factory(pki.server_context("server"))
    with pytest.raises(TlsHandshakeError, match="no trust bundle for trust domain 'cluster.local'"):
        connect(up, srv.port)
    for text, msg in (("[]", "trust_domains"), ("{", "not JSON"),
                      ('{"trust_domains": {"a": {"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}}}', "base64"),
                      ('{"trust_domains": {"a": {"keys": []}}}', "no x509-svid")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(CertificatesUnavailable, match=msg):
            FileCertificateSource(spiffe_trust_bundle_map_file=str(bad)).current()


def test_forget_drops_the_sockets_of_removed_clusters(pki: Pki) -> None:
    m = manager(pki)
    a = m.upstream("a", mtls_spec())
    m.upstream("b", mtls_spec())
    m.forget(["b"])
    assert m.upstream("a", mtls_spec()) is a
    assert {k[0] for k in m._upstreams} == {"a"}



def test_forget_drops_file_secret_sources_no_socket_uses(pki: Pki) -> None:
    # Istio's file-cert:/file-root: SDS names make a source per file set; a removed cluster's
    # sources go with it unless another socket still uses them
    m = manager(pki)
    p = pki.paths("client")

    def files_spec(chain: str) -> UpstreamTlsSpec:
        return UpstreamTlsSpec(identity=CertificateRef("sds", f"file-cert:{chain}~{p.key}"),
                               roots=CertificateRef("sds", f"file-root:{pki.root_file}"))
    m.upstream("a", files_spec(p.chain))
    m.upstream("b", files_spec(p.chain))
    m.upstream("c", files_spec(p.chain + "."))  # (a name of its own; never read here)
    assert len([n for n in m._sources if n.startswith("sds:file-")]) == 3
    m.forget(["c"])
    assert sorted(n.split(":")[1] for n in m._sources if n.startswith("sds:file-")) == ["file-cert", "file-root"]
    m.forget(["a"])  # b still uses both
    assert len([n for n in m._sources if n.startswith("sds:file-")]) == 2
    m.forget(["b"])
    assert not [n for n in m._sources if n.startswith("sds:file-")]
