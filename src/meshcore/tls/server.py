"""Server-side (inbound) mesh TLS: the workload's certificate, client verification, rotation without
restart, Istio-safe ALPN, the client's identity for the app, and PERMISSIVE (TLS and plaintext on one
port), for the servers Python apps run in.

:class:`ServerTls` ``(source, *, require_client_certificate=True, alpn=("h2", "http/1.1"),
trust_domains=None, sans=None)`` over a certificate source holding the identity and the roots
(:class:`~meshcore.tls.FileCertificateSource`, :class:`~meshcore.tls.SdsCertificateSource`,
``mesh.tls.workload_source()``):

* :meth:`ServerTls.context` -- an ``ssl.SSLContext`` for a server, built per certificate generation
  (the chain and key presented, the roots clients are verified against; ``CERT_REQUIRED`` when
  ``require_client_certificate`` (STRICT), else ``CERT_OPTIONAL``: a certificate, if sent, is
  verified; TLS 1.2-1.3; no session tickets). Its ``sni_callback`` -- OpenSSL calls it for every
  new connection, with or without SNI -- swaps in the *current* generation's context, so a server
  holding an old context serves new connections with new certificates and roots, no restart;
  connections already open keep theirs. The contexts are locked: servers that set
  ``verify_mode``, ALPN, ciphers, CA files or their own ``sni_callback`` on the context they are
  handed change nothing (the first connection's ``verify_mode`` comes from the context the server
  holds, so it must stay as built).
* ALPN (``security.md`` §3.4): the server selects the first of ITS list the client offers; the
  list may hold only ``h2``/``http/1.1``/``http/1.0`` -- never ``istio-peer-exchange`` (it would
  make a sidecar client speak metadata exchange in-band) nor ``istio``/``istio-http/*``. An Envoy
  sidecar client offering ``istio-http/1.1, istio, http/1.1`` gets ``http/1.1``; ``istio-h2, istio,
  h2`` gets ``h2`` (when the server's list has it). No overlap: no ALPN, the handshake goes on.
  The helpers below pass the list the server can speak (HTTP/1.1 only for uvicorn's h11 and
  gunicorn's sync worker, which must never select ``h2``).
* After the handshake, before the app sees the connection: ``trust_domains`` (a sidecar's inbound
  ``match_subject_alt_names`` prefix ``spiffe://<td>/``) and ``sans`` (``SanMatcherSpec``s, or
  strings: an exact URI SAN) -- the client passes when ANY matcher accepts ANY of its SANs
  (Envoy's semantics for one matcher list); with a SPIFFE bundle map (A87) its SPIFFE ID's trust
  domain must also own the root its chain was verified to. A refused client is cut off: the
  handshake raises :class:`PeerRejected` inside the server, which closes the connection (the
  client sees it closed during its handshake or at its first read: TLS 1.3 clients finish theirs
  before the server checks). A client without a certificate passes these checks
  only when certificates are optional (as Envoy).
* :meth:`ServerTls.peer` ``(ssl_object)`` -> :data:`PeerCertificate` (URI SANs, DNS SANs, subject
  as RFC 4514/2253 text -- ``""`` for Istio certificates) or ``None``; computed once per connection.
* :meth:`ServerTls.stats` -- Envoy's listener ``ssl.*`` counters: ``ssl.handshake``,
  ``ssl.no_certificate``, ``ssl.fail_verify_no_cert``, ``ssl.fail_verify_error``,
  ``ssl.fail_verify_san``, ``ssl.connection_error``.

Per server (each tested for real in ``tests/tls/test_server_tls.py``): how TLS is set up / how the
client's identity reaches the app / PERMISSIVE.

* uvicorn (asyncio; h11, websockets): :func:`uvicorn_config` / :func:`serve_uvicorn` -- a
  ``uvicorn.Config`` subclass whose ``load()`` sets ``config.ssl`` to our context (uvicorn's own
  ``ssl_*`` options are refused) and wraps its HTTP protocol class; ALPN ``http/1.1`` (``h2`` too
  only if the protocol class declares it). / uvicorn passes no client certificate
  (Kludex/uvicorn#1118): the wrapper gives each TLS connection's protocol (and the websocket
  protocols it makes) an app that adds ``scope["extensions"]["tls"]`` per the ASGI TLS extension
  (``client_cert_chain``, ``client_cert_name``, ``client_cert_error``, ``tls_version``,
  ``cipher_suite``, ``server_cert``) plus ``meshcore.peer``, ``meshcore.server_name``,
  ``meshcore.alpn``; read it with :func:`peer_from_asgi_scope`. / PERMISSIVE: yes.
* hypercorn (asyncio; HTTP/1.1 and HTTP/2): :func:`hypercorn_config` (a ``Config`` subclass:
  ``ssl_enabled``, ``create_ssl_context()`` -> our context; ALPN ``h2, http/1.1``) and
  :func:`serve_hypercorn`. / hypercorn 0.18 has no TLS extension: :func:`serve_hypercorn`
  installs (once, process-wide) a subclass of ``hypercorn.asyncio.run.TCPServer`` that adds the
  same ``scope["extensions"]["tls"]`` to connections made with a ServerTls context (others are
  untouched). / PERMISSIVE: no (``insecure_bind`` gives a separate plaintext port).
* gunicorn (sync and gthread workers): :func:`gunicorn_settings` -> the ``ssl_context`` hook
  (gunicorn >= 21 calls it for each connection) returning our context, ``certfile``/``keyfile``
  (the source's files, or ``/dev/null``: gunicorn only checks that they exist) and
  ``do_handshake_on_connect``; ALPN ``http/1.1``. / WSGI ``environ["gunicorn.socket"]`` is the TLS
  socket: :func:`peer_from_wsgi_environ`. Create the ServerTls in the config file, from files (an
  SDS stream's thread does not survive gunicorn's fork). / PERMISSIVE: no (gunicorn wraps every
  connection once TLS is on).
* stdlib ``socketserver`` / WSGI: :class:`TlsServerMixin` (the handshake, or the PERMISSIVE peek,
  in ``finish_request``: the request's own thread) and :func:`make_wsgi_server` (wsgiref,
  threaded). / ``environ["meshcore.peer"]``, ``environ["meshcore.tls"]`` (the TLS extension
  dict), ``HTTPS=on``; a socketserver handler calls ``tls.peer(self.request)``. / PERMISSIVE: yes.
* any asyncio server (``loop.create_server``): :meth:`ServerTls.asyncio_protocol_factory`. /
  ``transport.get_extra_info("ssl_object")`` -> :meth:`ServerTls.peer`. / PERMISSIVE: yes
  (selector event loops: Unix; uvloop).
* grpcio: :meth:`ServerTls.grpc_server_credentials` (``grpc.dynamic_ssl_server_credentials``: its
  fetcher, called before every new handshake, hands C-core the current generation; C-core selects
  ``h2`` itself; an optional client certificate is not requested at all: grpcio cannot ask for
  one without requiring it). / ``context.auth_context()``: :func:`peer_from_grpc_context`.
  ``trust_domains``/``sans``: :meth:`ServerTls.grpc_interceptor` (``UNAUTHENTICATED`` before the
  servicer: C-core has no post-handshake hook); bundle maps are not checked there. /
  PERMISSIVE: no (a gRPC port is secure or not).

PERMISSIVE (Istio's mode that accepts mTLS and plaintext on one port): a connection whose first
byte is ``0x16`` (a TLS handshake record) is served with TLS, anything else as plaintext, like
Envoy's ``tls_inspector``. Nothing is read: the byte is peeked (``MSG_PEEK``) on the accepted
socket before TLS or the plaintext server sees it. A client that sends nothing within
``sniff_timeout`` is handed to the plaintext server. TLS connections get every check above; a
server without PERMISSIVE refuses plaintext (it never falls back to it).

Importing this module imports neither asyncio, grpc, cryptography nor any server library.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .certificates import CertificatesUnavailable, CertificateSet
from .san import describe_matchers, describe_sans, peer_sans, sans_match
from .upstream import FIRST_CERTIFICATES_WAIT, _LockedContext, _spiffe_trust_domain, _verified_root_der

__all__ = [
    "ServerTls", "PeerCertificate", "PeerRejected", "peer_from_asgi_scope", "peer_from_wsgi_environ",
    "peer_from_grpc_context", "tls_extension", "uvicorn_config", "serve_uvicorn", "hypercorn_config",
    "serve_hypercorn", "gunicorn_settings", "TlsServerMixin", "MeshWSGIServer", "make_wsgi_server",
    "SERVER_ALPN", "TLS_RECORD_HANDSHAKE",
]

log = logging.getLogger(__name__)

try:  # the RBAC engine's type, when that package is there (one type for both)
    from ..rbac import PeerCertificate  # type: ignore[attr-defined]
except ImportError as _e:  # pragma: no cover - depends on what has landed alongside
    if isinstance(_e, ModuleNotFoundError) and _e.name != __name__.rsplit(".", 2)[0] + ".rbac":
        raise

    @dataclass(frozen=True)
    class PeerCertificate:  # type: ignore[no-redef]
        """A verified client certificate as RBAC sees it (Envoy's lookup order for
        ``authenticated.principal_name``: URI SANs, then DNS SANs, then the subject)."""

        uri_sans: Tuple[str, ...] = ()
        dns_sans: Tuple[str, ...] = ()
        subject: str = ""


#: the first byte of a TLS connection (a handshake record: ClientHello)
TLS_RECORD_HANDSHAKE = 0x16
#: what a server may select (``security.md`` §3.4: never ``istio-peer-exchange``/``istio*``)
SERVER_ALPN = frozenset({"h2", "http/1.1", "http/1.0"})
_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_DEFAULT_SNIFF_TIMEOUT = 15.0  # Envoy's listener_filters_timeout
_PAUSE_IN_CONNECTION_MADE_IGNORED = sys.version_info < (3, 11)
_PEM_CACHE_MAX = 512


class PeerRejected(ssl.SSLError):
    """The client's verified certificate failed the server's SAN / trust-domain checks; the
    connection is closed before the app sees it."""

    def __init__(self, message: str) -> None:
        super().__init__(ssl.SSL_ERROR_SSL, message)
        self.reason = "PEER_REJECTED"


# --------------------------------------------------------------------------------------------
# The client's certificate
# --------------------------------------------------------------------------------------------


def _peer_from_der(der: bytes) -> Any:
    from_der = getattr(PeerCertificate, "from_der", None)  # the RBAC engine's own reading, when there
    if from_der is not None:
        return from_der(der)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris: Tuple[str, ...] = ()
        dns: Tuple[str, ...] = ()
    else:
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    return PeerCertificate(uri_sans=uris, dns_sans=dns, subject=cert.subject.rfc4514_string())


_pem_peers: Dict[bytes, Any] = {}


def _peer_from_pem(pem: Any) -> Any:
    """A PEM certificate (str or bytes) -> PeerCertificate (cached: RPCs repeat the same one)."""
    key = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    peer = _pem_peers.get(key)
    if peer is None:
        peer = _peer_from_der(ssl.PEM_cert_to_DER_cert(key.decode("ascii")))
        if len(_pem_peers) >= _PEM_CACHE_MAX:
            _pem_peers.clear()
        _pem_peers[key] = peer
    return peer


_UNSET = object()


def _peer_of(ssl_object: Any) -> Any:
    """The verified client certificate of a finished handshake (cached on meshcore's objects)."""
    cached = getattr(ssl_object, "_mesh_peer", _UNSET)
    if cached is not _UNSET:
        return cached
    ctx = ssl_object.context
    if ctx is None or ctx.verify_mode == ssl.CERT_NONE:
        return None  # an unverified certificate is no identity
    der = ssl_object.getpeercert(binary_form=True)
    peer = _peer_from_der(der) if der else None
    if isinstance(ssl_object, (_MeshSSLObject, _MeshSSLSocket)):
        ssl_object._mesh_peer = peer
    return peer


def _unverified_chain_pem(ssl_object: Any) -> Tuple[str, ...]:
    """The chain the client sent, leaf first, as PEM strings."""
    getter = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13+: DER bytes
    if getter is not None:
        try:
            return tuple(ssl.DER_cert_to_PEM_cert(d) for d in getter() or ())
        except (ssl.SSLError, ValueError):
            pass
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)  # 3.10-3.12: _ssl.Certificate objects
    if getter is not None:
        try:
            import _ssl

            return tuple(c.public_bytes(_ssl.ENCODING_PEM) for c in getter() or ())
        except (ssl.SSLError, ValueError, AttributeError):
            pass
    der = ssl_object.getpeercert(binary_form=True)
    return (ssl.DER_cert_to_PEM_cert(der),) if der else ()


_cipher_ids: Dict[str, int] = {}


def _cipher_id(name: Optional[str]) -> Optional[int]:
    if not name:
        return None
    if not _cipher_ids:
        for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers():
            _cipher_ids[c["name"]] = c["id"] & 0xFFFF
    return _cipher_ids.get(name)


def tls_extension(ssl_object: Any) -> Dict[str, Any]:
    """The ASGI TLS extension dict (``scope["extensions"]["tls"]``, asgiref ``specs/tls.rst``) of a
    finished handshake, plus ``meshcore.peer`` (:data:`PeerCertificate` or None),
    ``meshcore.server_name`` (the SNI the client sent, or None) and ``meshcore.alpn`` (the
    protocol selected, or None). Only for verified connections:
    ``client_cert_error`` is always None (a failed verification never gets this far)."""
    peer = _peer_of(ssl_object)
    chain = _unverified_chain_pem(ssl_object) if peer is not None else ()
    cipher = ssl_object.cipher()
    return {
        "server_cert": getattr(ssl_object.context, "_mesh_leaf_pem", None),
        "client_cert_chain": chain,
        "client_cert_name": peer.subject if peer is not None else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_id(cipher[0] if cipher else None),
        "meshcore.peer": peer,
        "meshcore.server_name": getattr(ssl_object, "_mesh_server_name", None),
        "meshcore.alpn": ssl_object.selected_alpn_protocol(),
    }


def peer_from_asgi_scope(scope: Mapping[str, Any]) -> Any:
    """The client's :data:`PeerCertificate` from an ASGI scope's TLS extension (any server that
    implements it), or None (plaintext, no certificate, or no extension)."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None
    peer = tls.get("meshcore.peer", _UNSET)
    if peer is not _UNSET:
        return peer
    chain = tls.get("client_cert_chain") or ()
    if tls.get("client_cert_error") or not chain:
        return None
    return _peer_from_pem(next(iter(chain)))


def peer_from_wsgi_environ(environ: Mapping[str, Any]) -> Any:
    """The client's :data:`PeerCertificate` in a WSGI request: ``environ["meshcore.peer"]``
    (:func:`make_wsgi_server`) or gunicorn's ``environ["gunicorn.socket"]`` TLS socket; else None."""
    if "meshcore.peer" in environ:
        return environ["meshcore.peer"]
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, ssl.SSLSocket):
        return _peer_of(sock)
    return None


def peer_from_grpc_context(context: Any) -> Any:
    """The client's :data:`PeerCertificate` in a grpcio servicer (``context.auth_context()``:
    ``x509_pem_cert`` of an ``ssl`` transport), or None."""
    ac = context.auth_context()
    if ac.get("transport_security_type") != [b"ssl"]:
        return None
    pems = ac.get("x509_pem_cert")
    return _peer_from_pem(pems[0]) if pems else None


# --------------------------------------------------------------------------------------------
# Contexts and the objects they make
# --------------------------------------------------------------------------------------------


def _owner(ssl_object: Any) -> Optional["ServerTls"]:
    return getattr(ssl_object.context, "_mesh_owner", None)


def _checked_handshake(obj: Any, do: Callable[[], None]) -> None:
    owner = _owner(obj)
    if owner is None:
        do()
        obj._mesh_done = True
        return
    try:
        do()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise
    except ssl.SSLError as e:
        owner._count_failure(e)
        raise
    owner._after_handshake(obj)
    obj._mesh_done = True


class _MeshSSLObject(ssl.SSLObject):
    """asyncio's TLS object from a ServerTls context: the peer checks run when the handshake ends."""

    _mesh_done = False
    _mesh_server_name: Optional[str] = None

    def do_handshake(self) -> None:
        _checked_handshake(self, super().do_handshake)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - stdlib's name
        if not self._mesh_done:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if not self._mesh_done:
            self.do_handshake()
        return super().write(data)


class _MeshSSLSocket(ssl.SSLSocket):
    """A blocking TLS socket from a ServerTls context: the peer checks run when the handshake
    ends, also when a server leaves the handshake to the first read (``do_handshake_on_connect=False``)."""

    _mesh_done = False
    _mesh_server_name: Optional[str] = None

    def do_handshake(self, block: bool = False) -> None:
        _checked_handshake(self, lambda: ssl.SSLSocket.do_handshake(self, block))

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002
        if not self._mesh_done and self._connected:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if not self._mesh_done and self._connected:
            self.do_handshake()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        if not self._mesh_done and self._connected:
            self.do_handshake()
        return super().send(data, flags)


class _ServerContext(_LockedContext):
    """One generation's server context (locked once built, like the client side's)."""

    sslobject_class = _MeshSSLObject
    sslsocket_class = _MeshSSLSocket
    _mesh_owner: Optional["ServerTls"] = None
    _mesh_leaf_pem: Optional[str] = None
    _mesh_alpn: Tuple[str, ...] = ()
    _mesh_set: Optional[CertificateSet] = None

    @property  # type: ignore[override]
    def sni_callback(self) -> Any:
        return ssl.SSLContext.sni_callback.__get__(self)  # type: ignore[attr-defined]

    @sni_callback.setter
    def sni_callback(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.sni_callback.__set__(self, value)  # type: ignore[attr-defined]

    def set_servername_callback(self, cb: Any) -> None:
        if not self._locked:
            super().set_servername_callback(cb)

    @property  # type: ignore[override]
    def options(self) -> ssl.Options:
        return ssl.SSLContext.options.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @options.setter
    def options(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.options.__set__(self, value)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def verify_flags(self) -> ssl.VerifyFlags:
        return ssl.SSLContext.verify_flags.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @verify_flags.setter
    def verify_flags(self, value: Any) -> None:
        if not self._locked:
            ssl.SSLContext.verify_flags.__set__(self, value)  # type: ignore[attr-defined]


class _SanMatcher(NamedTuple):
    """What :func:`~meshcore.tls.san.sans_match` reads of an ``xds.model.SanMatcherSpec``."""

    san_type: str
    matcher: Any


def _san_matchers(trust_domains: Optional[Iterable[str]], sans: Optional[Iterable[Any]]) -> Tuple[Any, ...]:
    from .._route_model import StringMatchSpec

    SanMatcherSpec = _SanMatcher
    out: List[Any] = []
    if isinstance(trust_domains, str):
        raise TypeError("trust_domains must be a list of trust domain names, not a string")
    for td in trust_domains or ():
        name = td[len("spiffe://"):] if isinstance(td, str) and td.startswith("spiffe://") else td
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"trust_domains: {td!r} is not a trust domain name")
        out.append(SanMatcherSpec("", StringMatchSpec("prefix", f"spiffe://{name}/")))
    if isinstance(sans, str):
        raise TypeError("sans must be a list (of SanMatcherSpec or exact URI SAN strings), not a string")
    for m in sans or ():
        if isinstance(m, str):
            out.append(SanMatcherSpec("URI", StringMatchSpec("exact", m)))
        elif hasattr(m, "san_type") and hasattr(m, "matcher"):
            out.append(m)
        else:
            raise TypeError(f"sans: {m!r} is neither a SanMatcherSpec nor a string")
    return tuple(out)


def _check_alpn(alpn: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(alpn, str):
        raise TypeError("alpn must be a list of protocol names, not a string")
    out = tuple(alpn)
    bad = [p for p in out if p not in SERVER_ALPN]
    if bad:
        raise ValueError(f"alpn: a server may select only {sorted(SERVER_ALPN)}, not {bad} "
                         "(istio-peer-exchange/istio* would make a sidecar client misread the connection)")
    return out


class ServerTls:
    """The TLS of one serving workload (see the module doc). Thread-safe."""

    def __init__(self, source: Any, *, require_client_certificate: bool = True,
                 alpn: Sequence[str] = ("h2", "http/1.1"), trust_domains: Optional[Sequence[str]] = None,
                 sans: Optional[Sequence[Any]] = None) -> None:
        if source is None or not callable(getattr(source, "current", None)):
            raise TypeError("ServerTls needs a certificate source (FileCertificateSource, SdsCertificateSource, "
                            f"mesh.tls.workload_source()), got {source!r}")
        self.source = source
        self.require_client_certificate = bool(require_client_certificate)
        self.alpn = _check_alpn(alpn)
        self._matchers = _san_matchers(trust_domains, sans)
        self.trust_domains = tuple(trust_domains or ())
        self._lock = threading.Lock()
        self._contexts: Dict[Tuple[str, ...], _ServerContext] = {}  # ALPN list -> newest context
        self._waited = False
        self._stats: Dict[str, int] = {}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        mode = "mTLS required" if self.require_client_certificate else "client certificate optional"
        return f"ServerTls({getattr(self.source, 'name', self.source)!r}, {mode}, alpn={list(self.alpn)})"

    # -- contexts ---------------------------------------------------------------------------------

    def _current_set(self) -> CertificateSet:
        try:
            s: CertificateSet = self.source.current()
        except CertificatesUnavailable:
            if not self._first_wait():
                raise
            s = self.source.current()
        if s.chain_pem is None:
            raise CertificatesUnavailable(f"certificate source {getattr(self.source, 'name', '?')!r} has no "
                                          "certificate chain: a server needs one")
        if s.roots_pem is None:
            raise CertificatesUnavailable(f"certificate source {getattr(self.source, 'name', '?')!r} has no root "
                                          "certificates: clients could not be verified")
        return s

    def _first_wait(self) -> bool:
        """A streamed source (SDS) with nothing yet: wait once for its first set, unless on an
        event loop's thread."""
        if self._waited or not hasattr(self.source, "wait") or self.source.peek() is not None:
            return False
        self._waited = True
        if "asyncio" in sys.modules:
            import asyncio

            try:
                asyncio.get_running_loop()
                return False
            except RuntimeError:
                pass
        return bool(self.source.wait(FIRST_CERTIFICATES_WAIT))

    def context(self, alpn: Optional[Sequence[str]] = None) -> ssl.SSLContext:
        """The server context of the current certificate generation (``alpn``: the server's own
        list instead of the one given at construction; same rules). Raises
        :class:`~meshcore.tls.CertificatesUnavailable` when there are no certificates."""
        if alpn is None:
            key = self.alpn
        else:
            key = tuple(alpn) if not isinstance(alpn, str) else alpn  # type: ignore[assignment]
            if key not in self._contexts:
                key = _check_alpn(alpn)
        s = self._current_set()
        ctx = self._contexts.get(key)
        if ctx is not None and ctx._mesh_set is s:
            return ctx
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is None or ctx._mesh_set is not s:
                try:
                    ctx = self._build(s, key)
                except (ssl.SSLError, ValueError, OSError) as e:
                    if ctx is None:
                        raise CertificatesUnavailable(f"cannot build a server TLS context: {e}") from e
                    log.error("server TLS: cannot use certificate generation %d (%s); keeping generation %d",
                              s.generation, e, ctx._mesh_set.generation if ctx._mesh_set else 0)
                    return ctx
                self._contexts[key] = ctx
        return ctx

    def _build(self, s: CertificateSet, alpn: Tuple[str, ...]) -> _ServerContext:
        ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_OPTIONAL
        ctx.options |= ssl.OP_NO_TICKET  # no resumption that outlives a rotation
        try:
            ctx.num_tickets = 0
        except (AttributeError, ValueError):  # pragma: no cover
            pass
        s.load_roots_into(ctx)
        s.load_identity_into(ctx)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        ctx.sni_callback = self._on_sni
        ctx._mesh_owner = self
        ctx._mesh_set = s
        ctx._mesh_alpn = alpn
        assert s.chain_pem is not None
        pem = s.chain_pem.decode("ascii")
        end = pem.find("-----END CERTIFICATE-----")
        ctx._mesh_leaf_pem = pem[pem.find("-----BEGIN CERTIFICATE-----"):end + 25] + "\n" if end >= 0 else None
        ctx._locked = True
        return ctx

    def _on_sni(self, sslobj: Any, server_name: Optional[str], front: Any) -> Optional[int]:
        """OpenSSL's servername callback (every ClientHello, SNI or not): the current generation."""
        try:
            if isinstance(sslobj, (_MeshSSLObject, _MeshSSLSocket)):
                sslobj._mesh_server_name = server_name
            cur = self.context(getattr(front, "_mesh_alpn", self.alpn))
            if cur is not front:
                sslobj.context = cur
        except Exception as e:  # never let a handshake go on with the wrong certificates
            self._count("ssl.connection_error")
            log.error("server TLS: no certificates for a new connection: %s", e)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    # -- after the handshake ----------------------------------------------------------------------

    def _after_handshake(self, obj: Any) -> None:
        ctx_set = getattr(obj.context, "_mesh_set", None)
        bundles = ctx_set.bundles if ctx_set is not None else None
        if not self._matchers and bundles is None:  # nothing to check: no certificate decoding
            if not obj.getpeercert(binary_form=True):
                self._count("ssl.no_certificate")
            self._count("ssl.handshake")
            return
        cert = obj.getpeercert()
        if not cert:
            self._count("ssl.no_certificate")
            self._count("ssl.handshake")
            return
        if bundles is not None:
            self._check_bundle(obj, cert, bundles)
        if self._matchers:
            sans = peer_sans(cert)
            if not sans_match(self._matchers, sans):
                self._count("ssl.fail_verify_san")
                reason = (f"the client certificate's SANs {describe_sans(sans)} match none of "
                          f"{describe_matchers(self._matchers)}")
                log.info("server TLS: refused a client: %s", reason)
                raise PeerRejected(reason)
        self._count("ssl.handshake")

    def _check_bundle(self, obj: Any, cert: Dict[str, Any], bundles: Any) -> None:
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        td = _spiffe_trust_domain(uris[0]) if len(uris) == 1 else None
        trusted = bundles.get(td) if td is not None else None
        root = _verified_root_der(obj) if trusted is not None else None
        if td is None or trusted is None or root is None or root not in trusted:
            self._count("ssl.fail_verify_error")
            why = ("SPIFFE bundle map in use: the client certificate must carry exactly one URI SAN that is a "
                   f"SPIFFE ID, it has {uris}" if td is None else
                   f"no trust bundle for trust domain {td!r}" if trusted is None else
                   "the verified chain could not be read" if root is None else
                   f"its chain ends at a root that is not in trust domain {td!r}'s bundle")
            log.info("server TLS: refused a client: %s", why)
            raise PeerRejected(why)

    def _count_failure(self, e: ssl.SSLError) -> None:
        text = f"{getattr(e, 'reason', '') or ''} {e}".upper()
        if isinstance(e, ssl.SSLCertVerificationError):
            self._count("ssl.fail_verify_error")
        elif "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
            self._count("ssl.fail_verify_no_cert")
        elif "CERTIFICATE_VERIFY_FAILED" in text:
            self._count("ssl.fail_verify_error")
        else:
            self._count("ssl.connection_error")

    def _count(self, stat: str) -> None:
        with self._stats_lock:
            self._stats[stat] = self._stats.get(stat, 0) + 1

    def stats(self) -> Dict[str, int]:
        """Envoy's listener ``ssl.*`` counters (see module doc), as counted so far."""
        with self._stats_lock:
            return dict(self._stats)

    def peer(self, ssl_object: Any) -> Any:
        """The verified client certificate of a finished handshake (an ``SSLSocket``/``SSLObject``)
        as a :data:`PeerCertificate`, or None (no certificate; or an unverified connection)."""
        if ssl_object is None:
            return None
        return _peer_of(ssl_object)

    @staticmethod
    def server_name(ssl_object: Any) -> Optional[str]:
        """The SNI the client sent on a connection made with a ServerTls context (else None)."""
        return getattr(ssl_object, "_mesh_server_name", None)

    # -- blocking sockets -------------------------------------------------------------------------

    def accept(self, sock: socket.socket, *, permissive: bool = False, timeout: Optional[float] = 10.0,
               alpn: Optional[Sequence[str]] = None) -> Optional[socket.socket]:
        """Serve an accepted blocking socket: the TLS socket after a checked handshake, or (with
        ``permissive``, when the first byte is not a TLS handshake record) ``sock`` itself for
        plaintext. ``None``: the client closed before sending anything (``sock`` is closed).
        ``timeout`` bounds the peek and the handshake. Errors (``ssl.SSLError`` incl.
        :class:`PeerRejected`, ``OSError``) propagate; ``sock`` is closed then."""
        previous = sock.gettimeout()
        try:
            sock.settimeout(timeout)
            if permissive:
                try:
                    first: Optional[bytes] = sock.recv(1, socket.MSG_PEEK)
                except socket.timeout:
                    first = None  # silent client: the plaintext server's own timeouts apply
                if first == b"":
                    sock.close()
                    return None
                if first is None or first[0] != TLS_RECORD_HANDSHAKE:
                    sock.settimeout(previous)
                    return sock
            tls = self.context(alpn).wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        try:
            tls.do_handshake()
            tls.settimeout(previous)
        except BaseException:
            tls.close()
            raise
        return tls

    # -- asyncio ----------------------------------------------------------------------------------

    def asyncio_protocol_factory(self, factory: Callable[[], Any], *, permissive: bool = False,
                                 alpn: Optional[Sequence[str]] = None,
                                 sniff_timeout: float = _DEFAULT_SNIFF_TIMEOUT,
                                 handshake_timeout: Optional[float] = None) -> Callable[[], Any]:
        """A protocol factory for ``loop.create_server``: pass ``ssl=tls.context(alpn)`` without
        ``permissive``, ``ssl=None`` with it (then each connection is peeked and either upgraded
        with ``loop.start_tls`` or handed over as plaintext). ``factory()`` makes the server's own
        protocol, which gets the connection once TLS (if any) is up and checked."""
        alpn_t = self.alpn if alpn is None else _check_alpn(alpn)
        return lambda: _asyncio_classes().TlsProtocol(factory, self, permissive, alpn_t, sniff_timeout,
                                                      handshake_timeout, None)

    # -- grpcio -----------------------------------------------------------------------------------

    def grpc_server_credentials(self) -> Any:
        """``grpc.ServerCredentials`` serving the current generation to every new handshake
        (``grpc.dynamic_ssl_server_credentials``); client certificates required when
        ``require_client_certificate`` (else not requested: grpcio cannot ask without requiring).
        For ``server.add_secure_port(address, tls.grpc_server_credentials())``."""
        import grpc

        first = self._current_set()
        lock = threading.Lock()
        served = [first]  # the generation these credentials hand out (one per credentials object)

        def config_of(s: CertificateSet) -> Any:
            return grpc.ssl_server_certificate_configuration([(s.key_pem, s.chain_pem)],
                                                             root_certificates=s.roots_pem)

        def fetcher() -> Any:
            try:
                cur = self._current_set()
            except Exception as e:  # keep serving the last configuration
                log.warning("server TLS (grpc): certificates unavailable, keeping the last ones: %s", e)
                return None
            with lock:
                if cur is served[0]:
                    return None
                served[0] = cur
            log.info("server TLS (grpc): new connections get certificate generation %d", cur.generation)
            return config_of(cur)

        return grpc.dynamic_ssl_server_credentials(config_of(first), fetcher,
                                                   require_client_authentication=self.require_client_certificate)

    def grpc_interceptor(self) -> Any:
        """A ``grpc.ServerInterceptor`` applying ``trust_domains``/``sans`` to each RPC's peer
        (C-core has no post-handshake hook): a failing or (when required) missing certificate ->
        ``UNAUTHENTICATED`` before the servicer runs. No matchers: lets everything through."""
        import grpc

        tls = self

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: Any) -> Any:
                reason = tls._grpc_refusal(context)
                if reason is not None:
                    tls._count("ssl.fail_verify_san")
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
                return behavior(request, context)
            return run

        class _Interceptor(grpc.ServerInterceptor):  # type: ignore[misc]
            def intercept_service(self, continuation: Any, details: Any) -> Any:
                handler = continuation(details)
                if handler is None or not tls._matchers:
                    return handler
                kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                         ("unary_stream", grpc.unary_stream_rpc_method_handler),
                         ("stream_unary", grpc.stream_unary_rpc_method_handler),
                         ("stream_stream", grpc.stream_stream_rpc_method_handler))
                for attr, make in kinds:
                    behavior = getattr(handler, attr)
                    if behavior is not None:
                        return make(guard(behavior), request_deserializer=handler.request_deserializer,
                                    response_serializer=handler.response_serializer)
                return handler

        return _Interceptor()

    def _grpc_refusal(self, context: Any) -> Optional[str]:
        ac = context.auth_context()
        if ac.get("transport_security_type") != [b"ssl"]:
            return "not a TLS connection"
        pems = ac.get("x509_pem_cert")
        if not pems:
            return "a client certificate is required" if self.require_client_certificate else None
        peer = _peer_from_pem(pems[0])
        sans = {"URI": list(peer.uri_sans), "DNS": list(peer.dns_sans), "EMAIL": [], "IP_ADDRESS": []}
        if not sans_match(self._matchers, sans):
            return (f"the client certificate's SANs {describe_sans(sans)} match none of "
                    f"{describe_matchers(self._matchers)}")
        return None


# --------------------------------------------------------------------------------------------
# asyncio: TLS (or the PERMISSIVE peek) in front of a server's protocol
# --------------------------------------------------------------------------------------------


class _AsyncioClasses:
    TlsProtocol: Any


_classes: Optional[_AsyncioClasses] = None


def _asyncio_classes() -> _AsyncioClasses:
    """Built on first use so that importing this module does not import asyncio."""
    global _classes
    if _classes is not None:
        return _classes
    import asyncio

    class TlsProtocol(asyncio.Protocol):
        """Until the connection is handed to the server's protocol: (PERMISSIVE) peek its first
        byte, run ``start_tls`` for TLS, then hand over (``transport.set_protocol``), so this
        object costs nothing afterwards. ``on_tls(inner, ssl_object)`` prepares the server's
        protocol of a TLS connection (the ASGI TLS extension for uvicorn)."""

        def __init__(self, factory: Callable[[], Any], tls: ServerTls, permissive: bool, alpn: Tuple[str, ...],
                     sniff_timeout: float, handshake_timeout: Optional[float],
                     on_tls: Optional[Callable[[Any, Any], None]]) -> None:
            self._factory = factory
            self._tls = tls
            self._permissive = permissive
            self._alpn = alpn
            self._sniff_timeout = sniff_timeout
            self._handshake_timeout = handshake_timeout
            self._on_tls = on_tls
            self._transport: Any = None
            self._peek: Optional[socket.socket] = None
            self._timer: Any = None
            self._task: Any = None
            self._buffer: List[bytes] = []
            self._eof = False
            self._lost = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            self._transport = transport
            if transport.get_extra_info("ssl_object") is not None:
                self._hand_over(transport)
            elif not self._permissive:
                log.warning("server TLS: a plaintext connection reached a TLS-only server; closing it")
                transport.abort()
            elif _PAUSE_IN_CONNECTION_MADE_IGNORED and \
                    type(asyncio.get_running_loop()).__module__.startswith("asyncio"):
                # Python 3.10's selector transport registers its reader after connection_made even
                # when paused there: pause one callback later, before any read can run
                asyncio.get_running_loop().call_soon(self._start_sniff, transport)
            else:
                self._start_sniff(transport)

        def _hand_over(self, transport: Any) -> None:
            inner = self._factory()
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and self._on_tls is not None:
                self._on_tls(inner, ssl_object)
            transport.set_protocol(inner)
            inner.connection_made(transport)
            if self._buffer:
                data, self._buffer = b"".join(self._buffer), []
                inner.data_received(data)
            if self._eof and not inner.eof_received():
                transport.close()

        # -- PERMISSIVE -------------------------------------------------------------------------

        def _start_sniff(self, transport: Any) -> None:
            if self._lost:
                return
            loop = asyncio.get_running_loop()
            transport.pause_reading()
            raw = transport.get_extra_info("socket")
            try:
                # a duplicate descriptor: the loop refuses a reader on the transport's own
                self._peek = socket.socket(fileno=os.dup(raw.fileno()))
                loop.add_reader(self._peek.fileno(), self._on_readable)
            except (OSError, NotImplementedError, AttributeError) as e:
                log.error("server TLS: PERMISSIVE needs a selector event loop (%s); closing the connection", e)
                self._stop_sniff()
                transport.abort()
                return
            self._timer = loop.call_later(self._sniff_timeout, self._on_sniff_timeout)

        def _stop_sniff(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._peek is not None:
                try:
                    asyncio.get_running_loop().remove_reader(self._peek.fileno())
                except (OSError, RuntimeError, ValueError):
                    pass
                self._peek.close()
                self._peek = None

        def _on_readable(self) -> None:
            assert self._peek is not None
            try:
                first = self._peek.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            self._stop_sniff()
            if not first:
                self._transport.close()
            elif first[0] == TLS_RECORD_HANDSHAKE:
                self._task = asyncio.get_running_loop().create_task(self._start_tls())
            else:
                self._plaintext()

        def _on_sniff_timeout(self) -> None:
            self._timer = None
            self._stop_sniff()
            self._plaintext()

        def _plaintext(self) -> None:
            transport = self._transport
            self._hand_over(transport)
            if not transport.is_closing():
                transport.resume_reading()

        async def _start_tls(self) -> None:
            loop = asyncio.get_running_loop()
            try:
                ctx = self._tls.context(self._alpn)
                tls_transport = await loop.start_tls(self._transport, self, ctx, server_side=True,
                                                     ssl_handshake_timeout=self._handshake_timeout)
            except Exception as e:  # noqa: BLE001 - the client's failure (refused, reset, timed out): close
                log.debug("server TLS: handshake failed: %s: %s", type(e).__name__, e)
                self._transport.abort()
                return
            if self._lost or tls_transport is None:
                return
            self._hand_over(tls_transport)

        # -- before the hand-over ---------------------------------------------------------------

        def data_received(self, data: bytes) -> None:  # between start_tls's handshake and the hand-over
            self._buffer.append(data)

        def eof_received(self) -> Optional[bool]:
            self._eof = True
            return True

        def connection_lost(self, exc: Optional[BaseException]) -> None:
            self._lost = True
            self._stop_sniff()
            if self._task is not None and not self._task.done():
                self._task.cancel()

    c = _AsyncioClasses()
    c.TlsProtocol = TlsProtocol
    _classes = c
    return c


# --------------------------------------------------------------------------------------------
# ASGI: the TLS extension per connection
# --------------------------------------------------------------------------------------------


class _ScopeTls:
    """An ASGI app for one TLS connection: puts the connection's TLS extension into each scope."""

    __slots__ = ("app", "tls")

    def __init__(self, app: Any, tls: Dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    def __call__(self, scope: Any, receive: Any, send: Any, *rest: Any) -> Any:
        if scope.get("type") in ("http", "websocket"):
            ext = scope.get("extensions")
            if ext is None:
                scope["extensions"] = {"tls": dict(self.tls)}
            else:
                ext["tls"] = dict(self.tls)
        return self.app(scope, receive, send, *rest)


def _uvicorn_on_tls(inner: Any, ssl_object: Any) -> None:
    """uvicorn's HTTP protocols keep the ASGI app in ``.app`` and make websocket protocols from
    ``.ws_protocol_class`` (which also keep ``.app``): give both the connection's extension."""
    info = tls_extension(ssl_object)
    app = getattr(inner, "app", None)
    if app is not None:
        inner.app = _ScopeTls(app, info)
    ws = getattr(inner, "ws_protocol_class", None)
    if ws is not None:
        def make_ws(*a: Any, **kw: Any) -> Any:
            p = ws(*a, **kw)
            if getattr(p, "app", None) is not None:
                p.app = _ScopeTls(p.app, info)
            return p
        inner.ws_protocol_class = make_ws


# --------------------------------------------------------------------------------------------
# uvicorn
# --------------------------------------------------------------------------------------------

_UVICORN_SSL_OPTIONS = ("ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_version", "ssl_cert_reqs",
                        "ssl_ca_certs", "ssl_ciphers", "ssl_context_factory")
_uvicorn_config_cls: Any = None


def _uvicorn_config_class() -> Any:
    global _uvicorn_config_cls
    if _uvicorn_config_cls is not None:
        return _uvicorn_config_cls
    import uvicorn

    class MeshUvicornConfig(uvicorn.Config):  # type: ignore[misc]
        """uvicorn's Config with a ServerTls: ``load()`` sets ``ssl`` and wraps the HTTP protocol."""

        _mesh_tls: Optional[ServerTls] = None
        _mesh_permissive = False
        _mesh_sniff_timeout = _DEFAULT_SNIFF_TIMEOUT
        _mesh_ready = False

        @property  # type: ignore[override]
        def is_ssl(self) -> bool:  # False while uvicorn's own load() runs: it must not build a context
            return self._mesh_ready and not self._mesh_permissive

        def load(self) -> None:
            if self.loaded:
                return
            super().load()
            tls = self._mesh_tls
            assert tls is not None
            inner = self.http_protocol_class
            declared = getattr(inner, "alpn_protocols", None) or ("http/1.1",)
            alpn = tuple(p for p in declared if p in SERVER_ALPN) or ("http/1.1",)
            self.ssl = None if self._mesh_permissive else tls.context(alpn)
            permissive, sniff = self._mesh_permissive, self._mesh_sniff_timeout
            classes = _asyncio_classes()

            def protocol(*a: Any, **kw: Any) -> Any:
                return classes.TlsProtocol(lambda: inner(*a, **kw), tls, permissive, alpn, sniff, None,
                                           _uvicorn_on_tls)

            self.http_protocol_class = protocol
            self._mesh_ready = True

    _uvicorn_config_cls = MeshUvicornConfig
    return MeshUvicornConfig


def uvicorn_config(app: Any, tls: ServerTls, *, permissive: bool = False,
                   sniff_timeout: float = _DEFAULT_SNIFF_TIMEOUT, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with ``tls`` (``kwargs``: uvicorn's own options, less
    its ``ssl_*`` ones, which would bypass the mesh). ``permissive``: TLS and plaintext on the
    one port. Use with ``uvicorn.Server(config)``; the app finds the client in
    ``scope["extensions"]["tls"]`` (:func:`peer_from_asgi_scope`)."""
    if not isinstance(tls, ServerTls):
        raise TypeError(f"tls must be a ServerTls, got {type(tls).__name__}")
    clash = [k for k in _UVICORN_SSL_OPTIONS if k in kwargs]
    if clash:
        raise ValueError(f"uvicorn_config: {clash} would replace the mesh's TLS; the certificates come from ServerTls")
    cfg = _uvicorn_config_class()(app, **kwargs)
    cfg._mesh_tls = tls
    cfg._mesh_permissive = bool(permissive)
    cfg._mesh_sniff_timeout = float(sniff_timeout)
    tls._current_set()  # fail now, not at the first connection, when there are no certificates
    return cfg


def serve_uvicorn(app: Any, tls: ServerTls, host: str = "0.0.0.0", port: int = 8443, *,
                  permissive: bool = False, **kwargs: Any) -> None:
    """Run uvicorn (blocking) with :func:`uvicorn_config`."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, tls, host=host, port=port, permissive=permissive, **kwargs)).run()


# --------------------------------------------------------------------------------------------
# hypercorn
# --------------------------------------------------------------------------------------------


def hypercorn_config(tls: ServerTls, **settings: Any) -> Any:
    """A ``hypercorn.config.Config`` whose TLS is ``tls`` (ALPN: hypercorn's ``alpn_protocols``
    that a server may select, by default ``h2, http/1.1``). ``settings``: Config attributes
    (``bind=["127.0.0.1:8443"]``, ...), less its ``certfile``/``keyfile``/``ca_certs``/
    ``verify_mode``/``verify_flags``/``ciphers``."""
    from hypercorn.config import Config

    if not isinstance(tls, ServerTls):
        raise TypeError(f"tls must be a ServerTls, got {type(tls).__name__}")
    clash = [k for k in ("certfile", "keyfile", "keyfile_password", "ca_certs", "verify_mode", "verify_flags",
                         "ciphers") if k in settings]
    if clash:
        raise ValueError(f"hypercorn_config: {clash} would replace the mesh's TLS; "
                         "the certificates come from ServerTls")

    class MeshHypercornConfig(Config):  # type: ignore[misc]
        @property  # type: ignore[override]
        def ssl_enabled(self) -> bool:
            return True

        def create_ssl_context(self) -> ssl.SSLContext:
            alpn = tuple(p for p in self.alpn_protocols if p in SERVER_ALPN) or ("http/1.1",)
            return tls.context(alpn)

    cfg = MeshHypercornConfig()
    for k, v in settings.items():
        if not hasattr(cfg, k):
            raise ValueError(f"hypercorn_config: unknown setting {k!r}")
        setattr(cfg, k, v)
    tls.context()  # fail now when there are no certificates
    return cfg


def _install_hypercorn_tls_extension() -> None:
    """hypercorn (0.18) passes no TLS extension: its asyncio ``TCPServer`` (one per connection)
    is replaced, process-wide and once, by a subclass that gives connections made with a
    ServerTls context the same ``scope["extensions"]["tls"]`` as uvicorn gets."""
    from hypercorn.asyncio import run as hrun

    base = hrun.TCPServer
    if getattr(base, "_meshcore_tls", False):
        return

    class MeshTCPServer(base):  # type: ignore[misc, valid-type]
        _meshcore_tls = True

        async def run(self) -> None:
            ssl_object = self.writer.get_extra_info("ssl_object")
            if ssl_object is not None and _owner(ssl_object) is not None:
                self.app = _ScopeTls(self.app, tls_extension(ssl_object))
            await super().run()

    hrun.TCPServer = MeshTCPServer


async def serve_hypercorn(app: Any, tls: ServerTls, config: Any = None, *,
                          shutdown_trigger: Optional[Callable[[], Any]] = None, **settings: Any) -> None:
    """``hypercorn.asyncio.serve`` with ``config`` (default: :func:`hypercorn_config` of ``tls``
    and ``settings``) and the TLS extension in each scope (see module doc)."""
    from hypercorn.asyncio import serve

    if config is None:
        config = hypercorn_config(tls, **settings)
    elif settings:
        raise ValueError("serve_hypercorn: give settings or a config, not both")
    _install_hypercorn_tls_extension()
    await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------------------------


def gunicorn_settings(tls: ServerTls, *, alpn: Sequence[str] = ("http/1.1",)) -> Dict[str, Any]:
    """gunicorn settings (for a config file: ``globals().update(gunicorn_settings(tls))``) that
    serve TLS with ``tls``: ``ssl_context`` (gunicorn >= 21 calls it for each connection; it
    returns the current context and ignores gunicorn's default factory), ``certfile``/``keyfile``
    (gunicorn turns TLS on when they are set and checks that they exist; they are not read),
    ``do_handshake_on_connect`` (the handshake and the peer checks before the request is read).
    ``alpn``: HTTP/1.1 only, what gunicorn's workers speak; with gunicorn's HTTP/2 turned on
    (``http_protocols``) pass ``("h2", "http/1.1")``."""
    if not isinstance(tls, ServerTls):
        raise TypeError(f"tls must be a ServerTls, got {type(tls).__name__}")
    alpn_t = _check_alpn(alpn)
    tls.context(alpn_t)

    def ssl_context(conf: Any, default_ssl_context_factory: Any) -> ssl.SSLContext:
        return tls.context(alpn_t)

    src = tls.source
    return {
        "certfile": getattr(src, "certificate_file", None) or os.devnull,
        "keyfile": getattr(src, "private_key_file", None) or os.devnull,
        "ssl_context": ssl_context,
        "do_handshake_on_connect": True,
    }


# --------------------------------------------------------------------------------------------
# socketserver / WSGI (stdlib)
# --------------------------------------------------------------------------------------------


class TlsServerMixin:
    """For ``socketserver`` TCP servers (put it first: ``class S(TlsServerMixin, ThreadingHTTPServer)``):
    each accepted connection gets the TLS handshake and peer checks (or, with ``mesh_permissive``,
    the first-byte peek) in ``finish_request`` -- the request's own thread under ``ThreadingMixIn``
    -- before the handler runs; a failed one is closed and the handler never runs. Set
    ``mesh_tls`` (a :class:`ServerTls`) on the class or the instance."""

    mesh_tls: Optional[ServerTls] = None
    mesh_permissive = False
    mesh_handshake_timeout: Optional[float] = 10.0
    mesh_alpn: Sequence[str] = ("http/1.1",)

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.mesh_tls
        if tls is None:
            raise RuntimeError(f"{type(self).__name__}: mesh_tls is not set (no plaintext fallback)")
        try:
            conn = tls.accept(request, permissive=self.mesh_permissive, timeout=self.mesh_handshake_timeout,
                              alpn=self.mesh_alpn)
        except (OSError, CertificatesUnavailable) as e:
            log.debug("server TLS: connection from %s refused: %s", client_address, e)
            return
        if conn is None:
            return
        try:
            super().finish_request(conn, client_address)  # type: ignore[misc]
        finally:
            if conn is not request:
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                conn.close()


_wsgi: Optional[Tuple[Any, Any]] = None


def _wsgi_classes() -> Tuple[Any, Any]:
    global _wsgi
    if _wsgi is not None:
        return _wsgi
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        def get_environ(self) -> Dict[str, Any]:
            env = super().get_environ()
            conn = self.connection
            if isinstance(conn, ssl.SSLSocket):
                info = tls_extension(conn)
                env["HTTPS"] = "on"
                env["meshcore.tls"] = info
                env["meshcore.peer"] = info["meshcore.peer"]
            else:
                env["meshcore.peer"] = None
            return env

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("wsgi %s: " + format, self.address_string(), *args)

    class MeshWSGIServer(TlsServerMixin, ThreadingMixIn, WSGIServer):
        """wsgiref's server, threaded, behind :class:`TlsServerMixin` (:func:`make_wsgi_server`)."""

        daemon_threads = True

    _wsgi = (MeshWSGIServer, Handler)
    return _wsgi


def make_wsgi_server(app: Any, tls: ServerTls, host: str = "0.0.0.0", port: int = 8443, *,
                     permissive: bool = False, handshake_timeout: Optional[float] = 10.0) -> Any:
    """A threaded stdlib WSGI server (``wsgiref``; ``serve_forever()``/``shutdown()``/
    ``server_close()``; ``server_address`` has the bound port) serving ``app`` with ``tls``:
    ``environ["meshcore.peer"]`` is the client's :data:`PeerCertificate` (None for plaintext),
    ``environ["meshcore.tls"]`` the TLS extension dict, ``wsgi.url_scheme`` ``https``.
    ``permissive``: TLS and plaintext on the one port."""
    if not isinstance(tls, ServerTls):
        raise TypeError(f"tls must be a ServerTls, got {type(tls).__name__}")
    server_cls, handler = _wsgi_classes()
    tls.context(("http/1.1",))
    server = server_cls((host, port), handler)
    server.mesh_tls = tls
    server.mesh_permissive = bool(permissive)
    server.mesh_handshake_timeout = handshake_timeout
    server.set_app(app)
    return server


def __getattr__(name: str) -> Any:  # MeshWSGIServer: the class, built on first use
    if name == "MeshWSGIServer":
        return _wsgi_classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
