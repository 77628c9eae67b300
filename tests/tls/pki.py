"""Test PKI in Istio's exact certificate shape (``security.md`` §2 "Leaf format", §6.2), made with
``cryptography``; nothing from meshcore.

* :class:`CA`: a root (``CA.new("root")``) or an intermediate (``CA.new("int", parent=root)``),
  EC P-256, BasicConstraints CA critical, KeyUsage keyCertSign|cRLSign critical, SKI, AKI.
* :meth:`CA.issue` -> :class:`Leaf`: EMPTY subject, one critical URI SAN (the SPIFFE ID; optional
  test-only DNS SANs), KeyUsage digitalSignature|keyEncipherment critical, EKU serverAuth+clientAuth,
  BasicConstraints CA:false critical, AKI from the issuer key, NotBefore now-2min, 24 h validity.
* :func:`write_istio_dir`: ``key.pem`` (PKCS8), ``cert-chain.pem`` (leaf + intermediates),
  ``root-cert.pem`` (roots) in that order, each only if changed, each via tmp file + rename, like
  the Istio agent's ``OutputKeyCertToDir``. :func:`write_key_only` / :func:`write_mismatched_pair`
  leave the transient "new key, old chain" state of a rotation on disk.
* :class:`Pki`: the bundle the ``pki`` fixture gives (root, intermediate, evil root, the standard
  identities, each already written to its own Istio-layout directory).
* :func:`certificate_providers` / :func:`grpc_bootstrap` / :func:`write_grpc_bootstrap`: the gRPC
  bootstrap's ``file_watcher`` block pointing at such a directory (as Istio's agent writes it).
* :func:`client_context` / :func:`server_context`: stdlib ``ssl`` contexts over a cert directory
  (``security.md`` §5.1 recipe).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"

KEY_FILE = "key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOTS_FILE = "root-cert.pem"

LEAF_TTL = _dt.timedelta(hours=24)
CA_TTL = _dt.timedelta(days=365)
BACKDATE = _dt.timedelta(minutes=2)  # Istio: NotBefore = now - 2 min

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


def spiffe_id(sa: str, ns: str = NAMESPACE, td: str = TRUST_DOMAIN) -> str:
    """``spiffe://<td>/ns/<ns>/sa/<sa>`` (Istio's ``spiffe.Identity.String``)."""
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_key(key_type: str = "ec") -> PrivateKey:
    """EC P-256 (default) or RSA 2048 (Istio's default leaf key type)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def key_pem(key: PrivateKey) -> bytes:
    """PKCS8, unencrypted (``-----BEGIN PRIVATE KEY-----``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _serial() -> int:
    return x509.random_serial_number()


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


# --------------------------------------------------------------------------------------------
# CAs and leaves
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Leaf:
    """A workload certificate and its key. ``chain`` = the issuing intermediates (leaf first
    excluded, root excluded); ``root`` = the self-signed CA at the top."""

    cert: x509.Certificate
    key: PrivateKey
    chain: Tuple[x509.Certificate, ...] = ()
    root: Optional[x509.Certificate] = None

    @property
    def spiffe_id(self) -> str:
        """The (first) URI SAN."""
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.UniformResourceIdentifier)[0]

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def cert_pem(self) -> bytes:
        """The leaf alone."""
        return cert_pem(self.cert)

    @property
    def chain_pem(self) -> bytes:
        """What Istio puts in ``cert-chain.pem``: the leaf, then the intermediates."""
        return cert_pem(self.cert, *self.chain)

    @property
    def root_pem(self) -> bytes:
        assert self.root is not None
        return cert_pem(self.root)


@dataclass(frozen=True, eq=False)
class CA:
    """A CA (EC P-256). ``parent`` is None for a self-signed root."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parent: Optional["CA"] = None

    @classmethod
    def new(cls, name: str, *, parent: Optional["CA"] = None, org: Optional[str] = None,
            not_before: Optional[_dt.datetime] = None, not_after: Optional[_dt.datetime] = None) -> "CA":
        """A root (``parent=None``) or an intermediate signed by ``parent``. Subject
        ``O=<org or trust domain>, CN=<name>`` (a CA subject must not be empty)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org or TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        if parent is None:
            issuer, signer = subject, key
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
            path_length = None
        else:
            issuer, signer = parent.cert.subject, parent.key
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(parent.cert))
            path_length = 0
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before or now - BACKDATE)
            .not_valid_after(not_after or now + CA_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .sign(signer, hashes.SHA256())
        )
        return cls(name=name, cert=cert, key=key, parent=parent)

    @property
    def root(self) -> "CA":
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    @property
    def intermediates(self) -> Tuple[x509.Certificate, ...]:
        """This CA and its parents up to (not including) the root; empty for a root."""
        out, ca = [], self
        while ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return tuple(out)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, spiffe: str, *, dns: Iterable[str] = (), not_before: Optional[_dt.datetime] = None,
              not_after: Optional[_dt.datetime] = None, ttl: Optional[_dt.timedelta] = None,
              key: Optional[PrivateKey] = None, key_type: str = "ec") -> Leaf:
        """An Istio workload certificate for ``spiffe`` (one URI SAN; ``dns`` adds test-only DNS
        SANs). Validity: ``not_before`` (default now-2min) to ``not_after`` (default now + ``ttl``,
        ``ttl`` default 24 h). An expired leaf: both in the past; a short-lived one: ``ttl=...``.
        ``key`` reuses a key (``key_type`` "ec" P-256 or "rsa" 2048 for a new one)."""
        key = key or new_key(key_type)
        now = _now()
        nb = not_before or now - BACKDATE
        na = not_after or (now + (ttl if ttl is not None else LEAF_TTL))
        sans: list = [x509.UniformResourceIdentifier(spiffe)]
        sans += [x509.DNSName(d) for d in dns]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)  # critical: the subject is empty
            .sign(self.key, hashes.SHA256())
        )
        return Leaf(cert=cert, key=key, chain=self.intermediates, root=self.root.cert)


# --------------------------------------------------------------------------------------------
# Istio's on-disk layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    """One Istio-layout directory (``OUTPUT_CERTS``): absolute paths as ``str``."""

    dir: str
    key: str     # key.pem (PKCS8)
    chain: str   # cert-chain.pem (leaf + intermediates)
    roots: str   # root-cert.pem (one or more roots)

    @classmethod
    def of(cls, path: Union[str, os.PathLike]) -> "CertPaths":
        d = os.path.abspath(os.fspath(path))
        return cls(d, os.path.join(d, KEY_FILE), os.path.join(d, CHAIN_FILE), os.path.join(d, ROOTS_FILE))


CertLike = Union[x509.Certificate, CA, Leaf, bytes]


def _pem_of(items: Sequence[CertLike]) -> bytes:
    out = b""
    for it in items:
        if isinstance(it, bytes):
            out += it
        elif isinstance(it, CA):
            out += it.cert_pem
        elif isinstance(it, Leaf):
            out += it.cert_pem
        else:
            out += cert_pem(it)
    return out


def atomic_write(path: Union[str, os.PathLike], data: bytes, mode: int = 0o600) -> None:
    """Istio's ``file.AtomicWrite``: a temp file in the same directory, chmod, rename over."""
    path = os.fspath(path)
    d, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=base + ".tmp.", dir=d or ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_if_changed(path: str, data: bytes, mode: int) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:
        pass
    atomic_write(path, data, mode)
    return True


def write_istio_dir(path: Union[str, os.PathLike], leaf: Optional[Leaf] = None, *,
                    chain: Optional[Sequence[CertLike]] = None, roots: Optional[Sequence[CertLike]] = None,
                    key: Optional[PrivateKey] = None, mode: int = 0o600) -> CertPaths:
    """Write ``key.pem``, then ``cert-chain.pem``, then ``root-cert.pem`` into ``path`` (created
    if missing), each only if its content changed, each atomically (like ``OutputKeyCertToDir``).

    Defaults from ``leaf``: key = ``leaf.key``, chain = leaf + its intermediates, roots = its root.
    ``chain`` / ``roots`` take certificates, CAs, Leafs or PEM bytes (several roots = a root
    bundle, as during root rotation). A part with nothing to write (no leaf, no override) is left
    as it is on disk."""
    p = CertPaths.of(path)
    os.makedirs(p.dir, exist_ok=True)
    k = key if key is not None else (leaf.key if leaf is not None else None)
    if k is not None:
        _write_if_changed(p.key, key_pem(k), mode)
    if chain is not None:
        _write_if_changed(p.chain, _pem_of(chain), mode)
    elif leaf is not None:
        _write_if_changed(p.chain, leaf.chain_pem, mode)
    if roots is not None:
        _write_if_changed(p.roots, _pem_of(roots), mode)
    elif leaf is not None and leaf.root is not None:
        _write_if_changed(p.roots, leaf.root_pem, mode)
    return p


def write_key_only(path: Union[str, os.PathLike], new_leaf: Leaf, mode: int = 0o600) -> CertPaths:
    """The first step of an agent rotation: only ``key.pem`` replaced, so the directory holds the
    new key with the old ``cert-chain.pem`` (``load_cert_chain`` -> KEY_VALUES_MISMATCH) until
    :func:`write_istio_dir` is called with ``new_leaf``."""
    return write_istio_dir(path, key=new_leaf.key, mode=mode)


def write_mismatched_pair(path: Union[str, os.PathLike], *, key_of: Leaf, chain_of: Leaf,
                          roots: Optional[Sequence[CertLike]] = None, mode: int = 0o600) -> CertPaths:
    """A directory with ``key_of``'s key and ``chain_of``'s chain (and ``chain_of``'s root unless
    ``roots``): a deliberately mismatched pair."""
    return write_istio_dir(path, key=key_of.key, chain=[chain_of.chain_pem],
                           roots=roots if roots is not None else [chain_of.root_pem], mode=mode)


# --------------------------------------------------------------------------------------------
# gRPC bootstrap (Istio agent's pkg/istio-agent/grpcxds/grpc_bootstrap.go shape)
# --------------------------------------------------------------------------------------------


def certificate_providers(cert_dir: Union[str, os.PathLike, CertPaths], *, refresh_interval: str = "900s",
                          instance: str = "default") -> dict:
    """The bootstrap's ``certificate_providers`` value: ``{instance: file_watcher over cert_dir}``."""
    p = cert_dir if isinstance(cert_dir, CertPaths) else CertPaths.of(cert_dir)
    return {instance: {"plugin_name": "file_watcher", "config": {
        "certificate_file": p.chain, "private_key_file": p.key, "ca_certificate_file": p.roots,
        "refresh_interval": refresh_interval}}}


def grpc_bootstrap(cert_dir: Union[str, os.PathLike, CertPaths, None], *, server_uri: str = "unix:///etc/istio/XDS",
                   node_id: str = "sidecar~127.0.0.1~pod1.default~default.svc.cluster.local",
                   node_metadata: Optional[dict] = None, refresh_interval: str = "900s") -> dict:
    """A whole proxyless bootstrap as Istio's agent writes it; ``certificate_providers`` only when
    ``cert_dir`` is given (the agent writes it only when ``OUTPUT_CERTS`` is set)."""
    meta = {"GENERATOR": "grpc", "INSTANCE_IPS": "127.0.0.1", "ISTIO_VERSION": "test"}
    meta.update(node_metadata or {})
    out: dict = {
        "xds_servers": [{"server_uri": server_uri, "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "metadata": meta, "locality": {}},
    }
    if cert_dir is not None:
        out["certificate_providers"] = certificate_providers(cert_dir, refresh_interval=refresh_interval)
    out["server_listener_resource_name_template"] = "xds.istio.io/grpc/lds/inbound/%s"
    return out


def write_grpc_bootstrap(path: Union[str, os.PathLike], cert_dir: Union[str, os.PathLike, CertPaths, None],
                         **kw) -> str:
    """:func:`grpc_bootstrap` written (atomically) as JSON to ``path``; returns the path."""
    atomic_write(path, json.dumps(grpc_bootstrap(cert_dir, **kw), indent=2).encode(), 0o644)
    return os.fspath(path)


# --------------------------------------------------------------------------------------------
# stdlib ssl contexts
# --------------------------------------------------------------------------------------------


def client_context(paths: Optional[CertPaths], *, alpn: Optional[Sequence[str]] = None,
                   roots: Optional[str] = None, strict: bool = True,
                   max_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    """``PROTOCOL_TLS_CLIENT``, ``check_hostname=False``, ``CERT_REQUIRED``; trusts ``roots``
    (default ``paths.roots``); presents ``paths``' chain unless ``paths`` is None (no client
    cert; then ``roots`` is required). ``strict`` adds ``VERIFY_X509_STRICT``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ca = roots or (paths.roots if paths else None)
    if ca is None:
        raise ValueError("client_context: no roots")
    ctx.load_verify_locations(ca)
    if paths is not None:
        ctx.load_cert_chain(paths.chain, paths.key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def server_context(paths: CertPaths, *, alpn: Optional[Sequence[str]] = ("h2", "http/1.1"),
                   require_client_cert: bool = True, strict: bool = True) -> ssl.SSLContext:
    """``PROTOCOL_TLS_SERVER`` presenting ``paths``' chain, verifying clients against ``paths.roots``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.chain, paths.key)
    ctx.load_verify_locations(paths.roots)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


# --------------------------------------------------------------------------------------------
# The fixture bundle
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pki:
    """Roots, identities and their Istio-layout directories under ``dir``.

    Every identity directory's ``root-cert.pem`` is the mesh root (``root``), also for the
    ``evil_client`` (it trusts the mesh; only its own certificate is foreign), so a failure is
    caused by the peer refusing the certificate, never by the client refusing the peer."""

    dir: str
    root: CA
    intermediate: CA   # signed by root
    evil_root: CA      # a foreign self-signed CA
    leaves: Dict[str, Leaf] = field(default_factory=dict)
    _paths: Dict[str, CertPaths] = field(default_factory=dict)

    IDENTITIES = ("client", "server", "sidecar", "other_sa", "client_via_intermediate", "other_td_client",
                  "evil_client", "expired_client", "server_with_dns")

    @classmethod
    def create(cls, base_dir: Union[str, os.PathLike]) -> "Pki":
        base = os.path.abspath(os.fspath(base_dir))
        os.makedirs(base, exist_ok=True)
        root = CA.new("root")
        intermediate = CA.new("intermediate", parent=root)
        evil = CA.new("evil-root", org="evil.example")
        self = cls(dir=base, root=root, intermediate=intermediate, evil_root=evil)
        now = _now()
        self.add("client", root.issue(spiffe_id("client")))
        self.add("server", root.issue(spiffe_id("server")))
        self.add("sidecar", root.issue(spiffe_id("sidecar")))
        self.add("other_sa", root.issue(spiffe_id("other")))
        self.add("client_via_intermediate", intermediate.issue(spiffe_id("client")))
        self.add("other_td_client", root.issue(spiffe_id("client", td="other.domain")))
        self.add("evil_client", evil.issue(spiffe_id("client")), roots=[root])
        self.add("expired_client", root.issue(spiffe_id("client"), not_before=now - _dt.timedelta(days=2),
                                              not_after=now - _dt.timedelta(days=1)))
        self.add("server_with_dns", root.issue(spiffe_id("server"), dns=("localhost",)))
        atomic_write(self.root_file, root.cert_pem, 0o644)
        atomic_write(self.evil_root_file, evil.cert_pem, 0o644)
        return self

    def add(self, name: str, leaf: Leaf, *, roots: Optional[Sequence[CertLike]] = None) -> CertPaths:
        """Keep ``leaf`` as ``name`` and write it to ``<dir>/<name>/`` (roots default: its root)."""
        self.leaves[name] = leaf
        self._paths[name] = write_istio_dir(os.path.join(self.dir, name), leaf, roots=roots)
        return self._paths[name]

    def paths(self, name: str) -> CertPaths:
        """The Istio-layout directory of identity ``name`` (see :attr:`IDENTITIES`)."""
        return self._paths[name]

    def __getattr__(self, name: str) -> Leaf:
        leaves = self.__dict__.get("leaves", {})
        if name in leaves:
            return leaves[name]
        raise AttributeError(name)

    @property
    def root_file(self) -> str:
        """``<dir>/root-cert.pem``: the mesh root alone."""
        return os.path.join(self.dir, ROOTS_FILE)

    @property
    def evil_root_file(self) -> str:
        return os.path.join(self.dir, "evil-root-cert.pem")

    def client_context(self, name: str = "client", **kw) -> ssl.SSLContext:
        """:func:`client_context` over identity ``name``'s directory."""
        return client_context(self.paths(name), **kw)

    def server_context(self, name: str = "server", **kw) -> ssl.SSLContext:
        return server_context(self.paths(name), **kw)


def make_pki(base_dir: Union[str, os.PathLike, None] = None) -> Pki:
    """:meth:`Pki.create` in ``base_dir`` (default: a new temp dir)."""
    return Pki.create(base_dir or tempfile.mkdtemp(prefix="meshcore-pki-"))


__all__ = [
    "CA", "Leaf", "CertPaths", "Pki", "make_pki", "spiffe_id", "new_key", "key_pem", "cert_pem",
    "write_istio_dir", "write_key_only", "write_mismatched_pair", "atomic_write",
    "certificate_providers", "grpc_bootstrap", "write_grpc_bootstrap", "client_context", "server_context",
    "TRUST_DOMAIN", "NAMESPACE", "KEY_FILE", "CHAIN_FILE", "ROOTS_FILE", "LEAF_TTL",
]
