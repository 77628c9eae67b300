"""What the gRPC mTLS tests and benchmark share: a grpcio app, a sidecar variant in front of it,
and mesh resources whose clusters carry TLS in the shape of an Istio sidecar's outbound cluster
(``security.md`` §3.4: ``transport_socket_matches`` ``tlsMode-istio`` with SNI
``outbound_.<port>_._.<host>``, ALPN ``istio-peer-exchange, istio``, identity from the SDS secret
``default``, roots from ``ROOTCA``, exact SPIFFE SAN matchers; ``tlsMode-disabled`` raw_buffer).

* :class:`GrpcApp`: a grpcio server (generic handlers, bytes in and out) recording the metadata
  of every call; ``Hello`` answers the ``x-forwarded-client-cert`` it received.
* :class:`GrpcSidecar`: :class:`tls.sidecar.SidecarInbound` in front of it (HTTP/2 upstream),
  optionally ``declared=True`` (Istio's inbound for a port *declared* gRPC/HTTP2: one TLS chain to
  the HTTP connection manager whatever the ALPN, so a stock grpcio TLS client, which offers only
  ``h2``, also gets the HTTP chain) and ``extra_listeners=n`` (copies of the inbound listener on
  other ports: more endpoints behind one Envoy).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from concurrent import futures
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import grpc

from .sidecar import LISTENER_NAME, SidecarInbound

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
PLAIN_TARGET = f"plain.default.svc.cluster.local:{PORT}"
SNI = f"outbound_.{PORT}_._.{HOST}"
CLUSTER = f"outbound|{PORT}||{HOST}"
SERVICE = "meshcore.tls.Echo"
HELLO = f"/{SERVICE}/Hello"
COUNT = f"/{SERVICE}/Count"


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


def tls_socket(sans: Sequence[str], *, max_version: str = "TLSv1_3", sni: str = SNI) -> Dict[str, Any]:
    """The ``tlsMode-istio`` transport socket of an Istio sidecar's outbound cluster."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "sni": sni,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": max_version},
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", **SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": s} for s in sans]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", **SDS}}}}}


def tls_cluster(name: str, sans: Sequence[str], *, max_version: str = "TLSv1_3",
                connect_timeout: str = "1s", lb_policy: str = "ROUND_ROBIN") -> Dict[str, Any]:
    """An EDS cluster with Istio's auto-mTLS socket matches."""
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "connect_timeout": connect_timeout, "lb_policy": lb_policy,
            "transport_socket_matches": [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                 "transport_socket": tls_socket(sans, max_version=max_version)},
                {"name": "tlsMode-disabled", "match": {},
                 "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW}}}]}


def plain_cluster(name: str) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"}


def assignment(cluster: str, ports: Iterable[Tuple[int, bool]]) -> Dict[str, Any]:
    """``ports``: ``(port, mtls)`` pairs on 127.0.0.1; ``mtls`` endpoints carry ``tlsMode: istio``."""
    eps = []
    for port, mtls in ports:
        ep: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        if mtls:
            ep["metadata"] = {"filter_metadata": TLS_MATCH}
        eps.append(ep)
    return {"cluster_name": cluster, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": eps}]}


def route(cluster: str, *, prefix: str = "/", retry_on: Optional[str] = None, num_retries: int = 2,
          timeout: str = "5s") -> Dict[str, Any]:
    action: Dict[str, Any] = {"cluster": cluster, "timeout": timeout}
    if retry_on:
        action["retry_policy"] = {"retry_on": retry_on, "num_retries": num_retries}
    return {"name": f"{prefix}->{cluster}", "match": {"prefix": prefix}, "route": action}


def resources(targets: Dict[str, List[Dict[str, Any]]], clusters: List[Dict[str, Any]],
              endpoints: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``targets``: ``{listener name (host:port): routes}``, one RouteConfiguration each."""
    listeners, routes = [], []
    for i, (target, rs) in enumerate(targets.items()):
        name = f"routes-{i}"
        listeners.append({"name": target, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": name},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}})
        routes.append({"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": rs}]})
    return {"listeners": listeners, "routes": routes, "clusters": clusters, "endpoints": endpoints}


def write_json(path: Any, doc: Dict[str, Any]) -> str:
    """Write ``doc`` to ``path`` whole (temp file + rename: a watching mesh never reads half)."""
    import os
    import tempfile

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# XFCC
# --------------------------------------------------------------------------------------------

_HASH = re.compile(r"Hash=([0-9a-f]+)")
_URI = re.compile(r"URI=([^;,]+)")


def xfcc_hash(xfcc: Optional[str]) -> Optional[str]:
    """The ``Hash`` (SHA-256 of the client certificate) of the last element of an XFCC header."""
    m = _HASH.search((xfcc or "").split(",")[-1])
    return m.group(1) if m else None


def xfcc_uri(xfcc: Optional[str]) -> Optional[str]:
    m = _URI.search((xfcc or "").split(",")[-1])
    return m.group(1) if m else None


def fingerprint(leaf: Any) -> str:
    """SHA-256 of a :class:`tls.pki.Leaf`'s certificate, as Envoy's XFCC ``Hash`` writes it."""
    from cryptography.hazmat.primitives import hashes

    return leaf.cert.fingerprint(hashes.SHA256()).hex()


# --------------------------------------------------------------------------------------------
# The app and the sidecar
# --------------------------------------------------------------------------------------------


class GrpcApp:
    """A grpcio server on 127.0.0.1 (``port``), plaintext, generic handlers on :data:`SERVICE`:
    ``Hello`` returns the ``x-forwarded-client-cert`` it received (``b""`` without one);
    ``Count`` streams ``int(request)`` items. ``calls`` records each call's metadata (a dict)."""

    def __init__(self, workers: int = 16) -> None:
        self.calls: List[Dict[str, str]] = []
        self._lock = threading.Lock()

        def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
            md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            with self._lock:
                self.calls.append(md)
            return md.get("x-forwarded-client-cert", "").encode()

        def count(request: bytes, context: grpc.ServicerContext) -> Any:
            for i in range(int(request or b"3")):
                yield str(i).encode()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Hello": grpc.unary_unary_rpc_method_handler(hello),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        })])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


PLAIN_LISTENER = "plainInbound"


class GrpcSidecar(SidecarInbound):
    """:class:`SidecarInbound` with an HTTP/2 app (``app_port``), and optionally ``declared``
    (one TLS filter chain to the HTTP connection manager with no ALPN condition, as Istio makes
    for a port declared gRPC/HTTP2), ``extra_listeners`` more copies of the inbound listener, and
    ``plain_listener``: a plaintext listener with the same HTTP connection manager minus RBAC
    (there is no peer identity to authorize), as a sidecar's plaintext path. After start,
    ``ports`` lists every mTLS listener's port (``ports[0] == port``), ``plain_port`` the other."""

    def __init__(self, paths: Any, *, app_port: int, declared: bool = False, extra_listeners: int = 0,
                 plain_listener: bool = False, **kw: Any) -> None:
        super().__init__(paths, app_port=app_port, app_http2=True, **kw)
        self.declared = declared
        self.extra_listeners = extra_listeners
        self.plain_listener = plain_listener
        self.ports: List[int] = []
        self.plain_port = 0

    def write_config(self) -> str:
        path = super().write_config()
        listeners = self.config["static_resources"]["listeners"]
        inbound = listeners[0]
        if self.declared:
            http = inbound["filter_chains"][0]
            http["filter_chain_match"] = {"transport_protocol": "tls"}
            inbound["filter_chains"] = [http]
        for i in range(1, self.extra_listeners + 1):
            copy = json.loads(json.dumps(inbound))
            copy["name"] = f"{LISTENER_NAME}-{i}"
            listeners.append(copy)
        if self.plain_listener:
            chain = json.loads(json.dumps(inbound["filter_chains"][0]))
            chain.pop("transport_socket", None)
            chain.pop("filter_chain_match", None)
            chain["name"] = "inbound-http-plain"
            hcm = chain["filters"][0]["typed_config"]
            hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.rbac"]
            listeners.append({"name": PLAIN_LISTENER, "address": json.loads(json.dumps(inbound["address"])),
                              "filter_chains": [chain]})
        with open(path, "w") as f:
            json.dump(self.config, f, indent=1)
        return path

    def _start(self) -> None:
        super()._start()
        ports, body = self._listener_ports()
        self.ports = [self.port] + [ports[f"{LISTENER_NAME}-{i}"] for i in range(1, self.extra_listeners + 1)]
        if self.plain_listener:
            self.plain_port = ports[PLAIN_LISTENER]

    @property
    def pid(self) -> int:
        assert self._envoy is not None
        return self._envoy.pid


class TlsStub:
    """A TLS server on 127.0.0.1 presenting ``ctx``'s certificate (ALPN ``h2``): it completes
    handshakes and then closes (a peer with the wrong identity). ``handshakes`` counts them."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.handshakes = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"tls-stub-{self.port}")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(2)
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class SilentServer:
    """A TCP listener that accepts and never answers (a TLS handshake that times out)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()
