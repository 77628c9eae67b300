"""Review findings in meshcore.tls (upstream peer checks, sockets, certificate sources)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from meshcore._model import Endpoint
from meshcore.tls import TlsHandshakeError, TlsManager
from meshcore.xds.model import CertificateRef, UpstreamTlsSpec

from .pki import Pki
from .test_tls_core import SDS_ROOTS, Stats, manager, server_factory  # noqa: F401  (fixture)


def _endpoint(port: int, hostname: str = "") -> Endpoint:
    return Endpoint("127.0.0.1", port, hostname=hostname)


def test_auto_sni_san_validation_checks_the_sni_actually_sent(pki: Pki, server_factory: Any) -> None:
    # Envoy: "a validation for a DNS SAN matching the SNI value sent ... regardless of how the SNI
    # is configured": with auto_host_sni the SNI is the endpoint's hostname, not spec.sni
    srv = server_factory(pki.server_context("server_with_dns", require_client_cert=False))  # DNS SAN localhost
    stats = Stats()
    up = manager(pki, stats=stats).upstream("c", UpstreamTlsSpec(
        roots=SDS_ROOTS, auto_host_sni=True, auto_sni_san_validation=True))
    ok = _endpoint(srv.port, "localhost")
    with up.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), ok.key, ep=ok):
        pass
    bad = _endpoint(srv.port, "evil.example")
    with pytest.raises(TlsHandshakeError, match="evil.example"):
        up.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), bad.key, ep=bad)
    # an SNI given by the caller (the request's Host, Envoy's auto_sni) is what is checked too
    with pytest.raises(TlsHandshakeError, match="other.example"):
        up.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), ok.key,
                       server_hostname="other.example", ep=ok)
    assert stats.counts[("c", "ssl.fail_verify_san")] == 2


def test_wrap_socket_closes_the_socket_when_certificates_are_missing(pki: Pki, tmp_path: Any) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    up = TlsManager(None, None).upstream("c", UpstreamTlsSpec(
        roots=CertificateRef("sds", f"file-root:{d / 'root-cert.pem'}")))
    a, b = socket.socketpair()
    try:
        with pytest.raises(TlsHandshakeError, match="not available"):
            up.wrap_socket(a, "127.0.0.1:1")
        assert a.fileno() == -1  # closed, as on every other failure
    finally:
        a.close()
        b.close()
