"""Generated RBAC configurations and requests for the Envoy differential oracle
(``test_envoy_rbac_oracle.py``) and the engine's own property tests.

Values come from small pools shared by the configuration side and the request side, so
matchers hit, nearly hit and miss in about equal measure: every permission and principal kind,
every header/string matcher kind with ``ignore_case`` / ``invert_match`` /
``treat_missing_header_as_empty``, nesting (and/or/not), ALLOW/DENY/LOG, shadow rules, stat
prefixes, policy names whose byte order differs from their insertion order, and per-route
overrides (replace, RBACPerRoute without rules, FilterConfig disabled, inherit).

Only what Envoy accepts AND meshcore accepts is generated (no CEL, no :scheme/grpc- headers);
header names Envoy's connection manager rewrites for a proxy (x-envoy-*, x-request-id,
x-forwarded-proto, x-forwarded-client-cert) are left out: a proxyless server never sees those
rewrites.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import re2

from .rbac_oracle import DISABLED, Identity, Listener, Request

# -- pools ---------------------------------------------------------------------------------------

TD = "cluster.local"
IDENTITIES: Tuple[Identity, ...] = (
    Identity("client", uris=(f"spiffe://{TD}/ns/default/sa/client",)),
    Identity("frontend", uris=(f"spiffe://{TD}/ns/prod/sa/frontend",), dns=("frontend.prod.svc.cluster.local",)),
    Identity("other_td", uris=("spiffe://other.domain/ns/prod/sa/frontend",)),
    Identity("evie", uris=("spiffe://evie",)),
    Identity("multi", uris=(f"spiffe://{TD}/ns/prod/sa/a", f"spiffe://{TD}/ns/staging/sa/b"),
             dns=("Multi.Example.COM",)),
    Identity("dns_only", dns=("api.example.com", "svc.prod.svc.cluster.local")),
    Identity("subject", subject_attrs=(("O", "Acme Corp"), ("CN", "legacy"))),
    Identity("subject_uri", uris=(f"spiffe://{TD}/ns/default/sa/mixed",), subject_attrs=(("O", "acme"), ("CN", "mixed"))),
)

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
PATHS = ("/", "/api/v1/items", "/api/v1/items?id=3", "/api/v2/users/42?x=1&y=2", "/admin", "/admin/settings",
         "/Admin/Settings", "/healthz", "/static/app.js", "/a%20b/c", "/pkg.Service/Method", "/api/v1/items/",
         "/api//double", "/?only=query", "/x?admin")
AUTHORITIES = ("svc.prod.svc.cluster.local", "svc.prod.svc.cluster.local:8080", "Example.COM", "api.example.com",
               "localhost", "10.0.0.1:80")
HEADER_NAMES = ("x-user", "x-env", "x-tenant", "user-agent", "content-type", "authorization", "accept", "cookie",
                "referer", "x-b3-traceid", "accept-language", "origin", "cache-control", "x-num")
HEADER_VALUES = ("alice", "bob", "Alice", "prod", "staging", "a,b", "", "123", "-5", "42", "+7", "Bearer abc",
                 "curl/8.0", "grpc-python/1.60", "application/json", "application/grpc", "application/grpc+proto",
                 "text/html, application/json", "x", "9223372036854775807", "12abc")
#: Referer values Envoy keeps (its connection manager drops a Referer that is not a valid URI
#: reference, e.g. one with a space or a fragment; meshcore does not emulate that sanitisation)
REFERER_VALUES = ("https://example.com/x", "/relative", "a,b", "alice", "prod", "x", "123", "curl/8.0",
                  "https://example.com/?q=1")
XFF_VALUES = ("10.1.2.3", "10.1.2.3, 192.168.0.7", "garbage", "10.0.0.1,", "::1", "2001:db8::5",
              "172.16.0.1 ,  10.9.8.7", "1.2.3.4:80", "[::1]", "10.1.2.3,bogus", " 192.168.3.4")
TE_VALUES = ("trailers", "Trailers", "gzip, trailers", "gzip", "trailers, deflate", "deflate")
SNIS = (None, "svc.prod.svc.cluster.local", "API.Example.com", "outbound_.8080_._.svc.prod.svc.cluster.local")
SOURCES = ("127.0.0.1", "127.0.0.5", "127.0.1.9", "127.1.2.3")
CIDRS = (("127.0.0.0", 8), ("127.0.0.1", 32), ("127.0.0.0", 24), ("127.0.1.0", 24), ("127.1.0.0", 16),
         ("10.0.0.0", 8), ("10.1.2.3", 32), ("192.168.0.0", 16), ("172.16.0.0", 12), ("::1", 128),
         ("2001:db8::", 32), ("0.0.0.0", 0), ("::", 0), ("127.0.0.2", 31), ("127.0.0.5", 30), ("127.0.0.9", 24),
         ("::", 64), ("::1", 127), ("::ffff:127.0.0.1", 128))
POLICY_NAMES = ("10", "9", "B", "a", "policy-1", "policy-10", "policy-2", "Z", "ns[prod]-policy[x]-rule[0]",
                "ns[prod]-policy[x]-rule[1]", "_", "~")

PRINCIPAL_STRINGS = tuple(
    [u for i in IDENTITIES for u in i.uris] + [d for i in IDENTITIES for d in i.dns]
    + [i.subject for i in IDENTITIES if i.subject_attrs]
    + ["spiffe://cluster.local/", "/sa/client", "spiffe://", "prod", "Acme", ""]
)


def _swapcase(s: str, rng: random.Random) -> str:
    return "".join(c.swapcase() if rng.random() < 0.5 else c for c in s)


def _rx_escape(s: str) -> str:
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", s)


def _regex_ok(pattern: str) -> bool:
    try:
        return re2.compile(pattern).programsize <= 100
    except re2.error:
        return False


@dataclass
class Gen:
    rng: random.Random
    ports: Sequence[int]

    # -- strings ---------------------------------------------------------------------------------

    def string_matcher(self, pool: Sequence[str], *, allow_regex: bool = True) -> Dict[str, Any]:
        r = self.rng
        s = r.choice(pool)
        kind = r.choice(["exact", "exact", "prefix", "suffix", "contains"] + (["safe_regex"] * 2 if allow_regex else []))
        if kind == "safe_regex":
            for _ in range(4):
                pattern = self.regex_for(s)
                if pattern and _regex_ok(pattern):
                    return {"safe_regex": {"regex": pattern}}
            kind = "exact"
        if kind == "exact":
            value = s
        elif not s:
            kind, value = "exact", s
        else:
            i = r.randrange(len(s))
            j = r.randrange(i, len(s)) + 1
            value = s[:j] if kind == "prefix" else s[i:] if kind == "suffix" else s[i:j]
        m: Dict[str, Any] = {kind: value}
        if r.random() < 0.3:
            m["ignore_case"] = True
            if r.random() < 0.5:
                m[kind] = _swapcase(value, r)
        return m

    def regex_for(self, s: str) -> str:
        r = self.rng
        choice = r.randrange(6)
        if not s or choice == 0:
            return r.choice([".*", ".+", "[a-z]+", "(?i)alice|bob", "[0-9]{2,3}", "(|x)"])
        i = r.randrange(len(s))
        j = r.randrange(i, len(s)) + 1
        part = _rx_escape(s[i:j])
        if choice == 1:
            return part + ".*"
        if choice == 2:
            return ".*" + part
        if choice == 3:
            return ".*" + part + ".*"
        if choice == 4:
            return _rx_escape(s)
        return "(?i)" + _rx_escape(s[:j]) + "[^/]*"

    # -- leaves ----------------------------------------------------------------------------------

    def header_matcher(self) -> Dict[str, Any]:
        r = self.rng
        special = r.random()
        if special < 0.12:
            name, pool = ":method", METHODS
        elif special < 0.2:
            name, pool = ":path", PATHS
        elif special < 0.3:
            name, pool = r.choice([":authority", "host", "Host"]), AUTHORITIES
        elif special < 0.34:
            name, pool = "te", ("trailers", "gzip")
        elif special < 0.37:
            name, pool = r.choice(["connection", "keep-alive", "upgrade"]), ("keep-alive", "x")
        elif special < 0.42:
            name, pool = "x-forwarded-for", XFF_VALUES
        else:
            name, pool = r.choice(HEADER_NAMES), HEADER_VALUES
            if r.random() < 0.15:
                name = name.upper() if r.random() < 0.5 else name.title()
        h: Dict[str, Any] = {"name": name}
        kind = r.choice(["exact_match", "exact_match", "safe_regex_match", "range_match", "present_match",
                         "prefix_match", "suffix_match", "contains_match", "string_match", "string_match", None])
        s = r.choice(pool)
        if kind == "exact_match":
            h[kind] = s if r.random() < 0.85 else ""
        elif kind == "safe_regex_match":
            pattern = self.regex_for(s)
            h[kind] = {"regex": pattern if pattern and _regex_ok(pattern) else ".*"}
        elif kind == "range_match":
            a = r.choice([-10, 0, 1, 7, 40, 100, 123])
            h[kind] = {"start": a, "end": a + r.choice([1, 3, 50, 200])}
        elif kind == "present_match":
            h[kind] = r.random() < 0.7
        elif kind in ("prefix_match", "suffix_match", "contains_match"):
            if not s:
                s = "x"
            i = r.randrange(len(s))
            j = r.randrange(i, len(s)) + 1
            h[kind] = s[:j] if kind == "prefix_match" else s[i:] if kind == "suffix_match" else s[i:j]
        elif kind == "string_match":
            h[kind] = self.string_matcher(pool)
        if r.random() < 0.25:
            h["invert_match"] = True
        if r.random() < 0.15:
            h["treat_missing_header_as_empty"] = True
        return h

    def cidr(self) -> Dict[str, Any]:
        a, n = self.rng.choice(CIDRS)
        return {"address_prefix": a, "prefix_len": n}

    def metadata(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {"filter": self.rng.choice(["envoy.filters.http.jwt_authn", "istio_authn"]),
                             "path": [{"key": "sub"}], "value": {"string_match": {"exact": "alice"}}}
        if self.rng.random() < 0.5:
            m["invert"] = True
        return m

    # -- trees ------------------------------------------------------------------------------------

    def permission(self, depth: int = 0) -> Dict[str, Any]:
        r = self.rng
        kinds = ["header", "header", "url_path", "url_path", "destination_ip", "destination_port",
                 "destination_port_range", "requested_server_name", "metadata", "sourced_metadata", "any"]
        if depth < 3:
            kinds += ["and_rules", "or_rules", "not_rule"] * 2
        k = r.choice(kinds)
        if k in ("and_rules", "or_rules"):
            return {k: {"rules": [self.permission(depth + 1) for _ in range(r.randint(1, 3))]}}
        if k == "not_rule":
            return {k: self.permission(depth + 1)}
        if k == "any":
            return {"any": True}
        if k == "header":
            return {"header": self.header_matcher()}
        if k == "url_path":
            return {"url_path": {"path": self.string_matcher([p.split("?")[0] for p in PATHS])}}
        if k == "destination_ip":
            return {"destination_ip": self.cidr()}
        if k == "destination_port":
            return {"destination_port": r.choice(list(self.ports) + [80, 8080])}
        if k == "destination_port_range":
            p = r.choice(self.ports)
            lo = p - r.choice([0, 1, 5000])
            hi = p + r.choice([0, 1, 5000])
            lo, hi = max(0, lo), min(65536, hi)
            if lo >= hi:
                hi = lo + 1
            return {"destination_port_range": {"start": lo, "end": hi}}
        if k == "requested_server_name":
            return {"requested_server_name": self.string_matcher([s or "" for s in SNIS] + ["api.example.com"])}
        if k == "metadata":
            return {"metadata": self.metadata()}
        return {"sourced_metadata": {"metadata_matcher": self.metadata()}}

    def principal(self, depth: int = 0) -> Dict[str, Any]:
        r = self.rng
        kinds = ["authenticated", "authenticated", "authenticated", "source_ip", "direct_remote_ip", "remote_ip",
                 "remote_ip", "header", "url_path", "metadata", "any"]
        if depth < 3:
            kinds += ["and_ids", "or_ids", "not_id"] * 2
        k = r.choice(kinds)
        if k in ("and_ids", "or_ids"):
            return {k: {"ids": [self.principal(depth + 1) for _ in range(r.randint(1, 3))]}}
        if k == "not_id":
            return {k: self.principal(depth + 1)}
        if k == "any":
            return {"any": True}
        if k == "authenticated":
            if r.random() < 0.15:
                return {"authenticated": {}}
            return {"authenticated": {"principal_name": self.string_matcher(PRINCIPAL_STRINGS)}}
        if k in ("source_ip", "direct_remote_ip", "remote_ip"):
            return {k: self.cidr()}
        if k == "header":
            return {"header": self.header_matcher()}
        if k == "url_path":
            return {"url_path": {"path": self.string_matcher([p.split("?")[0] for p in PATHS])}}
        return {"metadata": self.metadata()}

    def rules(self) -> Dict[str, Any]:
        r = self.rng
        names = r.sample(POLICY_NAMES, r.randint(0 if r.random() < 0.05 else 1, 4))
        policies = {n: {"permissions": [self.permission() for _ in range(r.randint(1, 2))],
                        "principals": [self.principal() for _ in range(r.randint(1, 2))]} for n in names}
        action = r.choice(["ALLOW", "ALLOW", "DENY", "DENY", "LOG"])
        return {"action": action, "policies": policies}

    def rbac(self) -> Dict[str, Any]:
        r = self.rng
        cfg: Dict[str, Any] = {}
        if r.random() < 0.9:
            cfg["rules"] = self.rules()
        if r.random() < 0.25:
            cfg["shadow_rules"] = self.rules()
        if r.random() < 0.1:
            cfg["rules_stat_prefix"] = "en_"
        if r.random() < 0.1:
            cfg["shadow_rules_stat_prefix"] = "dry_"
        return cfg

    def case(self, filter_names: Sequence[str]) -> Dict[str, Any]:
        """Per-route overrides: filter name -> RBACPerRoute / FilterConfig; absent: inherit."""
        r = self.rng
        out: Dict[str, Any] = {}
        for name in filter_names:
            x = r.random()
            if x < 0.7:
                out[name] = {"rbac": self.rbac()}
            elif x < 0.8:
                out[name] = DISABLED
            elif x < 0.87:
                out[name] = {}
        return out

    # -- requests ----------------------------------------------------------------------------------

    def request(self, case: int, listeners: Sequence[Listener]) -> Request:
        r = self.rng
        ls = r.choice(listeners)
        ident = r.choice([i.name for i in IDENTITIES] + [None]) if ls.tls else None
        sni = r.choice(SNIS) if ls.tls else None
        headers: List[Tuple[str, str]] = []
        for _ in range(r.choice([0, 1, 1, 2, 3, 4])):
            name = r.choice(HEADER_NAMES)
            if name == "referer" and any(k.lower() == "referer" for k, _ in headers):
                continue  # one Referer only: two join into an invalid URI, which Envoy drops
            if r.random() < 0.2:
                name = name.upper()
            pool = REFERER_VALUES if name.lower() == "referer" else HEADER_VALUES
            headers.append((name, r.choice(pool)))
            if r.random() < 0.25 and name.lower() != "referer":  # a repeated header (two Referers join
                headers.append((name, r.choice(pool)))             # into an invalid URI Envoy drops)
        if r.random() < 0.3:
            headers.append(("x-forwarded-for", r.choice(XFF_VALUES)))
            if r.random() < 0.2:
                headers.append(("X-Forwarded-For", r.choice(XFF_VALUES)))
        if r.random() < 0.15:
            headers.append(("te", r.choice(TE_VALUES)))
        if r.random() < 0.05:
            headers.append(("connection", "keep-alive"))
        r.shuffle(headers)
        source = "::1" if ":" in ls.address else r.choice(SOURCES)
        return Request(case, ls.name, ident, sni, source, r.choice(METHODS), r.choice(PATHS),
                       r.choice(AUTHORITIES), headers)


def generate(seed: int, n_cases: int, requests_per_case: int, listeners: Sequence[Listener],
             filter_names: Sequence[str] = ("f0", "f1", "f2")) -> Tuple[List[Tuple[str, dict]], List[Dict[str, Any]], List[Request]]:
    """``(base filters, cases, requests)`` for one Envoy process."""
    rng = random.Random(seed)
    g = Gen(rng, [ls.port for ls in listeners])
    base = [(n, g.rbac() if rng.random() < 0.7 else {}) for n in filter_names]
    cases = [g.case(filter_names) for _ in range(n_cases)]
    reqs = [g.request(c, listeners) for c in range(n_cases) for _ in range(requests_per_case)]
    return base, cases, reqs


def identity(name: Optional[str]) -> Optional[Identity]:
    for i in IDENTITIES:
        if i.name == name:
            return i
    return None
