"""The demo's xDS resources, shaped the way Istio serves a proxyless client.

One RouteConfiguration per port (``"9080"``, as Istio names them) with a virtual host per
service; a client listener per ``host:port`` target (Istio's naming) that takes its routes
over RDS; EDS clusters with their ClusterLoadAssignments:

* ``reviews``: ``x-canary: 1`` goes to ``reviews-v2``; everything else is split
  ``reviews-v1`` 90 / ``reviews-v2`` 10 (weighted clusters).
* ``ratings``: ``x-lb: round-robin`` goes to ``ratings-rr`` (ROUND_ROBIN, for comparison),
  everything else to ``ratings`` (LEAST_REQUEST, power of two choices); the same instances.
* ``details``: ``details`` (ROUND_ROBIN) with outlier detection (3 consecutive 5xx eject a host
  for 1.5 s; the interval is 0.5 s), the route retries 5xx twice.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message

from ..controlplane import builders as b
from .upstreams import Upstream

__all__ = ["ROUTE_CONFIG", "TARGETS", "CANARY_WEIGHTS", "topology", "reviews_routes", "assignment_for",
           "reviews_cluster"]

ROUTE_CONFIG = "9080"
#: The data-plane targets (``host:port``), one client listener each.
TARGETS = ("reviews:9080", "ratings:9080", "details:9080")
#: The initial canary split of the ``reviews`` default route.
CANARY_WEIGHTS: Mapping[str, int] = {"reviews-v1": 90, "reviews-v2": 10}

OUTLIER = {"consecutive_5xx": 3, "interval": 0.5, "base_ejection_time": 1.5, "max_ejection_percent": 50}


def _domains(service: str) -> List[str]:
    fqdn = f"{service}.demo.svc.cluster.local"
    return [service, f"{service}:9080", fqdn, f"{fqdn}:9080"]


def reviews_routes(weights: Mapping[str, int]) -> route_components_pb2.VirtualHost:
    """The ``reviews`` virtual host with the default route split by ``weights``."""
    return b.virtual_host("reviews", _domains("reviews"), [
        b.route(prefix="/", headers={"x-canary": "1"}, cluster="reviews-v2", name="canary-header", timeout=2.0),
        b.route(prefix="/", weighted=dict(weights), name="split", timeout=2.0),
    ])


def route_configuration(weights: Mapping[str, int]) -> Message:
    """The port-9080 RouteConfiguration with every virtual host."""
    details = b.route(prefix="/", cluster="details", name="details", timeout=2.0)
    details.route.retry_policy.retry_on = "5xx"
    details.route.retry_policy.num_retries.value = 2
    return b.route_config(ROUTE_CONFIG, [
        reviews_routes(weights),
        b.virtual_host("ratings", _domains("ratings"), [
            b.route(prefix="/", headers={"x-lb": "round-robin"}, cluster="ratings-rr", name="round-robin",
                    timeout=5.0),
            b.route(prefix="/", cluster="ratings", name="least-request", timeout=5.0),
        ]),
        b.virtual_host("details", _domains("details"), [details]),
    ])


def reviews_cluster(name: str) -> Message:
    return b.cluster(name, eds_service_name=name)


def assignment_for(name: str, upstreams: Sequence[Upstream]) -> Message:
    """A ClusterLoadAssignment listing ``upstreams`` (one locality)."""
    return b.assignment(name, [(u.address, u.port) for u in upstreams], locality=("demo", "zone-a", ""))


def _details_cluster() -> Message:
    c = b.cluster("details", eds_service_name="details")
    od = c.outlier_detection
    od.consecutive_5xx.value = OUTLIER["consecutive_5xx"]
    od.interval.FromMilliseconds(int(OUTLIER["interval"] * 1000))
    od.base_ejection_time.FromMilliseconds(int(OUTLIER["base_ejection_time"] * 1000))
    od.max_ejection_percent.value = OUTLIER["max_ejection_percent"]
    return c


def topology(instances: Mapping[str, Sequence[Upstream]]) -> List[Message]:
    """Every resource of the demo; ``instances`` maps cluster names to their upstreams."""
    out: List[Message] = [b.api_listener(t, route_config_name=ROUTE_CONFIG) for t in TARGETS]
    out.append(route_configuration(CANARY_WEIGHTS))
    clusters: Dict[str, Message] = {
        "reviews-v1": reviews_cluster("reviews-v1"),
        "reviews-v2": reviews_cluster("reviews-v2"),
        "ratings": b.cluster("ratings", lb_policy="LEAST_REQUEST", eds_service_name="ratings"),
        "ratings-rr": b.cluster("ratings-rr", eds_service_name="ratings-rr"),
        "details": _details_cluster(),
    }
    out.extend(clusters.values())
    out.extend(assignment_for(name, instances[name]) for name in clusters)
    return out
