"""The mTLS test fixtures behave as ``security.md`` §2, §3.3 and §6 say, on this machine.

Only the standard library (``ssl``, ``http.client``), ``cryptography`` and (for the HTTP/2 app
case) ``grpcio``; no meshcore. The PKI tests run without Envoy; the others share one module-scoped
Envoy (``sidecar``) plus two short-lived ones from ``sidecar_factory``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import stat
import struct
from concurrent import futures
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import pki as pki_mod
from .pki import (CertPaths, Pki, certificate_providers, client_context, grpc_bootstrap, server_context,
                  spiffe_id, write_grpc_bootstrap, write_istio_dir, write_key_only, write_mismatched_pair)
from .sidecar import (ALPN_H2, ALPN_HTTP10, ALPN_HTTP11, ALPN_TCP, HTTP_CHAIN, TCP_CHAIN, SidecarInbound,
                      https_get, tls_attempt)

CLIENT_ID = spiffe_id("client")
SIDECAR_ID = spiffe_id("sidecar")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _memory_handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> Tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two in-memory SSLObjects (no sockets, no threads); raises the
    first failing side's ``ssl.SSLError`` with ``.side`` = "client" or "server"."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError as exc:
                    exc.side = "client" if name == "c" else "server"  # type: ignore[attr-defined]
                    raise
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client cert only now; make it read the last flight.
            try:
                s.read(1)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                exc.side = "server"  # type: ignore[attr-defined]
                raise
            return c, s
    raise AssertionError("handshake did not finish")


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def _h2_frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _h2_get(port: int, ctx: ssl.SSLContext) -> Tuple[Optional[str], bytes, bytes]:
    """``GET /`` over HTTP/2 by hand (HPACK static-table entries, no Huffman): returns
    (negotiated ALPN, the response's header block, its DATA)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            authority = b"app"
            block = b"\x82\x87\x84" + b"\x41" + bytes([len(authority)]) + authority  # GET https / :authority
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 0x5, 1, block))
            buf, head, data = b"", b"", b""
            while True:
                while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                    chunk = tls.recv(65536)
                    assert chunk, f"connection closed; head={head!r} data={data!r}"
                    buf += chunk
                n = int.from_bytes(buf[:3], "big")
                ftype, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + n], buf[9 + n:]
                if ftype == 4 and not flags & 1:  # SETTINGS -> ACK
                    tls.sendall(_h2_frame(4, 1, 0, b""))
                if stream == 1 and ftype == 1:
                    head += payload
                if stream == 1 and ftype == 0:
                    data += payload
                if stream == 1 and ftype in (0, 1) and flags & 1:
                    return tls.selected_alpn_protocol(), head, data
                assert ftype != 3 and ftype != 7, f"stream reset / goaway: {payload!r}"


def _fail_counters(sc: SidecarInbound) -> Dict[str, int]:
    """``listener.*.ssl.fail_*`` / ``handshake`` counters, keyed by their last part."""
    out: Dict[str, int] = {}
    for k, v in sc.stats("listener.").items():
        if ".ssl." in k:
            last = k.rsplit(".ssl.", 1)[1]
            if last.startswith("fail_") or last == "handshake" or last == "connection_error":
                out[last] = out.get(last, 0) + v
    return out


# --------------------------------------------------------------------------------------------
# Certificates (no Envoy)
# --------------------------------------------------------------------------------------------


def test_leaf_has_istios_shape(pki: Pki) -> None:
    leaf = pki.client.cert
    assert leaf.subject == x509.Name([])
    san = _ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(CLIENT_ID)]
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment)
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    root_ski = _ext(pki.root.cert, x509.SubjectKeyIdentifier).value.digest
    assert _ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    now = dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(minutes=1) < now - leaf.not_valid_before_utc < dt.timedelta(minutes=4)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=24, minutes=2)
    assert pki.client.spiffe_id == CLIENT_ID
    assert pki.other_td_client.spiffe_id == "spiffe://other.domain/ns/default/sa/client"
    assert pki.expired_client.cert.not_valid_after_utc < now
    short = pki.root.issue(spiffe_id("short"), ttl=dt.timedelta(seconds=30))
    assert dt.timedelta(seconds=29) < short.cert.not_valid_after_utc - now <= dt.timedelta(seconds=31)
    dns = _ext(pki.server_with_dns.cert, x509.SubjectAlternativeName).value
    assert dns.get_values_for_type(x509.DNSName) == ["localhost"]


def test_cas_have_rfc5280_shape(pki: Pki) -> None:
    for ca in (pki.root, pki.intermediate, pki.evil_root):
        c = ca.cert
        bc = _ext(c, x509.BasicConstraints)
        assert bc.critical and bc.value.ca
        ku = _ext(c, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
        ski = _ext(c, x509.SubjectKeyIdentifier).value.digest
        aki = _ext(c, x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == (ski if ca.parent is None else _ext(ca.parent.cert, x509.SubjectKeyIdentifier).value.digest)
    assert pki.intermediate.root is pki.root and pki.intermediate.intermediates == (pki.intermediate.cert,)
    assert pki.client_via_intermediate.chain == (pki.intermediate.cert,)


def test_istio_dir_layout_order_and_atomic_writes(pki: Pki, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p = pki.paths("client_via_intermediate")
    with open(p.key, "rb") as f:
        assert f.read().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS8
    with open(p.chain, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    assert chain == [pki.client_via_intermediate.cert, pki.intermediate.cert]  # leaf, then intermediate
    with open(p.roots, "rb") as f:
        assert x509.load_pem_x509_certificates(f.read()) == [pki.root.cert]
    assert stat.S_IMODE(os.stat(p.key).st_mode) == 0o600

    replaced: List[Tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(pki_mod.os, "replace", spy)
    d = tmp_path / "certs"
    paths = write_istio_dir(d, pki.client, roots=[pki.root, pki.evil_root])
    assert [dst for _, dst in replaced] == ["key.pem", "cert-chain.pem", "root-cert.pem"]
    assert all(src.startswith(dst + ".tmp.") for src, dst in replaced)  # tmp file + rename
    assert paths == CertPaths.of(d) and sorted(os.listdir(d)) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    with open(paths.roots, "rb") as f:
        assert len(x509.load_pem_x509_certificates(f.read())) == 2  # a root bundle
    replaced.clear()
    write_istio_dir(d, pki.client, roots=[pki.root, pki.evil_root])
    assert replaced == []  # unchanged files are not rewritten


def test_rotation_leaves_a_mismatched_pair_in_between(pki: Pki, tmp_path: Any) -> None:
    d = tmp_path / "rot"
    write_istio_dir(d, pki.client)
    new = pki.root.issue(CLIENT_ID)
    p = write_key_only(d, new)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ctx.load_cert_chain(p.chain, p.key)
    write_istio_dir(d, new)
    ctx.load_cert_chain(p.chain, p.key)
    q = write_mismatched_pair(tmp_path / "mm", key_of=new, chain_of=pki.client)
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ctx.load_cert_chain(q.chain, q.key)


@pytest.mark.parametrize("server_name,client_name", [
    ("server", "client"),
    ("server", "client_via_intermediate"),
])
def test_certificates_pass_verify_x509_strict(pki: Pki, tmp_path: Any, server_name: str, client_name: str) -> None:
    # Both ends verify with VERIFY_X509_STRICT (client_context/server_context default); also a
    # server whose own chain is 2-level.
    srv_dir = write_istio_dir(tmp_path / "srv2", pki.intermediate.issue(spiffe_id("server")))
    for srv in (pki.paths(server_name), srv_dir):
        cctx = client_context(pki.paths(client_name))
        sctx = server_context(srv)
        assert cctx.verify_flags & ssl.VERIFY_X509_STRICT and sctx.verify_flags & ssl.VERIFY_X509_STRICT
        c, s = _memory_handshake(cctx, sctx)
        assert c.getpeercert()["subject"] == ()
        assert c.getpeercert()["subjectAltName"] == (("URI", spiffe_id("server")),)
        assert s.getpeercert()["subjectAltName"] == (("URI", CLIENT_ID),)


@pytest.mark.parametrize("client_name,reason", [
    ("expired_client", "certificate has expired"),
    ("evil_client", "unable to get local issuer certificate"),
])
def test_verifying_python_server_rejects(pki: Pki, client_name: str, reason: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match=reason) as ei:
        _memory_handshake(pki.client_context(client_name), pki.server_context("server"))
    assert ei.value.side == "server"  # type: ignore[attr-defined]


def test_verifying_python_client_rejects_expired_server(pki: Pki, tmp_path: Any) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    expired = write_istio_dir(tmp_path / "exp", pki.root.issue(spiffe_id("server"), not_before=now - dt.timedelta(days=2),
                                                               not_after=now - dt.timedelta(days=1)))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired") as ei:
        _memory_handshake(pki.client_context("client"), server_context(expired))
    assert ei.value.side == "client"  # type: ignore[attr-defined]


def test_grpc_bootstrap_certificate_providers(pki: Pki, tmp_path: Any) -> None:
    p = pki.paths("client")
    block = certificate_providers(p.dir)
    assert block == {"default": {"plugin_name": "file_watcher", "config": {
        "certificate_file": p.chain, "private_key_file": p.key, "ca_certificate_file": p.roots,
        "refresh_interval": "900s"}}}
    path = write_grpc_bootstrap(tmp_path / "grpc-bootstrap.json", p, server_uri="localhost:15010")
    with open(path) as f:
        boot = json.load(f)
    assert boot["certificate_providers"] == block
    assert boot["xds_servers"][0]["server_uri"] == "localhost:15010"
    assert boot["server_listener_resource_name_template"] == "xds.istio.io/grpc/lds/inbound/%s"
    assert boot["node"]["metadata"]["GENERATOR"] == "grpc"
    assert "certificate_providers" not in grpc_bootstrap(None)  # no OUTPUT_CERTS, no block


# --------------------------------------------------------------------------------------------
# The sidecar (real Envoy)
# --------------------------------------------------------------------------------------------


@pytest.mark.envoy
def test_sidecar_config_validates(pki: Pki) -> None:
    for kw in ({}, {"app_port": 1, "app_http2": True, "allowed_principals": None},
               {"trust_domains": ("cluster.local", "other.domain")}):
        sc = SidecarInbound(pki.paths("sidecar"), **kw)
        try:
            r = sc.validate()
            assert r.returncode == 0, r.stdout + r.stderr
            assert "OK" in r.stdout
        finally:
            sc.close()


@pytest.mark.envoy
@pytest.mark.parametrize("alpn,selected", [
    (ALPN_HTTP11, "http/1.1"),
    (["istio-http/1.1"], None),  # no overlap with the server's [h2, http/1.1]: no ALPN, still HTTP/1.1
    (ALPN_HTTP10, None),
], ids=["istio-http11-list", "istio-http11-only", "istio-http10-list"])
def test_istio_alpn_reaches_the_http_chain(pki: Pki, sidecar: SidecarInbound, alpn: Any, selected: Any) -> None:
    before = len(sidecar.access_log_lines())
    r = https_get(sidecar.port, pki.client_context("client", alpn=alpn), "/hello?x=1")
    assert r.status == 200, r
    assert r.alpn == selected
    assert r.headers["x-inbound-chain"] == HTTP_CHAIN
    assert r.peer_cert["subjectAltName"] == (("URI", SIDECAR_ID),)  # verified with VERIFY_X509_STRICT
    assert r.json["path"] == "/hello?x=1" and r.json["method"] == "GET"
    xfcc = r.json["xfcc"]
    assert f"URI={CLIENT_ID}" in xfcc and f"By={SIDECAR_ID}" in xfcc and 'Subject=""' in xfcc
    lines = sidecar.access_log_lines(before + 1)
    assert lines[before:] == [f"{HTTP_CHAIN} 200 {CLIENT_ID} -"]


@pytest.mark.envoy
def test_sni_is_optional_and_logged(pki: Pki, sidecar: SidecarInbound) -> None:
    before = len(sidecar.access_log_lines())
    sni = "outbound_.8080_._.server.default.svc.cluster.local"
    r = https_get(sidecar.port, pki.client_context("client", alpn=ALPN_HTTP11), server_hostname=sni)
    assert r.status == 200 and r.headers["x-inbound-chain"] == HTTP_CHAIN
    assert sidecar.access_log_lines(before + 1)[before:] == [f"{HTTP_CHAIN} 200 {CLIENT_ID} {sni}"]
    assert sidecar.access_log_entries()[before] == {"chain": HTTP_CHAIN, "code": "200", "peer": CLIENT_ID, "sni": sni}


@pytest.mark.envoy
def test_istio_h2_alpn_speaks_http2_on_the_http_chain(pki: Pki, sidecar: SidecarInbound) -> None:
    before = len(sidecar.access_log_lines())
    alpn, head, data = _h2_get(sidecar.port, pki.client_context("client", alpn=ALPN_H2))
    assert alpn == "h2"
    assert head[:1] == b"\x88"  # :status 200 (HPACK static index 8)
    assert f"URI={CLIENT_ID}" in json.loads(data)["xfcc"]
    assert sidecar.access_log_lines(before + 1)[before:] == [f"{HTTP_CHAIN} 200 {CLIENT_ID} -"]


@pytest.mark.envoy
@pytest.mark.parametrize("alpn,selected", [
    (["http/1.1"], "http/1.1"),  # what stock httpx/requests send: a silent downgrade to L4
    (None, None),
    (ALPN_TCP, "istio-peer-exchange"),
], ids=["http11", "no-alpn", "istio-tcp"])
def test_other_alpn_lands_on_the_tcp_chain(pki: Pki, sidecar: SidecarInbound, alpn: Any, selected: Any) -> None:
    before = len(sidecar.access_log_lines())
    r = https_get(sidecar.port, pki.client_context("client", alpn=alpn))
    assert r.status == 200 and r.alpn == selected
    assert "x-inbound-chain" not in r.headers
    assert r.json["xfcc"] is None  # no L7: no XFCC, no RBAC
    assert sidecar.access_log_lines(before + 1)[before:] == [f"{TCP_CHAIN} 0 {CLIENT_ID} -"]


@pytest.mark.envoy
def test_rbac_denies_an_identity_not_allowed(pki: Pki, sidecar: SidecarInbound) -> None:
    assert sidecar.app is not None
    seen, before = len(sidecar.app.requests), len(sidecar.access_log_lines())
    r = https_get(sidecar.port, pki.client_context("other_sa", alpn=ALPN_HTTP11))
    assert r.status == 403 and r.body == b"RBAC: access denied"
    assert r.headers["x-inbound-chain"] == HTTP_CHAIN
    assert len(sidecar.app.requests) == seen
    # ... while on the TCP chain the same identity gets through (no L7 RBAC there).
    assert https_get(sidecar.port, pki.client_context("other_sa", alpn=["http/1.1"])).status == 200
    other = spiffe_id("other")
    assert sorted(sidecar.access_log_lines(before + 2)[before:]) == [f"{HTTP_CHAIN} 403 {other} -",
                                                                     f"{TCP_CHAIN} 0 {other} -"]


@pytest.mark.envoy
@pytest.mark.parametrize("who,counter", [
    ("no_cert", "fail_verify_no_cert"),
    ("evil_client", "fail_verify_error"),
    ("other_td_client", "fail_verify_san"),
    ("expired_client", "fail_verify_error"),
])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_unauthenticated_clients_are_refused(pki: Pki, sidecar: SidecarInbound, who: str, counter: str,
                                             version: ssl.TLSVersion) -> None:
    assert sidecar.app is not None
    if who == "no_cert":
        ctx = client_context(None, roots=pki.root_file, alpn=ALPN_HTTP11, max_version=version)
    else:
        ctx = pki.client_context(who, alpn=ALPN_HTTP11, max_version=version)
    seen, fails = len(sidecar.app.requests), _fail_counters(sidecar).get(counter, 0)
    phase, err = tls_attempt(sidecar.port, ctx)
    if version == ssl.TLSVersion.TLSv1_2:
        assert phase == "handshake" and isinstance(err, ssl.SSLError), (phase, err)
    else:  # TLS 1.3: the client's handshake completes; the refusal shows on the first I/O
        assert phase in ("io", "eof"), (phase, err)
        assert err == b"" or isinstance(err, (ssl.SSLError, ConnectionError)), err
    assert len(sidecar.app.requests) == seen  # the request never reached the app
    assert _fail_counters(sidecar).get(counter, 0) == fails + 1


@pytest.mark.envoy
def test_two_level_chains_both_ways(pki: Pki, tmp_path: Any, sidecar_factory: Any) -> None:
    # A sidecar whose cert-chain.pem is leaf + intermediate, called by 1- and 2-level clients.
    sc2 = sidecar_factory(paths=write_istio_dir(tmp_path / "sc2", pki.intermediate.issue(SIDECAR_ID)))
    for client in ("client_via_intermediate", "client"):
        r = https_get(sc2.port, pki.client_context(client, alpn=ALPN_HTTP11))
        assert r.status == 200 and r.headers["x-inbound-chain"] == HTTP_CHAIN
        assert f"URI={CLIENT_ID}" in r.json["xfcc"]
        assert r.peer_cert["subjectAltName"] == (("URI", SIDECAR_ID),)  # a 2-level chain, verified strictly


@pytest.mark.envoy
def test_client_via_intermediate_against_the_module_sidecar(pki: Pki, sidecar: SidecarInbound) -> None:
    # cert-chain.pem = leaf + intermediate; the sidecar trusts only the root
    before = len(sidecar.access_log_lines())
    r = https_get(sidecar.port, pki.client_context("client_via_intermediate", alpn=ALPN_HTTP11))
    assert r.status == 200 and f"URI={CLIENT_ID}" in r.json["xfcc"]
    assert sidecar.access_log_lines(before + 1)[before:] == [f"{HTTP_CHAIN} 200 {CLIENT_ID} -"]


@pytest.mark.envoy
def test_http2_app_behind_the_sidecar(pki: Pki, sidecar_factory: Any) -> None:
    """``app_http2=True``: a grpcio server behind the sidecar sees the caller in XFCC."""
    import grpc

    seen: List[Dict[str, str]] = []

    def hello(request: bytes, context: Any) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return b"hi:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "meshcore.test.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sc = sidecar_factory(app_port=port, app_http2=True)
        assert sc.app is None and sc.app_port == port
        msg = b"x"
        r = https_get(sc.port, pki.client_context("client", alpn=ALPN_HTTP11), "/meshcore.test.Echo/Hello",
                      method="POST", headers={"content-type": "application/grpc", "te": "trailers"},
                      body=b"\x00" + struct.pack(">I", len(msg)) + msg)
        assert r.status == 200 and r.headers["content-type"] == "application/grpc", r
        assert r.body == b"\x00" + struct.pack(">I", 4) + b"hi:x"
        assert f"URI={CLIENT_ID}" in seen[0]["x-forwarded-client-cert"]
    finally:
        server.stop(0)
