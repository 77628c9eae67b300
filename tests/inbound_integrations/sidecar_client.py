"""A real Envoy configured as an Istio sidecar's *outbound* side (``security.md`` §6.4), calling
meshcore servers: one plaintext listener (codec AUTO: HTTP/1.1 and h2c gRPC clients) routing by
``Host`` / ``:authority`` to one cluster per upstream.

Each upstream (:class:`Upstream`) is a Service ``<name>.default.svc.cluster.local:8443`` with
Istio's auto-mTLS cluster: ``transport_socket_matches`` ``tlsMode-istio`` (SNI
``outbound_.8443_._.<fqdn>``, Istio's ALPN for the protocol -- ``istio-http/1.1, istio, http/1.1``
or ``istio-h2, istio, h2`` --, the sidecar's certificate, the server's SPIFFE ID checked against
the mesh root) and ``tlsMode-disabled`` (raw_buffer); the endpoint carries ``tlsMode: istio``
unless the upstream is ``plain`` (then the same server is called over plaintext, under the host
``<name>-plain.default.svc.cluster.local``). gRPC upstreams get HTTP/2 to the server.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from envoy_process import EnvoyProcess, find_envoy, socket_address

LOOPBACK = "127.0.0.1"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ALPN_HTTP11 = ["istio-http/1.1", "istio", "http/1.1"]
ALPN_H2 = ["istio-h2", "istio", "h2"]


def fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def sni(name: str) -> str:
    return f"outbound_.8443_._.{fqdn(name)}"


@dataclass(frozen=True)
class Upstream:
    name: str
    port: int
    server_id: str
    grpc: bool = False  # HTTP/2 to the server (gRPC, or any h2 server)
    plain: bool = False  # also a "<name>-plain" host reaching the server over plaintext


class SidecarClient(EnvoyProcess):
    """Envoy as a client pod's sidecar (outbound), presenting ``identity`` (a ``CertPaths``) and
    trusting ``roots`` (a PEM file); :meth:`get` / ``port`` for HTTP, ``port`` for gRPC channels
    (set ``grpc.default_authority`` to the upstream's FQDN)."""

    def __init__(self, identity: Any, roots: str, upstreams: Sequence[Upstream]) -> None:
        self.identity, self.roots, self.upstreams = identity, roots, list(upstreams)
        self.envoy_bin = find_envoy()
        self.log_level, self.startup_timeout, self.keep_tmp = "warning", 30.0, False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""
        self.port = 0
        self.access_log = ""

    def _cluster(self, up: Upstream, tls_mode: bool) -> Tuple[str, Dict[str, Any]]:
        name = f"outbound|8443|{'plain' if not tls_mode else ''}|{fqdn(up.name)}"
        tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS, "sni": sni(up.name),
            "common_tls_context": {
                "alpn_protocols": ALPN_H2 if up.grpc else ALPN_HTTP11,
                "tls_certificates": [{"certificate_chain": {"filename": self.identity.chain},
                                      "private_key": {"filename": self.identity.key}}],
                "validation_context": {"trusted_ca": {"filename": self.roots},
                                       "match_typed_subject_alt_names": [
                                           {"san_type": "URI", "matcher": {"exact": up.server_id}}]}}}}
        endpoint: Dict[str, Any] = {"endpoint": {"address": socket_address(up.port)}}
        if tls_mode:
            endpoint["metadata"] = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
        cluster: Dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "transport_socket_matches": [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
                {"name": "tlsMode-disabled", "match": {},
                 "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                                      "typed_config": {"@type": RAW_BUFFER}}}],
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}}
        if up.grpc:
            cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}
        return name, cluster

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-sidecar-client-")
        self.access_log = os.path.join(self.tmpdir, "access.log")
        vhosts: List[Dict[str, Any]] = []
        clusters: List[Dict[str, Any]] = []
        for up in self.upstreams:
            modes = [(up.name, True)] + ([(up.name + "-plain", False)] if up.plain else [])
            for host, tls_mode in modes:
                cname, cluster = self._cluster(up, tls_mode)
                clusters.append(cluster)
                vhosts.append({"name": host, "domains": [fqdn(host), f"{fqdn(host)}:8443"],
                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cname, "timeout": "10s"}}]})
        hcm = {"@type": HCM, "stat_prefix": "outbound", "codec_type": "AUTO",
               "route_config": {"name": "8443", "virtual_hosts": vhosts},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
               "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                   "@type": FILE_LOG, "path": self.access_log, "log_format": {"text_format_source": {
                       "inline_string": "%RESPONSE_CODE% %GRPC_STATUS% %UPSTREAM_PEER_URI_SAN% "
                                        "%UPSTREAM_TRANSPORT_FAILURE_REASON%\n"}}}}]}
        cfg = {"node": {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local", "cluster": "client"},
               "admin": {"address": socket_address(0)},
               "static_resources": {
                   "listeners": [{"name": "outbound", "address": socket_address(0), "filter_chains": [{"filters": [
                       {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
                   "clusters": clusters}}
        path = os.path.join(self.tmpdir, "envoy.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self._run_envoy(path)
        self.port = self._listener_ports()[0]["outbound"]

    def close(self) -> None:
        self._stop(None)

    def request(self, host: str, path: str = "/", *, method: str = "GET", headers: Optional[Dict[str, str]] = None,
                body: Optional[bytes] = None) -> Tuple[int, Dict[str, str], bytes]:
        """One HTTP/1.1 request through the sidecar to upstream ``host`` (its short name)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers={"Host": fqdn(host), **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()
