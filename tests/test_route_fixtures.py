"""Istio's real RouteConfigurations (tests/fixtures/istio) through meshcore's RouteTable, and
against a real Envoy 1.40.

Fixtures (copied byte for byte, see tests/fixtures/README.md):

* ``istio/http_config.json``: ingress-gateway dump, RouteConfiguration ``http.8080`` (vhost
  ``*:80``: ``path`` /productpage, /login, /logout; ``prefix`` /static, /api/v1/products; Istio
  retry policies with the ``previous_hosts`` predicate);
* ``istio/routes/k8s-gateway-http-route-path-prefix/configdump.json``: a Gateway API HTTPRoute
  (``path_separated_prefix: /get``, ``cluster_not_found_response_code: INTERNAL_SERVER_ERROR``,
  ``ignore_port_in_host_matching``) plus Istio's two static route configs;
* ``istio/config_dump.json``: 5 RouteConfigurations (1 in the RoutesConfigDump, 4 inlined in
  listeners' HttpConnectionManagers);
* ``istio/productpage-v1-7bbd79f8fd-k6j79.json``: a 2019 sidecar dump whose resources are v2
  (``envoy.api.v2.RouteConfiguration``): 26 dynamic, 7 static and 7 listener-inlined route configs.
  :func:`v2_to_v3` converts them (see there) before meshcore or Envoy sees them.

Every ``Any`` is unpacked by its ``@type``.  Envoy 1.40 does not load two things these dumps
carry, so Envoy (and the comparison) gets a minimally changed copy (:func:`for_envoy`):

* the route config's own ``@type`` (an inline ``route_config`` is a message, not an ``Any``);
* name-only ``retry_host_predicate`` entries (the 2019-2022 Istio shape): Envoy 1.40 says
  "Didn't find a registered implementation for 'envoy.retry_host_predicates.previous_hosts'
  with type URL: ''"; the copy adds the ``typed_config`` that current Istio sends (as in the
  k8s-gateway dump).  meshcore accepts both shapes and is checked on both.

Tests without the ``envoy`` marker run on meshcore alone (both twins through conftest's
``impl``): extraction, the fixture README's explicit expectations, the v2 conversion, twin
parity.  Tests marked ``envoy`` start ONE Envoy (one listener per distinct route config) and
compare meshcore's decision for every generated request -- authorities from each config's
domains with and without ports, upper-cased, wrong ports, plus unknown hosts; paths from its
route matchers with near-misses (trailing '/', extra segment, appended character, one
character shorter, case change, query string, fragment) -- with Envoy's, on the fields
``test_envoy_route_oracle.compare`` compares.  Nothing here skips.

Run:  /work/venv/bin/python -m pytest tests/test_route_fixtures.py -q
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Iterable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import HERE, RouteTable, route_table_class  # noqa: E402,F401  (RouteTable: a fixture)
from route_oracle import Decision, Request, RouteOracle, field  # noqa: E402
from test_envoy_route_oracle import describe, disagreements, fail_with, mesh_match  # noqa: E402

ISTIO = os.path.join(HERE, "fixtures", "istio")
ENVOY = pytest.mark.envoy

RC_V3 = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
RC_V2 = "type.googleapis.com/envoy.api.v2.RouteConfiguration"
HCM_NAMES = {"envoy.http_connection_manager", "envoy.filters.network.http_connection_manager"}
HCM_TYPES = {
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "type.googleapis.com/envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager",
}
# Retry host predicates by their well-known name -> the typed_config Envoy 1.40 requires.
RETRY_HOST_PREDICATES = {
    "envoy.retry_host_predicates.previous_hosts":
        "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
    "envoy.retry_host_predicates.omit_canary_hosts":
        "type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate",
}
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PRODUCTPAGE = "outbound|9080||productpage.default.svc.cluster.local"
HTTPBIN = "outbound|8000||httpbin.default.svc.cluster.local"
REVIEWS_VH = "reviews.default.svc.cluster.local:9080"
UNKNOWN_HOSTS = ["unknown.invalid", "unknown.invalid:80", "Unknown.Invalid:9080", "10.255.255.1:9080", "[fd00::1]:8080"]


# --------------------------------------------------------------------------------------------
# Loading: every RouteConfiguration of a /config_dump, unpacked by @type
# --------------------------------------------------------------------------------------------


def _load(rel: str) -> dict:
    with open(os.path.join(ISTIO, rel)) as f:
        return json.load(f)


def _hcm_route_configs(listener: dict) -> Iterable[tuple[str, dict]]:
    """Inline ``route_config`` of every HttpConnectionManager in a Listener (v3 ``typed_config``,
    or v2 ``typed_config`` / ``config`` Struct); ``rds`` ones are in the RoutesConfigDump."""
    chains = list(listener.get("filter_chains", []))
    if "default_filter_chain" in listener:
        chains.append(listener["default_filter_chain"])
    for ci, chain in enumerate(chains):
        for f in chain.get("filters", []):
            tc = f.get("typed_config")
            if isinstance(tc, dict) and tc.get("@type") in HCM_TYPES:
                hcm = tc
            elif f.get("name") in HCM_NAMES and isinstance(f.get("config"), dict):
                hcm = f["config"]
            else:
                continue
            if isinstance(hcm.get("route_config"), dict):
                yield f"listener {listener.get('name')} chain {ci} ({chain.get('name', '')})", hcm["route_config"]


def route_configs(dump: dict) -> list[tuple[str, dict]]:
    """``(where, RouteConfiguration dict as stored)`` for every RouteConfiguration in an admin
    ``/config_dump``: RoutesConfigDump static/dynamic entries (each an ``Any``), then those
    inlined in listeners."""
    out: list[tuple[str, dict]] = []
    for cfg in dump["configs"]:
        if cfg["@type"] == "type.googleapis.com/envoy.admin.v3.RoutesConfigDump":
            for kind in ("static_route_configs", "dynamic_route_configs"):
                for i, entry in enumerate(cfg.get(kind, [])):
                    out.append((f"{kind.split('_')[0]}[{i}]", entry["route_config"]))
    for cfg in dump["configs"]:
        if cfg["@type"] == "type.googleapis.com/envoy.admin.v3.ListenersConfigDump":
            listeners = [s["listener"] for s in cfg.get("static_listeners", [])]
            listeners += [d["active_state"]["listener"] for d in cfg.get("dynamic_listeners", []) if "active_state" in d]
            for ls in listeners:
                out.extend(_hcm_route_configs(ls))
    return out


def _retry_policies(rc: dict) -> Iterable[dict]:
    for vh in field(rc, "virtual_hosts") or []:
        if isinstance(field(vh, "retry_policy"), dict):
            yield field(vh, "retry_policy")
        for r in field(vh, "routes") or []:
            act = field(r, "route")
            if isinstance(act, dict) and isinstance(field(act, "retry_policy"), dict):
                yield field(act, "retry_policy")


def for_envoy(rc: dict) -> dict:
    """The copy Envoy 1.40 loads (and meshcore is compared on): no top-level ``@type``; a
    ``typed_config`` for name-only retry host predicates (see the module doc)."""
    out = copy.deepcopy(rc)
    out.pop("@type", None)
    for rp in _retry_policies(out):
        for p in field(rp, "retry_host_predicate") or []:
            if "typed_config" not in p and "typedConfig" not in p and p.get("name") in RETRY_HOST_PREDICATES:
                p["typed_config"] = {"@type": RETRY_HOST_PREDICATES[p["name"]]}
    return out


def v2_to_v3(rc: dict) -> dict:
    """A v2 ``envoy.api.v2.RouteConfiguration`` dict as v3 where the fields are compatible:

    * ``@type`` dropped (v2 type URL); ``per_filter_config`` (v2 Struct) dropped; entries of
      ``typed_per_filter_config`` dropped unless their type is a v3 extension (here: Istio's
      mixer ``ServiceConfig``, known to no Envoy 1.40);
    * RouteMatch ``regex`` (v2, ECMAScript) -> ``safe_regex`` (RE2; same full-match semantics
      for the simple patterns Istio emitted); HeaderMatcher ``regex_match`` -> ``safe_regex_match``;
    * RouteAction ``use_websocket`` dropped, ``host_rewrite`` -> ``host_rewrite_literal``,
      ``request_mirror_policy`` -> ``request_mirror_policies``;
    * name-only retry host predicates get their v3 ``typed_config`` (:func:`for_envoy`).

    (This dump only needs the first and last items; the others keep the converter honest for
    other 2019 dumps.)  What the conversion leaves must parse as v3: meshcore's parser rejects
    unknown fields, Envoy validates the result."""

    def per_filter(d: dict) -> None:
        d.pop("per_filter_config", None)
        tpfc = d.get("typed_per_filter_config")
        if isinstance(tpfc, dict):
            kept = {k: v for k, v in tpfc.items()
                    if str(v.get("@type", "")).startswith("type.googleapis.com/envoy.extensions.")}
            if kept:
                d["typed_per_filter_config"] = kept
            else:
                del d["typed_per_filter_config"]

    def headers(m: dict) -> None:
        for h in m.get("headers", []):
            if "regex_match" in h:
                h["safe_regex_match"] = {"regex": h.pop("regex_match")}

    out = copy.deepcopy(rc)
    out.pop("@type", None)
    for vh in out.get("virtual_hosts", []):
        per_filter(vh)
        for r in vh.get("routes", []):
            per_filter(r)
            m = r.get("match", {})
            if "regex" in m:
                m["safe_regex"] = {"regex": m.pop("regex")}
            headers(m)
            act = r.get("route")
            if isinstance(act, dict):
                act.pop("use_websocket", None)
                if "host_rewrite" in act:
                    act["host_rewrite_literal"] = act.pop("host_rewrite")
                if "request_mirror_policy" in act:
                    mp = act.pop("request_mirror_policy")
                    mp.pop("runtime_key", None)
                    act["request_mirror_policies"] = [mp]
    return for_envoy(out)


class Cfg:
    """One RouteConfiguration of a fixture: ``stored`` as in the file (``None`` for v2, which
    meshcore rightly refuses as such), ``envoy`` the copy Envoy loads."""

    def __init__(self, ident: str, where: str, stored: dict | None, envoy: dict) -> None:
        self.ident, self.where, self.stored, self.envoy = ident, where, stored, envoy
        self.requests = requests_for(envoy)

    def variants(self) -> list[tuple[str, dict]]:
        """The dicts meshcore is checked on (all must decide like Envoy on ``envoy``)."""
        out = [("as given to Envoy", self.envoy)]
        if self.stored is not None:
            out.insert(0, ("verbatim from the fixture", self.stored))
        return out


# --------------------------------------------------------------------------------------------
# Request generation
# --------------------------------------------------------------------------------------------


def _split_port(host: str) -> tuple[str, str | None]:
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (name.endswith("]") if name.startswith("[") else ":" not in name):
        return name, port
    return host, None


def _domain_host(domain: str) -> str | None:
    """A concrete host a domain pattern matches (None for ``*``)."""
    if domain == "*":
        return None
    if domain.startswith("*"):
        return "w" + domain[1:]
    if domain.endswith("*"):
        return domain[:-1] + "w"
    return domain


def _authorities(domain: str, ports: list[str]) -> list[str]:
    host = _domain_host(domain)
    if host is None:
        return []
    name, port = _split_port(host)
    out = [host, host.upper()]
    if port is not None:
        out += [name, f"{name}:{int(port) + 1}"]
    else:
        out += [f"{name}:{p}" for p in ports]
    return out


def _path_spec(match: dict) -> tuple[str, str] | None:
    for kind in ("prefix", "path", "path_separated_prefix"):
        v = field(match, kind)
        if v is not None:
            return kind, v
    return None  # safe_regex / path_match_policy: no path derived


def _paths(match: dict) -> list[str]:
    spec = _path_spec(match)
    if spec is None:
        return []
    base = spec[1] or "/"
    out = [base, base + "/", base.rstrip("/") + "/x", base + "x", base.upper(), base[:2].upper() + base[2:],
           base + "?q=1", base + "#frag", base[:-1] or "/"]
    return out


def _dedup(items: Iterable[Any]) -> list[Any]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def requests_for(rc: dict) -> list[Request]:
    """Every vhost domain (with/without port, upper-cased, a wrong port) and the unknown hosts,
    each with the first path of its vhost and ``/``; one authority per vhost and the unknown
    hosts with every path derived from the config's route matchers (near-misses included)."""
    vhosts = field(rc, "virtual_hosts") or []
    ports = sorted({p for vh in vhosts for d in field(vh, "domains") for p in [_split_port(d)[1]] if p} | {"80"})[:3]
    all_paths = _dedup(["/", "/unknown-path"] + [p for vh in vhosts for r in field(vh, "routes") or []
                                                   for p in _paths(field(r, "match") or {})])
    pairs: list[tuple[str, str]] = []
    reps = []
    for vh in vhosts:
        routes = field(vh, "routes") or []
        first = _dedup([p for r in routes[:1] for p in _paths(field(r, "match") or {})][:1] + ["/"])
        auths = _dedup(a for d in field(vh, "domains") for a in _authorities(d, ports))
        if not auths:  # "*" only
            auths = ["any-host.example", "any-host.example:80"]
        reps.append(auths[0])
        pairs += [(a, p) for a in auths for p in first]
    pairs += [(a, p) for a in _dedup(reps + UNKNOWN_HOSTS) for p in all_paths]
    return [Request(a, p) for a, p in _dedup(pairs)]


# --------------------------------------------------------------------------------------------
# The fixtures' route configs
# --------------------------------------------------------------------------------------------

HTTP_CONFIG = route_configs(_load("http_config.json"))
K8S_GATEWAY = route_configs(_load("routes/k8s-gateway-http-route-path-prefix/configdump.json"))
CONFIG_DUMP = route_configs(_load("config_dump.json"))
PRODUCTPAGE_V2 = route_configs(_load("productpage-v1-7bbd79f8fd-k6j79.json"))


def _v3_cfgs() -> list[Cfg]:
    out = []
    for tag, found in (("http_config", HTTP_CONFIG), ("k8s-gateway", K8S_GATEWAY), ("config_dump", CONFIG_DUMP)):
        for i, (where, rc) in enumerate(found):
            out.append(Cfg(f"{tag}-{i}", f"istio/{tag} {where} {rc.get('name', '')!r}", rc, for_envoy(rc)))
    return out


def _v2_cfgs() -> list[Cfg]:
    """Distinct converted configs of the productpage dump (the static ones repeat inlined ones)."""
    by_content: dict[str, Cfg] = {}
    for i, (where, rc) in enumerate(PRODUCTPAGE_V2):
        conv = v2_to_v3(rc)
        key = json.dumps(conv, sort_keys=True)
        if key in by_content:
            by_content[key].where += f"; {where}"
        else:
            by_content[key] = Cfg(f"productpage-v2-{i}", f"istio/productpage (v2, converted) {where} {rc.get('name', '')!r}",
                                  None, conv)
    return list(by_content.values())


V3_CFGS = _v3_cfgs()
V2_CFGS = _v2_cfgs()
ALL_CFGS = V3_CFGS + V2_CFGS


def _one(found: list[tuple[str, dict]], name: str) -> dict:
    (rc,) = [rc for _, rc in found if rc.get("name") == name]
    return rc


def _summary(m: Any) -> tuple | None:
    return None if m is None else (m.virtual_host, m.route_name, m.cluster)


# --------------------------------------------------------------------------------------------
# meshcore alone
# --------------------------------------------------------------------------------------------


def test_every_route_configuration_is_extracted() -> None:
    assert [(w, rc.get("@type"), rc.get("name")) for w, rc in HTTP_CONFIG] == [("dynamic[0]", RC_V3, "http.8080")]
    assert [(w, rc.get("@type"), rc.get("name")) for w, rc in K8S_GATEWAY] == [
        ("static[0]", RC_V3, None), ("static[1]", RC_V3, None), ("dynamic[0]", RC_V3, "http.80")]
    # config_dump.json: 5 = the RoutesConfigDump's static one + 4 inlined in HCMs (no @type there:
    # an inline route_config is a message, not an Any)
    assert len(CONFIG_DUMP) == 5
    assert [rc.get("@type") for _, rc in CONFIG_DUMP] == [RC_V3, None, None, None, None]
    assert [rc.get("name") for _, rc in CONFIG_DUMP] == [
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local", None,
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local", "inbound-vip|8100|http|httpbin.default.svc.cluster.local",
        "encap"]
    # the v2 dump: 7 static + 26 dynamic in the RoutesConfigDump, 7 inlined in listeners, all v2
    kinds = [w.split("[")[0].split(" ")[0] for w, _ in PRODUCTPAGE_V2]
    assert (kinds.count("static"), kinds.count("dynamic"), kinds.count("listener")) == (7, 26, 7)
    assert {rc.get("@type") for _, rc in PRODUCTPAGE_V2} == {RC_V2}
    dyn = [rc for w, rc in PRODUCTPAGE_V2 if w.startswith("dynamic")]
    assert sum(len(rc["virtual_hosts"]) for rc in dyn) == 70
    assert sum(len(vh["routes"]) for rc in dyn for vh in rc["virtual_hosts"]) == 70
    assert [len(rc["virtual_hosts"]) for rc in dyn if rc["name"] in ("9080", "80")] == [7, 10]
    assert len(V2_CFGS) == 30  # distinct after conversion
    assert all(len(c.requests) > 20 for c in ALL_CFGS)


def test_route_configs_build(impl: str, RouteTable: Any) -> None:  # noqa: N803
    """Every v3 config builds as stored (``@type`` and name-only predicates included) and as
    given to Envoy; every converted v2 config builds."""
    for c in ALL_CFGS:
        for what, rc in c.variants():
            try:
                RouteTable.from_xds(rc)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"meshcore ({impl}) rejects {c.where} ({what}): {type(e).__name__}: {e}", pytrace=False)


def test_http_config_path_and_prefix(impl: str, RouteTable: Any) -> None:  # noqa: N803
    t = RouteTable.from_xds(_one(HTTP_CONFIG, "http.8080"))
    for host in ("bookinfo.example.com", "1.2.3.4:80", "localhost:8080"):
        for path in ("/productpage", "/productpage?u=normal", "/static/css", "/static", "/staticx", "/static/css/x.css",
                     "/login", "/logout", "/api/v1/products", "/api/v1/products/1/reviews"):
            assert _summary(t.match(host, path)) == ("*:80", "", PRODUCTPAGE), (host, path)
        for path in ("/productpage/x", "/productpage/", "/productpagex", "/Productpage", "/PRODUCTPAGE", "/Static/css",
                     "/login/", "/api/v1", "/", "/unknown"):
            assert t.match(host, path) is None, (host, path)


def _check_istio_retry_policy(rp: Any, retry_on: str) -> None:
    assert rp is not None
    assert rp.retry_on == tuple(retry_on.split(","))
    assert rp.num_retries == 2
    assert rp.retriable_status_codes == (503,)
    assert rp.retry_host_predicates == (PREVIOUS_HOSTS,)
    assert rp.host_selection_retry_max_attempts == 5


def test_istio_retry_policy_is_carried(impl: str, RouteTable: Any) -> None:  # noqa: N803
    on = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    rc = _one(HTTP_CONFIG, "http.8080")
    for cfg in (rc, for_envoy(rc)):  # name-only predicate, and with typed_config
        t = RouteTable.from_xds(cfg)
        for path in ("/productpage", "/static/css", "/login", "/logout", "/api/v1/products/1"):
            m = t.match("bookinfo.example.com", path)
            _check_istio_retry_policy(m.retry_policy, on)
            assert m.timeout is None  # "timeout": "0s" disables it
    m = RouteTable.from_xds(_one(K8S_GATEWAY, "http.80")).match("httpbin.example.com", "/get")
    _check_istio_retry_policy(m.retry_policy, on)
    # v2 dump: same Istio policy (plus resource-exhausted)
    rc9080 = v2_to_v3(_one(PRODUCTPAGE_V2, "9080"))
    m = RouteTable.from_xds(rc9080).match("reviews:9080", "/reviews/1")
    _check_istio_retry_policy(m.retry_policy, on.replace("cancelled,", "cancelled,resource-exhausted,"))
    assert RouteTable.from_xds(rc9080).match("unknown.invalid", "/").retry_policy is None  # allow_any: none


def test_path_separated_prefix(impl: str, RouteTable: Any) -> None:  # noqa: N803
    rc = _one(K8S_GATEWAY, "http.80")
    t = RouteTable.from_xds(rc)
    # ignore_port_in_host_matching: any port of the one domain
    for host in ("httpbin.example.com", "httpbin.example.com:80", "httpbin.example.com:8080", "HTTPBIN.example.com"):
        for path in ("/get", "/get/", "/get/x", "/get/x/y", "/get?a=1", "/get#f", "/get/?a=1"):
            m = t.match(host, path)
            assert _summary(m) == ("httpbin.example.com:80", "default.http.0", HTTPBIN), (host, path)
            assert m.cluster_not_found_response_code == 500  # INTERNAL_SERVER_ERROR
            assert m.timeout is None
        for path in ("/getx", "/get.json", "/ge", "/GET", "/Get/x", "/", "/x/get"):
            assert t.match(host, path) is None, (host, path)
    for host in ("other.example.com", "httpbin.example.org:80", "example.com"):
        assert t.match(host, "/get") is None, host


def test_istio_static_route_configs(impl: str, RouteTable: Any) -> None:  # noqa: N803
    static = [RouteTable.from_xds(rc) for w, rc in K8S_GATEWAY if w.startswith("static")]
    assert _summary(static[0].match("127.0.0.1:15021", "/healthz/ready")) == ("backend", "", "agent")
    assert static[0].match("127.0.0.1:15021", "/stats/prometheus") is None
    assert _summary(static[1].match("x", "/stats/prometheus?filter=istio")) == ("backend", "", "prometheus_stats")
    assert static[1].match("x", "/healthz/ready") is None
    tables = [RouteTable.from_xds(rc) for _, rc in CONFIG_DUMP]
    assert _summary(tables[1].match("10.0.0.1:15021", "/healthz/ready")) == ("backend", "", "agent")
    for t, (vh, cluster) in zip([tables[0], tables[2], tables[3], tables[4]], [
            ("inbound|http|8000", "inbound-vip|8000|http|httpbin.default.svc.cluster.local"),
            ("inbound|http|8000", "inbound-vip|8000|http|httpbin.default.svc.cluster.local"),
            ("inbound|http|8100", "inbound-vip|8100|http|httpbin.default.svc.cluster.local"),
            ("inbound|http|0", "encap")]):
        for host, path in (("httpbin", "/"), ("httpbin.default.svc.cluster.local:8000", "/status/418"), ("[::1]:1", "/x?y")):
            m = t.match(host, path)
            assert _summary(m) == (vh, "default", cluster)
            assert m.timeout is None and m.retry_policy is None


def test_v2_dump_is_refused_as_v2_and_loads_converted(impl: str, RouteTable: Any) -> None:  # noqa: N803
    from meshcore import ConfigError

    rc = _one(PRODUCTPAGE_V2, "9080")
    with pytest.raises(ConfigError, match="envoy.api.v2.RouteConfiguration"):
        RouteTable.from_xds(rc)
    conv = v2_to_v3(rc)
    assert "typed_per_filter_config" not in json.dumps(conv)
    assert '"@type": "type.googleapis.com/envoy.api.v2' not in json.dumps(conv)
    t = RouteTable.from_xds(conv)
    assert _summary(t.match("details:9080", "/details/0")) == (
        "details.default.svc.cluster.local:9080", "default", "outbound|9080||details.default.svc.cluster.local")


def test_v2_service_hosts_select_one_vhost(impl: str, RouteTable: Any) -> None:  # noqa: N803
    """Istio's domain expansion: short name, ``name.ns``, ``.svc``, FQDN and ClusterIP, with and
    without the port, all select the service's vhost; anything else falls to ``allow_any``."""
    t = RouteTable.from_xds(v2_to_v3(_one(PRODUCTPAGE_V2, "9080")))
    want = (REVIEWS_VH, "default", "outbound|9080||reviews.default.svc.cluster.local")
    for host in ("reviews:9080", "reviews.default", "reviews.default.svc.cluster.local:9080", "172.21.95.172:9080",
                 "reviews", "reviews.default:9080", "reviews.default.svc", "reviews.default.svc.cluster:9080",
                 "reviews.default.svc.cluster.local", "172.21.95.172", "REVIEWS:9080", "Reviews.Default"):
        for path in ("/", "/reviews/0", "/health?x=1"):
            assert _summary(t.match(host, path)) == want, (host, path)
    passthrough = ("allow_any", "", "PassthroughCluster")  # the allow_any route has no name
    for host in ("reviews:9081", "reviews:80", "reviews.default.svc.cluster.local:8080", "172.21.95.172:80",
                 "reviews.other", "unknown.invalid", "10.255.255.1:9080", "[fd00::1]:9080", "reviewsx:9080"):
        assert _summary(t.match(host, "/reviews/0")) == passthrough, host
    # the per-service route config (named after the vhost) has the same two vhosts
    t2 = RouteTable.from_xds(v2_to_v3(_one(PRODUCTPAGE_V2, REVIEWS_VH)))
    assert _summary(t2.match("172.21.95.172:9080", "/")) == want
    assert _summary(t2.match("details:9080", "/")) == passthrough
    # every converted dynamic config with an allow_any vhost sends unknown hosts to PassthroughCluster
    dyn = [v2_to_v3(rc) for w, rc in PRODUCTPAGE_V2 if w.startswith("dynamic")]
    assert all(rc["virtual_hosts"][-1]["domains"] == ["*"] for rc in dyn)
    for rc in dyn:
        m = RouteTable.from_xds(rc).match("no-such-service.example:12345", "/anything")
        assert _summary(m) == passthrough, rc["name"]


@pytest.mark.c_extension
def test_twins_agree_on_every_generated_request() -> None:
    c, py = route_table_class("c"), route_table_class("py")
    bad = []
    for cfg in ALL_CFGS:
        for what, rc in cfg.variants():
            tc, tp = c.from_xds(rc), py.from_xds(rc)
            for rq in cfg.requests:
                a, b = describe(mesh_match(tc, rq)), describe(mesh_match(tp, rq))
                if a != b:
                    bad.append(f"{cfg.where} ({what}) {json.dumps(rq.to_json())}: c {a}, py {b}")
    assert not bad, "c and py twins differ:\n" + "\n".join(bad[:10])


# --------------------------------------------------------------------------------------------
# Envoy 1.40
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy_decisions() -> tuple[RouteOracle, dict[str, list[Decision]]]:
    """One Envoy, one listener per distinct config; Envoy's decision for every generated request."""
    oracle = RouteOracle([c.envoy for c in ALL_CFGS], on_invalid="drop")
    with oracle:
        out = {c.ident: oracle.decide_all(c.requests, i) for i, c in enumerate(ALL_CFGS) if i not in oracle.errors}
        assert oracle.upstream_retries() == 0
        yield oracle, out


@ENVOY
def test_envoy_loads_every_fixture_config(envoy_decisions: tuple[RouteOracle, dict]) -> None:
    oracle, decided = envoy_decisions
    bad = {ALL_CFGS[i].where: err[-600:] for i, err in oracle.errors.items()}
    assert not bad, "Envoy 1.40 rejects:\n" + json.dumps(bad, indent=1)
    kinds: dict[str, int] = {}
    for c in ALL_CFGS:
        for rq, d in zip(c.requests, decided[c.ident]):
            assert d.kind in ("route", "no_match"), f"{c.where}: {json.dumps(rq.to_json())}: {d.to_json()}"
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
    assert kinds.get("route", 0) > 1000 and kinds.get("no_match", 0) > 100, kinds


@ENVOY
def test_envoy_rejects_what_for_envoy_changes() -> None:
    """Why :func:`for_envoy` / :func:`v2_to_v3` exist: Envoy 1.40 refuses the stored shapes."""
    rc = copy.deepcopy(_one(HTTP_CONFIG, "http.8080"))
    rc.pop("@type")
    err = RouteOracle.validate(rc) or ""
    assert "Didn't find a registered implementation for 'envoy.retry_host_predicates.previous_hosts'" in err, err[-500:]
    assert RouteOracle.validate(for_envoy(rc)) is None
    # (one vhost: validate() keeps only the end of Envoy's message, which quotes the bootstrap)
    v2 = {"name": "9080", "virtual_hosts": copy.deepcopy(_one(PRODUCTPAGE_V2, "9080")["virtual_hosts"][-1:])}
    assert "typed_per_filter_config" in json.dumps(v2)
    err = RouteOracle.validate(v2) or ""
    assert "could not find @type 'type.googleapis.com/istio.mixer.v1.config.client.ServiceConfig'" in err, err[:500]


@ENVOY
def test_envoy_agrees_with_the_fixture_readme(envoy_decisions: tuple[RouteOracle, dict]) -> None:
    """The README's expectations (asserted on meshcore above) hold in real Envoy."""
    oracle, _ = envoy_decisions
    idx = {c.ident: i for i, c in enumerate(ALL_CFGS)}

    def ask(ident: str, host: str, path: str) -> tuple | None:
        d = oracle.decide(Request(host, path), idx[ident])
        return None if d.kind == "no_match" else (d.kind, d.virtual_host, d.route_name, d.cluster)

    gw = ("route", "*:80", "", PRODUCTPAGE)
    assert ask("http_config-0", "bookinfo.example.com", "/productpage") == gw
    assert ask("http_config-0", "bookinfo.example.com", "/productpage/x") is None
    assert ask("http_config-0", "bookinfo.example.com", "/static/css") == gw
    hb = ("route", "httpbin.example.com:80", "default.http.0", HTTPBIN)
    assert ask("k8s-gateway-2", "httpbin.example.com", "/get") == hb
    assert ask("k8s-gateway-2", "httpbin.example.com:80", "/get/x") == hb
    assert ask("k8s-gateway-2", "httpbin.example.com", "/getx") is None
    (v2_9080,) = [c.ident for c in V2_CFGS if c.envoy.get("name") == "9080"]
    reviews = ("route", REVIEWS_VH, "default", "outbound|9080||reviews.default.svc.cluster.local")
    for host in ("reviews:9080", "reviews.default", "reviews.default.svc.cluster.local:9080", "172.21.95.172:9080"):
        assert ask(v2_9080, host, "/") == reviews, host
    assert ask(v2_9080, "unknown.invalid", "/") == ("route", "allow_any", "", "PassthroughCluster")


@ENVOY
@pytest.mark.parametrize("cfg", ALL_CFGS, ids=[c.ident for c in ALL_CFGS])
def test_fixture_config_matches_envoy(cfg: Cfg, impl: str, RouteTable: Any,  # noqa: N803
                                      envoy_decisions: tuple[RouteOracle, dict]) -> None:
    oracle, decided = envoy_decisions
    if cfg.ident not in decided:
        pytest.fail(f"Envoy 1.40 rejected {cfg.where}: {oracle.errors.get(ALL_CFGS.index(cfg), '')[-600:]}", pytrace=False)
    decisions = decided[cfg.ident]
    for what, rc in cfg.variants():
        # Envoy's vhost/route indices are the same in every variant
        dis = disagreements(RouteTable.from_xds(rc), rc, cfg.requests, decisions)
        if dis:
            fail_with(dis, RouteTable, impl, f"{cfg.where} (meshcore given the config {what}; Envoy given for_envoy() of it)", len(cfg.requests),
                      shrink_first=False)
