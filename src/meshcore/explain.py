"""Explain one routing decision of a :class:`~meshcore.Mesh` (``meshcore route METHOD URL``).

:func:`explain_request` answers, for a request, what Envoy's router would do with the
configuration the mesh currently has: which virtual host (and which of its domains matched
the authority, and how: exact, suffix or prefix wildcard, or ``*``), which route (its index,
name and matcher; the routes before it did not match), the action (cluster, weighted pick with
the random value used, ``cluster_header``, direct response or redirect), the cluster's balancer
policy and the endpoint it picks now, the timeout, retry policy, hash and rewrites.

The balancer pick is real (it advances round robin like any request would) and released at once;
no request is sent and no stats are counted.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._route_model import HeaderMatchSpec, RouteConfigSpec, RouteSpec, StringMatchSpec
from ._routing import ascii_lower, split_host_port

__all__ = ["explain_request", "find_virtual_host", "describe_match", "describe_action", "target_for_url",
           "headers_from_args"]

log = logging.getLogger(__name__)

Headers = Sequence[Tuple[str, str]]


def target_for_url(url: str) -> Tuple[str, str, str, str]:
    """``(target, scheme, netloc, path)`` of a URL, the way ``Mesh.request`` derives the target
    (``host:port``, default ports 80 and 443)."""
    from .mesh import parse_url

    scheme, netloc, path, target = parse_url(url)
    return target, scheme, netloc, path


# -- virtual host ------------------------------------------------------------------------------------


def find_virtual_host(spec: RouteConfigSpec, authority: Optional[str],
                      headers: Headers = ()) -> Optional[Dict[str, Any]]:
    """Which virtual host Envoy selects, and why: ``index``, ``name``, ``domain`` (the entry of
    ``domains`` that matched), ``kind`` (exact / suffix wildcard / prefix wildcard / default)
    and ``host`` (the value matched: the authority or ``vhost_header``, lower-cased, port cut
    with ``ignore_port_in_host_matching``). ``None`` when no virtual host matches (404 NR)."""
    exact: Dict[str, Tuple[int, str]] = {}
    suffix: Dict[int, Dict[str, Tuple[int, str]]] = {}
    prefix: Dict[int, Dict[str, Tuple[int, str]]] = {}
    default: Optional[Tuple[int, str]] = None
    for i, vh in enumerate(spec.virtual_hosts):
        for d in vh.domains:
            if d == "*":
                default = (i, d)
            elif d.startswith("*"):
                suffix.setdefault(len(d) - 1, {})[d[1:]] = (i, d)
            elif d.endswith("*"):
                prefix.setdefault(len(d) - 1, {})[d[:-1]] = (i, d)
            else:
                exact[d] = (i, d)

    def result(hit: Tuple[int, str], kind: str, host: str) -> Dict[str, Any]:
        i, domain = hit
        return {"index": i, "name": spec.virtual_hosts[i].name, "domain": domain, "kind": kind, "host": host,
                "domains": list(spec.virtual_hosts[i].domains)}

    if not exact and not suffix and not prefix:
        return result(default, "default (the only virtual host domain is *)", authority or "") if default else None
    if spec.vhost_header:
        values = [v for k, v in headers if ascii_lower(k) == spec.vhost_header]
        if not values:
            return None
        host = values[0]
    elif authority is None:
        return None
    else:
        host = authority
    if spec.ignore_port_in_host_matching:
        host = split_host_port(host)[0]
    host = ascii_lower(host)
    if host in exact:
        return result(exact[host], "exact", host)
    n = len(host)
    for length, table in sorted(suffix.items(), reverse=True):
        if length < n and host[n - length:] in table:
            return result(table[host[n - length:]], "suffix wildcard (longest first)", host)
    for length, table in sorted(prefix.items(), reverse=True):
        if length < n and host[:length] in table:
            return result(table[host[:length]], "prefix wildcard (longest first)", host)
    if default is not None:
        return result(default, "default (*): no other domain matched", host)
    return None


# -- route matcher and action, in words --------------------------------------------------------------


def _string(m: StringMatchSpec) -> str:
    return f"{m.kind} {m.value!r}" + (" (ignore case)" if m.ignore_case else "")


def _header(h: HeaderMatchSpec) -> str:
    if h.kind == "string" and h.string is not None:
        text = f"{h.name} {_string(h.string)}"
    elif h.kind == "range":
        text = f"{h.name} in [{h.range_start}, {h.range_end})"
    elif h.kind == "present":
        text = f"{h.name} {'present' if h.present else 'absent'}"
    else:
        text = f"{h.name} present"
    if h.invert:
        text = f"not ({text})"
    if h.treat_missing_as_empty:
        text += " (missing = empty)"
    return text


def describe_match(r: RouteSpec) -> str:
    """The route's matcher in one line, e.g. ``prefix "/" and header x-canary exact '1'``."""
    kinds = {"prefix": "prefix", "path": "path", "regex": "safe_regex", "separated": "path_separated_prefix"}
    parts = [f"{kinds.get(r.path_kind, r.path_kind)} {r.path_value!r}" + ("" if r.case_sensitive
                                                                        else " (case insensitive)")]
    parts += [f"header {_header(h)}" for h in r.headers]
    for q in r.query:
        if q.string is not None:
            parts.append(f"query {q.name} {_string(q.string)}")
        else:
            parts.append(f"query {q.name} {'absent' if q.present is False else 'present'}")
    if r.runtime_fraction is not None:
        parts.append(f"runtime_fraction {r.runtime_fraction[0]}/{r.runtime_fraction[1]}")
    if r.grpc:
        parts.append("grpc")
    return " and ".join(parts)


def describe_action(r: RouteSpec) -> str:
    """The route's action in one line (without the per-request choice)."""
    if r.action == "cluster":
        return f"cluster {r.cluster}"
    if r.action == "cluster_header":
        return f"cluster from header {r.cluster_header}"
    if r.action == "weighted":
        return "weighted " + ", ".join(f"{w.name or 'header ' + w.cluster_header} {w.weight}" for w in r.weighted)
    if r.action == "direct" and r.direct_response is not None:
        return f"direct response {r.direct_response.status}"
    if r.action == "redirect":
        return "redirect"
    return r.action


def _retry_policy(policy: Any) -> Optional[Dict[str, Any]]:
    if policy is None:
        return None
    out = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.compare}  # not the cache
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


# -- the whole explanation ----------------------------------------------------------------------------


def explain_request(mesh: Any, method: str, url: str, headers: Headers = (), *, target: Optional[str] = None,
                    random_value: Optional[int] = None, source_ip: Optional[str] = None) -> Dict[str, Any]:
    """Explain how ``mesh`` routes ``method url`` with ``headers``; see the module docstring.

    The result's ``outcome`` is ``"cluster"``, ``"direct_response"``, ``"redirect"``,
    ``"no_virtual_host"``, ``"no_route"``, ``"unavailable"`` (no configuration for the target,
    missing cluster or no healthy endpoint; ``error`` says why).
    """
    derived, scheme, netloc, path = target_for_url(url)
    target = target or derived
    headers = list(headers)
    out: Dict[str, Any] = {"request": {"method": method, "url": url, "target": target, "path": path,
                                       "headers": [list(h) for h in headers]}}
    cfg = mesh.config(target)
    if cfg is None or cfg.error is not None or cfg.route_table is None:
        out["outcome"] = "unavailable"
        out["error"] = (cfg.error if cfg is not None and cfg.error else
                        f"no configuration for target {target!r} (is it a listener the control plane serves?)")
        return out
    table = cfg.route_table
    spec: RouteConfigSpec = table.spec
    authority = netloc  # Mesh.request matches virtual hosts on the URL's authority (the Host header)
    out["request"]["authority"] = authority
    out["listener"] = cfg.listener.name if cfg.listener is not None else target
    out["route_configuration"] = spec.name
    vhost = find_virtual_host(spec, authority, headers)
    out["virtual_host"] = vhost
    if vhost is None:
        out["outcome"] = "no_virtual_host"
        out["error"] = f"no virtual host of {spec.name!r} matches {authority!r} (Envoy: 404, NR)"
        return out
    vh = spec.virtual_hosts[vhost["index"]]
    out["routes"] = [{"index": r.index, "name": r.name, "match": describe_match(r), "action": describe_action(r)}
                     for r in vh.routes]
    if random_value is None:
        random_value = random.getrandbits(64)
    out["random_value"] = random_value
    m = table.match(authority, path, headers, method, scheme, random_value, source_ip)
    if m is None:
        out["route"] = None
        out["outcome"] = "no_route"
        out["error"] = f"no route of virtual host {vh.name!r} matches {method} {path} (Envoy: 404, NR)"
        return out
    if m.virtual_host != vh.name:  # require_tls and such answer from elsewhere; trust the table
        out["virtual_host"] = dict(vhost, name=m.virtual_host)
    r: RouteSpec = m.route
    out["route"] = {"index": r.index if r is not None else None, "name": m.route_name,
                    "match": describe_match(r) if r is not None else ""}
    out["action"] = _action(m, r, random_value)
    out["timeout"] = m.timeout
    out["retry_policy"] = _retry_policy(m.retry_policy)
    out["hash"] = m.hash
    out["path_rewrite"] = m.path_rewrite
    out["host_rewrite"] = m.host_rewrite
    if m.direct_response is not None:
        out["outcome"] = "direct_response"
        return out
    if m.redirect is not None:
        out["outcome"] = "redirect"
        return out
    out["outcome"] = "cluster"
    out["cluster"] = _cluster_pick(cfg, m, out)
    return out


def _action(m: Any, r: Optional[RouteSpec], random_value: int) -> Dict[str, Any]:
    if m.direct_response is not None:
        status, body = m.direct_response
        return {"kind": "direct_response", "status": status, "body": body}
    if m.redirect is not None:
        return {"kind": "redirect", "location": m.redirect, "status": m.redirect_code}
    if r is not None and r.action == "weighted":
        entries = [{"cluster": w.name or f"<header {w.cluster_header}>", "weight": w.weight} for w in r.weighted]
        return {"kind": "weighted_clusters", "clusters": entries, "total": r.weighted_total,
                "selection": random_value % r.weighted_total if r.weighted_total else None,
                "header": r.weighted_header or None, "chosen": m.cluster}
    if r is not None and r.action == "cluster_header":
        return {"kind": "cluster_header", "header": r.cluster_header, "chosen": m.cluster}
    return {"kind": "cluster", "chosen": m.cluster}


def _cluster_pick(cfg: Any, m: Any, out: Dict[str, Any]) -> Dict[str, Any]:
    name = m.cluster
    rt = cfg.clusters.get(name)
    info: Dict[str, Any] = {"name": name}
    if rt is None:
        out["outcome"] = "unavailable"
        out["error"] = f"cluster {name!r} not found (Envoy answers {m.cluster_not_found_response_code})"
        return info
    lb = rt.lb
    info["type"] = rt.spec.kind if rt.spec is not None else ""
    info["policy"] = getattr(lb, "policy", None) or (rt.spec.policy if rt.spec is not None else "")
    if lb is None:
        out["outcome"] = "unavailable"
        out["error"] = f"cluster {name!r}: {rt.error}"
        return info
    endpoints = list(lb.endpoints)
    info["endpoints"] = len(endpoints)
    info["ejected"] = sum(1 for ep in endpoints if _ejected(lb, ep))
    if hasattr(lb, "choose"):  # aggregate cluster: a child's balancer picks
        ep, leaf = lb.choose(m.hash)
    else:
        ep, leaf = lb.pick(m.hash), lb
    if ep is None:
        out["outcome"] = "unavailable"
        out["error"] = f"no healthy upstream in cluster {name!r}" + (f" ({rt.error})" if rt.error else "")
        info["picked"] = None
        return info
    try:
        info["picked"] = {"address": ep.key, "health": ep.health.name, "weight": ep.weight, "priority": ep.priority,
                          "locality": "/".join(ep.locality).rstrip("/")}
    finally:
        leaf.release(ep)
    return info


def _ejected(lb: Any, ep: Any) -> bool:
    is_ejected = getattr(lb, "is_ejected", None)
    return bool(is_ejected(ep)) if is_ejected is not None else False


def headers_from_args(values: Sequence[str]) -> List[Tuple[str, str]]:
    """``["name: value", ...]`` (curl's ``-H``) as pairs; raises ``ValueError`` on a bad one."""
    out = []
    for raw in values:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {raw!r} is not 'name: value'")
        out.append((name.strip(), value.strip()))
    return out
