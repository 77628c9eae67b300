"""Server side: what ``MeshAsgiMiddleware`` adds per request over the bare ASGI app, in process.

The app is called directly (no server, no socket): each call drives the coroutine with
``send(None)`` (receive/send are coroutines that never suspend), so the figures are the CPU cost of
the middleware alone. The request: ``GET /api/v1/frontend/items?page=2`` with 10 headers (Host,
user-agent, accept, x-request-id, x-b3 tracing, x-tenant ...) over mTLS (the ASGI TLS extension
with the caller's ``PeerCertificate``, as ``serve_uvicorn`` puts it). The policy: the realistic
Istio set of ``tests/rbac/istio_authz.py`` (``realistic_policies(10)``) as istiod's proxyless
generator translates it -- a DENY of namespace ``evil`` and an ALLOW of 9 rules (10 rules;
principals, namespaces and service accounts as RE2, methods, path prefixes, hosts, a header
condition).

Modes:

* ``bare``: the app alone;
* ``identity``: the middleware without a policy (identity in ``scope["meshcore"]``, stats);
* ``rbac-first`` / ``rbac-last`` / ``rbac-deny``: ``rbac=`` the policy's engine; allowed by the
  first ALLOW rule, by the last one, denied by the DENY filter (the 403 is the middleware's);
* ``xds``: the policy from xDS (a grpcgen inbound listener from the reference control plane,
  ``mesh.serve(port)``): chain lookup (cached per connection), route match, RBAC;
* ``xds+telemetry``: ``xds`` with a telemetry sink (one ``RequestRecord`` per request).

Run: ``pytest benchmarks/test_bench_inbound.py --benchmark-only`` or
``python benchmarks/test_bench_inbound.py`` (a table: median per request, added over ``bare``).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from rbac.istio_authz import filters_for, realistic_policies  # noqa: E402

from meshcore import PeerCertificate, RbacEngine  # noqa: E402
from meshcore.integrations.asgi import MeshAsgiMiddleware  # noqa: E402

QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
MODES = ["bare", "identity", "rbac-first", "rbac-last", "rbac-deny", "xds", "xds+telemetry"]
PORT = 18443
FRONTEND = "spiffe://cluster.local/ns/prod/sa/frontend"  # rule 0: namespace prod, GET /api/v1/frontend/*
SEARCH = "spiffe://cluster.local/ns/prod/sa/search"  # rule 8 (the last): principal, GET /api/v3/search/*


def istio_filters() -> List[Dict[str, Any]]:
    return filters_for(realistic_policies(10))


async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def receive() -> Dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def send(message: Dict[str, Any]) -> None:
    return None


def make_scope(path: str, principal: str, tenant: str = "acme") -> Dict[str, Any]:
    raw, _, qs = path.partition("?")
    headers = [(b"host", b"api.prod.svc.cluster.local:8443"), (b"user-agent", b"python-httpx/0.28"),
               (b"accept", b"application/json"), (b"accept-encoding", b"gzip, deflate"),
               (b"x-request-id", b"5f8a1c2e-7b3d-4e9f-a1b2-c3d4e5f6a7b8"),
               (b"x-b3-traceid", b"80f198ee56343ba864fe8b2a57d3eff7"), (b"x-b3-spanid", b"e457b5a2e4d86bd1"),
               (b"x-b3-sampled", b"1"), (b"x-tenant", tenant.encode()), (b"x-forwarded-proto", b"https")]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "https",
            "path": raw, "raw_path": raw.encode(), "query_string": qs.encode(), "root_path": "", "headers": headers,
            "client": ("10.8.3.17", 51234), "server": ("10.8.1.4", PORT),
            "extensions": {"tls": {"meshcore.peer": PeerCertificate([principal]), "meshcore.server_name": None,
                                   "client_cert_chain": (), "tls_version": 0x0304}}}


def runner(asgi: Any, scope: Dict[str, Any]) -> Callable[[], None]:
    def run() -> None:
        coro = asgi(scope, receive, send)
        try:
            coro.send(None)
        except StopIteration:
            return
        raise AssertionError("the app suspended")
    return run


class Rig:
    """The apps and scopes of every mode (the xDS ones over a reference control plane)."""

    def __init__(self) -> None:
        self.engine = RbacEngine.from_xds(istio_filters())
        self.closers: List[Callable[[], None]] = []
        first = make_scope("/api/v1/frontend/items?page=2", FRONTEND)
        last = make_scope("/api/v3/search/items?page=2", SEARCH)
        evil = make_scope("/api/v1/frontend/items?page=2", "spiffe://cluster.local/ns/evil/sa/x")
        rbac = MeshAsgiMiddleware(app, rbac=self.engine)
        self.runs: Dict[str, Callable[[], None]] = {
            "bare": runner(app, first),
            "identity": runner(MeshAsgiMiddleware(app), first),
            "rbac-first": runner(rbac, first),
            "rbac-last": runner(rbac, last),
            "rbac-deny": runner(rbac, evil),
        }
        xds, xds_rec = self._xds()
        self.runs["xds"] = runner(xds, first)
        self.runs["xds+telemetry"] = runner(xds_rec, first)
        for mode, run in self.runs.items():  # warm the caches (chain per connection, route, RBAC memo)
            run()
        stats = rbac.stats.snapshot()
        assert stats["http.inbound.downstream_rq_2xx"] == 2 and stats["http.inbound.downstream_rq_4xx"] == 1, stats

    def _xds(self) -> Any:
        import tempfile

        import meshcore
        from meshcore.controlplane import ControlPlane
        from tls.pki import make_pki

        from inbound.grpcgen_inbound import inbound_listener
        from inbound_integrations.policies import bootstrap

        filters = istio_filters()
        deny, allow = (f["typed_config"]["rules"]["policies"] for f in filters)
        cp = ControlPlane()
        cp.start()
        self.closers.append(cp.stop)
        cp.set_resources([inbound_listener(PORT, deny=deny, allow=allow)])
        pki = make_pki(tempfile.mkdtemp(prefix="meshcore-bench-pki-"))
        mesh = meshcore.Mesh(bootstrap(cp.port, pki.paths("server").dir))
        self.closers.insert(0, mesh.close)
        lst = mesh.serve(PORT)
        assert lst.wait_serving(10), lst.error
        mesh.telemetry.add_sink(lambda record: None)
        return MeshAsgiMiddleware(app, listener=lst), MeshAsgiMiddleware(app, mesh, listener=lst)

    def close(self) -> None:
        for c in self.closers:
            c()


def measure(rig: Rig, rounds: int, per_round: int) -> Dict[str, float]:
    """Median ns per request over interleaved rounds of every mode."""
    samples: Dict[str, List[float]] = {m: [] for m in MODES}
    gc.disable()
    try:
        for _ in range(rounds):
            for mode in MODES:
                run = rig.runs[mode]
                t0 = time.perf_counter_ns()
                for _ in range(per_round):
                    run()
                samples[mode].append((time.perf_counter_ns() - t0) / per_round)
    finally:
        gc.enable()
    return {m: statistics.median(v) for m, v in samples.items()}


@pytest.fixture(scope="module")
def rig() -> Any:
    pytest.importorskip("cryptography")
    r = Rig()
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("mode", MODES)
def test_bench_asgi_middleware(benchmark: Any, rig: Rig, mode: str) -> None:
    benchmark.extra_info["mode"] = mode
    benchmark(rig.runs[mode])


def main() -> None:
    rig = Rig()
    try:
        med = measure(rig, 5 if QUICK else 25, 2000 if QUICK else 10000)
    finally:
        rig.close()
    from meshcore._fast import IMPLEMENTATION

    print(f"Python {sys.version.split()[0]}, meshcore core: {IMPLEMENTATION}")
    print("| mode | per request | added over bare |")
    print("|---|---:|---:|")
    for m in MODES:
        print(f"| {m} | {med[m] / 1000:.2f} µs | {(med[m] - med['bare']) / 1000:+.2f} µs |")


if __name__ == "__main__":
    main()
