"""Seeded generator of RouteConfigurations (proto3-JSON dicts) and requests that hit and
near-miss them. Shared by the c/py parity tests and benchmarks."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Tuple

SEGMENTS = ["api", "v1", "v2", "users", "Users", "static", "img", "a", "b", "login", "x.y", "%2F", "long-segment"]
HEADER_NAMES = ["x-a", "x-b", "X-Canary", "user-agent", "content-type", ":method", ":path", ":authority", ":scheme"]
VALUES = ["1", "2", "10", "-3", " 7 ", "+4", "abc", "ABC", "a,b", "", "application/grpc", "application/grpc+proto",
          "GET", "POST", "http", "https"]


def summary(m: Any) -> Any:
    """A match result as a comparable tuple (None for no match): what the c/py tests compare."""
    if m is None:
        return None
    return (m.virtual_host, m.route_name, m.cluster, m.direct_response, m.redirect, m.timeout, m.hash,
            m.path_rewrite, m.host_rewrite)


def _path(rnd: random.Random) -> str:
    return "/" + "/".join(rnd.choice(SEGMENTS) for _ in range(rnd.randrange(0, 4)))


def _string_matcher(rnd: random.Random) -> Dict[str, Any]:
    kind = rnd.choice(["exact", "prefix", "suffix", "contains", "safe_regex"])
    if kind == "safe_regex":
        return {"safe_regex": {"regex": rnd.choice(["[0-9]+", "a.*", ".*b", "(?i)abc", "[a-z]{1,3}"])}}
    value = rnd.choice([v for v in VALUES if v]) if kind != "exact" else rnd.choice(VALUES)
    out: Dict[str, Any] = {kind: value}
    if rnd.random() < 0.3:
        out["ignore_case"] = True
    return out


def _header_matcher(rnd: random.Random) -> Dict[str, Any]:
    h: Dict[str, Any] = {"name": rnd.choice(HEADER_NAMES)}
    kind = rnd.choice(["exact_match", "prefix_match", "present_match", "range_match", "string_match",
                       "safe_regex_match", "none"])
    if kind == "exact_match":
        h[kind] = rnd.choice(VALUES)
    elif kind == "prefix_match":
        h[kind] = rnd.choice([v for v in VALUES if v])
    elif kind == "present_match":
        h[kind] = rnd.random() < 0.6
    elif kind == "range_match":
        a = rnd.randrange(-5, 10)
        h[kind] = {"start": str(a), "end": str(a + rnd.randrange(1, 8))}
    elif kind == "string_match":
        h[kind] = _string_matcher(rnd)
    elif kind == "safe_regex_match":
        h[kind] = {"regex": rnd.choice(["[0-9]+", "a.*", ".*,.*", "GET|POST"])}
    if rnd.random() < 0.2:
        h["invert_match"] = True
    if rnd.random() < 0.15:
        h["treat_missing_header_as_empty"] = True
    return h


def route_config(seed: int, n_vhosts: int = 4, n_routes: int = 12) -> Dict[str, Any]:
    rnd = random.Random(seed)
    vhosts = []
    used = set()
    for vi in range(n_vhosts):
        domains = []
        for _ in range(rnd.randrange(1, 4)):
            base = rnd.choice(["svc", "api", "www", "shop"]) + str(rnd.randrange(3))
            d = rnd.choice([f"{base}.example.com", f"*.{base}.com", f"{base}.*", f"*-{base}.io",
                            f"{base}.example.com:8080", f"{base.upper()}.Example.com"])
            if d.lower() not in used:
                used.add(d.lower())
                domains.append(d)
        if vi == n_vhosts - 1 and "*" not in used and rnd.random() < 0.7:
            domains.append("*")
            used.add("*")
        if not domains:
            continue
        routes = []
        for ri in range(rnd.randrange(1, n_routes)):
            match: Dict[str, Any] = {}
            kind = rnd.choice(["prefix", "prefix", "path", "safe_regex", "path_separated_prefix"])
            p = _path(rnd)
            if kind == "prefix":
                match["prefix"] = rnd.choice([p, p[:-1] if len(p) > 1 else p, ""])
            elif kind == "path":
                match["path"] = p
            elif kind == "safe_regex":
                match["safe_regex"] = {"regex": rnd.choice(["/api/.*", "/[a-z]+", "/v[0-9]/users.*", ".*img.*"])}
            else:
                q = p.rstrip("/") or "/api"
                match["path_separated_prefix"] = q
            if kind != "safe_regex" and rnd.random() < 0.3:
                match["case_sensitive"] = False
            if rnd.random() < 0.3:
                match["headers"] = [_header_matcher(rnd) for _ in range(rnd.randrange(1, 3))]
            if rnd.random() < 0.15:
                qp: Dict[str, Any] = {"name": rnd.choice(["q", "debug", "Q"])}
                if rnd.random() < 0.5:
                    qp["string_match"] = _string_matcher(rnd)
                else:
                    qp["present_match"] = rnd.random() < 0.7
                match["query_parameters"] = [qp]
            if rnd.random() < 0.1:
                match["runtime_fraction"] = {"default_value": {"numerator": rnd.choice([0, 30, 100]),
                                                               "denominator": "HUNDRED"}}
            if rnd.random() < 0.08:
                match["grpc"] = {}
            route: Dict[str, Any] = {"name": f"r{vi}_{ri}", "match": match}
            action = rnd.random()
            if action < 0.5:
                route["route"] = {"cluster": f"c{rnd.randrange(6)}"}
                if rnd.random() < 0.2:
                    route["route"]["prefix_rewrite"] = "/new"
                if rnd.random() < 0.2:
                    route["route"]["hash_policy"] = [{"header": {"header_name": "x-a"}},
                                                     {"query_parameter": {"name": "q"}, "terminal": True}]
                if rnd.random() < 0.2:
                    route["route"]["timeout"] = rnd.choice(["0s", "2.5s", "30s"])
            elif action < 0.65:
                clusters = [{"name": f"w{i}", "weight": rnd.choice([0, 1, 5, 30])} for i in range(rnd.randrange(1, 4))]
                if not any(c["weight"] for c in clusters):
                    clusters[0]["weight"] = 1
                route["route"] = {"weighted_clusters": {"clusters": clusters}}
                if rnd.random() < 0.5:
                    route["route"]["weighted_clusters"]["header_name"] = "x-pick"
            elif action < 0.72:
                route["route"] = {"cluster_header": "x-cluster"}
            elif action < 0.86:
                route["direct_response"] = {"status": rnd.choice([200, 404, 503]), "body": {"inline_string": f"body{ri}"}}
            else:
                red: Dict[str, Any] = {}
                if rnd.random() < 0.5:
                    red["https_redirect"] = True
                if rnd.random() < 0.3:
                    red["host_redirect"] = "new.example.com"
                if rnd.random() < 0.3:
                    red["port_redirect"] = 8443
                if rnd.random() < 0.3:
                    red["path_redirect"] = "/moved"
                elif rnd.random() < 0.3:
                    red["prefix_rewrite"] = "/p"
                if rnd.random() < 0.3:
                    red["strip_query"] = True
                route["redirect"] = red
            routes.append(route)
        vhosts.append({"name": f"vh{vi}", "domains": domains, "routes": routes})
    cfg: Dict[str, Any] = {"name": f"rc{seed}", "virtual_hosts": vhosts}
    if rnd.random() < 0.3:
        cfg["ignore_port_in_host_matching"] = True
    if rnd.random() < 0.2:
        cfg["ignore_path_parameters_in_path_matching"] = True
    return cfg


def requests(cfg: Dict[str, Any], seed: int, n: int = 60) -> List[Tuple[str, str, List[Tuple[str, str]], str]]:
    rnd = random.Random(seed)
    domains = [d for vh in cfg["virtual_hosts"] for d in vh["domains"]]
    paths = []
    for vh in cfg["virtual_hosts"]:
        for r in vh["routes"]:
            m = r["match"]
            for k in ("prefix", "path", "path_separated_prefix"):
                if k in m:
                    paths.append(m[k])
    out = []
    for _ in range(n):
        d = rnd.choice(domains + ["other.net", "svc0.example.com", "x.api1.com", "api2.foo", "Svc1.Example.Com:8080"])
        d = d.replace("*", rnd.choice(["a", "xy-", "", "q.r"]))
        if rnd.random() < 0.2:
            d += rnd.choice([":80", ":8080", ":443"])
        base = rnd.choice(paths) if paths and rnd.random() < 0.8 else _path(rnd)
        p = base or "/"
        tail = rnd.choice(["", "", "/", "x", "/deeper", "?q=1", "?q=ABC&debug", ";param", "#frag", "?Q=abc&q=zz"])
        p = p + tail
        if rnd.random() < 0.2:
            p = p.upper() if rnd.random() < 0.5 else p.lower()
        if not p.startswith("/"):
            p = "/" + p
        headers = []
        for _ in range(rnd.randrange(0, 4)):
            headers.append((rnd.choice(["x-a", "x-b", "X-Canary", "user-agent", "content-type", "x-pick",
                                        "x-cluster", "X-A"]), rnd.choice(VALUES)))
        method = rnd.choice(["GET", "POST", "GET"])
        out.append((d, p, headers, method))
    return out
