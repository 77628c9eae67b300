"""What istiod's *proxyless* generator (``GENERATOR=grpc``) sends a gRPC client, from the same mesh
description as :mod:`~meshcore.controlplane.istio_sidecar`.

:func:`build_grpc` returns, for the ``host:port`` names a proxyless client asked for::

    {"listeners": [Listener...], "routes": [RouteConfiguration...],
     "clusters": [Cluster...], "endpoints": [ClusterLoadAssignment...]}

as ``envoy.config.*.v3`` protobuf messages: what istiod answers to the client's LDS request with
those names, then to the RDS/CDS/EDS requests the answers lead to (every route configuration the
listeners name, every cluster the routes name, every assignment the clusters name). The sidecar
builder's pieces are reused (virtual hosts and VirtualService routes, DestinationRule policy
merging, the assignments) and reduced as the grpc generator reduces them.

Followed: istio/istio master (2026-08, commit 86c9f01),

* LDS -- ``pilot/pkg/networking/grpcgen/lds.go``: ``newListenerNameFilter`` and ``tryFindFQDN``
  (a requested host is also looked up as an FQDN in the client's namespace only: ``echo`` and
  ``echo.<ns>``/``echo.<ns>.svc`` of the client's own namespace expand, ``echo.other`` does not,
  so istiod sends no listener for it), ``buildOutboundListeners`` (a listener per requested
  spelling and per port of the service the filter lets through, named
  ``net.JoinHostPort(requested, port)``; ``address`` is the service VIP and port;
  ``api_listener`` an HttpConnectionManager with ``http_filters`` [fault, router] and RDS
  ``outbound|<port>||<fqdn>`` over ADS). Inbound (server) listener names
  (``xds.istio.io/grpc/lds/inbound/...``) are not modelled and are skipped.
* RDS -- ``grpcgen/rds.go``: ``buildHTTPRoute`` = ``core.BuildSidecarOutboundVirtualHosts`` for the
  port (``pilot/pkg/networking/core/httproute.go``) as a proxyless node gets it (domains with
  ``:port``, ``SidecarIgnorePort`` false; the absolute-FQDN domain,
  ``PILOT_ENABLE_ABSOLUTE_FQDN_VHOST_DOMAIN`` default on), filtered by
  ``filterVirtualHostsForHostname`` to the requested host's virtual host (istio/istio#59241); a
  bare ``RouteConfiguration{name, virtual_hosts}`` (no catch-all virtual host, no
  ``validate_clusters``, no ``ignore_port_in_host_matching``). VirtualService routes get
  ``max_stream_duration.max_stream_duration`` = the timeout instead of ``max_grpc_timeout``
  (``route.go`` ``setTimeout`` for ``IsProxylessGrpc``); default routes are the sidecar's.
* CDS -- ``grpcgen/cds.go``: ``newClusterFilter`` / ``clusterBuilder``: only the requested
  clusters (a default cluster and the DestinationRule subsets asked for); each a bare EDS cluster
  (``alt_stat_name`` ``<name>;``, ``eds_cluster_config{service_name: <name>, eds_config: ads}``)
  with ``applyTLS`` (a transport socket only for ``ISTIO_MUTUAL``: ``buildCommonTLSContext`` of
  ``grpcgen/grpcgen.go``, certificate provider instance ``default``, both the current and the
  deprecated fields, the service's SPIFFE identities as exact SANs; ``DISABLE``, ``SIMPLE``,
  ``MUTUAL`` and no DR give plaintext: no auto-mTLS), ``applyLoadBalancing`` (consistent hash:
  ``ApplyRingHashLoadBalancer``, RING_HASH or MAGLEV; ``LEAST_REQUEST``; ``ROUND_ROBIN`` and
  unset leave the default; ``LEAST_CONN``, ``RANDOM``, ``PASSTHROUGH`` only log a warning) and
  ``applyCircuitBreakers`` (``max_requests`` = ``http2MaxRequests`` when > 0, nothing else).
  Outlier detection, connect timeouts, the other connection-pool limits, HTTP protocol options and
  locality load-balancer settings are not written. A cluster of a host or port the registry does
  not have is left out (istiod logs it).
* EDS -- the regular generator (``pilot/pkg/xds/endpoints/endpoint_builder.go``): the same
  ClusterLoadAssignment the sidecar gets (:func:`istio_sidecar.build`'s ``endpoints`` for the name),
  locality priorities/weights from the DestinationRule included.

Not modelled: a VirtualService naming a service on a port that has no HTTP service (istiod would
build a virtual host from it in that port's route configuration; this builder, like the sidecar
builder, builds virtual hosts for HTTP ports only), the stateful-session filter (service labels are
not in the description), draining endpoints.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from .istio_sidecar import _address, _Builder, _camel, _Mesh, _pack, _Port, _Service, _subset_key, _u32

__all__ = ["build_grpc", "INBOUND_PREFIX", "route_name", "expand_requested_host"]

#: ``grpcxds.ServerListenerNamePrefix``: server-side (inbound) listener names, not modelled here.
INBOUND_PREFIX = "xds.istio.io/grpc/lds/inbound/"
_TLS_SOCKET = "envoy.transport_sockets.tls"  # cds.go transportSocketName (grpc-go checks it)
_ADS = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())


def route_name(fqdn: str, port: int) -> str:
    """``clusterKey``: the RDS (and default cluster) name ``outbound|<port>||<fqdn>``."""
    return _subset_key("", fqdn, port)


def _split_host_port(name: str) -> Tuple[str, Optional[str]]:
    """``net.SplitHostPort``: ``(host, port)``, or ``(name, None)`` when ``name`` has no port."""
    if name.startswith("["):
        end = name.find("]")
        if end > 0 and name[end + 1:end + 2] == ":" and name.count("]") == 1:
            return name[1:end], name[end + 2:]
        return name, None
    if name.count(":") != 1:
        return name, None
    host, port = name.split(":")
    return host, port


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def expand_requested_host(name: str, namespace: str, domain: str = "cluster.local") -> str:
    """``tryFindFQDN``: the FQDN a requested short host stands for, or ``""``.

    Only names in the client's own namespace expand: ``echo`` (no dot), ``echo.<ns>`` and
    ``echo.<ns>.svc`` -> ``echo.<ns>.svc.<domain>``; anything else (``echo.other``, an FQDN) -> ``""``.
    """
    dns_domain = f"{namespace}.svc.{domain}"
    if "." not in name:
        return f"{name}.{dns_domain}"
    for suffix in (namespace, namespace + ".svc"):
        short = name[: -len(suffix) - 1] if name.endswith("." + suffix) else name
        if short != name and dns_domain.startswith(suffix):
            return f"{short}.{dns_domain}"
    return ""


class _Requested:
    """``listenerName``: the spellings a client used for a host, and the ports (empty: every port)."""

    __slots__ = ("names", "ports")

    def __init__(self) -> None:
        self.names: Set[str] = set()
        self.ports: Optional[Set[str]] = None

    def includes_port(self, port: str) -> bool:
        return not self.ports or port in self.ports


def _listener_filter(names: Iterable[str], namespace: str, domain: str) -> Dict[str, _Requested]:
    """``newListenerNameFilter`` (outbound names only)."""
    out: Dict[str, _Requested] = {}
    for name in names:
        if name.startswith(INBOUND_PREFIX):
            continue
        host, port = _split_host_port(name)
        requested = host if port is not None else name
        all_names = [requested]
        fqdn = expand_requested_host(requested, namespace, domain)
        if fqdn:
            all_names.append(fqdn)
        for n in all_names:
            existing = out.get(n)
            ln = existing if existing is not None else _Requested()
            ln.names.add(requested)
            if port is not None and (existing is None or ln.ports):
                if ln.ports is None:
                    ln.ports = set()
                ln.ports.add(port)
            elif port is None:
                ln.ports = None
            out[n] = ln
    return out


def _parse_subset_key(name: str) -> Tuple[str, str, str, int]:
    """``model.ParseSubsetKey``: ``(direction, subset, hostname, port)``; ``("", "", "", 0)`` if malformed."""
    parts = name.split("|")
    if len(parts) < 4:
        return "", "", "", 0
    try:
        port = int(parts[1])
    except ValueError:
        port = 0
    return parts[0], parts[2], parts[3], port


def _domain_port(domain: str) -> Tuple[str, str]:
    host, port = _split_host_port(domain)
    return host, port or ""


def _wildcard_matches(pattern: str, name: str) -> bool:
    """``host.Name.Matches`` for a wildcarded ``pattern`` against a concrete ``name``."""
    if pattern == "*":
        return True
    return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1


def _filter_vhosts(vhosts: Sequence[Any], hostname: str, port: int) -> List[Any]:
    """``filterVirtualHostsForHostname``: the virtual hosts one of whose domains names the host."""
    h = hostname.lower()
    want_host = f"[{h}]" if ":" in h else h
    want_host_port = _join_host_port(h, port)
    want_port = str(port)
    out = []
    for vh in vhosts:
        for d in vh.domains:
            domain = d.lower()
            if domain in (want_host, want_host_port):
                out.append(vh)
                break
            dhost, dport = _domain_port(domain)
            if dhost.startswith("*"):
                if dport and dport != want_port:
                    continue
                if _wildcard_matches(dhost, h):
                    out.append(vh)
                    break
            if dhost == want_host and dport in ("", want_port):
                out.append(vh)
                break
    return out


def _hcm_any(rds: str) -> Any:
    h = hcm_pb2.HttpConnectionManager(http_filters=[
        hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=_pack(fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())),
    ])
    h.rds.config_source.CopyFrom(_ADS)
    h.rds.route_config_name = rds
    return _pack(h)


def _common_tls_context(sans: Sequence[str]) -> tls_pb2.CommonTlsContext:
    """``buildCommonTLSContext`` (grpcgen.go): the current and the deprecated provider fields."""
    c = tls_pb2.CommonTlsContext()
    c.tls_certificate_provider_instance.CopyFrom(
        tls_common_pb2.CertificateProviderPluginInstance(instance_name="default", certificate_name="default"))
    c.tls_certificate_certificate_provider_instance.CopyFrom(
        tls_pb2.CommonTlsContext.CertificateProviderInstance(instance_name="default", certificate_name="default"))
    cvc = c.combined_validation_context
    cvc.validation_context_certificate_provider_instance.CopyFrom(
        tls_pb2.CommonTlsContext.CertificateProviderInstance(instance_name="default", certificate_name="ROOTCA"))
    dvc = cvc.default_validation_context
    for san in sans:
        dvc.match_subject_alt_names.add(exact=san)
    dvc.ca_certificate_provider_instance.CopyFrom(
        tls_common_pb2.CertificateProviderPluginInstance(instance_name="default", certificate_name="ROOTCA"))
    return c


class _GrpcBuilder:
    def __init__(self, mesh: _Mesh) -> None:
        self.m = mesh
        # the sidecar builder as a proxyless node's routes are built: domains with ports (no
        # ignore_port_in_host_matching), the absolute FQDN, the current default retry policy
        self.b = _Builder(mesh, domains_with_port=True, absolute_fqdn=True, retry_503=False, istio_ext=False)
        self._vhosts: Dict[int, List[Any]] = {}

    # -- LDS ------------------------------------------------------------------------------------

    def listeners(self, names: Sequence[str]) -> List[listener_pb2.Listener]:
        """``buildOutboundListeners`` (no names: the wildcard request, every service and port)."""
        flt = _listener_filter(names, self.m.namespace, self.m.domain)
        out = []
        for svc in self.m.services:  # the sidecar scope's services (sorted by hostname)
            match = flt.get(svc.fqdn)
            if not names:  # listenerNames.includes with an empty filter
                match = _Requested()
                match.names.add(svc.fqdn)
            if match is None:
                continue
            for requested in sorted(match.names):
                for p in svc.ports:
                    if not match.includes_port(str(p.number)):
                        continue
                    out.append(listener_pb2.Listener(
                        name=_join_host_port(requested, p.number), address=_address(svc.vip, p.number),
                        api_listener=api_listener_pb2.ApiListener(api_listener=_hcm_any(route_name(svc.fqdn, p.number)))))
        return out

    # -- RDS ------------------------------------------------------------------------------------

    def _port_vhosts(self, port: int) -> List[Any]:
        vhosts = self._vhosts.get(port)
        if vhosts is None:
            vhosts = self._vhosts[port] = self.b._virtual_hosts(port)
        return vhosts

    def route_config(self, name: str) -> Optional[route_pb2.RouteConfiguration]:
        """``buildHTTPRoute``."""
        _, _, hostname, port = _parse_subset_key(name)
        if not hostname or not port:
            return None
        rc = route_pb2.RouteConfiguration(name=name)
        for vh in _filter_vhosts(self._port_vhosts(port), hostname, port):
            rc.virtual_hosts.add().CopyFrom(vh)
        for vh in rc.virtual_hosts:
            for r in vh.routes:
                if "istio" in r.metadata.filter_metadata and r.HasField("route"):
                    # setTimeout for a proxyless node: max_stream_duration, not max_grpc_timeout
                    a = r.route
                    a.ClearField("max_grpc_timeout")
                    a.max_stream_duration.max_stream_duration.CopyFrom(a.timeout)
        return rc

    # -- CDS ------------------------------------------------------------------------------------

    def _service_port(self, hostname: str, port: int) -> Optional[Tuple[_Service, _Port]]:
        svc = self.m.by_fqdn.get(hostname)
        if svc is None:
            return None
        p = svc.port(port)
        return (svc, p) if p is not None else None

    def clusters(self, names: Iterable[str]) -> List[Tuple[cluster_pb2.Cluster, _Service, _Port, Dict[str, Any]]]:
        """``BuildClusters``: per default key, the default cluster if requested, then the requested
        subsets in DestinationRule order; each with the policy its assignment is built with."""
        groups: Dict[str, Set[str]] = {}
        for name in names:
            direction, _, hostname, port = _parse_subset_key(name)
            groups.setdefault(_subset_key("", hostname, port, direction), set()).add(name)
        out = []
        for default_name, wanted in groups.items():
            _, _, hostname, port = _parse_subset_key(default_name)
            if not hostname or not port:
                continue  # "failed parsing subset key"
            found = self._service_port(hostname, port)
            if found is None:
                continue  # "did not find service / port for cluster"
            svc, p = found
            dr = self.m.destination_rule(svc.fqdn)
            tp = _camel(dr.spec, "trafficPolicy") if dr else None
            policy = self.b._traffic_policy_for_port(tp, port)
            if default_name in wanted:
                out.append((self._cluster(default_name, svc, policy), svc, p, dict(policy or {})))
            for s in (dr.spec.get("subsets") or []) if dr else []:
                key = _subset_key(s["name"], svc.fqdn, port)
                if key not in wanted:
                    continue
                sp = self.b._merged_subset_policy(tp, _camel(s, "trafficPolicy"), port)
                out.append((self._cluster(key, svc, sp), svc, p, dict(sp or {}, _labels=s.get("labels") or {})))
        return out

    def _cluster(self, name: str, svc: _Service, policy: Optional[Mapping[str, Any]]) -> cluster_pb2.Cluster:
        """``edsCluster`` + ``applyTrafficPolicy`` (TLS, load balancing, circuit breakers)."""
        c = cluster_pb2.Cluster(name=name, alt_stat_name=name + ";", type=cluster_pb2.Cluster.EDS)
        c.eds_cluster_config.service_name = name
        c.eds_cluster_config.eds_config.CopyFrom(_ADS)
        if policy is None:
            return c
        tls = policy.get("tls") or {}
        if str(tls.get("mode", "")).upper() == "ISTIO_MUTUAL":  # applyTLS
            ctx = tls_pb2.UpstreamTlsContext(common_tls_context=_common_tls_context(svc.service_accounts))
            c.transport_socket.CopyFrom(base_pb2.TransportSocket(name=_TLS_SOCKET, typed_config=_pack(ctx)))
        lb = _camel(policy, "loadBalancer")  # applyLoadBalancing
        if lb:
            ch = _camel(lb, "consistentHash")
            if ch is not None:  # GetConsistentHash() != nil: an empty one is RING_HASH too
                self._ring_hash(c, ch)
            elif str(lb.get("simple", "")).upper() == "LEAST_REQUEST":
                c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
            # ROUND_ROBIN / UNSPECIFIED: gRPC's default; LEAST_CONN, RANDOM, PASSTHROUGH: a warning
        http = (_camel(policy, "connectionPool") or {}).get("http") or {}  # applyCircuitBreakers
        max_requests = int(_camel(http, "http2MaxRequests", 0) or 0)
        if max_requests > 0:
            c.circuit_breakers.thresholds.append(
                circuit_breaker_pb2.CircuitBreakers.Thresholds(max_requests=_u32(max_requests)))
        return c

    @staticmethod
    def _ring_hash(c: cluster_pb2.Cluster, ch: Mapping[str, Any]) -> None:
        """``ApplyRingHashLoadBalancer`` (cluster_traffic_policy.go)."""
        if ch.get("maglev") is not None:
            c.lb_policy = cluster_pb2.Cluster.MAGLEV
            size = int(_camel(ch["maglev"], "tableSize", 0) or 0)
            if size:
                c.maglev_lb_config.table_size.value = size
        elif _camel(ch, "ringHash") is not None:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            size = int(_camel(_camel(ch, "ringHash"), "minimumRingSize", 0) or 0)
            if size:
                c.ring_hash_lb_config.minimum_ring_size.value = size
        else:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            c.ring_hash_lb_config.minimum_ring_size.value = int(_camel(ch, "minimumRingSize", 0) or 0) or 1024

    # -- EDS ------------------------------------------------------------------------------------

    def assignment(self, c: cluster_pb2.Cluster, svc: _Service, port: _Port,
                   policy: Mapping[str, Any]) -> endpoint_pb2.ClusterLoadAssignment:
        return self.b._cla(c, svc, port, policy)


def _referenced_clusters(rc: route_pb2.RouteConfiguration) -> List[str]:
    out: List[str] = []
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            if not r.HasField("route"):
                continue
            a = r.route
            which = a.WhichOneof("cluster_specifier")
            if which == "cluster":
                out.append(a.cluster)
            elif which == "weighted_clusters":
                out.extend(w.name for w in a.weighted_clusters.clusters)
    return out


def build_grpc(mesh_desc: Mapping[str, Any], targets: Iterable[str], *,
               proxy_namespace: str = "default") -> Dict[str, List[Any]]:
    """The LDS/RDS/CDS/EDS resources istiod's grpc generator sends a proxyless client in
    ``proxy_namespace`` that asked for the listeners ``targets`` (``host:port``, the host as the
    client spelled it: an FQDN, or a short name of its own namespace).

    ``mesh_desc`` is :func:`~meshcore.controlplane.istio_sidecar.build`'s description. Returns
    ``{"listeners", "routes", "clusters", "endpoints"}``: the listeners istiod sends for the names
    (named ``host:port`` as requested; a name istiod finds no service port for gets none, and a
    host requested once with and once without a port gets every port of the service, as istiod
    does), the route configurations they name (``outbound|<port>||<fqdn>``), the clusters those
    routes name (``outbound|<port>|<subset>|<fqdn>``) and their assignments, each list in the
    order istiod would build it, without duplicates.
    """
    mesh = _Mesh(mesh_desc, proxy_namespace)
    g = _GrpcBuilder(mesh)
    listeners = g.listeners(list(targets))
    route_names: List[str] = []
    for lis in listeners:
        h = hcm_pb2.HttpConnectionManager()
        lis.api_listener.api_listener.Unpack(h)
        if h.rds.route_config_name not in route_names:
            route_names.append(h.rds.route_config_name)
    routes = [rc for rc in (g.route_config(n) for n in route_names) if rc is not None]
    cluster_names: List[str] = []
    seen: Set[str] = set()
    for rc in routes:
        for name in _referenced_clusters(rc):
            if name not in seen:
                seen.add(name)
                cluster_names.append(name)
    built = g.clusters(cluster_names)
    return {
        "listeners": listeners,
        "routes": routes,
        "clusters": [c for c, _, _, _ in built],
        "endpoints": [g.assignment(c, svc, port, policy) for c, svc, port, policy in built],
    }
