"""Workload identity and TLS to upstreams (mTLS in STRICT meshes, SPIFFE identities).

* :mod:`meshcore.tls.certificates` -- certificate files (Istio's agent layout, gRPC's
  ``file_watcher`` provider), checked and rotated; :class:`WorkloadIdentity`.
* :mod:`meshcore.tls.sds` -- the same certificates fetched over SDS (Istio agent's socket).
* :mod:`meshcore.tls.san` -- subject-alt-name matching with Envoy's semantics.
* :mod:`meshcore.tls.upstream` -- one cluster socket's client context, ALPN, SNI and peer check.
* :mod:`meshcore.tls.manager` -- which socket each endpoint gets, where certificates come from.
* :mod:`meshcore.tls.server` -- server (inbound) TLS: :class:`ServerTls` and its helpers for
  uvicorn, hypercorn, gunicorn, grpcio and stdlib servers, PERMISSIVE.

Importing this package imports neither ``cryptography`` nor any client library.
"""

from __future__ import annotations

from .certificates import CertificatesUnavailable, CertificateSet, FileCertificateSource, WorkloadIdentity
from .manager import TlsManager, socket_spec_for
from .sds import SdsCertificateSource
from .upstream import ISTIO_ALPN, TlsHandshakeError, UpstreamTls, alpn_for, is_deferred_rejection
from .server import (PeerCertificate, PeerRejected, ServerTls, peer_from_asgi_scope, peer_from_grpc_context,
                     peer_from_wsgi_environ)

__all__ = [
    "CertificatesUnavailable", "CertificateSet", "FileCertificateSource", "SdsCertificateSource", "WorkloadIdentity",
    "TlsManager", "socket_spec_for", "ISTIO_ALPN", "TlsHandshakeError", "UpstreamTls", "alpn_for",
    "is_deferred_rejection",
    "ServerTls", "PeerCertificate", "PeerRejected", "peer_from_asgi_scope", "peer_from_grpc_context",
    "peer_from_wsgi_environ",
]
