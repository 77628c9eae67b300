"""Mesh resources (a resource file for ``Mesh.from_file``) whose clusters carry TLS in the shape
an Istio sidecar's outbound cluster has (``security.md`` §3.4): ``transport_socket_matches``
``tlsMode-istio`` (UpstreamTlsContext: SNI ``outbound_.<port>_._.<host>``, ALPN
``istio-peer-exchange, istio``, TLS 1.2-1.3, identity from the SDS secret ``default``, roots from
``ROOTCA``, SAN matchers ``exact`` SPIFFE IDs) and ``tlsMode-disabled`` (raw_buffer), endpoints
labelled ``envoy.transport_socket_match: {tlsMode: istio}`` when they take mTLS.

Used by ``test_httpx_mtls.py`` and ``benchmarks/test_bench_tls_httpx.py``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
SDS = {"sds_config": {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
                      "resource_api_version": "V3"}}
TLS_MATCH = {"envoy.transport_socket_match": {"tlsMode": "istio"}}

HOST = "echo.default.svc.cluster.local"
PORT = 8080
TARGET = f"{HOST}:{PORT}"
SIDECAR_SNI = f"outbound_.{PORT}_._.{HOST}"


def sidecar_tls(sans: Sequence[str], *, max_version: str = "TLSv1_3", sni: str = SIDECAR_SNI,
                **context: Any) -> Dict[str, Any]:
    """The ``tlsMode-istio`` transport socket of an Istio sidecar's outbound cluster (``context``:
    more UpstreamTlsContext fields, e.g. ``auto_host_sni=True``)."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "sni": sni, **context,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": max_version},
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", **SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": s} for s in sans]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", **SDS}}}}}


def tls_cluster(name: str, sans: Sequence[str], *, max_version: str = "TLSv1_3",
                lb_policy: str = "ROUND_ROBIN", **context: Any) -> Dict[str, Any]:
    """An EDS cluster with Istio's auto-mTLS socket matches (``context``: see :func:`sidecar_tls`)."""
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "connect_timeout": "1s", "lb_policy": lb_policy,
            "transport_socket_matches": [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                 "transport_socket": sidecar_tls(sans, max_version=max_version, **context)},
                {"name": "tlsMode-disabled", "match": {},
                 "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW}}}]}


def plain_cluster(name: str) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"}


def assignment(cluster: str, ports: Iterable[Tuple[int, bool]], hostname: str = "") -> Dict[str, Any]:
    """``ports``: ``(port, mtls)`` pairs on 127.0.0.1; ``mtls`` endpoints carry ``tlsMode: istio``;
    ``hostname``: the endpoints' EDS hostname."""
    eps = []
    for port, mtls in ports:
        ep: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        if hostname:
            ep["endpoint"]["hostname"] = hostname
        if mtls:
            ep["metadata"] = {"filter_metadata": TLS_MATCH}
        eps.append(ep)
    return {"cluster_name": cluster, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": eps}]}


def route(prefix: str, cluster: str, **action: Any) -> Dict[str, Any]:
    return {"name": f"{prefix}->{cluster}", "match": {"prefix": prefix}, "route": {"cluster": cluster, **action}}


def resources(clusters: List[Dict[str, Any]], endpoints: List[Dict[str, Any]], routes: List[Dict[str, Any]],
              target: str = TARGET) -> Dict[str, Any]:
    return {
        "listeners": [{"name": target, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": ["*"], "routes": routes}]}],
        "clusters": clusters,
        "endpoints": endpoints,
    }


_HASH = re.compile(r"Hash=([0-9a-f]+)")


def xfcc_hash(xfcc: Optional[str]) -> Optional[str]:
    """The ``Hash`` (SHA-256 of the client certificate) of the last element of an XFCC header."""
    if not xfcc:
        return None
    m = _HASH.search(xfcc.split(",")[-1])
    return m.group(1) if m else None


def fingerprint(leaf: Any) -> str:
    """SHA-256 of a :class:`tls.pki.Leaf`'s certificate, as Envoy's XFCC ``Hash`` writes it."""
    from cryptography.hazmat.primitives import hashes

    return leaf.cert.fingerprint(hashes.SHA256()).hex()
