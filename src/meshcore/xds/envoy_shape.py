"""The Envoy (sidecar) shape: which listener, filter chain and route configuration serve a target.

In the Envoy shape meshcore receives what istiod's sidecar generator (or any Envoy-oriented
control plane) writes for an Envoy proxy: every Listener and Cluster (wildcard LDS/CDS), route
configurations named by the listeners' HttpConnectionManagers, assignments by cluster. A target
``host:port`` is resolved as the sidecar's outbound path resolves a plaintext connection from the
application to that destination (:func:`~meshcore.xds.sidecar_listener.resolve_outbound`): the
listener ``<vip>_<port>`` when the host is a TCP service's address (its VIP, from the TCP
listeners' ``tcp_proxy`` clusters ``outbound|<port>|<subset>|<fqdn>``), else ``0.0.0.0_<port>``;
its filter chain for HTTP/1.1; then the chain's HttpConnectionManager (virtual hosts matched on
the request's authority with Istio's domain lists) or ``tcp_proxy`` cluster.

Short host names expand as a sidecar's resolver would in the client's namespace: ``reviews`` ->
``reviews.<ns>.svc.cluster.local``, ``reviews.other`` -> ``reviews.other.svc.cluster.local``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ConfigError
from .model import ListenerSpec

__all__ = ["SHAPES", "ENV_SHAPE", "resolve_shape", "ListenerIndex", "listener_spec_of", "decode_sidecar_listener",
           "decode_sidecar_cluster"]

SHAPES = ("grpc", "envoy")
ENV_SHAPE = "MESHCORE_XDS_SHAPE"
DEFAULT_SHAPE = "grpc"


def resolve_shape(shape: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """``shape`` if given, else ``$MESHCORE_XDS_SHAPE``, else ``"grpc"`` (ValueError if unknown)."""
    import os

    env = os.environ if environ is None else environ
    source = "xds_shape"
    if shape is None:
        shape = env.get(ENV_SHAPE) or DEFAULT_SHAPE
        source = ENV_SHAPE
    if not isinstance(shape, str):
        raise TypeError(f"xds_shape must be a str, got {type(shape).__name__}")
    value = shape.strip().lower()
    if value not in SHAPES:
        raise ValueError(f"{source} must be one of {', '.join(SHAPES)}, got {shape!r}")
    return value


def decode_sidecar_listener(msg: Any, providers: Any = None) -> Any:
    """The Envoy shape's LDS decoder: any Listener a sidecar gets (never rejected for its shape)."""
    from .sidecar_listener import sidecar_listener_spec

    return sidecar_listener_spec(msg)


def decode_sidecar_cluster(msg: Any, providers: Any = None) -> Any:
    """The Envoy shape's CDS decoder: as the gRPC shape's, except that the original-destination
    clusters every sidecar gets (``PassthroughCluster``, ``InboundPassthroughCluster``, inbound
    clusters) are accepted as unusable placeholders instead of being NACKed."""
    from .cluster_config import cluster_spec
    from .model import ClusterSpec

    try:
        return cluster_spec(msg, providers)
    except ConfigError as e:
        if _is_original_dst(msg):
            return ClusterSpec(name=e.resource, kind="ORIGINAL_DST")
        raise


def _is_original_dst(msg: Any) -> bool:
    from envoy.config.cluster.v3 import cluster_pb2

    if isinstance(msg, dict):
        return str(msg.get("type", "")).upper() == "ORIGINAL_DST"
    c = msg
    if not isinstance(msg, cluster_pb2.Cluster):
        try:
            c = cluster_pb2.Cluster()
            msg.Unpack(c)
        except Exception:
            return False
    return c.WhichOneof("cluster_discovery_type") == "type" and c.type == cluster_pb2.Cluster.ORIGINAL_DST


def _decoders() -> Dict[str, Any]:
    from .model import CLUSTER, LISTENER

    return {LISTENER: decode_sidecar_listener, CLUSTER: decode_sidecar_cluster}


def listener_spec_of(resolution: Any) -> ListenerSpec:
    """The :class:`ListenerSpec` the request path reads (route configuration, HTTP filters) for a
    resolution to an HttpConnectionManager."""
    hcm = resolution.hcm
    address = f"{resolution.destination_ip or '0.0.0.0'}:{resolution.port}"
    return ListenerSpec(
        name=resolution.listener or "", route_config_name=hcm.route_config_name,
        inline_route_config=hcm.route_config, http_filters=tuple(hcm.http_filters),
        max_stream_duration=hcm.max_stream_duration, address=address)


def _fqdn_of_cluster(name: str) -> Optional[Tuple[int, str]]:
    """``outbound|<port>|<subset>|<fqdn>`` -> ``(port, fqdn)``."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound":
        return None
    try:
        return int(parts[1]), parts[3].rstrip(".").lower()
    except ValueError:
        return None


class ListenerIndex:
    """Every listener LDS delivered, decoded, and the TCP services' addresses, rebuilt when LDS changes."""

    def __init__(self, listeners: Mapping[str, Any]) -> None:
        self.listeners = dict(listeners)
        #: (fqdn, port) -> the TCP listener's IP (Istio: the service VIP)
        self.vips: Dict[Tuple[str, int], str] = {}
        for spec in self.listeners.values():
            if spec.address is None:
                continue
            ip, port = spec.address
            if ip in ("0.0.0.0", "::"):
                continue
            for chain in list(spec.filter_chains) + ([spec.default_filter_chain] if spec.default_filter_chain else []):
                tcp = getattr(chain, "tcp", None)
                if tcp is None:
                    continue
                for cname in tcp.clusters:
                    got = _fqdn_of_cluster(cname)
                    if got is not None:
                        self.vips.setdefault((got[1], port), ip)

    def vip_of(self, host: str, port: int, namespace: str, domain: str) -> Optional[str]:
        """The destination IP for ``host`` (an IP literal, or a TCP service's VIP), else ``None``."""
        try:
            return str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            pass
        for name in expand_host(host, namespace, domain):
            vip = self.vips.get((name, port))
            if vip is not None:
                return vip
        return None


def expand_host(host: str, namespace: str, domain: str = "cluster.local") -> List[str]:
    """The FQDNs a short service name stands for in ``namespace`` (most specific first)."""
    h = host.rstrip(".").lower()
    out = [h]
    dots = h.count(".")
    if dots == 0 and namespace:
        out.append(f"{h}.{namespace}.svc.{domain}")
    elif dots == 1:
        out.append(f"{h}.svc.{domain}")
    elif h.endswith(".svc"):
        out.append(f"{h}.{domain}")
    return out


def unsupported_text(target: str, resolution: Any) -> str:
    return (f"{target}: the sidecar configuration for this destination uses what meshcore does not "
            f"implement ({'; '.join(resolution.unsupported)}); refusing traffic rather than deciding "
            f"differently from the sidecar ({resolution.reason})")


def check_target(target: str) -> Tuple[str, int]:
    """``host:port`` of an Envoy-shape target (ConfigError naming the target otherwise)."""
    from .._routing import split_host_port

    host, port = split_host_port(target)
    if not host or not port:
        raise ConfigError(target, "target", "the Envoy shape needs host:port (the port selects the listener)")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(target, "target", f"port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ConfigError(target, "target", f"port {number} is out of range")
    return host, number


# -- the HttpConnectionManager's path normalization ----------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_path(path: str, *, canonical: bool, merge_slashes: bool) -> str:
    """The ``:path`` Envoy's HCM routes and forwards with ``normalize_path`` (Chromium's
    ``CanonicalizePath``, as Envoy's ``PathUtil::canonicalPath``: backslashes become slashes,
    percent-encoded unreserved characters are decoded, other escapes are kept, characters a path
    may not hold are escaped, ``.``/``..`` segments (also spelled ``%2e``) are removed) and/or
    ``merge_slashes`` (runs of ``/`` become one). The query is left alone."""
    cut = path.find("?")
    p, query = (path, "") if cut < 0 else (path[:cut], path[cut:])
    if canonical:
        p = _canonical(p)
    if merge_slashes and "//" in p:
        out = []
        prev = ""
        for ch in p:
            if ch == "/" and prev == "/":
                continue
            out.append(ch)
            prev = ch
        p = "".join(out)
    return p + query


_SAFE = frozenset("!$&'()*+,;=:@/%") | _UNRESERVED


def _canonical(p: str) -> str:
    out: List[str] = []
    i, n = 0, len(p)
    while i < n:
        ch = p[i]
        if ch == "\\":
            out.append("/")
        elif ch == "%" and i + 2 < n + 0 and p[i + 1] in _HEX and p[i + 2] in _HEX:
            decoded = chr(int(p[i + 1:i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else p[i:i + 3])
            i += 3
            continue
        elif ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        i += 1
    segments = "".join(out).split("/")
    stack: List[str] = []
    last = len(segments) - 1
    for k, seg in enumerate(segments[1:], 1) if segments and segments[0] == "" else enumerate(segments):
        if seg == ".":
            if k == last:
                stack.append("")
            continue
        if seg == "..":
            if stack:
                stack.pop()
            if k == last:
                stack.append("")
            continue
        stack.append(seg)
    lead = "/" if p.startswith(("/", "\\")) else ""
    return lead + "/".join(stack)


class NormalizingRouteTable:
    """A route table that matches (and forwards) the normalized path, as the sidecar's HCM does.

    Paths without ``%``, ``\\``, ``/.`` or ``//`` are passed through untouched (no allocation);
    when normalization changes a path, the match carries it as its ``path_rewrite`` (unless the
    route rewrites the path itself, from the normalized one) so the upstream gets what Envoy sends."""

    def __init__(self, table: Any, canonical: bool, merge_slashes: bool) -> None:
        self._table = table
        self._canonical = canonical
        self._merge = merge_slashes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    def match(self, authority: str, path: str, headers: Any = None, method: str = "GET", scheme: str = "http",
              random_value: Any = None, source_ip: Any = None) -> Any:
        p = path
        if "%" in p or "\\" in p or "/." in p or "//" in p:
            p = normalize_path(path, canonical=self._canonical, merge_slashes=self._merge)
        m = self._table.match(authority, p, headers, method, scheme, random_value, source_ip)
        if m is not None and p != path and m.path_rewrite is None and m.cluster is not None:
            import copy

            m = copy.copy(m)
            m.path_rewrite = p
        return m
