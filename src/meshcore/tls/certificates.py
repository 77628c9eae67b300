"""Workload certificates from files, as Istio's agent writes them: read, checked, rotated.

A :class:`FileCertificateSource` watches a certificate chain, its private key and a root bundle
(the gRPC ``file_watcher`` certificate provider: ``certificate_file``, ``private_key_file``,
``ca_certificate_file``, ``refresh_interval``). Each successful read is one immutable
:class:`CertificateSet` with a generation number; TLS contexts are built per generation, so a
rotation gives new connections the new pair while connections already open keep theirs.

Rules (A29 / Istio's agent, which writes ``key.pem``, ``cert-chain.pem`` and ``root-cert.pem``
one file at a time):

* the files are looked at again when ``refresh_interval`` has passed since the last look, on the
  next use (a new connection or :meth:`FileCertificateSource.identity`); an unchanged file
  (same inode, size and mtime) is not read again;
* a pair that does not match (the key rewritten, the chain not yet), an unreadable or unparsable
  file keeps the last good set in use and is tried again one second later (or at the refresh
  interval, if shorter); the problem is reported by :meth:`identity` and logged once per change;
* no good set yet means no TLS at all: users of the source get :class:`CertificatesUnavailable`
  (never a connection without the certificates it needs).
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from ..errors import MeshError

__all__ = ["CertificatesUnavailable", "CertificateSet", "FileCertificateSource", "WorkloadIdentity",
           "ISTIO_FILE_NAMES", "parse_spiffe_bundle_map"]

log = logging.getLogger(__name__)

#: Istio's agent writes these into ``OUTPUT_CERTS`` (``/var/lib/istio/data`` for proxyless pods)
ISTIO_FILE_NAMES = ("cert-chain.pem", "key.pem", "root-cert.pem")

_RETRY_AFTER_ERROR = 1.0
#: warn when less than this part of the certificate's lifetime is left (Istio rotates at half)
_EXPIRY_WARN_FRACTION = 0.2


class CertificatesUnavailable(MeshError):
    """No usable workload certificates (files missing, unreadable, mismatched, or a needed part
    absent): TLS connections that need them are refused, never made without them."""


@dataclass(frozen=True)
class WorkloadIdentity:
    """What a certificate source currently presents (``Mesh.identity()``).

    ``spiffe_id``: the leaf's SPIFFE ID (its URI SAN) or ``None``; ``not_after``: expiry as a
    Unix time; ``seconds_left``: until expiry (negative once expired); ``root_count``: the trust
    anchors loaded; ``generation``: how many good sets were loaded; ``problem``: why the last
    read failed or the certificate is expired/expiring (``None``: all well).
    """

    source: str
    spiffe_id: Optional[str]
    uri_sans: Tuple[str, ...]
    dns_sans: Tuple[str, ...]
    not_before: Optional[float]
    not_after: Optional[float]
    seconds_left: Optional[float]
    root_count: int
    generation: int
    problem: Optional[str]

    def as_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "spiffe_id": self.spiffe_id, "uri_sans": list(self.uri_sans),
                "dns_sans": list(self.dns_sans), "not_before": self.not_before, "not_after": self.not_after,
                "seconds_left": self.seconds_left, "root_count": self.root_count,
                "generation": self.generation, "problem": self.problem}


class CertificateSet:
    """One good read of the files: PEM bytes and what the leaf says.

    ``chain_pem``/``key_pem`` are ``None`` for a roots-only source; ``roots_pem`` is ``None`` for
    an identity-only one. Immutable once built.
    """

    __slots__ = ("generation", "chain_pem", "key_pem", "roots_pem", "root_count", "uri_sans", "dns_sans",
                 "not_before", "not_after", "bundles")

    def __init__(self, generation: int, chain_pem: Optional[bytes], key_pem: Optional[bytes],
                 roots_pem: Optional[bytes], bundles: Optional[Mapping[str, FrozenSet[bytes]]] = None) -> None:
        #: A87: trust domain -> the DER roots trusted for it (``roots_pem`` is then their union)
        self.bundles = bundles
        self.generation = generation
        self.chain_pem = chain_pem
        self.key_pem = key_pem
        self.roots_pem = roots_pem
        self.uri_sans: Tuple[str, ...] = ()
        self.dns_sans: Tuple[str, ...] = ()
        self.not_before: Optional[float] = None
        self.not_after: Optional[float] = None
        self.root_count = 0
        if roots_pem is not None:
            self.root_count = _check_roots(roots_pem)
        if chain_pem is not None:
            if key_pem is None:
                raise ValueError("a certificate chain needs its private key")
            self._inspect_leaf(chain_pem, key_pem)

    @property
    def spiffe_id(self) -> Optional[str]:
        for uri in self.uri_sans:
            if uri.startswith("spiffe://"):
                return uri
        return None

    def _inspect_leaf(self, chain_pem: bytes, key_pem: bytes) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from cryptography.exceptions import UnsupportedAlgorithm

        certs = x509.load_pem_x509_certificates(chain_pem)
        leaf = certs[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (TypeError, UnsupportedAlgorithm) as e:  # encrypted, or a key type it cannot use
            raise ValueError(f"the private key cannot be used: {e}") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, pub) != leaf.public_key().public_bytes(der, pub):
            raise ValueError("the private key does not belong to the certificate "
                             "(KEY_VALUES_MISMATCH: a pair written half-way?)")
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        if san is not None:
            self.uri_sans = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            self.dns_sans = tuple(san.get_values_for_type(x509.DNSName))
        self.not_before = leaf.not_valid_before_utc.timestamp()
        self.not_after = leaf.not_valid_after_utc.timestamp()

    def load_roots_into(self, ctx: ssl.SSLContext) -> None:
        """Trust this set's roots in ``ctx`` (ValueError if it has none)."""
        if self.roots_pem is None:
            raise ValueError("no root certificates")
        ctx.load_verify_locations(cadata=self.roots_pem.decode("ascii"))

    def load_identity_into(self, ctx: ssl.SSLContext) -> None:
        """Present this set's chain and key from ``ctx`` (ValueError if it has none)."""
        if self.chain_pem is None:
            raise ValueError("no certificate chain")
        # the stdlib loads a chain and key only from files: private copies of exactly the bytes
        # that were checked (the originals may already be half-rewritten)
        tmp = tempfile.mkdtemp(prefix="meshcore-tls-")
        try:
            chain, key = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((chain, self.chain_pem), (key, self.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data or b"")
            ctx.load_cert_chain(chain, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _expiry_problem(s: CertificateSet) -> Optional[str]:
    if s.not_after is None:
        return None
    left = s.not_after - time.time()
    lifetime = s.not_after - (s.not_before or s.not_after)
    if left <= 0:
        return f"the certificate expired {-left:.0f} s ago"
    if lifetime > 0 and left < lifetime * _EXPIRY_WARN_FRACTION:
        return f"the certificate expires in {left:.0f} s and was not renewed"
    return None


def _check_roots(pem: bytes) -> int:
    """The number of CA certificates in a PEM bundle (raises ValueError if there is none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as e:
        raise ValueError(f"not a PEM certificate bundle ({e})") from None
    n = len(ctx.get_ca_certs())
    if n == 0:
        raise ValueError("no certificate in the root bundle")
    return n


def parse_spiffe_bundle_map(data: bytes) -> Tuple[Dict[str, FrozenSet[bytes]], bytes]:
    """A SPIFFE trust bundle map (A87: ``{"trust_domains": {td: {"keys": [{"use": "x509-svid",
    "x5c": [base64 DER]}]}}}``) -> ``({td: DER roots}, their union as PEM)``; ValueError if malformed."""
    import base64
    import json

    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ValueError(f"SPIFFE bundle map: not JSON ({e})") from None
    tds = doc.get("trust_domains") if isinstance(doc, dict) else None
    if not isinstance(tds, dict):
        raise ValueError("SPIFFE bundle map: \"trust_domains\" must be an object")
    bundles: Dict[str, FrozenSet[bytes]] = {}
    pems: List[str] = []
    for td, bundle in tds.items():
        name = td[len("spiffe://"):] if td.startswith("spiffe://") else td
        keys = bundle.get("keys") if isinstance(bundle, dict) else None
        if not isinstance(keys, list):
            raise ValueError(f"SPIFFE bundle map: trust domain {td!r}: \"keys\" must be a list")
        ders = set()
        for i, key in enumerate(keys):
            if not isinstance(key, dict) or key.get("use") != "x509-svid":
                continue  # JWT keys and others: not for TLS
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise ValueError(f"SPIFFE bundle map: trust domain {td!r}: keys[{i}].x5c must hold one certificate")
            try:
                der = base64.b64decode(x5c[0], validate=True)
            except ValueError:
                raise ValueError(f"SPIFFE bundle map: trust domain {td!r}: keys[{i}].x5c is not base64") from None
            ders.add(der)
            pems.append(ssl.DER_cert_to_PEM_cert(der))
        bundles[name.lower()] = frozenset(ders)
    if not pems:
        raise ValueError("SPIFFE bundle map: no x509-svid certificate")
    return bundles, "".join(pems).encode("ascii")


def _stat_key(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileCertificateSource:
    """A workload identity and/or root bundle read from PEM files and re-read as they change.

    ``name`` labels it in messages (the bootstrap's provider instance name, or the directory).
    At least one of ``certificate_file`` (with ``private_key_file``) and ``ca_certificate_file``
    is needed. Thread-safe; :meth:`current` is cheap when nothing is due (one clock read).
    """

    def __init__(self, certificate_file: Optional[str] = None, private_key_file: Optional[str] = None,
                 ca_certificate_file: Optional[str] = None, *, refresh_interval: float = 600.0,
                 name: str = "", spiffe_trust_bundle_map_file: Optional[str] = None) -> None:
        """``spiffe_trust_bundle_map_file`` (A87): roots per SPIFFE trust domain; when set,
        ``ca_certificate_file`` is ignored and each peer is checked against its own domain's roots."""
        if spiffe_trust_bundle_map_file is not None:
            ca_certificate_file = None
        if certificate_file is None and ca_certificate_file is None and spiffe_trust_bundle_map_file is None:
            raise ValueError("a certificate source needs certificate_file, ca_certificate_file "
                             "or spiffe_trust_bundle_map_file")
        if (certificate_file is None) != (private_key_file is None):
            raise ValueError("certificate_file and private_key_file go together")
        if not refresh_interval > 0:
            raise ValueError(f"refresh_interval must be > 0, got {refresh_interval!r}")
        self.name = name or os.path.dirname(certificate_file or ca_certificate_file or "") or "certificates"
        self.certificate_file = certificate_file
        self.private_key_file = private_key_file
        self.ca_certificate_file = ca_certificate_file
        self.spiffe_trust_bundle_map_file = spiffe_trust_bundle_map_file
        self.refresh_interval = float(refresh_interval)
        self._lock = threading.Lock()
        self._set: Optional[CertificateSet] = None
        self._generation = 0
        self._stats: Optional[Tuple[Any, ...]] = None  # the files' (inode, size, mtime) last read
        self._next_check = 0.0
        self.problem: Optional[str] = None  # why the last read failed (None: it did not)
        self.reloads = 0  # good sets loaded
        self.reload_failures = 0
        self._warned: Any = None

    @classmethod
    def from_directory(cls, path: str, *, refresh_interval: float = 600.0) -> "FileCertificateSource":
        """Istio's layout: ``cert-chain.pem``, ``key.pem``, ``root-cert.pem`` in ``path``."""
        chain, key, roots = (os.path.join(path, n) for n in ISTIO_FILE_NAMES)
        return cls(chain, key, roots, refresh_interval=refresh_interval, name=path)

    @property
    def files(self) -> List[str]:
        return [p for p in (self.certificate_file, self.private_key_file, self.ca_certificate_file,
                            self.spiffe_trust_bundle_map_file) if p]

    def current(self) -> CertificateSet:
        """The good set to use now (re-reading the files first when due).

        Raises :class:`CertificatesUnavailable` when no good set was ever read."""
        if time.monotonic() >= self._next_check:
            self.refresh()
        s = self._set
        if s is None:
            raise CertificatesUnavailable(
                f"certificates {self.name!r} are not available: {self.problem or 'not read yet'} "
                f"(files: {', '.join(self.files)})")
        return s

    def peek(self) -> Optional[CertificateSet]:
        """The good set in use, without looking at the files."""
        return self._set

    def refresh(self, force: bool = False) -> bool:
        """Look at the files now; returns whether a new good set was loaded."""
        with self._lock:
            now = time.monotonic()
            if not force and now < self._next_check:
                return False
            try:
                stats = tuple(_stat_key(p) for p in self.files)
                if not force and stats == self._stats and self._set is not None:
                    self._next_check = now + self.refresh_interval
                    self._warn_expiry(self._set)
                    return False
                data = [self._read(p) for p in (self.certificate_file, self.private_key_file,
                                                self.ca_certificate_file)]
                bundles = None
                if self.spiffe_trust_bundle_map_file is not None:
                    raw = self._read(self.spiffe_trust_bundle_map_file) or b""
                    bundles, data[2] = parse_spiffe_bundle_map(raw)
                new = CertificateSet(self._generation + 1, data[0], data[1], data[2], bundles)
            except (OSError, ValueError) as e:
                self.reload_failures += 1
                problem = (f"cannot read {e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename
                           else f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
                if problem != self.problem:
                    log.warning("certificates %r: %s; %s", self.name, problem,
                                "keeping the last good ones" if self._set is not None else "no TLS until fixed")
                self.problem = problem
                self._next_check = now + min(_RETRY_AFTER_ERROR, self.refresh_interval)
                return False
            self._generation += 1
            self._set = new
            self._stats = stats
            self.problem = None
            self.reloads += 1
            self._next_check = now + self.refresh_interval
            if new.generation > 1:
                log.info("certificates %r: loaded generation %d (%s)", self.name, new.generation,
                         new.spiffe_id or f"{new.root_count} roots")
            self._warn_expiry(new)
            return True

    def _warn_expiry(self, s: CertificateSet) -> None:
        """Log (once per generation and state) a certificate that expired or is about to."""
        state = _expiry_problem(s)
        key = (s.generation, state is not None and state.split(" ", 3)[2])
        if state is not None and key != self._warned:
            self._warned = key
            log.warning("certificates %r: %s", self.name, state)

    @staticmethod
    def _read(path: Optional[str]) -> Optional[bytes]:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    def identity(self) -> WorkloadIdentity:
        """What this source presents now (re-reading the files when due)."""
        try:
            s: Optional[CertificateSet] = self.current()
        except CertificatesUnavailable:
            s = None
        problem = self.problem
        if s is None:
            return WorkloadIdentity(self.name, None, (), (), None, None, None, 0, 0,
                                    problem or "not read yet")
        left = s.not_after - time.time() if s.not_after is not None else None
        problem = problem or _expiry_problem(s)
        return WorkloadIdentity(self.name, s.spiffe_id, s.uri_sans, s.dns_sans, s.not_before, s.not_after,
                                left, s.root_count, s.generation, problem)
