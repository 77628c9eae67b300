"""A deliberately plain interpreter of RBAC filter chains over their proto3-JSON, written from
the semantics (Envoy 1.40 / ``security.md`` §4) without any of the compiler's specialisations:
the property tests compare it with ``RbacEngine`` on thousands of generated configurations, and
the Envoy oracle checks the engine itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import re2

INLINE = {
    # Envoy's inline request headers (header_map.h) and the custom inline ones registered by its
    # extensions, as measured (their repeated values are joined with ",")
    "x-client-trace-id", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node",
    "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout", "x-envoy-internal",
    "x-envoy-ip-tags", "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names", "x-envoy-is-timeout-retry", "x-envoy-original-path", "x-envoy-original-url",
    "x-envoy-upstream-alt-stat-name", "x-envoy-upstream-rq-timeout-alt-response", "expect",
    "x-forwarded-client-cert", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "grpc-timeout", "te",
    "user-agent", "x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms", "x-envoy-max-retries",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-stream-duration-ms", "grpc-accept-encoding", "connection", "content-length",
    "content-type", "x-envoy-decorator-operation", "keep-alive", "proxy-connection", "x-request-id",
    "transfer-encoding", "upgrade", "via",
    "accept", "accept-encoding", "access-control-request-headers", "access-control-request-method",
    "authorization", "cache-control", "cdn-loop", "content-encoding", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "origin", "pragma", "referer",
}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


@dataclass
class Req:
    method: str
    path: str
    authority: Optional[str]
    headers: List[Tuple[str, str]]
    tls: bool
    uris: Sequence[str] = ()
    dns: Sequence[str] = ()
    subject: str = ""
    source: Optional[str] = None
    dest: Optional[str] = None
    port: Optional[int] = None
    sni: Optional[str] = None
    values: Dict[str, List[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.headers:
            k = k.lower()
            if k in HOP_BY_HOP:
                continue
            if k in INLINE and k in self.values:
                if v:  # Envoy's appendToHeader: "" appends nothing, "" so far takes no ","
                    self.values[k][0] = self.values[k][0] + "," + v if self.values[k][0] else v
            else:
                self.values.setdefault(k, []).append(v)
        te = self.values.pop("te", None)
        if te is not None and any(t.strip(" \t\n\v\f\r") == "trailers" for t in ",".join(te).split(",")):
            self.values["te"] = ["trailers"]

    def header(self, name: str) -> Optional[List[str]]:
        name = name.lower()
        if name == "host":
            name = ":authority"
        if name == ":method":
            return [self.method]
        if name == ":path":
            return [self.path]
        if name == ":authority":
            return [self.authority] if self.authority is not None else None
        return self.values.get(name)


def lower(s: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in s)


def string_match(m: Dict[str, Any], s: str) -> bool:
    ic = m.get("ignore_case", False)
    if "safe_regex" in m:
        return re2.fullmatch(m["safe_regex"]["regex"], s) is not None
    for kind in ("exact", "prefix", "suffix", "contains"):
        if kind in m:
            v = m[kind]
            a, b = (lower(s), lower(v)) if ic else (s, v)
            return {"exact": a == b, "prefix": a.startswith(b), "suffix": a.endswith(b), "contains": b in a}[kind]
    raise ValueError(m)


def to_int(s: str) -> Optional[int]:
    t = s.strip(" \t\n\v\f\r")
    if re.fullmatch(r"[+-]?[0-9]+", t) is None:
        return None
    n = int(t)
    return n if -(2**63) <= n < 2**63 else None


_KINDS = ("exact_match", "safe_regex_match", "range_match", "present_match", "prefix_match", "suffix_match",
          "contains_match", "string_match")


def header_match(h: Dict[str, Any], req: Req) -> bool:
    if not any(k in h for k in _KINDS):
        h = {**h, "present_match": True}  # no specifier: Envoy's presence matcher
    values = req.header(h["name"])
    invert = h.get("invert_match", False)
    if values is None:
        if h.get("treat_missing_header_as_empty", False):
            values = [""]
        elif "present_match" in h:
            return (not h["present_match"]) != invert
        else:
            return False
    if "exact_match" in h:
        hit = any(h["exact_match"] == "" or v == h["exact_match"] for v in values)
    elif "safe_regex_match" in h:
        hit = any(re2.fullmatch(h["safe_regex_match"]["regex"], v) is not None for v in values)
    elif "range_match" in h:
        r = h["range_match"]
        hit = any((n := to_int(v)) is not None and int(r.get("start", 0)) <= n < int(r.get("end", 0)) for v in values)
    elif "present_match" in h:
        hit = h["present_match"]
    elif "prefix_match" in h:
        hit = any(v.startswith(h["prefix_match"]) for v in values)
    elif "suffix_match" in h:
        hit = any(v.endswith(h["suffix_match"]) for v in values)
    elif "contains_match" in h:
        hit = any(h["contains_match"] in v for v in values)
    else:
        hit = any(string_match(h["string_match"], v) for v in values)
    return hit != invert


def in_cidr(c: Dict[str, Any], addr: Optional[str]) -> bool:
    if addr is None:
        return False
    a = ipaddress.ip_address(addr)
    base = ipaddress.ip_address(c["address_prefix"])
    if a.version != base.version:
        return False
    n = min(int(c.get("prefix_len", 0)), base.max_prefixlen)
    net = ipaddress.ip_network(f"{c['address_prefix']}/{n}", strict=False)
    return a in net


def remote(req: Req) -> Optional[str]:
    xff = req.values.get("x-forwarded-for")
    if xff:
        v = xff[0]
        comma = v.rfind(",")
        if comma >= 0 and comma + 1 < len(v):
            v = v[comma + 1:]
        v = v.strip(" \t\n\v\f\r")
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            pass
    return req.source


def path_only(p: str) -> str:
    return re.split(r"[?#]", p, maxsplit=1)[0]


def permission(p: Dict[str, Any], req: Req) -> bool:
    (k, v), = p.items()
    if k == "and_rules":
        return all(permission(x, req) for x in v["rules"])
    if k == "or_rules":
        return any(permission(x, req) for x in v["rules"])
    if k == "not_rule":
        return not permission(v, req)
    if k == "any":
        return True
    if k == "header":
        return header_match(v, req)
    if k == "url_path":
        return string_match(v["path"], path_only(req.path))
    if k == "destination_ip":
        return in_cidr(v, req.dest)
    if k == "destination_port":
        return req.port == int(v)
    if k == "destination_port_range":
        return req.port is not None and int(v.get("start", 0)) <= req.port < int(v.get("end", 0))
    if k == "requested_server_name":
        return string_match(v, lower(req.sni or ""))
    if k == "metadata":
        return bool(v.get("invert", False))
    if k == "sourced_metadata":
        return bool(v["metadata_matcher"].get("invert", False))
    raise ValueError(k)


def principal(p: Dict[str, Any], req: Req) -> bool:
    (k, v), = p.items()
    if k == "and_ids":
        return all(principal(x, req) for x in v["ids"])
    if k == "or_ids":
        return any(principal(x, req) for x in v["ids"])
    if k == "not_id":
        return not principal(v, req)
    if k == "any":
        return True
    if k == "authenticated":
        if not req.tls:
            return False
        if "principal_name" not in v:
            return True
        return any(string_match(v["principal_name"], n) for n in [*req.uris, *req.dns, req.subject])
    if k in ("source_ip", "direct_remote_ip"):
        return in_cidr(v, req.source)
    if k == "remote_ip":
        return in_cidr(v, remote(req))
    if k == "header":
        return header_match(v, req)
    if k == "url_path":
        return string_match(v["path"], path_only(req.path))
    if k == "metadata":
        return bool(v.get("invert", False))
    raise ValueError(k)


def first_match(rules: Dict[str, Any], req: Req) -> Optional[str]:
    for name in sorted(rules.get("policies", {}), key=lambda n: n.encode()):
        pol = rules["policies"][name]
        if any(permission(x, req) for x in pol["permissions"]) and any(principal(x, req) for x in pol["principals"]):
            return name
    return None


def result(action: str, name: Optional[str]) -> bool:
    return name is not None if action == "ALLOW" else name is None if action == "DENY" else True


def decide(chain: Sequence[Optional[Dict[str, Any]]], base_prefixes: Sequence[Tuple[str, str]],
           req: Req) -> Tuple[bool, Dict[str, str]]:
    """``(allowed, envoy.filters.http.rbac metadata)`` of a chain of RBAC configs (None: off)."""
    md: Dict[str, str] = {}
    for cfg, (brp, bsp) in zip(chain, base_prefixes):
        if cfg is None:
            continue
        rp = cfg.get("rules_stat_prefix") or brp
        sp = cfg.get("shadow_rules_stat_prefix") or bsp
        if "shadow_rules" in cfg:
            s = cfg["shadow_rules"]
            name = first_match(s, req)
            if name:
                md[sp + "shadow_effective_policy_id"] = name
            md[sp + "shadow_engine_result"] = "allowed" if result(s.get("action", "ALLOW"), name) else "denied"
        if "rules" in cfg:
            r = cfg["rules"]
            name = first_match(r, req)
            ok = result(r.get("action", "ALLOW"), name)
            if name:
                md[rp + "enforced_effective_policy_id"] = name
            md[rp + "enforced_engine_result"] = "allowed" if ok else "denied"
            if not ok:
                return False, md
    return True, md
