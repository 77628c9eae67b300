"""In-process introspection of a :class:`~meshcore.Mesh`, as plain dicts (what the CLI prints).

* :func:`resource_status`: one row per xDS resource the client knows (type, name, version,
  ACKED / NACKED / REQUESTED / DOES_NOT_EXIST, last error) -- ``istioctl proxy-status`` for one
  client, from the same data as :meth:`Mesh.config_dump` (CSDS).
* :func:`clusters`: the clusters the given targets use, with their balancer policy and options,
  outlier detection and, per endpoint, health, weight, priority, locality, whether outlier
  detection ejected it and its in-flight requests -- Envoy's ``/clusters`` view, plus the
  per-cluster request counters of :meth:`Mesh.stats`.

Nothing here changes the mesh: reading the balancers does not pick.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Iterable, List, Optional

from .xds.model import SHORT_NAMES

__all__ = ["resource_status", "clusters", "short_type"]

log = logging.getLogger(__name__)

_TYPE_ORDER = {name: i for i, name in enumerate(("LDS", "RDS", "CDS", "EDS"))}
_STAT_COUNTERS = ("upstream_rq_total", "upstream_rq_2xx", "upstream_rq_5xx", "upstream_rq_retry",
                  "upstream_rq_timeout", "upstream_cx_connect_fail", "outlier_detection.ejections_enforced_total")


def short_type(type_url: str) -> str:
    """``LDS``/``RDS``/``CDS``/``EDS`` for a resource type URL (the message name otherwise)."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def resource_status(mesh: Any) -> List[Dict[str, Any]]:
    """Every resource of the client: ``type``, ``name``, ``version``, ``status``, ``error``,
    ``last_updated`` (RFC 3339 or ``""``), sorted LDS, RDS, CDS, EDS then by name."""
    dump = mesh.config_dump(include_resources=False)
    rows = []
    for g in dump.get("generic_xds_configs", []):
        kind = short_type(g.get("type_url", ""))
        rows.append({
            "type": kind,
            "name": g.get("name", ""),
            "version": g.get("version_info", ""),
            "status": g.get("client_status", "UNKNOWN"),
            "error": (g.get("error_state") or {}).get("details", ""),
            "last_updated": g.get("last_updated", ""),
        })
    rows.sort(key=lambda r: (_TYPE_ORDER.get(r["type"], 9), r["name"]))
    return rows


def clusters(mesh: Any, targets: Iterable[str]) -> List[Dict[str, Any]]:
    """The clusters used by ``targets`` (each once, by name), with their endpoints."""
    seen: Dict[str, Dict[str, Any]] = {}
    stats = mesh.stats()
    for target in targets:
        cfg = mesh.config(target)
        if cfg is None:
            continue
        for name, rt in cfg.clusters.items():
            if name not in seen:
                seen[name] = _cluster(rt, stats.get(name, {}), target)
            elif target not in seen[name]["targets"]:
                seen[name]["targets"].append(target)
    return [seen[name] for name in sorted(seen)]


def _cluster(rt: Any, stats: Dict[str, Any], target: str) -> Dict[str, Any]:
    spec = rt.spec
    lb = rt.lb
    out: Dict[str, Any] = {
        "name": rt.name,
        "targets": [target],
        "type": getattr(spec, "kind", "") if spec is not None else "",
        "eds_service_name": getattr(spec, "eds_service_name", "") if spec is not None else "",
        "policy": getattr(lb, "policy", None) or (spec.policy if spec is not None else ""),
        "error": rt.error or "",
        "lb_options": _lb_options(lb),
        "outlier_detection": _outlier(spec),
        "circuit_breakers": dataclasses.asdict(spec.circuit_breakers) if spec is not None else None,
        "children": [c.name for c in getattr(rt, "children", ())],
        "stats": {k: stats[k] for k in _STAT_COUNTERS if k in stats},
        "endpoints": [],
    }
    if lb is None:
        return out
    leaves = [(c.name, c.lb) for c in getattr(lb, "children", ())] if out["policy"] == "AGGREGATE" else [(rt.name, lb)]
    for cluster_name, leaf in leaves:
        for ep in leaf.endpoints:
            out["endpoints"].append(_endpoint(ep, leaf, cluster_name if cluster_name != rt.name else None))
    return out


def _endpoint(ep: Any, lb: Any, via: Optional[str]) -> Dict[str, Any]:
    row = {
        "address": ep.key,
        "health": ep.health.name,
        "weight": ep.weight,
        "priority": ep.priority,
        "locality": "/".join(ep.locality).rstrip("/"),
        "locality_weight": ep.locality_weight,
        "ejected": bool(lb.is_ejected(ep)),
        "active_requests": lb.active_requests(ep),
    }
    if ep.hostname:
        row["hostname"] = ep.hostname
    if via:
        row["cluster"] = via
    return row


def _lb_options(lb: Any) -> Dict[str, Any]:
    config = getattr(lb, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    defaults = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("policy", "policy_code") and getattr(config, f.name) != getattr(defaults, f.name)}


def _outlier(spec: Any) -> Optional[Dict[str, Any]]:
    od = getattr(spec, "outlier_detection", None)
    if od is None:
        return None
    defaults = type(od)()
    changed = {f.name: getattr(od, f.name) for f in dataclasses.fields(od)
               if getattr(od, f.name) != getattr(defaults, f.name)}
    return changed or {"consecutive_5xx": od.consecutive_5xx}
