"""TLS to one upstream cluster (an ``UpstreamTlsContext``): the client context, SNI, ALPN, and the
peer check every integration runs after the handshake and before the first request byte.

What is verified, always: the peer's chain up to the cluster's roots (OpenSSL, ``CERT_REQUIRED``;
expired or not-yet-valid certificates fail), then its subject alt names against the cluster's SAN
matchers (:mod:`meshcore.tls.san`; none configured: chain only, as Envoy). Host name checking
is off because mesh identities are SPIFFE URIs, which OpenSSL's host check does not know; the
SAN matchers replace it. There is no way to turn verification off.

Client libraries change the context they are handed (httpcore sets ALPN at every connect,
urllib3 sets ``verify_mode``/``check_hostname`` and loads its own CA bundle): the contexts made
here are locked once built, so those calls are ignored and the mesh's settings stay.

ALPN: a cluster that names no ALPN, or names Istio's (``istio``, ``istio-peer-exchange``), gets
what an Istio sidecar's ``istio.alpn`` filter sends per request: ``istio-http/1.1, istio, http/1.1``
for HTTP/1.1 and ``istio-h2, istio, h2`` for HTTP/2. Without an ``istio-*`` value a sidecar'd
server serves the connection through its TCP filter chain and skips its HTTP authorization. Any
other configured list is offered as it is.

Failures raise :class:`TlsHandshakeError` (an :class:`~meshcore.errors.UpstreamError` of kind
``connect-failure``: retried per ``retry_on: connect-failure`` and fed to outlier detection) naming
the cluster, the endpoint and the reason, and count Envoy's cluster stats ``ssl.handshake``,
``ssl.connection_error``, ``ssl.fail_verify_error``, ``ssl.fail_verify_san``,
``ssl.fail_verify_no_cert``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UpstreamError
from .certificates import CertificatesUnavailable, FileCertificateSource
from .san import describe_matchers, describe_sans, peer_sans, sans_match

__all__ = ["UpstreamTls", "TlsHandshakeError", "ISTIO_ALPN", "alpn_for", "is_deferred_rejection"]

#: what Istio's ``istio.alpn`` HTTP filter offers per downstream protocol
#: (``pilot/pkg/xds/filters/filters.go``)
ISTIO_ALPN: Dict[str, Tuple[str, ...]] = {
    "http/1.0": ("istio-http/1.0", "istio", "http/1.0"),
    "http/1.1": ("istio-http/1.1", "istio", "http/1.1"),
    "h2": ("istio-h2", "istio", "h2"),
    # raw TCP (tcp_proxy): a sidecar offers its cluster's ("istio-peer-exchange", "istio"), but
    # istio-peer-exchange makes the server's sidecar expect Istio's in-band metadata exchange, which
    # meshcore does not speak: "istio" alone still selects the server's mTLS TCP chain
    "tcp": ("istio",),
}
#: how long the first connection waits for a streamed (SDS) certificate source's first secrets
FIRST_CERTIFICATES_WAIT = 5.0
_ISTIO_MARKERS = frozenset({"istio", "istio-peer-exchange"})
_VERSIONS = {"TLSv1_0": ssl.TLSVersion.TLSv1, "TLSv1_1": ssl.TLSVersion.TLSv1_1,
             "TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}


def alpn_for(configured: Tuple[str, ...], protocol: str) -> Tuple[str, ...]:
    """The ALPN list a connection for ``protocol`` (``http/1.1``, ``h2``) offers (see module doc)."""
    if not configured or _ISTIO_MARKERS.intersection(configured):
        return ISTIO_ALPN.get(protocol, ISTIO_ALPN["http/1.1"])
    return configured


class TlsHandshakeError(UpstreamError):
    """TLS to an upstream failed: a connect failure. ``stat`` is the Envoy ``ssl.*`` stat counted."""

    def __init__(self, cluster: str, endpoint: str, reason: str, stat: str = "ssl.connection_error",
                 cause: Optional[BaseException] = None) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.reason = reason
        self.stat = stat
        super().__init__("connect-failure", f"TLS to {endpoint} (cluster {cluster}) failed: {reason}", cause)


def is_deferred_rejection(exc: BaseException) -> bool:
    """Whether an error on the FIRST read of a fresh TLS 1.3 connection is the server refusing
    the client certificate after the handshake (it closes or sends an alert): then the request
    never reached the application and the failure is a connect failure, not a reset."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)):
        return True
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        return "ALERT" in text or "CERTIFICATE" in text or "EOF" in text
    return False


class _LockedContext(ssl.SSLContext):
    """An SSL context whose security settings cannot be changed once built (see module doc)."""

    _locked = False

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        if not self._locked:
            super().set_alpn_protocols(alpn_protocols)

    def load_verify_locations(self, *a: Any, **kw: Any) -> None:
        if not self._locked:
            super().load_verify_locations(*a, **kw)

    def load_cert_chain(self, *a: Any, **kw: Any) -> None:
        if not self._locked:
            super().load_cert_chain(*a, **kw)

    def load_default_certs(self, *a: Any, **kw: Any) -> None:
        if not self._locked:
            super().load_default_certs(*a, **kw)

    def set_default_verify_paths(self) -> None:
        if not self._locked:
            super().set_default_verify_paths()

    def set_ciphers(self, ciphers: str) -> None:
        if not self._locked:
            super().set_ciphers(ciphers)

    @property  # type: ignore[override]
    def verify_mode(self) -> ssl.VerifyMode:
        return ssl.SSLContext.verify_mode.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @verify_mode.setter
    def verify_mode(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.verify_mode.__set__(self, value)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def check_hostname(self) -> bool:
        return ssl.SSLContext.check_hostname.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @check_hostname.setter
    def check_hostname(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.check_hostname.__set__(self, value)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def minimum_version(self) -> ssl.TLSVersion:
        return ssl.SSLContext.minimum_version.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @minimum_version.setter
    def minimum_version(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.minimum_version.__set__(self, value)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def maximum_version(self) -> ssl.TLSVersion:
        return ssl.SSLContext.maximum_version.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @maximum_version.setter
    def maximum_version(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.maximum_version.__set__(self, value)  # type: ignore[attr-defined]


def _envoy_ciphers(suites: Tuple[str, ...]) -> str:
    """Envoy's cipher list (BoringSSL ``[A|B]`` equal-preference groups) as an OpenSSL string."""
    names = []
    for s in suites:
        for name in s.strip("[]").split("|"):
            if name:
                names.append(name)
    return ":".join(names)


def _spiffe_trust_domain(uri: str) -> Optional[str]:
    """The trust domain of a valid SPIFFE ID (lower-cased), else ``None``."""
    if not uri.lower().startswith("spiffe://"):
        return None
    td, _, path = uri[9:].partition("/")
    if not td or any(not (c.isascii() and (c.isalnum() or c in "-._")) for c in td):
        return None
    if path and (path.endswith("/") or "//" in path or any(seg in (".", "..") for seg in path.split("/"))):
        return None
    return td.lower()


def _verified_root_der(ssl_object: Any) -> Optional[bytes]:
    """The DER of the root the peer's chain was verified to (``None``: unknown)."""
    getter = getattr(ssl_object, "get_verified_chain", None)  # Python 3.13+
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_verified_chain", None)
    if getter is None:
        return None
    try:
        chain = getter()
    except (ssl.SSLError, ValueError, AttributeError):
        return None
    if not chain:
        return None
    last = chain[-1]
    if isinstance(last, bytes):
        return last
    import _ssl

    return last.public_bytes(_ssl.ENCODING_DER)  # type: ignore[no-any-return]


class UpstreamTls:
    """The TLS a cluster's connections (or one transport-socket match of it) use.

    ``identity``/``roots`` are certificate sources (``roots`` required; ``identity`` ``None`` for
    one-way TLS). ``record(stat)`` counts a cluster stat. One object per cluster and socket
    configuration: integrations key their connection pools by it.
    """

    def __init__(self, spec: Any, cluster: str, identity: Optional[FileCertificateSource],
                 roots: FileCertificateSource, record: Callable[[str], None]) -> None:
        self.spec = spec
        self.cluster = cluster
        self._identity = identity
        self._roots = roots
        self._record = record
        self._lock = threading.Lock()
        #: (protocol, identity generation, roots generation) -> context
        self._contexts: Dict[Tuple[str, int, int], ssl.SSLContext] = {}
        matchers = spec.san_matchers
        self._matchers = matchers
        self._waited = False
        self.mutual = identity is not None

    def __repr__(self) -> str:
        kind = "mTLS" if self.mutual else "TLS"
        return f"UpstreamTls({self.cluster!r}, {kind}, sni={self.spec.sni!r})"

    # -- what a connection needs ------------------------------------------------------------------

    def server_hostname(self, endpoint: Any = None) -> Optional[str]:
        """SNI for a connection to ``endpoint`` (``auto_host_sni``: its EDS hostname), or ``None``."""
        spec = self.spec
        if spec.auto_host_sni and endpoint is not None and getattr(endpoint, "hostname", ""):
            return str(endpoint.hostname)
        return spec.sni or None

    def alpn(self, protocol: str = "http/1.1") -> Tuple[str, ...]:
        return alpn_for(self.spec.alpn_protocols, protocol)

    def context(self, protocol: str = "http/1.1") -> ssl.SSLContext:
        """The client context for a new connection now (current certificates; cached per
        certificate generation). Raises :class:`TlsHandshakeError` if certificates are missing."""
        try:
            roots = self._roots.current()
            ident = self._identity.current() if self._identity is not None else None
        except CertificatesUnavailable as e:
            if self._first_wait():
                return self.context(protocol)
            self._record("ssl.connection_error")
            raise TlsHandshakeError(self.cluster, "(no connection made)", str(e), cause=e) from None
        if roots.roots_pem is None:
            raise TlsHandshakeError(self.cluster, "(no connection made)",
                                    f"certificate source {self._roots.name!r} has no root certificates")
        if ident is not None and ident.chain_pem is None:
            raise TlsHandshakeError(self.cluster, "(no connection made)",
                                    f"certificate source {self._identity.name!r} has no certificate chain")  # type: ignore[union-attr]
        key = (protocol, ident.generation if ident is not None else 0, roots.generation)
        ctx = self._contexts.get(key)
        if ctx is None:
            with self._lock:
                ctx = self._contexts.get(key)
                if ctx is None:
                    ctx = self._build(protocol, ident, roots)
                    # older generations: connections already made keep their own reference
                    self._contexts = {k: v for k, v in self._contexts.items() if k[0] != protocol}
                    self._contexts[key] = ctx
        return ctx

    def _first_wait(self) -> bool:
        """A streamed source (SDS) that has delivered nothing yet: wait for its first set, once,
        up to :data:`FIRST_CERTIFICATES_WAIT` s, unless on an event loop's thread (never blocked)."""
        if self._waited:
            return False
        self._waited = True
        pending = [s for s in (self._roots, self._identity)
                   if s is not None and hasattr(s, "wait") and s.peek() is None]
        if not pending:
            return False
        try:
            import asyncio

            asyncio.get_running_loop()
            return False
        except RuntimeError:
            pass
        return all(s.wait(FIRST_CERTIFICATES_WAIT) for s in pending)

    def _build(self, protocol: str, ident: Any, roots: Any) -> ssl.SSLContext:
        spec = self.spec
        ctx = _LockedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # SAN matchers instead (SPIFFE URIs); see check_peer
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = _VERSIONS.get(spec.min_version, ssl.TLSVersion.TLSv1_2)
        ctx.maximum_version = _VERSIONS.get(spec.max_version, ssl.TLSVersion.TLSv1_3)
        roots.load_roots_into(ctx)
        if ident is not None:
            ident.load_identity_into(ctx)
        if spec.cipher_suites:
            try:
                ctx.set_ciphers(_envoy_ciphers(spec.cipher_suites))
            except ssl.SSLError:
                pass  # (CDS refuses such names; a spec made by hand keeps OpenSSL's secure defaults)
        ctx.set_alpn_protocols(list(self.alpn(protocol)))
        ctx._locked = True  # type: ignore[attr-defined]
        return ctx

    # -- after the handshake ----------------------------------------------------------------------

    def check_peer(self, ssl_object: Any, endpoint: str) -> None:
        """Check a finished handshake's peer (an ``SSLSocket``/``SSLObject``) against the SAN
        matchers; counts ``ssl.handshake`` or the failure. Call before sending anything."""
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if not cert:
            self._record("ssl.fail_verify_no_cert")
            raise TlsHandshakeError(self.cluster, endpoint, "the server presented no certificate",
                                    "ssl.fail_verify_no_cert")
        roots = self._roots.peek()
        if roots is not None and roots.bundles is not None:
            self._check_trust_domain(ssl_object, cert, roots.bundles, endpoint)
        matchers = self._matchers
        if self.spec.auto_sni_san_validation:
            # Envoy: the SNI actually sent (auto_host_sni's endpoint hostname, a caller's
            # server_hostname), whatever the configured one is
            sni = getattr(ssl_object, "server_hostname", None) if hasattr(ssl_object, "server_hostname") \
                else self.server_hostname()
            if sni:
                from .._route_model import StringMatchSpec
                from ..xds.model import SanMatcherSpec
                matchers = (SanMatcherSpec("DNS", StringMatchSpec("exact", sni)),)
        if matchers:
            sans = peer_sans(cert)
            if not sans_match(matchers, sans):
                self._record("ssl.fail_verify_san")
                raise TlsHandshakeError(
                    self.cluster, endpoint,
                    f"the server's certificate SANs {describe_sans(sans)} match none of the expected "
                    f"{describe_matchers(matchers)}", "ssl.fail_verify_san")
        self._record("ssl.handshake")

    def _check_trust_domain(self, ssl_object: Any, cert: Dict[str, Any], bundles: Any, endpoint: str) -> None:
        """A87: the peer has exactly one URI SAN, a SPIFFE ID, and its chain ends at a root of
        that ID's trust domain (not merely at some root of the map)."""
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        td = _spiffe_trust_domain(uris[0]) if len(uris) == 1 else None
        if td is None:
            self._record("ssl.fail_verify_error")
            raise TlsHandshakeError(self.cluster, endpoint, "SPIFFE bundle map in use: the server's certificate must "
                                    f"carry exactly one URI SAN that is a SPIFFE ID, it has {uris}",
                                    "ssl.fail_verify_error")
        trusted = bundles.get(td)
        root = _verified_root_der(ssl_object)
        if trusted is None or root is None or root not in trusted:
            self._record("ssl.fail_verify_error")
            why = (f"no trust bundle for trust domain {td!r}" if trusted is None else
                   "the verified chain could not be read" if root is None else
                   f"its chain ends at a root that is not in trust domain {td!r}'s bundle")
            raise TlsHandshakeError(self.cluster, endpoint, f"the server's SPIFFE ID {uris[0]}: {why}",
                                    "ssl.fail_verify_error")

    def handshake_error(self, exc: BaseException, endpoint: str) -> TlsHandshakeError:
        """A handshake exception as a :class:`TlsHandshakeError` (counted)."""
        if isinstance(exc, TlsHandshakeError):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            stat = "ssl.fail_verify_error"
            reason = f"the server's certificate failed verification: {exc.verify_message or exc}"
        elif isinstance(exc, ssl.SSLError):
            stat = "ssl.connection_error"
            reason = f"TLS handshake failed: {exc.reason or exc}"
        elif isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
            stat = "ssl.connection_error"
            reason = "the server closed the connection during the TLS handshake"
        else:
            stat = "ssl.connection_error"
            reason = f"TLS handshake failed: {type(exc).__name__}: {exc}"
        self._record(stat)
        return TlsHandshakeError(self.cluster, endpoint, reason, stat, exc)

    def deferred_rejection(self, exc: BaseException, endpoint: str) -> TlsHandshakeError:
        """The error for a fresh connection closed on its first read (see :func:`is_deferred_rejection`)."""
        self._record("ssl.connection_error")
        return TlsHandshakeError(
            self.cluster, endpoint,
            "the server closed the connection right after the TLS handshake, before answering "
            f"(it refused this workload's certificate?): {type(exc).__name__}: {exc}",
            "ssl.connection_error", exc)

    # -- blocking sockets -------------------------------------------------------------------------

    def wrap_socket(self, sock: socket.socket, endpoint: str, protocol: str = "http/1.1",
                    server_hostname: Optional[str] = None, ep: Any = None) -> ssl.SSLSocket:
        """Handshake on a connected blocking socket (its timeout applies) and check the peer.
        On failure the socket is closed and :class:`TlsHandshakeError` raised."""
        try:
            ctx = self.context(protocol)
        except TlsHandshakeError:
            sock.close()  # as on every other failure: the caller never gets the socket back
            raise
        sni = server_hostname if server_hostname is not None else self.server_hostname(ep)
        try:
            tls = ctx.wrap_socket(sock, server_hostname=sni, do_handshake_on_connect=False)
            tls.do_handshake()
        except (OSError, ValueError) as e:
            if isinstance(e, socket.timeout):
                sock.close()
                raise
            sock.close()
            raise self.handshake_error(e, endpoint) from None
        try:
            self.check_peer(tls, endpoint)
        except TlsHandshakeError:
            tls.close()
            raise
        return tls
