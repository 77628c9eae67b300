"""Route matching: c vs py side by side, by table size and shape, plus table build time.

Istio-like: many virtual hosts (service FQDN, short names, host:port), few routes each.
Gateway-like: one virtual host with many exact, prefix, regex and header routes.
The request hits the LAST route of its kind, as Envoy's config_impl_speed_test does.
Mixed: one virtual host of 1,000 routes in rotation exact / prefix / safe_regex / prefix +
exact header (issue 12); hits on the first, middle and last route of each kind, and a miss.

The compiled table keeps the static matches of header-less requests (``RouteTable._plain``: a
gRPC call, a ``pick`` without headers); the match benchmarks pass a source address, which keeps
them out of it, so they time the walk itself; ``test_match_memo_hit`` times a repeat.
"""

from __future__ import annotations

import os
from importlib import import_module

import pytest

SIZES = [10, 1000, 10_000]
if os.environ.get("MESHCORE_BENCH_QUICK"):
    SIZES = [10, 1000]

#: a source address: no route of these tables reads it, and a request with one is walked (not
#: answered from the compiled table's memo of header-less matches)
WALK = "10.9.8.7"


@pytest.fixture(scope="module", params=["c", "py"])
def RT(request):  # noqa: N802
    return import_module(f"meshcore._fast.routes_{request.param}").RouteTable


def istio_like(n_routes: int) -> dict:
    vhosts = []
    n_vhosts = max(1, n_routes // 4)
    for i in range(n_vhosts):
        host = f"svc{i}.ns{i % 7}.svc.cluster.local"
        vhosts.append({
            "name": f"svc{i}:80",
            "domains": [host, f"{host}:80", f"svc{i}", f"svc{i}:80", f"svc{i}.ns{i % 7}", f"10.0.{i // 250}.{i % 250}:80"],
            "routes": [
                {"name": f"svc{i}-canary", "match": {"prefix": "/", "headers": [{"name": "x-canary", "exact_match": "1"}]},
                 "route": {"cluster": f"outbound|80|v2|{host}"}},
                {"name": f"svc{i}-api", "match": {"prefix": "/api/"}, "route": {"cluster": f"outbound|80|v1|{host}"}},
                {"name": f"svc{i}-health", "match": {"path": "/healthz"}, "direct_response": {"status": 200}},
                {"name": f"svc{i}-default", "match": {"prefix": "/"}, "route": {"cluster": f"outbound|80||{host}"}},
            ],
        })
    return {"name": "istio", "virtual_hosts": vhosts}


def gateway_like(n_routes: int, kind: str) -> dict:
    routes = []
    for i in range(n_routes):
        if kind == "exact":
            match = {"path": f"/shelves/{i}/books"}
        elif kind == "prefix":
            match = {"prefix": f"/shelves/{i}/"}
        elif kind == "regex":
            match = {"safe_regex": {"regex": f"/shelves/[^/]+/route_{i}"}}
        else:  # header routes on one prefix
            match = {"prefix": "/api", "headers": [{"name": "x-tenant", "exact_match": f"t{i}"}]}
        routes.append({"name": f"r{i}", "match": match, "route": {"cluster": f"c{i}"}})
    return {"name": "gw", "virtual_hosts": [{"name": "gw", "domains": ["*"], "routes": routes}]}


def _request(kind: str, n: int):
    last = n - 1
    if kind == "exact":
        return "gw.example.com", f"/shelves/{last}/books", None
    if kind == "prefix":
        return "gw.example.com", f"/shelves/{last}/x?y=1", None
    if kind == "regex":
        return "gw.example.com", f"/shelves/abc/route_{last}", None
    return "gw.example.com", "/api/v1", [("x-tenant", f"t{last}")]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["exact", "prefix", "header", "regex"])
def test_match_gateway(benchmark, RT, kind, n):
    rt = RT.from_xds(gateway_like(n, kind))
    authority, path, headers = _request(kind, n)
    m = rt.match(authority, path, headers)
    assert m is not None and m.route_name == f"r{n - 1}"
    benchmark.group = f"route match gateway {kind} n={n}"
    benchmark(rt.match, authority, path, headers, "GET", "http", None, WALK)


@pytest.mark.parametrize("n", SIZES)
def test_match_istio(benchmark, RT, n):
    rt = RT.from_xds(istio_like(n))
    last = max(1, n // 4) - 1
    authority = f"svc{last}.ns{last % 7}.svc.cluster.local:80"
    m = rt.match(authority, "/api/users?page=2")
    assert m is not None and m.route_name == f"svc{last}-api"
    benchmark.group = f"route match istio n={n}"
    benchmark(rt.match, authority, "/api/users?page=2", None, "GET", "http", None, WALK)


@pytest.mark.parametrize("kind", ["exact", "regex"])
def test_match_memo_hit(benchmark, RT, kind):
    """A header-less request asked again (the last route of 1,000): the compiled table answers
    from its memo of static matches; the pure twin (no memo) walks."""
    rt = RT.from_xds(gateway_like(1000, kind))
    authority, path, _ = _request(kind, 1000)
    assert rt.match(authority, path).route_name == "r999"
    assert rt.match(authority, path) == rt.match(authority, path, None, "GET", "http", None, WALK)
    benchmark.group = f"route match header-less repeat {kind} n=1000"
    benchmark(rt.match, authority, path)


@pytest.mark.parametrize("kind", ["prefix", "istio"])
def test_build_10k(benchmark, RT, kind):
    from meshcore.xds.route_config import route_config_spec

    spec = route_config_spec(gateway_like(10_000, "prefix") if kind == "prefix" else istio_like(10_000))
    benchmark.group = f"route table build 10k {kind} (from parsed spec)"
    benchmark.pedantic(RT, args=(spec,), rounds=5, iterations=1)


MIXED_KINDS = ("exact", "prefix", "regex", "header")


def mixed_route(i: int) -> dict:
    """Route ``i`` of the mixed table: kind ``MIXED_KINDS[i % 4]``."""
    kind = MIXED_KINDS[i % 4]
    if kind == "exact":
        match = {"path": f"/exact/{i}/item"}
    elif kind == "prefix":
        match = {"prefix": f"/prefix/{i}/"}
    elif kind == "regex":
        match = {"safe_regex": {"regex": f"/regex/[a-z]+/{i}"}}
    else:
        match = {"prefix": "/hdr/", "headers": [{"name": "x-tenant", "exact_match": f"t-{i}"}]}
    return {"name": f"r{i}", "match": match, "route": {"cluster": f"c{i}"}}


def mixed_like(n_routes: int = 1000) -> dict:
    routes = [mixed_route(i) for i in range(n_routes)]
    return {"name": "mixed", "virtual_hosts": [{"name": "mixed", "domains": ["*"], "routes": routes}]}


def mixed_request(i: int):
    """A request matched by route ``i`` of the mixed table (and by no earlier route)."""
    kind = MIXED_KINDS[i % 4]
    if kind == "exact":
        return f"/exact/{i}/item", None
    if kind == "prefix":
        return f"/prefix/{i}/x?y=1", None
    if kind == "regex":
        return f"/regex/abc/{i}", None
    return "/hdr/v1", [("x-tenant", f"t-{i}")]


def mixed_targets(n_routes: int = 1000):
    """(label, route index) per kind: its first route, the one at the middle, its last."""
    out = []
    for k, kind in enumerate(MIXED_KINDS):
        mid = n_routes // 2 - (n_routes // 2) % 4 + k
        last = n_routes - 1 - ((n_routes - 1 - k) % 4)
        out += [(f"{kind}-{pos}", i) for pos, i in (("first", k), ("mid", mid), ("last", last))]
    return out


@pytest.fixture(scope="module")
def mixed_tables():
    return {}


@pytest.mark.parametrize("target", [label for label, _ in mixed_targets()] + ["miss-header", "miss-path"])
def test_match_mixed(benchmark, RT, mixed_tables, target):
    rt = mixed_tables.get(RT)
    if rt is None:
        rt = mixed_tables[RT] = RT.from_xds(mixed_like(1000))
    if target == "miss-header":  # every header route is a candidate; none matches
        path, headers, want = "/hdr/v1", [("x-tenant", "t-nobody")], None
    elif target == "miss-path":
        path, headers, want = "/nothing/here", None, None
    else:
        i = dict(mixed_targets())[target]
        path, headers = mixed_request(i)
        want = f"r{i}"
    m = rt.match("gw.example.com", path, headers)
    assert (m.route_name if m else None) == want
    benchmark.group = f"route match mixed n=1000 {target}"
    benchmark(rt.match, "gw.example.com", path, headers, "GET", "http", None, WALK)


@pytest.mark.c_extension
def test_regex_binding_floor(benchmark):
    """Why the compiled twin's regex match is only ~10x the pure one's: both make the same call
    into google-re2's binding (one RE2 set pass over the path), and that call alone costs most
    of the compiled match (the ratio's ceiling is py_over_binding_call). RE2::Set::Match is not exported by the wheel's _re2 module (Add,
    Compile and Size are), so the compiled twin cannot call RE2's C++ API without building and
    linking its own RE2 and Abseil. Reported (CPU time, interleaved): the compiled and pure
    matches of the last regex route of the mixed table, the binding's set call on the same
    path, the same call on an empty text (dispatch, GIL release and set set-up), and a trivial
    call into the same binding (pybind11 dispatch alone)."""
    import statistics
    import time

    import re2._re2 as binding

    from meshcore._fast import routes_c, routes_py

    c = routes_c.RouteTable.from_xds(mixed_like(1000))
    py = routes_py.RouteTable.from_xds(mixed_like(1000))
    i = dict(mixed_targets())["regex-last"]
    path, headers = mixed_request(i)
    text = path.encode()
    chunk = py._vhosts[0].regex_set.raw[0][0]
    calls = {
        "c_match": (lambda: c.match("gw.example.com", path, headers, "GET", "http", None, WALK), 4000),
        "py_match": (lambda: py.match("gw.example.com", path, headers, "GET", "http", None, WALK), 500),
        "set_call": (lambda: chunk.Match(text), 4000),
        "set_call_empty_text": (lambda: chunk.Match(b""), 4000),
        "trivial_binding_call": (lambda: binding.CharLenToBytes(text, 0, 3), 4000),
        "python_lambda_call": (lambda: None, 4000),
    }
    out = {k: [] for k in calls}
    for _ in range(9):
        for k, (f, n) in calls.items():
            t0 = time.thread_time_ns()
            for _ in range(n):
                f()
            out[k].append((time.thread_time_ns() - t0) / n)
    ns = {k: statistics.median(v) for k, v in out.items()}
    lam = ns["python_lambda_call"]  # the lambda each figure is timed through
    info = {k + "_ns": round(v - lam, 1) for k, v in ns.items() if k != "python_lambda_call"}
    info["py_over_c"] = round((ns["py_match"] - lam) / (ns["c_match"] - lam), 1)
    info["py_over_binding_call"] = round((ns["py_match"] - lam) / (ns["set_call"] - lam), 1)
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k} {v}" for k, v in info.items()))
    assert c.match("gw.example.com", path, headers).route_name == f"r{i}"
    # The binding's call is the larger part of the compiled match, and the ceiling of the
    # ratio is what the pure match costs over that call alone.
    assert ns["set_call"] - lam > 0.4 * (ns["c_match"] - lam), info
    benchmark.group = "route match mixed n=1000 regex: the RE2 binding's floor"
    benchmark(chunk.Match, text)
