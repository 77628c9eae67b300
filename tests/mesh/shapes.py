"""Resource shapes shared by the Mesh tests (proto3-JSON dicts, the resource-file "keyed" form)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from meshcore.xds.client import Backoff
from meshcore.xds.resource_file import parse_resources

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def listener(name: str, route_config_name: str, address: Optional[Tuple[str, int]] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "name": name,
        "api_listener": {"api_listener": {
            "@type": HCM,
            "rds": {"config_source": {"ads": {}}, "route_config_name": route_config_name},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}},
    }
    if address is not None:
        out["address"] = {"socket_address": {"address": address[0], "port_value": address[1]}}
    return out


def cluster(name: str, lb_policy: str = "ROUND_ROBIN", **extra: Any) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "lb_policy": lb_policy, **extra}


def assignment(name: str, ports: Iterable[int], host: str = "127.0.0.1") -> Dict[str, Any]:
    return {"cluster_name": name, "endpoints": [{
        "locality": {"zone": "z1"}, "load_balancing_weight": 1,
        "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}}
                         for p in ports]}]}


def route(name: str, cluster_name: str, prefix: str = "/", headers: Optional[Dict[str, str]] = None,
          timeout: Optional[str] = None) -> Dict[str, Any]:
    match: Dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = [{"name": k, "string_match": {"exact": v}} for k, v in headers.items()]
    action: Dict[str, Any] = {"cluster": cluster_name}
    if timeout is not None:
        action["timeout"] = timeout
    return {"name": name, "match": match, "route": action}


def mesh_resources(target: str, routes: Sequence[Dict[str, Any]], clusters: Sequence[Dict[str, Any]],
                   assignments: Sequence[Dict[str, Any]], route_config_name: str = "routes") -> Dict[str, List[Any]]:
    host = target.rsplit(":", 1)[0]
    return {
        "listeners": [listener(target, route_config_name)],
        "routes": [{"name": route_config_name, "virtual_hosts": [
            {"name": "vh", "domains": [host, target], "routes": list(routes)}]}],
        "clusters": list(clusters),
        "endpoints": list(assignments),
    }


TARGET = "echo.default.svc.cluster.local:8080"


def resources(ports_a=(9001, 9002), ports_b=(9003,), cluster_a=None, cluster_b=None, extra_routes=()):
    routes = list(extra_routes) + [route("to-b", "b", prefix="/b"), route("default", "a", timeout="3s")]
    return parse_resources(mesh_resources(
        TARGET, routes, [cluster_a or cluster("a"), cluster_b or cluster("b")],
        [assignment("a", ports_a), assignment("b", ports_b)]))


def bootstrap(cp: Any, node_id: str = "meshcore-test", uri: str = "") -> Dict[str, Any]:
    return {"xds_servers": [{"server_uri": uri or cp.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": node_id, "cluster": "meshcore", "locality": {"zone": "z1"}}}


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5)
