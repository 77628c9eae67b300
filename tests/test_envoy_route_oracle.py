"""Differential tests: meshcore's route matching vs a real Envoy 1.40.

Envoy side: ``route_oracle.RouteOracle`` loads RouteConfigurations into a real Envoy (one
listener each) and reports, per request, the virtual host, route, cluster (weighted entry),
direct response, redirect ``Location``, or no match.  meshcore side:
``RouteTable.from_xds(config).match(authority, path, headers=..., method=..., scheme="http",
random_value=...)`` with the very dict Envoy was given (minus the oracle's instrumentation, which
only adds response headers and a random-value header; see ``route_oracle.py``).

* ``test_harness_*`` / ``test_envoy_*`` / ``test_generator_*`` / ``test_generated_cases_*``:
  Envoy (and the generator) alone.  They check that the harness sees what it should and pin
  the Envoy 1.40 behaviour the route tables must reproduce (``FACTS`` and ``VALIDITY``; a
  failure there means Envoy does not behave as written).
* ``test_facts_meshcore`` / ``test_config_validity_meshcore``: the same FACTS / VALIDITY against
  meshcore (c and py): Envoy's decisions must be reproduced; what Envoy rejects must raise
  ``ConfigError``, what it accepts must load.
* ``test_generated_config_matches_envoy``: ``MESHCORE_ROUTE_ORACLE_CONFIGS`` (default 150)
  configurations from ``route_gen.generate(seed)`` x ``MESHCORE_ROUTE_ORACLE_REQUESTS`` (default
  100) requests, run through one Envoy per 100 configurations, then compared request by request
  with meshcore (c and py).  Seeds start at ``MESHCORE_ROUTE_ORACLE_SEED`` (default 0).
* ``test_golden_*``: Envoy's own router_check_tool goldens (``tests/fixtures/envoy``) against
  real Envoy and against meshcore.

Compared (see :func:`compare`): no match; virtual host and route name; the cluster (for a
weighted pick Envoy makes with its own random value, only membership); what the upstream
received vs ``path_rewrite`` / ``host_rewrite``; ``direct_response``; ``redirect`` and
``redirect_code``; cluster-not-found and ``cluster_not_found_response_code``.  Timeouts, retry
and hash policies are not visible from outside Envoy and are not compared.

A disagreement fails with a self-contained reproduction (config, request, both answers, the
``match(...)`` call and the ``python tests/route_oracle.py`` command), shrunk first while Envoy
still disagrees (vhosts/routes/matchers dropped, re-checked with a fresh Envoy each round;
``MESHCORE_ROUTE_ORACLE_SHRINK_SECONDS`` bounds the time spent per session, default 60).

Nothing here skips: a missing envoy binary or meshcore route table is a failure.

Run:  /work/venv/bin/python -m pytest tests/test_envoy_route_oracle.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from route_gen import (  # noqa: E402
    CLUSTERS,
    Case,
    generate,
    generate_mixed,
    shrink_candidates,
    shrink_request_candidates,
    weighted_selection_value,
)
from route_oracle import (  # noqa: E402
    Decision,
    EnvoyConfigError,
    Request,
    RouteOracle,
    field,
    instrument,
    route_at,
)
from oracle_common import HERE, RouteTable  # noqa: E402,F401  (RouteTable: a fixture)

FIXTURES = os.path.join(HERE, "fixtures", "envoy")

pytestmark = pytest.mark.envoy

N_CONFIGS = int(os.environ.get("MESHCORE_ROUTE_ORACLE_CONFIGS", "150"))
N_REQUESTS = int(os.environ.get("MESHCORE_ROUTE_ORACLE_REQUESTS", "100"))
BASE_SEED = int(os.environ.get("MESHCORE_ROUTE_ORACLE_SEED", "0"))
SEEDS = list(range(BASE_SEED, BASE_SEED + N_CONFIGS))
LISTENERS_PER_ENVOY = 100
_shrink_budget = [float(os.environ.get("MESHCORE_ROUTE_ORACLE_SHRINK_SECONDS", "60"))]


# --------------------------------------------------------------------------------------------
# meshcore side
# --------------------------------------------------------------------------------------------


def _config_error() -> type[BaseException]:
    from meshcore import ConfigError

    return ConfigError


def mesh_headers(req: Request) -> Any:
    """The headers meshcore is asked with: None for a request with neither headers nor a random
    value (the path of a gRPC call or a pick without headers, where the compiled table keeps
    static matches), else the list."""
    return list(req.headers) if req.headers or req.random_value is not None else None


def mesh_match(table: Any, req: Request) -> Any:
    """``table.match`` for a request as the oracle sends it to Envoy's plain-text listener."""
    return table.match(req.authority, req.path, headers=mesh_headers(req), method=req.method, scheme="http",
                       random_value=req.random_value)


def describe(m: Any) -> Any:
    """A JSON-able view of a meshcore match result."""
    if m is None:
        return None
    out = {}
    for k in ("virtual_host", "route_name", "cluster", "direct_response", "redirect", "redirect_code", "path_rewrite",
              "host_rewrite", "timeout", "retry_policy", "hash"):
        try:
            v = getattr(m, k)
        except AttributeError:
            v = "<no such attribute>"
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, tuple):
            v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
        elif v is not None and not isinstance(v, (str, int, float, bool, list, dict)):
            v = repr(v)
        out[k] = v
    return out


def _norm_direct(dr: Any) -> Any:
    if dr is None:
        return None
    status, body = tuple(dr)
    if body is None:
        body = ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return (int(status), body)


def _header_values(req: Request, name: str) -> list[str]:
    return [v for k, v in req.headers if k.lower() == name.lower()]


def compare(config: dict, req: Request, d: Decision, m: Any) -> list[str]:
    """How meshcore's answer ``m`` differs from Envoy's decision ``d`` ([] = agree)."""
    if d.kind == "rejected":
        return [f"Envoy rejected the request before routing ({d.status} {d.details}): a generator/harness bug"]
    if d.kind == "no_match":
        return [] if m is None else ["Envoy: no match; meshcore matched"]
    if m is None:
        return [f"Envoy matched ({d.kind}); meshcore: no match"]
    diffs = []
    if getattr(m, "virtual_host", None) != d.virtual_host:
        diffs.append(f"virtual_host: Envoy {d.virtual_host!r}, meshcore {getattr(m, 'virtual_host', None)!r}")
    if (getattr(m, "route_name", None) or "") != d.route_name:
        diffs.append(f"route_name: Envoy {d.route_name!r}, meshcore {getattr(m, 'route_name', None)!r}")
    cluster = getattr(m, "cluster", None)
    direct = _norm_direct(getattr(m, "direct_response", None))
    redirect = getattr(m, "redirect", None)
    assert d.vhost_index is not None and d.route_index is not None
    _, route = route_at(config, d.vhost_index, d.route_index)
    if d.kind == "route":
        act = field(route, "route") or {}
        wc = field(act, "weighted_clusters")
        hn = field(wc, "header_name") if isinstance(wc, dict) else None
        if isinstance(wc, dict) and (weighted_selection_value(hn, req.headers) is None if hn else req.random_value is None):
            # header_name absent / repeated / unparsable (or, without header_name, no
            # random_value to send as x-oracle-rv): Envoy picks with its own random value.
            allowed = {field(c, "name") for c in field(wc, "clusters") if int(field(c, "weight", 0)) > 0}
            if d.cluster not in allowed:
                diffs.append(f"harness: Envoy picked {d.cluster!r}, not one of {sorted(allowed)}")
            if cluster not in allowed:
                diffs.append(f"cluster: Envoy picks at random among {sorted(allowed)} (its stream id); meshcore {cluster!r}")
        elif cluster != d.cluster:
            diffs.append(f"cluster: Envoy {d.cluster!r}, meshcore {cluster!r}")
        if direct is not None or redirect is not None:
            diffs.append(f"Envoy proxies; meshcore has direct_response={direct!r} redirect={redirect!r}")
        # What the upstream received (rewrites applied).  meshcore: None = unchanged.
        if d.upstream_path is not None:
            pr = getattr(m, "path_rewrite", None)
            want_path = req.path.split("#", 1)[0] if pr is None else pr
            if want_path != d.upstream_path:
                diffs.append(f"upstream path: Envoy sent {d.upstream_path!r}, meshcore path_rewrite {pr!r}")
            hr = getattr(m, "host_rewrite", None)
            if (req.authority if hr is None else hr) != d.upstream_host:
                diffs.append(f"upstream host: Envoy sent {d.upstream_host!r}, meshcore host_rewrite {hr!r}")
    elif d.kind == "cluster_not_found":
        act = field(route, "route") or {}
        ch = field(act, "cluster_header")
        want = (_header_values(req, ch) or [""])[0] if ch else None
        ok = cluster == want or (want == "" and cluster is None)
        if not ok or (cluster in CLUSTERS):
            diffs.append(f"cluster: Envoy found no cluster named {want!r} (503 NC); meshcore {cluster!r}")
        if getattr(m, "cluster_not_found_response_code", None) != d.status:
            diffs.append(f"cluster_not_found_response_code: Envoy answered {d.status}, "
                         f"meshcore {getattr(m, 'cluster_not_found_response_code', None)!r}")
    elif d.kind == "direct_response":
        if direct != d.direct_response:
            diffs.append(f"direct_response: Envoy {d.direct_response!r}, meshcore {direct!r}")
        if cluster is not None or redirect is not None:
            diffs.append(f"Envoy answers directly; meshcore has cluster={cluster!r} redirect={redirect!r}")
    elif d.kind == "redirect":
        if redirect != d.redirect:
            diffs.append(f"redirect: Envoy {d.redirect!r} ({d.status}), meshcore {redirect!r}")
        if getattr(m, "redirect_code", None) != d.status:
            diffs.append(f"redirect_code: Envoy {d.status}, meshcore {getattr(m, 'redirect_code', None)!r}")
        if cluster is not None or direct is not None:
            diffs.append(f"Envoy redirects; meshcore has cluster={cluster!r} direct_response={direct!r}")
    else:
        diffs.append(f"unknown Envoy decision kind {d.kind}")
    return diffs


# --------------------------------------------------------------------------------------------
# Reproductions (shrunk with a real Envoy)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Disagreement:
    config: dict
    request: Request
    envoy: Decision
    meshcore: Any
    diffs: list[str]
    error: str | None = None  # meshcore raised


def disagreements(table: Any, config: dict, requests: list[Request], decisions: list[Decision]) -> list[Disagreement]:
    """Where ``table`` (built from ``config``) differs from Envoy's decisions, request by request
    (meshcore raising on a request counts as a disagreement)."""
    dis = []
    for rq, d in zip(requests, decisions):
        try:
            m = mesh_match(table, rq)
        except Exception as e:  # noqa: BLE001
            dis.append(Disagreement(config, rq, d, None, [f"meshcore raised {type(e).__name__}: {e}"], error=repr(e)))
            continue
        diffs = compare(config, rq, d, m)
        if diffs:
            dis.append(Disagreement(config, rq, d, m, diffs))
            continue
        if mesh_headers(rq) is None:  # asked again: answered from what the table kept, if anything
            m = mesh_match(table, rq)
            diffs = compare(config, rq, d, m)
            if diffs:
                dis.append(Disagreement(config, rq, d, m, ["(asked again) " + x for x in diffs]))
    return dis


def _evaluate(table_cls: Any, config: dict, req: Request, d: Decision) -> Disagreement | None:
    try:
        m = mesh_match(table_cls.from_xds(config), req)
    except Exception as e:  # noqa: BLE001  (reported, not swallowed)
        return Disagreement(config, req, d, None, [f"meshcore raised {type(e).__name__}: {e}"], error=repr(e))
    diffs = compare(config, req, d, m)
    return Disagreement(config, req, d, m, diffs) if diffs else None


def _keep_indices(dis: Disagreement) -> list[tuple[int, int]]:
    keep = []
    if dis.envoy.vhost_index is not None:
        keep.append((dis.envoy.vhost_index, dis.envoy.route_index))
    m = dis.meshcore
    if m is not None:
        for vi, vh in enumerate(field(dis.config, "virtual_hosts") or []):
            if field(vh, "name") == getattr(m, "virtual_host", object()):
                for ri, r in enumerate(field(vh, "routes") or []):
                    if field(r, "name", "") == getattr(m, "route_name", object()) and field(r, "name", ""):
                        keep.append((vi, ri))
    return keep


def _weight(config: dict, req: Request) -> tuple[int, int]:
    return (len(json.dumps(config)), len(json.dumps(req.to_json())))


def shrink(table_cls: Any, dis: Disagreement, max_candidates: int = 150, max_rounds: int = 30) -> tuple[Disagreement, int, int]:
    """Greedy shrinking: each round builds every one-step reduction of the config (and request),
    has ONE fresh Envoy decide them all, and keeps the smallest that still disagrees.  Returns
    the smallest disagreement found, the number of rounds and of Envoy-checked candidates."""
    rounds = checked = 0
    while _shrink_budget[0] > 0 and rounds < max_rounds:
        t0 = time.monotonic()
        here = _weight(dis.config, dis.request)
        cands: list[tuple[dict, Request]] = [(c, dis.request) for c in shrink_candidates(dis.config, _keep_indices(dis))]
        cands += [(dis.config, r) for r in shrink_request_candidates(dis.request)]
        usable, seen = [], set()
        for c, r in cands:
            key = json.dumps([c, r.to_json()], sort_keys=True)
            if key in seen or _weight(c, r) >= here:
                continue
            seen.add(key)
            try:
                table_cls.from_xds(c)
            except Exception:  # noqa: BLE001  (a candidate meshcore rejects is not a reduction)
                continue
            usable.append((c, r))
        usable = usable[:max_candidates]
        best = None
        if usable:
            with RouteOracle([c for c, _ in usable], extra_clusters=CLUSTERS, on_invalid="drop") as oracle:
                for i, (c, r) in enumerate(usable):
                    if i in oracle.errors:
                        continue
                    checked += 1
                    d = oracle.decide(r, i)
                    if d.kind == "rejected":
                        continue
                    found = _evaluate(table_cls, c, r, d)
                    if found is not None and found.error is None:
                        if best is None or _weight(c, r) < _weight(best.config, best.request):
                            best = found
        _shrink_budget[0] -= time.monotonic() - t0
        rounds += 1
        if best is None:
            break
        dis = best
    return dis, rounds, checked


def _size(config: dict) -> str:
    vhs = field(config, "virtual_hosts") or []
    return f"{len(vhs)} vhost(s), {sum(len(field(v, 'routes') or []) for v in vhs)} route(s)"


def reproduction(dis: Disagreement, impl: str) -> str:
    req = dis.request
    call = (
        f"RouteTable.from_xds(config).match({req.authority!r}, {req.path!r}, "
        f"headers={None if mesh_headers(req) is None else [list(h) for h in req.headers]!r}, "
        f"method={req.method!r}, scheme='http', random_value={req.random_value!r})"
    )
    cli = ["python tests/route_oracle.py -X", req.method]
    cli += [f"-H {json.dumps(f'{k}: {v}')}" for k, v in req.headers]
    if req.random_value is not None:
        cli.append(f"--random-value {req.random_value}")
    cli += ["-- config.json", json.dumps(req.authority), json.dumps(req.path)]
    return "\n".join(
        [
            f"config ({_size(dis.config)}) = {json.dumps(dis.config, sort_keys=True)}",
            f"request = {json.dumps(req.to_json())}",
            f"Envoy 1.40: {json.dumps(dis.envoy.brief())}"
            + (f"  [upstream path {dis.envoy.upstream_path!r}]" if dis.envoy.upstream_path else ""),
            f"meshcore ({impl}): {json.dumps(describe(dis.meshcore), default=repr)}",
            "differences: " + "; ".join(dis.diffs),
            f"meshcore call: {call}",
            f"Envoy by hand (config above saved as config.json): {' '.join(cli)}",
        ]
    )


def fail_with(dis_list: list[Disagreement], table_cls: Any, impl: str, what: str, total: int, shrink_first: bool = True) -> None:
    first = dis_list[0]
    parts = [f"meshcore ({impl}) disagrees with Envoy 1.40 on {len(dis_list)} of {total} requests of {what}."]
    if shrink_first and _shrink_budget[0] > 0 and first.error is None:
        small, rounds, checked = shrink(table_cls, first)
        parts.append(
            f"\nMinimal reproduction (shrunk from {_size(first.config)} in {rounds} round(s), "
            f"{checked} candidates re-decided by Envoy):\n" + reproduction(small, impl)
        )
        if small is not first:
            parts.append("\nOriginal:\n" + reproduction(first, impl))
    else:
        why = "shrink budget used up" if shrink_first and _shrink_budget[0] <= 0 else "not shrunk"
        parts.append(f"\nReproduction ({why}):\n" + reproduction(first, impl))
    for dis in dis_list[1:6]:
        parts.append(
            f"\nalso: request {json.dumps(dis.request.to_json())}: Envoy {json.dumps(dis.envoy.brief())}, "
            f"meshcore {json.dumps(describe(dis.meshcore), default=repr)}: " + "; ".join(dis.diffs)
        )
    if len(dis_list) > 6:
        parts.append(f"\n... and {len(dis_list) - 6} more")
    pytest.fail("\n".join(parts), pytrace=False)


# --------------------------------------------------------------------------------------------
# 1. The harness on its own
# --------------------------------------------------------------------------------------------


def _ident(text: str) -> str:
    return re.sub(r"\W+", "-", text).strip("-")


def _vh(name: str, domains: list[str], *routes: dict, **kw: Any) -> dict:
    return {"name": name, "domains": domains, "routes": list(routes), **kw}


def _rt(name: str | None, match: dict, cluster: str | None = None, **kw: Any) -> dict:
    r: dict[str, Any] = {"match": match}
    if name is not None:
        r["name"] = name
    if cluster is not None:
        r["route"] = {"cluster": cluster}
    r.update(kw)
    return r


HARNESS_CONFIG = {
    "name": "harness",
    "virtual_hosts": [
        _vh(
            "main", ["main.test", "*.main.test"],
            _rt("to-alpha", {"path": "/alpha"}, "alpha"),
            _rt("weighted", {"prefix": "/w"}, route={"weighted_clusters": {"clusters": [
                {"name": "beta", "weight": 1}, {"name": "gamma", "weight": 2}, {"name": "delta", "weight": 0}]}}),
            _rt("by-header", {"prefix": "/ch"}, route={"cluster_header": "x-cluster"}),
            _rt("teapot", {"prefix": "/tea"}, direct_response={"status": 418, "body": {"inline_string": "short and stout"}}),
            _rt("moved", {"prefix": "/old"}, redirect={"https_redirect": True, "prefix_rewrite": "/new", "response_code": "FOUND"}),
            _rt(None, {"prefix": "/unnamed"}, "zeta"),
            _rt("rewrite", {"prefix": "/rw/"}, route={"cluster": "epsilon", "prefix_rewrite": "/up/", "host_rewrite_literal": "up.test"}),
        ),
        _vh("other", ["other.test:8080"], _rt("other-root", {"prefix": "/"}, "beta")),
    ],
}


@pytest.fixture(scope="module")
def harness_oracle():
    with RouteOracle([HARNESS_CONFIG], extra_clusters=CLUSTERS) as oracle:
        yield oracle


def test_harness_sees_each_kind_of_decision(harness_oracle: RouteOracle) -> None:
    o = harness_oracle
    d = o.decide(Request("main.test", "/alpha"))
    assert (d.kind, d.virtual_host, d.route_name, d.cluster, d.upstream_path) == ("route", "main", "to-alpha", "alpha", "/alpha"), d

    # weighted: the oracle's x-oracle-rv header makes the pick random_value % 3 over [beta, gamma x2]
    picks = [o.decide(Request("x.main.test", "/w", random_value=v)) for v in range(6)]
    assert [(p.cluster, p.weighted_index) for p in picks] == [("beta", 0), ("gamma", 1), ("gamma", 1)] * 2, picks

    d = o.decide(Request("main.test", "/ch", headers=(("x-cluster", "delta"),)))
    assert (d.kind, d.route_name, d.cluster) == ("route", "by-header", "delta"), d
    d = o.decide(Request("main.test", "/ch", headers=(("x-cluster", "no-such-cluster"),)))
    assert (d.kind, d.route_name, d.cluster, d.status, d.flags) == ("cluster_not_found", "by-header", None, 503, "NC"), d

    d = o.decide(Request("main.test", "/teapot"))
    assert (d.kind, d.route_name, d.direct_response) == ("direct_response", "teapot", (418, "short and stout")), d
    # the same for a gRPC request (Envoy turns the local reply into 200 + grpc-status)
    d = o.decide(Request("main.test", "/teapot", headers=(("content-type", "application/grpc"),)))
    assert (d.kind, d.direct_response, d.http_status, d.grpc_status) == ("direct_response", (418, "short and stout"), 200, "2"), d

    d = o.decide(Request("Main.Test", "/old/x?y=1"))
    assert (d.kind, d.route_name, d.status, d.redirect) == ("redirect", "moved", 302, "https://Main.Test/new/x?y=1"), d

    d = o.decide(Request("main.test", "/unnamed/1"))
    assert (d.kind, d.route_name, d.cluster) == ("route", "", "zeta"), d

    d = o.decide(Request("main.test", "/rw/a?b"))
    assert (d.cluster, d.upstream_path, d.upstream_host) == ("epsilon", "/up/a?b", "up.test"), d

    d = o.decide(Request("main.test", "/nothing-here"))  # vhost matches, no route
    assert (d.kind, d.status, d.flags, d.virtual_host, d.route_name) == ("no_match", 404, "NR", None, None), d
    d = o.decide(Request("nowhere.test", "/alpha"))  # no vhost
    assert (d.kind, d.status, d.flags) == ("no_match", 404, "NR"), d
    d = o.decide(Request("other.test", "/"))  # the port is part of the host
    assert d.kind == "no_match", d
    d = o.decide(Request("other.test:8080", "/"))
    assert (d.virtual_host, d.route_name, d.cluster) == ("other", "other-root", "beta"), d
    d = o.decide(Request("main.test", "/nothing", headers=(("content-type", "application/grpc"),)))
    assert (d.kind, d.status, d.http_status, d.grpc_status) == ("no_match", 404, 200, "12"), d
    d = o.decide(Request("main.test", "/ch", headers=(("content-type", "application/grpc"),)))
    assert (d.kind, d.status, d.http_status, d.grpc_status) == ("cluster_not_found", 503, 200, "14"), d

    # fragments are stripped (runtime flag set by the oracle), not answered with 400
    d = o.decide(Request("main.test", "/alpha#frag"))
    assert (d.route_name, d.upstream_path) == ("to-alpha", "/alpha"), d
    # a request Envoy's codec refuses is reported as such
    d = o.decide(Request("main.test", "/a b"))
    assert (d.kind, d.status, d.details) == ("rejected", 400, "http1.codec_error"), d
    assert o.requests_sent > 20
    assert o.upstream_retries() == 0


def test_harness_default_envoy_rejects_fragments() -> None:
    with RouteOracle([HARNESS_CONFIG], extra_clusters=CLUSTERS, reject_fragment=True) as o:
        d = o.decide(Request("main.test", "/alpha#frag"))
        assert (d.kind, d.status) == ("rejected", 400), d
        assert o.decide(Request("main.test", "/alpha")).route_name == "to-alpha"


def test_harness_reports_invalid_configs() -> None:
    bad = {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"prefix": "/", "headers": [
        {"name": "x", "string_match": {"safe_regex": {"regex": "a"}, "ignore_case": True}}]}, "alpha"))]}
    assert "ignore_case has no effect for safe_regex" in (RouteOracle.validate(bad) or "")
    assert RouteOracle.validate(HARNESS_CONFIG) is None
    with pytest.raises(EnvoyConfigError) as ei:
        RouteOracle([HARNESS_CONFIG, bad]).start()
    assert set(ei.value.errors) == {1}
    with RouteOracle([bad, HARNESS_CONFIG], extra_clusters=CLUSTERS, on_invalid="drop") as o:
        assert set(o.errors) == {0}
        assert o.decide(Request("main.test", "/alpha"), config=1).cluster == "alpha"


def test_harness_instrumentation_only_adds_headers() -> None:
    """The copy Envoy gets differs from the config only by response headers and, for weighted
    clusters without one, ``header_name``; camelCase configs are instrumented in place."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in ("response_headers_to_add", "responseHeadersToAdd"):
                    v = [h for h in v if not h["header"]["key"].startswith("x-oracle-")]
                    if not v:
                        continue
                if k in ("header_name", "headerName") and v == "x-oracle-rv":
                    continue
                out[k] = strip(v)
            return out
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    for seed in range(20):
        case = generate(seed, 0)
        assert strip(instrument(case.config)) == case.config
    assert strip(instrument(HARNESS_CONFIG)) == HARNESS_CONFIG


# --------------------------------------------------------------------------------------------
# 2. Envoy 1.40 facts (each one checked against Envoy here, and against meshcore below)
# --------------------------------------------------------------------------------------------

H = lambda *pairs: tuple(pairs)  # noqa: E731

# (name, RouteConfiguration, [(request, expected)]); expected: "route->cluster", "route:status",
# "route:status location", "route:NC", "NR" (no match) -- see short().
FACTS: list[tuple[str, dict, list[tuple[Request, str]]]] = [
    ("multi-valued headers are matched value by value", {"virtual_hosts": [_vh("v", ["*"],
        _rt("joined", {"prefix": "/", "headers": [{"name": "x-m", "string_match": {"exact": "1,2"}}]}, "alpha"),
        _rt("regex-comma", {"prefix": "/", "headers": [{"name": "x-m", "safe_regex_match": {"regex": ".*,.*"}}]}, "alpha"),
        _rt("inv1", {"prefix": "/", "headers": [{"name": "x-m", "string_match": {"exact": "1"}, "invert_match": True}]}, "alpha"),
        _rt("range", {"prefix": "/", "headers": [{"name": "x-m", "range_match": {"start": 2, "end": 3}}]}, "alpha"),
        _rt("fallback", {"prefix": "/"}, "beta"))]},
     [(Request("h", "/", headers=H(("x-m", "1"), ("x-m", "2"))), "range->alpha"),
      (Request("h", "/", headers=H(("x-m", "1,2"))), "joined->alpha"),
      (Request("h", "/", headers=H(("x-m", "3"), ("x-m", "2"))), "inv1->alpha"),
      (Request("h", "/", headers=H(("X-M", "1"), ("x-m", "1"))), "fallback->beta")]),
    ("fragment stripped before matching, :path included", {"virtual_hosts": [_vh("v", ["*"],
        _rt("exact-a", {"path": "/a", "headers": [{"name": ":path", "string_match": {"exact": "/a"}}]}, "alpha"),
        _rt("pathq", {"prefix": "/", "headers": [{"name": ":path", "string_match": {"contains": "?"}}]}, "beta"),
        _rt("any", {"prefix": "/"}, "gamma"))]},
     [(Request("h", "/a#b"), "exact-a->alpha"), (Request("h", "/a#"), "exact-a->alpha"),
      (Request("h", "/a?x#b"), "pathq->beta"), (Request("h", "/a#?x"), "exact-a->alpha")]),
    ("grpc content types", {"virtual_hosts": [_vh("v", ["*"], _rt("g", {"prefix": "/", "grpc": {}}, "alpha"))]},
     [(Request("h", "/", headers=H(("content-type", ct))), exp) for ct, exp in [
         ("application/grpc", "g->alpha"), ("application/grpc+proto", "g->alpha"), ("application/grpc+", "g->alpha"),
         ("application/grpc;charset=utf-8", "NR"), ("application/grpc-web", "NR"), ("Application/grpc", "NR"),
         ("application/json", "NR")]] + [(Request("h", "/"), "NR")]),
    ("legacy exact_match '' matches any present value", {"virtual_hosts": [_vh("v", ["*"],
        _rt("e", {"prefix": "/", "headers": [{"name": "x-e", "exact_match": ""}]}, "alpha"), _rt("f", {"prefix": "/"}, "beta"))]},
     [(Request("h", "/", headers=H(("x-e", "zzz"))), "e->alpha"), (Request("h", "/", headers=H(("x-e", ""))), "e->alpha"),
      (Request("h", "/"), "f->beta")]),
    ("string_match exact '' matches only the empty value", {"virtual_hosts": [_vh("v", ["*"],
        _rt("e", {"prefix": "/", "headers": [{"name": "x-e", "string_match": {"exact": ""}}]}, "alpha"), _rt("f", {"prefix": "/"}, "beta"))]},
     [(Request("h", "/", headers=H(("x-e", "zzz"))), "f->beta"), (Request("h", "/", headers=H(("x-e", ""))), "e->alpha"),
      (Request("h", "/"), "f->beta")]),
    ("query parameters", {"virtual_hosts": [_vh("v", ["*"],
        _rt("absent", {"path": "/abs", "query_parameters": [{"name": "k", "present_match": False}]}, "alpha"),
        _rt("present", {"path": "/p", "query_parameters": [{"name": "k", "present_match": True}]}, "alpha"),
        _rt("empty", {"path": "/e", "query_parameters": [{"name": "k", "string_match": {"exact": ""}}]}, "alpha"),
        _rt("first", {"path": "/f", "query_parameters": [{"name": "k", "string_match": {"exact": "1"}}]}, "alpha"),
        _rt("decoded", {"path": "/pct", "query_parameters": [{"name": "k", "string_match": {"exact": "a b"}}]}, "alpha"),
        _rt("raw", {"path": "/pct", "query_parameters": [{"name": "k", "string_match": {"exact": "a%20b"}}]}, "beta"),
        _rt("nospec", {"path": "/ns", "query_parameters": [{"name": "k"}]}, "alpha"),
        _rt("any", {"prefix": "/"}, "gamma"))]},
     [(Request("h", "/abs"), "absent->alpha"), (Request("h", "/abs?k"), "any->gamma"), (Request("h", "/abs?K=1"), "absent->alpha"),
      (Request("h", "/p?k"), "present->alpha"), (Request("h", "/e?k"), "empty->alpha"), (Request("h", "/e?k="), "empty->alpha"),
      (Request("h", "/f?k=1&k=2"), "first->alpha"), (Request("h", "/f?k=2&k=1"), "any->gamma"),
      (Request("h", "/pct?k=a%20b"), "raw->beta"), (Request("h", "/ns?k=x"), "nospec->alpha"), (Request("h", "/ns"), "any->gamma"),
      (Request("h", "/p?x=1&k"), "present->alpha"), (Request("h", "/p?&k=1"), "present->alpha"), (Request("h", "/p?k=1=2"), "present->alpha")]),
    ("paths are not normalised", {"virtual_hosts": [_vh("v", ["*"],
        _rt("a", {"prefix": "/a/"}, "alpha"), _rt("pct", {"path": "/%61"}, "gamma"), _rt("sl", {"path": "/x//y"}, "gamma"),
        _rt("params", {"path": "/p"}, "alpha"), _rt("any", {"prefix": "/"}, "delta"))]},
     [(Request("h", "/a/../b"), "a->alpha"), (Request("h", "/%61"), "pct->gamma"), (Request("h", "/a"), "any->delta"),
      (Request("h", "/x//y"), "sl->gamma"), (Request("h", "/p;x=1"), "any->delta"), (Request("h", "/A/"), "any->delta")]),
    # NOTE: ';params' are removed from EVERY segment (not "cut at the first ';'"); header
    # matchers on :path and the upstream path still see them.
    ("ignore_path_parameters_in_path_matching", {"ignore_path_parameters_in_path_matching": True, "virtual_hosts": [_vh("v", ["*"],
        _rt("params", {"path": "/p/q"}, "alpha"), _rt("dq", {"path": "//q"}, "alpha"), _rt("root", {"path": "/"}, "alpha"),
        _rt("hdr", {"prefix": "/h", "headers": [{"name": ":path", "string_match": {"contains": ";"}}]}, "beta"),
        _rt("rx", {"safe_regex": {"regex": "/r/[a-z]+"}}, "gamma"), _rt("any", {"prefix": "/"}, "delta"))]},
     [(Request("h", p), exp) for p, exp in [
         ("/p;x=1/q", "params->alpha"), ("/p/q;y", "params->alpha"), ("/p/q;y?z=1", "params->alpha"), ("/p;x/q;y", "params->alpha"),
         ("/p;a;b/q", "params->alpha"), ("/p;/q", "params->alpha"), ("/;x/q", "dq->alpha"), ("/;x", "root->alpha"),
         ("/h;x", "hdr->beta"), ("/r/ab;c", "rx->gamma"), ("/r/a;b/c", "any->delta"), ("/p%3Bx/q", "any->delta"),
         ("/p;x=1/q#f;g", "params->alpha")]]),
    ("virtual host selection", {"virtual_hosts": [
        _vh("exact", ["a.com", "B.COM"], _rt("e", {"prefix": "/"}, "alpha")),
        _vh("suffix", ["*.x.com", "*-y.io"], _rt("s", {"prefix": "/"}, "beta")),
        _vh("prefix", ["api.*", "z.com:*"], _rt("p", {"prefix": "/"}, "gamma")),
        _vh("suffixlong", ["*.a.x.com"], _rt("sl", {"prefix": "/"}, "delta")),
        _vh("auth", ["hdr.com"], _rt("au", {"prefix": "/", "headers": [{"name": ":authority", "string_match": {"exact": "HDR.com"}}]}, "epsilon"))]},
     [(Request(h, "/"), exp) for h, exp in [
         ("a.com", "e->alpha"), ("A.Com", "e->alpha"), ("b.com", "e->alpha"), ("a.com:80", "NR"), ("q.x.com", "s->beta"),
         (".x.com", "NR"), ("x.com", "NR"), ("b.a.x.com", "sl->delta"), ("api.x.com", "s->beta"), ("api.zzz", "p->gamma"),
         ("api.", "NR"), ("z.com:1", "p->gamma"), ("HDR.com", "au->epsilon"), ("hdr.com", "NR"), ("a.com.", "NR"),
         ("q-y.io", "s->beta"), ("-y.io", "NR"), ("q.x.com:80", "NR"), ("", "NR")]]),
    # NOTE: whatever follows the last ':' (outside [...]) is cut, numeric or not, even empty.
    ("ignore_port_in_host_matching", {"ignore_port_in_host_matching": True, "virtual_hosts": [
        _vh("exact", ["a.com", "b.com:8080"], _rt("e", {"prefix": "/"}, "alpha")),
        _vh("v6", ["[::1]", "::1"], _rt("v6", {"prefix": "/"}, "beta")),
        _vh("pfx", ["p.com:*"], _rt("p", {"prefix": "/"}, "gamma"))]},
     [(Request(h, "/"), exp) for h, exp in [
         ("a.com:80", "e->alpha"), ("a.com:", "e->alpha"), ("A.COM:xyz", "e->alpha"), ("a.com:a.b", "e->alpha"),
         ("a.com:80:90", "NR"), ("a.com:99999999999", "e->alpha"), ("b.com:8080", "NR"), ("b.com", "NR"),
         ("[::1]:80", "v6->beta"), ("[::1]", "v6->beta"), ("::1:80", "v6->beta"), ("::1", "NR"), ("[::1]x", "NR"),
         ("p.com:1", "NR"), ("p.com:1:2", "p->gamma")]]),
    ("weighted_clusters header_name", {"virtual_hosts": [_vh("v", ["*"], _rt("w", {"prefix": "/"}, route={"weighted_clusters": {
        "header_name": "x-w", "clusters": [{"name": "alpha", "weight": 3}, {"name": "beta", "weight": 1}]}}))]},
     [(Request("h", "/", headers=H(("x-w", v))), exp) for v, exp in [
         ("3", "w->beta"), ("+3", "w->beta"), ("007", "w->beta"), ("4", "w->alpha"), ("18446744073709551615", "w->beta"), ("2", "w->alpha")]]),
    ("redirect Location", {"virtual_hosts": [_vh("v", ["*"],
        _rt("https", {"prefix": "/s"}, redirect={"https_redirect": True}),
        _rt("port", {"prefix": "/p"}, redirect={"port_redirect": 8443}),
        _rt("host", {"prefix": "/h"}, redirect={"host_redirect": "n.com", "strip_query": True, "response_code": "FOUND"}),
        _rt("prefix", {"prefix": "/old"}, redirect={"prefix_rewrite": "/new/"}),
        _rt("https-port", {"prefix": "/t"}, redirect={"https_redirect": True, "port_redirect": 80}),
        _rt("scheme", {"prefix": "/c"}, redirect={"scheme_redirect": "HTTPS"}),
        _rt("path", {"prefix": "/x"}, redirect={"path_redirect": "/y?z=1"}),
        _rt("host-port", {"prefix": "/q"}, redirect={"host_redirect": "n.com:90", "port_redirect": 8443}))]},
     [(Request("a.com:80", "/s?q=1"), "https:301 https://a.com/s?q=1"), (Request("a.com:8080", "/s"), "https:301 https://a.com:8080/s"),
      (Request("A.com", "/s"), "https:301 https://A.com/s"), (Request("a.com", "/p"), "port:301 http://a.com:8443/p"),
      (Request("a.com:1", "/p"), "port:301 http://a.com:8443/p"), (Request("a.com", "/h?x=1"), "host:302 http://n.com/h"),
      (Request("a.com", "/old/x"), "prefix:301 http://a.com/new//x"), (Request("a.com:443", "/t"), "https-port:301 https://a.com:80/t"),
      (Request("a.com:80", "/c"), "scheme:301 HTTPS://a.com/c"), (Request("a.com", "/x?q"), "path:301 http://a.com/y?z=1"),
      (Request("[::1]:80", "/s"), "https:301 https://[::1]/s"), (Request("a.com:80", "/h"), "host:302 http://n.com/h"),
      (Request("a.com:80", "/q"), "host-port:301 http://n.com:90:8443/q"), (Request("a.com:81", "/c"), "scheme:301 HTTPS://a.com:81/c")]),
    ("x-forwarded-proto and :scheme are http", {"virtual_hosts": [_vh("v", ["*"],
        _rt("xfp", {"prefix": "/", "headers": [{"name": "x-forwarded-proto", "string_match": {"exact": "http"}},
                                               {"name": ":scheme", "string_match": {"exact": "http"}}]}, "alpha"),
        _rt("other", {"prefix": "/"}, "beta"))]},
     [(Request("h", "/"), "xfp->alpha"), (Request("h", "/", headers=H(("x-forwarded-proto", "https"))), "other->beta")]),
    # NOTE: a client-sent x-forwarded-proto of http/https (any case) becomes :scheme (lower
    # case), which redirects then use; any other value stays a plain header (:scheme http).
    ("x-forwarded-proto from the client sets :scheme", {"virtual_hosts": [_vh("v", ["*"],
        _rt("p", {"prefix": "/p"}, redirect={"path_redirect": "/x"}),
        _rt("r", {"prefix": "/r"}, redirect={"https_redirect": True}),
        _rt("sch-https", {"prefix": "/", "headers": [{"name": ":scheme", "string_match": {"exact": "https"}}]}, "alpha"),
        _rt("xfp-x", {"prefix": "/", "headers": [{"name": "x-forwarded-proto", "string_match": {"exact": "x"}}]}, "gamma"),
        _rt("any", {"prefix": "/"}, "beta"))]},
     [(Request("a.com:80", p, headers=H(("x-forwarded-proto", xfp))), exp) for p, xfp, exp in [
         ("/", "https", "sch-https->alpha"), ("/", "HTTPS", "sch-https->alpha"), ("/", "x", "xfp-x->gamma"),
         ("/", "https,http", "any->beta"), ("/", "http", "any->beta"),
         ("/p", "https", "p:301 https://a.com:80/x"), ("/p", "x", "p:301 http://a.com:80/x"), ("/p", "HTTPS", "p:301 https://a.com:80/x"),
         ("/r", "https", "r:301 https://a.com:80/r"), ("/r", "http", "r:301 https://a.com/r")]]),
    ("empty prefix_rewrite is no rewrite", {"virtual_hosts": [_vh("v", ["*"],
        _rt("pr", {"prefix": "/pre/"}, redirect={"prefix_rewrite": ""}),
        _rt("pe", {"path": "/pe"}, redirect={"prefix_rewrite": "", "https_redirect": True}),
        _rt("psp", {"path_separated_prefix": "/ps"}, redirect={"prefix_rewrite": ""}))]},
     [(Request("h", "/pre/a?q"), "pr:301 http://h/pre/a?q"), (Request("h", "/pe"), "pe:301 https://h/pe"),
      (Request("h", "/ps/x"), "psp:301 http://h/ps/x")]),
    ("case_sensitive", {"virtual_hosts": [_vh("v", ["*"],
        _rt("ci", {"prefix": "/Api", "case_sensitive": False}, "alpha"),
        _rt("rx", {"safe_regex": {"regex": "/foo"}, "case_sensitive": False}, "beta"),
        _rt("psp", {"path_separated_prefix": "/Seg", "case_sensitive": False}, "gamma"),
        _rt("any", {"prefix": "/"}, "delta"))]},
     [(Request("h", p), exp) for p, exp in [
         ("/aPI/x", "ci->alpha"), ("/FOO", "any->delta"), ("/foo", "rx->beta"), ("/seg/x", "psp->gamma"), ("/segx", "any->delta"),
         ("/SEG", "psp->gamma"), ("/seg?x", "psp->gamma"), ("/seg#x", "psp->gamma")]]),
    ("range_match parsing", {"virtual_hosts": [_vh("v", ["*"],
        _rt("r", {"prefix": "/", "headers": [{"name": "x-n", "range_match": {"start": -10, "end": 10}}]}, "alpha"),
        _rt("any", {"prefix": "/"}, "delta"))]},
     [(Request("h", "/", headers=H(("x-n", v))), exp) for v, exp in [
         ("+5", "r->alpha"), ("-10", "r->alpha"), ("10", "any->delta"), ("5.0", "any->delta"), ("0x5", "any->delta"),
         ("99999999999999999999", "any->delta")]]),
    ("absent headers, invert_match, treat_missing_header_as_empty", {"virtual_hosts": [_vh("v", ["*"],
        _rt("inv", {"path": "/i", "headers": [{"name": "x-q", "string_match": {"exact": "1"}, "invert_match": True}]}, "alpha"),
        _rt("inv-empty", {"path": "/ie", "headers": [
            {"name": "x-q", "string_match": {"exact": "1"}, "invert_match": True, "treat_missing_header_as_empty": True}]}, "alpha"),
        _rt("pf-empty", {"path": "/pf", "headers": [{"name": "x-q", "present_match": False, "treat_missing_header_as_empty": True}]}, "alpha"),
        _rt("pt-empty", {"path": "/pt", "headers": [{"name": "x-q", "present_match": True, "treat_missing_header_as_empty": True}]}, "alpha"),
        _rt("pt-inv", {"path": "/pti", "headers": [{"name": "x-q", "present_match": True, "invert_match": True}]}, "alpha"),
        _rt("rx-empty", {"path": "/rx", "headers": [{"name": "x-q", "safe_regex_match": {"regex": ".*"}, "treat_missing_header_as_empty": True}]}, "alpha"),
        _rt("any", {"prefix": "/"}, "delta"))]},
     [(Request("h", "/i"), "any->delta"), (Request("h", "/ie"), "inv-empty->alpha"), (Request("h", "/pf"), "any->delta"),
      (Request("h", "/pt"), "pt-empty->alpha"), (Request("h", "/pti"), "pt-inv->alpha"), (Request("h", "/rx"), "rx-empty->alpha"),
      (Request("h", "/pf", headers=H(("x-q", "1"))), "any->delta")]),
    ("cluster_header", {"virtual_hosts": [_vh("v", ["*"], _rt("ch", {"prefix": "/"}, route={"cluster_header": "x-c"}))]},
     [(Request("h", "/", headers=H(("x-c", "beta"), ("x-c", "alpha"))), "ch->beta"), (Request("h", "/"), "ch:NC"),
      (Request("h", "/", headers=H(("x-c", "Beta"))), "ch:NC")]),
    ("a 'host' header matcher reads :authority as sent", {"virtual_hosts": [_vh("v", ["*"],
        _rt("host", {"prefix": "/x", "headers": [{"name": "host", "string_match": {"exact": "Ab.com:80"}}]}, "alpha"),
        _rt("HOST", {"prefix": "/y", "headers": [{"name": "HOST", "present_match": True}]}, "alpha"),
        _rt("any", {"prefix": "/"}, "beta"))]},
     [(Request("Ab.com:80", "/x"), "host->alpha"), (Request("ab.com:80", "/x"), "any->beta"), (Request("h", "/y"), "HOST->alpha")]),
    ("runtime_fraction 0% and 100%", {"virtual_hosts": [_vh("v", ["*"],
        _rt("never", {"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 0}, "runtime_key": "k0"}}, "alpha"),
        _rt("always", {"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 10000, "denominator": "TEN_THOUSAND"},
                                                             "runtime_key": "k1"}}, "beta"))]},
     [(Request("h", "/", random_value=v), "always->beta") for v in (0, 99, 12345)]),
]


def short(d: Decision) -> str:
    if d.kind == "route":
        return f"{d.route_name}->{d.cluster}"
    if d.kind == "direct_response":
        return f"{d.route_name}:{d.direct_response[0] if d.direct_response else '?'}"
    if d.kind == "redirect":
        return f"{d.route_name}:{d.status} {d.redirect}"
    if d.kind == "cluster_not_found":
        return f"{d.route_name}:NC"
    if d.kind == "no_match":
        return "NR"
    return f"rejected {d.status} {d.details}"


@pytest.fixture(scope="module")
def fact_decisions() -> list[list[Decision]]:
    with RouteOracle([cfg for _, cfg, _ in FACTS], extra_clusters=CLUSTERS) as oracle:
        return [oracle.decide_all([rq for rq, _ in reqs], i) for i, (_, _, reqs) in enumerate(FACTS)]


@pytest.mark.parametrize("index", range(len(FACTS)), ids=[_ident(f[0]) for f in FACTS])
def test_envoy_facts(index: int, fact_decisions: list[list[Decision]]) -> None:
    name, cfg, reqs = FACTS[index]
    bad = [
        f"{json.dumps(rq.to_json())}: expected {exp!r}, Envoy {short(d)!r}"
        for (rq, exp), d in zip(reqs, fact_decisions[index])
        if short(d) != exp
    ]
    assert not bad, f"Envoy 1.40 does not behave as FACTS[{name!r}] says:\nconfig = {json.dumps(cfg)}\n" + "\n".join(bad)


@pytest.mark.parametrize("index", range(len(FACTS)), ids=[_ident(f[0]) for f in FACTS])
def test_facts_meshcore(index: int, impl: str, RouteTable: Any, fact_decisions: list[list[Decision]]) -> None:  # noqa: N803
    name, cfg, reqs = FACTS[index]
    table = RouteTable.from_xds(cfg)
    dis = []
    for (rq, _), d in zip(reqs, fact_decisions[index]):
        m = mesh_match(table, rq)
        diffs = compare(cfg, rq, d, m)
        if diffs:
            dis.append(Disagreement(cfg, rq, d, m, diffs))
    if dis:
        fail_with(dis, RouteTable, impl, f"fact {name!r}", len(reqs), shrink_first=False)


# Configurations Envoy rejects (message fragment) or accepts (None).
VALIDITY: list[tuple[str, dict, str | None]] = [
    ("ignore_case on safe_regex", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"prefix": "/", "headers": [
        {"name": "x", "string_match": {"safe_regex": {"regex": "a"}, "ignore_case": True}}]}, "alpha"))]},
     "ignore_case has no effect for safe_regex"),
    ("RE2 program size 100", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"safe_regex": {"regex": "/a{95}"}}, "alpha"))]}, None),
    ("RE2 program size 101", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"safe_regex": {"regex": "/a{96}"}}, "alpha"))]},
     "RE2 program size of 101 > max program size of 100"),
    ("RE2 program size 124 in a header matcher", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"prefix": "/", "headers": [
        {"name": "x", "safe_regex_match": {"regex": "/[a-z]{1,60}"}}]}, "alpha"))]}, "RE2 program size of 124"),
    ("duplicate domain (case-insensitive)", {"virtual_hosts": [_vh("v", ["a.com"], _rt("r", {"prefix": "/"}, "alpha")),
                                                               _vh("w", ["A.com"], _rt("r", {"prefix": "/"}, "alpha"))]},
     "Only unique values for domains are permitted"),
    ("two '*' vhosts", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"prefix": "/"}, "alpha")), _vh("w", ["*"], _rt("r", {"prefix": "/"}, "alpha"))]},
     "Only a single wildcard domain is permitted"),
    ("weighted total 0", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"prefix": "/"}, route={"weighted_clusters": {"clusters": [
        {"name": "alpha", "weight": 0}]}}))]}, "Sum of weights in the weighted_cluster must be greater than 0"),
    ("path_separated_prefix ending in /", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"path_separated_prefix": "/a/"}, "alpha"))]},
     "PathSeparatedPrefix"),
    ("prefix_rewrite on a safe_regex route", {"virtual_hosts": [_vh("v", ["*"], _rt("r", {"safe_regex": {"regex": "/a"}}, route={
        "cluster": "alpha", "prefix_rewrite": "/b"}))]}, None),
    ("same domain in one vhost twice", {"virtual_hosts": [_vh("v", ["a.com", "a.com"], _rt("r", {"prefix": "/"}, "alpha"))]},
     "Only unique values for domains are permitted"),
]


@pytest.mark.parametrize("index", range(len(VALIDITY)), ids=[_ident(v[0]) for v in VALIDITY])
def test_envoy_config_validity(index: int) -> None:
    name, cfg, expect = VALIDITY[index]
    err = RouteOracle.validate(cfg)
    if expect is None:
        assert err is None, f"Envoy rejects {name}: {err}"
    else:
        assert err is not None and expect in err, f"{name}: expected Envoy to reject with {expect!r}, got {err!r}"


@pytest.mark.parametrize("index", range(len(VALIDITY)), ids=[_ident(v[0]) for v in VALIDITY])
def test_config_validity_meshcore(index: int, impl: str, RouteTable: Any) -> None:  # noqa: N803
    name, cfg, expect = VALIDITY[index]
    if expect is None:
        try:
            RouteTable.from_xds(cfg)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{name}: Envoy 1.40 accepts it, meshcore ({impl}) raised {type(e).__name__}: {e}\n"
                        f"config = {json.dumps(cfg)}", pytrace=False)
        return
    try:
        RouteTable.from_xds(cfg)
    except _config_error():
        return
    pytest.fail(f"{name}: Envoy 1.40 rejects it ({expect}), meshcore ({impl}) accepted it\nconfig = {json.dumps(cfg)}",
                pytrace=False)


# --------------------------------------------------------------------------------------------
# 3. Generated configurations
# --------------------------------------------------------------------------------------------


def test_generator_is_reproducible() -> None:
    a, b = generate(1234, 50), generate(1234, 50)
    assert json.dumps(a.config, sort_keys=True) == json.dumps(b.config, sort_keys=True)
    assert a.requests == b.requests
    assert json.dumps(generate(1235, 0).config) != json.dumps(a.config)


def test_generator_covers_the_semantics() -> None:
    """Over 200 seeds, the generator produces every feature the comparison is meant to stress."""
    seen: set[str] = set()

    def walk(obj: Any, path: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                seen.add(k)
                if k == "name" and isinstance(v, str) and v.startswith(":"):
                    seen.add("pseudo" + v)
                if k in ("domains",):
                    for dmn in v:
                        seen.add("domain:" + ("*" if dmn == "*" else "suffix" if dmn.startswith("*") else "prefix" if dmn.endswith("*") else "exact"))
                if k in ("present_match", "invert_match", "treat_missing_header_as_empty", "case_sensitive", "ignore_case", "https_redirect"):
                    seen.add(f"{k}={v}")
                walk(v, path + "." + k)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, path)

    reqs = []
    for seed in range(200):
        case = generate(seed, 20)
        if "virtualHosts" in case.config:
            seen.add("camelCase config")
            continue
        walk(case.config)
        reqs += case.requests
    want = {
        "domain:*", "domain:suffix", "domain:prefix", "domain:exact", "ignore_port_in_host_matching",
        "ignore_path_parameters_in_path_matching", "vhost_header", "camelCase config",
        "prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive=True", "case_sensitive=False",
        "exact_match", "prefix_match", "suffix_match", "contains_match", "safe_regex_match", "range_match",
        "string_match", "exact", "suffix", "contains", "ignore_case=True", "present_match=True", "present_match=False",
        "invert_match=True", "treat_missing_header_as_empty=True", "pseudo:path", "pseudo:authority", "pseudo:method",
        "pseudo:scheme", "query_parameters", "grpc", "runtime_fraction",
        "cluster", "weighted_clusters", "header_name", "runtime_key_prefix", "cluster_header", "direct_response",
        "redirect", "https_redirect=True", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
        "prefix_rewrite", "strip_query", "response_code", "host_rewrite_literal", "timeout", "retry_policy", "hash_policy",
    }
    assert not (want - seen), f"generator never produced {sorted(want - seen)}"
    paths = [r.path for r in reqs]
    assert any("#" in p for p in paths) and any("?" in p for p in paths) and any(";" in p for p in paths)
    assert any(len({k.lower() for k, _ in r.headers}) < len(r.headers) for r in reqs), "no repeated header names"
    assert any(r.method != "GET" for r in reqs)
    assert any(any(v.startswith("application/grpc") for k, v in r.headers if k == "content-type") for r in reqs)
    assert any(r.authority != r.authority.lower() for r in reqs) and any(":" in r.authority for r in reqs)


def with_header_less(case: Case) -> Case:
    """``case`` and, when none of its routes has a runtime fraction, a copy of every fourth
    request without headers or random value: meshcore asks those with headers None, where the
    compiled table keeps static matches (``disagreements``). (With a runtime fraction Envoy would
    draw its own value, and meshcore's table keeps nothing.)"""
    if "runtime_fraction" in json.dumps(case.config):
        return case
    extra = [Request(r.authority, r.path, r.method) for r in case.requests[::4]]
    return dataclasses.replace(case, requests=case.requests + extra)


@pytest.fixture(scope="module")
def envoy_answers() -> dict[int, tuple[Case, list[Decision]]]:
    """Envoy's decision for every generated request (all configs through as few Envoys as possible)."""
    cases = [with_header_less(generate(s, N_REQUESTS)) for s in SEEDS]
    out: dict[int, tuple[Case, list[Decision]]] = {}
    for start in range(0, len(cases), LISTENERS_PER_ENVOY):
        chunk = cases[start : start + LISTENERS_PER_ENVOY]
        oracle = RouteOracle([c.config for c in chunk], extra_clusters=CLUSTERS)
        try:
            oracle.start()
        except EnvoyConfigError as e:
            bad = {chunk[i].seed: msg for i, msg in e.errors.items()}
            raise AssertionError(f"Envoy rejects generated configs (a route_gen bug): {json.dumps(bad, indent=1)}") from None
        with oracle:
            for i, c in enumerate(chunk):
                out[c.seed] = (c, oracle.decide_all(c.requests, i))
            assert oracle.upstream_retries() == 0, "Envoy retried upstream requests: answers are not first tries"
    return out


def test_generated_cases_are_routable_by_envoy(envoy_answers: dict[int, tuple[Case, list[Decision]]]) -> None:
    """Envoy accepts every generated config, routes every generated request (nothing refused
    by its codec), and the answers cover every kind of decision."""
    kinds: dict[str, int] = {}
    for seed, (case, decisions) in envoy_answers.items():
        for rq, d in zip(case.requests, decisions):
            assert d.kind != "rejected", f"seed {seed}: Envoy refused {json.dumps(rq.to_json())}: {d.to_json()}"
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
    total = sum(kinds.values())
    header_less = sum(len(case.requests) - N_REQUESTS for case, _ in envoy_answers.values())
    assert total == N_CONFIGS * N_REQUESTS + header_less and (N_REQUESTS < 4 or header_less > 0)
    if total >= 1000:
        for k in ("route", "direct_response", "redirect", "no_match", "cluster_not_found"):
            assert kinds.get(k, 0) >= total // 200, f"too few {k} decisions: {kinds}"
        assert kinds["no_match"] < 0.6 * total, f"mostly no-match: {kinds}"


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_generated_config_matches_envoy(seed: int, impl: str, RouteTable: Any, envoy_answers: dict) -> None:  # noqa: N803
    case, decisions = envoy_answers[seed]
    try:
        table = RouteTable.from_xds(case.config)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"meshcore ({impl}) rejects a config Envoy 1.40 accepts ({type(e).__name__}: {e}):\n"
                    f"config = {json.dumps(case.config, sort_keys=True)}", pytrace=False)
    dis = disagreements(table, case.config, case.requests, decisions)
    if dis:
        fail_with(dis, RouteTable, impl, f"generated config seed {seed} (route_gen.generate({seed}, {N_REQUESTS}))", len(case.requests))


# --------------------------------------------------------------------------------------------
# 3b. Mixed 1,000-route tables (route_gen.generate_mixed): exact paths, prefixes, regexes and
#     header-matched routes in any order, where meshcore's indexes must prove every route they
#     skip. Short by default (MESHCORE_ROUTE_ORACLE_MIXED_CONFIGS tables, default 2, x 200
#     requests); ``-m soak`` runs MESHCORE_SOAK_EXAMPLES more tables (default 20) x 1,000 requests.
# --------------------------------------------------------------------------------------------

MIXED_CONFIGS = int(os.environ.get("MESHCORE_ROUTE_ORACLE_MIXED_CONFIGS", "2"))
MIXED_SEEDS = [BASE_SEED + s for s in range(MIXED_CONFIGS)]


def _mixed_envoy_answers(seeds: list[int], n_requests: int) -> dict[int, tuple[Case, list[Decision]]]:
    out: dict[int, tuple[Case, list[Decision]]] = {}
    for start in range(0, len(seeds), 10):  # 10 tables of 1,000 routes per Envoy
        chunk = [with_header_less(generate_mixed(s, 1000, n_requests)) for s in seeds[start : start + 10]]
        with RouteOracle([c.config for c in chunk], extra_clusters=CLUSTERS) as oracle:
            for i, c in enumerate(chunk):
                out[c.seed] = (c, oracle.decide_all(c.requests, i))
            assert oracle.upstream_retries() == 0, "Envoy retried upstream requests: answers are not first tries"
    return out


def _check_mixed(answers: dict[int, tuple[Case, list[Decision]]], impl: str, RouteTable: Any) -> None:  # noqa: N803
    routed = 0
    for seed, (case, decisions) in answers.items():
        routed += sum(d.kind == "route" for d in decisions)
        table = RouteTable.from_xds(case.config)
        dis = disagreements(table, case.config, case.requests, decisions)
        if dis:
            fail_with(dis, RouteTable, impl, f"mixed table seed {seed} (route_gen.generate_mixed({seed}, 1000, "
                      f"{len(case.requests)}))", len(case.requests))
    total = sum(len(c.requests) for c, _ in answers.values())
    assert routed >= total // 2, f"only {routed} of {total} requests routed: the generator misses its routes"


@pytest.fixture(scope="module")
def mixed_envoy_answers() -> dict[int, tuple[Case, list[Decision]]]:
    return _mixed_envoy_answers(MIXED_SEEDS, 200)


def test_mixed_tables_match_envoy(impl: str, RouteTable: Any, mixed_envoy_answers: dict) -> None:  # noqa: N803
    _check_mixed(mixed_envoy_answers, impl, RouteTable)


@pytest.mark.soak
def test_mixed_tables_match_envoy_long(impl: str, RouteTable: Any) -> None:  # noqa: N803
    n = int(os.environ.get("MESHCORE_SOAK_EXAMPLES", "20"))
    seeds = [BASE_SEED + 10_000 + s for s in range(n)]
    _check_mixed(_mixed_envoy_answers(seeds, 1000), impl, RouteTable)


# --------------------------------------------------------------------------------------------
# 4. router_check_tool goldens (tests/fixtures/envoy, from envoyproxy/envoy
#    test/tools/router_check/test/config)
# --------------------------------------------------------------------------------------------

GOLDEN_FILES = ["TestRoutes", "HeaderMatchedRouting", "Weighted"]


def _lenient_json(text: str) -> Any:
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", text))  # the goldens have trailing commas


def _load_golden(name: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(FIXTURES, f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(FIXTURES, f"{name}.golden.proto.json")) as f:
        tests = _lenient_json(f.read())["tests"]
    return config, tests


GOLDEN_CASES = [(name, t) for name in GOLDEN_FILES for t in _load_golden(name)[1]]
GOLDEN_IDS = [name + "-" + _ident(t["test_name"]) for name, t in GOLDEN_CASES]
TOOL_FIELDS = ("cluster_name", "virtual_cluster_name", "virtual_host_name", "path_rewrite", "host_rewrite", "path_redirect")


def _golden_request(inp: dict) -> tuple[Request, Request, str]:
    """(request for Envoy, request for meshcore, scheme) as router_check_tool builds them: it
    adds ``x-forwarded-proto: https|http`` (``ssl``) and ``x-envoy-internal: true``
    (``internal``).  Envoy gets the x-forwarded-proto header on its plain-text listener (a
    client-sent http/https x-forwarded-proto becomes its :scheme); meshcore gets ``scheme=``."""
    headers = tuple((h["key"], h["value"]) for h in inp.get("additional_request_headers", []))
    if inp.get("internal"):
        headers += (("x-envoy-internal", "true"),)
    scheme = "https" if inp.get("ssl") else "http"
    mesh = Request(inp["authority"], inp["path"], inp.get("method", "GET"), headers, inp.get("random_value"))
    envoy = dataclasses.replace(mesh, headers=headers + (("x-forwarded-proto", scheme),))
    return envoy, mesh, scheme


def _tool_view_envoy(config: dict, req: Request, d: Decision) -> dict[str, str]:
    """Envoy's decision in router_check_tool's terms (``routeEntry()`` is null for direct
    responses and redirects: their cluster/vhost/rewrites read as "")."""
    v = dict.fromkeys(TOOL_FIELDS, "")
    if d.kind in ("route", "cluster_not_found"):
        vh, _ = route_at(config, d.vhost_index, d.route_index)
        v.update(cluster_name=d.cluster or "", virtual_host_name=d.virtual_host or "",
                 path_rewrite=d.upstream_path or "", host_rewrite=d.upstream_host or "",
                 virtual_cluster_name=d.virtual_cluster or ("other" if field(vh, "virtual_clusters") else ""))
    elif d.kind == "redirect":
        v["path_redirect"] = d.redirect or ""
    elif d.kind == "direct_response":
        # the tool reports DirectResponseEntry::newUri() even for a plain direct response
        v["path_redirect"] = f"http://{req.authority}{req.path}"
    return v


def _tool_view_meshcore(m: Any, req: Request, scheme: str) -> dict[str, Any]:
    v: dict[str, Any] = dict.fromkeys(TOOL_FIELDS, "")
    v["virtual_cluster_name"] = None  # not part of meshcore's surface
    if m is None:
        return v
    direct, redirect = getattr(m, "direct_response", None), getattr(m, "redirect", None)
    if redirect is not None:
        v["path_redirect"] = redirect
    elif direct is not None:
        v["path_redirect"] = f"{scheme}://{req.authority}{req.path}"
    else:
        v.update(cluster_name=getattr(m, "cluster", None) or "", virtual_host_name=getattr(m, "virtual_host", None) or "")
        # The upstream :path / Host after prefix_rewrite / host_rewrite_literal (None: unchanged).
        pr, hr = getattr(m, "path_rewrite"), getattr(m, "host_rewrite")
        v["path_rewrite"] = req.path if pr is None else pr
        v["host_rewrite"] = req.authority if hr is None else hr
    return v


@pytest.fixture(scope="module")
def golden_oracle():
    configs = [_load_golden(name)[0] for name in GOLDEN_FILES]
    with RouteOracle(configs) as oracle:
        yield oracle


@pytest.mark.parametrize("name,test", GOLDEN_CASES, ids=GOLDEN_IDS)
def test_golden_envoy(name: str, test: dict, golden_oracle: RouteOracle) -> None:
    """Sanity: real Envoy 1.40 agrees with the router_check_tool golden."""
    config = golden_oracle.configs[GOLDEN_FILES.index(name)]
    req, _, _ = _golden_request(test["input"])
    d = golden_oracle.decide(req, GOLDEN_FILES.index(name))
    view = _tool_view_envoy(config, req, d)
    want = {k: v for k, v in test["validate"].items() if k in TOOL_FIELDS}
    got = {k: view[k] for k in want}
    assert got == want, f"{name} {test['test_name']}: request {json.dumps(req.to_json())}\nEnvoy: {d.to_json()}"
    if d.kind == "direct_response":  # the golden's response_header_matches for /ping
        status, headers, body = golden_oracle.raw(req, GOLDEN_FILES.index(name))
        hv = dict(headers)
        assert (status, hv.get("content-type"), hv.get("x-ping-response"), "x-pong-response" in hv) == (200, "text/plain", "yes", False)


@pytest.mark.parametrize("name,test", GOLDEN_CASES, ids=GOLDEN_IDS)
def test_golden_meshcore(name: str, test: dict, impl: str, RouteTable: Any, golden_oracle: RouteOracle) -> None:  # noqa: N803
    config = golden_oracle.configs[GOLDEN_FILES.index(name)]
    _, req, scheme = _golden_request(test["input"])
    m = RouteTable.from_xds(config).match(req.authority, req.path, headers=list(req.headers), method=req.method,
                                          scheme=scheme, random_value=req.random_value)
    view = _tool_view_meshcore(m, req, scheme)
    want = {k: v for k, v in test["validate"].items() if k in TOOL_FIELDS and k != "virtual_cluster_name"}
    got = {k: view[k] for k in want}
    assert got == want, (
        f"meshcore ({impl}) disagrees with the router_check_tool golden {name} {test['test_name']}:\n"
        f"config = {json.dumps(config)}\nrequest = {json.dumps(req.to_json())} scheme={scheme}\n"
        f"meshcore: {json.dumps(describe(m), default=repr)}"
    )
