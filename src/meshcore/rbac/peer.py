"""The peer of a connection as the RBAC ``authenticated`` principal sees it.

Envoy's ``Principal.authenticated.principal_name`` is tried against every URI SAN of the peer
certificate, then every DNS SAN, then the subject (RFC 2253), in that order, even when URI SANs
exist (``security.md`` §4 fact 3). :class:`PeerCertificate` carries those three and the
precomputed candidate tuple the engine matches against.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Tuple

__all__ = ["PeerCertificate"]

logger = logging.getLogger(__name__)


def _strings(value: Iterable[str], what: str) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of str, not a single {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if type(v) is not str:
            raise TypeError(f"{what} must hold str, got {type(v).__name__}")
    return out


class PeerCertificate:
    """The verified client certificate of a TLS connection: its URI SANs, DNS SANs and subject.

    ``PeerCertificate()`` (no SANs, empty subject) stands for a TLS connection whose client sent
    no certificate: ``authenticated`` without ``principal_name`` matches it, and a
    ``principal_name`` matcher is tried against ``""``. A plaintext connection has no
    ``PeerCertificate`` at all (pass ``peer=None`` and ``principal=None``).

    ``subject`` is the RFC 2253 form Envoy prints (``CN=a,O=b``; ``""`` for the empty subject
    of Istio workload certificates). Immutable and hashable.
    """

    __slots__ = ("uri_sans", "dns_sans", "subject", "names")

    uri_sans: Tuple[str, ...]
    dns_sans: Tuple[str, ...]
    subject: str
    names: Tuple[str, ...]  # uri_sans + dns_sans + (subject,): what principal_name is tried against

    def __init__(self, uri_sans: Iterable[str] = (), dns_sans: Iterable[str] = (), subject: str = "") -> None:
        if type(subject) is not str:
            raise TypeError(f"subject must be str, got {type(subject).__name__}")
        uris = _strings(uri_sans, "uri_sans")
        dns = _strings(dns_sans, "dns_sans")
        object.__setattr__(self, "uri_sans", uris)
        object.__setattr__(self, "dns_sans", dns)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "names", uris + dns + (subject,))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PeerCertificate is immutable")

    def __repr__(self) -> str:
        return f"PeerCertificate(uri_sans={self.uri_sans!r}, dns_sans={self.dns_sans!r}, subject={self.subject!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerCertificate):
            return NotImplemented
        return (self.uri_sans, self.dns_sans, self.subject) == (other.uri_sans, other.dns_sans, other.subject)

    def __hash__(self) -> int:
        return hash((self.uri_sans, self.dns_sans, self.subject))

    def __reduce__(self) -> Any:
        return (PeerCertificate, (self.uri_sans, self.dns_sans, self.subject))

    @classmethod
    def from_der(cls, der: bytes) -> "PeerCertificate":
        """From a DER certificate (``ssl_object.getpeercert(binary_form=True)``), with
        ``cryptography``: URI and DNS SANs in certificate order, the subject in RFC 4514/2253
        form (as Envoy prints it for ASCII subjects; Envoy escapes non-ASCII bytes as ``\\XX``
        where this gives the characters)."""
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            uris: list = []
            dns: list = []
        else:
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            dns = san.get_values_for_type(x509.DNSName)
        return cls(uris, dns, cert.subject.rfc4514_string())
