"""Which TLS each upstream connection uses, and where its certificates come from (one per mesh).

Certificate references of a cluster's ``UpstreamTlsContext`` resolve as follows:

* a certificate provider instance (A29, what istiod's proxyless generator sends): the bootstrap's
  ``certificate_providers[name]`` (``file_watcher``; ``certificate_name`` is ignored, as gRPC does);
* an SDS secret, as Istio's sidecar clusters name them: ``default`` (the workload identity) and
  ``ROOTCA`` (the roots) come from the mesh's workload certificates, i.e. ``Mesh(certificates=...)``,
  else ``$MESHCORE_CERTIFICATES`` (a directory in Istio's layout), else the bootstrap's provider
  named ``default``, else Istio's proxyless output directory ``/var/lib/istio/data`` or its
  legacy ``/etc/certs`` when they hold certificates; Istio's file secrets
  ``file-cert:<chain>~<key>`` and ``file-root:<bundle>`` name files directly.

A cluster's socket for an endpoint (Envoy ``transport_socket_matches``): the first match whose
criteria the endpoint's ``filter_metadata["envoy.transport_socket_match"]`` all carry, else the
cluster's ``transport_socket``. ``None`` means plaintext.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .certificates import ISTIO_FILE_NAMES, CertificatesUnavailable, FileCertificateSource, WorkloadIdentity
from .sds import ISTIO_SDS_SOCKET, SdsCertificateSource
from .upstream import TlsHandshakeError, UpstreamTls

__all__ = ["TlsManager", "socket_spec_for", "ENV_CERTIFICATES", "ISTIO_CERT_DIRS"]

ENV_CERTIFICATES = "MESHCORE_CERTIFICATES"
#: where Istio puts workload certificates for a proxyless app (``OUTPUT_CERTS``) and its old mount
ISTIO_CERT_DIRS = ("/var/lib/istio/data", "/etc/certs")
#: the Istio agent's SDS socket (sidecars fetch ``default``/``ROOTCA`` there); used after the directories
ISTIO_SDS_SOCKETS = (ISTIO_SDS_SOCKET,)
#: ``certificates="sds:<grpc target>"`` (or ``$MESHCORE_CERTIFICATES`` so): fetch them over SDS
SDS_PREFIX = "sds:"
_MATCH_KEY = "envoy.transport_socket_match"

log = logging.getLogger(__name__)


def _norm(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _norm(v)) for k, v in value.items()))
    return value


def socket_spec_for(spec: Any, endpoint: Any) -> Any:
    """The ``UpstreamTlsSpec`` (or ``None``: plaintext) a cluster uses for ``endpoint``."""
    matches = spec.transport_socket_matches
    if matches:
        md = endpoint.metadata.get(_MATCH_KEY) if endpoint is not None and endpoint.metadata else None
        for m in matches:
            if not m.match:
                return m.tls
            if md is None:
                continue
            for key, value in m.match:
                if key not in md or _norm(md[key]) != value:
                    break
            else:
                return m.tls
    return spec.tls


_FILE_SECRET = ("sds:file-cert:", "sds:file-root:")  # keys of the sources Istio's file secrets name


class TlsManager:
    """Certificate sources by name and the :class:`UpstreamTls` of each cluster socket."""

    def __init__(self, providers: Optional[Mapping[str, Any]] = None,
                 certificates: Union[None, str, "os.PathLike[str]", FileCertificateSource] = None,
                 record: Any = None) -> None:
        self._providers = dict(providers or {})
        self._explicit = certificates
        self._record_for = record  # cluster name -> callable(stat)
        self._lock = threading.Lock()
        self._sources: Dict[str, FileCertificateSource] = {}
        self._workload: Optional[FileCertificateSource] = None
        self._workload_tried = False
        self._upstreams: Dict[Tuple[str, Any], UpstreamTls] = {}

    # -- certificate sources ----------------------------------------------------------------------

    def workload_source(self) -> Optional[FileCertificateSource]:
        """The workload's own certificates (SDS ``default``/``ROOTCA``), or ``None`` if there are none."""
        if self._workload_tried:
            return self._workload
        with self._lock:
            if not self._workload_tried:
                self._workload = self._find_workload()
                self._workload_tried = True
        return self._workload

    def _find_workload(self) -> Optional[Any]:
        """A FileCertificateSource or an SdsCertificateSource (same interface), or None."""
        explicit = self._explicit
        if isinstance(explicit, (FileCertificateSource, SdsCertificateSource)):
            return explicit
        if isinstance(explicit, str) and explicit.startswith(SDS_PREFIX):
            return SdsCertificateSource(explicit[len(SDS_PREFIX):], name=explicit)
        if explicit is not None:
            return FileCertificateSource.from_directory(os.fspath(explicit))
        env = os.environ.get(ENV_CERTIFICATES)
        if env and env.startswith(SDS_PREFIX):
            return SdsCertificateSource(env[len(SDS_PREFIX):], name=env)
        if env:
            return FileCertificateSource.from_directory(env)
        if "default" in self._providers:
            return self._provider_source("default")
        for d in ISTIO_CERT_DIRS:
            if os.path.exists(os.path.join(d, ISTIO_FILE_NAMES[0])):
                return FileCertificateSource.from_directory(d)
        for sock in ISTIO_SDS_SOCKETS:
            if os.path.exists(sock):
                return SdsCertificateSource("unix://" + os.path.abspath(sock), name="sds:unix://" + sock)
        return None

    def _provider_source(self, name: str) -> FileCertificateSource:
        src = self._sources.get(name)
        if src is not None:
            return src
        provider = self._providers.get(name)
        if provider is None:
            raise CertificatesUnavailable(f"unrecognized certificate provider instance name: {name!r}")
        if provider.plugin_name != "file_watcher":
            raise CertificatesUnavailable(
                f"certificate provider {name!r}: plugin {provider.plugin_name!r} is not supported (file_watcher is)")
        src = FileCertificateSource(provider.certificate_file, provider.private_key_file,
                                    provider.ca_certificate_file, refresh_interval=provider.refresh_interval,
                                    name=name, spiffe_trust_bundle_map_file=getattr(
                                        provider, "spiffe_trust_bundle_map_file", None))
        self._sources[name] = src
        return src

    def source(self, ref: Any) -> FileCertificateSource:
        """The source a ``CertificateRef`` names (raises :class:`CertificatesUnavailable`)."""
        if ref.kind == "provider":
            with self._lock:
                return self._provider_source(ref.name)
        name = ref.name
        if name.startswith("file-cert:") or name.startswith("file-root:"):
            with self._lock:
                src = self._sources.get("sds:" + name)
                if src is None:
                    body = name.partition(":")[2]
                    if name.startswith("file-root:"):
                        src = FileCertificateSource(ca_certificate_file=body, name=name)
                    else:
                        chain, _, key = body.partition("~")
                        if not key:
                            raise CertificatesUnavailable(f"SDS secret {name!r}: expected file-cert:<chain>~<key>")
                        src = FileCertificateSource(chain, key, name=name)
                    self._sources["sds:" + name] = src
                return src
        src = self.workload_source()
        if src is None:
            raise CertificatesUnavailable(
                f"SDS secret {name!r}: this workload has no certificates (pass Mesh(certificates=<dir>), set "
                f"{ENV_CERTIFICATES}, or give the bootstrap a certificate_providers entry named \"default\")")
        return src

    def start(self) -> None:
        """Find the workload certificates now (an SDS source starts its stream)."""
        try:
            self.workload_source()
        except (OSError, ValueError) as e:  # reported again, with context, when TLS is used
            log.warning("workload certificates: %s", e)

    def close(self) -> None:
        """Stop sources that run a stream (SDS); file sources hold nothing open."""
        with self._lock:
            sources = list(self._sources.values()) + ([self._workload] if self._workload is not None else [])
        for src in sources:
            close = getattr(src, "close", None)
            if close is not None:
                close()

    def identity(self) -> Optional[WorkloadIdentity]:
        src = self.workload_source()
        return src.identity() if src is not None else None

    def sources(self) -> Dict[str, FileCertificateSource]:
        out = dict(self._sources)
        if self._workload is not None:
            out.setdefault("workload", self._workload)
        return out

    # -- cluster sockets --------------------------------------------------------------------------

    def upstream(self, cluster: str, tls_spec: Any) -> UpstreamTls:
        """The :class:`UpstreamTls` of one cluster socket (cached; raises :class:`TlsHandshakeError`
        when its certificates cannot be found, so nothing is sent in plaintext instead)."""
        key = (cluster, tls_spec)
        up = self._upstreams.get(key)
        if up is not None:
            return up
        record = self._record_for(cluster) if self._record_for is not None else (lambda stat: None)
        try:
            roots = self.source(tls_spec.roots)
            identity = self.source(tls_spec.identity) if tls_spec.identity is not None else None
        except CertificatesUnavailable as e:
            record("ssl.connection_error")
            raise TlsHandshakeError(cluster, "(no connection made)", str(e), cause=e) from None
        up = UpstreamTls(tls_spec, cluster, identity, roots, record)
        with self._lock:
            if len(self._upstreams) > 4096:
                self._upstreams.clear()  # a bound under endless config churn; rebuilt on use
            up = self._upstreams.setdefault(key, up)
        return up

    def forget(self, clusters: Any) -> None:
        """Drop the cluster sockets of clusters that left the configuration, and the sources of
        Istio's ``file-cert:``/``file-root:`` secrets no remaining socket uses (a later socket
        naming the same files makes a new one)."""
        gone = set(clusters)
        with self._lock:
            if not any(k[0] in gone for k in self._upstreams):
                return
            self._upstreams = {k: v for k, v in self._upstreams.items() if k[0] not in gone}
            used = {id(s) for up in self._upstreams.values() for s in (up._identity, up._roots)}
            for name in [n for n, src in self._sources.items() if n.startswith(_FILE_SECRET) and id(src) not in used]:
                del self._sources[name]

    def for_endpoint(self, cluster: str, spec: Any, endpoint: Any) -> Optional[UpstreamTls]:
        tls_spec = socket_spec_for(spec, endpoint)
        if tls_spec is None:
            return None
        return self.upstream(cluster, tls_spec)
